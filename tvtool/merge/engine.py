"""Streaming merge of N task vectors, and the file-level ``merge`` entry point.

:func:`plan_sources` turns N :class:`~tvtool.io.TensorSource` objects and a
:class:`MergeSpec` into a :class:`MergePlan` that produces the merged tensors one name at a
time: memory is about one tensor per input plus chunk-sized temporaries, never N models.
:func:`merge_state_dicts` runs the same plan over in-memory state dicts (library and tests);
:func:`merge` is the command: it opens files, refuses vectors that do not belong together,
resolves coefficients and writes a task vector whose metadata records how it was made.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from tvtool.errors import InvalidInputError, NumericalError, UsageError
from tvtool.formats import dense_source
from tvtool.io import (
    DictSource,
    TensorInfo,
    TensorSource,
    all_finite,
    check_output,
    open_tensors,
    write_tensors,
)
from tvtool.merge.coefs import Coefficients, VectorId, from_values, load_coefficients
from tvtool.merge.config import MergeConfig
from tvtool.merge.method import MergeMethod, TensorContext
from tvtool.merge.registry import get_method
from tvtool.merge.trim import global_threshold, trim_group
from tvtool.metadata import FileMeta, Kind, Mode, provenance
from tvtool.types import Logger, StateDict
from tvtool.types import quiet as _quiet
from tvtool.vectors import check_architecture, metadata_warnings, open_vector_meta


@dataclass(frozen=True)
class MergeSpec:
    """What to compute, independent of files.

    Attributes:
        method: Registry entry of the method.
        params: The method's validated params object.
        coefficients: Per-vector (or per-vector per-tensor) coefficients.
        seed: Random seed (DARE).
        missing: Key-set policy: ``refuse``, ``zero`` or ``common``.

    """

    method: MergeMethod
    params: Any
    coefficients: Coefficients
    seed: int = 0
    missing: str = "refuse"


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
        self.layout = layout
        self.names = [info.name for info in layout]
        self.present = present
        self.notes = notes
        self._infos = {info.name: info for info in layout}
        self.reuse_buffers = False
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._thresholds: dict[str, tuple[float, ...]] | None = None
        self._thresholds_done = False
        self._log = log

    @property
    def global_density(self) -> float | None:
        """Density of the whole-vector trim the method needs, or None."""
        return self.spec.method.global_density(self.spec.params)

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
        density = self.global_density
        if density is not None:
            values: dict[str, list[float]] = {}
            for index, source in enumerate(self.sources):
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
        """Compute the merged tensor ``name``."""
        info = self._infos[name]
        held = self.present[name]
        method, params = self.spec.method, self.spec.params
        weights = self.spec.coefficients.for_tensor(name)
        wide = any(self.sources[i].info(name).dtype == torch.float64 for i in held)
        groups = self.thresholds()
        ctx = TensorContext(name=name, thresholds=groups[trim_group(name)] if groups else None,
                            seed=self.spec.seed,
                            count=len(self.sources),
                            dtype=torch.float64 if wide else torch.float32)
        if method.accumulate is not None and method.separable(params):
            # One input alive at a time; an absent tensor is zero and adds nothing.
            acc = self._accumulator(info, ctx.dtype)
            for index in held:
                method.accumulate(acc, self.sources[index].get(name), index, weights[index],
                                  params, ctx)
            merged = acc.to(info.dtype)
        else:
            tensors = [self.sources[index].get(name) if index in held
                       else torch.zeros(info.shape, dtype=info.dtype)
                       for index in range(len(self.sources))]
            merged = method.fn(tensors, weights, params, ctx).to(info.dtype)
        # Every method carries a NaN or Inf of an input into the output (x·0 is NaN for
        # them), so checking the output alone is enough; only then are the inputs examined,
        # to blame the right one. This saves a pass over every input.
        if not all_finite(merged):
            for index in held:
                _checked(self.sources[index], name)
            raise NumericalError(f"merged tensor {name!r} contains NaN or Inf",
                                 hint="check the coefficients for overflow")
        return merged

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


def _checked(source: TensorSource, name: str) -> torch.Tensor:
    """Load one input tensor, refusing NaN or Inf."""
    tensor = source.get(name)
    if not all_finite(tensor):
        raise InvalidInputError(f"{source.label}: tensor {name!r} contains NaN or Inf")
    return tensor


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
    key_lists = [s.keys() for s in sources]
    key_sets = [set(k) for k in key_lists]
    notes: list[str] = []
    if spec.missing == "refuse":
        for index in range(1, len(sources)):
            if key_sets[index] != key_sets[0]:
                only_first = sorted(key_sets[0] - key_sets[index])
                only_this = sorted(key_sets[index] - key_sets[0])
                raise InvalidInputError(
                    f"{sources[0].label} and {sources[index].label} hold different tensors: "
                    f"{len(only_first)} only in the first {only_first[:2]}, {len(only_this)} "
                    f"only in the second {only_this[:2]}",
                    hint="--missing-as-zero merges the union (absent = zero), --common-only "
                         "merges the shared tensors")
        names = list(key_lists[0])
    elif spec.missing == "common":
        common = set.intersection(*key_sets)
        names = [n for n in key_lists[0] if n in common]
        dropped = len(set.union(*key_sets)) - len(names)
        if dropped:
            notes.append(f"--common-only: {dropped} tensors not held by every vector are left "
                         "out of the output")
    elif spec.missing == "zero":
        names, seen = [], set()
        for keys in key_lists:
            for name in keys:
                if name not in seen:
                    names.append(name)
                    seen.add(name)
        partial = sum(1 for n in names if not all(n in k for k in key_sets))
        if partial:
            notes.append(f"--missing-as-zero: {partial} tensors absent from some vectors count "
                         "as zero there")
    else:
        raise UsageError(f"unknown missing-tensor policy {spec.missing!r}")
    if not names:
        raise InvalidInputError("the vectors share no tensor: nothing to merge")
    layout: list[TensorInfo] = []
    present: dict[str, tuple[int, ...]] = {}
    for name in names:
        held = tuple(i for i, keys in enumerate(key_sets) if name in keys)
        infos = [sources[i].info(name) for i in held]
        for i, info in zip(held, infos, strict=True):
            if not info.dtype.is_floating_point:
                raise InvalidInputError(f"{sources[i].label}: tensor {name!r} is {info.dtype}, "
                                        "task vectors hold floating tensors")
            if info.shape != infos[0].shape:
                raise InvalidInputError(
                    f"tensor {name!r}: {sources[held[0]].label} has shape {infos[0].shape}, "
                    f"{sources[i].label} has {info.shape}")
        dtype = infos[0].dtype
        for info in infos[1:]:
            dtype = torch.promote_types(dtype, info.dtype)
        layout.append(TensorInfo(name, dtype, infos[0].shape))
        present[name] = held
    spec.coefficients.check_covers(names)
    return MergePlan(sources, spec, layout, present, notes, log)


def make_spec(method: str, params: Mapping[str, Any] | None, coefficients: Coefficients,
              seed: int = 0, missing: str = "refuse") -> MergeSpec:
    """Look up a method and validate its params.

    Raises:
        UsageError: unknown method or invalid params.

    """
    entry = get_method(method)
    return MergeSpec(entry, entry.make_params(dict(params or {})), coefficients, seed, missing)


def merge_state_dicts(
    vectors: Sequence[StateDict], method: str = "task_arithmetic",
    coefs: float | Sequence[float] = 1.0, params: Mapping[str, Any] | None = None, *,
    seed: int = 0, missing: str = "refuse",
    per_tensor_coefs: Mapping[str, Sequence[float]] | None = None,
) -> StateDict:
    """Merge task vectors held in memory (pure: inputs are not modified).

    Args:
        vectors: N task vectors (name -> tensor).
        method: Registry name (``task_arithmetic``, ``mean``, ``ties``, ``dare``,
            ``magnitude``).
        coefs: One coefficient for all vectors or one per vector.
        params: The method's hyper-parameters.
        seed: Random seed (DARE).
        missing: ``refuse``, ``zero`` or ``common`` (see :class:`MergeConfig`).
        per_tensor_coefs: Tensor name -> N coefficients; overrides ``coefs``.

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
    spec = make_spec(method, params, coefficients, seed, missing)
    sources = [DictSource(v, label=f"vector {i}") for i, v in enumerate(vectors)]
    plan = plan_sources(sources, spec)
    return dict(plan.tensors())


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class MergeResult:
    """What ``merge`` wrote (or, for a dry run, would write)."""

    output: str
    tensors: int
    parameters: int
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return asdict(self)


@dataclass
class OpenedMerge:
    """Inputs opened and checked, coefficients resolved, plan and output metadata built."""

    config: MergeConfig
    sources: list[TensorSource]
    metas: list[FileMeta]
    plan: MergePlan
    header: dict[str, str]
    owned: list[TensorSource] = field(default_factory=list)

    def close(self) -> None:
        """Close every input."""
        for source in self.owned or self.sources:
            with contextlib.suppress(Exception):
                source.close()


def _check_compatible(config: MergeConfig, labels: Sequence[str], metas: Sequence[FileMeta],
                      log: Logger) -> tuple[Mode | None, bool]:
    """Refuse vectors of different architectures, bases or linearization.

    Returns:
        The mode (if shared) and the linearized flag of the output.

    """
    for index, meta in enumerate(metas):
        for warning in metadata_warnings(meta, labels[index]):
            log(warning)
    # The rule apply and eval use: another activation of the same tensors warns, anything
    # else is an error.
    known = [(labels[i], m.architecture) for i, m in enumerate(metas) if m.architecture]
    for label, architecture in known[1:]:
        note = check_architecture(label, architecture, known[0][1],
                                  f"the first vector {known[0][0]}")
        if note:
            log(note)
    prints = {m.base_fingerprint for m in metas if m.base_fingerprint}
    if len(prints) > 1 and not config.allow_base_mismatch:
        first = metas[0].base_fingerprint or ""
        other = next(i for i, m in enumerate(metas)
                     if m.base_fingerprint and m.base_fingerprint != first)
        raise InvalidInputError(
            f"{labels[0]} and {labels[other]} were extracted from different bases (fingerprint "
            f"{first[:19]}… vs {(metas[other].base_fingerprint or '')[:19]}…)",
            hint="merge vectors of one base, or --allow-base-mismatch if you are sure")
    flags = {m.linearized for m in metas}
    if len(flags) > 1:
        if config.mixed_modes_as is None:
            lin = [labels[i] for i, m in enumerate(metas) if m.linearized]
            raise InvalidInputError(
                f"cannot merge linearized vectors ({lin[:2]}) with non-linearized ones: they "
                "are evaluated as different models",
                hint="--mixed-modes-as linearized|nonlinear says how the result is evaluated")
        linearized = config.mixed_modes_as == "linearized"
        log(f"warning: merging linearized and non-linearized vectors; the result is recorded "
            f"as {'linearized' if linearized else 'non-linearized'}")
    else:
        linearized = flags.pop()
    modes = {m.mode for m in metas}
    mode = modes.pop() if len(modes) == 1 else None
    if mode is not None and mode.factored:
        # Materialised LoRA factors are dense weight deltas: the result is no LoRA vector.
        mode = None
    return mode, linearized


def open_merge(config: MergeConfig, log: Logger = _quiet) -> OpenedMerge:
    """Open and check the inputs of a merge and plan it (nothing is written).

    Raises:
        UsageError: no vectors, stdin twice, unknown method or bad params, bad coefficients.
        InvalidInputError: non-vector inputs, different architectures/bases/linearization or
            key sets, shape mismatches, output equal to an input, bad coefficient files.

    """
    if not config.vectors:
        raise UsageError("merge needs at least one task vector")
    if list(config.vectors).count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    method = get_method(config.method)
    params = method.make_params(config.params)
    inputs = [*config.vectors, *([config.coefs_file] if config.coefs_file else [])]
    check_output(config.output, inputs)
    sources: list[TensorSource] = []
    owned: list[TensorSource] = []
    try:
        metas: list[FileMeta] = []
        for path in config.vectors:
            source = open_tensors(path)
            owned.append(source)
            meta = open_vector_meta(source, source.label)
            # Factored (LoRA) vectors are merged as their dense deltas.
            source = owned[-1] = dense_source(source, meta)
            sources.append(source)
            metas.append(meta)
        labels = [s.label for s in sources]
        mode, linearized = _check_compatible(config, labels, metas, log)
        ids = [VectorId(p, m.dataset) for p, m in zip(config.vectors, metas, strict=True)]
        base_fp = next((m.base_fingerprint for m in metas if m.base_fingerprint), None)
        if config.coefs_file is not None:
            shapes = [{n: s.info(n).shape for n in list(s.keys())} for s in sources]
            coefficients = load_coefficients(config.coefs_file, ids, shapes, metas,
                                             allow_base_mismatch=config.allow_base_mismatch)
        else:
            coefficients = from_values(config.coefs, len(sources))
        spec = MergeSpec(method, params, coefficients, config.seed, config.missing)
        plan = plan_sources(sources, spec, log)
        first = metas[0]
        extra = {
            "sources": json.dumps([i.label() for i in ids]),
            "merge_method": method.name,
            "merge_params": json.dumps(asdict(params), sort_keys=True),
            "coefficients": json.dumps(coefficients.describe(), sort_keys=True),
            "input_modes": json.dumps([{"mode": m.mode.value if m.mode else None,
                                        "linearized": m.linearized} for m in metas]),
            # Defaults resolved, so the record still reproduces the merge if defaults change.
            "merge_config": replace(config, params=asdict(params)).to_json(),
        }
        out_meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=first.architecture,
                            base_ref=first.base_ref, base_fingerprint=base_fp, mode=mode,
                            linearized=linearized,
                            provenance=provenance("merge", replace(config, params=asdict(params)
                                                          ).to_document(),
                                                  seed=config.seed),
                            extra=extra)
        return OpenedMerge(config, sources, metas, plan, out_meta.to_header(), owned)
    except BaseException:
        for source in owned:
            with contextlib.suppress(Exception):
                source.close()
        raise


def describe_plan(opened: OpenedMerge) -> dict[str, Any]:
    """Build the dry-run report: inputs, method, coefficients, keys, shapes and output size."""
    plan, config = opened.plan, opened.config
    inputs = []
    for path, source, meta in zip(config.vectors, opened.sources, opened.metas, strict=True):
        names = source.keys()
        inputs.append({
            "path": path, "dataset": meta.dataset,
            "mode": meta.mode.value if meta.mode else None, "linearized": meta.linearized,
            "base_fingerprint": meta.base_fingerprint, "tensors": len(names),
            "parameters": sum(source.info(n).numel for n in names),
            "bytes": sum(source.info(n).nbytes for n in names),
        })
    count = len(opened.sources)
    keys = [{"name": info.name, "shape": list(info.shape), "dtype": str(info.dtype).replace(
        "torch.", ""), "missing_in": [i for i in range(count) if i not in plan.present[info.name]]}
        for info in plan.layout]
    method = plan.spec.method
    return {
        "dry_run": True,
        "method": {"name": method.name, "paper": method.paper,
                   "params": asdict(plan.spec.params)},
        "coefficients": plan.spec.coefficients.describe(),
        "seed": config.seed,
        "missing": config.missing,
        "read_passes_per_input": plan.read_passes,
        "inputs": inputs,
        "output": {"path": config.output, "tensors": len(plan.layout),
                   "parameters": sum(i.numel for i in plan.layout),
                   "bytes": sum(i.nbytes for i in plan.layout),
                   "metadata": {k: v for k, v in opened.header.items()
                                if k != "tvtool.provenance"}},
        "keys": keys,
        "notes": plan.notes,
    }


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run torch's CPU kernels on ``count`` threads inside the block (None: unchanged).

    A merge is a stream of memory-bound elementwise kernels on tensors of a few MB. On an
    oversubscribed machine every multi-threaded kernel waits for its slowest thread to be
    scheduled: measured on a shared 2-core host, the same merge took 0.15 s on one thread and
    2-6 s on two. Results do not depend on the thread count (no reduction order changes).
    """
    if count is None:
        yield
        return
    if count < 1:
        raise UsageError(f"--threads must be positive, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge(config: MergeConfig, log: Logger = _quiet, *, dry_run: bool = False,
          threads: int | None = 1) -> MergeResult:
    """Merge task-vector files into one task vector (streaming, tensor by tensor).

    Args:
        config: What to merge and how.
        log: Receives notes and warnings (stderr in the CLI).
        dry_run: Only check the inputs and describe the plan; write nothing.
        threads: CPU threads for the merge kernels (see :func:`intra_op_threads`; None keeps
            torch's setting).

    Returns:
        The result; for a dry run its ``details`` hold :func:`describe_plan`'s report.

    Raises:
        UsageError / InvalidInputError: see :func:`open_merge`; nothing is written.
        NumericalError: the merged vector would hold NaN or Inf (nothing is written).

    """
    opened = open_merge(config, log)
    try:
        plan = opened.plan
        for note in plan.notes:
            log(note)
        parameters = sum(i.numel for i in plan.layout)
        if dry_run:
            return MergeResult(config.output, len(plan.layout), parameters, plan.notes,
                               describe_plan(opened))
        inputs = [*config.vectors, *([config.coefs_file] if config.coefs_file else [])]
        # The plan checks every merged tensor itself (cheaply), so the writer need not.
        plan.reuse_buffers = True  # the writer consumes each tensor before the next
        stream = plan.tensors()
        try:
            with intra_op_threads(threads):
                write_tensors(config.output, stream, opened.header, layout=plan.layout,
                              inputs=inputs, check_finite=False)
        finally:
            stream.close()
        return MergeResult(config.output, len(plan.layout), parameters, plan.notes,
                           {"method": plan.spec.method.name,
                            "params": asdict(plan.spec.params),
                            "coefficients": plan.spec.coefficients.describe(),
                            "read_passes_per_input": plan.read_passes})
    finally:
        opened.close()
