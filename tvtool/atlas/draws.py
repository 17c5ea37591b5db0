"""Which examples each training step sees, per protocol (see :mod:`tvtool.atlas.protocols`).

A *draw* yields, for one dataset, the batches of one step: a list of ``(images, labels)``
pairs (one pair per micro-batch; for UFM the "labels" are the examples' positions in the
training part, which index its pseudo-labels). Each implementation follows one reference's
data loader:

* :class:`StreamDraw` -- tvtool: shuffled epochs of the dataset, one batch per step, the next
  epoch starting where the last one ends (several streams side by side for UFM's trusted and
  other examples).
* :class:`FreshDraw` -- AdaMerging: every step a new ``DataLoader(shuffle=True)`` over the
  unlabelled set, of which the reference's loop consumes two batches of 16 before it breaks;
  so every step sees ``micro_batches × batch`` distinct examples of a fresh permutation.
* :class:`EpochDraw` -- aTLAS' ``SubsetRandomSampler`` over an index list (the few-shot list
  oversampled to at least ten batches, :func:`tvtool.atlas.protocols.oversampled`): a
  permutation of the list every epoch, cut into batches, the last one possibly short.
* :class:`TwoStreamDraw` -- aTLAS' ``TwoStreamBatchSampler`` (``learn_ufm.py``): an epoch is
  one pass over the *primary* (non-trusted) indices in groups of ``3·batch//4`` (an incomplete
  group is dropped), each group followed by ``batch//4`` *secondary* (trusted) indices from
  endless reshuffles of the secondary list, restarted every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator
from itertools import count
from typing import Protocol

import torch
from torch import Tensor

from tvtool.atlas.examples import Examples

Batch = tuple[Tensor, Tensor]


class Draw(Protocol):
    """One dataset's source of training batches."""

    @property
    def batches_per_epoch(self) -> int | None:
        """Steps of this dataset's own epoch (None for endless draws)."""

    def begin(self, epoch_length: int | None) -> None:
        """Start drawing; epochs last ``epoch_length`` steps (None: endless draws)."""

    def next(self) -> list[Batch]:
        """The micro-batches of the next step."""

    def close(self) -> None:
        """Stop reading (shuts a DataLoader's worker processes down now, not at collection)."""


class StreamDraw:
    """tvtool's draw: one or more endless shuffled streams, one batch of each per step.

    Args:
        parts: ``(examples, batch)`` per stream; a step concatenates one batch of each.
        generator: Seeds the shuffles.
    """

    batches_per_epoch: int | None = None

    def __init__(self, parts: list[tuple[Examples, int]], generator: torch.Generator) -> None:
        self._streams = [examples.endless(batch, generator) for examples, batch in parts]

    def begin(self, epoch_length: int | None) -> None:
        """Endless: nothing to do."""

    def next(self) -> list[Batch]:
        """One batch of every stream, concatenated."""
        batches = [next(stream) for stream in self._streams]
        if len(batches) == 1:
            return batches
        return [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]

    def close(self) -> None:
        """Close the streams."""
        for stream in self._streams:
            if isinstance(stream, Generator):
                stream.close()


class _IndexDraw:
    """A draw whose steps are index batches into one :class:`Examples` part."""

    batches_per_epoch: int | None = None
    micro_batches = 1

    def __init__(self, examples: Examples, seed: int) -> None:
        self.examples = examples
        self.generator = torch.Generator().manual_seed(seed)
        self._data: Iterator[Batch] | None = None

    def _indices(self, epoch_length: int | None) -> Iterator[Tensor]:
        raise NotImplementedError

    def begin(self, epoch_length: int | None) -> None:
        """Start the index stream and its reader."""
        self._data = self.examples.stream(self._indices(epoch_length))

    def next(self) -> list[Batch]:
        """The next step's micro-batches."""
        if self._data is None:
            self.begin(self.batches_per_epoch)
        assert self._data is not None
        return [next(self._data) for _ in range(self.micro_batches)]

    def close(self) -> None:
        """Close the reader."""
        if isinstance(self._data, Generator):
            self._data.close()
        self._data = None


class FreshDraw(_IndexDraw):
    """AdaMerging's draw: a new permutation every step, ``micro_batches`` batches of it.

    Args:
        examples: The dataset's unlabelled examples.
        batch: Examples per micro-batch (the reference's 16).
        micro_batches: Micro-batches per step (the reference's 2; fewer when the dataset has
            fewer examples, as the reference's loader then runs out).
        seed: Seeds this dataset's permutations.
    """

    def __init__(self, examples: Examples, batch: int, micro_batches: int, seed: int) -> None:
        super().__init__(examples, seed)
        self.batch = batch
        self.micro_batches = min(micro_batches, math.ceil(examples.size / batch))

    def _indices(self, epoch_length: int | None) -> Iterator[Tensor]:
        while True:
            order = torch.randperm(self.examples.size, generator=self.generator)
            yield from order[:self.batch * self.micro_batches].split(self.batch)


class EpochDraw(_IndexDraw):
    """aTLAS' few-shot draw: a fresh permutation of an index list every epoch, in batches.

    Args:
        examples: The dataset part the indices point into.
        indices: The epoch's index list (repeats allowed: the oversampled few-shot list).
        batch: Examples per batch.
        seed: Seeds this dataset's permutations.
    """

    def __init__(self, examples: Examples, indices: Tensor, batch: int, seed: int) -> None:
        super().__init__(examples, seed)
        self.indices, self.batch = indices, batch
        self.epoch_batches = max(1, math.ceil(len(indices) / batch))
        self.batches_per_epoch = self.epoch_batches

    def _indices(self, epoch_length: int | None) -> Iterator[Tensor]:
        length = epoch_length or self.epoch_batches
        for _ in count():
            order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
            chunks = order.split(self.batch)
            # An epoch of the run is the shortest dataset's; longer ones restart early.
            yield from (chunks[i % len(chunks)] for i in range(length))


class TwoStreamDraw(_IndexDraw):
    """aTLAS' UFM draw (``TwoStreamBatchSampler``): primary groups plus secondary groups.

    Args:
        examples: The dataset part the indices point into.
        primary: Indices iterated once per epoch (the non-trusted examples).
        secondary: Indices iterated endlessly (the trusted examples, repeats allowed).
        batch: The step's examples of this dataset: ``3·batch//4`` primary, ``batch//4``
            secondary.
        seed: Seeds this dataset's shuffles.
    """

    def __init__(self, examples: Examples, primary: Tensor, secondary: Tensor, batch: int,
                 seed: int) -> None:
        super().__init__(examples, seed)
        self.primary, self.secondary = primary, secondary
        self.primary_batch, self.secondary_batch = 3 * batch // 4, batch // 4
        self.epoch_batches = len(primary) // max(1, self.primary_batch)
        self.batches_per_epoch = self.epoch_batches

    def _secondary(self) -> Iterator[Tensor]:
        while True:
            yield from self.secondary[torch.randperm(len(self.secondary),
                                                     generator=self.generator)]

    def _indices(self, epoch_length: int | None) -> Iterator[Tensor]:
        length = epoch_length or self.epoch_batches
        for _ in count():
            order = self.primary[torch.randperm(len(self.primary), generator=self.generator)]
            groups = order[:self.epoch_batches * self.primary_batch].split(
                self.primary_batch)
            secondary = self._secondary()  # restarted every epoch, as the sampler's __iter__
            for group in groups[:length]:
                extra = [next(secondary) for _ in range(self.secondary_batch)]
                yield torch.cat([group, torch.stack(extra)]) if extra else group
