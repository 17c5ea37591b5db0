"""Task-vector algebra: extract, negate, scale, add, apply.

Two layers:

* pure functions over :data:`~tvtool.types.StateDict` (``extract``, ``negate``, ``scale``,
  ``add``, ``apply``) used by the library and the property tests;
* streaming plans over :class:`~tvtool.io.TensorSource` (``plan_extract``, ``plan_combine``)
  that the commands use so N inputs cost about one tensor of memory each, never N models.

Both layers share the per-tensor primitives, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tvtool.errors import InvalidInputError
from tvtool.io import TensorInfo, TensorSource
from tvtool.metadata import FileMeta, Kind
from tvtool.types import StateDict

_WRAPPER_PREFIXES = ("module.", "model.", "module.model.")


# ---------------------------------------------------------------- per-tensor primitives


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse NaN or Inf in an input tensor.

    Raises:
        InvalidInputError: naming the tensor and the input.
    """
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(f"{where}: tensor {name!r} contains NaN or Inf")


def tensor_delta(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """``finetuned - base`` computed in float64, stored in the fine-tuned tensor's dtype."""
    return (finetuned.double() - base.double()).to(finetuned.dtype)


def tensor_combine(
    base: torch.Tensor | None, deltas: Sequence[torch.Tensor], coefs: Sequence[float],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``base + Σ coef_i · delta_i`` accumulated in float32 (float64 for float64 inputs)."""
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    acc = base.to(acc_dtype).clone() if base is not None else None
    for delta, coef in zip(deltas, coefs, strict=True):
        term = delta.to(acc_dtype) * coef if coef != 1.0 else delta.to(acc_dtype)
        acc = term if acc is None else acc.add_(term)
    if acc is None:
        raise ValueError("tensor_combine needs a base or at least one delta")
    return acc.to(out_dtype)


# ---------------------------------------------------------------- pure StateDict functions


def extract(base: StateDict, finetuned: StateDict) -> StateDict:
    """Task vector ``finetuned - base`` over the floating tensors of ``finetuned``.

    Raises:
        InvalidInputError: a key of ``finetuned`` missing from ``base``, or a shape mismatch.
    """
    out: StateDict = {}
    for name, tensor in finetuned.items():
        if not tensor.is_floating_point():
            continue
        if name not in base:
            raise InvalidInputError(f"tensor {name!r} of the fine-tuned model is not in the base")
        _check_same_shape(name, base[name], tensor)
        out[name] = tensor_delta(base[name], tensor)
    return out


def scale(vector: StateDict, coef: float) -> StateDict:
    """Multiply every tensor of a task vector by ``coef``."""
    return {name: tensor_combine(None, [t], [coef], t.dtype) for name, t in vector.items()}


def negate(vector: StateDict) -> StateDict:
    """The negated task vector (forgetting direction)."""
    return {name: -t for name, t in vector.items()}


def add(vectors: Sequence[StateDict], coefs: Sequence[float] | None = None) -> StateDict:
    """``Σ coef_i · vector_i`` over vectors with identical key sets and shapes.

    Raises:
        InvalidInputError: if the vectors do not share keys and shapes.
    """
    if not vectors:
        raise InvalidInputError("add needs at least one task vector")
    coefs = list(coefs) if coefs is not None else [1.0] * len(vectors)
    first = vectors[0]
    for index, vector in enumerate(vectors[1:], start=1):
        _check_same_keys(first.keys(), vector.keys(), "vector 0", f"vector {index}")
    out: StateDict = {}
    for name, tensor in first.items():
        parts = [v[name] for v in vectors]
        for part in parts[1:]:
            _check_same_shape(name, tensor, part)
        out[name] = tensor_combine(None, parts, coefs, tensor.dtype)
    return out


def apply(base: StateDict, vectors: Sequence[StateDict], coefs: Sequence[float] | None = None
          ) -> StateDict:
    """``base + Σ coef_i · vector_i``; tensors a vector lacks stay as in the base.

    Raises:
        InvalidInputError: a vector key not in the base, or a shape mismatch.
    """
    coefs = list(coefs) if coefs is not None else [1.0] * len(vectors)
    for vector in vectors:
        extra = sorted(set(vector) - set(base))
        if extra:
            raise InvalidInputError(f"{len(extra)} task-vector tensors are not in the base, "
                                    f"e.g. {extra[:3]}")
    out: StateDict = {}
    for name, tensor in base.items():
        parts = [(v[name], c) for v, c in zip(vectors, coefs, strict=True) if name in v]
        for part, _ in parts:
            _check_same_shape(name, tensor, part)
        if parts and tensor.is_floating_point():
            out[name] = tensor_combine(tensor, [p for p, _ in parts], [c for _, c in parts],
                                       tensor.dtype)
        else:
            out[name] = tensor
    return out


def _check_same_shape(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise InvalidInputError(f"tensor {name!r}: shape {tuple(a.shape)} vs {tuple(b.shape)}")


def _check_same_keys(a: object, b: object, label_a: str, label_b: str) -> None:
    keys_a, keys_b = set(a), set(b)  # type: ignore[call-overload]
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        raise InvalidInputError(
            f"{label_a} and {label_b} hold different tensors: {len(only_a)} only in {label_a} "
            f"{only_a[:3]}, {len(only_b)} only in {label_b} {only_b[:3]}"
        )


# ---------------------------------------------------------------- key alignment


@dataclass(frozen=True)
class KeyAlignment:
    """How the names of a checkpoint map onto the base's names.

    Attributes:
        mapping: Stored name -> base name for every tensor kept.
        stripped_prefix: The wrapper prefix removed (``module.``, ``model.``), if any.
        skipped_non_float: Stored names skipped because they are not floating point.
    """

    mapping: dict[str, str]
    stripped_prefix: str | None = None
    skipped_non_float: tuple[str, ...] = ()


def align_keys(stored: Sequence[str], base: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """Map stored names to base names, removing a wrapper prefix if that makes them match.

    Returns:
        The mapping (stored -> base) and the prefix removed, if any.
    """
    base_set = set(base)
    direct = sum(1 for name in stored if name in base_set)
    best: tuple[int, str | None] = (direct, None)
    for prefix in _WRAPPER_PREFIXES:
        if stored and all(name.startswith(prefix) for name in stored):
            hits = sum(1 for name in stored if name[len(prefix):] in base_set)
            if hits > best[0]:
                best = (hits, prefix)
    prefix = best[1]
    if prefix is None:
        return {name: name for name in stored}, None
    return {name: name[len(prefix):] for name in stored}, prefix


# ---------------------------------------------------------------- streaming plans


@dataclass
class VectorInput:
    """A task vector opened for streaming, with its parsed metadata."""

    path: str
    source: TensorSource
    meta: FileMeta


def open_vector_meta(source: TensorSource, label: str) -> FileMeta:
    """Parse a task vector's metadata and refuse other kinds of tvtool file.

    Raises:
        InvalidInputError: no tvtool metadata, or the file is a checkpoint/coefficients/head.
    """
    meta = FileMeta.from_header(source.metadata, label)
    if meta.kind is not Kind.TASK_VECTOR:
        hint = ("pass it as --base, or create a vector with `tvtool extract`"
                if meta.kind is Kind.CHECKPOINT else None)
        raise InvalidInputError(f"{label} is a tvtool {meta.kind.value}, not a task vector",
                                hint=hint)
    return meta


@dataclass
class StreamPlan:
    """What a streaming command will write: the layout, and how to make each tensor.

    Attributes:
        layout: Output names, dtypes and shapes in write order.
        notes: Human-readable remarks (normalised prefixes, skipped tensors) for stderr.
    """

    layout: list[TensorInfo]
    producers: dict[str, object] = field(repr=False, default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Compute the output tensors one at a time, in layout order."""
        for info in self.layout:
            producer = self.producers[info.name]
            yield info.name, producer()  # type: ignore[operator]


def plan_extract(base: TensorSource, finetuned: TensorSource, *, allow_missing: bool = False,
                 keep: str = "all") -> StreamPlan:
    """Plan ``finetuned - base`` tensor by tensor.

    Args:
        base: The pre-trained weights.
        finetuned: The fine-tuned weights (open_clip names, possibly under ``module.``/``model.``).
        allow_missing: Treat base tensors absent from the fine-tuned checkpoint as unchanged
            (for checkpoints holding only the image encoder); without it they are an error.
        keep: ``all`` keeps every floating tensor; ``changed`` drops tensors whose delta is zero.

    Raises:
        InvalidInputError: extra or missing keys (counts and first names), shape or dtype
            mismatch, NaN/Inf in an input.
    """
    if keep not in ("all", "changed"):
        raise InvalidInputError(f"--keep must be 'all' or 'changed', not {keep!r}")
    base_keys = base.keys()
    mapping, prefix = align_keys(finetuned.keys(), base_keys)
    notes: list[str] = []
    if prefix:
        notes.append(f"normalised {len(mapping)} names of {finetuned.label} by removing the "
                     f"{prefix!r} prefix")
    extra = sorted(stored for stored, name in mapping.items() if name not in set(base_keys))
    if extra:
        raise InvalidInputError(
            f"{finetuned.label} has {len(extra)} tensors that are not in the base, e.g. "
            f"{extra[:3]}", hint="is it a checkpoint of the same architecture?")
    covered = set(mapping.values())
    missing = [name for name in base_keys if name not in covered
               and base.info(name).dtype.is_floating_point]
    if missing and not allow_missing:
        raise InvalidInputError(
            f"{finetuned.label} lacks {len(missing)} tensors of the base, e.g. {missing[:3]}",
            hint="pass --allow-missing if the checkpoint holds only part of the model "
                 "(those tensors are then taken as unchanged)")
    if missing:
        notes.append(f"{len(missing)} base tensors absent from {finetuned.label} taken as unchanged")
    layout: list[TensorInfo] = []
    producers: dict[str, object] = {}
    skipped = 0
    for stored, name in mapping.items():
        ft_info, base_info = finetuned.info(stored), base.info(name)
        if not ft_info.dtype.is_floating_point:
            skipped += 1
            continue
        if ft_info.shape != base_info.shape:
            raise InvalidInputError(f"tensor {name!r}: base shape {base_info.shape}, fine-tuned "
                                    f"shape {ft_info.shape}")
        if ft_info.dtype != base_info.dtype:
            raise InvalidInputError(
                f"tensor {name!r}: base dtype {base_info.dtype}, fine-tuned dtype {ft_info.dtype}",
                hint="save both models in the same precision")
        if keep == "changed":
            delta = _delta_of(base, finetuned, name, stored)
            if not bool(delta.any()):
                skipped += 1
                continue
        layout.append(TensorInfo(name, ft_info.dtype, ft_info.shape))
        producers[name] = (lambda n=name, s=stored: _delta_of(base, finetuned, n, s))
    if skipped:
        reason = "unchanged or non-floating" if keep == "changed" else "non-floating"
        notes.append(f"skipped {skipped} {reason} tensors")
    if not layout:
        raise InvalidInputError("the task vector would be empty: no floating tensor changed")
    return StreamPlan(layout, producers, notes)


def _delta_of(base: TensorSource, finetuned: TensorSource, name: str, stored: str) -> torch.Tensor:
    b, f = base.get(name), finetuned.get(stored)
    check_finite(b, name, base.label)
    check_finite(f, stored, finetuned.label)
    return tensor_delta(b, f)


def plan_combine(base: TensorSource | None, vectors: Sequence[tuple[TensorSource, float]], *,
                 allow_subset: bool = True) -> StreamPlan:
    """Plan ``[base +] Σ coef_i · vector_i`` tensor by tensor.

    With a base, the output holds every base tensor (a full checkpoint). Without one, the
    vectors must hold the same keys (unless ``allow_subset``, where a missing tensor counts as
    zero) and the output is a task vector.

    Raises:
        InvalidInputError: keys not in the base, differing key sets, shape mismatch, NaN/Inf.
    """
    if not vectors and base is None:
        raise InvalidInputError("nothing to combine")
    if base is not None:
        base_keys = base.keys()
        base_set = set(base_keys)
        for source, _ in vectors:
            extra = sorted(set(source.keys()) - base_set)
            if extra:
                raise InvalidInputError(
                    f"{source.label} has {len(extra)} tensors that are not in the base, e.g. "
                    f"{extra[:3]}", hint="was it extracted from another architecture?")
        names = list(base_keys)
        infos = {n: base.info(n) for n in names}
    else:
        first = vectors[0][0]
        names = list(first.keys())
        seen = set(names)
        for source, _ in vectors[1:]:
            if not allow_subset:
                _check_same_keys(first.keys(), source.keys(), first.label, source.label)
            for name in source.keys():
                if name not in seen:
                    names.append(name)
                    seen.add(name)
        infos = {}
        for name in names:
            owner = next(s for s, _ in vectors if name in set(s.keys()))
            infos[name] = owner.info(name)
    key_sets = [set(source.keys()) for source, _ in vectors]
    for name in names:
        for (source, _), keys in zip(vectors, key_sets, strict=True):
            if name in keys and source.info(name).shape != infos[name].shape:
                raise InvalidInputError(f"tensor {name!r}: {source.label} has shape "
                                        f"{source.info(name).shape}, expected {infos[name].shape}")

    def produce(name: str) -> torch.Tensor:
        parts, coefs = [], []
        for (source, coef), keys in zip(vectors, key_sets, strict=True):
            if name in keys:
                tensor = source.get(name)
                check_finite(tensor, name, source.label)
                parts.append(tensor)
                coefs.append(coef)
        if base is None:
            return tensor_combine(None, parts, coefs, infos[name].dtype)
        base_tensor = base.get(name)
        check_finite(base_tensor, name, base.label)
        if not parts or not base_tensor.is_floating_point():
            return base_tensor
        return tensor_combine(base_tensor, parts, coefs, infos[name].dtype)

    layout = [TensorInfo(n, infos[n].dtype, infos[n].shape) for n in names]
    producers = {n: (lambda n=n: produce(n)) for n in names}
    return StreamPlan(layout, producers)


def vector_norms(source: TensorSource) -> dict[str, float]:
    """L2 norm of every tensor of a vector, computed one tensor at a time."""
    return {name: float(source.get(name).double().norm()) for name in source.keys()}


def cosine_matrix(sources: Sequence[TensorSource]) -> list[list[float]]:
    """Cosine similarities between flattened task vectors, one tensor at a time.

    Tensors missing from one vector count as zero in it.
    """
    count = len(sources)
    dots = torch.zeros(count, count, dtype=torch.float64)
    key_sets = [set(s.keys()) for s in sources]
    names: list[str] = []
    for source in sources:
        names += [n for n in source.keys() if n not in set(names)]
    for name in names:
        flat = [s.get(name).double().reshape(-1) if name in keys else None
                for s, keys in zip(sources, key_sets, strict=True)]
        for i in range(count):
            for j in range(i, count):
                a, b = flat[i], flat[j]
                if a is not None and b is not None:
                    dots[i, j] += torch.dot(a, b)
    dots = torch.triu(dots) + torch.triu(dots, 1).T
    norms = dots.diagonal().sqrt().clamp_min(1e-300)
    return (dots / norms[:, None] / norms[None, :]).tolist()


def state_dict_of(source: TensorSource, names: Mapping[str, str] | None = None) -> StateDict:
    """Load every tensor of a source into memory (for small models and tests)."""
    return {name: source.get(name) for name in source.keys()}
