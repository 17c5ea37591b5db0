"""Task-vector algebra: extract, negate, scale, add, apply.

Two layers:

* pure functions over :data:`~tvtool.types.StateDict` (``extract``, ``negate``, ``scale``,
  ``add``, ``apply``) used by the library and the property tests;
* streaming plans over :class:`~tvtool.io.TensorSource` (``plan_extract``, ``plan_combine``)
  that the commands use so N inputs cost about one tensor of memory each, never N models.

Both layers share the per-tensor primitives, so they cannot disagree.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tvtool.errors import InvalidInputError, NumericalError, TvtoolError, UsageError
from tvtool.formats.lora import SUFFIX_A, SUFFIX_B
from tvtool.io import TensorInfo, TensorSource, all_finite
from tvtool.io.names import shared_wrapper_prefixes
from tvtool.limits import short_repr
from tvtool.metadata import FileMeta, Kind, Mode
from tvtool.types import StateDict

# ---------------------------------------------------------------- coefficients


def check_coefficients(values: Sequence[Any], where: str = "--coef",
                       error: type[TvtoolError] = UsageError) -> tuple[float, ...]:
    """The one check of scaling coefficients: each must be a finite number.

    Args:
        values: The coefficients as given (numbers from flags, JSON or YAML).
        where: Names the flag or file in the message.
        error: :class:`UsageError` for flags, :class:`InvalidInputError` for file contents.

    Returns:
        The coefficients as floats.

    Raises:
        UsageError / InvalidInputError: a value that is no number, or not finite.
    """
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: coefficient {short_repr(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            raise error(f"{where}: coefficient {short_repr(value)} is not finite")
        out.append(number)
    return tuple(out)


def expand_coefs(coefs: Sequence[float], count: int) -> list[float]:
    """One coefficient per vector: a single value is repeated.

    Raises:
        UsageError: when the counts do not fit.
    """
    if len(coefs) == 1:
        return list(coefs) * count
    if len(coefs) != count:
        raise UsageError(f"{len(coefs)} coefficients given for {count} vectors",
                         hint="give one --coef for all vectors or one per vector")
    return list(coefs)


# ---------------------------------------------------------------- per-tensor primitives


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse NaN or Inf in an input tensor.

    Raises:
        InvalidInputError: naming the tensor and the input.
    """
    if not all_finite(tensor):
        raise InvalidInputError(f"{where}: tensor {name!r} contains NaN or Inf",
                                hint="the file is damaged or came from a diverged run")


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
        _check_same_shape(name, base[name], tensor)
        _check_same_dtype(name, base[name], tensor)
        out[name] = tensor_delta(base[name], tensor)
    return out


def _refuse_factors(vectors: Sequence[StateDict], operation: str) -> None:
    # Elementwise algebra on LoRA factors is wrong: scaling both A and B by c scales ΔW by c².
    for vector in vectors:
        factors = [n for n in vector if n.endswith(_LORA_SUFFIXES)]
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
        _check_same_keys(list(first), list(vector), "vector 0", f"vector {index}")
    out: StateDict = {}
    for name, tensor in first.items():
        parts = [v[name] for v in vectors]
        for part in parts[1:]:
            _check_same_shape(name, tensor, part)
            _check_same_dtype(name, tensor, part)
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
                                    f"e.g. {extra[:3]}")
    out: StateDict = {}
    for name, tensor in base.items():
        parts = [(v[name], c) for v, c in zip(vectors, coefs, strict=True) if name in v]
        for part, _ in parts:
            _check_same_shape(name, tensor, part)
            _check_same_dtype(name, tensor, part)
        if parts:
            out[name] = tensor_combine(tensor, [p for p, _ in parts], [c for _, c in parts],
                                       tensor.dtype)
        else:
            out[name] = tensor
    return out


def _check_same_shape(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise InvalidInputError(f"tensor {name!r}: shape {tuple(a.shape)} vs {tuple(b.shape)}")


def _check_same_dtype(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise InvalidInputError(f"tensor {name!r}: dtype {a.dtype} vs {b.dtype}",
                                hint="convert the files to one precision first")
    if not a.is_floating_point():
        raise InvalidInputError(f"tensor {name!r} is {a.dtype}, not floating point; task "
                                "vectors hold floating tensors only")


def _check_same_keys(a: Sequence[str], b: Sequence[str], label_a: str, label_b: str) -> None:
    keys_a, keys_b = set(a), set(b)
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        raise InvalidInputError(
            f"{label_a} and {label_b} hold different tensors: {len(only_a)} only in {label_a} "
            f"{only_a[:3]}, {len(only_b)} only in {label_b} {only_b[:3]}"
        )


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


# ---------------------------------------------------------------- streaming plans


@dataclass
class VectorInput:
    """A task vector opened for streaming, with its parsed metadata."""

    path: str
    source: TensorSource
    meta: FileMeta


def open_vector_meta(source: TensorSource, label: str) -> FileMeta:
    """Parse a task vector's metadata and refuse other kinds of tvtool file.

    Also refuses metadata that contradicts itself or the tensors (see
    :func:`check_vector_consistency`).

    Raises:
        InvalidInputError: no tvtool metadata, the file is a checkpoint/coefficients/head, or
            inconsistent metadata.
    """
    meta = FileMeta.from_header(source.metadata, label)
    if meta.kind is not Kind.TASK_VECTOR:
        hint = ("pass it as --base, or create a vector with `tvtool extract`"
                if meta.kind is Kind.CHECKPOINT else None)
        raise InvalidInputError(f"{label} is a tvtool {meta.kind.value}, not a task vector",
                                hint=hint)
    if meta.mode is Mode.LLORA and meta.linearized:
        # Before L-LoRA became per-adapter (non-linearized), tvtool's `llora` linearized the
        # whole network in the LoRA factors: that model is now the mode `llora-net`.
        meta = meta.with_changes(mode=Mode.LLORA_NET)
        _note_once(f"note: {label} is a `llora` vector from an older tvtool (whole network "
                   "linearized in the LoRA factors); reading it as mode llora-net")
    check_vector_consistency(meta, source.keys(), label)
    return meta


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """One line on stderr, once per process (a vector is often opened more than once)."""
    if message not in _NOTED:
        _NOTED.add(message)
        sys.stderr.write(message + "\n")


_LORA_SUFFIXES = (SUFFIX_A, SUFFIX_B)


def check_vector_consistency(meta: FileMeta, names: Sequence[str], label: str) -> None:
    """Refuse task-vector metadata that contradicts itself or the tensors.

    A ``linear`` vector is a change of the linearized model: recorded as not linearized, it
    would be added to the weights without ``--approximate-linearized`` and evaluated as another
    model. A ``lora`` vector without LoRA factors would be taken as dense deltas.

    Raises:
        InvalidInputError: ``mode=linear`` or ``llora-net`` with ``linearized=false``, or
            ``mode=lora`` without
            any ``*.lora_A``/``*.lora_B`` tensor.
    """
    if meta.mode is not None and meta.mode.linearized and not meta.linearized:
        raise InvalidInputError(
            f"{label} records tvtool.mode={meta.mode.value} but tvtool.linearized=false: such "
            "a vector only means something as a change of the linearized model",
            hint="the metadata was edited or damaged; re-create the file with tvtool")
    if meta.mode is Mode.LORA and not any(n.endswith(_LORA_SUFFIXES) for n in names):
        raise InvalidInputError(
            f"{label} records tvtool.mode=lora but holds no LoRA factors (*.lora_A, *.lora_B)",
            hint="the metadata was edited or damaged; re-create the file with tvtool")


def metadata_warnings(meta: FileMeta, label: str) -> list[str]:
    """Warnings for a task vector whose provenance cannot be checked.

    Without ``tvtool.base_fingerprint`` nothing can tell whether the vector fits the base it is
    used with; without ``tvtool.architecture`` nothing can tell whether the model computes what
    the vector was trained for.
    """
    missing = [key for key, value in (("tvtool.base_fingerprint", meta.base_fingerprint),
                                      ("tvtool.architecture", meta.architecture)) if not value]
    if not missing:
        return []
    return [f"warning: {label} records no {' and no '.join(missing)}; it cannot be checked "
            "against the base (is it a file from another tool, or was its metadata removed?)"]


def _strip_activation(architecture: str) -> str:
    return architecture.removesuffix("-quickgelu")


def _activation(architecture: str) -> str:
    return "QuickGELU" if architecture.endswith("-quickgelu") else "GELU"


def check_architecture(label: str, recorded: str | None, target: str | None,
                       target_label: str = "the base") -> str | None:
    """One rule for whether a vector made for ``recorded`` may be used with ``target``.

    ``X`` and ``X-quickgelu`` hold the same tensors but compute with different activations
    (GELU vs QuickGELU), so a vector trained with one is accepted on the other with a warning;
    any other difference is an error. A missing architecture is not checked here (see
    :func:`metadata_warnings`).

    Returns:
        A warning when only the activation differs, else None.

    Raises:
        InvalidInputError: different architectures.
    """
    if not recorded or not target or recorded == target:
        return None
    if _strip_activation(recorded) != _strip_activation(target):
        raise InvalidInputError(f"{label} was made for {recorded}, {target_label} is {target}",
                                hint="task vectors only fit the architecture they were made for")
    return (f"warning: {label} was made for {recorded} ({_activation(recorded)}) and is used with "
            f"{target_label} {target} ({_activation(target)}): same tensors, different activation, "
            "so the model does not compute what the vector was trained for")


def check_vectors_fit_base(metas: Sequence[tuple[str, FileMeta]], base_fp: str, *,
                           allow_mismatch: bool, architecture: str) -> list[str]:
    """Refuse vectors recorded against another base, unless explicitly allowed.

    Returns:
        Warnings to show: vectors without provenance metadata, or made for the same tensors
        with another activation (see :func:`check_architecture`).

    Raises:
        InvalidInputError: architecture mismatch (never overridable: the tensors would not
            fit), or fingerprint mismatch without ``allow_mismatch``.
    """
    warnings: list[str] = []
    for label, meta in metas:
        warnings += metadata_warnings(meta, label)
        note = check_architecture(label, meta.architecture, architecture)
        if note:
            warnings.append(note)
        if meta.base_fingerprint and meta.base_fingerprint != base_fp and not allow_mismatch:
            raise InvalidInputError(
                f"{label} was extracted from another base (fingerprint "
                f"{meta.base_fingerprint[:19]}… vs {base_fp[:19]}…)",
                hint="use the base it was made from, or --allow-base-mismatch if you are sure")
    return warnings


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
        notes.append(f"{len(missing)} base tensors absent from {finetuned.label} taken as "
                     "unchanged")
    layout: list[TensorInfo] = []
    producers: dict[str, Producer] = {}
    skipped = 0
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
    if not layout:
        raise InvalidInputError("the task vector would be empty: no floating tensor changed")
    return StreamPlan(layout, producers, notes)


def _delta_of(base: TensorSource, finetuned: TensorSource, name: str, stored: str
              ) -> torch.Tensor:
    b, f = base.get(name), finetuned.get(stored)
    delta = tensor_delta(b, f)
    if not all_finite(delta):
        check_finite(b, name, base.label)
        check_finite(f, stored, finetuned.label)
        raise _overflow(name)
    return delta


def _overflow(name: str) -> NumericalError:
    return NumericalError(f"result tensor {name!r} contains NaN or Inf although the inputs "
                          "are finite (overflow)",
                          hint="check the coefficients, or use a wider dtype")


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
    if not vectors and base is None:
        raise InvalidInputError("nothing to combine")
    key_sets = [set(source.keys()) for source, _ in vectors]
    if base is not None:
        names = base.keys()
        base_set = set(names)
        for (source, _), keys in zip(vectors, key_sets, strict=True):
            extra = sorted(keys - base_set)
            if extra:
                raise InvalidInputError(
                    f"{source.label} has {len(extra)} tensors that are not in the base, e.g. "
                    f"{extra[:3]}", hint="was it extracted from another architecture?")
        infos = {n: base.info(n) for n in names}
        reference = {n: base.label for n in names}
    else:
        first = vectors[0][0]
        names = first.keys()
        seen = set(names)
        infos = {n: first.info(n) for n in names}
        reference = {n: first.label for n in names}
        for source, _ in vectors[1:]:
            source_names = source.keys()
            if not allow_subset:
                _check_same_keys(names, source_names, first.label, source.label)
            for name in source_names:
                if name not in seen:
                    names.append(name)
                    seen.add(name)
                    infos[name] = source.info(name)
                    reference[name] = source.label
    for (source, _), keys in zip(vectors, key_sets, strict=True):
        for name in keys:
            _check_info(name, source.info(name), source.label, infos[name], reference[name])

    def produce(name: str) -> torch.Tensor:
        info = infos[name]
        acc: torch.Tensor | None = None
        if base is not None:
            base_tensor = base.get(name)
            if not any(name in keys for keys in key_sets):
                check_finite(base_tensor, name, base.label)
                return base_tensor
            acc = start_sum(base_tensor, 1.0, accumulation_dtype(info.dtype))
            del base_tensor
        for (source, coef), keys in zip(vectors, key_sets, strict=True):
            if name not in keys:
                continue
            tensor = source.get(name)
            acc = (start_sum(tensor, coef, accumulation_dtype(info.dtype)) if acc is None
                   else add_to_sum(acc, tensor, coef))
            del tensor
        if acc is None:  # pragma: no cover - every name comes from the base or a vector
            raise InvalidInputError(f"no input holds tensor {name!r}")
        result = acc.to(info.dtype)
        if not all_finite(result):
            # One check of the result instead of one per input; only now find the culprit.
            blame(name)
        return result

    def blame(name: str) -> None:
        if base is not None:
            check_finite(base.get(name), name, base.label)
        for (source, _), keys in zip(vectors, key_sets, strict=True):
            if name in keys:
                check_finite(source.get(name), name, source.label)
        raise _overflow(name)

    layout = [TensorInfo(n, infos[n].dtype, infos[n].shape) for n in names]
    producers: dict[str, Producer] = {n: functools.partial(produce, n) for n in names}
    return StreamPlan(layout, producers)


def _check_info(name: str, info: TensorInfo, label: str, expected: TensorInfo,
                expected_label: str) -> None:
    if info.shape != expected.shape:
        raise InvalidInputError(f"tensor {name!r}: {label} has shape {info.shape}, "
                                f"{expected_label} has {expected.shape}",
                                hint="were they made from the same architecture?")
    if not info.dtype.is_floating_point:
        raise InvalidInputError(f"tensor {name!r} of {label} is {info.dtype}; task vectors "
                                "hold floating tensors only")
    if info.dtype != expected.dtype:
        raise InvalidInputError(f"tensor {name!r}: {label} is {info.dtype}, {expected_label} "
                                f"is {expected.dtype}",
                                hint="convert the files to one precision first")


def vector_norms(source: TensorSource) -> dict[str, float]:
    """L2 norm of every tensor of a vector, computed one tensor at a time."""
    names = source.keys()
    return {name: float(source.get(name).double().norm()) for name in names}


def cosine_matrix(sources: Sequence[TensorSource]) -> list[list[float]]:
    """Cosine similarities between flattened task vectors, one tensor name at a time.

    Tensors missing from one vector count as zero in it; a zero vector has similarity 0
    with everything (itself included).

    Raises:
        InvalidInputError: two vectors hold a tensor of different shapes.
    """
    count = len(sources)
    dots = torch.zeros(count, count, dtype=torch.float64)
    key_sets = [set(s.keys()) for s in sources]
    names: list[str] = []
    seen: set[str] = set()
    for source in sources:
        source_names = source.keys()
        fresh = [n for n in source_names if n not in seen]
        names += fresh
        seen.update(fresh)
    for name in names:
        owners = [i for i in range(count) if name in key_sets[i]]
        shapes = {sources[i].info(name).shape for i in owners}
        if len(shapes) > 1:
            raise InvalidInputError(f"tensor {name!r} has different shapes in the inputs: "
                                    f"{sorted(shapes)}")
        flat = {i: sources[i].get(name).double().reshape(-1) for i in owners}
        for a in owners:
            for b in owners:
                if b >= a:
                    dots[a, b] += torch.dot(flat[a], flat[b])
    dots = torch.triu(dots) + torch.triu(dots, 1).T
    norms = dots.diagonal().sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots))
    return cosine.tolist()


def state_dict_of(source: TensorSource) -> StateDict:
    """Load every tensor of a source into memory (for small models and tests)."""
    names = source.keys()
    return {name: source.get(name) for name in names}
