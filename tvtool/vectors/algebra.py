"""Task-vector algebra over in-memory state dicts, and its per-tensor primitives.

The pure functions (``extract``, ``negate``, ``scale``, ``add``, ``apply``) serve the library
and the property tests; the streaming plans of :mod:`tvtool.vectors.streaming` use the same
per-tensor primitives (``tensor_delta``, ``start_sum``, ``add_to_sum``), so the two cannot
disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvtool.errors import InvalidInputError
from tvtool.limits import short_list
from tvtool.types import StateDict
from tvtool.vectors.rules import LORA_SUFFIXES, check_same_dtype, check_same_keys, check_same_shape

_CHUNK = 1 << 22  # elements per float64 slice: bounds the temporary memory to ~100 MB


def tensor_delta(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """``finetuned - base`` computed in float64, stored in the fine-tuned tensor's dtype.

    Large tensors are processed in slices, so the float64 temporaries stay small.
    """
    out = torch.empty(finetuned.shape, dtype=finetuned.dtype)
    flat_out, flat_b, flat_f = out.view(-1), base.reshape(-1), finetuned.reshape(-1)
    for start in range(0, flat_out.numel(), _CHUNK):
        stop = start + _CHUNK
        flat_out[start:stop] = flat_f[start:stop].double() - flat_b[start:stop].double()
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def start_sum(first: torch.Tensor, coef: float, acc_dtype: torch.dtype) -> torch.Tensor:
    """A fresh accumulator holding ``coef · first`` (never an alias of ``first``)."""
    if coef == 1.0:
        return first.to(acc_dtype, copy=True)
    # One pass: the multiplication allocates the accumulator itself.
    return torch.mul(first.to(acc_dtype), coef)


def add_to_sum(acc: torch.Tensor, delta: torch.Tensor, coef: float) -> torch.Tensor:
    """``acc += coef · delta`` in place, in the accumulator's dtype; returns ``acc``.

    A coefficient beyond the accumulator's range makes the sum overflow to ±Inf (which the
    writer then reports) instead of raising inside torch.
    """
    if abs(coef) > torch.finfo(acc.dtype).max:
        return acc.add_(delta.to(acc.dtype).mul(coef))
    return acc.add_(delta.to(acc.dtype), alpha=coef)


def tensor_combine(
    base: torch.Tensor | None, deltas: Sequence[torch.Tensor], coefs: Sequence[float],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``base + Σ coef_i · delta_i`` accumulated in float32 (float64 for float64 outputs).

    The inputs are never modified and the result never aliases them.

    Raises:
        ValueError: neither a base nor a delta was given.
    """
    acc_dtype = accumulation_dtype(out_dtype)
    acc = start_sum(base, 1.0, acc_dtype) if base is not None else None
    for delta, coef in zip(deltas, coefs, strict=True):
        acc = start_sum(delta, coef, acc_dtype) if acc is None else add_to_sum(acc, delta, coef)
    if acc is None:
        raise ValueError("tensor_combine needs a base or at least one delta")
    return acc.to(out_dtype)


# ---------------------------------------------------------------- pure StateDict functions


def extract(base: StateDict, finetuned: StateDict) -> StateDict:
    """Task vector ``finetuned - base`` over the floating tensors of ``finetuned``.

    Raises:
        InvalidInputError: a key of ``finetuned`` missing from ``base``, or a shape or dtype
            mismatch.
    """
    out: StateDict = {}
    for name, tensor in finetuned.items():
        if not tensor.is_floating_point():
            continue
        if name not in base:
            raise InvalidInputError(f"tensor {name!r} of the fine-tuned model is not in the base")
        check_same_shape(name, base[name], tensor)
        check_same_dtype(name, base[name], tensor)
        out[name] = tensor_delta(base[name], tensor)
    return out


def _refuse_factors(vectors: Sequence[StateDict], operation: str) -> None:
    # Elementwise algebra on LoRA factors is wrong: scaling both A and B by c scales ΔW by c².
    for vector in vectors:
        factors = [n for n in vector if n.endswith(LORA_SUFFIXES)]
        if factors:
            raise InvalidInputError(
                f"{operation} of a LoRA vector (e.g. {factors[0]!r}) would act on each factor",
                hint="turn it into dense deltas first with tvtool.formats.materialize_lora")


def scale(vector: StateDict, coef: float) -> StateDict:
    """Multiply every tensor of a dense task vector by ``coef`` (new tensors, same dtypes).

    Raises:
        InvalidInputError: the vector holds LoRA factors (materialise them first).
    """
    _refuse_factors([vector], "scale")
    return {name: tensor_combine(None, [t], [coef], t.dtype) for name, t in vector.items()}


def negate(vector: StateDict) -> StateDict:
    """The negated dense task vector; exact, so negating twice is identity.

    Raises:
        InvalidInputError: the vector holds LoRA factors (materialise them first).
    """
    _refuse_factors([vector], "negate")
    return {name: -t for name, t in vector.items()}


def add(vectors: Sequence[StateDict], coefs: Sequence[float] | None = None) -> StateDict:
    """``Σ coef_i · vector_i`` over dense vectors with identical key sets, shapes and dtypes.

    Raises:
        InvalidInputError: if the vectors do not share keys, shapes and dtypes, or hold LoRA
            factors.
    """
    if not vectors:
        raise InvalidInputError("add needs at least one task vector")
    _refuse_factors(vectors, "add")
    coefs = list(coefs) if coefs is not None else [1.0] * len(vectors)
    if len(coefs) != len(vectors):
        raise InvalidInputError(f"{len(coefs)} coefficients for {len(vectors)} vectors")
    first = vectors[0]
    for index, vector in enumerate(vectors[1:], start=1):
        check_same_keys(list(first), list(vector), "vector 0", f"vector {index}")
    out: StateDict = {}
    for name, tensor in first.items():
        parts = [v[name] for v in vectors]
        for part in parts[1:]:
            check_same_shape(name, tensor, part)
            check_same_dtype(name, tensor, part)
        out[name] = tensor_combine(None, parts, coefs, tensor.dtype)
    return out


def apply(base: StateDict, vectors: Sequence[StateDict], coefs: Sequence[float] | None = None
          ) -> StateDict:
    """``base + Σ coef_i · vector_i``; tensors a vector lacks stay as in the base.

    Raises:
        InvalidInputError: a vector key not in the base, a non-floating base tensor in a
            vector, or a shape or dtype mismatch.
    """
    coefs = list(coefs) if coefs is not None else [1.0] * len(vectors)
    if len(coefs) != len(vectors):
        raise InvalidInputError(f"{len(coefs)} coefficients for {len(vectors)} vectors")
    for vector in vectors:
        extra = sorted(set(vector) - set(base))
        if extra:
            raise InvalidInputError(f"{len(extra)} task-vector tensors are not in the base, "
                                    f"e.g. {short_list(extra, 3)}")
    out: StateDict = {}
    for name, tensor in base.items():
        parts = [(v[name], c) for v, c in zip(vectors, coefs, strict=True) if name in v]
        for part, _ in parts:
            check_same_shape(name, tensor, part)
            check_same_dtype(name, tensor, part)
        if parts:
            out[name] = tensor_combine(tensor, [p for p, _ in parts], [c for _, c in parts],
                                       tensor.dtype)
        else:
            out[name] = tensor
    return out


