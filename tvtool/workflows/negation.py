"""Negation search for ``tvtool negate --search`` (task negation, Ilharco et al. 2023, §3).

* :func:`search_negation` -- pure, written against an ``evaluate(α) -> {dataset: accuracy}``
  callable of the model ``base - α · τ``: among the α whose accuracy on every control dataset
  stays at or above ``threshold`` × the base model's, the one with the lowest target accuracy
  (ties: the largest such α); the rule of ``learn-coeffs --objective negation``'s selection.
  It flags a target the base already classifies at chance (``target_at_chance``:
  nothing to forget, the choice is among noise) and a chosen α at an end of the grid
  (``at_grid_edge``; ``--coef-grid auto`` extends the grid instead, see :mod:`tvtool.grid`).
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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tvtool.commands.negate import NegateConfig, negate
from tvtool.data import dataset_identity, suite_datasets, with_suite
from tvtool.data.suites import task_identity
from tvtool.errors import TvtoolError, UsageError
from tvtool.evaluate import EvalSettings
from tvtool.grid import AutoGrid, edge_warning, extend_search, grid_edge
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
from tvtool.workflows.search_progress import search_progress

DEFAULT_NEGATION_GRID_TEXT = "0.05:1:0.05"
DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class NegationPoint:
    """One evaluated coefficient of a negation search.

    Attributes:
        coef: α of the model ``base - α · τ``.
        target: Target-task accuracy (to be minimised).
        control: Control accuracy: the mean over the control datasets.
        control_ratio: The smallest ``control / base control`` over the control datasets.
        feasible: Whether ``control_ratio >= threshold`` (every control dataset keeps it).
        controls: Accuracy per control dataset.
    """

    coef: float
    target: float
    control: float
    control_ratio: float
    feasible: bool
    controls: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NegationSearch:
    """Result of :func:`search_negation`.

    Attributes:
        best: The chosen α, or None when no α of the grid keeps the control accuracy.
        threshold: Fraction of the base's control accuracy that must be kept.
        base_target: Target accuracy of the base model (α = 0).
        base_control: Control accuracy of the base model (mean over the control datasets).
        points: Every grid point, in grid order.
        base_controls: The base's accuracy per control dataset.
        extensions: How many times ``--coef-grid auto`` extended the grid.
        chance: Chance accuracy on the target (1 / classes), when checked.
        chance_margin: Two binomial standard errors of a chance-level classifier.
    """

    best: float | None
    threshold: float
    base_target: float
    base_control: float
    points: tuple[NegationPoint, ...]
    base_controls: dict[str, float] = field(default_factory=dict)
    extensions: int = 0
    chance: float | None = None
    chance_margin: float = 0.0

    @property
    def grid_edge(self) -> str | None:
        """``low``/``high`` when the chosen α is an end of the grid searched, else None."""
        return grid_edge(self.best, [p.coef for p in self.points])

    @property
    def target_at_chance(self) -> bool:
        """Whether the base's target accuracy is already within chance (nothing to forget).

        Within chance: at most ``chance + chance_margin``, the margin being two binomial
        standard errors of a chance-level classifier on the examples evaluated.
        """
        return self.chance is not None and self.base_target <= self.chance + self.chance_margin

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"best_coef": self.best, "threshold": self.threshold,
                "at_grid_edge": self.grid_edge is not None, "grid_edge": self.grid_edge,
                "grid_extensions": self.extensions,
                "base": {"target": self.base_target, "control": self.base_control,
                         "controls": self.base_controls},
                "chance": self.chance, "chance_margin": self.chance_margin,
                "target_at_chance": self.target_at_chance,
                "grid": [asdict(p) for p in self.points]}


def control_names(control: str | Sequence[str]) -> tuple[str, ...]:
    """The control datasets as a tuple (one name, or several).

    Raises:
        UsageError: no control dataset, or one named twice.
    """
    names = tuple(dataset_identity(name) for name in
                  ((control,) if isinstance(control, str) else control))
    if not names:
        raise UsageError("the negation search needs a control dataset (--control)")
    if len(set(names)) != len(names):
        raise UsageError(f"a control dataset is named twice: {list(names)}")
    return names


def suite_controls(control: Sequence[str], suite: str, target: str,
                   log: Logger = _quiet) -> list[str]:
    """The control datasets of ``negate --search --suite N``.

    The ``--control`` datasets, then the suite's (:data:`tvtool.data.SUITES`) except the
    target's task: forgetting one task of a benchmark while keeping the others is the
    suite's use here. ``MNIST`` and ``MNISTVal`` are one task.

    Args:
        control: The ``--control`` values (may be empty).
        suite: ``8``, ``14`` or ``20``.
        target: The dataset to forget.
        log: Receives the note that the target's task was left out of the suite's controls.

    Raises:
        UsageError: an unknown suite, or a dataset named both ways (``--control mnist
            --suite 8``).
    """
    with_suite(control, suite)  # the checks: a known suite, no dataset named twice
    forgotten = task_identity(dataset_identity(target))
    added = [name for name in suite_datasets(suite) if task_identity(name) != forgotten]
    if len(added) < len(suite_datasets(suite)):
        log(f"suite {suite}: {forgotten} is the target; the suite's other {len(added)} "
            "datasets are controls")
    return [*control, *added]


def search_negation(evaluate: Evaluate, grid: Sequence[float] | AutoGrid, *, target: str,
                    control: str | Sequence[str], threshold: float = DEFAULT_THRESHOLD,
                    base: Accuracies | None = None, chance: float | None = None,
                    examples: int | None = None) -> NegationSearch:
    """Pick the α of ``base - α·τ`` that forgets the target while keeping the control tasks.

    Args:
        evaluate: ``evaluate(α)`` -> accuracies (the target's and every control's) of the
            model ``base - α · τ``.
        grid: Coefficients to try (α > 0 forgets; α = 0 is the base), each evaluated once, or
            an :class:`~tvtool.grid.AutoGrid` (``--coef-grid auto``).
        target: Dataset name of the task to forget.
        control: Dataset name(s) of the tasks to keep.
        threshold: Keep ``control >= threshold × base control`` on every control dataset
            (paper: 0.95).
        base: Accuracies of the base model; evaluated at α = 0 when None.
        chance: Chance accuracy on the target (1 / classes), to flag a target the base does
            not classify better than chance (``target_at_chance``); None: not checked.
        examples: Target examples evaluated; sets the margin of that check to two binomial
            standard errors of a chance-level classifier (None: no margin).

    Returns:
        The search record (``best`` is None when no α is feasible).

    Raises:
        UsageError: empty grid, threshold outside (0, 1], evaluator without the datasets.
    """
    controls = control_names(control)
    if not isinstance(grid, AutoGrid) and not grid:
        raise UsageError("the coefficient grid is empty")
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"--control-threshold must be in (0, 1], got {threshold}")
    base = dict(base) if base is not None else dict(evaluate(0.0))
    for name in (target, *controls):
        if name not in base:
            raise UsageError(f"the evaluator returned no accuracy for {name!r}")
    measured: dict[float, Accuracies] = {}

    def measure(coef: float) -> Accuracies:
        if coef not in measured:
            measured[coef] = evaluate(coef)
        return measured[coef]

    found, extensions = extend_search(
        grid, lambda values: _search_once(measure, values, target, controls, threshold, base),
        lambda r: r.best)
    margin = 0.0
    if chance is not None and examples:
        margin = 2.0 * math.sqrt(chance * (1.0 - chance) / examples)
    return replace(found, extensions=extensions, chance=chance, chance_margin=margin)


def _search_once(evaluate: Evaluate, grid: Sequence[float], target: str,
                 controls: Sequence[str], threshold: float,
                 base: Accuracies) -> NegationSearch:
    points = []
    for coef in grid:
        acc = evaluate(float(coef))
        ratio = min(acc[name] / base[name] if base[name] > 0 else math.inf
                    for name in controls)
        points.append(NegationPoint(float(coef), acc[target], _mean(acc, controls), ratio,
                                    ratio >= threshold - 1e-12,
                                    {name: acc[name] for name in controls}))
    feasible = [p for p in points if p.feasible]
    best = None
    if feasible:
        lowest = min(p.target for p in feasible)
        best = max(p.coef for p in feasible if p.target == lowest)
    return NegationSearch(best, threshold, base[target], _mean(base, controls), tuple(points),
                          {name: base[name] for name in controls})


def _mean(accuracies: Accuracies, names: Sequence[str]) -> float:
    return sum(accuracies[name] for name in names) / len(names)


@dataclass(frozen=True)
class NegateSearchReport:
    """What ``tvtool negate --search`` measured and chose.

    Attributes:
        search: The validation search.
        target: Dataset to forget.
        controls: Datasets to keep.
        test: Test accuracies (``base`` and ``negated`` at the chosen α).
        output: The negated vector written.
    """

    search: NegationSearch
    target: str
    controls: tuple[str, ...]
    test: dict[str, dict[str, float]]
    output: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready report (version 2: ``controls``, a list, replaced ``control``)."""
        return {"report": "negate-search", "report_version": 2, "output": self.output,
                "target": self.target, "controls": list(self.controls),
                "best_coef": self.search.best,
                "at_grid_edge": self.search.grid_edge is not None,
                "target_at_chance": self.search.target_at_chance,
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


def measure_negation(settings: EvalSettings, vector: str, grid: Sequence[float] | AutoGrid, *,
                     target: str, control: str | Sequence[str],
                     threshold: float = DEFAULT_THRESHOLD, fallback: float | None = None,
                     log: Logger = _quiet, progress: Progress = None) -> NegationMeasurement:
    """Search α on the validation splits of ``base - α · vector``, then measure the test splits.

    Args:
        settings: How to evaluate.
        vector: Task-vector file of the task to forget (read several times: no stdin).
        grid: Coefficients α > 0 to try, or an :class:`~tvtool.grid.AutoGrid`.
        target: Dataset to forget.
        control: Dataset(s) whose accuracy must stay >= ``threshold`` × the base's.
        threshold: Fraction of the base's control accuracy to keep.
        fallback: The α to measure when no α of the grid is feasible; None refuses instead.
        log: Receives progress notes.
        progress: Progress-bar factory.

    Returns:
        The search and the test accuracies of the base and of the negated model.

    Raises:
        TvtoolError: no α of the grid keeps the control accuracy and no ``fallback``.
    """
    target, controls = dataset_identity(target), control_names(control)
    with Evaluator(settings, [vector], [target, *controls], log=log,
                   progress=progress) as evaluator:
        base_val = evaluator.accuracies([0.0], "val")
        values = grid.start if isinstance(grid, AutoGrid) else grid
        log(f"searching α over {len(values)} values on the validation splits"
            + (" (extended past an end where the best α sits)"
               if isinstance(grid, AutoGrid) else ""))
        opened = evaluator.opened("val")[target]

        def feasible_target(accuracies: Accuracies) -> float | None:
            # The running best: the lowest target accuracy whose controls stay above the
            # threshold (the search's own rule, _search_once).
            for name in controls:
                if base_val[name] > 0 and \
                        accuracies[name] / base_val[name] < threshold - 1e-12:
                    return None
            return accuracies[target]

        with search_progress(progress, "negation search", len(values), feasible_target,
                             lower_is_better=True, what=f"on {target}") as reported:
            search = search_negation(reported(lambda a: evaluator.accuracies([-a], "val")),
                                     grid, target=target, control=controls,
                                     threshold=threshold, base=base_val,
                                     chance=1.0 / opened.num_classes, examples=opened.size)
        _warn(search, target, grid, log)
        coef = search.best if search.best is not None else fallback
        if coef is None:
            raise TvtoolError(
                f"no coefficient of the grid keeps {', '.join(controls)} accuracy at "
                f"{threshold:.0%} of the base's; nothing written",
                hint="try smaller coefficients or a lower --control-threshold")
        test = {"base": evaluator.accuracies([0.0], "test"),
                "negated": evaluator.accuracies([-coef], "test")}
    return NegationMeasurement(search, coef, test)


def _warn(search: NegationSearch, target: str, grid: Sequence[float] | AutoGrid,
          log: Logger) -> None:
    """Say on the log when the search chose among noise or at an end of its grid."""
    if search.target_at_chance:
        assert search.chance is not None
        log(f"warning: the base model is already at chance on {target} (validation accuracy "
            f"{search.base_target:.1%}; chance {search.chance:.1%}, within "
            f"{search.chance_margin:.1%}): there is nothing to forget, and the chosen α is "
            "picked among differences of noise")
    edge = search.grid_edge
    if edge is not None and search.best is not None:
        log(edge_warning("α", search.best, edge, [p.coef for p in search.points],
                         extensions=search.extensions,
                         auto=grid if isinstance(grid, AutoGrid) else None))


def search_negate(vector: str, output: str, settings: EvalSettings,
                  grid: Sequence[float] | AutoGrid, *,
                  control: str | Sequence[str], target: str | None = None,
                  threshold: float = DEFAULT_THRESHOLD, log: Logger = _quiet,
                  progress: Progress = None, suite: str | None = None) -> NegateSearchReport:
    """Search the negation coefficient on validation splits, then write ``-α · vector``.

    Args:
        vector: Task-vector file of the task to forget.
        output: Output path (or ``-``).
        settings: How to evaluate.
        grid: Coefficients α > 0 to try, or an :class:`~tvtool.grid.AutoGrid`.
        control: Dataset(s) whose accuracy must stay >= ``threshold`` × the base's.
        target: Dataset to forget (default: the vector's recorded dataset).
        threshold: Fraction of the base's control accuracy to keep.
        log: Receives progress notes.
        progress: Progress-bar factory.
        suite: ``8``, ``14`` or ``20``: the suite's datasets other than the target's task
            are controls too (:func:`suite_controls`).

    Returns:
        The report; the negated vector is written to ``output``.

    Raises:
        UsageError: stdin input, no target dataset, the target's task among the controls
            (``MNISTVal`` and ``MNIST`` are one task), bad grid or suite.
        TvtoolError: no α of the grid keeps the control accuracy (nothing is written).
    """
    if vector == "-":
        raise UsageError("--search reads the vector several times; stdin ('-') cannot be the "
                         "input")
    if any(a <= 0 for a in (grid.start if isinstance(grid, AutoGrid) else grid)):
        raise UsageError("negation coefficients must be positive", hint="e.g. 0.05:1:0.05")
    check_output(output, [vector])
    if target is None:
        target = recorded_dataset(vector)
        if not target:
            raise UsageError(f"{vector!r} records no dataset", hint="pass --target DATASET")
        check_recorded_dataset(vector, target, "pass --target DATASET")
    target = dataset_identity(target)
    if suite is not None:
        control = suite_controls([control] if isinstance(control, str) else list(control),
                                 suite, target, log)
    controls = control_names(control)
    same = [name for name in controls if task_identity(name) == task_identity(target)]
    if same:
        raise UsageError(f"{target} is both the target and a control dataset"
                         + (f" ({same[0]} is the same task)" if same[0] != target else ""))
    measured = measure_negation(settings, vector, grid, target=target, control=controls,
                                threshold=threshold, log=log, progress=progress)
    log(f"best α = {measured.coef:g}; writing the negated vector")
    record = {"split": "val", "target": target, "controls": list(controls), "suite": suite,
              **measured.search.as_json(), "limit": settings.limit, "seed": settings.seed}
    negate(NegateConfig(vector=vector, output=output, coef=measured.coef), search=record)
    return NegateSearchReport(measured.search, target, controls, measured.test, output)
