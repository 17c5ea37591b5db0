"""The merge planner: N task vectors and a :class:`MergeSpec` -> a :class:`MergePlan`.

:func:`plan_sources` turns N :class:`~tvtool.io.TensorSource` objects and a spec into a plan
that produces the merged tensors one name at a time: memory is about one tensor per input
plus chunk-sized temporaries, never N models. Key alignment, dtype promotion, accumulation
dtype and the NaN/Inf checks are the shared streaming combination's
(:mod:`tvtool.vectors.combine`); the plan adds what is merge-specific: the method's per-tensor
function, whole-vector trim thresholds and a reused accumulator.
:func:`merge_state_dicts` runs the same plan over in-memory state dicts (library and tests).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import DictSource, TensorInfo, TensorSource
from tvtool.merge.coefficients import Coefficients, from_values
from tvtool.merge.method import MergeMethod, TensorContext
from tvtool.merge.registry import get_method
from tvtool.merge.trim import global_threshold, trim_group
from tvtool.types import Logger, StateDict
from tvtool.types import quiet as _quiet
from tvtool.vectors.combine import align_vectors, combine_tensor


@dataclass(frozen=True)
class MergeSpec:
    """What to compute, independent of files.

    Attributes:
        method: Registry entry of the method.
        params: The method's validated params object.
        coefficients: Per-vector (or per-vector per-tensor) coefficients.
        seed: Random seed (DARE).
        missing: Key-set policy: ``refuse``, ``zero`` or ``common``.
        vector_params: Each vector's params object when some vector sets its own
            (:meth:`MergeMethod.make_vector_params`); None: ``params`` for every vector.
        dtype: Storage dtype of every merged tensor (``merge`` config ``dtype:``); None: the
            promoted dtype of the inputs. A value the dtype cannot hold (beyond float16's
            65504) is an overflow error, not an Inf in the file.

    """

    method: MergeMethod
    params: Any
    coefficients: Coefficients
    seed: int = 0
    missing: str = "refuse"
    vector_params: tuple[Any, ...] | None = None
    dtype: torch.dtype | None = None

    def params_for(self, index: int) -> Any:
        """The params object of vector ``index``."""
        return self.vector_params[index] if self.vector_params is not None else self.params


class MergePlan:
    """The merged vector's layout and a way to produce its tensors one at a time.

    Attributes:
        layout: Output names, dtypes and shapes in write order.
        names: Output tensor names (layout order).
        present: For each output name, the indices of the vectors that hold it.
        notes: Remarks for stderr (key policy effects, passes).
        reuse_buffers: Accumulate every output tensor in one reused buffer (set by
            :func:`merge`, whose writer consumes each tensor before the next is made); off
            by default, so that the yielded tensors can be kept.

    """

    def __init__(self, sources: Sequence[TensorSource], spec: MergeSpec,
                 layout: list[TensorInfo], present: dict[str, tuple[int, ...]],
                 notes: list[str], log: Logger) -> None:
        self.sources = list(sources)
        self.spec = spec
        # What is computed follows the inputs' dtypes; what is stored, the spec's dtype.
        self._infos = {info.name: info for info in layout}
        self.layout = layout if spec.dtype is None else [
            TensorInfo(info.name, spec.dtype, info.shape) for info in layout]
        self.names = [info.name for info in layout]
        self.present = present
        self.notes = notes
        self.reuse_buffers = False
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._thresholds: dict[str, tuple[float, ...]] | None = None
        self._thresholds_done = False
        self._log = log

    @property
    def global_densities(self) -> list[float | None]:
        """Per vector, the density of the whole-vector trim the method needs, or None."""
        return [self.spec.method.global_density(self.spec.params_for(index))
                for index in range(len(self.sources))]

    @property
    def global_density(self) -> float | None:
        """The density of the whole-vector trim (the largest, when vectors differ), or None."""
        needed = [d for d in self.global_densities if d is not None]
        return max(needed) if needed else None

    @property
    def read_passes(self) -> int:
        """How many times each input is read: 1, plus the radix passes of a global trim."""
        if self.global_density is None:
            return 1
        wide = any(s.info(n).dtype == torch.float64 for s in self.sources
                   for n in list(s.keys()))
        return 1 + (4 if wide else 2)

    def thresholds(self) -> dict[str, tuple[float, ...]] | None:
        """Per-vector global trim thresholds of each trim group (computed once).

        A vector holding image-encoder tensors (``visual.*``) *and* others (a whole CLIP
        checkpoint's text tower, logit scale) gets one threshold per group, each the top
        ``density`` of that group alone: counted over everything, zeros or small deltas of the
        text tower would lower the image encoder's threshold, so ``density 0.2`` would keep
        about 0.3 of the image encoder. Other vectors have one group, the whole vector.
        Vectors without a tensor of a group get ``inf`` there (they hold nothing to keep).
        """
        if self._thresholds_done:
            return self._thresholds
        if self.global_density is not None:
            values: dict[str, list[float]] = {}
            for index, (source, density) in enumerate(zip(self.sources, self.global_densities,
                                                          strict=True)):
                if density is None:
                    # This vector keeps everything (its own density is 1): threshold 0.
                    for name in self.names:
                        if index in self.present[name]:
                            row = values.setdefault(trim_group(name),
                                                    [math.inf] * len(self.sources))
                            row[index] = 0.0
                    continue
                names = [n for n in self.names if index in self.present[n]]
                groups: dict[str, list[str]] = {}
                for name in names:
                    groups.setdefault(trim_group(name), []).append(name)
                if len(groups) > 1:
                    self._log(f"global trim of {source.label}: the image encoder (visual.*) "
                              "and the other tensors are trimmed separately, each to its top "
                              f"{density:g}")
                for group, members in groups.items():
                    numel = sum(source.info(n).numel for n in members)
                    wide = any(source.info(n).dtype == torch.float64 for n in members)
                    self._log(f"global trim: top-{density:g} threshold of {source.label}"
                              + (f" ({group})" if len(groups) > 1 else ""))

                    # Unchecked: a NaN/Inf reaches the output whatever the threshold, and the
                    # output check then names the input.
                    def stream(source: TensorSource = source, members: list[str] = members
                               ) -> Iterator[torch.Tensor]:
                        for name in members:
                            yield source.get(name)

                    threshold = global_threshold(stream, numel, density, wide=wide)
                    row = values.setdefault(group, [math.inf] * len(self.sources))
                    row[index] = math.inf if threshold is None else threshold
            self._thresholds = {group: tuple(row) for group, row in values.items()}
        self._thresholds_done = True
        return self._thresholds

    def produce(self, name: str) -> torch.Tensor:
        """Compute the merged tensor ``name``.

        The method supplies only the per-tensor reduction; alignment, accumulation dtype and
        the NaN/Inf checks are :func:`tvtool.vectors.combine.combine_tensor`'s.
        """
        info = self._infos[name]
        held = self.present[name]
        method, params = self.spec.method, self.spec.params
        weights = self.spec.coefficients.for_tensor(name)
        groups = self.thresholds()

        def reduce(acc: torch.Tensor | None, acc_dtype: torch.dtype) -> torch.Tensor:
            ctx = TensorContext(name=name,
                                thresholds=groups[trim_group(name)] if groups else None,
                                seed=self.spec.seed, count=len(self.sources), dtype=acc_dtype,
                                vector_params=self.spec.vector_params)
            if method.accumulate is not None and method.separable(params):
                # One input alive at a time; an absent tensor is zero and adds nothing.
                total = self._accumulator(info, acc_dtype)
                for index in held:
                    method.accumulate(total, self.sources[index].get(name), index,
                                      weights[index], self.spec.params_for(index), ctx)
                return total
            tensors = [self.sources[index].get(name) if index in held
                       else torch.zeros(info.shape, dtype=info.dtype)
                       for index in range(len(self.sources))]
            return method.fn(tensors, weights, params, ctx)

        stored = info if self.spec.dtype is None else TensorInfo(name, self.spec.dtype,
                                                                 info.shape)
        return combine_tensor(name, stored, self.sources, held, reduce)

    def _accumulator(self, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        """Return a zeroed accumulator of ``info``'s shape.

        A view of one reused buffer when the plan streams to a writer
        (:attr:`reuse_buffers`), a fresh tensor otherwise.
        """
        if not self.reuse_buffers:
            return torch.zeros(info.shape, dtype=dtype)
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < info.numel:
            largest = max(i.numel for i in self.layout)
            buffer = self._buffers[dtype] = torch.empty(largest, dtype=dtype)
        return buffer[:info.numel].view(info.shape).zero_()

    def tensors(self) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Yield the merged tensors, one at a time, in layout order.

        With :attr:`reuse_buffers`, a yielded tensor may be overwritten by the next one: use
        (write) each before asking for the next.
        """
        # Reading ahead on a thread was tried and measured slower (1.3-2x): several input
        # buffers alive at once bring back the allocator churn that sum_of_terms avoids.
        self.thresholds()
        for name in self.names:
            yield name, self.produce(name)


def plan_sources(sources: Sequence[TensorSource], spec: MergeSpec, log: Logger = _quiet
                 ) -> MergePlan:
    """Check that N task vectors can be merged and plan the merge.

    Args:
        sources: The vectors (any :class:`~tvtool.io.TensorSource`).
        spec: Method, params, coefficients, seed and key-set policy.
        log: Receives progress lines.

    Raises:
        InvalidInputError: differing key sets under ``refuse``, shape mismatches, non-float
            tensors, nothing left to merge.

    """
    if not sources:
        raise UsageError("merge needs at least one task vector")
    if len(spec.coefficients.per_vector) != len(sources):
        raise UsageError(f"{len(spec.coefficients.per_vector)} coefficients for "
                         f"{len(sources)} vectors")
    alignment = align_vectors(
        sources, missing=spec.missing, promote=True,
        refuse_hint="--missing-as-zero merges the union (absent = zero), --common-only merges "
                    "the shared tensors")
    notes: list[str] = []
    if alignment.dropped:
        notes.append(f"--common-only: {alignment.dropped} tensors not held by every vector are "
                     "left out of the output")
    names = [info.name for info in alignment.layout]
    if not names:
        raise InvalidInputError("the vectors share no tensor: nothing to merge")
    spec.coefficients.check_covers(names)
    return MergePlan(sources, spec, alignment.layout, alignment.present, notes, log)


def make_spec(method: str, params: Mapping[str, Any] | None, coefficients: Coefficients,
              seed: int = 0, missing: str = "refuse",
              vector_params: Sequence[Mapping[str, Any]] = ()) -> MergeSpec:
    """Look up a method and validate its params (shared, and each vector's own).

    Raises:
        UsageError: unknown method, invalid params, or a per-vector parameter the method
            does not take per vector.

    """
    entry = get_method(method)
    shared = dict(params or {})
    return MergeSpec(entry, entry.make_params(shared), coefficients, seed, missing,
                     entry.make_vector_params(shared, [dict(v) for v in vector_params]))


def merge_state_dicts(
    vectors: Sequence[StateDict], method: str = "task_arithmetic",
    coefs: float | Sequence[float] = 1.0, params: Mapping[str, Any] | None = None, *,
    seed: int = 0, missing: str = "refuse",
    per_tensor_coefs: Mapping[str, Sequence[float]] | None = None,
    vector_params: Sequence[Mapping[str, Any]] | None = None,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """Merge task vectors held in memory (pure: inputs are not modified).

    Args:
        vectors: N task vectors (name -> tensor).
        method: Registry name (``task_arithmetic``, ``mean``, ``ties``, ``dare``,
            ``magnitude``, ``iso-c``, ``iso-cts``, ``consensus``, ``breadcrumbs``).
        coefs: One coefficient for all vectors or one per vector.
        params: The method's hyper-parameters.
        seed: Random seed (DARE).
        missing: ``refuse``, ``zero`` or ``common`` (see :class:`MergeConfig`).
        per_tensor_coefs: Tensor name -> N coefficients; overrides ``coefs``.
        vector_params: One mapping per vector of the parameters it sets itself (e.g.
            ``{"density": 0.3}``; :attr:`MergeMethod.per_vector`), over ``params``.
        dtype: Storage dtype of the merged tensors (None: the inputs' promoted dtype).

    Returns:
        The merged task vector.

    Raises:
        InvalidInputError / UsageError: as :func:`plan_sources` and :func:`make_spec`.

    """
    count = len(vectors)
    values = [coefs] if isinstance(coefs, (int, float)) else list(coefs)
    coefficients = from_values(values, count)
    if per_tensor_coefs is not None:
        coefficients = Coefficients(coefficients.per_vector,
                                    per_tensor={k: tuple(v) for k, v in per_tensor_coefs.items()},
                                    origin="per_tensor_coefs")
    if vector_params is not None and len(vector_params) != count:
        raise UsageError(f"{len(vector_params)} per-vector parameter sets for {count} vectors")
    spec = replace(make_spec(method, params, coefficients, seed, missing, vector_params or ()),
                   dtype=dtype)
    sources = [DictSource(v, label=f"vector {i}") for i, v in enumerate(vectors)]
    plan = plan_sources(sources, spec)
    return dict(plan.tensors())
