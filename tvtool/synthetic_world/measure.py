"""Measuring the embedded world: zero-shot accuracy of a CLIP model on synthetic tasks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tvtool.models import ClipBundle, build_zero_shot_head
from tvtool.synthetic_world.pretrain import images_to_tensor, normalization
from tvtool.synthetic_world.tasks import TASKS, generate_task


@torch.no_grad()
def zero_shot_accuracy(bundle: ClipBundle, task: str, pool: str = "test", n: int | None = None,
                       batch: int = 500) -> float:
    """Top-1 zero-shot accuracy of ``bundle`` on a synthetic task.

    Uses the task's class names and templates through
    :func:`tvtool.models.build_zero_shot_head`; logits are ``normalize(f(x)) @ head.T``.

    Args:
        bundle: The CLIP model to evaluate.
        task: Synthetic task name (e.g. ``"shape"``).
        pool: ``"test"`` or ``"train"``.
        n: Number of images (default: the whole pool).
        batch: Images per forward pass.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    spec = TASKS[task]
    head = build_zero_shot_head(bundle, spec.classnames, spec.templates)
    images, labels = generate_task(task, pool, n)
    mean, std = normalization(bundle.preprocess_eval)
    model: Any = bundle.model.eval()  # open_clip's CLIP, typed as a plain Module
    correct = 0
    for start in range(0, len(labels), batch):
        x = images_to_tensor(images[start:start + batch], mean, std)
        feats = F.normalize(model.encode_image(x), dim=-1)
        pred = (feats @ head.T).argmax(dim=-1)
        correct += int((pred == torch.tensor(labels[start:start + batch])).sum())
    return correct / len(labels)
