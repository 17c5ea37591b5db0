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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from tvtool.atlas.compose import ComposedEncoder
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
from tvtool.device import autocast, check_precision, resolve_precision
from tvtool.errors import (
    InvalidInputError,
    NumericalError,
    TvtoolError,
    UsageError,
    worker_error_text,
)
from tvtool.types import Advance, Logger
from tvtool.types import quiet as _quiet

# Preprocessed examples are kept on the device for repeated epochs up to this many bytes per
# dataset part; larger parts are re-read through a DataLoader.
MATERIALIZE_BYTES = 1 << 30


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


# ---------------------------------------------------------------------------------------------
# Augmentation (on preprocessed batches)
# ---------------------------------------------------------------------------------------------

# Area range of the random resized crop: aTLAS' few-shot / UFM transform and open_clip's
# training transform; both use aspect ratios 3/4..4/3 and bicubic resampling.
_CROP_SCALE = {"reference": (0.5, 1.0), "train": (0.9, 1.0)}
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_box(height: int, width: int, scale: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop (area fraction in ``scale``).

    Up to ten draws of an area fraction and a log-uniform aspect ratio in 3/4..4/3; when no
    draw fits, the largest centred crop of the nearest allowed aspect ratio.
    """
    area = height * width
    low, high = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(low + (high - low) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = min(max(width / height, _RATIO[0]), _RATIO[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else \
        (round(height * aspect), height)
    return (height - h) // 2, (width - w) // 2, h, w


def augment(images: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Randomly augmented copies of a ``[n, C, H, W]`` batch of preprocessed images.

    ``train``: a random resized crop of 90-100 % of the area (open_clip's training transform);
    ``reference``: a crop of 50-100 % and a horizontal flip with probability 1/2 (aTLAS'
    ``learn_few_shots.py`` and ``learn_ufm.py``); ``none``: the batch itself. Crops are
    resampled bicubically to the input size. They act on the normalised tensors, which equals
    cropping before the normalisation (a per-channel affine map commutes with resampling)
    except that PIL clamps bicubic overshoot to the pixel range.
    """
    if kind == "none":
        return images
    height, width = int(images.shape[-2]), int(images.shape[-1])
    out = []
    for image in images:
        top, left, h, w = crop_box(height, width, _CROP_SCALE[kind], generator)
        crop = image[None, :, top:top + h, left:left + w].float()
        resized = F.interpolate(crop, size=(height, width), mode="bicubic",
                                align_corners=False)[0].to(images.dtype)
        if kind == "reference" and bool(torch.rand(1, generator=generator) < 0.5):
            resized = resized.flip(-1)
        out.append(resized)
    return torch.stack(out)


class _Indexed(Dataset[Any]):
    """``(image, index)`` pairs of a dataset: the label is replaced by the example's index."""

    def __init__(self, dataset: Dataset[Any], name: str) -> None:
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return _read(self.dataset, index, self.name)[0], index


def trusted_subset(probabilities: Tensor) -> Tensor:
    """Indices of the class-balanced trusted subset of ``learn_ufm.py``.

    For every class, the ``k = min(⌊N / C / 10⌋, 100)`` examples (at least 1) with the highest
    zero-shot probability of that class; sorted, without repeats.

    Args:
        probabilities: ``[N, C]`` zero-shot softmax probabilities.
    """
    count, classes = int(probabilities.shape[0]), int(probabilities.shape[1])
    k = min(max(1, min(count // (classes * 10), 100)), count)
    chosen = torch.cat([probabilities[:, c].topk(k).indices for c in range(classes)])
    return torch.unique(chosen)


@dataclass
class _UfmTask:
    """One dataset's UFM state: fixed pseudo-labels, trusted mask and the two example pools."""

    pseudo: Tensor
    trusted: Tensor
    streams: list[Iterator[tuple[Tensor, Tensor]]]


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
    val_sets = [_Examples(t.val, f"{t.name} (held-out part)", device, config.workers)
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

    ufm: list[_UfmTask] = []
    streams: list[Iterator[tuple[Tensor, Tensor]]] = []
    if objective == "ufm":
        with torch.no_grad():
            zero_weights = encoder.weights(zeros)
            for task, head in zip(tasks, heads, strict=True):
                ufm.append(_ufm_task(task, head, zero_weights, logits_of, per_task, generator,
                                     device, config.workers, config.batch_size, log))
    else:
        streams = [_Examples(t.train, f"{t.name} (training part)", device, config.workers)
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
            outputs = _ufm_outputs(encoder, coefficients, ufm, heads, kind, aug_generator,
                                   logits_of, device, config.precision)
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


def _ufm_task(task: TaskData, head: Tensor, zero_weights: dict[str, Tensor],
              logits_of: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], per_task: int,
              generator: torch.Generator, device: torch.device, workers: int,
              batch_size: int, log: Logger) -> _UfmTask:
    """Zero-shot pseudo-labels, the trusted subset, and the two example streams of one task.

    As ``learn_ufm.py``'s batch sampler: a quarter of each batch comes from the trusted subset
    (repeated as needed), the rest from the other examples.
    """
    indexed = _Indexed(task.train, f"{task.name} (training part)")
    everything = _Examples(indexed, f"{task.name} (training part)", device, workers)
    probabilities = torch.zeros(everything.size, head.shape[0])
    for images, index in everything.batches(batch_size, None):
        probabilities[index.cpu()] = logits_of(images, head, zero_weights).softmax(-1).cpu()
    trusted_index = trusted_subset(probabilities)
    mask = torch.zeros(everything.size, dtype=torch.bool)
    mask[trusted_index] = True
    rest = torch.nonzero(~mask).reshape(-1)
    log(f"{task.name}: {len(trusted_index)} trusted examples "
        f"({len(trusted_index) // max(1, head.shape[0])}+ per class), {len(rest)} others")
    del everything
    trusted_part = max(1, per_task // 4) if len(rest) else per_task
    streams = [_Examples(Subset(indexed, trusted_index.tolist()), f"{task.name} (trusted)",
                         device, workers).endless(trusted_part, generator)]
    if len(rest) and per_task > trusted_part:
        streams.append(_Examples(Subset(indexed, rest.tolist()), f"{task.name} (others)",
                                 device, workers).endless(per_task - trusted_part, generator))
    return _UfmTask(probabilities.argmax(-1).to(device), mask.to(device), streams)


def _ufm_outputs(encoder: ComposedEncoder, coefficients: Tensor, ufm: Sequence[_UfmTask],
                 heads: Sequence[Tensor], kind: str, generator: torch.Generator,
                 logits_of: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor],
                 device: torch.device, precision: str) -> list[TaskOutput]:
    """One UFM step's outputs: plain-view logits (no gradient), strong-view logits."""
    batches = []
    for task in ufm:
        parts = [next(stream) for stream in task.streams]
        batches.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    plain = torch.cat([images for images, _ in batches])
    with torch.no_grad():
        weights = encoder.weights(coefficients.detach())
        with autocast(device, precision):
            plain_feats = F.normalize(encoder.features(plain, weights).float(), dim=-1)
    with autocast(device, precision):
        strong_feats = encoder(coefficients, augment(plain, kind, generator))
    sizes = [len(images) for images, _ in batches]
    outputs = []
    for task, head, (_, index), p, s in zip(ufm, heads, batches, plain_feats.split(sizes),
                                            strong_feats.split(sizes), strict=True):
        outputs.append(TaskOutput(F.normalize(s.float(), dim=-1) @ head.T, None, "train",
                                  plain_logits=p @ head.T, pseudo_labels=task.pseudo[index],
                                  trusted=task.trusted[index]))
    return outputs


def _since(step: int, config: LearnerConfig) -> int:
    """Steps since the previous evaluation (the averaging window of the training loss)."""
    return step - ((step - 1) // config.eval_every) * config.eval_every


def _with_val(tasks: Sequence[TaskData], val_sets: Sequence[_Examples | None]) -> list[TaskData]:
    return [t for t, v in zip(tasks, val_sets, strict=True) if v is not None]


def _score_record(task: TaskData, score: TaskScore) -> dict[str, Any]:
    return {"dataset": task.name, "role": task.role, "examples": score.examples,
            "accuracy": score.accuracy, "loss": score.loss, "entropy": score.entropy}
