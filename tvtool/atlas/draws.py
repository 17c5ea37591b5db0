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
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from tvtool.atlas.examples import Examples

Batch = tuple[Tensor, Tensor]


class Draw(Protocol):
    """One dataset's source of training batches."""

    @property
    def batches_per_epoch(self) -> int | None:
        """Steps of one epoch (None for endless draws)."""

    def start_epoch(self) -> None:
        """Begin a new epoch (a no-op for endless draws)."""

    def next(self) -> list[Batch]:
        """The micro-batches of the next step."""


class StreamDraw:
    """tvtool's draw: one or more endless shuffled streams, one batch of each per step.

    Args:
        parts: ``(examples, batch)`` per stream; a step concatenates one batch of each.
        generator: Seeds the shuffles.
    """

    batches_per_epoch: int | None = None

    def __init__(self, parts: list[tuple[Examples, int]], generator: torch.Generator) -> None:
        self._streams = [examples.endless(batch, generator) for examples, batch in parts]

    def start_epoch(self) -> None:
        """Endless: nothing to do."""

    def next(self) -> list[Batch]:
        """One batch of every stream, concatenated."""
        batches = [next(stream) for stream in self._streams]
        if len(batches) == 1:
            return batches
        return [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]


class FreshDraw:
    """AdaMerging's draw: a new permutation every step, ``micro_batches`` batches of it.

    Args:
        examples: The dataset's unlabelled examples.
        batch: Examples per micro-batch (the reference's 16).
        micro_batches: Micro-batches per step (the reference's 2).
        generator: Seeds the permutations.
    """

    batches_per_epoch: int | None = None

    def __init__(self, examples: Examples, batch: int, micro_batches: int,
                 generator: torch.Generator) -> None:
        self.examples, self.batch, self.micro = examples, batch, micro_batches
        self.generator = generator

    def start_epoch(self) -> None:
        """Every step is a fresh loader: nothing to do."""

    def next(self) -> list[Batch]:
        """The first ``micro_batches`` batches of a fresh permutation (fewer if it is short)."""
        order = torch.randperm(self.examples.size, generator=self.generator)
        chunks = order[:self.batch * self.micro].split(self.batch)
        return [self.examples.take(chunk) for chunk in chunks]


class EpochDraw:
    """aTLAS' few-shot draw: a fresh permutation of an index list every epoch, in batches.

    Args:
        examples: The dataset part the indices point into.
        indices: The epoch's index list (repeats allowed: the oversampled few-shot list).
        batch: Examples per batch.
        generator: Seeds the permutations.
    """

    def __init__(self, examples: Examples, indices: Tensor, batch: int,
                 generator: torch.Generator) -> None:
        self.examples, self.indices, self.batch = examples, indices, batch
        self.generator = generator
        self.batches_per_epoch = max(1, math.ceil(len(indices) / batch))
        self._batches: Iterator[Tensor] = iter(())

    def start_epoch(self) -> None:
        """Draw the epoch's permutation."""
        order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
        self._batches = iter(order.split(self.batch))

    def next(self) -> list[Batch]:
        """The epoch's next batch (a new epoch begins if this one is used up)."""
        chunk = next(self._batches, None)
        if chunk is None:
            self.start_epoch()
            chunk = next(self._batches)
        return [self.examples.take(chunk)]


class TwoStreamDraw:
    """aTLAS' UFM draw (``TwoStreamBatchSampler``): primary groups plus secondary groups.

    Args:
        examples: The dataset part the indices point into.
        primary: Indices iterated once per epoch (the non-trusted examples).
        secondary: Indices iterated endlessly (the trusted examples, repeats allowed).
        batch: The step's examples of this dataset: ``3·batch//4`` primary, ``batch//4``
            secondary.
        generator: Seeds the shuffles.
    """

    def __init__(self, examples: Examples, primary: Tensor, secondary: Tensor, batch: int,
                 generator: torch.Generator) -> None:
        self.examples, self.primary, self.secondary = examples, primary, secondary
        self.generator = generator
        self.primary_batch, self.secondary_batch = 3 * batch // 4, batch // 4
        self.batches_per_epoch = len(primary) // max(1, self.primary_batch)
        self._pairs: Iterator[Tensor] = iter(())

    def _secondary(self) -> Iterator[Tensor]:
        while True:
            yield from self.secondary[torch.randperm(len(self.secondary),
                                                     generator=self.generator)]

    def start_epoch(self) -> None:
        """Shuffle the primary indices and restart the secondary stream."""
        order = self.primary[torch.randperm(len(self.primary), generator=self.generator)]
        groups = order[:self.batches_per_epoch * self.primary_batch].split(self.primary_batch)
        secondary = self._secondary()

        def pairs() -> Iterator[Tensor]:
            for group in groups:
                extra = torch.stack([next(secondary) for _ in range(self.secondary_batch)]) \
                    if self.secondary_batch else group[:0]
                yield torch.cat([group, extra])

        self._pairs = pairs()

    def next(self) -> list[Batch]:
        """The epoch's next batch (a new epoch begins if this one is used up)."""
        chunk = next(self._pairs, None)
        if chunk is None:
            self.start_epoch()
            chunk = next(self._pairs)
        return [self.examples.take(chunk)]
