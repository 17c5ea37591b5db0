"""Evaluation data: open a dataset split through :mod:`tvtool.data`, subset it, batch it.

Every problem with the data (missing root, empty split, unreadable image, labels outside the
class list) becomes an :class:`~tvtool.errors.InvalidInputError` naming the dataset, so the CLI
reports one line and exits 2 before anything is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from tvtool.errors import (
    InvalidInputError,
    NumericalError,
    TvtoolError,
    UsageError,
    worker_error_text,
)

SPLITS = ("train", "val", "test")

MATERIALIZE_BYTES = 1 << 30
"""Preprocessed images kept in memory for repeated passes (searches, disentanglement grids),
at most; larger sets are re-read from the loader on every pass."""


@dataclass
class EvalData:
    """One dataset split opened for evaluation.

    Attributes:
        name: The dataset's identity (:func:`tvtool.data.dataset_identity`: ``imagefolder:``
            paths absolute, standard names in their canonical case), the one spelling every
            table, report and comparison uses.
        split: Split name.
        classnames: Class names in label order.
        templates: Zero-shot prompt templates.
        dataset: The (possibly subset) torch dataset of ``(image, label)``.
        total: Examples in the full split.
        indices: Indices of the evaluated subset (``None``: the whole split).
        seed: Seed of the split and of the subset.
        manifest: Split manifest from :mod:`tvtool.data`, if it offers one.
    """

    name: str
    split: str
    classnames: tuple[str, ...]
    templates: tuple[Any, ...]
    dataset: Dataset[Any]
    total: int
    indices: list[int] | None = None
    seed: int = 0
    manifest: dict[str, Any] | None = None
    _cache: list[tuple[Tensor, Tensor]] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    @property
    def size(self) -> int:
        """Examples evaluated."""
        return len(self.indices) if self.indices is not None else self.total

    @property
    def materialized_bytes(self) -> int:
        """Bytes of the preprocessed images kept in memory (0 when none are)."""
        if self._cache is None:
            return 0
        return sum(images.nelement() * images.element_size() for images, _ in self._cache)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of what was evaluated (for reproducibility)."""
        record: dict[str, Any] = {"dataset": self.name, "split": self.split,
                                  "examples": self.size, "split_size": self.total,
                                  "num_classes": self.num_classes,
                                  "classnames": list(self.classnames)}
        if self.indices is not None:
            digest = hashlib.sha256(",".join(map(str, self.indices)).encode()).hexdigest()
            record["subset"] = {"kind": "seeded random subset (--limit)", "seed": self.seed,
                                "indices_sha256": f"sha256:{digest}"}
        if self.manifest is not None:
            record["manifest"] = self.manifest
        return record


def check_finite_logits(logits: Tensor, data: EvalData, batch: int, batch_size: int) -> None:
    """Refuse NaN or Inf logits: an accuracy computed from them would be meaningless.

    ``argmax`` over NaN picks an arbitrary class, so a broken model (e.g. an edit that drove a
    BatchNorm ``running_var`` negative) would otherwise report a plausible accuracy.

    Raises:
        NumericalError: a logit of the batch is not finite (names the dataset, split, batch and
            examples).
    """
    if bool(torch.isfinite(logits).all()):
        return
    first = batch * batch_size
    raise NumericalError(
        f"the model computes NaN or Inf logits on {data.name} ({data.split} split), batch "
        f"{batch} (examples {first}..{first + logits.shape[0] - 1}); no accuracy is reported",
        hint="check the vectors and coefficients; a vector that moves BatchNorm statistics "
             "can make a running variance negative")


def open_eval_data(name: str, split: str, transform: Callable[[Any], Tensor], *,
                   data_root: str | None = None, seed: int = 0,
                   limit: int | None = None) -> EvalData:
    """Open a split of a dataset for evaluation.

    Args:
        name: Dataset name (see :func:`tvtool.data.task_spec`).
        split: ``val`` or ``test`` (``train`` is accepted for diagnostics).
        transform: The model's evaluation transform.
        data_root: Root directory of standard datasets.
        seed: Seed of the split (and of the ``limit`` subset).
        limit: Evaluate a seeded random subset of this many examples.

    Returns:
        The opened split.

    Raises:
        UsageError: unknown split, non-positive limit.
        InvalidInputError: unknown dataset, missing data root, empty split.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}", hint="use val or test")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be positive, got {limit}")
    data = _data_api()
    dataset = _guarded(name, split, lambda: data.load_split(name, split, transform,
                                                            data_root=data_root, seed=seed))
    spec = getattr(dataset, "spec", None) or _guarded(
        name, split, lambda: data.task_spec(name, data_root=data_root))
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise InvalidInputError(f"dataset {name!r} has no examples in split {split!r}",
                                hint="check the data root and the dataset's files")
    classnames = tuple(spec.classnames)
    if not classnames:
        raise InvalidInputError(f"dataset {name!r} has no classes")
    indices = None
    if limit is not None and limit < total:
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(total, generator=generator)[:limit].tolist())
        dataset = Subset(dataset, indices)
    return EvalData(data.dataset_identity(name), split, classnames, tuple(spec.templates),
                    dataset, total, indices, seed, _manifest(data, name, data_root, seed))


def _data_api() -> Any:
    try:
        import tvtool.data as data
    except ImportError as exc:  # pragma: no cover - only while tvtool.data is being written
        raise TvtoolError(f"the dataset registry (tvtool.data) is not available: {exc}") from exc
    return data


def _guarded(name: str, split: str, call: Callable[[], Any]) -> Any:
    """Run a data-API call, turning file-system and decoding errors into invalid input."""
    try:
        return call()
    except TvtoolError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"cannot open {split} split of dataset {name!r}: "
                                f"{_short(exc)}", hint="check --data-root and the dataset name"
                                ) from exc


def _manifest(data: Any, name: str, data_root: str | None, seed: int) -> dict[str, Any] | None:
    """The dataset's split manifest (counts and member hashes of every split)."""
    manifest = getattr(data, "split_manifest", None)
    if manifest is None:
        return None
    return dict(_guarded(name, "manifest", lambda: manifest(name, data_root=data_root,
                                                            seed=seed)))


def batches(data: EvalData, batch_size: int, *, workers: int = 0,
            device: torch.device | str = "cpu", materialize: bool = False,
            materialize_bytes: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` batches on ``device``, checking labels against the classes.

    Args:
        data: The opened split.
        batch_size: Examples per batch.
        workers: DataLoader worker processes.
        device: Where the batches go.
        materialize: Keep the batches in memory for later passes (when they fit).
        materialize_bytes: The most image bytes kept (default 1 GiB); a split that needs more
            is re-read on every pass.

    Raises:
        InvalidInputError: an unreadable example or a label outside ``[0, num_classes)``.
    """
    if data._cache is not None:
        yield from data._cache
        return
    loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    kept: list[tuple[Tensor, Tensor]] | None = [] if materialize else None
    limit = MATERIALIZE_BYTES if materialize_bytes is None else materialize_bytes
    kept_bytes = 0
    iterator = iter(loader)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        except TvtoolError:
            raise
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise InvalidInputError(f"cannot read an example of dataset {data.name!r} "
                                    f"({data.split}): {_short(exc)}",
                                    hint="check that every file is a readable image") from exc
        images, labels = _unpack(item, data.name)
        _check_labels(labels, data)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if kept is not None:
            kept_bytes += images.nelement() * images.element_size()
            if kept_bytes <= limit:
                kept.append((images, labels))
            else:
                kept = None
        yield images, labels
    if kept is not None:
        data._cache = kept


def _unpack(item: Any, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (list, tuple)) or len(item) < 2:
        raise InvalidInputError(f"dataset {name!r} does not yield (image, label) pairs")
    images, labels = item[0], item[1]
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise InvalidInputError(f"dataset {name!r} does not yield tensors")
    return images, labels.long()


def _check_labels(labels: Tensor, data: EvalData) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= data.num_classes):
        raise InvalidInputError(
            f"dataset {data.name!r} has label {int(labels.max())} but only "
            f"{data.num_classes} classes", hint="the class list does not match the data")


def _short(exc: BaseException) -> str:
    return worker_error_text(exc)


def split_records(datas: Sequence[EvalData]) -> list[dict[str, Any]]:
    """Split records of several datasets (what the report stores for reproducibility)."""
    return [d.describe() for d in datas]
