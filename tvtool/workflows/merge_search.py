"""Coefficient search for ``tvtool merge --search-coef`` (task addition, Ilharco et al. 2023, §4).

* :func:`search_coef` -- pure, written against an ``evaluate(α) -> {dataset: accuracy}``
  callable (so tested with fake evaluators): evaluate the merged vector at each α of a grid on
  the validation splits of the vectors' datasets and keep the α with the best *average
  normalized accuracy* (accuracy of the merged model / accuracy of the model fine-tuned on that
  dataset); without fine-tuned references, the best average accuracy. Ties in the score go to
  the earliest grid point (the smallest α for an increasing grid), so a search is deterministic.
  A chosen α at an end of the grid is marked (``at_grid_edge``); with ``--coef-grid auto``
  (:class:`tvtool.grid.AutoGrid`) the grid is extended past that end instead, within a bound.
* :func:`search_merge` -- the command's workflow: one :class:`~tvtool.workflows.evaluator.
  Evaluator` over the N input vectors plus the merge at α = 1 (every method here is linear in a
  coefficient shared by all vectors, so ``merge(α) = α · merge(1)``); fine-tuned and zero-shot
  accuracies come from the same model at one-hot and zero coefficients; the chosen α is then
  used for an ordinary merge, so the output's tensors equal ``tvtool merge --coef α``'s byte
  for byte; its provenance adds the search (grid, validation scores, datasets).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from tvtool.data import dataset_identity, match_suite
from tvtool.errors import UsageError
from tvtool.evaluate import EvalSettings
from tvtool.grid import AutoGrid, edge_warning, extend_search, grid_edge
from tvtool.io import check_output, scratch_directory
from tvtool.limits import short_list
from tvtool.merge.config import MergeConfig
from tvtool.merge.engine import MergeResult, merge, open_merge
from tvtool.merge.registry import get_method
from tvtool.types import Logger
from tvtool.types import quiet as _quiet
from tvtool.workflows.evaluator import (
    Accuracies,
    Evaluate,
    Evaluator,
    Progress,
    check_recorded_dataset,
)
from tvtool.workflows.search_progress import search_progress


def default_grid_text(method: str, params: Mapping[str, Any] | None = None) -> str:
    """The coefficient grid ``merge --search-coef`` searches when ``--coef-grid`` is not given.

    Each method declares it (``search_grid`` of its registry entry, for its parameters): a sum
    of vectors (task arithmetic, magnitude, DARE with ``combine=sum``, the mean) searches
    :data:`tvtool.merge.method.SUM_GRID`; a disjoint mean (TIES, DARE with ``combine=ties``)
    :data:`tvtool.merge.method.DISJOINT_MEAN_GRID`.
    """
    entry = get_method(method)
    return entry.search_grid(entry.make_params(dict(params or {})))


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
    extensions: int = 0

    @property
    def best_point(self) -> GridPoint:
        """The grid point of the chosen α."""
        return next(p for p in self.points if p.coef == self.best)

    @property
    def grid_edge(self) -> str | None:
        """``low``/``high`` when the chosen α is an end of the grid searched, else None."""
        return grid_edge(self.best, [p.coef for p in self.points])

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"best_coef": self.best, "criterion": self.criterion,
                "at_grid_edge": self.grid_edge is not None, "grid_edge": self.grid_edge,
                "grid_extensions": self.extensions,
                "grid": [asdict(p) for p in self.points]}


def normalize(accuracies: Accuracies, references: Accuracies) -> dict[str, float]:
    """``accuracy / reference`` per dataset (a zero reference gives ``nan``)."""
    return {name: (acc / references[name] if references[name] > 0 else math.nan)
            for name, acc in accuracies.items()}


def average(values: Iterable[float]) -> float:
    """The mean of ``values`` (``nan`` when there are none)."""
    listed = list(values)
    return sum(listed) / len(listed) if listed else math.nan


def search_coef(evaluate: Evaluate, grid: Sequence[float] | AutoGrid, *,
                references: Accuracies | None = None) -> CoefSearch:
    """Pick the α that maximizes average normalized (or absolute) validation accuracy.

    Args:
        evaluate: ``evaluate(α)`` -> validation accuracy per dataset of the model
            ``base + α · merged``.
        grid: Coefficients to try (evaluated in order, each once), or an
            :class:`~tvtool.grid.AutoGrid` (``--coef-grid auto``): searched in increasing order
            and extended past an end where the best α sits (:func:`tvtool.grid.extend_search`).
        references: Fine-tuned validation accuracy per dataset; every evaluated dataset
            needs one. None selects on the average accuracy.

    Returns:
        The search record (``grid_edge`` says whether the chosen α is an end of the grid).

    Raises:
        UsageError: an empty grid, or a dataset without a reference.
    """
    if not isinstance(grid, AutoGrid) and not grid:
        raise UsageError("the coefficient grid is empty")
    measured: dict[float, dict[str, float]] = {}

    def measure(coef: float) -> dict[str, float]:
        if coef not in measured:
            measured[coef] = dict(evaluate(coef))
        return measured[coef]

    found, extensions = extend_search(
        grid, lambda values: _search_once(measure, values, references), lambda r: r.best)
    return replace(found, extensions=extensions)


def _search_once(evaluate: Evaluate, grid: Sequence[float],
                 references: Accuracies | None) -> CoefSearch:
    points: list[GridPoint] = []
    for coef in grid:
        accuracies = dict(evaluate(float(coef)))
        if references is not None:
            lacking = sorted(set(accuracies) - set(references))
            if lacking:
                raise UsageError(f"no fine-tuned reference accuracy for {lacking}")
            normalized: dict[str, float] | None = normalize(accuracies, references)
            score = average(normalized.values())  # type: ignore[union-attr]
        else:
            normalized = None
            score = average(accuracies.values())
        points.append(GridPoint(float(coef), accuracies, normalized, score))
    best = max(points, key=lambda p: (-math.inf if math.isnan(p.score) else p.score))
    # max() keeps the first of equal scores: the earliest grid point wins ties.
    return CoefSearch(best.coef, "normalized" if references is not None else "absolute",
                      tuple(points))


@dataclass(frozen=True)
class MergeSearchReport:
    """What ``tvtool merge --search-coef`` measured and chose.

    Attributes:
        search: The validation search.
        datasets: Dataset of each input vector.
        zero_shot: Base accuracy per split and dataset.
        finetuned: Accuracy of base + τ_t on dataset t, per split.
        test: Test accuracy of the merged model at the chosen α.
        result: The merge written with the chosen α.
    """

    search: CoefSearch
    datasets: tuple[str, ...]
    zero_shot: dict[str, dict[str, float]]
    finetuned: dict[str, dict[str, float]]
    test: dict[str, float]
    result: MergeResult

    def as_json(self) -> dict[str, Any]:
        """JSON-ready report (``--json`` / ``--search-report``)."""
        test_norm = normalize(self.test, self.finetuned["test"])
        return {
            "report": "merge-search",
            "report_version": 1,
            "output": self.result.output,
            "method": self.result.details.get("method"),
            "best_coef": self.search.best,
            "at_grid_edge": self.search.grid_edge is not None,
            "grid_edge": self.search.grid_edge,
            "grid_extensions": self.search.extensions,
            "criterion": self.search.criterion,
            "datasets": list(self.datasets),
            "zero_shot": self.zero_shot,
            "finetuned": self.finetuned,
            "val": {"grid": self.search.as_json()["grid"]},
            "test": {"accuracy": self.test, "normalized_accuracy": test_norm,
                     "average_accuracy": average(self.test.values()),
                     "average_normalized_accuracy": average(test_norm.values())},
            "merge": self.result.as_json(),
        }


def vector_datasets(config: MergeConfig, datasets: Sequence[str] | None,
                    suite: str | None = None) -> list[str]:
    """The dataset of each input vector: given explicitly, or read from their metadata.

    Args:
        config: The merge.
        datasets: One dataset per vector, in order (``--dataset``), or None.
        suite: A named suite (``--suite``): the vectors' recorded datasets must be its
            datasets, one vector each, in any order (:func:`tvtool.data.match_suite`).

    Raises:
        UsageError: a vector without a recorded dataset, counts that do not fit, two
            vectors of one dataset (its fine-tuned reference would be ambiguous), both
            ``datasets`` and ``suite``, or vectors that are not the suite's.
    """
    if datasets and suite is not None:
        raise UsageError("give --suite or --dataset, not both",
                         hint="--suite matches the vectors by the datasets they record")
    if datasets:
        if len(datasets) != len(config.vectors):
            raise UsageError(f"{len(datasets)} --dataset for {len(config.vectors)} vectors",
                             hint="give one --dataset per vector, in order")
        names = list(datasets)
    else:
        opened = open_merge(replace(config, output="-"))
        try:
            recorded = [meta.dataset or None for meta in opened.metas]
        finally:
            opened.close()
        for path, name in zip(config.vectors, recorded, strict=True):
            if name:
                check_recorded_dataset(path, name, "pass one --dataset per vector, in order")
            elif suite is None:
                raise UsageError(f"{path!r} records no dataset",
                                 hint="pass one --dataset per vector, in order")
        names = (match_suite(recorded, suite, config.vectors) if suite is not None
                 else [name for name in recorded if name])
    # One spelling per dataset: 'mnist' and 'MNIST', or './data' and its absolute path, are
    # one dataset, and the evaluator reports each under that spelling.
    names = [dataset_identity(name) for name in names]
    if len(set(names)) != len(names):
        raise UsageError(f"two vectors share a dataset ({short_list(names, 4)}); the search "
                         "needs one vector per dataset")
    return names


def search_merge(config: MergeConfig, settings: EvalSettings,
                 grid: Sequence[float] | AutoGrid, *,
                 datasets: Sequence[str] | None = None, suite: str | None = None,
                 log: Logger = _quiet, progress: Progress = None) -> MergeSearchReport:
    """Search the merge coefficient on validation splits, merge with it, report test accuracy.

    Args:
        config: The merge (its ``coefs`` are ignored: α is searched; ``coefs_file`` refused).
        settings: How to evaluate.
        grid: Coefficients to try, or an :class:`~tvtool.grid.AutoGrid`.
        datasets: Dataset of each vector (default: from their metadata).
        suite: Check that the vectors are one per dataset of this suite (see
            :func:`vector_datasets`).
        log: Receives progress notes.
        progress: Progress-bar factory for the evaluations.

    Returns:
        The report; the merged vector at the chosen α is written to ``config.output``.

    Raises:
        UsageError: ``coefs_file`` or stdin inputs, missing datasets, bad settings.
        InvalidInputError: as :func:`tvtool.merge.merge` and :func:`tvtool.evaluate.evaluate`.
    """
    check_searchable(config)
    # Refuse a bad -o now, not after the (long) search.
    check_output(config.output, list(config.vectors))
    measured = measure_merges([config], [grid], settings, datasets=datasets, suite=suite,
                              log=log, progress=progress)
    search, names = measured.searches[0], measured.datasets
    result = merge_searched(config, search, names, settings, log)
    return MergeSearchReport(search, tuple(names), measured.zero_shot, measured.finetuned,
                             measured.tests[0], result)


def merge_searched(config: MergeConfig, search: CoefSearch, datasets: Sequence[str],
                   settings: EvalSettings, log: Logger = _quiet) -> MergeResult:
    """Write ``config``'s merge at the coefficient a search chose, recording the search.

    Args:
        config: The merge (its ``coefs`` are replaced by the search's α).
        search: The validation search of its coefficient.
        datasets: The datasets the search evaluated.
        settings: The evaluation settings of the search (its subset and seed are recorded).
        log: Receives progress notes.
    """
    log(f"best α = {search.best:g}; writing the merge at that coefficient")
    # The output records how its coefficient was chosen (grid, scores, datasets), not only α.
    record = {"split": "val", "datasets": list(datasets), **search.as_json(),
              "limit": settings.limit, "seed": settings.seed}
    return merge(replace(config, coefs=(search.best,)), log, search=record)


def check_searchable(config: MergeConfig) -> None:
    """Refuse a merge whose coefficient cannot be searched.

    Raises:
        UsageError: a coefficients file (the search chooses one α for all vectors), or a
            vector on stdin (the search reads the vectors several times).
    """
    if config.coefs_file is not None:
        raise UsageError("--search-coef searches one coefficient for all vectors; it cannot "
                         "be combined with --coefs")
    if "-" in config.vectors:
        raise UsageError("--search-coef reads the vectors several times; stdin ('-') cannot "
                         "be an input")


@dataclass(frozen=True)
class MergeMeasurement:
    """What :func:`measure_merges` measured for several merges of the same vectors.

    Attributes:
        datasets: Dataset of each input vector.
        zero_shot: Base accuracy per split and dataset.
        finetuned: Accuracy of base + τ_t on dataset t, per split.
        searches: Per merge, the validation search of its coefficient.
        tests: Per merge, the test accuracy per dataset at its chosen coefficient.
    """

    datasets: tuple[str, ...]
    zero_shot: dict[str, dict[str, float]]
    finetuned: dict[str, dict[str, float]]
    searches: tuple[CoefSearch, ...]
    tests: tuple[dict[str, float], ...]


def measure_merges(configs: Sequence[MergeConfig], grids: Sequence[Sequence[float] | AutoGrid],
                   settings: EvalSettings, *, datasets: Sequence[str] | None = None,
                   suite: str | None = None, log: Logger = _quiet,
                   progress: Progress = None) -> MergeMeasurement:
    """Search the coefficient of each merge on the validation splits and measure its test split.

    Every merge (one config per method and parameters: ``merge --search-coef`` has one, a
    config's ``sweep:`` several) is merged once at coefficient 1 into a scratch file; one
    :class:`~tvtool.workflows.evaluator.Evaluator` then holds the N input vectors and those
    merges, so the zero-shot and fine-tuned references are measured once for all of them.
    Nothing is written besides the scratch files (removed).

    Args:
        configs: Merges of the same vectors (their ``coefs`` are ignored: α is searched).
        grids: Per merge, the coefficients to try, or an :class:`~tvtool.grid.AutoGrid`.
        settings: How to evaluate.
        datasets: Dataset of each vector (default: from their metadata).
        suite: Check that the vectors are one per dataset of this suite.
        log: Receives progress notes.
        progress: Progress-bar factory for the evaluations.

    Raises:
        UsageError: merges of different vectors, a coefficients file or stdin input, missing
            datasets, bad settings.
        InvalidInputError: as :func:`tvtool.merge.merge` and :func:`tvtool.evaluate.evaluate`.
    """
    if not configs or len(grids) != len(configs):
        raise UsageError("one grid per merge is needed")
    for config in configs:
        check_searchable(config)
        if config.vectors != configs[0].vectors:
            raise UsageError("the merges of one measurement must merge the same vectors")
    first = configs[0]
    names = vector_datasets(first, datasets, suite)
    count, merges = len(first.vectors), len(configs)
    with scratch_directory(first.output, prefix=".tvtool-search-") as scratch:
        units = []
        for index, config in enumerate(configs):
            unit_path = str(scratch / f"merged-{index}-at-1.safetensors")
            log(f"merging at coefficient 1 ({config.method}) for the search")
            merge(replace(config, coefs=(1.0,), output=unit_path), log)
            units.append(unit_path)
        with Evaluator(settings, [*first.vectors, *units], names, log=log,
                       progress=progress) as evaluator:
            zero = [0.0] * (count + merges)
            zero_shot = {split: evaluator.accuracies(zero, split) for split in ("val", "test")}
            finetuned: dict[str, dict[str, float]] = {"val": {}, "test": {}}
            for index, name in enumerate(names):
                onehot = [1.0 if i == index else 0.0 for i in range(count + merges)]
                for split in ("val", "test"):
                    finetuned[split][name] = evaluator.accuracies(onehot, split, [name])[name]
            searches, tests = [], []
            references = finetuned["val"]

            def normalized(accuracies: Accuracies) -> float | None:
                if set(accuracies) - set(references):
                    return None
                return average(normalize(accuracies, references).values())

            for index, (config, grid) in enumerate(zip(configs, grids, strict=True)):

                def coefficients(alpha: float, index: int = index) -> list[float]:
                    return [0.0] * count + [alpha if i == index else 0.0 for i in range(merges)]

                def on_val(alpha: float, index: int = index) -> Accuracies:
                    return evaluator.accuracies(coefficients(alpha, index), "val")

                values = grid.start if isinstance(grid, AutoGrid) else grid
                log(f"searching α of {config.method} over {len(values)} values on the "
                    "validation splits" + (" (extended past an end where the best α sits)"
                                           if isinstance(grid, AutoGrid) else ""))
                with search_progress(progress, f"merge search ({config.method})", len(values),
                                     normalized, what="normalized") as reported:
                    search = search_coef(reported(on_val), grid, references=references)
                if search.grid_edge is not None:
                    log(edge_warning("α", search.best, search.grid_edge,
                                     [p.coef for p in search.points],
                                     extensions=search.extensions,
                                     auto=grid if isinstance(grid, AutoGrid) else None))
                searches.append(search)
                tests.append(evaluator.accuracies(coefficients(search.best), "test"))
    return MergeMeasurement(tuple(names), zero_shot, finetuned, tuple(searches), tuple(tests))
