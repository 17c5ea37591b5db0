"""The types every dataset backend shares: task specs, pools and split datasets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tvtool.data.splits import Split, SplitPart

Transform = Callable[[Image.Image], Any]


@dataclass(frozen=True)
class TaskSpec:
    """What a classifier for a dataset needs to know besides the images.

    Attributes:
        name: Dataset name as tvtool spells it (``MNIST``, ``synthetic:shape``, ...).
        classnames: Human-readable class names in label order.
        templates: Zero-shot prompt templates; ``{}`` stands for the class name.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)


class Pool(Protocol):
    """An indexed collection of labelled images that splits draw from."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Return the RGB image and integer label of one example."""
        ...

    def member(self, index: int) -> str:
        """Return a stable identity of one example (index or relative path) for hashes."""
        ...


class Source(Protocol):
    """A resolved dataset: its spec, its pools, and a description for the manifest."""

    spec: TaskSpec

    def pools(self) -> Mapping[str, Pool]:
        """Return the pools by name (``train``, maybe ``val`` and ``test``); may read disk."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about where the data comes from (no absolute paths)."""
        ...


class SplitDataset(Dataset):
    """One split of a dataset: ``dataset[i] -> (transform(image), label)``.

    Attributes:
        spec: The dataset's :class:`TaskSpec`.
        split: ``train``, ``val`` or ``test``.
        indices: Indices of this split's examples in their pool (read-only).
    """

    def __init__(self, spec: TaskSpec, split: Split, pool: Pool, part: SplitPart,
                 transform: Transform | None) -> None:
        self.spec = spec
        self.split = split
        self.indices: np.ndarray = part.indices
        self._pool = pool
        self._transform = transform

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        image, label = self._pool.load(int(self.indices[i]))
        return (self._transform(image) if self._transform is not None else image), label

    def __repr__(self) -> str:
        return f"SplitDataset({self.spec.name!r}, {self.split!r}, {len(self)} examples)"
