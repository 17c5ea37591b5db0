"""Shared pieces of the merge methods: the method record, per-tensor context, chunking.

Every method is a pure function ``merge(tensors, weights, params, ctx) -> tensor`` over the
N task-vector tensors of one name. All of them are elementwise across vectors once the trim
thresholds are known, so they run over flat chunks of ``CHUNK_ELEMENTS`` elements: the
temporaries of sign election and disjoint merging then cost N chunks, not N whole tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from tvtool.errors import UsageError
from tvtool.limits import short_repr

SUM_GRID = "0:1:0.05"
"""``merge --search-coef``'s grid for a sum of N vectors, whose best α lies near 1/N: 0..1 in
steps of 0.05, which covers task arithmetic's reference grid (0.05..1, Ilharco et al. 2023)."""

DISJOINT_MEAN_GRID = "0.8:2.5:0.1"
"""The grid for a merge that *averages* the agreeing entries (TIES' disjoint mean): the merged
vector has the size of one task vector and the best λ lies near or above 1 (TIES reference,
prateeky2806/ties-merging README, ``linear+0.8+2.51+0.1``; paper appendix)."""

# 256 Ki elements: the N stacked chunks of a TIES step (8 MiB for 8 vectors) stay below the
# allocator's mmap threshold, so temporaries are reused instead of page-faulted in afresh
# (measured 2.3x faster than 4 Mi-element chunks); per-chunk overhead is still negligible.
CHUNK_ELEMENTS = 1 << 18

TRIM_SCOPES = ("global", "tensor")


@dataclass(frozen=True)
class TensorContext:
    """What a per-tensor merge function may know besides the tensors themselves.

    Attributes:
        name: Tensor name (seeds DARE's masks, so they do not depend on processing order).
        thresholds: Per-vector magnitude thresholds of a global trim (``|x| >= t`` is kept),
            computed over each whole vector beforehand; None when the method trims per tensor
            or not at all.
        seed: Random seed of the merge.
        count: Number of vectors merged (N).
        dtype: Accumulation dtype (float32, or float64 when an input is float64).
        vector_params: Each vector's params object, when a config sets parameters per vector
            (``vectors: [{path, density}]``, see :attr:`MergeMethod.per_vector`); None when
            the ``params`` the function gets hold for every vector. Read it through
            :func:`params_of`.

    """

    name: str
    thresholds: tuple[float, ...] | None = None
    seed: int = 0
    count: int = 0
    dtype: torch.dtype = torch.float32
    vector_params: tuple[Any, ...] | None = None


def params_of(params: Any, ctx: TensorContext, index: int) -> Any:
    """The params object of vector ``index``: its own, or the shared ``params``."""
    return ctx.vector_params[index] if ctx.vector_params is not None else params


MergeFn = Callable[[Sequence[torch.Tensor], Sequence[float], Any, TensorContext], torch.Tensor]
AccumulateFn = Callable[[torch.Tensor, torch.Tensor, int, float, Any, TensorContext], None]
"""``accumulate(acc, tensor, index, weight, params, ctx)``: add vector ``index``'s term to the
accumulator ``acc`` (``ctx.dtype``, the tensor's shape), for methods whose result is a sum of
per-vector terms. ``tensor`` must not be modified (it may be the caller's)."""


@dataclass(frozen=True)
class MergeMethod:
    """One entry of the merge-method registry.

    Attributes:
        name: Name used on the command line and in configs (``--method NAME``).
        paper: Reference of the paper that defines the method.
        summary: One line describing what it computes.
        streaming: Whether the output is produced tensor by tensor with about one tensor per
            input in memory (true for every method here; a global trim adds passes over the
            inputs but never holds more than one tensor of one vector).
        params: Frozen dataclass of the method's hyper-parameters (all have defaults).
        fn: The pure per-tensor merge function.
        global_density: For a given params object, the density of a global (whole-vector)
            magnitude trim whose thresholds the engine must compute first, or None.
        accumulate: For methods that are a sum of per-vector terms, the function adding one
            term; the engine then loads one input at a time (see :func:`sum_of_terms`).
        separable: For a given params object, whether ``accumulate`` applies (DARE is a sum
            of terms only with ``combine="sum"``).
        search_grid: For a given params object, the coefficient grid ``merge --search-coef``
            searches when none is given (:data:`SUM_GRID` unless the method averages).
        lora_refusal: Why the method cannot merge LoRA vectors (their dense deltas are
            low-rank), or None when it merges them like any dense vector; ``merge`` refuses
            LoRA inputs with this reason.
        per_vector: Fields of ``params`` a config may set per vector (``vectors: [{path,
            density}]``; mergekit's per-model parameters). The per-tensor function reads them
            per vector (:func:`params_of`), ``accumulate`` gets each vector's own params
            object, ``global_density`` is asked per vector. Every other field (and ``separable``)
            is shared. The coefficient is per vector for every method.

    """

    name: str
    paper: str
    summary: str
    streaming: bool
    params: type
    fn: MergeFn
    global_density: Callable[[Any], float | None] = lambda _params: None
    accumulate: AccumulateFn | None = None
    separable: Callable[[Any], bool] = lambda _params: True
    search_grid: Callable[[Any], str] = lambda _params: SUM_GRID
    lora_refusal: str | None = None
    per_vector: tuple[str, ...] = ()

    def make_params(self, values: dict[str, Any] | None = None) -> Any:
        """Build and validate this method's params from plain values.

        Raises:
            UsageError: unknown parameter names or invalid values.

        """
        values = dict(values or {})
        known = {f.name for f in fields(self.params)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"method {self.name!r} has no parameter(s) {short_repr(unknown)}",
                             hint=f"its parameters are {sorted(known) or 'none'}")
        try:
            return self.params(**values)
        except (TypeError, ValueError, OverflowError) as exc:
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UsageError(f"method {self.name!r}: {text}") from None

    def make_vector_params(self, shared: dict[str, Any] | None,
                           overrides: Sequence[Mapping[str, Any]]) -> tuple[Any, ...] | None:
        """Each vector's params object: ``shared`` with the vector's own ``overrides``.

        Args:
            shared: The method's parameters for every vector (``params``).
            overrides: One mapping per vector (empty where the vector sets nothing).

        Returns:
            One params object per vector, or None when no vector sets anything.

        Raises:
            UsageError: a parameter the method does not take per vector (the message says
                which vector and which parameters it takes), or an invalid value.
        """
        if not any(overrides):
            return None
        allowed = ", ".join(self.per_vector) or "none"
        out = []
        for index, own in enumerate(overrides):
            unknown = sorted(set(own) - set(self.per_vector))
            if unknown:
                raise UsageError(
                    f"vectors[{index}]: method {self.name!r} takes no per-vector "
                    f"{short_repr(unknown)}",
                    hint=f"its per-vector parameters: {allowed} (coef is per vector for every "
                         "method)")
            try:
                out.append(self.make_params({**(shared or {}), **own}))
            except UsageError as exc:
                raise UsageError(f"vectors[{index}]: {exc.message}", hint=exc.hint) from None
        return tuple(out)


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def output_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """Return the promoted dtype of the inputs (the merged tensor is stored in it)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def sum_of_terms(accumulate: AccumulateFn) -> MergeFn:
    """The list form of a method that is a sum of per-vector terms.

    The engine calls ``accumulate`` directly, loading one input at a time into an accumulator
    it reuses across tensor names: only the accumulator and one input are alive, instead of
    N inputs, and no fresh memory is needed per name. Besides memory this matters for speed:
    freshly allocated memory is page-faulted in, and N tensors freed together make the
    allocator return memory to the system and fault it in again for the next name (measured:
    2x on a full merge). Each vector's term gets its own params object (:func:`params_of`).
    """

    def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: Any,
              ctx: TensorContext) -> torch.Tensor:
        full = replace(ctx, count=len(tensors), dtype=compute_dtype(tensors))
        acc = torch.zeros(tensors[0].shape, dtype=full.dtype)
        for index, (tensor, weight) in enumerate(zip(tensors, weights, strict=True)):
            accumulate(acc, tensor, index, weight, params_of(params, ctx, index), full)
        return acc.to(output_dtype(tensors))

    return merge


def chunked(
    tensors: Sequence[torch.Tensor], fn: Callable[[list[torch.Tensor], int], torch.Tensor],
    chunk: int | None = None,
) -> torch.Tensor:
    """Apply an elementwise-across-vectors function over flat chunks of the inputs.

    Args:
        tensors: N tensors of one shape.
        fn: Gets the N chunks (upcast to the compute dtype) and the chunk's start offset;
            returns the merged chunk.
        chunk: Elements per chunk (default :data:`CHUNK_ELEMENTS`).

    Returns:
        The merged tensor, in the promoted dtype of the inputs and their shape.

    """
    chunk = chunk or CHUNK_ELEMENTS
    shape = tensors[0].shape
    acc = compute_dtype(tensors)
    flat = [t.reshape(-1) for t in tensors]
    numel = flat[0].numel()
    if numel <= chunk:
        # One chunk: no output buffer to fill, the result is already the tensor.
        return fn([f.to(acc) for f in flat], 0).to(output_dtype(tensors)).reshape(shape)
    out = torch.empty(numel, dtype=output_dtype(tensors))
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        parts = [f[start:stop].to(acc) for f in flat]
        out[start:stop] = fn(parts, start).to(out.dtype)
    return out.reshape(shape)


def chunk_starts(numel: int, chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the flat chunks of a tensor with ``numel`` elements."""
    chunk = chunk or CHUNK_ELEMENTS
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def derived_seed(*parts: object) -> int:
    """Derive a 63-bit seed from several values (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_density(density: float, what: str = "density") -> None:
    """Refuse a density outside [0, 1].

    Raises:
        ValueError: turned into a UsageError by :meth:`MergeMethod.make_params`.

    """
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1], got {short_repr(density)}")
    # Compare without float(): a 300-digit integer would overflow it.
    if not 0 <= density <= 1:
        raise ValueError(f"{what} must be in [0, 1], got {short_repr(density)}")


def check_choice(value: object, choices: Sequence[str], what: str) -> None:
    """Refuse a value outside a fixed set of strings.

    Raises:
        ValueError: turned into a UsageError by :meth:`MergeMethod.make_params`.

    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {short_repr(value)}")
