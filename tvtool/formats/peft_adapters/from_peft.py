"""peft LoRA adapters -> tvtool LoRA task vectors (see :mod:`tvtool.formats.peft_adapters`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tvtool.errors import InvalidInputError
from tvtool.formats.lora import ROW_BLOCKS, SUFFIX_A, SUFFIX_B
from tvtool.formats.peft_adapters.config import adaptable, check_peft_config, check_targets
from tvtool.formats.peft_adapters.layout import (
    IN_WEIGHT,
    MHA_OUT,
    NO_MODULE,
    OUT_WEIGHT,
    PEFT_A,
    PEFT_B,
    PEFT_PREFIX,
    ImportedVector,
    pad_rank,
)
from tvtool.models.modules import ROOT_PREFIX, ModuleSpec


def _parse_keys(tensors: Mapping[str, Tensor], modules: Mapping[str, ModuleSpec],
                label: str) -> dict[str, dict[str, Tensor]]:
    """Group a peft state dict by adapted module: ``{module: {"A": .., "B": .., ...}}``.

    MHA modules get keys ``A``, ``B`` (in-projection) and ``outA``, ``outB``.
    """
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise InvalidInputError(f"{label}: unexpected key {key[:80]!r} (peft adapter keys "
                                    f"start with {PEFT_PREFIX!r})")
        name = key[len(PEFT_PREFIX):]
        if name.endswith((".lora_embedding_A", ".lora_embedding_B")):
            raise InvalidInputError(f"{label} adapts an embedding ({name[:80]!r}); tvtool "
                                    "reads LoRA on attention and Linear layers")
        if ".lora_magnitude_vector" in name:
            raise InvalidInputError(f"{label} is a DoRA adapter ({name[:80]!r}), which tvtool "
                                    "does not support")
        if name.endswith(".lora_B.bias"):
            raise InvalidInputError(f"{label} has a bias on lora_B ({name[:80]!r}), which "
                                    "tvtool does not support")
        if name.endswith(PEFT_A) or name.endswith(PEFT_B):
            which = "A" if name.endswith(PEFT_A) else "B"
            module = name[: -len(PEFT_A)]
        else:
            raise InvalidInputError(f"{label}: unexpected key {key[:80]!r} (not a LoRA factor; "
                                    "tvtool reads lora_A/lora_B weights only)")
        part = which
        if module.endswith(MHA_OUT) and modules.get(module[: -len(MHA_OUT)],
                                                    NO_MODULE).kind == "mha":
            module, part = module[: -len(MHA_OUT)], "out" + which
        spec = modules.get(module)
        if spec is None:
            raise InvalidInputError(f"{label} adapts {module[:80]!r}, which is not a module of "
                                    "the model", hint="is the adapter for another model, or for "
                                    "the image tower alone (--module visual) or the whole model "
                                    "(--module clip)?")
        if spec.kind == "linear" and spec.inside_attention:
            raise InvalidInputError(f"{label} adapts {module!r} on its own: nn.MultiheadAttention "
                                    "never calls its out_proj's forward, so peft never applies "
                                    "that LoRA", hint="target the attention module instead")
        if not adaptable(spec):
            raise InvalidInputError(f"{label} adapts {module!r}, a {spec.type_name}; tvtool "
                                    "reads LoRA on nn.MultiheadAttention and nn.Linear layers")
        if spec.kind == "mha" and not spec.fused_in_proj:
            raise InvalidInputError(f"{label} adapts {module!r}, an attention with separate "
                                    "q/k/v weights")
        grouped.setdefault(module, {})[part] = tensor
    return grouped


def _checked(module: str, part: str, parts: Mapping[str, Tensor], shape: tuple[int, int],
             rank: int, label: str) -> tuple[Tensor, Tensor]:
    name = module + (MHA_OUT if part == "out" else "")
    a_key, b_key = part + "A", part + "B"
    missing = [PEFT_PREFIX + name + (PEFT_A if k == a_key else PEFT_B)
               for k in (a_key, b_key) if k not in parts]
    if missing:
        raise InvalidInputError(f"{label} lacks {missing[0]!r}")
    a, b = parts[a_key], parts[b_key]
    for tensor, key in ((a, a_key), (b, b_key)):
        if not tensor.is_floating_point():
            raise InvalidInputError(f"{label}: {name}'s lora_{key[-1]} has dtype {tensor.dtype}")
    expected_a, expected_b = (rank, shape[1]), (shape[0], rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise InvalidInputError(
            f"{label}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the "
            f"model and r={rank} need {expected_a} and {expected_b}")
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise InvalidInputError(f"{label}: the LoRA weights of {name} contain NaN or Inf")
    return a, b


def _row_blocks(b: Tensor) -> list[str]:
    height = b.shape[0] // len(ROW_BLOCKS)
    return [ROW_BLOCKS[i] for i in range(len(ROW_BLOCKS))
            if bool(b[i * height:(i + 1) * height].any())]


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_scaled_deltas(pairs: Mapping[str, tuple[Tensor, Tensor, float]], label: str) -> None:
    """Refuse an adapter whose scaled delta scaling·B·A does not fit float32.

    peft computes the delta in the weights' precision, and ``tvtool apply`` accumulates in
    float32; an adapter whose delta overflows there (``lora_alpha: 1e308``) must be refused
    when it is converted, not produce a vector every later command refuses.
    """
    for target, (a, b, scale) in pairs.items():
        if not math.isfinite(scale) or abs(scale) > _FLOAT32_MAX:
            raise InvalidInputError(f"{label}: the scaling of {target!r} (lora_alpha / r) is "
                                    f"{scale:g}, beyond the float32 range",
                                    hint="check lora_alpha / alpha_pattern in "
                                         "adapter_config.json")
        delta = (b.double() @ a.double()) * scale
        if not bool(torch.isfinite(delta).all()) or float(delta.abs().max()) > _FLOAT32_MAX:
            raise InvalidInputError(f"{label}: the delta scaling·B·A of {target!r} overflows "
                                    f"float32 (scaling {scale:g})",
                                    hint="check lora_alpha / alpha_pattern in "
                                         "adapter_config.json")


def peft_to_lora_vector(config: Mapping[str, Any], tensors: Mapping[str, Tensor],
                        modules: Mapping[str, ModuleSpec], root: str, *,
                        label: str, out_proj_applied: float = 1.0) -> ImportedVector:
    """A peft LoRA adapter of an open_clip model as tvtool task-vector tensors.

    Every adapted module becomes a factor pair with tvtool names: an attention's in-projection
    ``<attn>.in_proj_weight`` (one pair for the whole [3E, E] matrix, as peft trains it), its
    out-projection ``<attn>.out_proj.weight``, a Linear ``<module>.weight``; names get the
    ``visual.`` prefix when ``root`` is ``visual``. Pairs whose B (or A) is all zero change
    nothing and are left out, unless every pair is zero. Scales are honoured per module
    (``rank_pattern``, ``alpha_pattern``, ``use_rslora``): when every module has the same
    scaling s, the result keeps the factors, padded with zeros to the largest rank R, with
    tvtool alpha s·R (half-precision factors widened to float32); otherwise it holds the
    dense deltas scaling·B·A. An attention's out-projection B is multiplied by
    ``out_proj_applied``: how many times the adapter's peft applies that delta
    (:func:`~tvtool.formats.peft_adapters.layout.mha_out_proj_applied`).

    Raises:
        InvalidInputError: see :func:`check_peft_config`; unexpected or missing keys, modules
            the model does not have or peft cannot adapt, shapes or ranks that do not fit,
            NaN or Inf.
    """
    settings = check_peft_config(config, label)
    notes: list[str] = []
    grouped = _parse_keys(tensors, modules, label)
    if not grouped:
        raise InvalidInputError(f"{label} holds no LoRA weights")
    check_targets(settings, list(grouped), modules, label, notes)
    prefix = ROOT_PREFIX[root]
    pairs: dict[str, tuple[Tensor, Tensor, float]] = {}  # tvtool target -> (A, B, scale)
    doubled = False
    for module, parts in grouped.items():
        spec = modules[module]
        rank, scale = settings.rank_of(module), settings.scale_of(module)
        assert spec.weight_shape is not None
        if spec.kind == "mha":
            assert spec.out_proj_shape is not None
            a, b = _checked(module, "", parts, spec.weight_shape, rank, label)
            pairs[prefix + module + IN_WEIGHT] = (a, b, scale)
            a, b = _checked(module, "out", parts, spec.out_proj_shape, rank, label)
            pairs[prefix + module + OUT_WEIGHT] = (a, b * out_proj_applied, scale)
            doubled = doubled or (out_proj_applied != 1.0 and bool(b.any()))
        else:
            a, b = _checked(module, "", parts, spec.weight_shape, rank, label)
            pairs[prefix + module + ".weight"] = (a, b, scale)
    if doubled:
        notes.append("attention out-projections: B doubled, since the adapter's peft (before "
                     "0.22) applies their delta twice (huggingface/peft PR #3774)")
    if settings.rslora:
        notes.append("use_rslora: scaling lora_alpha/sqrt(r) per module")
    if config.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out is ignored, as peft ignores it for nn.Linear and "
                     "nn.MultiheadAttention")
    nonzero = {t: p for t, p in pairs.items() if bool(p[0].any()) and bool(p[1].any())}
    if nonzero and len(nonzero) < len(pairs):
        notes.append(f"left out {len(pairs) - len(nonzero)} factor pairs that change nothing "
                     "(B or A all zero)")
        pairs = nonzero
    _check_scaled_deltas(pairs, label)
    widened = False
    out: dict[str, Tensor] = {}
    # tvtool scales every pair by alpha / (its rank): one scale s for all modules becomes
    # alpha = s·R with every pair padded to the largest rank R (zeros: B·A unchanged).
    scales = {s for _, _, s in pairs.values()}
    rank = max(int(a.shape[0]) for a, _, _ in pairs.values())
    tvtool_alpha = next(iter(scales)) * rank
    exact = len(scales) == 1 and tvtool_alpha / rank == next(iter(scales))
    padded = False
    for target, (a, b, scale) in pairs.items():
        if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (torch.float16,
                                                                     torch.bfloat16):
            a, b, widened = a.float(), b.float(), True
        if a.dtype != b.dtype:
            a, b = a.double(), b.double()
        if exact:
            padded = padded or a.shape[0] != rank
            a, b = pad_rank(a, b, rank)
            out[target + SUFFIX_A], out[target + SUFFIX_B] = a.contiguous(), b.contiguous()
        else:
            out[target] = ((b.double() @ a.double()) * scale).to(a.dtype)
    if widened:
        notes.append("half-precision factors widened to float32")
    if not exact:
        notes.append("the modules' scales (lora_alpha/r per module) differ, so no single tvtool "
                     "lora_alpha reproduces them: writing dense deltas scaling·B·A")
        return ImportedVector(out, None, notes)
    if padded:
        notes.append(f"factor pairs of smaller rank padded with zeros to rank {rank}, so one "
                     "lora_alpha gives every module its scale")
    kinds: set[str] = set()
    for target, (_, b, _) in pairs.items():
        if target.endswith(IN_WEIGHT):
            kinds.update(_row_blocks(b))
        elif target.endswith(OUT_WEIGHT) and modules.get(
                target[len(prefix): -len(OUT_WEIGHT)], NO_MODULE).kind == "mha":
            kinds.add("o")
        else:
            kinds.add("mlp")
    lora = {"lora_alpha": repr(float(tvtool_alpha)), "lora_rank": str(rank),
            "lora_targets": ",".join(k for k in ("q", "k", "v", "o", "mlp") if k in kinds)}
    return ImportedVector(out, lora, notes)
