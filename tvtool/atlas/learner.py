"""Gradient descent on aTLAS coefficients, with the task vectors frozen.

The learner sees a :class:`~tvtool.atlas.compose.ComposedEncoder` and one or more datasets,
each with a frozen zero-shot head. Every step draws a batch from every dataset, runs one forward
pass over their concatenation, and updates only the ``[T, num_blocks]`` coefficient matrix
(AdamW, cosine schedule, gradient-norm clipping). Coefficients are scored on held-out data
every ``eval_every`` steps, and before the first step at the initialisation and at the
zero-shot model (all coefficients 0, as the aTLAS reference starts its selection from the
zero-shot accuracy); the best scoring candidate is returned (see
:func:`~tvtool.atlas.objectives.selection_score`), and training stops after ``patience``
evaluations without improvement.

What it learns on lives next to it: the choice of examples and their batches in
:mod:`tvtool.atlas.examples`, image augmentation in :mod:`tvtool.atlas.augment`, the UFM
objective's pseudo-labels and step in :mod:`tvtool.atlas.ufm`, the objectives themselves in
:mod:`tvtool.atlas.objectives`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from tvtool.atlas.augment import augment
from tvtool.atlas.compose import ComposedEncoder
from tvtool.atlas.examples import Examples
from tvtool.atlas.objectives import (
    AUGMENTATIONS,
    DEFAULT_CONTROL_THRESHOLD,
    DEFAULT_UFM_THRESHOLD,
    DEFAULTS,
    NEGATION_LOSSES,
    ROLES,
    UNLABELLED,
    ScoreAccumulator,
    TaskOutput,
    TaskScore,
    check_objective,
    loss,
    needs_labels,
    selection_score,
)
from tvtool.atlas.ufm import UfmTask, ufm_outputs, ufm_task
from tvtool.device import autocast, check_precision, resolve_precision
from tvtool.errors import NumericalError, UsageError
from tvtool.types import Advance, Logger
from tvtool.types import quiet as _quiet


@dataclass(frozen=True)
class LearnerConfig:
    """Hyper-parameters of coefficient learning.

    Fields left at None take the objective's default
    (:data:`tvtool.atlas.objectives.DEFAULTS`, each from the objective's reference code);
    :meth:`resolved` fills them in.

    Attributes:
        objective: ``ce``, ``entropy``, ``infomax``, ``ufm`` or ``negation`` (see
            :mod:`tvtool.atlas.objectives`).
        steps: Optimisation steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (pulls coefficients towards 0).
        batch_size: Examples per step, split evenly across the datasets.
        eval_every: Steps between held-out evaluations.
        patience: Stop after this many evaluations without improvement (None: never).
        negation_weight: Weight of the target term of the ``negation`` objective.
        negation_loss: ``unlikelihood`` (default) or ``ce`` (the reference's ``−CE``).
        control_threshold: ``negation``: a candidate must keep this fraction of the zero-shot
            held-out control accuracy (reference: 0.95).
        ufm_threshold: ``ufm``: confidence a soft target needs to count (reference: 0.99).
        init: Initial value of every coefficient.
        grad_clip: Maximum gradient norm of the coefficients (0: no clipping).
        augment: ``none``, ``train`` or ``reference`` (see
            :class:`~tvtool.atlas.objectives.ObjectiveDefaults`); for ``ufm`` the strong
            view's augmentation.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast for the encoder's forward
            pass; :func:`learn` resolves ``auto`` for the encoder's device
            (:func:`tvtool.device.resolve_precision`) and records the resolved name.
        seed: Seed of the batch order and the augmentations.
        workers: DataLoader worker processes for data that is not kept in memory.
    """

    objective: str = "ce"
    steps: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int = 32
    eval_every: int = 10
    patience: int | None = None
    negation_weight: float = 1.0
    negation_loss: str = "unlikelihood"
    control_threshold: float = DEFAULT_CONTROL_THRESHOLD
    ufm_threshold: float = DEFAULT_UFM_THRESHOLD
    init: float | None = None
    grad_clip: float | None = None
    augment: str | None = None
    precision: str = "auto"
    seed: int = 0
    workers: int = 0

    def resolved(self) -> LearnerConfig:
        """This configuration with every None replaced by the objective's default.

        Raises:
            UsageError: an unknown objective.
        """
        check_objective(self.objective)
        default = DEFAULTS[self.objective]
        return dataclasses.replace(
            self,
            steps=default.steps if self.steps is None else self.steps,
            lr=default.lr if self.lr is None else self.lr,
            weight_decay=default.weight_decay if self.weight_decay is None
            else self.weight_decay,
            init=default.init if self.init is None else self.init,
            grad_clip=(default.grad_clip or 0.0) if self.grad_clip is None else self.grad_clip,
            augment=default.augment if self.augment is None else self.augment)

    def check(self) -> None:
        """Validate the values (after :meth:`resolved`; None fields are checked as defaults).

        Raises:
            UsageError: naming the first bad value.
        """
        config = self.resolved()
        steps, lr = cast(int, config.steps), cast(float, config.lr)
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, got {steps}")
        if not lr > 0 or not math.isfinite(lr):
            raise UsageError(f"--lr must be positive, got {lr}")
        if not cast(float, config.weight_decay) >= 0:
            raise UsageError(f"--weight-decay must be >= 0, got {config.weight_decay}")
        if not math.isfinite(cast(float, config.init)):
            raise UsageError(f"--init must be finite, got {config.init}")
        if not cast(float, config.grad_clip) >= 0:
            raise UsageError(f"--grad-clip must be >= 0 (0: off), got {config.grad_clip}")
        if config.augment not in AUGMENTATIONS:
            raise UsageError(f"unknown augmentation {config.augment!r}",
                             hint="use none, train or reference")
        if config.negation_loss not in NEGATION_LOSSES:
            raise UsageError(f"unknown negation loss {config.negation_loss!r}",
                             hint="use unlikelihood or ce")
        if not 0.0 < config.control_threshold <= 1.0:
            raise UsageError("--control-threshold must be in (0, 1], got "
                             f"{config.control_threshold}")
        if not 0.0 <= config.ufm_threshold < 1.0:
            raise UsageError(f"--ufm-threshold must be in [0, 1), got {config.ufm_threshold}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.eval_every < 1:
            raise UsageError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"--patience must be at least 1, got {self.patience}")
        check_precision(self.precision)
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")


@dataclass
class TaskData:
    """One dataset the coefficients are learned on.

    Attributes:
        name: Dataset name (for messages and reports).
        head: ``[num_classes, embed_dim]`` zero-shot head (logit scale folded in).
        train: Training examples, a dataset of ``(image, label)``.
        val: Held-out examples for selection and early stopping, or None.
        role: ``train``, or ``target`` / ``control`` for the negation objective.
        labelled: Whether labels may be used (False for test-time adaptation).
    """

    name: str
    head: Tensor
    train: Dataset[Any]
    val: Dataset[Any] | None = None
    role: str = "train"
    labelled: bool = True


@dataclass(frozen=True)
class LearnResult:
    """What coefficient learning produced.

    Attributes:
        coefficients: The selected ``[T, num_blocks]`` matrix (CPU, float32).
        last: The matrix after the last step.
        best_step: Step of the selected matrix (0 = the initialisation, −1 = the zero-shot
            model, all coefficients 0, when the initialisation is not 0).
        steps_run: Steps taken (fewer than asked after early stopping).
        selection: How the matrix was selected.
        initial: Held-out scores of the initialisation, per dataset.
        best: Held-out scores of the selected matrix, per dataset.
        history: One record per evaluation (step, train loss, score).
        zero_shot: Held-out scores of the zero-shot model, per dataset.
        config: The resolved hyper-parameters.
    """

    coefficients: Tensor
    last: Tensor
    best_step: int
    steps_run: int
    selection: str
    initial: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    zero_shot: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def _check_tasks(tasks: Sequence[TaskData], objective: str) -> None:
    if not tasks:
        raise UsageError("at least one dataset is needed")
    for task in tasks:
        if task.role not in ROLES:
            raise UsageError(f"unknown dataset role {task.role!r}")
        if needs_labels(objective) and not task.labelled:
            raise UsageError(f"objective {objective!r} needs labels, {task.name} has none")
    roles = {task.role for task in tasks}
    if objective == "negation" and roles != {"target", "control"}:
        raise UsageError("the negation objective needs target and control datasets",
                         hint="give the data to forget with --dataset and the data to keep "
                              "with --control")
    if objective != "negation" and roles != {"train"}:
        raise UsageError("--control is only used by the negation objective")


_SELECTIONS = {
    "ce": "held-out accuracy",
    "negation": "lowest held-out target accuracy keeping control >= {t:.0%} of zero-shot",
}
_UNLABELLED_SELECTION = ("held-out information (H(mean p) - mean H(p), label-free), "
                         "collapsed candidates excluded")


def learn(encoder: ComposedEncoder, tasks: Sequence[TaskData], config: LearnerConfig, *,
          log: Logger = _quiet, advance: Advance | None = None) -> LearnResult:
    """Learn the coefficient matrix of ``encoder`` on ``tasks``.

    Args:
        encoder: The composed encoder (vectors packed on the training device).
        tasks: Datasets with heads, training and held-out parts, and roles.
        config: Hyper-parameters (None fields take the objective's defaults).
        log: Where progress notes go (stderr in the CLI).
        advance: Called with 1 after every step (a progress bar).

    Returns:
        The selected coefficients and the learning record.

    Raises:
        UsageError: bad configuration, or datasets that do not fit the objective.
        InvalidInputError: unreadable or empty data.
        NumericalError: the loss became NaN or Inf.
    """
    config.check()
    device = encoder.stack.data.device
    config = dataclasses.replace(config.resolved(),
                                 precision=resolve_precision(config.precision, device))
    steps, init = cast(int, config.steps), cast(float, config.init)
    kind = cast(str, config.augment)
    objective = config.objective
    _check_tasks(tasks, objective)
    generator = torch.Generator().manual_seed(config.seed)
    aug_generator = torch.Generator().manual_seed(config.seed + 1)
    per_task = max(1, config.batch_size // len(tasks))
    val_sets = [Examples(t.val, f"{t.name} (held-out part)", device, config.workers)
                if t.val is not None and len(t.val) > 0 else None  # type: ignore[arg-type]
                for t in tasks]
    heads = [t.head.to(device, torch.float32) for t in tasks]
    has_val = any(v is not None for v in val_sets)
    if has_val:
        selection = (_UNLABELLED_SELECTION if objective in UNLABELLED
                     else _SELECTIONS[objective].format(t=config.control_threshold))
    else:
        selection = "last step (no held-out data)"
        log("no held-out examples: the coefficients of the last step are kept "
            "(use more --shots or a larger --val-fraction for selection)")

    shape = (encoder.stack.num_vectors, encoder.partition.num_blocks)
    zeros = torch.zeros(shape, device=device)

    def logits_of(images: Tensor, head: Tensor, weights: dict[str, Tensor]) -> Tensor:
        with autocast(device, config.precision):
            feats = encoder.features(images, weights)
        return F.normalize(feats.float(), dim=-1) @ head.T

    ufm: list[UfmTask] = []
    streams: list[Iterator[tuple[Tensor, Tensor]]] = []
    if objective == "ufm":
        with torch.no_grad():
            zero_weights = encoder.weights(zeros)
            for task, head in zip(tasks, heads, strict=True):
                ufm.append(ufm_task(task.name, task.train, head, zero_weights, logits_of,
                                    per_task, generator, device, config.workers,
                                    config.batch_size, log))
    else:
        streams = [Examples(t.train, f"{t.name} (training part)", device, config.workers)
                   .endless(per_task, generator) for t in tasks]

    def evaluate(matrix: Tensor) -> list[TaskScore]:
        scores = []
        with torch.no_grad():
            weights = encoder.weights(matrix)
            for task, head, data in zip(tasks, heads, val_sets, strict=True):
                if data is None:
                    continue
                acc = ScoreAccumulator(task.role)
                for images, labels in data.batches(config.batch_size, None):
                    acc.add(logits_of(images, head, weights), labels if task.labelled else None)
                scores.append(acc.result())
        return scores

    def score_of(details: list[TaskScore]) -> tuple[float, float, float]:
        return selection_score(objective, details, zero_shot_details,
                               control_threshold=config.control_threshold)

    coefficients = torch.full(shape, init, device=device, requires_grad=True)
    history: list[dict[str, Any]] = []
    zero_shot_details: list[TaskScore] = []
    best_score: tuple[float, float, float] = (-math.inf, 0.0, 0.0)
    best_details: list[TaskScore] = []
    best = coefficients.detach().clone()
    best_step = 0
    initial_details: list[TaskScore] = []
    if has_val:
        zero_shot_details = evaluate(zeros)
        initial_details = zero_shot_details if init == 0.0 else evaluate(coefficients.detach())
        if init != 0.0:
            # The zero-shot model is a candidate too, as in the aTLAS reference's selection.
            best_score, best_details, best_step = score_of(zero_shot_details), \
                zero_shot_details, -1
            best = zeros.clone()
            history.append({"step": -1, "loss": None, "score": list(best_score),
                            "note": "zero-shot (all coefficients 0)"})
        initial_score = score_of(initial_details)
        if initial_score > best_score:
            best_score, best_details, best_step = initial_score, initial_details, 0
            best = coefficients.detach().clone()
    history.append({"step": 0, "loss": None,
                    "score": list(score_of(initial_details)) if has_val else None})

    optimizer = torch.optim.AdamW([coefficients], lr=cast(float, config.lr),
                                  weight_decay=cast(float, config.weight_decay))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    since_best, step = 0, 0
    running = 0.0
    for step in range(1, steps + 1):
        if objective == "ufm":
            outputs = ufm_outputs(encoder, coefficients, ufm, heads, kind, aug_generator,
                                  device, config.precision)
        else:
            parts = [next(stream) for stream in streams]
            images = augment(torch.cat([images for images, _ in parts]), kind, aug_generator)
            with autocast(device, config.precision):
                feats = encoder(coefficients, images)
            outputs = []
            for task, head, (_, labels), chunk in zip(
                    tasks, heads, parts, feats.split([len(p[0]) for p in parts]), strict=True):
                logits = F.normalize(chunk.float(), dim=-1) @ head.T
                outputs.append(TaskOutput(logits, labels if task.labelled else None, task.role))
        value = loss(objective, outputs, config.negation_weight,
                     negation_loss=config.negation_loss, ufm_threshold=config.ufm_threshold)
        if not bool(torch.isfinite(value)):
            raise NumericalError(f"the loss became {float(value.detach())} at step {step}",
                                 hint="lower --lr")
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if cast(float, config.grad_clip) > 0:
            torch.nn.utils.clip_grad_norm_([coefficients], cast(float, config.grad_clip))
        optimizer.step()
        schedule.step()
        running += float(value.detach())
        if advance is not None:
            advance(1)
        if step % config.eval_every and step != steps:
            continue
        record: dict[str, Any] = {"step": step, "loss": running / _since(step, config)}
        running = 0.0
        if has_val:
            details = evaluate(coefficients.detach())
            score = score_of(details)
            record["score"] = list(score)
            if score > best_score:
                best_score, best_details = score, details
                best, best_step, since_best = coefficients.detach().clone(), step, 0
            else:
                since_best += 1
        history.append(record)
        if config.patience is not None and has_val and since_best >= config.patience:
            log(f"early stop at step {step}: no held-out improvement in {since_best} "
                "evaluations")
            break
    last = coefficients.detach().clone()
    if not has_val:
        best, best_step = last, step
    elif best_score[0] < 1.0:
        log("no candidate met the selection rule ("
            + ("every one collapsed its predicted classes" if objective in UNLABELLED
               else f"control accuracy below {config.control_threshold:.0%} of zero-shot")
            + "); the best scoring one is kept")
    with_val = _with_val(tasks, val_sets)
    return LearnResult(
        coefficients=best.cpu(), last=last.cpu(), best_step=best_step, steps_run=step,
        selection=selection,
        initial=[_score_record(t, s) for t, s in zip(with_val, initial_details, strict=True)],
        best=[_score_record(t, s) for t, s in zip(with_val, best_details, strict=True)],
        history=history,
        zero_shot=[_score_record(t, s) for t, s in zip(with_val, zero_shot_details,
                                                       strict=True)],
        config=dataclasses.asdict(config))


def _since(step: int, config: LearnerConfig) -> int:
    """Steps since the previous evaluation (the averaging window of the training loss)."""
    return step - ((step - 1) // config.eval_every) * config.eval_every


def _with_val(tasks: Sequence[TaskData], val_sets: Sequence[Examples | None]) -> list[TaskData]:
    return [t for t, v in zip(tasks, val_sets, strict=True) if v is not None]


def _score_record(task: TaskData, score: TaskScore) -> dict[str, Any]:
    """A held-out score as reports show it.

    Every score is measured on the held-out part (``--val-fraction``), never on the examples
    learned from; ``part`` says so. The role of a dataset learned on (``train`` inside the
    learner, where it marks the examples that feed the loss) is reported as ``task``, so a
    held-out score is not read as a training score.
    """
    return {"dataset": task.name, "role": "task" if task.role == "train" else task.role,
            "part": "held-out", "examples": score.examples, "accuracy": score.accuracy,
            "loss": score.loss, "entropy": score.entropy}
