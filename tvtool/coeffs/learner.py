"""Gradient descent on aTLAS coefficients, with the task vectors frozen.

The learner sees a :class:`~tvtool.coeffs.compose.ComposedEncoder` and one or more datasets,
each with a frozen zero-shot head. Every step draws a batch from every dataset, runs one forward
pass over their concatenation, and updates only the ``[T, num_blocks]`` coefficient matrix
(AdamW, cosine schedule). Coefficients are scored on held-out data every ``eval_every`` steps
(and before the first step, so the result is never worse on held-out data than the
initialisation); the best scoring matrix is returned, and training stops after ``patience``
evaluations without improvement.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tvtool.coeffs.compose import ComposedEncoder
from tvtool.coeffs.objectives import (
    ROLES,
    ScoreAccumulator,
    TaskOutput,
    TaskScore,
    check_objective,
    loss,
    needs_labels,
    selection_score,
)
from tvtool.errors import (
    InvalidInputError,
    NumericalError,
    TvtoolError,
    UsageError,
    worker_error_text,
)

Logger = Callable[[str], None]
Advance = Callable[[int], None]

# Preprocessed examples are kept on the device for repeated epochs up to this many bytes per
# dataset part; larger parts are re-read through a DataLoader.
MATERIALIZE_BYTES = 1 << 30


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class LearnerConfig:
    """Hyper-parameters of coefficient learning.

    Attributes:
        objective: ``ce``, ``entropy`` or ``negation`` (see :mod:`tvtool.coeffs.objectives`).
        steps: Optimisation steps.
        lr: AdamW learning rate (aTLAS: 1e-1 few-shot, 1e-3 task addition).
        weight_decay: AdamW weight decay (pulls coefficients towards 0).
        batch_size: Examples per step, split evenly across the datasets.
        eval_every: Steps between held-out evaluations.
        patience: Stop after this many evaluations without improvement (None: never).
        negation_weight: Weight of the target hinge of the ``negation`` objective.
        init: Initial value of every coefficient (aTLAS: 0).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the encoder's forward pass.
        seed: Seed of the batch order.
        workers: DataLoader worker processes for data that is not kept in memory.
    """

    objective: str = "ce"
    steps: int = 100
    lr: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 32
    eval_every: int = 10
    patience: int | None = None
    negation_weight: float = 1.0
    init: float = 0.0
    precision: str = "fp32"
    seed: int = 0
    workers: int = 0

    def check(self) -> None:
        """Validate the values.

        Raises:
            UsageError: naming the first bad value.
        """
        check_objective(self.objective)
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.eval_every < 1:
            raise UsageError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"--patience must be at least 1, got {self.patience}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UsageError(f"unknown precision {self.precision!r}",
                             hint="use fp32, bf16 or fp16")
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
        best_step: Step of the selected matrix (0 = the initialisation).
        steps_run: Steps taken (fewer than asked after early stopping).
        selection: How the matrix was selected.
        initial: Held-out scores of the initialisation, per dataset.
        best: Held-out scores of the selected matrix, per dataset.
        history: One record per evaluation (step, train loss, score).
    """

    coefficients: Tensor
    last: Tensor
    best_step: int
    steps_run: int
    selection: str
    initial: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Example selection
# ---------------------------------------------------------------------------------------------


def dataset_labels(dataset: Dataset[Any]) -> Tensor:
    """Labels of every example, read from ``labels``/``targets`` when the dataset has them.

    Falls back to reading every example (slow for large image datasets).

    Raises:
        InvalidInputError: an example that is not an ``(image, label)`` pair.
    """
    for attribute in ("labels", "targets"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            labels = torch.as_tensor(values).long().reshape(-1)
            if labels.numel() == len(dataset):  # type: ignore[arg-type]
                return labels
    return torch.tensor([int(_read(dataset, i, "dataset")[1])
                         for i in range(len(dataset))],  # type: ignore[arg-type]
                        dtype=torch.int64)


def split_examples(labels: Tensor | None, size: int, *, shots: int | None, val_fraction: float,
                   seed: int, num_classes: int | None = None) -> tuple[list[int], list[int]]:
    """Choose training and held-out example indices.

    With labels: ``shots`` examples per class (all when None), seeded; from each class,
    ``round(val_fraction × n_c)`` are held out (at least one when the class has two or more).
    Without labels: ``shots × num_classes`` examples at random (label-free), the same fraction
    held out.

    Args:
        labels: Labels of all examples, or None for unlabelled selection.
        size: Number of examples in the dataset.
        shots: Examples per class (None: all).
        val_fraction: Fraction held out, in ``[0, 1)``.
        seed: Seed of the choice.
        num_classes: Class count (sizes the unlabelled sample).

    Returns:
        ``(train_indices, val_indices)``, sorted.
    """
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []

    def take(pool: Tensor) -> None:
        count = len(pool)
        held = 0
        if val_fraction > 0 and count >= 2:
            held = min(count - 1, max(1, round(val_fraction * count)))
        val.extend(pool[:held].tolist())
        train.extend(pool[held:].tolist())

    if labels is None:
        order = torch.randperm(size, generator=generator)
        if shots is not None:
            order = order[:shots * (num_classes or 1)]
        take(order)
    else:
        for label in torch.unique(labels).tolist():
            members = torch.nonzero(labels == label).reshape(-1)
            members = members[torch.randperm(len(members), generator=generator)]
            take(members[:shots] if shots is not None else members)
    return sorted(train), sorted(val)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def _read(dataset: Dataset[Any], index: int, name: str) -> tuple[Tensor, int]:
    try:
        item = dataset[index]
    except TvtoolError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise InvalidInputError(f"cannot read example {index} of {name}: "
                                f"{' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(item, (tuple, list)) or len(item) < 2 or not isinstance(item[0], Tensor):
        raise InvalidInputError(f"{name} does not yield (image tensor, label) pairs")
    return item[0], int(item[1])


class _Examples:
    """A dataset part, kept on the device when it fits, iterated in (shuffled) batches."""

    def __init__(self, dataset: Dataset[Any], name: str, device: torch.device,
                 workers: int) -> None:
        self.dataset = dataset
        self.name = name
        self.device = device
        self.workers = workers
        self.size = len(dataset)  # type: ignore[arg-type]
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        if self.size == 0:
            raise InvalidInputError(f"{name} has no examples",
                                    hint="use more --shots or a smaller --val-fraction")
        first, _ = _read(dataset, 0, name)
        if first.nelement() * first.element_size() * self.size <= MATERIALIZE_BYTES:
            items = [_read(dataset, i, name) for i in range(self.size)]
            self.images = torch.stack([image for image, _ in items]).to(device)
            self.labels = torch.tensor([label for _, label in items], device=device)

    def batches(self, batch_size: int, generator: torch.Generator | None
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass in batches; shuffled when a generator is given."""
        if self.images is not None and self.labels is not None:
            order = (torch.randperm(self.size, generator=generator) if generator is not None
                     else torch.arange(self.size)).to(self.device)
            for start in range(0, self.size, batch_size):
                index = order[start:start + batch_size]
                yield self.images[index], self.labels[index]
            return
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=generator is not None,
                            generator=generator, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        try:
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), \
                    torch.as_tensor(labels).long().to(self.device, non_blocking=True)
        except TvtoolError:
            raise
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise InvalidInputError(f"cannot read an example of {self.name}: "
                                    f"{worker_error_text(exc)}") from exc

    def endless(self, batch_size: int, generator: torch.Generator
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled batches forever (a new order every epoch)."""
        while True:
            yield from self.batches(batch_size, generator)


# ---------------------------------------------------------------------------------------------
# The learner
# ---------------------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def learn(encoder: ComposedEncoder, tasks: Sequence[TaskData], config: LearnerConfig, *,
          log: Logger = _quiet, advance: Advance | None = None) -> LearnResult:
    """Learn the coefficient matrix of ``encoder`` on ``tasks``.

    Args:
        encoder: The composed encoder (vectors packed on the training device).
        tasks: Datasets with heads, training and held-out parts, and roles.
        config: Hyper-parameters.
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
    _check_tasks(tasks, config.objective)
    device = encoder.stack.data.device
    generator = torch.Generator().manual_seed(config.seed)
    per_task = max(1, config.batch_size // len(tasks))
    train_sets = [_Examples(t.train, f"{t.name} (training part)", device, config.workers)
                  for t in tasks]
    val_sets = [_Examples(t.val, f"{t.name} (held-out part)", device, config.workers)
                if t.val is not None and len(t.val) > 0 else None  # type: ignore[arg-type]
                for t in tasks]
    heads = [t.head.to(device, torch.float32) for t in tasks]
    streams = [data.endless(per_task, generator) for data in train_sets]
    has_val = any(v is not None for v in val_sets)
    if has_val:
        selection = ("held-out accuracy" if config.objective == "ce" else
                     "held-out entropy (label-free)" if config.objective == "entropy" else
                     "held-out control minus target accuracy")
    else:
        selection = "last step (no held-out data)"
        log("no held-out examples: the coefficients of the last step are kept "
            "(use more --shots or a larger --val-fraction for selection)")

    coefficients = torch.full((encoder.stack.num_vectors, encoder.partition.num_blocks),
                              float(config.init), device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([coefficients], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)

    def evaluate() -> tuple[tuple[float, float], list[TaskScore]]:
        scores = []
        with torch.no_grad():
            weights = encoder.weights(coefficients)
            for task, head, data in zip(tasks, heads, val_sets, strict=True):
                if data is None:
                    continue
                acc = ScoreAccumulator(task.role)
                for images, labels in data.batches(config.batch_size, None):
                    with _autocast(device, config.precision):
                        feats = encoder.features(images, weights)
                    logits = F.normalize(feats.float(), dim=-1) @ head.T
                    acc.add(logits, labels if task.labelled else None)
                scores.append(acc.result())
        return selection_score(config.objective, scores), scores

    history: list[dict[str, Any]] = []
    best_score, best_details = evaluate() if has_val else ((-math.inf, 0.0), [])
    initial = [_score_record(t, s) for t, s in zip(_with_val(tasks, val_sets), best_details,
                                                   strict=True)]
    best = coefficients.detach().clone()
    best_step, since_best, step = 0, 0, 0
    history.append({"step": 0, "loss": None, "score": list(best_score) if has_val else None})
    running = 0.0
    for step in range(1, config.steps + 1):
        parts = [next(stream) for stream in streams]
        images = torch.cat([images for images, _ in parts])
        with _autocast(device, config.precision):
            feats = encoder(coefficients, images)
        outputs = []
        for task, head, (_, labels), chunk in zip(
                tasks, heads, parts, feats.split([len(p[0]) for p in parts]), strict=True):
            logits = F.normalize(chunk.float(), dim=-1) @ head.T
            outputs.append(TaskOutput(logits, labels if task.labelled else None, task.role))
        value = loss(config.objective, outputs, config.negation_weight)
        if not bool(torch.isfinite(value)):
            raise NumericalError(f"the loss became {float(value.detach())} at step {step}",
                                 hint="lower --lr")
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        schedule.step()
        running += float(value.detach())
        if advance is not None:
            advance(1)
        if step % config.eval_every and step != config.steps:
            continue
        record: dict[str, Any] = {"step": step, "loss": running / _since(step, config)}
        running = 0.0
        if has_val:
            score, details = evaluate()
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
    return LearnResult(
        coefficients=best.cpu(), last=last.cpu(), best_step=best_step, steps_run=step,
        selection=selection, initial=initial,
        best=[_score_record(t, s) for t, s in zip(_with_val(tasks, val_sets), best_details,
                                                  strict=True)],
        history=history)


def _since(step: int, config: LearnerConfig) -> int:
    """Steps since the previous evaluation (the averaging window of the training loss)."""
    return step - ((step - 1) // config.eval_every) * config.eval_every


def _with_val(tasks: Sequence[TaskData], val_sets: Sequence[_Examples | None]) -> list[TaskData]:
    return [t for t, v in zip(tasks, val_sets, strict=True) if v is not None]


def _score_record(task: TaskData, score: TaskScore) -> dict[str, Any]:
    return {"dataset": task.name, "role": task.role, "examples": score.examples,
            "accuracy": score.accuracy, "loss": score.loss, "entropy": score.entropy}
