"""Top-1 accuracy and normalized accuracy of a base model edited with task vectors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tvtool.device import autocast, resolve_device
from tvtool.errors import InvalidInputError, UsageError
from tvtool.evaluate.batches import EvalData, batches, check_finite_logits, open_eval_data
from tvtool.evaluate.head_cache import head_key, read_head_file, zero_shot_head
from tvtool.evaluate.model import (
    EvalModel,
    Weights,
    open_eval_model,
)
from tvtool.evaluate.reference import ReferenceEntry, check_reference, load_references
from tvtool.evaluate.settings import EvalSettings, report_arguments
from tvtool.limits import short_repr
from tvtool.metadata import provenance
from tvtool.types import Logger, ProgressFactory, no_progress
from tvtool.types import quiet as _quiet

REPORT_VERSION = 1


_ARGUMENT_ORDER = ("base", "datasets", "vectors", "coefs", "split", "data_root", "batch_size",
                   "device", "precision", "limit", "seed", "workers", "references", "heads",
                   "allow_base_mismatch", "approximate_linearized", "cache_heads", "weights")
"""Key order of the report's ``settings`` (fixed by report version 1)."""


@dataclass(frozen=True)
class EvalConfig:
    """Configuration of ``tvtool eval``, validated on construction.

    Attributes:
        settings: How to evaluate (base, data, batch size, device, precision, ...).
        datasets: Datasets to evaluate on (``synthetic:shape``, ``imagefolder:PATH``, ...).
        vectors: Task-vector files added to the base (empty: the base itself).
        coefs: One coefficient per vector, or one for all.
        split: ``val`` or ``test``.
        references: JSON files with fine-tuned accuracies (adds normalized accuracy).
        heads: Head files (kind ``head``), one per dataset in order, replacing the zero-shot
            heads built from the text encoder.
        approximate_linearized: Add linearized vectors to the weights instead of evaluating
            their linearized model.
        weights: Extension point for library callers (aTLAS, custom merges): the edited
            weights, or a builder ``(base, vectors) -> weights``; replaces ``coefs``.

    Raises:
        UsageError: no dataset, a dataset twice, a head count or coefficient count that does
            not fit.
    """

    settings: EvalSettings
    datasets: tuple[str, ...]
    vectors: tuple[str, ...] = ()
    coefs: tuple[float, ...] = (1.0,)
    split: str = "test"
    references: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    approximate_linearized: bool = False
    weights: Weights | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise UsageError("no dataset to evaluate on", hint="pass --dataset NAME")
        from tvtool.data import dataset_identity

        identities = [dataset_identity(name) for name in self.datasets]
        if len(set(identities)) != len(identities):
            twice = next(n for i, n in enumerate(identities) if n in identities[:i])
            raise UsageError(f"a dataset is given twice ({short_repr(twice, 80)})")
        if self.heads and len(self.heads) != len(self.datasets):
            raise UsageError(f"{len(self.heads)} head files for {len(self.datasets)} datasets",
                             hint="give one --head per --dataset, in the same order")
        if self.weights is None and self.vectors and len(self.coefs) not in (
                1, len(self.vectors)):
            raise UsageError(f"{len(self.coefs)} coefficients given for "
                             f"{len(self.vectors)} vectors",
                             hint="give one --coef for all vectors or one per vector")

    def arguments(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping (``weights`` summarised)."""
        own: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                               if f.name not in ("settings", "weights")}
        if self.weights is not None:
            own["weights"] = "callable" if callable(self.weights) else "state dict"
        return report_arguments(self.settings, own, _ARGUMENT_ORDER)


@dataclass(frozen=True)
class DatasetResult:
    """Accuracy on one dataset.

    Attributes:
        dataset: Dataset name.
        split: Split evaluated.
        accuracy: Top-1 accuracy in ``[0, 1]``.
        correct: Correctly classified examples.
        total: Examples evaluated.
        num_classes: Classes of the dataset (rows of the head).
        reference_accuracy: Fine-tuned accuracy, if a reference was given.
        normalized_accuracy: ``accuracy / reference_accuracy``, if a reference was given.
    """

    dataset: str
    split: str
    accuracy: float
    correct: int
    total: int
    num_classes: int
    reference_accuracy: float | None = None
    normalized_accuracy: float | None = None


@dataclass(frozen=True)
class EvalReport:
    """What ``tvtool eval`` measured.

    Attributes:
        model: Base reference, fingerprint, architecture, vectors with coefficients, and
            whether the model was evaluated linearized.
        results: One entry per dataset, in the order asked.
        splits: What was evaluated per dataset (sizes, subsets, class names, manifests).
        settings: The configuration.
        notes: Remarks also printed on stderr.
        provenance: Command, versions, seed.
    """

    model: dict[str, Any]
    results: list[DatasetResult]
    splits: list[dict[str, Any]]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def average_accuracy(self) -> float:
        """Mean accuracy over the datasets."""
        return sum(r.accuracy for r in self.results) / len(self.results)

    @property
    def average_normalized_accuracy(self) -> float | None:
        """Mean normalized accuracy, when every dataset has a reference."""
        values = [r.normalized_accuracy for r in self.results]
        if not values or any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None) / len(values)

    def accuracies(self) -> dict[str, float]:
        """``{dataset: accuracy}``."""
        return {r.dataset: r.accuracy for r in self.results}

    def as_json(self) -> dict[str, Any]:
        """The JSON document ``tvtool eval --json`` prints (and ``-o`` writes)."""
        return {
            "report": "eval",
            "report_version": REPORT_VERSION,
            "model": self.model,
            "results": [dataclasses.asdict(r) for r in self.results],
            "average": {"accuracy": self.average_accuracy,
                        "normalized_accuracy": self.average_normalized_accuracy},
            "splits": self.splits,
            "settings": self.settings,
            "notes": self.notes,
            "provenance": self.provenance,
        }


def evaluate(config: EvalConfig, *, log: Logger = _quiet,
             progress: ProgressFactory = no_progress) -> EvalReport:
    """Top-1 accuracy of the base plus task vectors on each dataset.

    Every input is validated before the first forward pass: references, head files, data
    splits and vectors.

    Args:
        config: What to evaluate.
        log: Receives notes (stderr in the CLI).
        progress: Progress-bar factory (see :data:`ProgressFactory`).

    Returns:
        The report.

    Raises:
        UsageError: an unknown split, a non-positive limit, a device that is not there
            (the settings themselves are checked when the configuration is built).
        InvalidInputError: bad base, vectors, data, references or heads; class-count mismatch.
    """
    settings = config.settings
    device = resolve_device(settings.device)
    references = load_references(config.references) if config.references else {}
    notes: list[str] = []
    with open_eval_model(settings.base, config.vectors, device=device,
                         allow_base_mismatch=settings.allow_base_mismatch,
                         approximate_linearized=config.approximate_linearized) as model:
        notes += model.notes
        datas = [open_eval_data(name, config.split, model.bundle.preprocess_eval,
                                data_root=settings.data_root, seed=settings.seed,
                                limit=settings.limit)
                 for name in config.datasets]
        for data in datas:
            if data.name in references:
                check_reference(data.name, references[data.name], data.num_classes,
                                config.split, notes)
            elif references:
                notes.append(f"no reference accuracy for {data.name!r}: normalized accuracy "
                             "left out")
        heads = build_heads(model, datas, device=device, head_files=config.heads,
                            cache=settings.cache_heads,
                            allow_base_mismatch=settings.allow_base_mismatch, log=log)
        if config.weights is not None:
            model.set_weights(config.weights)
        else:
            model.set_coefficients(config.coefs)
        for note in notes:
            log(note)
        results = []
        for data in datas:
            correct = count_correct(model, data, heads[data.name], settings.batch_size,
                                    workers=settings.workers, precision=settings.precision,
                                    progress=progress)
            results.append(_result(data, correct, references.get(data.name)))
        model_record = {
            "base": settings.base,
            "architecture": model.ref.architecture,
            "base_fingerprint": model.base_fingerprint,
            "vectors": model.describe_vectors(None if config.weights is not None
                                              else config.coefs),
            "evaluated_as": ("custom weights" if config.weights is not None else
                             "linearized" if model.linearized else "weights"),
            "device": str(device),
        }
        splits = [d.describe() for d in datas]
    return EvalReport(model_record, results, splits, config.arguments(), notes,
                      provenance("eval", config.arguments(), seed=settings.seed, timed=False))


def build_heads(model: EvalModel, datas: Sequence[EvalData], *, device: torch.device,
                head_files: Sequence[str] = (), cache: bool = True,
                allow_base_mismatch: bool = False, log: Logger = _quiet) -> dict[str, Tensor]:
    """One head per dataset, built from the base's text encoder (or read from head files).

    Call it before an edit is loaded: heads always come from the base.

    Args:
        model: The open model, still holding the base weights.
        datas: The opened splits.
        device: Where the heads go.
        head_files: Head files replacing the zero-shot heads, one per dataset in order.
        cache: Use the on-disk head cache.
        allow_base_mismatch: Accept head files built from another base.
        log: Receives cache remarks.

    Raises:
        InvalidInputError: a head whose class count or width does not fit.
    """
    heads: dict[str, Tensor] = {}
    for index, data in enumerate(datas):
        if head_files:
            fp = None if allow_base_mismatch else model.base_fingerprint
            head = read_head_file(head_files[index], num_classes=data.num_classes,
                                  base_fingerprint=fp)
        else:
            key = head_key(model.base_fingerprint, data.name, data.classnames, data.templates)
            head = zero_shot_head(model.bundle, key, data.templates, device=device,
                                  disk_cache=cache, log=log)
        heads[data.name] = head.to(device)
    embed = _embed_dim(model)
    for name, head in heads.items():
        if embed is not None and head.shape[1] != embed:
            raise InvalidInputError(f"the head of {name!r} has width {head.shape[1]}, the model "
                                    f"embeds images in {embed} dimensions")
    return heads


def _embed_dim(model: EvalModel) -> int | None:
    proj = getattr(model.bundle.model.visual, "proj", None)
    if isinstance(proj, Tensor):
        return int(proj.shape[1])
    return getattr(model.bundle.model.visual, "output_dim", None)


def _result(data: EvalData, correct: int, reference: ReferenceEntry | None) -> DatasetResult:
    accuracy = correct / data.size
    ref = reference.accuracy if reference is not None else None
    return DatasetResult(data.name, data.split, accuracy, correct, data.size, data.num_classes,
                         ref, accuracy / ref if ref is not None else None)


def predictions(model: EvalModel, data: EvalData, head: Tensor, batch_size: int, *,
                workers: int = 0, precision: str = "auto", progress: ProgressFactory = no_progress,
                materialize: bool = False,
                materialize_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Predicted and true labels of every evaluated example, on CPU.

    Args:
        model: The model at its current edit.
        data: The split.
        head: ``[num_classes, D]`` head on the model's device.
        batch_size: Images per forward pass.
        workers: DataLoader workers.
        precision: Autocast precision.
        progress: Progress-bar factory.
        materialize: Keep the preprocessed batches in memory for later calls.
        materialize_bytes: The most bytes kept (see :func:`batches`).

    Returns:
        ``(predicted, labels)`` int64 tensors.
    """
    preds, labels = [], []
    steps = -(-data.size // batch_size)
    with progress(f"{data.name} ({data.split})", steps) as advance, torch.no_grad():
        for index, (images, targets) in enumerate(batches(
                data, batch_size, workers=workers, device=model.device, materialize=materialize,
                materialize_bytes=materialize_bytes)):
            with autocast(model.device, precision):
                features = model.image_features(images)
            logits = features.float() @ head.float().T
            check_finite_logits(logits, data, index, batch_size)
            preds.append(logits.argmax(dim=-1).cpu())
            labels.append(targets.cpu())
            advance(1)
    return torch.cat(preds), torch.cat(labels)


def count_correct(model: EvalModel, data: EvalData, head: Tensor, batch_size: int, *,
                  workers: int = 0, precision: str = "auto",
                  progress: ProgressFactory = no_progress, materialize: bool = False,
                  materialize_bytes: int | None = None) -> int:
    """Number of correctly classified examples (see :func:`predictions`).

    Pass ``materialize=True`` when the same data is evaluated at many coefficients (searches):
    the preprocessed images are then kept in memory after the first pass.
    """
    predicted, labels = predictions(model, data, head, batch_size, workers=workers,
                                    precision=precision, progress=progress,
                                    materialize=materialize,
                                    materialize_bytes=materialize_bytes)
    return int((predicted == labels).sum())
