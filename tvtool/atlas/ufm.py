"""Unsupervised fine-tuning (UFM, ``learn_ufm.py`` of aTLAS): pseudo-labels and its training step.

Before training, each dataset's training part is labelled by the zero-shot model and a
class-balanced *trusted subset* of confident examples is chosen (:func:`trusted_subset`); every
step then draws a quarter of its batch from that subset and compares the predictions on a plain
and a strongly augmented view (:func:`ufm_outputs`; the loss is ``ufm`` in
:mod:`tvtool.atlas.objectives`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from tvtool.atlas.augment import augment
from tvtool.atlas.compose import ComposedEncoder
from tvtool.atlas.examples import Examples, read_example
from tvtool.atlas.objectives import TaskOutput
from tvtool.device import autocast
from tvtool.types import Logger


class _Indexed(Dataset[Any]):
    """``(image, index)`` pairs of a dataset: the label is replaced by the example's index."""

    def __init__(self, dataset: Dataset[Any], name: str) -> None:
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return read_example(self.dataset, index, self.name)[0], index


def trusted_subset(probabilities: Tensor) -> Tensor:
    """Indices of the class-balanced trusted subset of ``learn_ufm.py``.

    For every class, the ``k = min(⌊N / C / 10⌋, 100)`` examples (at least 1) with the highest
    zero-shot probability of that class; sorted, without repeats.

    Args:
        probabilities: ``[N, C]`` zero-shot softmax probabilities.
    """
    count, classes = int(probabilities.shape[0]), int(probabilities.shape[1])
    k = min(max(1, min(count // (classes * 10), 100)), count)
    chosen = torch.cat([probabilities[:, c].topk(k).indices for c in range(classes)])
    return torch.unique(chosen)


@dataclass
class UfmTask:
    """One dataset's UFM state: fixed pseudo-labels, trusted mask and the two example pools."""

    pseudo: Tensor
    trusted: Tensor
    streams: list[Iterator[tuple[Tensor, Tensor]]]


def ufm_task(name: str, train: Dataset[Any], head: Tensor, zero_weights: dict[str, Tensor],
             logits_of: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], per_task: int,
             generator: torch.Generator, device: torch.device, workers: int,
             batch_size: int, log: Logger) -> UfmTask:
    """Zero-shot pseudo-labels, the trusted subset, and the two example streams of one task.

    As ``learn_ufm.py``'s batch sampler: a quarter of each batch comes from the trusted subset
    (repeated as needed), the rest from the other examples.

    Args:
        name: Dataset name (messages).
        train: Its training part, ``(image, label)`` pairs (the labels are not used).
        head: Its zero-shot head on ``device``.
        zero_weights: The encoder weights of the zero-shot model (all coefficients 0).
        logits_of: ``(images, head, weights) -> logits`` of the learner.
        per_task: Examples of this task per step.
        generator: Seeds the shuffling of the two streams.
        device: The training device.
        workers: DataLoader workers for parts that do not fit on the device.
        batch_size: Batch of the pseudo-labelling pass.
        log: Receives the size of the trusted subset.
    """
    indexed = _Indexed(train, f"{name} (training part)")
    everything = Examples(indexed, f"{name} (training part)", device, workers)
    probabilities = torch.zeros(everything.size, head.shape[0])
    for images, index in everything.batches(batch_size, None):
        probabilities[index.cpu()] = logits_of(images, head, zero_weights).softmax(-1).cpu()
    trusted_index = trusted_subset(probabilities)
    mask = torch.zeros(everything.size, dtype=torch.bool)
    mask[trusted_index] = True
    rest = torch.nonzero(~mask).reshape(-1)
    log(f"{name}: {len(trusted_index)} trusted examples "
        f"({len(trusted_index) // max(1, head.shape[0])}+ per class), {len(rest)} others")
    del everything
    trusted_part = max(1, per_task // 4) if len(rest) else per_task
    streams = [Examples(Subset(indexed, trusted_index.tolist()), f"{name} (trusted)",
                        device, workers).endless(trusted_part, generator)]
    if len(rest) and per_task > trusted_part:
        streams.append(Examples(Subset(indexed, rest.tolist()), f"{name} (others)",
                                device, workers).endless(per_task - trusted_part, generator))
    return UfmTask(probabilities.argmax(-1).to(device), mask.to(device), streams)


def ufm_outputs(encoder: ComposedEncoder, coefficients: Tensor, ufm: Sequence[UfmTask],
                heads: Sequence[Tensor], kind: str, generator: torch.Generator,
                device: torch.device, precision: str) -> list[TaskOutput]:
    """One UFM step's outputs: plain-view logits (no gradient), strong-view logits.

    Args:
        encoder: The composed encoder.
        coefficients: The coefficient matrix being learned.
        ufm: Every task's state (:func:`ufm_task`), in the order of ``heads``.
        heads: The zero-shot heads.
        kind: Augmentation of the strong view (:func:`tvtool.atlas.augment.augment`).
        generator: Seeds the augmentation.
        device: The training device.
        precision: Autocast precision.
    """
    batches = []
    for task in ufm:
        parts = [next(stream) for stream in task.streams]
        batches.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    plain = torch.cat([images for images, _ in batches])
    with torch.no_grad():
        weights = encoder.weights(coefficients.detach())
        with autocast(device, precision):
            plain_feats = F.normalize(encoder.features(plain, weights).float(), dim=-1)
    with autocast(device, precision):
        strong_feats = encoder(coefficients, augment(plain, kind, generator))
    sizes = [len(images) for images, _ in batches]
    outputs = []
    for task, head, (_, index), p, s in zip(ufm, heads, batches, plain_feats.split(sizes),
                                            strong_feats.split(sizes), strict=True):
        outputs.append(TaskOutput(F.normalize(s.float(), dim=-1) @ head.T, None, "train",
                                  plain_logits=p @ head.T, pseudo_labels=task.pseudo[index],
                                  trusted=task.trusted[index]))
    return outputs
