"""How peft names and scales the LoRA adapters of open_clip modules (shared by both directions).

The key layout of a saved peft adapter, the factor applied twice to an attention's
out-projection (:func:`mha_out_proj_applied`, see :mod:`tvtool.formats.peft_adapters`), the
in-memory forms of both directions (:class:`PeftAdapter`, :class:`ImportedVector`), and the
rank padding both use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tvtool.formats.lora import FUSED_IN_PROJ
from tvtool.models.modules import ModuleSpec

PEFT_PREFIX = "base_model.model."
"""The prefix peft gives every key of a saved adapter."""
PEFT_A = ".lora_A.weight"
PEFT_B = ".lora_B.weight"
MHA_OUT = ".base_layer.out_proj"
"""Where peft's wrapper of an ``nn.MultiheadAttention`` keeps the adapted out-projection."""
MHA_OUT_PROJ_LOADED = 2.0
"""How many times peft applies an attention's out-projection delta in a model loaded with
``PeftModel.from_pretrained`` (measured with 0.21.2 and with 0.22.0): what an exported
adapter is written for."""
PEFT_SINGLE_OUT_PROJ = (0, 22)
"""The first peft release that applies an attention's out-projection delta once (PR #3774)."""
OUT_WEIGHT = ".out_proj.weight"
"""Suffix of an attention's out-projection weight (tvtool names)."""
IN_WEIGHT = "." + FUSED_IN_PROJ
"""Suffix of an attention's fused in-projection weight (tvtool names)."""
NO_MODULE = ModuleSpec("other", "")
"""What a name that is no module of the model looks like (``modules.get(name, NO_MODULE)``)."""


def mha_out_proj_applied(peft_version: str | None) -> float:
    """How many times peft ``peft_version`` applies an out-projection delta while training.

    In the model ``get_peft_model`` makes: twice before 0.22 (its ``merge()`` added the
    delta and then merged the inner layer, see the package docs), once from 0.22 on.
    ``None`` (unknown) is taken as the current behaviour, once.

    Raises:
        ValueError: a version string that does not start with ``MAJOR.MINOR``.
    """
    if peft_version is None:
        return 1.0
    match = re.match(r"\s*(\d+)\.(\d+)", peft_version)
    if match is None:
        raise ValueError(f"not a peft version: {peft_version[:40]!r}")
    version = (int(match.group(1)), int(match.group(2)))
    return 1.0 if version >= PEFT_SINGLE_OUT_PROJ else 2.0


@dataclass(frozen=True)
class PeftAdapter:
    """A peft adapter in memory: ``adapter_config.json`` and the saved state dict."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportedVector:
    """A peft adapter as tvtool task-vector tensors.

    Attributes:
        tensors: LoRA factors (``T.lora_A``/``T.lora_B``) or, when the adapter's scales cannot
            be written as one tvtool alpha, dense deltas; full open_clip state-dict names.
        lora: The ``lora_alpha``/``lora_rank``/``lora_targets`` metadata of a factor vector,
            None for a dense one.
        notes: What was read and decided, for stderr.
    """

    tensors: dict[str, Tensor]
    lora: dict[str, str] | None
    notes: list[str] = field(default_factory=list)


def pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A and zero columns of B up to ``rank`` (B·A unchanged).

    Args:
        a: ``[r, in]`` factor.
        b: ``[out, r]`` factor.
        rank: The rank to reach (at least ``r``).
    """
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
            torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))
