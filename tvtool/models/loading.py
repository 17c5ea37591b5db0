"""Building open_clip models from references (fingerprints: :mod:`tvtool.io.fingerprints`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import open_clip
import torch
from torch import nn

from tvtool.errors import InvalidInputError
from tvtool.io import (
    DictSource,
    TensorInfo,
    TensorSource,
    load_legacy,
    open_tensors,
)
from tvtool.io.names import strip_wrapper_prefixes
from tvtool.limits import short_list
from tvtool.metadata import FileMeta, Kind
from tvtool.models.hub_access import (
    hub_access,
    hub_model_cached,
    tag_weights_cached,
    tokenizer_cached,
    tokenizer_hint,
    tokenizer_uses_hub,
    weights_hint,
)
from tvtool.models.quiet import quiet_open_clip
from tvtool.models.refs import ModelRef, RefKind, check_recorded_architecture, parse_ref
from tvtool.types import StateDict

_RANDOM_INIT_SEED = 0
_NAME_IT = "name the architecture yourself: --base NAME:PATH"


@dataclass
class ClipBundle:
    """An open_clip model with what is needed to use it.

    Attributes:
        model: The open_clip CLIP module (eval mode).
        ref: The parsed reference it was built from (architecture resolved).
        preprocess_train: Training image transform (PIL -> tensor).
        preprocess_eval: Evaluation image transform (PIL -> tensor).
    """

    model: nn.Module
    ref: ModelRef
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_eval: Callable[[Any], torch.Tensor]
    _tokenizer: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        """open_clip model name."""
        return self.ref.architecture

    @property
    def tokenizer(self) -> Callable[..., torch.Tensor]:
        """Text tokenizer for the architecture, loaded on first use.

        Only zero-shot heads built from class names need it: evaluating with head files
        (``eval --head``) never loads one, so it works where the tokenizer is unavailable
        (a hub tokenizer outside an offline cache).
        """
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.architecture)
        return self._tokenizer



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
    check_recorded_architecture(meta.architecture, repr(parsed.text), _NAME_IT,
                                model=False, tokenizer=False)
    return ModelRef(parsed.text, RefKind.CHECKPOINT, meta.architecture, parsed.location)


def _create(architecture: str, pretrained: str | None = None,
            level: int = logging.ERROR) -> tuple[nn.Module, Any, Any]:
    with quiet_open_clip(level):
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            architecture, pretrained=pretrained
        )
    return model, preprocess_train, preprocess_eval


def _create_for(ref: ModelRef) -> tuple[nn.Module, Any, Any]:
    """Build the model of a reference, with weights where open_clip loads them itself."""
    if ref.kind is RefKind.CHECKPOINT:  # the architecture was read from the file
        check_recorded_architecture(ref.architecture, repr(ref.text), _NAME_IT, tokenizer=False)
    if ref.kind is RefKind.PRETRAINED_TAG:
        assert ref.location is not None
        with hub_access(f"the weights of {ref.text}",
                        cached=tag_weights_cached(ref.architecture, ref.location),
                        hint=weights_hint(ref.architecture)):
            return _create(ref.architecture, ref.location, logging.CRITICAL)
    if ref.kind is RefKind.HF_HUB:
        # open_clip reads config and weights from the hub name; `pretrained` must stay unset.
        with hub_access(f"the model {ref.text}",
                        cached=hub_model_cached(ref.text.removeprefix("hf-hub:")),
                        hint=weights_hint("NAME")):
            return _create(ref.architecture, level=logging.CRITICAL)
    if ref.kind is RefKind.RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            return _create(ref.architecture)
    return _create(ref.architecture)


def image_encoder_skeleton(architecture: str) -> nn.Module | None:
    """The image encoder of an architecture, built on the meta device (no memory, no weights).

    Enough to inspect its structure (module types, parameter names and shapes) in about a
    second, before the model is built and its weights loaded, e.g. to refuse a fine-tuning
    mode the architecture does not support.

    Args:
        architecture: open_clip model name.

    Returns:
        The encoder (its tensors hold no data), or ``None`` where no local config describes
        it (``hf-hub:`` models) or open_clip cannot build it this way; callers then inspect
        the real model instead.
    """
    if architecture not in open_clip.list_models():
        return None
    config = open_clip.get_model_config(architecture)
    try:
        from open_clip.model import _build_vision_tower

        with quiet_open_clip(), torch.device("meta"):
            return cast(nn.Module, _build_vision_tower(
                config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False)))
    except Exception:
        # A private builder of open_clip: whatever fails here (another open_clip version, an
        # exotic tower) only defers the structure check to the real model, it never skips it.
        return None


def _random_state(architecture: str) -> StateDict:
    model, _, _ = _create_for(ModelRef(f"{architecture}:random", RefKind.RANDOM, architecture))
    return model.state_dict()


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
    if resolved.kind is RefKind.RANDOM:
        return DictSource(_random_state(resolved.architecture), label=resolved.text), resolved
    model, _, _ = _create_for(resolved)
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
            f"{short_list(missing, 3)}, {len(extra)} unexpected keys {short_list(extra, 3)}"
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
    if resolved.kind is RefKind.CHECKPOINT:  # before anything is built: model and tokenizer
        check_recorded_architecture(resolved.architecture, repr(resolved.text), _NAME_IT)
    model, pre_train, pre_eval = _create_for(resolved)
    if resolved.is_file:
        source, resolved = base_source(resolved)
        try:
            load_state_into(model, source)
        finally:
            source.close()
    model = model.to(device).eval()
    return ClipBundle(model, resolved, pre_train, pre_eval)


def load_tokenizer(architecture: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for ``architecture`` (hub tokenizers: cached, fetched or refused).

    Raises:
        InvalidInputError: a hub tokenizer that is neither cached nor reachable.
        TvtoolError: its download failed.
    """
    if not tokenizer_uses_hub(architecture):
        return cast(Callable[..., torch.Tensor], open_clip.get_tokenizer(architecture))
    with hub_access(f"the tokenizer of {architecture}", cached=tokenizer_cached(architecture),
                    hint=tokenizer_hint()):
        return cast(Callable[..., torch.Tensor], open_clip.get_tokenizer(architecture))

