"""The examples aTLAS learns on: which ones (per-class shots, a held-out part) and their batches.

:func:`split_examples` chooses the training and held-out indices of a dataset;
:class:`Examples` iterates a dataset part in (shuffled) batches on the training device,
keeping it there when it fits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tvtool.errors import InvalidInputError, TvtoolError, worker_error_text

# Preprocessed examples are kept on the device for repeated epochs up to this many bytes per
# dataset part; larger parts are re-read through a DataLoader.
MATERIALIZE_BYTES = 1 << 30


def dataset_labels(dataset: Dataset[Any]) -> Tensor:
    """Labels of every example, read from ``labels``/``targets`` when the dataset has them.

    Falls back to reading every example (slow for large image datasets).

    Raises:
        InvalidInputError: an example that is not an ``(image, label)`` pair.
    """
    for attribute in ("labels", "targets"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            labels = torch.as_tensor(values).long().reshape(-1)
            if labels.numel() == len(dataset):  # type: ignore[arg-type]
                return labels
    return torch.tensor([int(read_example(dataset, i, "dataset")[1])
                         for i in range(len(dataset))],  # type: ignore[arg-type]
                        dtype=torch.int64)


def split_examples(labels: Tensor | None, size: int, *, shots: int | None, val_fraction: float,
                   seed: int, num_classes: int | None = None) -> tuple[list[int], list[int]]:
    """Choose training and held-out example indices.

    With labels: ``shots`` examples per class (all when None), seeded; from each class,
    ``round(val_fraction × n_c)`` are held out (at least one when the class has two or more).
    Without labels: ``shots × num_classes`` examples at random (label-free), the same fraction
    held out.

    Args:
        labels: Labels of all examples, or None for unlabelled selection.
        size: Number of examples in the dataset.
        shots: Examples per class (None: all).
        val_fraction: Fraction held out, in ``[0, 1)``.
        seed: Seed of the choice.
        num_classes: Class count (sizes the unlabelled sample).

    Returns:
        ``(train_indices, val_indices)``, sorted.
    """
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []

    def take(pool: Tensor) -> None:
        count = len(pool)
        held = 0
        if val_fraction > 0 and count >= 2:
            held = min(count - 1, max(1, round(val_fraction * count)))
        val.extend(pool[:held].tolist())
        train.extend(pool[held:].tolist())

    if labels is None:
        order = torch.randperm(size, generator=generator)
        if shots is not None:
            order = order[:shots * (num_classes or 1)]
        take(order)
    else:
        for label in torch.unique(labels).tolist():
            members = torch.nonzero(labels == label).reshape(-1)
            members = members[torch.randperm(len(members), generator=generator)]
            take(members[:shots] if shots is not None else members)
    return sorted(train), sorted(val)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def read_example(dataset: Dataset[Any], index: int, name: str) -> tuple[Tensor, int]:
    """Example ``index`` of ``dataset`` as ``(image, label)``.

    Raises:
        InvalidInputError: an unreadable example, or one that is not an ``(image tensor,
            label)`` pair (``name`` says which dataset part).
    """
    try:
        item = dataset[index]
    except TvtoolError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise InvalidInputError(f"cannot read example {index} of {name}: "
                                f"{' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(item, (tuple, list)) or len(item) < 2 or not isinstance(item[0], Tensor):
        raise InvalidInputError(f"{name} does not yield (image tensor, label) pairs")
    return item[0], int(item[1])


class Examples:
    """A dataset part, kept on the device when it fits, iterated in (shuffled) batches.

    Args:
        dataset: ``(image, label)`` pairs.
        name: What the part is called in messages (``cars (held-out part)``).
        device: The training device.
        workers: DataLoader workers when the part does not fit (``MATERIALIZE_BYTES``).

    Raises:
        InvalidInputError: an empty part, or an unreadable first example.
    """

    def __init__(self, dataset: Dataset[Any], name: str, device: torch.device,
                 workers: int) -> None:
        self.dataset = dataset
        self.name = name
        self.device = device
        self.workers = workers
        self.size = len(dataset)  # type: ignore[arg-type]
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        if self.size == 0:
            raise InvalidInputError(f"{name} has no examples",
                                    hint="use more --shots or a smaller --val-fraction")
        first, _ = read_example(dataset, 0, name)
        if first.nelement() * first.element_size() * self.size <= MATERIALIZE_BYTES:
            items = [read_example(dataset, i, name) for i in range(self.size)]
            self.images = torch.stack([image for image, _ in items]).to(device)
            self.labels = torch.tensor([label for _, label in items], device=device)

    def batches(self, batch_size: int, generator: torch.Generator | None
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass in batches; shuffled when a generator is given."""
        if self.images is not None and self.labels is not None:
            order = (torch.randperm(self.size, generator=generator) if generator is not None
                     else torch.arange(self.size)).to(self.device)
            for start in range(0, self.size, batch_size):
                index = order[start:start + batch_size]
                yield self.images[index], self.labels[index]
            return
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=generator is not None,
                            generator=generator, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        yield from self._read(loader)

    def stream(self, index_batches: Iterator[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        """The examples of every index batch of ``index_batches``, in order.

        In memory: indexed directly. Otherwise one persistent DataLoader reads them with
        ``workers`` processes, prefetching (the index stream must not share its random
        generator with anything else, so that prefetching cannot change what is drawn).
        """
        if self.images is not None and self.labels is not None:
            for index in index_batches:
                yield self.take(index)
            return
        batches = ([int(i) for i in index.tolist()] for index in index_batches)
        loader = DataLoader(self.dataset, batch_sampler=batches,  # type: ignore[arg-type]
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        yield from self._read(loader)

    def _read(self, loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        """A loader's batches on the device; a worker's read error becomes invalid input."""
        try:
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), \
                    torch.as_tensor(labels).long().to(self.device, non_blocking=True)
        except TvtoolError:
            raise
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise InvalidInputError(f"cannot read an example of {self.name}: "
                                    f"{worker_error_text(exc)}") from exc

    def take(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The examples at positions ``index`` (a 1-D int64 tensor), as one batch."""
        if self.images is not None and self.labels is not None:
            where = index.to(self.device)
            return self.images[where], self.labels[where]
        items = [read_example(self.dataset, int(i), self.name) for i in index.tolist()]
        return (torch.stack([image for image, _ in items]).to(self.device),
                torch.tensor([label for _, label in items], device=self.device))

    def endless(self, batch_size: int, generator: torch.Generator
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled batches forever (a new order every epoch)."""
        while True:
            yield from self.batches(batch_size, generator)
