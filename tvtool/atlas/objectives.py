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

How a step's batch is drawn, how the datasets' losses combine (``reduce``), and which
candidate is kept, is the protocol's (:mod:`tvtool.atlas.protocols`). Scores (compared as
tuples, larger is better) select coefficients on held-out data; see :func:`selection_score`
and, for the label-free collapse guard, :func:`collapse_reasons`.
"""

from __future__ import annotations

import math
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

REDUCTIONS = ("mean", "sum")

# The label-free collapse guard (unlabelled objectives): a candidate whose predicted classes
# (entropy of the histogram of its predictions) are spread less evenly than PRIOR_FRACTION of
# the class prior's entropy (log C for the uniform prior), or than COLLAPSE_FRACTION of the
# zero-shot model's, counts as collapsed on that dataset and cannot be selected. The first
# test holds even when the zero-shot model is itself collapsed.
COLLAPSE_FRACTION = 0.9
PRIOR_FRACTION = 0.75
DEFAULT_CONTROL_THRESHOLD = 0.95
DEFAULT_UFM_THRESHOLD = 0.99


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


def ufm_loss(plain_logits: Tensor | None, strong_logits: Tensor, pseudo_labels: Tensor,
             trusted: Tensor, threshold: float = DEFAULT_UFM_THRESHOLD) -> Tensor:
    """The aTLAS reference's unsupervised FixMatch loss (``learn_ufm.py``).

    Targets: the one-hot zero-shot pseudo-label for trusted examples, the (detached) softmax of
    the plain view for the others. Each example's cross-entropy of the strong view against its
    target counts when the target's largest probability exceeds ``threshold`` (trusted
    examples always do); the loss is the mean over the counted examples (0 when none counts).

    With every example trusted (the reference code's effective behaviour) this is the mean
    cross-entropy of the strong view against the pseudo-labels, and the plain view is not
    needed.

    Args:
        plain_logits: ``[n, C]`` logits of the unaugmented view (no gradient is taken); None
            when every example is trusted.
        strong_logits: ``[n, C]`` logits of the strongly augmented view.
        pseudo_labels: ``[n]`` zero-shot predicted classes.
        trusted: ``[n]`` bool, whether each example is trusted.
        threshold: Confidence a target needs to count.

    Raises:
        UsageError: no plain-view logits while some example is not trusted.
    """
    one_hot = F.one_hot(pseudo_labels, strong_logits.shape[-1]).float()
    if plain_logits is None:
        if not bool(trusted.all()):
            raise UsageError("the ufm loss needs plain-view logits for untrusted examples")
        targets = one_hot
    else:
        targets = torch.where(trusted[:, None], one_hot,
                              plain_logits.detach().float().softmax(dim=-1))
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
        plain_logits: ``ufm`` only: ``[n, C]`` logits of the unaugmented view (None when
            every example is trusted).
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
         ufm_threshold: float = DEFAULT_UFM_THRESHOLD, reduce: str = "mean") -> Tensor:
    """The training loss of one step.

    Args:
        objective: One of :data:`OBJECTIVES`.
        outputs: One entry per dataset (per micro-batch, AdaMerging) of the step, each
            reduced to its own mean first.
        negation_weight: Weight of the target term in the ``negation`` objective.
        negation_loss: ``unlikelihood`` or ``ce`` (the reference's ``−CE``) target term.
        ufm_threshold: Confidence threshold of ``ufm``.
        reduce: How the entries combine: ``mean`` (tvtool) or ``sum`` (AdaMerging's and
            aTLAS' ``losses += loss`` / ``sum(all_losses)``). For ``negation``, within each
            role.

    Returns:
        A scalar float32 tensor.

    Raises:
        UsageError: unknown objective or reduction, missing labels or ufm inputs, or
            negation without target and control.
    """
    check_objective(objective)
    if reduce not in REDUCTIONS:
        raise UsageError(f"unknown reduction {reduce!r}", hint="use mean or sum")

    def combine(parts: list[Tensor]) -> Tensor:
        stacked = torch.stack(parts)
        return stacked.sum() if reduce == "sum" else stacked.mean()

    if objective == "entropy":
        return combine([mean_entropy(o.logits) for o in outputs])
    if objective == "infomax":
        return combine([infomax_loss(o.logits) for o in outputs])
    if objective == "ufm":
        parts = []
        for o in outputs:
            if o.pseudo_labels is None or o.trusted is None:
                raise UsageError("the ufm objective needs pseudo-labels and the trusted mask")
            parts.append(ufm_loss(o.plain_logits, o.logits, o.pseudo_labels, o.trusted,
                                  ufm_threshold))
        return combine(parts)
    for output in outputs:
        if output.labels is None:
            raise UsageError(f"objective {objective!r} needs labelled data")
    if objective == "ce":
        return combine([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                        for o in outputs])
    if negation_loss not in NEGATION_LOSSES:
        raise UsageError(f"unknown negation loss {negation_loss!r}",
                         hint="use unlikelihood or ce")
    targets = [o for o in outputs if o.role == "target"]
    controls = [o for o in outputs if o.role == "control"]
    if not targets or not controls:
        raise UsageError("the negation objective needs target and control data")
    keep = combine([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                    for o in controls])
    if negation_loss == "ce":
        forget = -combine([F.cross_entropy(o.logits.float(), o.labels)  # type: ignore[arg-type]
                           for o in targets])
    else:
        forget = combine([unlikelihood(o.logits, o.labels)  # type: ignore[arg-type]
                          for o in targets])
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
        prior_entropy: Entropy of the class prior the histogram is judged against (``log C``
            for the uniform prior; NaN when unknown).
        top_share: Share of the examples predicted as the most predicted class.
    """

    role: str
    examples: int
    accuracy: float | None
    loss: float | None
    entropy: float
    marginal_entropy: float = 0.0
    class_entropy: float = 0.0
    prior_entropy: float = math.nan
    top_share: float = 0.0

    @property
    def information(self) -> float:
        """Mutual information of input and prediction: ``H(mean p) − mean H(p)``."""
        return self.marginal_entropy - self.entropy

    @property
    def class_entropy_ratio(self) -> float:
        """``class_entropy / prior_entropy``: 1 for predictions spread like the prior."""
        if not self.prior_entropy > 0:
            return math.nan
        return self.class_entropy / self.prior_entropy

    def record(self) -> dict[str, float | int | str | None]:
        """The statistics as a JSON-ready mapping (the path records, ``--json``)."""
        return {"role": self.role, "examples": self.examples, "accuracy": self.accuracy,
                "loss": self.loss, "entropy": self.entropy,
                "marginal_entropy": self.marginal_entropy, "information": self.information,
                "class_entropy": self.class_entropy, "prior_entropy": self.prior_entropy,
                "class_entropy_ratio": self.class_entropy_ratio, "top_share": self.top_share}


class ScoreAccumulator:
    """Sums of correct predictions, losses, entropies and class counts over batches.

    Args:
        role: The dataset's role.
        prior: The dataset's class prior (``[C]``, summing to 1), or None for the uniform one.
    """

    def __init__(self, role: str, prior: Tensor | None = None) -> None:
        self.role = role
        self.prior = prior
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
        marginal = classes = top = 0.0
        prior = math.nan
        if self.probability_sum is not None and self.class_counts is not None:
            marginal = float(entropy_of(self.probability_sum / n))
            classes = float(entropy_of(self.class_counts.double() / n))
            top = float(self.class_counts.max()) / n
            prior = (float(entropy_of(self.prior)) if self.prior is not None
                     else math.log(len(self.class_counts)))
        return TaskScore(self.role, self.examples, self.correct / n if labelled else None,
                         self.loss_sum / n if labelled else None, self.entropy_sum / n,
                         marginal, classes, prior, top)


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


def collapse_reasons(scores: Sequence[TaskScore], zero_shot: Sequence[TaskScore] | None,
                     names: Sequence[str]) -> list[str]:
    """Why a candidate counts as collapsed, one line per failed test (empty: it does not).

    A dataset fails when its predicted-class histogram entropy is below
    :data:`PRIOR_FRACTION` × the entropy of the class prior (``log C`` for the uniform prior:
    holds even when the zero-shot model is itself collapsed), or below
    :data:`COLLAPSE_FRACTION` × the zero-shot model's.

    Args:
        scores: The candidate's held-out scores, one per dataset.
        zero_shot: The zero-shot model's, same order (None: no relative test).
        names: The datasets' names, same order.
    """
    reasons = []
    references = list(zero_shot) if zero_shot is not None else [None] * len(scores)
    for name, score, reference in zip(names, scores, references, strict=True):
        prior = score.prior_entropy
        if prior > 0 and score.class_entropy < PRIOR_FRACTION * prior - 1e-9:
            reasons.append(f"{name}: predicted-class entropy {score.class_entropy:.3f} < "
                           f"{PRIOR_FRACTION:g} x the class prior's {prior:.3f} "
                           f"({score.top_share:.0%} of the examples in one class)")
        if reference is not None and \
                score.class_entropy < COLLAPSE_FRACTION * reference.class_entropy - 1e-9:
            reasons.append(f"{name}: predicted-class entropy {score.class_entropy:.3f} < "
                           f"{COLLAPSE_FRACTION:g} x the zero-shot model's "
                           f"{reference.class_entropy:.3f}")
    return reasons


def selection_score(objective: str, scores: Sequence[TaskScore],
                    zero_shot: Sequence[TaskScore] | None = None, *,
                    control_threshold: float = DEFAULT_CONTROL_THRESHOLD
                    ) -> tuple[float, float, float]:
    """``(admissible, primary, tie-break)``, compared as a tuple: larger is better.

    * ``ce``: (1, mean accuracy, −mean loss).
    * ``entropy``, ``infomax``, ``ufm`` (label-free): admissible unless collapsed on some
      dataset (:func:`collapse_reasons`: predicted classes spread less than
      :data:`PRIOR_FRACTION` of the class prior's entropy, or less than
      :data:`COLLAPSE_FRACTION` of the zero-shot model's); primary: mean mutual information
      ``H(mean p) − mean H(p)`` (high for confident *and* varied predictions, ≈ 0 for a model
      that predicts one class for all); tie-break: −mean entropy.
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
        collapsed = bool(collapse_reasons(scores, reference, [str(i) for i in
                                                              range(len(scores))]))
        return (0.0 if collapsed else 1.0, _mean([s.information for s in scores]),
                -_mean([s.entropy for s in scores]))
    kept = all((s.accuracy or 0.0) >= control_threshold * (z.accuracy or 0.0) - 1e-12
               for s, z in zip(scores, reference, strict=True) if s.role == "control")
    return (1.0 if kept else 0.0,
            -_mean([s.accuracy for s in scores if s.role == "target"]),
            _mean([s.accuracy for s in scores if s.role == "control"]))
