"""Fine-tuning: a trainer plus one module per mode (full, attn, linear, lora, llora, llora-net).

Public API:

* :class:`FinetuneConfig`, :func:`finetune` -- the ``tvtool finetune`` command as a function.
* :func:`train` -- the optimisation loop over any :class:`Adapter` and dataset.
* :data:`MODES`, :func:`get_mode` -- the mode registry (name -> mode object).
* :func:`check_encoder` -- refuse a mode an image encoder's structure does not support.
* :func:`materialize_lora` -- dense deltas from a LoRA vector's factors.
* :func:`parse_lora_targets` -- canonical ``--lora-targets`` (q, k, v, o, mlp).

See docs/finetune.md.
"""

from __future__ import annotations

from tvtool.errors import UsageError
from tvtool.finetune.attn import AttnMode, attention_parameter_names
from tvtool.finetune.base import Adapter, FinetuneMode, ModeOptions
from tvtool.finetune.full import FullMode
from tvtool.finetune.linear import LinearMode
from tvtool.finetune.llora import LloraMode, LloraNetMode
from tvtool.finetune.lora import (
    LoraMode,
    init_lora_factors,
    lora_targets,
    materialize_lora,
    parse_lora_targets,
)
from tvtool.finetune.trainer import (
    FinetuneConfig,
    FinetuneResult,
    StepLog,
    TrainResult,
    check_encoder,
    finetune,
    learning_rate,
    train,
)
from tvtool.metadata import Mode

MODES: dict[Mode, FinetuneMode] = {
    Mode.FULL: FullMode(),
    Mode.ATTN: AttnMode(),
    Mode.LINEAR: LinearMode(),
    Mode.LORA: LoraMode(),
    Mode.LLORA: LloraMode(),
    Mode.LLORA_NET: LloraNetMode(),
}
"""The fine-tuning modes by name."""


def get_mode(name: str | Mode) -> FinetuneMode:
    """Look up a fine-tuning mode.

    Raises:
        UsageError: unknown name.
    """
    try:
        return MODES[Mode(name)]
    except ValueError:
        raise UsageError(f"unknown fine-tuning mode {name!r}",
                         hint=f"use one of {', '.join(m.value for m in MODES)}") from None


__all__ = [
    "MODES",
    "Adapter",
    "FinetuneConfig",
    "FinetuneMode",
    "FinetuneResult",
    "ModeOptions",
    "StepLog",
    "TrainResult",
    "attention_parameter_names",
    "check_encoder",
    "finetune",
    "get_mode",
    "init_lora_factors",
    "learning_rate",
    "lora_targets",
    "materialize_lora",
    "parse_lora_targets",
    "train",
]
