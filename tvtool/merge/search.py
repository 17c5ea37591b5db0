"""Coefficient searches, written against an ``evaluate(coef) -> {dataset: accuracy}`` callable.

* :func:`search_coef` -- task addition (Ilharco et al. 2023, §4): evaluate the merged vector at
  each α of a grid on the validation splits of the vectors' datasets and keep the α with the
  best *average normalized accuracy* (accuracy of the merged model / accuracy of the model
  fine-tuned on that dataset); without fine-tuned references, the best average accuracy.
* :func:`search_negation` -- task negation (Ilharco et al. 2023, §3): among the α whose control
  accuracy stays at or above ``threshold`` × the base model's, the one with the lowest target
  accuracy (ties: the largest such α).

Both are pure given the callable, so they are tested with fake evaluators; the real one
(:mod:`tvtool.merge.evaluation`) evaluates a base model plus task vectors with
:mod:`tvtool.evaluate`. Ties in the score go to the earliest grid point (the smallest α for an
increasing grid), so a search is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tvtool.errors import UsageError
from tvtool.grid import parse_grid as parse_grid  # re-exported: scripts/results_*.py use it

Accuracies = Mapping[str, float]
Evaluate = Callable[[float], Accuracies]

DEFAULT_GRID_TEXT = "0:1:0.05"
DEFAULT_NEGATION_GRID_TEXT = "0.05:1:0.05"
DEFAULT_THRESHOLD = 0.95
# TIES' reference search (prateeky2806/ties-merging README, ``linear+0.8+2.51+0.1``; paper
# appendix): its disjoint merge *averages* the agreeing entries, so the merged vector has the
# size of one task vector and the best λ lies near or above 1, where task arithmetic's sum of
# N vectors wants α ≈ 1/N.
TIES_GRID_TEXT = "0.8:2.5:0.1"


def default_grid_text(method: str, params: Mapping[str, Any] | None = None) -> str:
    """The coefficient grid ``merge --search-coef`` searches when ``--coef-grid`` is not given.

    ``ties`` and ``dare`` with ``combine=ties`` (a disjoint mean): :data:`TIES_GRID_TEXT`,
    the TIES reference's λ ∈ 0.8..2.5; every other method (sums of vectors: task arithmetic,
    magnitude, DARE with ``combine=sum``; the mean): :data:`DEFAULT_GRID_TEXT`, 0..1 in steps
    of 0.05, which covers task arithmetic's reference grid (0.05..1, Ilharco et al. 2023).
    """
    combine = (params or {}).get("combine", "sum")
    if method == "ties" or (method == "dare" and combine == "ties"):
        return TIES_GRID_TEXT
    return DEFAULT_GRID_TEXT


@dataclass(frozen=True)
class GridPoint:
    """One evaluated coefficient of a merge search.

    Attributes:
        coef: The coefficient α.
        accuracies: Validation accuracy per dataset.
        normalized: Accuracy / fine-tuned accuracy per dataset (None without references).
        score: The selection criterion: average normalized accuracy, or average accuracy.
    """

    coef: float
    accuracies: dict[str, float]
    normalized: dict[str, float] | None
    score: float


@dataclass(frozen=True)
class CoefSearch:
    """Result of :func:`search_coef`.

    Attributes:
        best: The chosen α.
        criterion: ``normalized`` or ``absolute`` (what ``score`` averages).
        points: Every grid point, in grid order.
    """

    best: float
    criterion: str
    points: tuple[GridPoint, ...]

    @property
    def best_point(self) -> GridPoint:
        """The grid point of the chosen α."""
        return next(p for p in self.points if p.coef == self.best)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"best_coef": self.best, "criterion": self.criterion,
                "grid": [asdict(p) for p in self.points]}


def normalize(accuracies: Accuracies, references: Accuracies) -> dict[str, float]:
    """``accuracy / reference`` per dataset (a zero reference gives ``nan``)."""
    return {name: (acc / references[name] if references[name] > 0 else math.nan)
            for name, acc in accuracies.items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def search_coef(evaluate: Evaluate, grid: Sequence[float], *,
                references: Accuracies | None = None) -> CoefSearch:
    """Pick the α that maximizes average normalized (or absolute) validation accuracy.

    Args:
        evaluate: ``evaluate(α)`` -> validation accuracy per dataset of the model
            ``base + α · merged``.
        grid: Coefficients to try (evaluated in order).
        references: Fine-tuned validation accuracy per dataset; every evaluated dataset
            needs one. None selects on the average accuracy.

    Returns:
        The search record.

    Raises:
        UsageError: an empty grid, or a dataset without a reference.
    """
    if not grid:
        raise UsageError("the coefficient grid is empty")
    points: list[GridPoint] = []
    for coef in grid:
        accuracies = dict(evaluate(float(coef)))
        if references is not None:
            lacking = sorted(set(accuracies) - set(references))
            if lacking:
                raise UsageError(f"no fine-tuned reference accuracy for {lacking}")
            normalized: dict[str, float] | None = normalize(accuracies, references)
            score = _mean(list(normalized.values()))  # type: ignore[union-attr]
        else:
            normalized = None
            score = _mean(list(accuracies.values()))
        points.append(GridPoint(float(coef), accuracies, normalized, score))
    best = max(points, key=lambda p: (-math.inf if math.isnan(p.score) else p.score))
    # max() keeps the first of equal scores: the earliest grid point wins ties.
    return CoefSearch(best.coef, "normalized" if references is not None else "absolute",
                      tuple(points))


@dataclass(frozen=True)
class NegationPoint:
    """One evaluated coefficient of a negation search.

    Attributes:
        coef: α of the model ``base - α · τ``.
        target: Target-task accuracy (to be minimised).
        control: Control-task accuracy.
        control_ratio: ``control / base control``.
        feasible: Whether ``control_ratio >= threshold``.
    """

    coef: float
    target: float
    control: float
    control_ratio: float
    feasible: bool


@dataclass(frozen=True)
class NegationSearch:
    """Result of :func:`search_negation`.

    Attributes:
        best: The chosen α, or None when no α of the grid keeps the control accuracy.
        threshold: Fraction of the base's control accuracy that must be kept.
        base_target: Target accuracy of the base model (α = 0).
        base_control: Control accuracy of the base model.
        points: Every grid point, in grid order.
    """

    best: float | None
    threshold: float
    base_target: float
    base_control: float
    points: tuple[NegationPoint, ...]

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"best_coef": self.best, "threshold": self.threshold,
                "base": {"target": self.base_target, "control": self.base_control},
                "grid": [asdict(p) for p in self.points]}


def search_negation(evaluate: Evaluate, grid: Sequence[float], *, target: str, control: str,
                    threshold: float = DEFAULT_THRESHOLD,
                    base: Accuracies | None = None) -> NegationSearch:
    """Pick the α of ``base - α·τ`` that forgets the target while keeping the control task.

    Args:
        evaluate: ``evaluate(α)`` -> accuracies (``target`` and ``control`` keys) of the
            model ``base - α · τ``.
        grid: Coefficients to try (α > 0 forgets; α = 0 is the base).
        target: Dataset name of the task to forget.
        control: Dataset name of the task to keep.
        threshold: Keep ``control >= threshold × base control`` (paper: 0.95).
        base: Accuracies of the base model; evaluated at α = 0 when None.

    Returns:
        The search record (``best`` is None when no α is feasible).

    Raises:
        UsageError: empty grid, threshold outside (0, 1], evaluator without the datasets.
    """
    if not grid:
        raise UsageError("the coefficient grid is empty")
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold}")
    base = dict(base) if base is not None else dict(evaluate(0.0))
    for name in (target, control):
        if name not in base:
            raise UsageError(f"the evaluator returned no accuracy for {name!r}")
    base_control = base[control]
    points = []
    for coef in grid:
        acc = evaluate(float(coef))
        ratio = acc[control] / base_control if base_control > 0 else math.inf
        points.append(NegationPoint(float(coef), acc[target], acc[control], ratio,
                                    ratio >= threshold - 1e-12))
    feasible = [p for p in points if p.feasible]
    best = None
    if feasible:
        lowest = min(p.target for p in feasible)
        best = max(p.coef for p in feasible if p.target == lowest)
    return NegationSearch(best, threshold, base[target], base_control, tuple(points))
