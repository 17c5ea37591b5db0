"""A base model's tensors read from files, without open_clip (its import takes seconds).

:func:`resolve_ref` and :func:`base_source` serve the file-level commands (``extract``,
``apply``) in pipelines: a base given as a file (a tvtool checkpoint, ``NAME:PATH``, an
embedded name) is memory-mapped here, and only references whose weights open_clip builds or
downloads (``NAME:random``, a pretrained tag, ``hf-hub:``) import :mod:`tvtool.models.building`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvtool.errors import InvalidInputError
from tvtool.io import (
    DictSource,
    TensorInfo,
    TensorSource,
    load_legacy,
    open_tensors,
)
from tvtool.io.names import strip_wrapper_prefixes
from tvtool.metadata import FileMeta, Kind
from tvtool.models.refs import NAME_IT, ModelRef, RefKind, check_recorded_architecture, parse_ref


class _RenamedSource:
    """A lazy view of a source under other names."""

    def __init__(self, inner: TensorSource, mapping: Mapping[str, str]) -> None:
        self._inner = inner
        self._to_inner = {new: old for old, new in mapping.items()}
        self.metadata = inner.metadata
        self.label = inner.label

    def keys(self) -> list[str]:
        return list(self._to_inner)

    def info(self, name: str) -> TensorInfo:
        info = self._inner.info(self._to_inner[name])
        return TensorInfo(name, info.dtype, info.shape)

    def get(self, name: str) -> torch.Tensor:
        return self._inner.get(self._to_inner[name])

    def close(self) -> None:
        self._inner.close()


def resolve_ref(ref: str | ModelRef) -> ModelRef:
    """Parse a reference and, for a tvtool checkpoint, read its architecture from metadata.

    Raises:
        InvalidInputError: malformed reference, or a file that is not a tvtool checkpoint.
    """
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    if parsed.kind is not RefKind.CHECKPOINT or parsed.architecture:
        return parsed
    source = open_tensors(parsed.location or parsed.text)
    try:
        meta = FileMeta.from_header(source.metadata, repr(parsed.text))
    finally:
        source.close()
    if meta.kind is not Kind.CHECKPOINT:
        raise InvalidInputError(
            f"{parsed.text!r} is a tvtool {meta.kind.value}, not a checkpoint",
            hint="a model reference must be a checkpoint; apply a task vector with `tvtool apply`",
        )
    if not meta.architecture:
        raise InvalidInputError(
            f"{parsed.text!r} does not name its architecture (tvtool.architecture)",
            hint="use NAME:PATH to say which open_clip architecture it is")
    check_recorded_architecture(meta.architecture, repr(parsed.text), NAME_IT,
                                model=False, tokenizer=False)
    return ModelRef(parsed.text, RefKind.CHECKPOINT, meta.architecture, parsed.location)


def base_source(ref: str | ModelRef) -> tuple[TensorSource, ModelRef]:
    """Open the tensors of a base model for lazy, tensor-by-tensor reading.

    File-backed references are memory-mapped; others are built once in memory. Names are
    open_clip state-dict names (a ``module.``/``model.`` wrapper prefix on every name of a
    weights file is removed).

    Args:
        ref: A model reference.

    Returns:
        The tensor source and the resolved reference.

    Raises:
        InvalidInputError: bad reference or weights file.
    """
    resolved = resolve_ref(ref)
    if resolved.kind is RefKind.EMBEDDED:
        path = resolved.location or ""
        try:
            source: TensorSource = open_tensors(path)
        except InvalidInputError:
            raise InvalidInputError(
                f"the embedded {resolved.architecture} weights are missing or damaged at {path}",
                hint=f"run `tvtool pretrain --model {resolved.architecture}` to (re)create them",
            ) from None
        return source, resolved
    if resolved.kind in (RefKind.CHECKPOINT, RefKind.WEIGHTS_FILE):
        location = resolved.location or resolved.text
        if location.endswith(".safetensors"):
            source = open_tensors(location)
            kind = source.metadata.get("tvtool.kind")
            if kind is not None and kind != Kind.CHECKPOINT.value:
                source.close()
                raise InvalidInputError(
                    f"{source.label} is a tvtool {kind}, not model weights",
                    hint="a model reference must be a checkpoint; apply a task vector with "
                         "`tvtool apply`")
        else:
            source = DictSource(load_legacy(location), label=repr(location))
        mapping, _ = strip_wrapper_prefixes(source.keys())
        return _RenamedSource(source, mapping), resolved
    from tvtool.models.building import built_state, random_state

    if resolved.kind is RefKind.RANDOM:
        return DictSource(random_state(resolved.architecture), label=resolved.text), resolved
    return DictSource(built_state(resolved), label=resolved.text), resolved
