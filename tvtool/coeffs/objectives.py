"""Objectives for learning aTLAS coefficients, and the scores used to select them.

* ``ce`` -- cross-entropy on labelled (k-shot) data; with several datasets, the mean of their
  losses (each dataset scored with its own zero-shot head).
* ``entropy`` -- mean Shannon entropy of the predictions on unlabelled data (test-time
  adaptation, as in AdaMerging and aTLAS' unsupervised setting). Needs no labels.
* ``negation`` -- learned forgetting: keep the cross-entropy on the *control* data low while
  driving the probability of the true class on the *target* data to zero. The target term is
  the unlikelihood loss ``−log(1 − p_y)`` (Welleck et al., arXiv 1908.04319) rather than a
  negated cross-entropy: it is bounded below (by 0, reached when the true class gets no mass),
  so the objective cannot trade the control task for an ever larger target loss.

Scores (higher is better) select coefficients on held-out data: mean accuracy for ``ce``,
minus the mean entropy for ``entropy`` (label-free), and control accuracy minus target accuracy
for ``negation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tvtool.errors import UsageError

OBJECTIVES = ("ce", "entropy", "negation")
ROLES = ("train", "target", "control")


def check_objective(objective: str) -> None:
    """Refuse an unknown objective name.

    Raises:
        UsageError: naming the known ones.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}", hint="use ce, entropy or negation")


def needs_labels(objective: str) -> bool:
    """Whether the objective (and its selection score) uses labels."""
    return objective != "entropy"


def unlikelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean ``−log(1 − p_y)``: small once the true class gets no probability mass.

    Computed as ``logsumexp(all logits) − logsumexp(logits without the true class)``, which
    stays finite where ``p_y`` rounds to 1.
    """
    logits = logits.float()
    others = logits.scatter(-1, labels[:, None], float("-inf"))
    return (logits.logsumexp(dim=-1) - others.logsumexp(dim=-1)).mean()


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch, in float32."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


@dataclass(frozen=True)
class TaskOutput:
    """The logits of one dataset's part of a batch.

    Attributes:
        logits: ``[n, C]`` logits.
        labels: ``[n]`` labels, or None for unlabelled data.
        role: ``train`` (ce / entropy), ``target`` or ``control`` (negation).
    """

    logits: Tensor
    labels: Tensor | None
    role: str = "train"


def loss(objective: str, outputs: Sequence[TaskOutput], negation_weight: float = 1.0) -> Tensor:
    """The training loss of one step.

    Args:
        objective: ``ce``, ``entropy`` or ``negation``.
        outputs: One entry per dataset of the step.
        negation_weight: Weight of the target hinge in the ``negation`` objective.

    Returns:
        A scalar float32 tensor.

    Raises:
        UsageError: unknown objective, missing labels, or negation without target and control.
    """
    check_objective(objective)
    if objective == "entropy":
        return torch.stack([mean_entropy(o.logits) for o in outputs]).mean()
    for output in outputs:
        if output.labels is None:
            raise UsageError(f"objective {objective!r} needs labelled data")
    if objective == "ce":
        return torch.stack([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                            for o in outputs]).mean()
    targets = [o for o in outputs if o.role == "target"]
    controls = [o for o in outputs if o.role == "control"]
    if not targets or not controls:
        raise UsageError("the negation objective needs target and control data")
    keep = torch.stack([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                        for o in controls]).mean()
    forget = torch.stack([unlikelihood(o.logits, o.labels)  # type: ignore[arg-type]
                          for o in targets]).mean()
    return keep + negation_weight * forget


@dataclass(frozen=True)
class TaskScore:
    """Held-out statistics of one dataset.

    Attributes:
        role: The dataset's role.
        examples: Examples scored.
        accuracy: Top-1 accuracy (None without labels).
        loss: Mean cross-entropy (None without labels).
        entropy: Mean prediction entropy.
    """

    role: str
    examples: int
    accuracy: float | None
    loss: float | None
    entropy: float


class ScoreAccumulator:
    """Sums of correct predictions, losses and entropies over the batches of one dataset."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.examples = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.entropy_sum = 0.0
        self.labelled = True

    def add(self, logits: Tensor, labels: Tensor | None) -> None:
        """Add one batch."""
        logits = logits.float()
        count = int(logits.shape[0])
        self.examples += count
        self.entropy_sum += float(mean_entropy(logits)) * count
        if labels is None:
            self.labelled = False
            return
        self.correct += int((logits.argmax(dim=-1) == labels).sum())
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))

    def result(self) -> TaskScore:
        """The dataset's statistics."""
        n = max(1, self.examples)
        labelled = self.labelled and self.examples > 0
        return TaskScore(self.role, self.examples, self.correct / n if labelled else None,
                         self.loss_sum / n if labelled else None, self.entropy_sum / n)


def selection_score(objective: str, scores: Sequence[TaskScore]) -> tuple[float, float]:
    """``(primary, tie-break)`` where larger is better, for choosing among checkpoints.

    ``ce``: (mean accuracy, −mean loss). ``entropy``: (−mean entropy, 0).
    ``negation``: (control accuracy − target accuracy, target loss − control loss).
    """
    def mean(values: Sequence[float | None]) -> float:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else 0.0

    if objective == "entropy":
        return (-mean([s.entropy for s in scores]), 0.0)
    if objective == "ce":
        return (mean([s.accuracy for s in scores]), -mean([s.loss for s in scores]))
    control = [s for s in scores if s.role == "control"]
    target = [s for s in scores if s.role == "target"]
    return (mean([s.accuracy for s in control]) - mean([s.accuracy for s in target]),
            mean([s.loss for s in target]) - mean([s.loss for s in control]))
