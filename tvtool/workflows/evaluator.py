"""The evaluator behind the searches: a base model plus task vectors, at any coefficients.

:class:`Evaluator` wraps :mod:`tvtool.evaluate` into the ``evaluate(coef) -> {dataset: acc}``
callables the searches of :mod:`tvtool.workflows.merge_search` and
:mod:`tvtool.workflows.negation` are written against: the base model, the vectors, the splits
and the zero-shot heads are opened once, and each call only rebuilds the weights at new
coefficients. :func:`recorded_dataset` and :func:`check_recorded_dataset` read which dataset a
vector says it was fine-tuned on, which both searches evaluate it on by default. The
evaluation settings are :class:`tvtool.evaluate.EvalSettings`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tvtool.data import dataset_identity
from tvtool.data.imagefolder import PATH_PREFIXES
from tvtool.device import resolve_device
from tvtool.errors import InvalidInputError
from tvtool.evaluate import (
    EvalData,
    EvalSettings,
    build_heads,
    count_correct,
    no_progress,
    open_eval_data,
    open_eval_model,
)
from tvtool.evaluate.batches import MATERIALIZE_BYTES
from tvtool.evaluate.linear_cache import LinearizedFeatures
from tvtool.io import open_tensors
from tvtool.types import Logger
from tvtool.types import quiet as _quiet
from tvtool.vectors import expand_coefs, open_vector_meta

Progress = Any
Accuracies = Mapping[str, float]
"""Accuracy per dataset name."""
Evaluate = Callable[[float], Accuracies]
"""``evaluate(α)`` -> accuracy per dataset of the model at coefficient α (what a search calls)."""


class Evaluator:
    """Accuracy of ``base + Σ coef_i · vector_i`` on fixed datasets, at any coefficients.

    The preprocessed images of every split are kept in memory after their first pass (a
    search evaluates the same images at every coefficient), up to ``materialize_bytes`` for
    all splits together; a split that does not fit is re-read on every call.

    Linearized vectors are evaluated from cached encoder outputs
    (:class:`tvtool.evaluate.linear_cache.LinearizedFeatures`): their model's features are
    ``f0 + Σ coef_i · J τ_i``, so each split costs one primal pass plus one JVP per vector
    with a non-zero coefficient, whatever the number of coefficients evaluated. Ordinary
    vectors rebuild the weights and run the encoder at every call.

    Args:
        settings: Evaluation settings (validated when they were built).
        vectors: Task-vector files.
        datasets: Dataset names.
        splits: Splits to open (``val``, ``test``).
        log: Receives notes.
        progress: Progress-bar factory (see :data:`tvtool.evaluate.ProgressFactory`).
        linear_cache: Use the cached encoder outputs for linearized vectors; ``False``
            evaluates every call with its own encoder passes (the reference of the tests and
            the benchmark; same accuracies up to float rounding).
        materialize_bytes: The most bytes of preprocessed images kept in memory, all splits
            together (default 1 GiB; 0 re-reads every split on every call).
    """

    def __init__(self, settings: EvalSettings, vectors: Sequence[str], datasets: Sequence[str],
                 splits: Sequence[str] = ("val", "test"), log: Logger = _quiet,
                 progress: Progress = None, linear_cache: bool = True,
                 materialize_bytes: int = MATERIALIZE_BYTES) -> None:
        self.settings = settings
        self.datasets = [dataset_identity(name) for name in datasets]
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
                self.linear = LinearizedFeatures(self._model, batch_size=settings.batch_size,
                                                 workers=settings.workers,
                                                 precision=settings.precision,
                                                 progress=self._progress)
        except BaseException:
            self._model.close()
            raise
        self.calls = 0
        self._materialize_left = materialize_bytes

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the model and files."""
        self._model.close()

    def opened(self, split: str = "val") -> dict[str, EvalData]:
        """The data opened for a split, by dataset name (classes, examples evaluated)."""
        return {data.name: data for data in self._data[split]}

    def accuracies(self, coefs: Sequence[float], split: str = "val",
                   datasets: Sequence[str] | None = None) -> dict[str, float]:
        """Top-1 accuracy per dataset of the model at ``coefs`` (one per vector).

        Args:
            coefs: One coefficient per vector.
            split: Which opened split.
            datasets: A subset of the datasets (default: all).
        """
        if self.linear is None:
            self._model.set_coefficients(list(coefs))
        else:
            expand_coefs(list(coefs), len(self._model.vectors))  # the same count check
        self.calls += 1
        wanted = None if datasets is None else {dataset_identity(name) for name in datasets}
        out = {}
        for data in self._data[split]:
            if wanted is not None and data.name not in wanted:
                continue
            if self.linear is not None:
                correct = self.linear.count_correct(data, self._heads[data.name], coefs)
                out[data.name] = correct / data.size
                continue
            kept_before = data.materialized_bytes
            correct = count_correct(self._model, data, self._heads[data.name],
                                    self.settings.batch_size, workers=self.settings.workers,
                                    precision=self.settings.precision, progress=self._progress,
                                    materialize=self._materialize_left > 0,
                                    materialize_bytes=self._materialize_left)
            self._materialize_left -= data.materialized_bytes - kept_before
            out[data.name] = correct / data.size
        return out


def check_recorded_dataset(vector: str, name: str, hint: str) -> None:
    """Refuse a recorded ``imagefolder:PATH``/``hf:PATH`` that is no directory here.

    Files written by older versions may record a path relative to where they were made, which
    means nothing from another directory.

    Raises:
        InvalidInputError: the recorded image folder is not a directory.
    """
    prefix = next((p for p in PATH_PREFIXES if name.strip().lower().startswith(p)), None)
    if prefix is None:
        return
    folder = Path(name.strip()[len(prefix):].strip()).expanduser()
    if not folder.is_dir():
        where = ("" if folder.is_absolute()
                 else " (a relative path, taken from the current directory)")
        raise InvalidInputError(
            f"{vector!r} records dataset {name!r}, which is not a directory here{where}",
            hint=hint)


def recorded_dataset(vector: str) -> str | None:
    """The dataset a task-vector file records (None for stdin or when it records none)."""
    if vector == "-":
        return None
    source = open_tensors(vector)
    try:
        return open_vector_meta(source, source.label).dataset or None
    finally:
        source.close()
