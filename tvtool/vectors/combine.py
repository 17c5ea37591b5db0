"""The one streaming combination of task vectors: ``[base +] reduce(vector_1 .. vector_N)``.

Apply, negate and eval combine vectors as ``[base +] Σ coef_i · vector_i``
(:func:`plan_combine`); merge combines them with a method's per-tensor function
(:class:`tvtool.merge.plan.MergePlan`). Both go through this module, which owns the rules they
share:

* key alignment (:func:`align_vectors`): with a base, the output holds every base tensor and
  the vectors may hold only base tensors; without one, the ``missing`` policy decides between
  refusing differing key sets, the union (absent = zero) and the shared tensors;
* shape, floating-point and dtype checks, all before anything is read; the output dtype is
  the reference's (the base's, or the first holder's), or the promoted dtype of the holders
  (``promote``, merge);
* base addition and the accumulation dtype (float64 for float64 outputs, float32 otherwise);
* the NaN/Inf check of every result, blaming an input holding NaN/Inf
  (:class:`~tvtool.errors.InvalidInputError`) before calling it an overflow
  (:class:`~tvtool.errors.NumericalError`).

A caller supplies only its per-tensor reduction (:data:`Reduce`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import TensorInfo, TensorSource, all_finite
from tvtool.limits import short_list
from tvtool.vectors.algebra import accumulation_dtype, add_to_sum, start_sum
from tvtool.vectors.rules import check_finite, check_same_keys
from tvtool.vectors.streaming import Producer, StreamPlan, overflow

MISSING_POLICIES = ("refuse", "zero", "common")
"""Key-set policies without a base: refuse differing key sets, the union, the shared keys."""


@dataclass(frozen=True)
class Alignment:
    """Which tensors a combination writes, and which vectors hold each.

    Attributes:
        layout: Output names, dtypes and shapes in write order.
        present: Output name -> indices of the vectors that hold it (ascending).
        dropped: Tensors left out under the ``common`` policy.
    """

    layout: list[TensorInfo]
    present: dict[str, tuple[int, ...]] = field(repr=False)
    dropped: int = 0


def align_vectors(vectors: Sequence[TensorSource], base: TensorSource | None = None, *,
                  missing: str = "zero", promote: bool = False,
                  refuse_hint: str | None = None) -> Alignment:
    """Check that vectors can be combined (onto ``base``) and lay out the result.

    Nothing is read: only names, shapes and dtypes.

    Args:
        vectors: The task vectors, in coefficient order.
        base: With a base, the output holds every base tensor, in its dtype and order.
        missing: Without a base, the key-set policy (:data:`MISSING_POLICIES`).
        promote: Store each tensor in the promoted dtype of its holders instead of refusing
            differing dtypes (merge).
        refuse_hint: The hint of the error for differing key sets under ``refuse``.

    Returns:
        The layout and, per tensor, the vectors holding it.

    Raises:
        InvalidInputError: nothing to combine, vector tensors not in the base, differing key
            sets under ``refuse``, a shape or dtype mismatch, a non-floating vector tensor.
        UsageError: an unknown ``missing`` policy.
    """
    if not vectors and base is None:
        raise InvalidInputError("nothing to combine")
    if missing not in MISSING_POLICIES:
        raise UsageError(f"unknown missing-tensor policy {missing!r}")
    key_lists = [source.keys() for source in vectors]
    key_sets = [set(keys) for keys in key_lists]
    dropped = 0
    if base is not None:
        names = base.keys()
        base_set = set(names)
        for source, key_set in zip(vectors, key_sets, strict=True):
            extra = sorted(key_set - base_set)
            if extra:
                raise InvalidInputError(
                    f"{source.label} has {len(extra)} tensors that are not in the base, e.g. "
                    f"{short_list(extra, 3)}", hint="was it extracted from another architecture?")
    elif missing == "refuse":
        for source, key_list in zip(vectors[1:], key_lists[1:], strict=True):
            check_same_keys(key_lists[0], key_list, vectors[0].label, source.label,
                            hint=refuse_hint)
        names = list(key_lists[0])
    elif missing == "common":
        common = set.intersection(*key_sets)
        names = [name for name in key_lists[0] if name in common]
        dropped = len(set.union(*key_sets)) - len(names)
    else:
        names, seen = [], set()
        for key_list in key_lists:
            for name in key_list:
                if name not in seen:
                    names.append(name)
                    seen.add(name)
    layout: list[TensorInfo] = []
    present: dict[str, tuple[int, ...]] = {}
    for name in names:
        held = tuple(i for i, key_set in enumerate(key_sets) if name in key_set)
        if base is not None:
            expected, expected_label = base.info(name), base.label
        else:
            expected, expected_label = vectors[held[0]].info(name), vectors[held[0]].label
        dtype = expected.dtype
        for index in held:
            info = vectors[index].info(name)
            _check_info(name, info, vectors[index].label, expected, expected_label,
                        same_dtype=not promote)
            dtype = torch.promote_types(dtype, info.dtype)
        layout.append(TensorInfo(name, dtype, expected.shape))
        present[name] = held
    return Alignment(layout, present, dropped)


def _check_info(name: str, info: TensorInfo, label: str, expected: TensorInfo,
                expected_label: str, *, same_dtype: bool) -> None:
    if info.shape != expected.shape:
        raise InvalidInputError(f"tensor {name!r}: {label} has shape {info.shape}, "
                                f"{expected_label} has {expected.shape}",
                                hint="were they made from the same architecture?")
    if not info.dtype.is_floating_point:
        raise InvalidInputError(f"tensor {name!r} of {label} is {info.dtype}; task vectors "
                                "hold floating tensors only")
    if same_dtype and info.dtype != expected.dtype:
        raise InvalidInputError(f"tensor {name!r}: {label} is {info.dtype}, {expected_label} "
                                f"is {expected.dtype}",
                                hint="convert the files to one precision first")


Reduce = Callable[[torch.Tensor | None, torch.dtype], torch.Tensor]
"""A caller's per-tensor reduction of the vectors holding one tensor:
``reduce(acc, acc_dtype) -> result``. ``acc`` is a fresh copy of the base tensor in the
accumulation dtype ``acc_dtype`` (to add the vectors' terms to in place), or None without a
base. The result is in ``acc_dtype``; :func:`combine_tensor` casts and checks it."""


def combine_tensor(name: str, info: TensorInfo, vectors: Sequence[TensorSource],
                   held: Sequence[int], reduce: Reduce,
                   base: TensorSource | None = None) -> torch.Tensor:
    """One output tensor of a combination: ``[base +] reduce(...)``, cast and checked.

    Args:
        name: The tensor.
        info: Its output layout entry (from :func:`align_vectors`).
        vectors: All vectors of the combination.
        held: The indices of the vectors holding ``name``.
        reduce: The caller's per-tensor reduction.
        base: The base, when the output is a checkpoint.

    Raises:
        InvalidInputError: an input tensor holds NaN or Inf.
        NumericalError: the result is not finite although the inputs are (overflow).
    """
    acc_dtype = accumulation_dtype(info.dtype)
    acc: torch.Tensor | None = None
    if base is not None:
        base_tensor = base.get(name)
        if not held:
            check_finite(base_tensor, name, base.label)
            return base_tensor
        acc = start_sum(base_tensor, 1.0, acc_dtype)
        del base_tensor
    result = reduce(acc, acc_dtype).to(info.dtype)
    if not all_finite(result):
        # One check of the result instead of one per input (every reduction carries a NaN or
        # Inf of an input into its result); only now are the inputs read again, to find it.
        if base is not None:
            check_finite(base.get(name), name, base.label)
        for index in held:
            check_finite(vectors[index].get(name), name, vectors[index].label)
        raise overflow(name)
    return result


def weighted_sum(name: str, vectors: Sequence[TensorSource], held: Sequence[int],
                 coefs: Sequence[float]) -> Reduce:
    """The reduction ``acc + Σ coef_i · vector_i``, reading one input at a time.

    Without a base the first term starts the sum (``coef · vector``), so nothing is added to
    an extra zero.
    """
    def reduce(acc: torch.Tensor | None, acc_dtype: torch.dtype) -> torch.Tensor:
        for index in held:
            tensor = vectors[index].get(name)
            acc = (start_sum(tensor, coefs[index], acc_dtype) if acc is None
                   else add_to_sum(acc, tensor, coefs[index]))
            del tensor
        if acc is None:  # pragma: no cover - align_vectors lists only held names then
            raise InvalidInputError(f"no input holds tensor {name!r}")
        return acc

    return reduce


def plan_combine(base: TensorSource | None, vectors: Sequence[tuple[TensorSource, float]], *,
                 allow_subset: bool = True) -> StreamPlan:
    """Plan ``[base +] Σ coef_i · vector_i`` tensor by tensor.

    With a base, the output holds every base tensor (a full checkpoint). Without one, the
    output is a task vector over the union of the vectors' tensors, a missing tensor counting
    as zero (with ``allow_subset=False`` the vectors must hold the same tensors).

    Memory: each output tensor is accumulated in place, reading one input tensor at a time,
    so the peak is about one output tensor plus one input tensor beyond what the sources map.

    Raises:
        InvalidInputError: keys not in the base, differing key sets, shape or dtype mismatch,
            non-floating vector tensors (all before anything is read); NaN/Inf in an input
            (when its tensor is read).
    """
    sources = [source for source, _ in vectors]
    coefs = [coef for _, coef in vectors]
    alignment = align_vectors(sources, base, missing="zero" if allow_subset else "refuse")
    producers: dict[str, Producer] = {}
    for info in alignment.layout:
        held = alignment.present[info.name]
        producers[info.name] = functools.partial(
            combine_tensor, info.name, info, sources, held,
            weighted_sum(info.name, sources, held, coefs), base)
    return StreamPlan(alignment.layout, producers)
