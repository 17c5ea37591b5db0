"""``lora`` mode: low-rank updates W = W0 + (alpha/r)·B·A on the image encoder's weights.

Targets are chosen by module type: ``attn`` = the in-projection (q, k and v together, as peft
does for ``nn.MultiheadAttention``) and out-projection weight of every attention module;
``mlp`` = the ``nn.Linear`` layers of every residual block outside its attention module.
Initialisation follows peft's default: A ~ Kaiming-uniform (a = √5), B = 0, so training
starts exactly at the base model.

Why not peft's own wrappers: peft's ``nn.MultiheadAttention`` support merges the LoRA update
into the frozen in/out-projection weights before every forward and subtracts it afterwards,
so the frozen base drifts by rounding error at every step (measured: 8.5e-7 after 50 steps
on the tiny model), and its ``target_parameters`` route cannot wrap both projections of one
attention module. tvtool computes W0 + (alpha/r)·B·A functionally instead (exact, the base is
never written) with peft's parameter shapes, initialisation and scaling.

Vector format: for each target weight ``T`` (full model name) the file stores ``T.lora_A``
[r, in] and ``T.lora_B`` [out, r], with ``tvtool.lora_rank``, ``tvtool.lora_alpha`` and
``tvtool.lora_targets`` in the metadata. :func:`materialize_lora` turns it into dense deltas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tvtool.errors import InvalidInputError, UsageError
from tvtool.finetune.base import (
    ENCODER_PREFIX,
    LORA_TARGET_KINDS,
    Adapter,
    ModeOptions,
    attention_modules,
    freeze,
    residual_blocks,
)
from tvtool.metadata import FileMeta, Mode
from tvtool.types import StateDict

SUFFIX_A = ".lora_A"
SUFFIX_B = ".lora_B"


def lora_targets(encoder: nn.Module, kinds: tuple[str, ...]) -> list[str]:
    """Names (relative to ``encoder``) of the 2-D weights that get LoRA factors.

    Args:
        encoder: The image encoder.
        kinds: Any of ``attn`` and ``mlp``.

    Raises:
        UsageError: unknown kind.
        InvalidInputError: the encoder has no attention modules.
    """
    unknown = [k for k in kinds if k not in LORA_TARGET_KINDS]
    if unknown or not kinds:
        raise UsageError(f"unknown LoRA targets {unknown or list(kinds)}",
                         hint=f"use one or more of {', '.join(LORA_TARGET_KINDS)}")
    names: list[str] = []
    if "attn" in kinds:
        for module_name, mha in attention_modules(encoder):
            if not mha._qkv_same_embed_dim:
                raise InvalidInputError(f"attention module {module_name!r} has separate q/k/v "
                                        "weights, which LoRA mode does not support")
            names += [f"{module_name}.in_proj_weight", f"{module_name}.out_proj.weight"]
    if "mlp" in kinds:
        attention_modules(encoder)  # same error as attn for encoders without blocks
        for block_name, block in residual_blocks(encoder):
            inside_attention = {f"{child}." for child, module in block.named_children()
                                if isinstance(module, nn.MultiheadAttention)}
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear) and name and \
                        not any(f"{name}.".startswith(p) for p in inside_attention):
                    names.append(f"{block_name}.{name}.weight")
    return names


def init_lora_factors(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int,
                      dtype: torch.dtype = torch.float32) -> dict[str, tuple[Tensor, Tensor]]:
    """Draw peft's default LoRA initialisation: A Kaiming-uniform (a = √5), B zero.

    Args:
        shapes: ``(out_features, in_features)`` per target name.
        rank: LoRA rank r.
        seed: Seed of the A draws (one generator, targets in the given order).
        dtype: Factor dtype.

    Returns:
        ``name -> (A [r, in], B [out, r])`` on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (out_features, in_features) in shapes.items():
        a = torch.empty(rank, in_features, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        factors[name] = (a, torch.zeros(out_features, rank, dtype=dtype))
    return factors


def target_shapes(encoder: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each target weight."""
    params = dict(encoder.named_parameters())
    return {t: (int(params[t].shape[0]), int(params[t].shape[1])) for t in targets}


def check_lora_options(options: ModeOptions) -> None:
    """Refuse a non-positive rank or alpha.

    Raises:
        UsageError: bad rank or alpha.
    """
    if options.lora_rank < 1:
        raise UsageError(f"--lora-rank must be at least 1, got {options.lora_rank}")
    if not math.isfinite(options.lora_alpha) or options.lora_alpha <= 0:
        raise UsageError(f"--lora-alpha must be positive, got {options.lora_alpha}")


def lora_metadata(options: ModeOptions) -> dict[str, str]:
    """The ``tvtool.lora_*`` metadata keys (without prefix) of a LoRA vector."""
    return {"lora_rank": str(options.lora_rank), "lora_alpha": repr(float(options.lora_alpha)),
            "lora_targets": ",".join(options.lora_targets)}


def _alpha_from(metadata: FileMeta | Mapping[str, str]) -> tuple[float, int | None]:
    if isinstance(metadata, FileMeta):
        extra: Mapping[str, str] = metadata.extra
    else:
        extra = {k.removeprefix("tvtool."): v for k, v in metadata.items()}
    if "lora_alpha" not in extra:
        raise InvalidInputError("LoRA vector has no tvtool.lora_alpha metadata",
                                hint="it cannot be turned into dense weights without it")
    try:
        alpha = float(extra["lora_alpha"])
        rank = int(extra["lora_rank"]) if "lora_rank" in extra else None
    except ValueError:
        raise InvalidInputError("malformed tvtool.lora_alpha / tvtool.lora_rank metadata") from None
    if not math.isfinite(alpha):
        raise InvalidInputError(f"tvtool.lora_alpha is {alpha}")
    return alpha, rank


def materialize_lora(tensors: Mapping[str, Tensor],
                     metadata: FileMeta | Mapping[str, str]) -> StateDict:
    """Turn stored LoRA factors into dense weight deltas ΔW = (alpha/r)·B·A.

    Keys ``T.lora_A`` / ``T.lora_B`` become one key ``T``; any other tensor passes through.
    This is the dense task vector of both ``lora`` and ``llora`` files (for ``llora`` it is
    exactly the weight change the trained linearized model applies, see docs/finetune.md).

    Args:
        tensors: The vector's tensors.
        metadata: Its parsed :class:`~tvtool.metadata.FileMeta` or raw header (needs
            ``tvtool.lora_alpha``).

    Returns:
        Dense deltas by model state-dict name, in the factors' dtype.

    Raises:
        InvalidInputError: unpaired factors, inconsistent shapes or ranks, missing alpha.
    """
    has_factors = any(k.endswith((SUFFIX_A, SUFFIX_B)) for k in tensors)
    if not has_factors:
        return dict(tensors)
    alpha, declared_rank = _alpha_from(metadata)
    out: StateDict = {}
    for key, tensor in tensors.items():
        if key.endswith(SUFFIX_B):
            if key[:-len(SUFFIX_B)] + SUFFIX_A not in tensors:
                raise InvalidInputError(f"LoRA factor {key!r} has no matching {SUFFIX_A}")
            continue
        if not key.endswith(SUFFIX_A):
            out[key] = tensor
            continue
        target = key[:-len(SUFFIX_A)]
        b_key = target + SUFFIX_B
        if b_key not in tensors:
            raise InvalidInputError(f"LoRA factor {key!r} has no matching {SUFFIX_B}")
        a, b = tensor, tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInputError(f"LoRA factors of {target!r} do not fit: A {tuple(a.shape)}, "
                                    f"B {tuple(b.shape)} (expected A [r, in], B [out, r])")
        rank = int(a.shape[0])
        if declared_rank is not None and rank != declared_rank:
            raise InvalidInputError(f"LoRA factors of {target!r} have rank {rank}, the metadata "
                                    f"says {declared_rank}")
        if target in tensors:
            raise InvalidInputError(f"{target!r} is stored both dense and as LoRA factors")
        dense = (b.double() @ a.double()) * (alpha / rank)
        out[target] = dense.to(a.dtype)
    return out


class LoraAdapter(Adapter):
    """Frozen encoder plus trainable LoRA factors; forward uses W0 + (alpha/r)·B·A exactly."""

    mode = Mode.LORA

    def __init__(self, encoder: nn.Module, options: ModeOptions,
                 prefix: str = ENCODER_PREFIX) -> None:
        super().__init__(encoder, prefix)
        check_lora_options(options)
        self.options = options
        self.targets = lora_targets(encoder, options.lora_targets)
        self.scaling = options.lora_alpha / options.lora_rank
        freeze(encoder)
        params = dict(encoder.named_parameters())
        factors = init_lora_factors(target_shapes(encoder, self.targets), options.lora_rank,
                                    options.seed, params[self.targets[0]].dtype)
        device = params[self.targets[0]].device
        self.lora_a = nn.ParameterList([nn.Parameter(factors[t][0].to(device))
                                        for t in self.targets])
        self.lora_b = nn.ParameterList([nn.Parameter(factors[t][1].to(device))
                                        for t in self.targets])

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        pairs = []
        for target, a, b in zip(self.targets, self.lora_a, self.lora_b, strict=True):
            pairs += [(target + SUFFIX_A, a), (target + SUFFIX_B, b)]
        return pairs

    def factors(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(target, A, B)`` per target (live tensors)."""
        return list(zip(self.targets, self.lora_a, self.lora_b, strict=True))

    def weight_deltas(self) -> dict[str, Tensor]:
        """(alpha/r)·B·A per target, differentiable in the factors."""
        return {t: (b @ a) * self.scaling for t, a, b in self.factors()}

    def forward(self, images: Tensor) -> Tensor:
        params = dict(self.encoder.named_parameters())
        merged = {t: params[t] + d.to(params[t].dtype) for t, d in self.weight_deltas().items()}
        return functional_call(self.encoder, merged, (images,), strict=False)

    def task_vector(self) -> StateDict:
        out: StateDict = {}
        for target, a, b in self.factors():
            out[self.prefix + target + SUFFIX_A] = a.detach().to("cpu", copy=True)
            out[self.prefix + target + SUFFIX_B] = b.detach().to("cpu", copy=True)
        return out

    def dense_delta(self) -> StateDict:
        return materialize_lora(self.task_vector(), lora_metadata(self.options))

    def vector_metadata(self) -> dict[str, str]:
        return lora_metadata(self.options)


class LoraMode:
    """LoRA on the image encoder's attention (and optionally MLP) weights."""

    name = Mode.LORA
    linearized = False
    summary = "LoRA factors on attention (and optionally MLP) weights"

    def build(self, encoder: nn.Module, options: ModeOptions) -> Adapter:
        return LoraAdapter(encoder, options)
