"""Unsupervised FixMatch (UFM, ``learn_ufm.py`` of aTLAS): pseudo-labels, trusted examples, step.

Before training, each dataset's training part is labelled by the zero-shot model and a
class-balanced *trusted* set of confident examples is chosen; every step then draws a quarter
of its batch from the trusted examples and the rest from the others, and compares the
predictions on a plain and a strongly augmented view (:func:`ufm_outputs`; the loss is ``ufm``
in :mod:`tvtool.atlas.objectives`).

Two readings of the reference (``ufm_reading``):

* ``code`` -- what ``learn_ufm.py`` computes: its mask ``trusted_bool[ids_c] = 1`` is set with
  ``ids_c``, the full ``argsort`` of the *last* class's zero-shot probabilities, i.e. every
  example; so every example's target is its one-hot zero-shot pseudo-label, the 0.99
  threshold never filters, and the loss is the cross-entropy of the strong view against the
  fixed pseudo-labels. (The trusted set still shapes the batches.)
* ``paper`` -- the stated intent: only the trusted set gets pseudo-label targets; the other
  examples' targets are the current model's softmax on the plain view, counted above the
  threshold.

And two samplers: the ``atlas`` protocol's :class:`~tvtool.atlas.draws.TwoStreamDraw` over the
reference's trusted list (``k = min(⌊N / C / 10⌋, 100)`` per class, repeats kept), and the
``tvtool`` protocol's two endless streams over the de-duplicated set (``k`` at least 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from tvtool.atlas.augment import augment
from tvtool.atlas.compose import ComposedEncoder
from tvtool.atlas.draws import Draw, StreamDraw, TwoStreamDraw
from tvtool.atlas.examples import Examples, read_example
from tvtool.atlas.objectives import TaskOutput
from tvtool.device import autocast
from tvtool.errors import UsageError
from tvtool.types import Logger


class Indexed(Dataset[Any]):
    """``(image, index)`` pairs of a dataset: the label is replaced by the example's index."""

    def __init__(self, dataset: Dataset[Any], name: str) -> None:
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return read_example(self.dataset, index, self.name)[0], index


def trusted_subset(probabilities: Tensor) -> Tensor:
    """Indices of the class-balanced trusted subset (tvtool protocol).

    For every class, the ``k = min(⌊N / C / 10⌋, 100)`` examples (at least 1) with the highest
    zero-shot probability of that class; sorted, without repeats.

    Args:
        probabilities: ``[N, C]`` zero-shot softmax probabilities.
    """
    count, classes = int(probabilities.shape[0]), int(probabilities.shape[1])
    k = min(max(1, min(count // (classes * 10), 100)), count)
    chosen = torch.cat([probabilities[:, c].topk(k).indices for c in range(classes)])
    return torch.unique(chosen)


def reference_trusted(probabilities: Tensor) -> Tensor:
    """The trusted list of ``learn_ufm.py``: per class the top ``k``, concatenated, sorted.

    ``k = min(int(N / C / 10), 100)``; an example in the top ``k`` of several classes appears
    once per class (the reference keeps the repeats, so it is drawn more often).

    Raises:
        UsageError: ``k`` is 0 (fewer than 10 examples per class), where the reference's
            ``ids_c[-0:]`` would trust every example and leave nothing to train on.
    """
    count, classes = int(probabilities.shape[0]), int(probabilities.shape[1])
    k = min(int(count / classes / 10), 100)
    if k == 0:
        raise UsageError(f"UFM's reference trusted set needs at least 10 examples per class "
                         f"({count} examples for {classes} classes)",
                         hint="use more examples (--all-examples), or --protocol tvtool")
    chosen = torch.cat([torch.argsort(probabilities[:, c])[-k:] for c in range(classes)])
    return torch.sort(chosen).values


@dataclass
class UfmTask:
    """One dataset's UFM state: fixed pseudo-labels, the loss's trusted mask and the draw."""

    pseudo: Tensor
    trusted: Tensor
    draw: Draw
    reading: str


def zero_shot_probabilities(examples: Examples, head: Tensor, zero_weights: dict[str, Tensor],
                            logits_of: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor],
                            batch_size: int) -> Tensor:
    """``[N, C]`` zero-shot softmax of every example of an :class:`Indexed` part (CPU)."""
    probabilities = torch.zeros(examples.size, head.shape[0])
    for images, index in examples.batches(batch_size, None):
        probabilities[index.cpu()] = logits_of(images, head, zero_weights).float() \
            .softmax(-1).cpu()
    return probabilities


def ufm_task(name: str, train: Dataset[Any], head: Tensor, zero_weights: dict[str, Tensor],
             logits_of: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], per_task: int,
             generator: torch.Generator, device: torch.device, workers: int,
             batch_size: int, log: Logger, *, sampler: str = "tvtool",
             reading: str = "paper", seed: int = 0) -> UfmTask:
    """Zero-shot pseudo-labels, the trusted examples and the batch draw of one task.

    Args:
        name: Dataset name (messages).
        train: Its training part, ``(image, label)`` pairs (the labels are not used).
        head: Its zero-shot head on ``device``.
        zero_weights: The encoder weights of the zero-shot model (all coefficients 0).
        logits_of: ``(images, head, weights) -> logits`` of the learner.
        per_task: Examples of this task per step.
        generator: Seeds the ``tvtool`` sampler's streams.
        device: The training device.
        workers: DataLoader workers for parts that do not fit on the device.
        batch_size: Batch of the pseudo-labelling pass.
        log: Receives the size of the trusted set.
        sampler: ``atlas`` (the reference's trusted list and two-stream sampler) or
            ``tvtool`` (de-duplicated trusted set, two endless streams).
        reading: ``code`` (every example trusted in the loss) or ``paper``.
        seed: Seeds the ``atlas`` sampler (its own generator).

    Raises:
        UsageError: too few examples for the reference's trusted set or sampler.
    """
    indexed = Indexed(train, f"{name} (training part)")
    everything = Examples(indexed, f"{name} (training part)", device, workers)
    probabilities = zero_shot_probabilities(everything, head, zero_weights, logits_of,
                                            batch_size)
    pseudo = probabilities.argmax(-1).to(device)
    trusted = reference_trusted(probabilities) if sampler == "atlas" \
        else trusted_subset(probabilities)
    member = torch.zeros(everything.size, dtype=torch.bool)
    member[trusted] = True
    rest = torch.nonzero(~member).reshape(-1)
    log(f"{name}: {len(torch.unique(trusted))} trusted examples "
        f"({len(trusted) // max(1, head.shape[0])}+ per class), {len(rest)} others; "
        + ("every example trusted in the loss (learn_ufm.py as it runs)" if reading == "code"
           else "the others' soft targets thresholded (the paper's reading)"))
    mask = torch.ones_like(member) if reading == "code" else member
    draw: Draw
    if sampler == "atlas":
        two = TwoStreamDraw(everything, rest, trusted, per_task, seed)
        if two.epoch_batches < 1:
            raise UsageError(f"{name}: {len(rest)} untrusted examples do not fill one batch "
                             f"of {two.primary_batch} (the reference's epoch would be empty)",
                             hint="use more examples or a smaller --batch-size")
        draw = two
    else:
        del everything
        trusted_part = max(1, per_task // 4) if len(rest) else per_task
        parts = [(Examples(Subset(indexed, trusted.tolist()), f"{name} (trusted)", device,
                           workers), trusted_part)]
        if len(rest) and per_task > trusted_part:
            parts.append((Examples(Subset(indexed, rest.tolist()), f"{name} (others)", device,
                                   workers), per_task - trusted_part))
        draw = StreamDraw(parts, generator)
    return UfmTask(pseudo, mask.to(device), draw, reading)


def ufm_outputs(encoder: ComposedEncoder, coefficients: Tensor, ufm: Sequence[UfmTask],
                heads: Sequence[Tensor], kind: str, generator: torch.Generator,
                device: torch.device, precision: str) -> list[TaskOutput]:
    """One UFM step's outputs: strong-view logits, and plain-view logits (no gradient).

    The plain view is computed only for the ``paper`` reading: in the ``code`` reading every
    target is the fixed pseudo-label, so the plain view's prediction is never used.

    Args:
        encoder: The composed encoder.
        coefficients: The (effective) coefficient matrix being learned.
        ufm: Every task's state (:func:`ufm_task`), in the order of ``heads``.
        heads: The zero-shot heads.
        kind: Augmentation of the strong view (:func:`tvtool.atlas.augment.augment`).
        generator: Seeds the augmentation.
        device: The training device.
        precision: Autocast precision.
    """
    batches = [task.draw.next()[0] for task in ufm]
    plain = torch.cat([images for images, _ in batches])
    sizes = [len(images) for images, _ in batches]
    plain_parts: list[Tensor | None] = [None] * len(ufm)
    if any(task.reading == "paper" for task in ufm):
        with torch.no_grad():
            weights = encoder.weights(coefficients.detach())
            with autocast(device, precision):
                plain_feats = F.normalize(encoder.features(plain, weights).float(), dim=-1)
        plain_parts = [p if task.reading == "paper" else None
                       for task, p in zip(ufm, plain_feats.split(sizes), strict=True)]
    with autocast(device, precision):
        strong_feats = encoder(coefficients, augment(plain, kind, generator))
    outputs = []
    for task, head, (_, index), p, s in zip(ufm, heads, batches, plain_parts,
                                            strong_feats.split(sizes), strict=True):
        outputs.append(TaskOutput(F.normalize(s.float(), dim=-1) @ head.T, None, "train",
                                  plain_logits=None if p is None else p @ head.T,
                                  pseudo_labels=task.pseudo[index],
                                  trusted=task.trusted[index]))
    return outputs
