"""Fine-tuning: a trainer plus one module per mode (full, attn, linear, lora, llora, llora-net).

Public API:

* :class:`FinetuneConfig`, :func:`finetune` -- the ``tvtool finetune`` command as a function.
* :func:`train` -- the optimisation loop over any :class:`Adapter` and dataset.
* :data:`MODES`, :func:`get_mode` -- the mode registry (name -> mode object); each mode
  declares its options dataclass (:class:`LoraOptions`, :class:`NoOptions`) and its flags
  (:class:`CliOption`).
* :func:`check_encoder` -- refuse a mode an image encoder's structure does not support.
* :func:`materialize_lora` -- dense deltas from a LoRA vector's factors.
* :func:`parse_lora_targets` -- canonical ``--lora-targets`` (q, k, v, o, mlp).

See docs/finetune.md.
"""

from __future__ import annotations

from tvtool.finetune.attn import attention_parameter_names
from tvtool.finetune.base import Adapter, CliOption, FinetuneMode, NoOptions
from tvtool.finetune.config import FinetuneConfig, FinetuneResult, StepLog, TrainResult
from tvtool.finetune.loop import train
from tvtool.finetune.lora import (
    LoraOptions,
    init_lora_factors,
    lora_targets,
    parse_lora_targets,
)
from tvtool.finetune.registry import MODES, get_mode
from tvtool.finetune.schedule import learning_rate
from tvtool.finetune.trainer import check_encoder, finetune
from tvtool.formats.lora import materialize_lora

__all__ = [
    "MODES",
    "Adapter",
    "CliOption",
    "FinetuneConfig",
    "FinetuneMode",
    "FinetuneResult",
    "LoraOptions",
    "NoOptions",
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
