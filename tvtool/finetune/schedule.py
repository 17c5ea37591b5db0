"""The training schedule: how many steps a run takes, and the learning rate of each."""

from __future__ import annotations

import math

from tvtool.finetune.config import DEFAULT_STEPS, REFERENCE_WARMUP, FinetuneConfig


def learning_rate(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Reference schedule: linear warm-up to ``base_lr``, then cosine decay to 0.

    Args:
        step: 0-based optimizer step.
        total: Steps in the run.
        warmup: Warm-up steps.
        base_lr: Peak learning rate.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def default_warmup(total: int) -> int:
    """500 steps as in the reference recipe (2000 steps), at most a quarter of shorter runs."""
    return min(REFERENCE_WARMUP, total // 4)


def total_steps(config: FinetuneConfig, dataset_size: int) -> int:
    """Optimizer steps of the run (from ``steps``, ``epochs`` or the 2000-step default)."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * dataset_size / config.batch_size))
    return DEFAULT_STEPS
