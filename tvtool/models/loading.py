"""Building open_clip models from references, and the base fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from torch import nn

from tvtool.errors import InvalidInputError
from tvtool.io import DictSource, TensorSource, load_legacy, open_tensors
from tvtool.metadata import FileMeta, Kind
from tvtool.models.refs import TINY_MODEL, ModelRef, RefKind, parse_ref
from tvtool.types import StateDict

_RANDOM_INIT_SEED = 0


@dataclass
class ClipBundle:
    """An open_clip model with what is needed to use it.

    Attributes:
        model: The open_clip CLIP module (eval mode).
        ref: The parsed reference it was built from (architecture resolved).
        preprocess_train: Training image transform (PIL -> tensor).
        preprocess_eval: Evaluation image transform (PIL -> tensor).
        tokenizer: Text tokenizer for the architecture.
    """

    model: nn.Module
    ref: ModelRef
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_eval: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]

    @property
    def architecture(self) -> str:
        """open_clip model name."""
        return self.ref.architecture


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs a root-level warning for every model built without weights."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _strip_wrapper_prefix(names: list[str]) -> dict[str, str]:
    """Map stored names to open_clip names, dropping a DDP ``module.`` prefix on every key."""
    if names and all(n.startswith("module.") for n in names):
        return {n: n[len("module."):] for n in names}
    return {n: n for n in names}


class _RenamedSource:
    """A lazy view of a source under other names."""

    def __init__(self, inner: TensorSource, mapping: Mapping[str, str]) -> None:
        self._inner = inner
        self._to_inner = {new: old for old, new in mapping.items()}
        self.metadata = inner.metadata
        self.label = inner.label

    def keys(self) -> list[str]:
        return list(self._to_inner)

    def info(self, name: str):  # type: ignore[no-untyped-def]
        info = self._inner.info(self._to_inner[name])
        return type(info)(name, info.dtype, info.shape)

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
        raise InvalidInputError(f"{parsed.text!r} does not name its architecture (tvtool.architecture)")
    return ModelRef(parsed.text, RefKind.CHECKPOINT, meta.architecture, parsed.location)


def _create(architecture: str, pretrained: str | None = None) -> tuple[nn.Module, Any, Any]:
    with _quiet_open_clip():
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            architecture, pretrained=pretrained
        )
    return model, preprocess_train, preprocess_eval


def _random_state(architecture: str) -> StateDict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        model, _, _ = _create(architecture)
    return model.state_dict()


def base_source(ref: str | ModelRef) -> tuple[TensorSource, ModelRef]:
    """Open the tensors of a base model for lazy, tensor-by-tensor reading.

    File-backed references are memory-mapped; others are built once in memory.

    Args:
        ref: A model reference.

    Returns:
        The tensor source (open_clip state-dict names) and the resolved reference.

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
                f"the embedded {TINY_MODEL} weights are missing or damaged at {path}",
                hint="run `tvtool pretrain` to (re)create them",
            ) from None
        return source, resolved
    if resolved.kind in (RefKind.CHECKPOINT, RefKind.WEIGHTS_FILE):
        location = resolved.location or resolved.text
        if location.endswith(".safetensors"):
            source = open_tensors(location)
        else:
            source = DictSource(load_legacy(location), label=repr(location))
        return _RenamedSource(source, _strip_wrapper_prefix(source.keys())), resolved
    if resolved.kind is RefKind.RANDOM:
        return DictSource(_random_state(resolved.architecture), label=resolved.text), resolved
    model, _, _ = _create(resolved.architecture, resolved.location)
    return DictSource(model.state_dict(), label=resolved.text), resolved


def load_state_into(model: nn.Module, source: TensorSource) -> None:
    """Copy every tensor of ``source`` into ``model`` (strict: same names and shapes).

    Raises:
        InvalidInputError: missing/extra keys or shape mismatch, with counts and first names.
    """
    expected = model.state_dict()
    keys = set(source.keys())
    missing = sorted(set(expected) - keys)
    extra = sorted(keys - set(expected))
    if missing or extra:
        raise InvalidInputError(
            f"{source.label} does not fit the architecture: {len(missing)} missing keys "
            f"{missing[:3]}, {len(extra)} unexpected keys {extra[:3]}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            tensor = source.get(name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise InvalidInputError(
                    f"{source.label}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                    f"architecture expects {tuple(target.shape)}"
                )
            target.copy_(tensor)


def load_clip(ref: str | ModelRef, device: str | torch.device = "cpu") -> ClipBundle:
    """Build an open_clip model from a reference, in eval mode on ``device``.

    Args:
        ref: Model reference (see :func:`tvtool.models.refs.parse_ref`).
        device: Torch device.

    Raises:
        InvalidInputError: bad reference or weights.
    """
    resolved = resolve_ref(ref)
    if resolved.kind in (RefKind.PRETRAINED_TAG, RefKind.HF_HUB):
        model, pre_train, pre_eval = _create(resolved.architecture, resolved.location)
    else:
        model, pre_train, pre_eval = _create(resolved.architecture)
        source, resolved = base_source(resolved)
        try:
            load_state_into(model, source)
        finally:
            source.close()
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(resolved.architecture)
    return ClipBundle(model, resolved, pre_train, pre_eval, tokenizer)


def fingerprint(source: TensorSource) -> str:
    """Hash the base tensors (names, dtypes, shapes, bytes) one tensor at a time.

    The hash is independent of storage order, so the same weights give the same fingerprint
    whether read from a pretrained tag, a weights file or a tvtool checkpoint of equal dtypes.

    Returns:
        ``sha256:<hex>``.
    """
    digest = hashlib.sha256()
    for name in sorted(source.keys()):
        tensor = source.get(name).detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def state_dict_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`fingerprint` of tensors already in memory."""
    return fingerprint(DictSource(tensors))
