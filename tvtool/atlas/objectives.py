"""Objectives for learning aTLAS coefficients, and the scores used to select them.

Labelled:

* ``ce`` -- cross-entropy on labelled (k-shot) data; with several datasets, the mean of their
  losses (each dataset scored with its own zero-shot head). aTLAS ``learn_few_shots.py``.
* ``negation`` -- learned forgetting: keep the cross-entropy on the *control* data low while
  driving the probability of the true class on the *target* data to zero. The default target
  term is the unlikelihood loss ``−log(1 − p_y)`` (Welleck et al., arXiv 1908.04319): it is
  bounded below (by 0, reached when the true class gets no mass), so the objective cannot
  trade the control task for an ever larger target loss. ``negation_loss="ce"`` uses the
  aTLAS reference's ``−CE(target) + CE(control)`` (``learn_task_negation.py``) instead.

Unlabelled (test-time adaptation; labels are never read):

* ``entropy`` -- mean Shannon entropy of the predictions (AdaMerging, arXiv 2310.02575).
* ``infomax`` -- information maximisation (SHOT, Liang et al., arXiv 2002.08546): mean entropy
  of each prediction minus the entropy of the mean prediction. The second term is maximal when
  the predicted classes are spread evenly, so the loss cannot be lowered by predicting one
  class for everything (the collapse plain entropy minimisation falls into).
* ``ufm`` -- the aTLAS reference's unsupervised FixMatch (``learn_ufm.py``,
  ``ssl_loss_trusted``): pseudo-labels fixed once from the zero-shot model, a class-balanced
  *trusted* subset (the ``k`` examples with the highest zero-shot probability of each class)
  whose targets are those pseudo-labels, and for the other examples the current model's
  prediction on the plain view as a soft target for the strongly augmented view, counted only
  when its confidence exceeds a threshold (0.99).

Scores (compared as tuples, larger is better) select coefficients on held-out data; see
:func:`selection_score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tvtool.errors import UsageError

OBJECTIVES = ("ce", "entropy", "infomax", "ufm", "negation")
UNLABELLED = ("entropy", "infomax", "ufm")
ROLES = ("train", "target", "control")
NEGATION_LOSSES = ("unlikelihood", "ce")
AUGMENTATIONS = ("none", "train", "reference")

# A held-out check whose predicted classes are spread less evenly than this fraction of the
# zero-shot model's (entropy of the predicted-class histogram) counts as collapsed and cannot
# be selected (unlabelled objectives).
COLLAPSE_FRACTION = 0.9
DEFAULT_CONTROL_THRESHOLD = 0.95
DEFAULT_UFM_THRESHOLD = 0.99


@dataclass(frozen=True)
class ObjectiveDefaults:
    """Hyper-parameters an objective uses unless told otherwise (each from its reference).

    Attributes:
        steps: Optimisation steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        init: Initial value of every coefficient.
        grad_clip: Maximum gradient norm (None: no clipping).
        augment: Augmentation of the training images: ``none``, ``train`` (random resized
            crop of 90-100 % of the area, open_clip's training transform) or ``reference``
            (crop of 50-100 % and horizontal flip, aTLAS' few-shot and UFM transform).
        source: Where the values come from.
    """

    steps: int
    lr: float
    weight_decay: float
    init: float
    grad_clip: float | None
    augment: str
    source: str


DEFAULTS: dict[str, ObjectiveDefaults] = {
    "ce": ObjectiveDefaults(100, 0.1, 0.1, 0.0, 1.0, "reference",
                            "aTLAS learn_few_shots.py (lr 1e-1, wd 0.1, clip 1, crop+flip)"),
    "ufm": ObjectiveDefaults(500, 1e-3, 0.1, 0.0, 1.0, "reference",
                             "aTLAS learn_ufm.py (lr 1e-3, wd 0.1, clip 1, crop+flip)"),
    "entropy": ObjectiveDefaults(500, 1e-3, 0.0, 0.3, None, "none",
                                 "AdaMerging (prior 0.3, lr 1e-3, wd 0, 500 steps)"),
    "infomax": ObjectiveDefaults(500, 1e-3, 0.0, 0.3, None, "none",
                                 "as entropy (AdaMerging's settings)"),
    "negation": ObjectiveDefaults(100, 5e-3, 0.1, 0.0, 1.0, "train",
                                  "aTLAS learn_task_negation.py (lr 1e-3 x 5, wd 0.1, "
                                  "clip 1, open_clip training transform)"),
}


def check_objective(objective: str) -> None:
    """Refuse an unknown objective name.

    Raises:
        UsageError: naming the known ones.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}",
                         hint="use ce, entropy, infomax, ufm or negation")


def needs_labels(objective: str) -> bool:
    """Whether the objective (and its selection score) uses labels."""
    return objective not in UNLABELLED


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


def entropy_of(probabilities: Tensor) -> Tensor:
    """Shannon entropy (nats) of a probability vector (zeros contribute 0)."""
    p = probabilities.float()
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1)


def infomax_loss(logits: Tensor) -> Tensor:
    """Information-maximisation loss: ``mean_i H(p_i) − H(mean_i p_i)`` (SHOT)."""
    probabilities = logits.float().softmax(dim=-1)
    return mean_entropy(logits) - entropy_of(probabilities.mean(dim=0))


def ufm_loss(plain_logits: Tensor, strong_logits: Tensor, pseudo_labels: Tensor,
             trusted: Tensor, threshold: float = DEFAULT_UFM_THRESHOLD) -> Tensor:
    """The aTLAS reference's unsupervised FixMatch loss (``learn_ufm.py``).

    Targets: the one-hot zero-shot pseudo-label for trusted examples, the (detached) softmax of
    the plain view for the others. Each example's cross-entropy of the strong view against its
    target counts when the target's largest probability exceeds ``threshold`` (trusted
    examples always do); the loss is the mean over the counted examples (0 when none counts).

    Args:
        plain_logits: ``[n, C]`` logits of the unaugmented view (no gradient is taken).
        strong_logits: ``[n, C]`` logits of the strongly augmented view.
        pseudo_labels: ``[n]`` zero-shot predicted classes.
        trusted: ``[n]`` bool, whether each example is in the trusted subset.
        threshold: Confidence a target needs to count.
    """
    targets = plain_logits.detach().float().softmax(dim=-1)
    one_hot = F.one_hot(pseudo_labels, targets.shape[-1]).to(targets.dtype)
    targets = torch.where(trusted[:, None], one_hot, targets)
    weight = (targets.max(dim=-1).values > threshold).to(targets.dtype)
    losses = -(targets * strong_logits.float().log_softmax(dim=-1)).sum(dim=-1)
    return (losses * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass(frozen=True)
class TaskOutput:
    """The logits of one dataset's part of a batch.

    Attributes:
        logits: ``[n, C]`` logits (for ``ufm``: of the strongly augmented view).
        labels: ``[n]`` labels, or None for unlabelled data.
        role: ``train`` (ce / unlabelled), ``target`` or ``control`` (negation).
        plain_logits: ``ufm`` only: ``[n, C]`` logits of the unaugmented view.
        pseudo_labels: ``ufm`` only: ``[n]`` zero-shot pseudo-labels.
        trusted: ``ufm`` only: ``[n]`` bool mask of the trusted examples.
    """

    logits: Tensor
    labels: Tensor | None
    role: str = "train"
    plain_logits: Tensor | None = None
    pseudo_labels: Tensor | None = None
    trusted: Tensor | None = None


def loss(objective: str, outputs: Sequence[TaskOutput], negation_weight: float = 1.0, *,
         negation_loss: str = "unlikelihood",
         ufm_threshold: float = DEFAULT_UFM_THRESHOLD) -> Tensor:
    """The training loss of one step.

    Args:
        objective: One of :data:`OBJECTIVES`.
        outputs: One entry per dataset of the step.
        negation_weight: Weight of the target term in the ``negation`` objective.
        negation_loss: ``unlikelihood`` or ``ce`` (the reference's ``−CE``) target term.
        ufm_threshold: Confidence threshold of ``ufm``.

    Returns:
        A scalar float32 tensor (the mean over the datasets).

    Raises:
        UsageError: unknown objective, missing labels or ufm inputs, or negation without
            target and control.
    """
    check_objective(objective)
    if objective == "entropy":
        return torch.stack([mean_entropy(o.logits) for o in outputs]).mean()
    if objective == "infomax":
        return torch.stack([infomax_loss(o.logits) for o in outputs]).mean()
    if objective == "ufm":
        parts = []
        for o in outputs:
            if o.plain_logits is None or o.pseudo_labels is None or o.trusted is None:
                raise UsageError("the ufm objective needs plain-view logits, pseudo-labels "
                                 "and the trusted mask")
            parts.append(ufm_loss(o.plain_logits, o.logits, o.pseudo_labels, o.trusted,
                                  ufm_threshold))
        return torch.stack(parts).mean()
    for output in outputs:
        if output.labels is None:
            raise UsageError(f"objective {objective!r} needs labelled data")
    if objective == "ce":
        return torch.stack([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                            for o in outputs]).mean()
    if negation_loss not in NEGATION_LOSSES:
        raise UsageError(f"unknown negation loss {negation_loss!r}",
                         hint="use unlikelihood or ce")
    targets = [o for o in outputs if o.role == "target"]
    controls = [o for o in outputs if o.role == "control"]
    if not targets or not controls:
        raise UsageError("the negation objective needs target and control data")
    keep = torch.stack([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                        for o in controls]).mean()
    if negation_loss == "ce":
        forget = -torch.stack([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                               for o in targets]).mean()
    else:
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
        marginal_entropy: Entropy of the mean prediction ``H(mean p)``.
        class_entropy: Entropy of the histogram of predicted classes (0: one class for all).
    """

    role: str
    examples: int
    accuracy: float | None
    loss: float | None
    entropy: float
    marginal_entropy: float = 0.0
    class_entropy: float = 0.0

    @property
    def information(self) -> float:
        """Mutual information of input and prediction: ``H(mean p) − mean H(p)``."""
        return self.marginal_entropy - self.entropy


class ScoreAccumulator:
    """Sums of correct predictions, losses, entropies and class counts over batches."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.examples = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.entropy_sum = 0.0
        self.labelled = True
        self.probability_sum: Tensor | None = None
        self.class_counts: Tensor | None = None

    def add(self, logits: Tensor, labels: Tensor | None) -> None:
        """Add one batch."""
        logits = logits.float()
        count = int(logits.shape[0])
        self.examples += count
        self.entropy_sum += float(mean_entropy(logits)) * count
        probabilities = logits.softmax(dim=-1).sum(dim=0).cpu()
        counts = torch.bincount(logits.argmax(dim=-1).cpu(), minlength=logits.shape[-1])
        if self.probability_sum is None or self.class_counts is None:
            self.probability_sum, self.class_counts = probabilities, counts
        else:
            self.probability_sum += probabilities
            self.class_counts += counts
        if labels is None:
            self.labelled = False
            return
        self.correct += int((logits.argmax(dim=-1) == labels).sum())
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))

    def result(self) -> TaskScore:
        """The dataset's statistics."""
        n = max(1, self.examples)
        labelled = self.labelled and self.examples > 0
        marginal = classes = 0.0
        if self.probability_sum is not None and self.class_counts is not None:
            marginal = float(entropy_of(self.probability_sum / n))
            classes = float(entropy_of(self.class_counts.double() / n))
        return TaskScore(self.role, self.examples, self.correct / n if labelled else None,
                         self.loss_sum / n if labelled else None, self.entropy_sum / n,
                         marginal, classes)


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


def selection_score(objective: str, scores: Sequence[TaskScore],
                    zero_shot: Sequence[TaskScore] | None = None, *,
                    control_threshold: float = DEFAULT_CONTROL_THRESHOLD
                    ) -> tuple[float, float, float]:
    """``(admissible, primary, tie-break)``, compared as a tuple: larger is better.

    * ``ce``: (1, mean accuracy, −mean loss).
    * ``entropy``, ``infomax``, ``ufm`` (label-free): admissible unless collapsed -- a dataset
      whose predicted-class histogram entropy fell below :data:`COLLAPSE_FRACTION` × the
      zero-shot model's; primary: mean mutual information ``H(mean p) − mean H(p)`` (high for
      confident *and* varied predictions, ≈ 0 for a model that predicts one class for all);
      tie-break: −mean entropy.
    * ``negation`` (the reference's rule, ``learn_task_negation.py``): admissible when every
      control dataset keeps ``control_threshold`` × its zero-shot accuracy; primary: −mean
      target accuracy; tie-break: mean control accuracy.

    Args:
        objective: The objective.
        scores: Held-out scores of the candidate, one per dataset (in task order).
        zero_shot: Held-out scores of the zero-shot model (all coefficients 0), same order;
            None treats the candidate as its own reference.
        control_threshold: Fraction of zero-shot control accuracy negation must keep.
    """
    reference = list(zero_shot) if zero_shot is not None else list(scores)
    if objective == "ce":
        return (1.0, _mean([s.accuracy for s in scores]), -_mean([s.loss for s in scores]))
    if objective in UNLABELLED:
        collapsed = any(s.class_entropy < COLLAPSE_FRACTION * z.class_entropy - 1e-9
                        for s, z in zip(scores, reference, strict=True))
        return (0.0 if collapsed else 1.0, _mean([s.information for s in scores]),
                -_mean([s.entropy for s in scores]))
    kept = all((s.accuracy or 0.0) >= control_threshold * (z.accuracy or 0.0) - 1e-12
               for s, z in zip(scores, reference, strict=True) if s.role == "control")
    return (1.0 if kept else 0.0,
            -_mean([s.accuracy for s in scores if s.role == "target"]),
            _mean([s.accuracy for s in scores if s.role == "control"]))
