"""Configuration and results of ``tvtool finetune`` (the reference recipe as defaults).

Constructing a :class:`FinetuneConfig` normalises and validates it (values, flag
combinations, and the mode's own options, which the mode declares in its file); an invalid
config cannot exist. :meth:`FinetuneConfig.from_values` builds one from flat values (the
command's flags), routing the mode's option fields into its options object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tvtool.device import check_precision
from tvtool.errors import UsageError
from tvtool.finetune.registry import MODES, get_mode
from tvtool.io.train_state import RESUME_CHOICES
from tvtool.limits import short_repr
from tvtool.metadata import Mode

DEFAULT_STEPS = 2000
REFERENCE_WARMUP = 500
RESUME_FILE = "resume.safetensors"
STATE_FORMAT = 1

# Config fields a resumed run must share with the run that wrote the checkpoint; the fields
# of the mode's options are added (see FinetuneConfig.resume_fields).
_RESUME_KEYS = ("base", "dataset", "mode", "batch_size", "grad_accum", "lr", "weight_decay",
                "grad_clip", "precision", "seed", "data_root")


@dataclass(frozen=True)
class FinetuneConfig:
    """Configuration of ``tvtool finetune`` (defaults: the reference recipe).

    Attributes:
        base: Model reference of the pre-trained model.
        dataset: Dataset name (see :func:`tvtool.data.list_datasets`).
        output: Task-vector output path, or ``-`` for stdout.
        mode: ``full``, ``attn``, ``linear``, ``lora``, ``llora`` or ``llora-net``.
        checkpoint_out: Also write the fine-tuned model as a checkpoint (non-linearized modes).
        steps: Optimizer steps (default 2000 unless ``epochs`` is given).
        epochs: Passes over the training split, as an alternative to ``steps``.
        batch_size: Global batch per optimizer step (all processes and micro-steps together).
        grad_accum: Micro-steps per optimizer step.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW decoupled weight decay, applied to the weights θ.
        warmup_steps: Linear warm-up steps before the cosine decay (default: 500, at most a
            quarter of the run).
        grad_clip: Gradient-norm clip; 0 disables.
        precision: ``auto`` (bf16 autocast on a CUDA device that supports bf16, fp32
            elsewhere; see :mod:`tvtool.device`), ``fp32``, ``bf16``, ``fp16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun: the local rank's GPU).
        seed: Seed of the data order, augmentations and LoRA initialisation.
        workdir: Directory for the resumable training state; none if unset.
        resume: What to do with a training state in ``workdir`` (:data:`RESUME_CHOICES`):
            ``auto`` continues it when it belongs to this run and starts when there is none
            (a state of another run, or a damaged one, is refused: exit 2, nothing replaced);
            ``yes`` continues it and refuses when there is none; ``no`` starts over and
            replaces it. ``True``/``False`` are taken as ``yes``/``no``.
        checkpoint_every: Steps between training-state saves (with ``workdir``).
        data_root: Local root of standard datasets.
        workers: Data-loader worker processes (default: 4 on CUDA, 0 on CPU).
        options: The mode's own options (an instance of its ``options`` dataclass, e.g.
            :class:`~tvtool.finetune.lora.LoraOptions`); None = its defaults; a mapping is
            built into it by field name.
        log_every: Steps between progress reports (and divergence checks).

    Raises:
        UsageError: on construction, for a bad value or flag combination.
    """

    base: str
    dataset: str
    output: str
    mode: Mode = Mode.FULL
    checkpoint_out: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    workdir: str | None = None
    resume: str = "auto"
    checkpoint_every: int = 500
    data_root: str | None = None
    workers: int | None = None
    options: Any = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # the library's earlier flag
            object.__setattr__(self, "resume", "yes" if self.resume else "no")
        if not isinstance(self.mode, Mode):
            try:
                object.__setattr__(self, "mode", Mode(str(self.mode)))
            except ValueError:
                raise UsageError(f"unknown fine-tuning mode {self.mode!r}",
                                 hint=f"use one of {', '.join(m.value for m in Mode)}") from None
        mode = get_mode(self.mode)
        if self.options is None or isinstance(self.options, Mapping):
            own = {f.name for f in fields(mode.options)}
            unknown = sorted(set(self.options or {}) - own)
            if unknown:
                raise UsageError(f"--mode {self.mode.value} has no option(s) {unknown}",
                                 hint=f"its options are {sorted(own) or 'none'}")
            object.__setattr__(self, "options", mode.make_options(self.options or {}))
        elif not isinstance(self.options, mode.options):
            raise UsageError(f"--mode {self.mode.value} takes {mode.options.__name__}, "
                             f"got {type(self.options).__name__}")
        self._check()

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """Build a config from flat values by name: the command's flags, or a document.

        Values of the mode's option fields go into its options object; values of other
        modes' options are ignored (``--lora-rank`` does nothing with ``--mode full``).

        Raises:
            UsageError: an unknown name, a bad value or flag combination.
        """
        own = {f.name for f in fields(cls)} - {"options"}
        mode_fields = {f.name for m in MODES.values() for f in fields(m.options)}
        unknown = sorted(set(values) - own - mode_fields)
        if unknown:
            raise UsageError(f"unknown fine-tuning setting(s) {unknown}")
        mode = get_mode(values.get("mode", Mode.FULL))
        options = mode.make_options({k: v for k, v in values.items() if k in mode_fields})
        return cls(**{k: v for k, v in values.items() if k in own}, options=options)

    def _check(self) -> None:
        """Check values and combinations (the mode's options checked themselves).

        Raises:
            UsageError: a bad value or flag combination.
        """
        if self.steps is not None and self.epochs is not None:
            raise UsageError("--steps and --epochs both given", hint="give one of them")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UsageError(f"--epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise UsageError(f"--batch-size {self.batch_size} is not divisible by "
                             f"--grad-accum {self.grad_accum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UsageError(f"--grad-clip must be non-negative (0 disables), got {self.grad_clip}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UsageError(f"--warmup-steps must be non-negative, got {self.warmup_steps}")
        check_precision(self.precision)
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be non-negative, got {self.workers}")
        if self.resume not in RESUME_CHOICES:
            raise UsageError(f"--resume must be {', '.join(RESUME_CHOICES)}, not "
                             f"{short_repr(self.resume, 40)}")
        if self.resume == "yes" and not self.workdir:
            raise UsageError("--resume needs --workdir", hint="point it at the interrupted run's "
                                                              "work directory")
        if self.checkpoint_out is not None and self.mode.linearized:
            raise UsageError(
                f"--checkpoint-out is not available for --mode {self.mode.value}",
                hint="a linearized model is not an open_clip model; keep the task vector and "
                     "evaluate it linearized (tvtool eval)")
        if self.checkpoint_out is not None and self.checkpoint_out == self.output \
                and self.output != "-":
            raise UsageError("--checkpoint-out and -o name the same file")
        if self.checkpoint_out == "-" and self.output == "-":
            raise UsageError("-o - and --checkpoint-out - would both write to stdout")

    def options_json(self) -> dict[str, Any]:
        """The mode's options as JSON-ready values (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self.options, f.name), tuple) else v
                for f in fields(self.options)}

    def as_json(self) -> dict[str, Any]:
        """JSON-ready field values; the mode's options appear flat, under their field names."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        out["mode"] = self.mode.value
        out.update(self.options_json())
        return out

    def resume_fields(self) -> dict[str, Any]:
        """The values a resumed run must share with the run that wrote the training state.

        The mode's option fields are part of it under their own names, which for the LoRA
        modes are the keys states have always stored (``lora_rank``, ``lora_alpha``,
        ``lora_targets``), so earlier states still resume.
        """
        values = self.as_json()
        return {**{k: values[k] for k in _RESUME_KEYS}, **self.options_json()}


@dataclass(frozen=True)
class StepLog:
    """One progress report.

    Attributes:
        step: Optimizer steps completed.
        total: Steps of the whole run.
        loss: Mean training loss since the previous report.
        accuracy: Training accuracy since the previous report.
        lr: Learning rate of the last step.
        images_per_s: Throughput since the previous report (all processes).
    """

    step: int
    total: int
    loss: float
    accuracy: float
    lr: float
    images_per_s: float


@dataclass(frozen=True)
class TrainResult:
    """What the training loop did."""

    start_step: int
    steps: int
    seconds: float
    images_per_s: float
    final_loss: float
    train_accuracy: float


@dataclass(frozen=True)
class FinetuneResult:
    """Summary of a fine-tuning run (the ``--json`` document)."""

    output: str
    checkpoint_out: str | None
    mode: str
    linearized: bool
    dataset: str
    steps: int
    resumed_from: int
    seconds: float
    images_per_s: float
    final_loss: float
    train_accuracy: float
    tensors: int
    parameters: int
    device: str
    precision: str
    world_size: int
    notes: list[str] = field(default_factory=list)
    metrics_log: str | None = None
    tensorboard: str | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return asdict(self)
