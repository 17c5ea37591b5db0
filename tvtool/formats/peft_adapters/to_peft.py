"""tvtool LoRA task vectors -> peft LoRA adapters (see :mod:`tvtool.formats.peft_adapters`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tvtool.errors import InvalidInputError
from tvtool.formats.lora import ROW_BLOCKS, SUFFIX_A, SUFFIX_B, split_target
from tvtool.formats.peft_adapters.layout import (
    IN_WEIGHT,
    MHA_OUT,
    NO_MODULE,
    OUT_WEIGHT,
    PEFT_A,
    PEFT_B,
    PEFT_PREFIX,
    PeftAdapter,
    pad_rank,
)
from tvtool.models.modules import ROOT_PREFIX, ModuleSpec


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)


def _check_pair(target: str, a: Tensor, b: Tensor, shape: tuple[int, int] | None,
                label: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise InvalidInputError(f"{label}: LoRA factors of {target!r} do not fit: A "
                                f"{tuple(a.shape)}, B {tuple(b.shape)}")
    if shape is not None and (b.shape[0], a.shape[1]) != shape:
        raise InvalidInputError(f"{label}: LoRA factors of {target!r} give a "
                                f"{b.shape[0]}x{a.shape[1]} delta, the weight is "
                                f"{shape[0]}x{shape[1]}")


def lora_vector_to_peft(tensors: Mapping[str, Tensor], alpha: float,
                        modules: Mapping[str, ModuleSpec], root: str, *, label: str,
                        auto_mapping: Mapping[str, str] | None = None,
                        out_proj_applied: float = 1.0) -> PeftAdapter:
    """The peft adapter (config and state dict) of a tvtool LoRA vector.

    Args:
        tensors: The vector's tensors (``T.lora_A``/``T.lora_B`` factors only).
        alpha: Its ``tvtool.lora_alpha``; pair ``T`` changes its weight by
            (alpha/r_T)·B·A.
        modules: The module table of the model the adapter is for (names relative to
            ``root``), from :func:`tvtool.models.modules.module_table`.
        root: ``clip`` or ``visual`` (see :data:`tvtool.models.modules.ROOT_PREFIX`).
        label: How to name the vector in errors.
        auto_mapping: peft's ``auto_mapping`` entry (the base model's class) to record.
        out_proj_applied: How many times the peft that will load the adapter applies an
            attention's out-projection delta (:data:`MHA_OUT_PROJ_LOADED`); its B is divided
            by it.

    Returns:
        The config (``adapter_config.json`` as a dict) and the state dict with peft's names.

    Raises:
        InvalidInputError: dense tensors, unpaired factors, a target peft cannot adapt (an
            attention with separate q/k/v weights) or outside ``root``, shapes that do not
            fit the model.
    """
    prefix = ROOT_PREFIX[root]
    dense = [k for k in tensors if not k.endswith((SUFFIX_A, SUFFIX_B))]
    if dense:
        raise InvalidInputError(f"{label} holds dense tensors besides its LoRA factors (e.g. "
                                f"{dense[0]!r}); a peft LoRA adapter holds factors only")
    in_parts: dict[str, dict[int | None, tuple[Tensor, Tensor]]] = {}
    out_parts: dict[str, tuple[Tensor, Tensor]] = {}
    linear_parts: dict[str, tuple[Tensor, Tensor]] = {}
    scales: dict[str, float] = {}
    for key in tensors:
        if key.endswith(SUFFIX_B):
            if key[: -len(SUFFIX_B)] + SUFFIX_A not in tensors:
                raise InvalidInputError(f"{label}: LoRA factor {key!r} has no matching "
                                        f"{SUFFIX_A}")
            continue
        target = key[: -len(SUFFIX_A)]
        if target + SUFFIX_B not in tensors:
            raise InvalidInputError(f"{label}: LoRA factor {key!r} has no matching {SUFFIX_B}")
        a, b = tensors[key], tensors[target + SUFFIX_B]
        weight, block = split_target(target)
        if not weight.startswith(prefix):
            raise InvalidInputError(f"{label} adapts {weight!r}, outside the image tower",
                                    hint="export it for the whole model (--module clip)")
        rel = weight[len(prefix):]
        if rel.endswith(IN_WEIGHT) and modules.get(rel[: -len(IN_WEIGHT)],
                                                    NO_MODULE).kind == "mha":
            module = rel[: -len(IN_WEIGHT)]
            spec = modules[module]
            shape = spec.weight_shape
            if block is not None and shape is not None:
                shape = (shape[0] // len(ROW_BLOCKS), shape[1])
            _check_pair(target, a, b, shape, label)
            if not spec.fused_in_proj:
                raise InvalidInputError(f"{label}: {module!r} has separate q/k/v weights, "
                                        "which peft cannot adapt")
            parts = in_parts.setdefault(module, {})
            if (block is None and parts) or None in parts:
                raise InvalidInputError(f"{label}: {weight!r} has LoRA factors both for the "
                                        "whole matrix and for its q/k/v rows")
            parts[block] = (a, b)
        elif rel.endswith(OUT_WEIGHT) and modules.get(rel[: -len(OUT_WEIGHT)],
                                                       NO_MODULE).kind == "mha":
            module = rel[: -len(OUT_WEIGHT)]
            _check_pair(target, a, b, modules[module].out_proj_shape, label)
            out_parts[module] = (a, b)
        elif rel.endswith(".weight") and modules.get(rel[: -len(".weight")],
                                                     NO_MODULE).kind == "linear" \
                and not modules[rel[: -len(".weight")]].inside_attention:
            module = rel[: -len(".weight")]
            _check_pair(target, a, b, modules[module].weight_shape, label)
            linear_parts[module] = (a, b)
        else:
            raise InvalidInputError(f"{label}: no peft LoRA layer adapts {target!r} (peft "
                                    "adapts nn.MultiheadAttention and nn.Linear modules)")
        scales[target] = alpha / int(a.shape[0])

    if not scales:
        raise InvalidInputError(f"{label} holds no LoRA factors")
    notes: list[str] = []
    scale = next(iter(scales.values()))
    folded = sorted(t for t, s in scales.items() if s != scale)
    if folded:
        notes.append(f"{len(folded)} factor pairs have another scale alpha/r than the first; "
                     "their scale ratio is folded into B (rounding only)")

    def scaled(target: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        ratio = scales[target] / scale
        return (a, b) if ratio == 1.0 else (a, (b.double() * ratio).to(b.dtype))

    # One pair per peft module: (A, B) before padding to the common rank.
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    attention = sorted(set(in_parts) | set(out_parts), key=list(modules).index)
    for module in attention:
        spec = modules[module]
        assert spec.weight_shape is not None and spec.out_proj_shape is not None
        rows, cols = spec.weight_shape
        in_pair: tuple[Tensor, Tensor] | None = None
        parts = in_parts.get(module, {})
        if None in parts:
            in_pair = scaled(prefix + module + IN_WEIGHT, *parts[None])
        elif parts:
            height = rows // len(ROW_BLOCKS)
            blocks = [(i, *scaled(f"{prefix}{module}{IN_WEIGHT}.{ROW_BLOCKS[i]}", *parts[i]))
                      for i in range(len(ROW_BLOCKS)) if i in parts]
            rank = sum(int(a.shape[0]) for _, a, _ in blocks)
            first_a = blocks[0][1]
            big_a = torch.cat([a for _, a, _ in blocks], dim=0)
            big_b = first_a.new_zeros(rows, rank)
            column = 0
            for index, a, b in blocks:
                big_b[index * height:(index + 1) * height, column:column + a.shape[0]] = b
                column += a.shape[0]
            in_pair = (big_a, big_b)
        out_pair = None
        if module in out_parts:
            out_a, out_b = scaled(prefix + module + OUT_WEIGHT, *out_parts[module])
            out_pair = (out_a, out_b / out_proj_applied)
        some = (in_pair or out_pair)
        assert some is not None
        rank = max(int(p[0].shape[0]) for p in (in_pair, out_pair) if p is not None)
        zeros_a = some[0].new_zeros(rank, cols)
        pairs[module] = in_pair or (zeros_a, some[0].new_zeros(rows, rank))
        pairs[module + MHA_OUT] = out_pair or (zeros_a.clone(),
                                               some[0].new_zeros(spec.out_proj_shape[0], rank))
        if in_pair is None or out_pair is None:
            notes.append(f"{module}: peft adapts the in- and out-projection of an attention "
                         "together; the one without factors gets zero factors")
    if out_parts and out_proj_applied != 1.0:
        notes.append("attention out-projections: B halved, since peft applies their delta "
                     "twice in a model it loads (measured with 0.21.2 and 0.22.0)")
    for module, (a, b) in linear_parts.items():
        pairs[module] = scaled(prefix + module + ".weight", a, b)
    rank = max(int(a.shape[0]) for a, _ in pairs.values())
    peft_alpha = scale * rank
    state: dict[str, Tensor] = {}
    for module, (a, b) in pairs.items():
        a, b = pad_rank(a, b, rank)
        state[PEFT_PREFIX + module + PEFT_A] = a.contiguous()
        state[PEFT_PREFIX + module + PEFT_B] = b.contiguous()
    targets = [m for m in modules if m in in_parts or m in out_parts or m in linear_parts]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "auto_mapping": dict(auto_mapping) if auto_mapping else None,
        "r": rank,
        "lora_alpha": _number(peft_alpha),
        "lora_dropout": 0.0,
        "target_modules": targets,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    return PeftAdapter(config, state, notes)
