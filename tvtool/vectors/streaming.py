"""Streaming plans over :class:`~tvtool.io.TensorSource`: the plan type, and extract.

Combining vectors (apply, negate, eval, merge) is :mod:`tvtool.vectors.combine`.

The commands use these so that N inputs cost about one tensor of memory each, never N models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tvtool.errors import InvalidInputError, NumericalError
from tvtool.io import TensorInfo, TensorSource, all_finite
from tvtool.io.names import shared_wrapper_prefixes
from tvtool.limits import short_list, short_repr
from tvtool.types import StateDict
from tvtool.vectors.algebra import tensor_delta
from tvtool.vectors.rules import check_finite

# ---------------------------------------------------------------- key alignment


def align_keys(stored: Sequence[str], base: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """Map stored names to base names, removing a wrapper prefix if that makes them match.

    A wrapper prefix every stored name shares (:func:`tvtool.io.names.shared_wrapper_prefixes`:
    ``module.`` from DistributedDataParallel, ``model.`` from wrapper modules such as the
    published ``ImageEncoder``, or both) is removed only if that matches more base names than
    keeping it.

    Returns:
        The mapping (stored -> base) and the prefix removed, if any.
    """
    base_set = set(base)
    best: tuple[int, str | None] = (sum(1 for name in stored if name in base_set), None)
    for candidate in shared_wrapper_prefixes(stored):
        if stored:
            hits = sum(1 for name in stored if name[len(candidate):] in base_set)
            if hits > best[0]:
                best = (hits, candidate)
    prefix = best[1]
    if prefix is None:
        return {name: name for name in stored}, None
    return {name: name[len(prefix):] for name in stored}, prefix


Producer = Callable[[], torch.Tensor]
"""Computes one output tensor when called (reading its inputs only then)."""


@dataclass
class StreamPlan:
    """What a streaming command will write: the layout, and how to make each tensor.

    The tensors a plan yields are finite: a non-finite result is blamed on the input holding
    NaN/Inf (:class:`InvalidInputError`, exit 2) or reported as an overflow
    (:class:`NumericalError`, exit 1), so writers need not check them again.

    Attributes:
        layout: Output names, dtypes and shapes in write order.
        producers: Output name -> function computing that tensor from the inputs.
        notes: Human-readable remarks (normalised prefixes, skipped tensors) for stderr.
    """

    layout: list[TensorInfo]
    producers: dict[str, Producer] = field(repr=False, default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Compute the output tensors one at a time, in layout order."""
        for info in self.layout:
            yield info.name, self.producers[info.name]()

    @property
    def parameters(self) -> int:
        """Number of elements the plan writes."""
        return sum(info.numel for info in self.layout)


KEEP_CHOICES = ("image", "all", "changed")
"""``extract --keep``: the image encoder's floating tensors (the default of ``extract``, what
``finetune`` vectors hold), every floating tensor, or every floating tensor the fine-tune
changed."""

IMAGE_ENCODER_PREFIX = "visual."
"""Names of the image encoder in an open_clip state dict: the tensors a task vector holds."""


def plan_extract(base: TensorSource, finetuned: TensorSource, *, allow_missing: bool = False,
                 keep: str = "all") -> StreamPlan:
    """Plan ``finetuned - base`` tensor by tensor.

    Args:
        base: The pre-trained weights.
        finetuned: The fine-tuned weights (open_clip names, possibly under ``module.``/``model.``).
        allow_missing: Treat base tensors absent from the fine-tuned checkpoint as unchanged
            (for checkpoints holding only part of the kept tensors); without it they are an
            error.
        keep: ``image`` keeps the floating tensors under ``visual.`` (the image encoder, as
            the task-vector references and ``finetune`` do; tensors elsewhere that the
            fine-tune changed are counted in a note, never silently); ``all`` keeps every
            floating tensor; ``changed`` keeps every floating tensor whose delta is not zero.

    Raises:
        InvalidInputError: extra or missing keys (counts and first names), shape or dtype
            mismatch, NaN/Inf in an input.
    """
    if keep not in KEEP_CHOICES:
        raise InvalidInputError(f"--keep must be one of {', '.join(KEEP_CHOICES)}, not "
                                f"{short_repr(keep, 40)}")

    def kept(name: str) -> bool:
        return keep != "image" or name.startswith(IMAGE_ENCODER_PREFIX)

    base_keys = base.keys()
    base_set = set(base_keys)
    mapping, prefix = align_keys(finetuned.keys(), base_keys)
    notes: list[str] = []
    if prefix:
        notes.append(f"normalised {len(mapping)} names of {finetuned.label} by removing the "
                     f"{prefix!r} prefix")
    extra = sorted(stored for stored, name in mapping.items() if name not in base_set)
    if extra:
        raise InvalidInputError(
            f"{finetuned.label} has {len(extra)} tensors that are not in the base, e.g. "
            f"{short_list(extra, 3)}", hint="is it a checkpoint of the same architecture?")
    covered = set(mapping.values())
    missing = [name for name in base_keys if name not in covered and kept(name)
               and base.info(name).dtype.is_floating_point]
    if missing and not allow_missing:
        what = "the base's image encoder" if keep == "image" else "the base"
        raise InvalidInputError(
            f"{finetuned.label} lacks {len(missing)} tensors of {what}, e.g. "
            f"{short_list(missing, 3)}",
            hint="pass --allow-missing if the checkpoint holds only part of the model "
                 "(those tensors are then taken as unchanged)")
    if missing:
        notes.append(f"{len(missing)} base tensors absent from {finetuned.label} taken as "
                     "unchanged")
    layout: list[TensorInfo] = []
    producers: dict[str, Producer] = {}
    skipped = 0
    left_out = 0  # tensors outside the image encoder that the fine-tune changed
    for stored, name in mapping.items():
        ft_info, base_info = finetuned.info(stored), base.info(name)
        if ft_info.shape != base_info.shape:
            raise InvalidInputError(f"tensor {name!r}: base shape {base_info.shape}, fine-tuned "
                                    f"shape {ft_info.shape}")
        if ft_info.dtype != base_info.dtype:
            raise InvalidInputError(
                f"tensor {name!r}: base dtype {base_info.dtype}, fine-tuned dtype {ft_info.dtype}",
                hint="save both models in the same precision")
        if not ft_info.dtype.is_floating_point:
            skipped += 1
            continue
        if not kept(name):
            # Read once, to say so when the default drops a change (a fine-tuned text tower).
            if not torch.equal(base.get(name), finetuned.get(stored)):
                left_out += 1
            continue
        if keep == "changed":
            b, f = base.get(name), finetuned.get(stored)
            check_finite(b, name, base.label)
            check_finite(f, stored, finetuned.label)
            if torch.equal(b, f):
                skipped += 1
                continue
        layout.append(TensorInfo(name, ft_info.dtype, ft_info.shape))
        producers[name] = functools.partial(_delta_of, base, finetuned, name, stored)
    if skipped:
        reason = "unchanged or non-floating" if keep == "changed" else "non-floating"
        notes.append(f"skipped {skipped} {reason} tensors")
    if left_out:
        notes.append(f"note: {left_out} tensors outside the image encoder differ from the base "
                     "and are left out of the vector (--keep all keeps them)")
    if not layout:
        raise InvalidInputError(
            "the task vector would be empty: no floating tensor "
            + ("of the image encoder (visual.*) " if keep == "image" else "") + "changed",
            hint="--keep all keeps the tensors outside the image encoder"
            if keep == "image" else None)
    return StreamPlan(layout, producers, notes)


def _delta_of(base: TensorSource, finetuned: TensorSource, name: str, stored: str
              ) -> torch.Tensor:
    b, f = base.get(name), finetuned.get(stored)
    delta = tensor_delta(b, f)
    if not all_finite(delta):
        check_finite(b, name, base.label)
        check_finite(f, stored, finetuned.label)
        raise overflow(name)
    return delta


def overflow(name: str) -> NumericalError:
    """The error for a non-finite result computed from finite inputs."""
    return NumericalError(f"result tensor {name!r} contains NaN or Inf although the inputs "
                          "are finite (overflow)",
                          hint="check the coefficients, or use a wider dtype")


def state_dict_of(source: TensorSource) -> StateDict:
    """Load every tensor of a source into memory (for small models and tests)."""
    names = source.keys()
    return {name: source.get(name) for name in names}

