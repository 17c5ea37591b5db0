"""Negation search for ``tvtool negate --search`` (task negation, Ilharco et al. 2023, §3).

* :func:`search_negation` -- pure, written against an ``evaluate(α) -> {dataset: accuracy}``
  callable of the model ``base - α · τ``: among the α whose control accuracy stays at or above
  ``threshold`` × the base model's, the one with the lowest target accuracy (ties: the largest
  such α).
* :func:`measure_negation` -- that search on a real
  :class:`~tvtool.workflows.evaluator.Evaluator` over the target and control datasets, plus
  the test accuracies at the chosen α (the demo uses it directly).
* :func:`search_negate` -- the command's workflow: checks, :func:`measure_negation`, then
  ``tvtool negate --coef α`` (:func:`tvtool.commands.negate.negate`).

The file command ``tvtool negate --coef`` itself is :func:`tvtool.commands.negate.negate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tvtool.commands.negate import NegateConfig, negate
from tvtool.data import dataset_identity
from tvtool.errors import TvtoolError, UsageError
from tvtool.evaluate import EvalSettings
from tvtool.io import check_output
from tvtool.types import Logger
from tvtool.types import quiet as _quiet
from tvtool.workflows.evaluator import (
    Accuracies,
    Evaluate,
    Evaluator,
    Progress,
    check_recorded_dataset,
    recorded_dataset,
)

DEFAULT_NEGATION_GRID_TEXT = "0.05:1:0.05"
DEFAULT_THRESHOLD = 0.95


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


@dataclass(frozen=True)
class NegateSearchReport:
    """What ``tvtool negate --search`` measured and chose.

    Attributes:
        search: The validation search.
        target: Dataset to forget.
        control: Dataset to keep.
        test: Test accuracies (``base`` and ``negated`` at the chosen α).
        output: The negated vector written.
    """

    search: NegationSearch
    target: str
    control: str
    test: dict[str, dict[str, float]]
    output: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready report."""
        return {"report": "negate-search", "output": self.output, "target": self.target,
                "control": self.control, "best_coef": self.search.best,
                "val": self.search.as_json(), "test": self.test}


@dataclass(frozen=True)
class NegationMeasurement:
    """What :func:`measure_negation` measured.

    Attributes:
        search: The validation search.
        coef: The α the test accuracies were measured at: the search's choice, or the
            fallback when no α of the grid keeps the control accuracy.
        test: Test accuracies per dataset: ``base`` (α = 0) and ``negated`` (at ``coef``).
    """

    search: NegationSearch
    coef: float
    test: dict[str, dict[str, float]]


def measure_negation(settings: EvalSettings, vector: str, grid: Sequence[float], *,
                     target: str, control: str, threshold: float = DEFAULT_THRESHOLD,
                     fallback: float | None = None, log: Logger = _quiet,
                     progress: Progress = None) -> NegationMeasurement:
    """Search α on the validation splits of ``base - α · vector``, then measure the test splits.

    Args:
        settings: How to evaluate.
        vector: Task-vector file of the task to forget (read several times: no stdin).
        grid: Coefficients α > 0 to try.
        target: Dataset to forget.
        control: Dataset whose accuracy must stay >= ``threshold`` × the base's.
        threshold: Fraction of the base's control accuracy to keep.
        fallback: The α to measure when no α of the grid is feasible; None refuses instead.
        log: Receives progress notes.
        progress: Progress-bar factory.

    Returns:
        The search and the test accuracies of the base and of the negated model.

    Raises:
        TvtoolError: no α of the grid keeps the control accuracy and no ``fallback``.
    """
    target, control = dataset_identity(target), dataset_identity(control)
    with Evaluator(settings, [vector], [target, control], log=log,
                   progress=progress) as evaluator:
        base_val = evaluator.accuracies([0.0], "val")
        log(f"searching α over {len(grid)} values on the validation splits")
        search = search_negation(lambda a: evaluator.accuracies([-a], "val"), grid,
                                 target=target, control=control, threshold=threshold,
                                 base=base_val)
        coef = search.best if search.best is not None else fallback
        if coef is None:
            raise TvtoolError(
                f"no coefficient of the grid keeps {control} accuracy at {threshold:.0%} of the "
                "base's; nothing written", hint="try smaller coefficients or a lower --threshold")
        test = {"base": evaluator.accuracies([0.0], "test"),
                "negated": evaluator.accuracies([-coef], "test")}
    return NegationMeasurement(search, coef, test)


def search_negate(vector: str, output: str, settings: EvalSettings, grid: Sequence[float], *,
                  control: str, target: str | None = None,
                  threshold: float = DEFAULT_THRESHOLD, log: Logger = _quiet,
                  progress: Progress = None) -> NegateSearchReport:
    """Search the negation coefficient on validation splits, then write ``-α · vector``.

    Args:
        vector: Task-vector file of the task to forget.
        output: Output path (or ``-``).
        settings: How to evaluate.
        grid: Coefficients α > 0 to try.
        control: Dataset whose accuracy must stay >= ``threshold`` × the base's.
        target: Dataset to forget (default: the vector's recorded dataset).
        threshold: Fraction of the base's control accuracy to keep.
        log: Receives progress notes.
        progress: Progress-bar factory.

    Returns:
        The report; the negated vector is written to ``output``.

    Raises:
        UsageError: stdin input, no target dataset, target equal to control, bad grid.
        TvtoolError: no α of the grid keeps the control accuracy (nothing is written).
    """
    if vector == "-":
        raise UsageError("--search reads the vector several times; stdin ('-') cannot be the "
                         "input")
    if any(a <= 0 for a in grid):
        raise UsageError("negation coefficients must be positive", hint="e.g. 0.05:1:0.05")
    check_output(output, [vector])
    if target is None:
        target = recorded_dataset(vector)
        if not target:
            raise UsageError(f"{vector!r} records no dataset", hint="pass --target DATASET")
        check_recorded_dataset(vector, target, "pass --target DATASET")
    if dataset_identity(target) == dataset_identity(control):
        raise UsageError("the target and control datasets are the same")
    target, control = dataset_identity(target), dataset_identity(control)
    measured = measure_negation(settings, vector, grid, target=target, control=control,
                                threshold=threshold, log=log, progress=progress)
    log(f"best α = {measured.coef:g}; writing the negated vector")
    negate(NegateConfig(vector=vector, output=output, coef=measured.coef))
    return NegateSearchReport(measured.search, target, control, measured.test, output)
