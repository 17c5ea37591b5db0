"""The shared task-vector rules: coefficients, metadata, architecture and base fit, keys.

Every command that reads task vectors checks them here, so apply, negate, merge, eval and
learn-coeffs refuse the same inputs with the same messages.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.errors import InvalidInputError, TvtoolError, UsageError
from tvtool.formats import dense_source
from tvtool.formats.lora import SUFFIX_A, SUFFIX_B
from tvtool.io import TensorSource, all_finite, open_tensors
from tvtool.limits import cut_text, short_list, short_repr
from tvtool.metadata import FACTORS_KEY, SVD_FACTORS, FileMeta, Kind, Mode

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


# ---------------------------------------------------------------- input checks


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse NaN or Inf in an input tensor.

    Raises:
        InvalidInputError: naming the tensor and the input.
    """
    if not all_finite(tensor):
        raise InvalidInputError(f"{where}: tensor {name!r} contains NaN or Inf",
                                hint="the file is damaged or came from a diverged run")


# ---------------------------------------------------------------- opening vectors


@dataclass
class VectorInput:
    """A task vector opened for streaming, with its parsed metadata.

    Attributes:
        path: The path it was opened from (``-`` for stdin).
        source: Its tensors as dense deltas (LoRA factors are multiplied out when read).
        meta: Its parsed and checked metadata.
        stored: The tensors as the file stores them, when they differ from ``source`` (LoRA
            factors); closing ``source`` closes it.
    """

    path: str
    source: TensorSource
    meta: FileMeta
    stored: TensorSource | None = None


def open_vector(path: str) -> VectorInput:
    """Open a task-vector file as every combination reads it: checked, as dense deltas.

    The one place a command turns a vector file into dense deltas
    (:func:`tvtool.formats.dense_source`), so merge, apply and eval never name a mode.

    Raises:
        InvalidInputError: unreadable file, not a task vector, inconsistent metadata (see
            :func:`open_vector_meta`); nothing stays open then.
    """
    source = open_tensors(path)
    try:
        meta = open_vector_meta(source, source.label)
    except BaseException:
        source.close()
        raise
    dense = dense_source(source, meta)
    return VectorInput(path, dense, meta, source if dense is not source else None)


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


LORA_SUFFIXES = (SUFFIX_A, SUFFIX_B)


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
    factors = meta.extra.get(FACTORS_KEY)
    if factors is not None and factors != SVD_FACTORS:
        raise InvalidInputError(
            f"{label} records tvtool.{FACTORS_KEY}={short_repr(factors, 40)}; this tvtool "
            f"knows only {SVD_FACTORS!r} (vectors written by tvtool compress)",
            hint="upgrade tvtool, or re-create the file")
    if meta.mode is Mode.LORA and not any(n.endswith(LORA_SUFFIXES) for n in names):
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


BATCHNORM_STATISTICS = (".running_mean", ".running_var")
"""Name endings of BatchNorm statistics: buffers a fine-tune updates, not weights it learns."""


def batchnorm_warning(moved: Sequence[str], label: str) -> str | None:
    """The warning for a vector that changes BatchNorm statistics (None when it changes none).

    Statistics are averages over data, not directions in weight space: scaled, negated or added
    to others they can leave a running variance negative, and the model then computes NaN
    (``eval`` refuses to report an accuracy from NaN logits).

    Args:
        moved: Names of the statistics the vector changes.
        label: The vector or checkpoint, for the message.
    """
    if not moved:
        return None
    return (f"warning: {label} changes the BatchNorm statistics of {len(moved)} tensors (e.g. "
            f"{short_repr(moved[0], 80)}); scaled, negated or combined they can make a running "
            "variance negative, and the model then computes NaN")


def moved_batchnorm(source: TensorSource) -> list[str]:
    """BatchNorm statistics a task vector changes (non-zero deltas), in name order."""
    return [name for name in sorted(source.keys()) if name.endswith(BATCHNORM_STATISTICS)
            and bool(source.get(name).ne(0).any())]


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
        raise InvalidInputError(f"{label} was made for {cut_text(recorded, 60)}, "
                                f"{target_label} is {cut_text(target, 60)}",
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



def check_same_shape(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Refuse two tensors of one name with different shapes.

    Raises:
        InvalidInputError: the shapes differ.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise InvalidInputError(f"tensor {name!r}: shape {tuple(a.shape)} vs {tuple(b.shape)}")


def check_same_dtype(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Refuse two tensors of one name with different dtypes, or non-floating ones.

    Raises:
        InvalidInputError: the dtypes differ or are not floating point.
    """
    if a.dtype != b.dtype:
        raise InvalidInputError(f"tensor {name!r}: dtype {a.dtype} vs {b.dtype}",
                                hint="convert the files to one precision first")
    if not a.is_floating_point():
        raise InvalidInputError(f"tensor {name!r} is {a.dtype}, not floating point; task "
                                "vectors hold floating tensors only")


def check_same_keys(a: Sequence[str], b: Sequence[str], label_a: str, label_b: str, *,
                    hint: str | None = None) -> None:
    """Refuse two vectors that hold different tensors, naming a few on each side.

    Raises:
        InvalidInputError: the key sets differ.
    """
    keys_a, keys_b = set(a), set(b)
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        raise InvalidInputError(
            f"{label_a} and {label_b} hold different tensors: {len(only_a)} only in {label_a} "
            f"{short_list(only_a, 3)}, {len(only_b)} only in {label_b} {short_list(only_b, 3)}",
            hint=hint)
