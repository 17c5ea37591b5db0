"""Gradient descent on aTLAS coefficients, with the task vectors frozen.

The learner sees a :class:`~tvtool.atlas.compose.ComposedEncoder` and one or more datasets,
each with a frozen zero-shot head. Every step draws a batch from every dataset, runs one forward
pass over their concatenation, and updates only the ``[T, num_blocks]`` coefficient matrix.
*How* is the protocol's (:mod:`tvtool.atlas.protocols`): which examples a step sees
(:mod:`tvtool.atlas.draws`), how the datasets' losses combine, the schedule, clamping and
clipping, how long, and which evaluated candidate is kept (:mod:`tvtool.atlas.selection`):

* ``tvtool``: held-out data scores the zero-shot model, the initialisation and the coefficients
  every ``eval_every`` steps; the best candidate is returned
  (:func:`~tvtool.atlas.objectives.selection_score`), with early stopping after ``patience``
  evaluations without improvement;
* ``atlas``: the labelled ``val`` split scores the candidates after every epoch (starting from
  the zero-shot model) and the most accurate is returned; negation stops once the control
  accuracy falls below the threshold, as the reference does;
* ``adamerging``: the last iterate is returned; evaluations (on a held-out part, or on the
  training examples themselves) only record the path.

Every evaluation is recorded (the *path*: coefficients, label-free statistics, accuracy where
labels may be read, and an optional audit accuracy that nothing selects on), so that selection
rules can be studied afterwards.

Its settings are :class:`~tvtool.atlas.config.LearnerConfig`. What it learns on lives next to
it: the choice of examples in :mod:`tvtool.atlas.examples`,
image augmentation in :mod:`tvtool.atlas.augment`, the UFM objective's pseudo-labels and step
in :mod:`tvtool.atlas.ufm`, the objectives in :mod:`tvtool.atlas.objectives`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from tvtool.atlas.augment import augment
from tvtool.atlas.compose import ComposedEncoder
from tvtool.atlas.config import LearnerConfig
from tvtool.atlas.draws import Draw, EpochDraw, FreshDraw, StreamDraw
from tvtool.atlas.examples import Examples
from tvtool.atlas.objectives import (
    ROLES,
    UNLABELLED,
    ScoreAccumulator,
    TaskOutput,
    TaskScore,
    loss,
    needs_labels,
)
from tvtool.atlas.protocols import PROTOCOL_SPECS, Protocol, oversampled
from tvtool.atlas.selection import Candidates
from tvtool.atlas.ufm import UfmTask, ufm_outputs, ufm_task
from tvtool.device import autocast, resolve_precision
from tvtool.errors import NumericalError, UsageError
from tvtool.types import Advance, Logger, ProgressFactory, no_progress
from tvtool.types import quiet as _quiet


@dataclass
class TaskData:
    """One dataset the coefficients are learned on.

    Attributes:
        name: Dataset name (for messages and reports).
        head: ``[num_classes, embed_dim]`` zero-shot head (logit scale folded in).
        train: Training examples, a dataset of ``(image, label)``.
        val: Selection data: the held-out part (``tvtool``), the labelled ``val`` split
            (``atlas``), or None.
        role: ``train``, or ``target`` / ``control`` for the negation objective.
        labelled: Whether the training labels may be used (False for test-time adaptation).
        audit: Labelled examples whose accuracy every evaluation records for later study;
            never used to learn or to select.
        class_prior: The class prior the collapse guard judges predictions against (None:
            uniform).
    """

    name: str
    head: Tensor
    train: Dataset[Any]
    val: Dataset[Any] | None = None
    role: str = "train"
    labelled: bool = True
    audit: Dataset[Any] | None = None
    class_prior: Tensor | None = None


@dataclass(frozen=True)
class LearnResult:
    """What coefficient learning produced.

    Attributes:
        coefficients: The selected ``[T, num_blocks]`` matrix (CPU, float32; for
            ``adamerging`` the clamped values).
        last: The matrix after the last step.
        best_step: Step of the selected matrix (0 = the initialisation, −1 = the zero-shot
            model, all coefficients 0, when the initialisation is not 0).
        steps_run: Steps taken (fewer than planned after early stopping).
        selection: How the matrix was selected.
        initial: Selection-data statistics of the initialisation, per dataset.
        best: Statistics of the selected matrix, per dataset.
        history: One record per evaluation, in order: step, training loss, score,
            per-dataset statistics, why the collapse guard rejected it, audit accuracy.
        zero_shot: Statistics of the zero-shot model, per dataset.
        config: The resolved hyper-parameters (``steps``: the steps planned).
        path: The coefficient matrix of every record of ``history``, in the same order.
        at_edge: ``first`` / ``last`` when the selection kept the first or the last candidate.
        rule_met: Whether the kept candidate satisfies the selection rule.
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
    path: list[Tensor] = field(default_factory=list)
    at_edge: str | None = None
    rule_met: bool = True


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


def describe_selection(objective: str, protocol: str, threshold: float) -> str:
    """How a protocol selects, in words (``LearnResult.selection``)."""
    if protocol == "adamerging":
        return "last iterate (AdaMerging: no selection)"
    if protocol == "atlas":
        if objective == "negation":
            return (f"lowest val-split target accuracy keeping control >= {threshold:.0%} of "
                    "zero-shot, after every epoch (aTLAS' rule)")
        return ("accuracy on the labelled val split after every epoch (aTLAS' rule; reads "
                "labels even for ufm)")
    if objective in UNLABELLED:
        return ("held-out information (H(mean p) - mean H(p), label-free), collapsed "
                "candidates excluded")
    if objective == "negation":
        return f"lowest held-out target accuracy keeping control >= {threshold:.0%} of zero-shot"
    return "held-out accuracy"


def _examples(data: Dataset[Any] | None, name: str, device: torch.device,
              workers: int) -> Examples | None:
    if data is None or len(data) == 0:  # type: ignore[arg-type]
        return None
    return Examples(data, name, device, workers)


def draw_seed(seed: int, index: int) -> int:
    """The seed of dataset ``index``'s own draw (``seed`` and ``seed + 1`` are taken)."""
    return (seed << 16) + 2 + index


def _draws(protocol: Protocol, objective: str, train_sets: Sequence[Examples], per_task: int,
           generator: torch.Generator, seed: int) -> list[Draw]:
    """The protocol's batch draw for every dataset (not UFM, see :func:`ufm_task`)."""
    if protocol.batching == "fresh":
        return [FreshDraw(data, per_task, protocol.micro_batches, draw_seed(seed, i))
                for i, data in enumerate(train_sets)]
    if protocol.batching == "epochs":
        draws: list[Draw] = []
        for i, data in enumerate(train_sets):
            indices = torch.arange(data.size)
            if objective == "ce":  # learn_few_shots.py: at least ten batches an epoch
                indices = indices.repeat(oversampled(data.size, per_task))
            draws.append(EpochDraw(data, indices, per_task, draw_seed(seed, i)))
        return draws
    return [StreamDraw([(data, per_task)], generator) for data in train_sets]


def learn(encoder: ComposedEncoder, tasks: Sequence[TaskData], config: LearnerConfig, *,
          log: Logger = _quiet, advance: Advance | None = None,
          progress: ProgressFactory | None = None,
          metrics: Callable[[dict[str, Any]], None] | None = None) -> LearnResult:
    """Learn the coefficient matrix of ``encoder`` on ``tasks``.

    Args:
        encoder: The composed encoder (vectors packed on the training device).
        tasks: Datasets with heads, training and selection parts, and roles.
        config: Hyper-parameters (None fields take the protocol's defaults).
        log: Where progress notes go (stderr in the CLI).
        advance: Called with 1 after every step (a progress bar).
        progress: A progress factory, opened once the number of steps is known (instead of
            ``advance``).
        metrics: Called at every evaluation with a record of the step (``step``, mean
            ``loss`` since the last one, ``lr``, held-out ``score`` when there is one,
            ``images_per_s``) for the metrics log.

    Returns:
        The selected coefficients and the learning record.

    Raises:
        UsageError: bad configuration, or datasets that do not fit the objective or protocol.
        InvalidInputError: unreadable or empty data.
        NumericalError: the loss became NaN or Inf.
    """
    config.check()
    device = encoder.stack.data.device
    config = dataclasses.replace(config.resolved(),
                                 precision=resolve_precision(config.precision, device))
    protocol = PROTOCOL_SPECS[cast(str, config.protocol)]
    objective = config.objective
    init, kind = cast(float, config.init), cast(str, config.augment)
    batch = cast(int, config.batch_size)
    _check_tasks(tasks, objective)
    generator = torch.Generator().manual_seed(config.seed)
    aug_generator = torch.Generator().manual_seed(config.seed + 1)
    per_task = batch if protocol.per_task_batch else max(1, batch // len(tasks))
    eval_batch = max(batch, 128)
    val_sets = [_examples(t.val, f"{t.name} (selection data)", device, config.workers)
                for t in tasks]
    if protocol.selection == "val-split" and any(v is None for v in val_sets):
        raise UsageError("the atlas protocol selects on the labelled val split: every dataset "
                         "needs one", hint="give TaskData.val, or use the tvtool protocol")
    train_sets = [] if objective == "ufm" else [
        Examples(t.train, f"{t.name} (training part)", device, config.workers) for t in tasks]
    score_sets: list[Examples | None] = list(val_sets)
    if protocol.selection == "last" and all(v is None for v in val_sets):
        # AdaMerging selects nothing; its path is scored on its own unlabelled examples.
        score_sets = list(train_sets)
    # An audit of the very examples the path is scored on (AdaMerging on the whole test split)
    # reuses them, and their pass: its labels only feed the audit accuracy.
    audit_sets = [train_sets[i] if train_sets and t.audit is t.train and
                  score_sets[i] is train_sets[i]
                  else _examples(t.audit, f"{t.name} (audit)", device, config.workers)
                  for i, t in enumerate(tasks)]
    heads = [t.head.to(device, torch.float32) for t in tasks]
    has_scores = any(s is not None for s in score_sets)
    selecting = protocol.selection != "last" and has_scores
    selection = describe_selection(objective, protocol.name, config.control_threshold) \
        if has_scores or protocol.selection == "last" else "last step (no held-out data)"
    if not has_scores and protocol.selection != "last":
        log("no held-out examples: the coefficients of the last step are kept "
            "(use more --shots or a larger --val-fraction for selection)")
    reads_labels = protocol.selection == "val-split"

    shape = (encoder.stack.num_vectors, encoder.partition.num_blocks)
    zeros = torch.zeros(shape, device=device)

    def logits_of(images: Tensor, head: Tensor, weights: dict[str, Tensor]) -> Tensor:
        with autocast(device, config.precision):
            feats = encoder.features(images, weights)
        return F.normalize(feats.float(), dim=-1) @ head.T

    ufm: list[UfmTask] = []
    draws: list[Draw]
    if objective == "ufm":
        with torch.no_grad():
            zero_weights = encoder.weights(zeros)
            for i, (task, head) in enumerate(zip(tasks, heads, strict=True)):
                ufm.append(ufm_task(task.name, task.train, head, zero_weights, logits_of,
                                    per_task, generator, device, config.workers, eval_batch,
                                    log, sampler="atlas" if protocol.name == "atlas"
                                    else "tvtool", reading=cast(str, config.ufm_reading),
                                    seed=draw_seed(config.seed, i)))
        draws = [u.draw for u in ufm]
    else:
        draws = _draws(protocol, objective, train_sets, per_task, generator, config.seed)
    epoch_length = (min(cast(int, d.batches_per_epoch) for d in draws)
                    if protocol.batching == "epochs" else None)
    steps = config.steps if config.steps is not None else \
        cast(int, config.epochs) * cast(int, epoch_length)
    config = dataclasses.replace(config, steps=steps)

    eval_batches = sum(math.ceil(d.size / eval_batch) for d in score_sets if d is not None) + \
        sum(math.ceil(c.size / eval_batch) for c, d in zip(audit_sets, score_sets, strict=True)
            if c is not None and c is not d)
    score_progress = progress if progress is not None else no_progress

    def evaluate(matrix: Tensor) -> tuple[list[TaskScore], dict[str, float]]:
        scores, audit = [], {}
        with torch.no_grad(), score_progress("held-out scores", eval_batches) as tick:
            weights = encoder.weights(matrix)
            for task, head, data, check in zip(tasks, heads, score_sets, audit_sets,
                                               strict=True):
                if data is not None:
                    acc = ScoreAccumulator(task.role, task.class_prior)
                    use_labels = task.labelled or reads_labels
                    right = 0
                    for images, labels in data.batches(eval_batch, None):
                        logits = logits_of(images, head, weights)
                        acc.add(logits, labels if use_labels else None)
                        if check is data:
                            right += int((logits.argmax(-1) == labels).sum())
                        tick(1)
                    scores.append(acc.result())
                    if check is data:
                        audit[task.name] = right / data.size
                if check is not None and check is not data:
                    right = 0
                    for images, labels in check.batches(eval_batch, None):
                        right += int((logits_of(images, head, weights).argmax(-1)
                                      == labels).sum())
                        tick(1)
                    audit[task.name] = right / check.size
        return scores, audit

    names = [t.name for t, s in zip(tasks, score_sets, strict=True) if s is not None]
    tracker = Candidates(objective, protocol.selection if selecting else "last", names,
                         control_threshold=config.control_threshold,
                         ties=protocol.name == "tvtool")
    raw = torch.full(shape, init, device=device, requires_grad=True)
    clamp = protocol.clamp

    def effective() -> Tensor:
        # AdaMerging keeps an unclamped parameter and clamps it in the forward pass
        # (torch.clamp(lambdas_raw, 0, 1)): outside [0, 1] its gradient is 0.
        return raw.clamp(*clamp) if clamp is not None else raw

    def snapshot() -> Tensor:
        return effective().detach().float().cpu().clone()

    has_audit = any(a is not None for a in audit_sets)
    if has_scores or has_audit:
        zero_scores, zero_audit = evaluate(zeros)
        tracker.zero_shot = zero_scores
        if init != 0.0:
            # The zero-shot model is a candidate too, as in the aTLAS references' selection.
            tracker.offer(-1, zeros.cpu(), None, zero_scores, audit=zero_audit,
                          candidate=selecting, note="zero-shot (all coefficients 0)")
            initial_scores, initial_audit = evaluate(effective().detach())
        else:
            initial_scores, initial_audit = zero_scores, zero_audit
        tracker.offer(0, snapshot(), None, initial_scores, audit=initial_audit)
    else:
        initial_scores = []
        tracker.offer(0, snapshot(), None, [])

    optimizer = torch.optim.AdamW([raw], lr=cast(float, config.lr),
                                  weight_decay=cast(float, config.weight_decay))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) \
        if config.schedule == "cosine" else None
    grad_clip = cast(float, config.grad_clip)
    step, running, since = 0, 0.0, 0
    images_per_step = per_task * sum(int(getattr(d, "micro_batches", 1)) for d in draws)
    window_start = time.perf_counter()
    stop_note = None
    bar = progress("learning coefficients", steps) if progress is not None \
        else contextlib.nullcontext(advance)
    with contextlib.ExitStack() as cleanup, bar as tick:
        for draw in draws:
            draw.begin(epoch_length)
            cleanup.callback(draw.close)  # data-loader workers stop with the loop
        for step in range(1, steps + 1):
            value = _step_loss(encoder, effective(), tasks, heads, draws, ufm, config,
                               protocol, kind, aug_generator, device)
            if not bool(torch.isfinite(value)):
                raise NumericalError(f"the loss became {float(value.detach())} at step {step}",
                                     hint="lower --lr")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if grad_clip > 0 and raw.grad is not None:
                # aTLAS clips the fp16 GradScaler's scaled gradient (clip_grad_norm_ before
                # scaler.step unscales it); grad_scale 1 is ordinary clipping.
                raw.grad.mul_(protocol.grad_scale)
                torch.nn.utils.clip_grad_norm_([raw], grad_clip)
                raw.grad.div_(protocol.grad_scale)
            lr_now = float(optimizer.param_groups[0]["lr"])  # the rate of this step
            optimizer.step()
            if schedule is not None:
                schedule.step()
            running += float(value.detach())
            since += 1
            if tick is not None:
                tick(1, loss=running / since, lr=lr_now)
            if not _due(step, steps, config.eval_every, epoch_length):
                continue
            now = time.perf_counter()
            rate = since * images_per_step / max(now - window_start, 1e-9)
            mean_loss, running, since = running / since, 0.0, 0
            scores, audit = evaluate(effective().detach()) if (has_scores or has_audit) \
                else ([], {})
            entry = tracker.offer(step, snapshot(), mean_loss, scores, audit=audit)
            if metrics is not None:
                metrics({"step": step, "loss": mean_loss, "lr": lr_now,
                         "score": entry.score, "images_per_s": rate})
            if tick is not None and entry.score is not None:
                tick(0, score=entry.score)
            window_start = time.perf_counter()
            if config.patience is not None and selecting and \
                    tracker.since_best() >= config.patience:
                stop_note = (f"early stop at step {step}: no held-out improvement in "
                             f"{tracker.since_best()} evaluations")
                break
            if protocol.name == "atlas" and objective == "negation" and \
                    _control_lost(scores, tracker.zero_shot, config.control_threshold):
                stop_note = (f"stop at step {step}: control accuracy below "
                             f"{config.control_threshold:.0%} of zero-shot (the reference's "
                             "rule)")
                break
    if stop_note:
        log(stop_note)
    best = tracker.best
    if selecting and not tracker.met_rule:
        log("no candidate met the selection rule ("
            + ("every one collapsed its predicted classes" if objective in UNLABELLED
               else f"control accuracy below {config.control_threshold:.0%} of zero-shot")
            + "); the best scoring one is kept")
    if best.rejected:
        for reason in best.rejected:
            log(f"warning: the kept coefficients look collapsed: {reason}")
    edge = tracker.at_edge() if selecting else None
    if edge == "first":
        log(f"note: the selection kept the first candidate ({_what(best.step)}): no later "
            "evaluation scored higher")
    elif edge == "last":
        log("note: the selection kept the last evaluated step: the score was still rising, "
            "more steps may help")
    with_scores = [t for t, s in zip(tasks, score_sets, strict=True) if s is not None]
    part = protocol.selection if selecting else "last"
    return LearnResult(
        coefficients=best.coefficients, last=snapshot(), best_step=best.step, steps_run=step,
        selection=selection,
        initial=[_score_record(t, s, part) for t, s in zip(with_scores, initial_scores,
                                                     strict=True)],
        best=[_score_record(t, s, part) for t, s in zip(with_scores, best.scores, strict=True)],
        history=tracker.records(),
        zero_shot=[_score_record(t, s, part) for t, s in zip(with_scores, tracker.zero_shot,
                                                       strict=True)],
        config=dataclasses.asdict(config), path=[c.coefficients for c in tracker.path],
        at_edge=edge, rule_met=tracker.met_rule)


def _what(step: int) -> str:
    return {-1: "the zero-shot model", 0: "the initialisation"}.get(step, f"step {step}")


def _due(step: int, steps: int, eval_every: int | None, epoch_length: int | None) -> bool:
    """Whether ``step`` ends with an evaluation."""
    if step == steps:
        return True
    if eval_every is not None:
        return step % eval_every == 0
    return bool(epoch_length) and step % cast(int, epoch_length) == 0


def _control_lost(scores: Sequence[TaskScore], zero_shot: Sequence[TaskScore],
                  threshold: float) -> bool:
    """learn_task_negation.py's stop: some control accuracy below threshold × zero-shot."""
    return any(s.role == "control" and (s.accuracy or 0.0) < threshold * (z.accuracy or 0.0)
               for s, z in zip(scores, zero_shot, strict=True))


def _step_loss(encoder: ComposedEncoder, coefficients: Tensor, tasks: Sequence[TaskData],
               heads: Sequence[Tensor], draws: Sequence[Draw], ufm: Sequence[UfmTask],
               config: LearnerConfig, protocol: Protocol, kind: str,
               generator: torch.Generator, device: torch.device) -> Tensor:
    """The loss of one step: one forward pass over every dataset's batches."""
    if ufm:
        outputs = ufm_outputs(encoder, coefficients, ufm, heads, kind, generator, device,
                              config.precision)
    else:
        parts = [(task, head, images, labels)
                 for task, head, draw in zip(tasks, heads, draws, strict=True)
                 for images, labels in draw.next()]
        images = augment(torch.cat([p[2] for p in parts]), kind, generator)
        with autocast(device, config.precision):
            feats = encoder(coefficients, images)
        outputs = []
        for (task, head, _, labels), chunk in zip(
                parts, feats.split([len(p[2]) for p in parts]), strict=True):
            logits = F.normalize(chunk.float(), dim=-1) @ head.T
            outputs.append(TaskOutput(logits, labels if task.labelled else None, task.role))
    return loss(config.objective, outputs, config.negation_weight,
                negation_loss=cast(str, config.negation_loss),
                ufm_threshold=config.ufm_threshold, reduce=protocol.reduce)


def _score_record(task: TaskData, score: TaskScore, part: str) -> dict[str, Any]:
    """A selection score as reports show it.

    ``part`` says where it was measured: ``held-out`` (the ``--val-fraction`` part, never the
    examples learned from), ``val-split`` (the labelled val split of the ``atlas`` protocol) or
    ``last`` (no selection). The role of a dataset learned on (``train`` inside the learner,
    where it marks the examples that feed the loss) is reported as ``task``, so a held-out
    score is not read as a training score.
    """
    record: dict[str, Any] = {"dataset": task.name, **score.record(), "part": part}
    if record["role"] == "train":
        record["role"] = "task"
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
