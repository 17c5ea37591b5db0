"""``synthetic:<task>`` datasets: the downstream tasks of the embedded world."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from tvtool.data.base import Pool, TaskSpec
from tvtool.errors import InvalidInputError
from tvtool.synthetic_world.tasks import GENERATOR_VERSION, POOL_SIZES, TASKS, generate_task

PREFIX = "synthetic:"


class ArrayPool:
    """A pool over generated ``uint8 [N, 32, 32, 3]`` images and their labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])

    def member(self, index: int) -> str:
        return str(index)


class SyntheticSource:
    """A synthetic task; images are generated (and cached in memory) on first use."""

    def __init__(self, task: str, name: str) -> None:
        spec = TASKS[task]
        self.task = task
        self.spec = TaskSpec(name, tuple(spec.classnames), tuple(spec.templates))

    def pools(self) -> Mapping[str, Pool]:
        return {pool: ArrayPool(*generate_task(self.task, pool)) for pool in POOL_SIZES}

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "task": self.task, "generator_version": GENERATOR_VERSION,
                "pool_sizes": dict(POOL_SIZES)}


def synthetic_names() -> list[str]:
    """``synthetic:<task>`` for every task of the world."""
    return [PREFIX + task for task in TASKS]


def resolve_synthetic(name: str) -> SyntheticSource:
    """Resolve ``synthetic:<task>`` to its source.

    Raises:
        InvalidInputError: unknown task.
    """
    task = name[len(PREFIX):].strip().lower()
    if task not in TASKS:
        raise InvalidInputError(f"unknown synthetic task {task!r} in {name!r}",
                                hint=f"known: {', '.join(synthetic_names())}")
    return SyntheticSource(task, PREFIX + task)
