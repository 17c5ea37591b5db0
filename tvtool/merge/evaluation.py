"""The real evaluator behind the coefficient searches, and the search commands' workflows.

:class:`Evaluator` wraps :mod:`tvtool.evaluate` into the ``evaluate(coef) -> {dataset: acc}``
callables of :mod:`tvtool.merge.search`: the base model, the vectors, the splits and the
zero-shot heads are opened once, and each call only rebuilds the weights at new coefficients.

:func:`search_merge` (``tvtool merge --search-coef``): one evaluator over the N input vectors
plus the merge at α = 1 (every method here is linear in a coefficient shared by all vectors,
so ``merge(α) = α · merge(1)``); fine-tuned and zero-shot accuracies come from the same model
at one-hot and zero coefficients; the chosen α is then used for an ordinary merge, so the
output equals ``tvtool merge --coef α`` byte for byte.

:func:`search_negate` (``tvtool negate --search``): the model ``base - α · τ`` on the target
and control datasets, then ``tvtool negate --coef α``.

tvtool.evaluate (and so open_clip) is imported only when an evaluator is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tvtool.errors import InvalidInputError, TvtoolError, UsageError
from tvtool.io import scratch_directory
from tvtool.merge.config import MergeConfig
from tvtool.merge.engine import MergeResult, merge, open_merge
from tvtool.merge.search import (
    DEFAULT_THRESHOLD,
    CoefSearch,
    NegationSearch,
    normalize,
    search_coef,
    search_negation,
)
from tvtool.types import Logger
from tvtool.types import quiet as _quiet

if TYPE_CHECKING:
    from tvtool.evaluate.linear_cache import LinearizedFeatures

Progress = Any


@dataclass(frozen=True)
class EvalSettings:
    """How the searches evaluate models (the ``tvtool eval`` settings they share).

    Attributes:
        base: Model reference of the pre-trained base.
        data_root: Root of the standard datasets.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        limit: Evaluate a seeded random subset of this many examples per split.
        seed: Seed of the splits and subsets.
        workers: DataLoader worker processes.
        allow_base_mismatch: Accept vectors recorded against another base.
        cache_heads: Use the on-disk zero-shot head cache.
    """

    base: str
    data_root: str | None = None
    batch_size: int = 128
    device: str = "auto"
    precision: str = "auto"
    limit: int | None = None
    seed: int = 0
    workers: int = 0
    allow_base_mismatch: bool = False
    cache_heads: bool = True


class Evaluator:
    """Accuracy of ``base + Σ coef_i · vector_i`` on fixed datasets, at any coefficients.

    Linearized vectors are evaluated from cached encoder outputs
    (:class:`tvtool.evaluate.linear_cache.LinearizedFeatures`): their model's features are
    ``f0 + Σ coef_i · J τ_i``, so each split costs one primal pass plus one JVP per vector
    with a non-zero coefficient, whatever the number of coefficients evaluated. Ordinary
    vectors rebuild the weights and run the encoder at every call.

    Args:
        settings: Evaluation settings.
        vectors: Task-vector files.
        datasets: Dataset names.
        splits: Splits to open (``val``, ``test``).
        log: Receives notes.
        progress: Progress-bar factory (see :data:`tvtool.evaluate.ProgressFactory`).
        linear_cache: Use the cached encoder outputs for linearized vectors; ``False``
            evaluates every call with its own encoder passes (the reference of the tests and
            the benchmark; same accuracies up to float rounding).
    """

    def __init__(self, settings: EvalSettings, vectors: Sequence[str], datasets: Sequence[str],
                 splits: Sequence[str] = ("val", "test"), log: Logger = _quiet,
                 progress: Progress = None, linear_cache: bool = True) -> None:
        from tvtool.device import check_precision, resolve_device
        from tvtool.evaluate import build_heads, no_progress, open_eval_data, open_eval_model

        check_precision(settings.precision)
        if settings.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {settings.batch_size}")
        self.settings = settings
        self.datasets = list(datasets)
        self._progress = progress or no_progress
        device = resolve_device(settings.device)
        self._model = open_eval_model(settings.base, vectors, device=device,
                                      allow_base_mismatch=settings.allow_base_mismatch)
        try:
            for note in self._model.notes:
                log(note)
            self._data = {split: [open_eval_data(name, split,
                                                 self._model.bundle.preprocess_eval,
                                                 data_root=settings.data_root,
                                                 seed=settings.seed, limit=settings.limit)
                                  for name in self.datasets] for split in splits}
            first = self._data[splits[0]]
            self._heads = build_heads(self._model, first, device=device,
                                      cache=settings.cache_heads,
                                      allow_base_mismatch=settings.allow_base_mismatch, log=log)
            self.linear: LinearizedFeatures | None = None
            if linear_cache and self._model.linearized:
                from tvtool.evaluate.linear_cache import LinearizedFeatures

                self.linear = LinearizedFeatures(self._model, batch_size=settings.batch_size,
                                                 workers=settings.workers,
                                                 precision=settings.precision,
                                                 progress=self._progress)
        except BaseException:
            self._model.close()
            raise
        self.calls = 0

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the model and files."""
        self._model.close()

    def accuracies(self, coefs: Sequence[float], split: str = "val",
                   datasets: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per dataset of the model at ``coefs`` (one per vector).

        Args:
            coefs: One coefficient per vector.
            split: Which opened split.
            datasets: A subset of the datasets (default: all).
        """
        from tvtool.evaluate import count_correct

        if self.linear is None:
            self._model.set_coefficients(list(coefs))
        else:
            from tvtool.vectors import expand_coefs

            expand_coefs(list(coefs), len(self._model.vectors))  # the same count check
        self.calls += 1
        out = {}
        for data in self._data[split]:
            if datasets is not None and data.name not in datasets:
                continue
            if self.linear is not None:
                correct = self.linear.count_correct(data, self._heads[data.name], coefs)
                out[data.name] = correct / data.size
                continue
            correct = count_correct(self._model, data, self._heads[data.name],
                                    self.settings.batch_size, workers=self.settings.workers,
                                    precision=self.settings.precision, progress=self._progress)
            out[data.name] = correct / data.size
        return out


# ---------------------------------------------------------------- merge search


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
            "output": self.result.output,
            "method": self.result.details.get("method"),
            "best_coef": self.search.best,
            "criterion": self.search.criterion,
            "datasets": list(self.datasets),
            "zero_shot": self.zero_shot,
            "finetuned": self.finetuned,
            "val": {"grid": self.search.as_json()["grid"]},
            "test": {"accuracy": self.test, "normalized_accuracy": test_norm,
                     "average_accuracy": _mean(self.test.values()),
                     "average_normalized_accuracy": _mean(test_norm.values())},
            "merge": self.result.as_json(),
        }


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def vector_datasets(config: MergeConfig, datasets: Sequence[str] | None) -> list[str]:
    """The dataset of each input vector: given explicitly, or read from their metadata.

    Raises:
        UsageError: a vector without a recorded dataset, counts that do not fit, or two
            vectors of one dataset (its fine-tuned reference would be ambiguous).
    """
    if datasets:
        if len(datasets) != len(config.vectors):
            raise UsageError(f"{len(datasets)} --dataset for {len(config.vectors)} vectors",
                             hint="give one --dataset per vector, in order")
        names = list(datasets)
    else:
        opened = open_merge(replace(config, output="-"))
        try:
            names = []
            for path, meta in zip(config.vectors, opened.metas, strict=True):
                if not meta.dataset:
                    raise UsageError(f"{path!r} records no dataset",
                                     hint="pass one --dataset per vector, in order")
                check_recorded_dataset(path, meta.dataset,
                                       "pass one --dataset per vector, in order")
                names.append(meta.dataset)
        finally:
            opened.close()
    if len(set(names)) != len(names):
        raise UsageError(f"two vectors share a dataset ({names}); the search needs one vector "
                         "per dataset")
    return names


def search_merge(config: MergeConfig, settings: EvalSettings, grid: Sequence[float], *,
                 datasets: Sequence[str] | None = None, log: Logger = _quiet,
                 progress: Progress = None) -> MergeSearchReport:
    """Search the merge coefficient on validation splits, merge with it, report test accuracy.

    Args:
        config: The merge (its ``coefs`` are ignored: α is searched; ``coefs_file`` refused).
        settings: How to evaluate.
        grid: Coefficients to try.
        datasets: Dataset of each vector (default: from their metadata).
        log: Receives progress notes.
        progress: Progress-bar factory for the evaluations.

    Returns:
        The report; the merged vector at the chosen α is written to ``config.output``.

    Raises:
        UsageError: ``coefs_file`` or stdin inputs, missing datasets, bad settings.
        InvalidInputError: as :func:`tvtool.merge.merge` and :func:`tvtool.evaluate.evaluate`.
    """
    if config.coefs_file is not None:
        raise UsageError("--search-coef searches one coefficient for all vectors; it cannot "
                         "be combined with --coefs")
    if "-" in config.vectors:
        raise UsageError("--search-coef reads the vectors several times; stdin ('-') cannot "
                         "be an input")
    from tvtool.io import check_output

    # Refuse a bad -o now, not after the (long) search.
    check_output(config.output, list(config.vectors))
    names = vector_datasets(config, datasets)
    count = len(config.vectors)
    with scratch_directory(config.output, prefix=".tvtool-search-") as scratch:
        unit_path = str(scratch / "merged-at-1.safetensors")
        log(f"merging at coefficient 1 ({config.method}) for the search")
        merge(replace(config, coefs=(1.0,), output=unit_path), log)
        with Evaluator(settings, [*config.vectors, unit_path], names, log=log,
                       progress=progress) as evaluator:
            zero = [0.0] * (count + 1)
            zero_shot = {split: evaluator.accuracies(zero, split) for split in ("val", "test")}
            finetuned: dict[str, dict[str, float]] = {"val": {}, "test": {}}
            for index, name in enumerate(names):
                onehot = [1.0 if i == index else 0.0 for i in range(count)] + [0.0]
                for split in ("val", "test"):
                    finetuned[split][name] = evaluator.accuracies(onehot, split, [name])[name]
            log(f"searching α over {len(grid)} values on the validation splits")
            search = search_coef(lambda a: evaluator.accuracies([0.0] * count + [a], "val"),
                                 grid, references=finetuned["val"])
            test = evaluator.accuracies([0.0] * count + [search.best], "test")
    log(f"best α = {search.best:g}; writing the merge at that coefficient")
    result = merge(replace(config, coefs=(search.best,)), log)
    return MergeSearchReport(search, tuple(names), zero_shot, finetuned, test, result)


# ---------------------------------------------------------------- negation search


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


def check_recorded_dataset(vector: str, name: str, hint: str) -> None:
    """Refuse a recorded ``imagefolder:PATH`` that is no directory here, pointing at the flag.

    Files written by older versions may record a path relative to where they were made, which
    means nothing from another directory.

    Raises:
        InvalidInputError: the recorded image folder is not a directory.
    """
    from pathlib import Path

    from tvtool.data.imagefolder import PREFIX

    if not name.strip().lower().startswith(PREFIX):
        return
    folder = Path(name.strip()[len(PREFIX):].strip()).expanduser()
    if not folder.is_dir():
        where = ("" if folder.is_absolute()
                 else " (a relative path, taken from the current directory)")
        raise InvalidInputError(
            f"{vector!r} records dataset {name!r}, which is not a directory here{where}",
            hint=hint)


def recorded_dataset(vector: str) -> str | None:
    """The dataset a task-vector file records (None for stdin or when it records none)."""
    from tvtool.io import open_tensors
    from tvtool.vectors import open_vector_meta

    if vector == "-":
        return None
    source = open_tensors(vector)
    try:
        return open_vector_meta(source, source.label).dataset or None
    finally:
        source.close()


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
    from tvtool.commands.negate import NegateConfig
    from tvtool.commands.negate import negate as run_negate
    from tvtool.io import check_output

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
    if target == control:
        raise UsageError("the target and control datasets are the same")
    with Evaluator(settings, [vector], [target, control], log=log,
                   progress=progress) as evaluator:
        base_val = evaluator.accuracies([0.0], "val")
        log(f"searching α over {len(grid)} values on the validation splits")
        search = search_negation(lambda a: evaluator.accuracies([-a], "val"), grid,
                                 target=target, control=control, threshold=threshold,
                                 base=base_val)
        if search.best is None:
            raise TvtoolError(
                f"no coefficient of the grid keeps {control} accuracy at {threshold:.0%} of the "
                "base's; nothing written", hint="try smaller coefficients or a lower --threshold")
        test = {"base": evaluator.accuracies([0.0], "test"),
                "negated": evaluator.accuracies([-search.best], "test")}
    log(f"best α = {search.best:g}; writing the negated vector")
    run_negate(NegateConfig(vector=vector, output=output, coef=search.best))
    return NegateSearchReport(search, target, control, test, output)


def accuracy_table_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Rows (dataset, zero-shot, fine-tuned, merged, normalized) of a merge-search report."""
    rows = []
    test = report["test"]
    for name in report["datasets"]:
        rows.append([name, _pct(report["zero_shot"]["test"][name]),
                     _pct(report["finetuned"]["test"][name]), _pct(test["accuracy"][name]),
                     _pct(test["normalized_accuracy"][name])])
    rows.append(["average", _pct(_mean(report["zero_shot"]["test"].values())),
                 _pct(_mean(report["finetuned"]["test"].values())),
                 _pct(test["average_accuracy"]), _pct(test["average_normalized_accuracy"])])
    return rows


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"
