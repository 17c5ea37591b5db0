"""``lora`` mode: low-rank updates W = W0 + (alpha/r)·B·A on the image encoder's weights.

Targets are chosen by projection (:data:`~tvtool.finetune.base.LORA_TARGET_KINDS`): ``q``,
``k``, ``v`` = the query, key and value rows of each attention module's in-projection, each
with its own factor pair (open_clip fuses them into one ``in_proj_weight`` [3E, E]; the rows
[0, E), [E, 2E), [2E, 3E) are q, k, v); ``o`` = the out-projection weight; ``mlp`` = the
``nn.Linear`` layers of every residual block outside its attention module. The default,
``q, v``, is the LoRA paper's (Hu et al., arXiv 2106.09685, §7.1). ``attn`` is accepted as
an alias of ``q, k, v, o``. Initialisation follows peft's default: A ~ Kaiming-uniform
(a = √5), B = 0, so training starts exactly at the base model.

Why not peft's own wrappers: peft's ``nn.MultiheadAttention`` support merges the LoRA update
into the frozen in/out-projection weights before every forward and subtracts it afterwards,
so the frozen base drifts by rounding error at every step (measured: 8.5e-7 after 50 steps
on the tiny model), and its ``target_parameters`` route cannot wrap both projections of one
attention module. tvtool computes W0 + (alpha/r)·B·A functionally instead (exact, the base is
never written) with peft's parameter shapes, initialisation and scaling.

Vector format (docs/format.md): for each target ``T`` the file stores ``T.lora_A`` [r, in]
and ``T.lora_B`` [out, r], with ``tvtool.lora_rank``, ``tvtool.lora_alpha`` and
``tvtool.lora_targets`` in the metadata. ``T`` is the full model name of the weight, or for
a row block of a fused in-projection that name plus ``.q``, ``.k`` or ``.v``
(``visual.transformer.resblocks.0.attn.in_proj_weight.q``). The format itself (and
:func:`~tvtool.formats.lora.materialize_lora`, factors to dense deltas) is
:mod:`tvtool.formats.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tvtool.errors import UsageError
from tvtool.finetune.base import (
    ENCODER_PREFIX,
    LORA_TARGET_KINDS,
    Adapter,
    CliOption,
    ModeBase,
    attention_modules,
    freeze,
    residual_blocks,
)
from tvtool.formats.lora import (
    FUSED_IN_PROJ,
    ROW_BLOCKS,
    SUFFIX_A,
    SUFFIX_B,
    assemble_deltas,
    materialize_lora,
    split_target,
)
from tvtool.metadata import Mode
from tvtool.types import StateDict


def parse_lora_targets(kinds: Iterable[str]) -> tuple[str, ...]:
    """Canonical LoRA targets: aliases expanded, duplicates removed, in canonical order.

    Raises:
        UsageError: an unknown or empty target list.
    """
    wanted: set[str] = set()
    unknown = []
    for kind in kinds:
        kind = kind.strip().lower()
        if kind == "attn":
            wanted.update(("q", "k", "v", "o"))
        elif kind in LORA_TARGET_KINDS:
            wanted.add(kind)
        else:
            unknown.append(kind)
    if unknown or not wanted:
        raise UsageError(f"unknown LoRA targets {unknown or []}" if unknown else
                         "no LoRA targets given",
                         hint=f"use one or more of {', '.join(LORA_TARGET_KINDS)} (attn = "
                              "q,k,v,o), e.g. --lora-targets q,v")
    return tuple(k for k in LORA_TARGET_KINDS if k in wanted)


def lora_targets(encoder: nn.Module, kinds: Iterable[str]) -> list[str]:
    """Names (relative to ``encoder``) of the LoRA targets, see :func:`split_target`.

    Per attention module in q, k, v, o order, then the MLP layers of every block.

    Args:
        encoder: The image encoder.
        kinds: Any of ``q``, ``k``, ``v``, ``o``, ``mlp`` (or ``attn`` = q, k, v, o).

    Raises:
        UsageError: unknown kind.
        InvalidInputError: the encoder has no attention modules.
    """
    canonical = parse_lora_targets(kinds)
    modules = attention_modules(encoder)
    names: list[str] = []
    for module_name, mha in modules:
        for kind in canonical:
            if kind == "o":
                names.append(f"{module_name}.out_proj.weight")
            elif kind != "mlp":
                # Separate q/k/v weights (kdim/vdim differ from the embedding) are whole
                # matrices; open_clip's fused in-projection gets one factor pair per row block.
                names.append(f"{module_name}.{FUSED_IN_PROJ}.{kind}" if mha._qkv_same_embed_dim
                             else f"{module_name}.{kind}_proj_weight")
    if "mlp" in canonical:
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
    """``(out_features, in_features)`` of each target (a row block has a third of the rows)."""
    params = dict(encoder.named_parameters())
    shapes = {}
    for target in targets:
        weight, block = split_target(target)
        rows, cols = int(params[weight].shape[0]), int(params[weight].shape[1])
        shapes[target] = (rows // len(ROW_BLOCKS) if block is not None else rows, cols)
    return shapes


@dataclass(frozen=True)
class LoraOptions:
    """The options of the LoRA modes (lora, llora, llora-net); validated on construction.

    Attributes:
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is (alpha / r)·B·A.
        lora_targets: Which projections get LoRA factors: any of ``q``, ``k``, ``v``
            (rows of the attention in-projection, one factor pair each), ``o`` (attention
            out-projection), ``mlp`` (the MLP linear layers); ``attn`` = q, k, v, o. A
            comma-separated string (the flag's form) is accepted. Stored canonical (aliases
            expanded, canonical order); default ``q, v`` as in the LoRA paper.
    """

    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        targets: Iterable[str] = self.lora_targets
        if isinstance(targets, str):
            targets = [p for p in targets.split(",") if p.strip()]
            if not targets:
                raise UsageError("--lora-targets is empty",
                                 hint="use any of q,k,v,o,mlp, e.g. q,v")
        object.__setattr__(self, "lora_targets", parse_lora_targets(targets))
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 1:
            raise UsageError(f"--lora-rank must be at least 1, got {self.lora_rank!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise UsageError(f"--lora-alpha must be positive, got {self.lora_alpha!r}")


LORA_CLI_OPTIONS = (
    CliOption("lora_rank", "--lora-rank", "LoRA rank (LoRA modes).", panel="LoRA modes"),
    CliOption("lora_alpha", "--lora-alpha", "LoRA alpha; the update is (alpha/rank)·B·A.",
              panel="LoRA modes"),
    CliOption("lora_targets", "--lora-targets",
              "LoRA targets, comma-separated: q, k, v (rows of the attention in-projection), "
              "o (out-projection), mlp; attn = q,k,v,o.",
              metavar="[q,k,v,o,mlp,attn]", panel="LoRA modes"),
)
"""The flags of :class:`LoraOptions` (shared by the three LoRA modes)."""


def lora_metadata(options: LoraOptions) -> dict[str, str]:
    """The ``tvtool.lora_*`` metadata keys (without prefix) of a LoRA vector."""
    return {"lora_rank": str(options.lora_rank), "lora_alpha": repr(float(options.lora_alpha)),
            "lora_targets": ",".join(options.lora_targets)}


class LoraAdapter(Adapter):
    """Frozen encoder plus LoRA factors; forward uses W0 + (alpha/r)·B·A exactly.

    Subclasses with ``train_a = False`` keep A at its initial value A0 (a buffer) and train
    B only.
    """

    mode = Mode.LORA
    train_a: ClassVar[bool] = True

    def __init__(self, encoder: nn.Module, options: LoraOptions, *, seed: int = 0,
                 prefix: str = ENCODER_PREFIX) -> None:
        super().__init__(encoder, prefix)
        self.options = options
        self.targets = lora_targets(encoder, options.lora_targets)
        self.scaling = options.lora_alpha / options.lora_rank
        freeze(encoder)
        params = dict(encoder.named_parameters())
        first = params[split_target(self.targets[0])[0]]
        factors = init_lora_factors(target_shapes(encoder, self.targets), options.lora_rank,
                                    seed, first.dtype)
        if self.train_a:
            self.lora_a = nn.ParameterList([nn.Parameter(factors[t][0].to(first.device))
                                            for t in self.targets])
        else:
            for index, target in enumerate(self.targets):
                self.register_buffer(f"lora_a0_{index}", factors[target][0].to(first.device))
        self.lora_b = nn.ParameterList([nn.Parameter(factors[t][1].to(first.device))
                                        for t in self.targets])

    def lora_a_factor(self, index: int) -> Tensor:
        """The A factor of target ``index`` (trainable, or the frozen A0)."""
        if self.train_a:
            return self.lora_a[index]
        return getattr(self, f"lora_a0_{index}")  # type: ignore[no-any-return]

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        pairs = []
        for index, (target, b) in enumerate(zip(self.targets, self.lora_b, strict=True)):
            if self.train_a:
                pairs.append((target + SUFFIX_A, self.lora_a[index]))
            pairs.append((target + SUFFIX_B, b))
        return pairs

    def factors(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(target, A, B)`` per target (live tensors)."""
        return [(t, self.lora_a_factor(i), b)
                for i, (t, b) in enumerate(zip(self.targets, self.lora_b, strict=True))]

    def weight_deltas(self) -> dict[str, Tensor]:
        """(alpha/r)·B·A per adapted weight (q/k/v blocks stacked), differentiable."""
        return assemble_deltas({t: (b @ a) * self.scaling for t, a, b in self.factors()})

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


class LoraMode(ModeBase):
    """LoRA on the image encoder's attention projections (and optionally MLP) weights."""

    name = Mode.LORA
    summary = "LoRA factors on the chosen projections (default q, v)"
    options: ClassVar[type] = LoraOptions
    cli_options: ClassVar[tuple[CliOption, ...]] = LORA_CLI_OPTIONS

    def check_encoder(self, encoder: nn.Module, options: LoraOptions) -> None:
        lora_targets(encoder, options.lora_targets)

    def build(self, encoder: nn.Module, options: LoraOptions, *, seed: int = 0) -> Adapter:
        return LoraAdapter(encoder, options, seed=seed)
