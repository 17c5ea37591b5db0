"""Which examples each step sees: processes, the deterministic stream and its sampler.

Everything here is a pure function of (seed, position), so a resumed run, a run with a
different number of processes or data-loader workers, and an uninterrupted run see the same
batches (see :mod:`tvtool.finetune.loop`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tvtool.errors import InvalidInputError, UsageError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (world 1 when run directly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and reports progress."""
        return self.rank == 0


SINGLE_PROCESS = DistInfo()
"""One process, no torchrun."""


def dist_from_env() -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("malformed RANK/WORLD_SIZE/LOCAL_RANK environment") from None
    return DistInfo(rank, world, local)




class SampleStream:
    """Position -> dataset index: one seeded permutation of the dataset per epoch."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise InvalidInputError("the training split is empty")
        self.size = size
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def index(self, position: int) -> int:
        """Dataset index at a stream position."""
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._perm[offset])


class MicroBatches(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches from ``start_step`` on, as ``(index, position)`` lists."""

    def __init__(self, stream: SampleStream, batch_size: int, grad_accum: int, info: DistInfo,
                 start_step: int, total_steps: int) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.info = info
        self.start_step = start_step
        self.total_steps = total_steps
        self.micro = batch_size // (grad_accum * info.world)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            for k in range(self.grad_accum):
                first = step * self.batch_size + (k * self.info.world + self.info.rank) * self.micro
                yield [(self.stream.index(p), p) for p in range(first, first + self.micro)]


def _sample_seed(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


class SeededSamples(Dataset):
    """Wraps a dataset so ``dataset[(index, position)]`` draws its augmentation from a seed.

    The seed depends on the run seed and the stream position only, so augmentations do not
    depend on worker count, process count or resumption.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, position = item
        sample_seed = _sample_seed(self.seed, position)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # Seeds the CPU generator only (the one CPU-side augmentations draw from), as
            # torch.manual_seed does for the CPU; torch.manual_seed would also queue a lazy
            # seed for every accelerator backend, recording a stack trace per sample, which
            # cost more than rendering the sample.
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)
