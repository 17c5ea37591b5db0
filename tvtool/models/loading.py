"""Building open_clip models from references (fingerprints: :mod:`tvtool.io.fingerprints`).

Reading a base from files (:func:`base_source`, :func:`resolve_ref`) lives in
:mod:`tvtool.models.sources`, which never imports open_clip, building a reference's model in
:mod:`tvtool.models.building`; :func:`load_clip` combines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from tvtool.errors import InvalidInputError
from tvtool.io import TensorSource
from tvtool.limits import short_list
from tvtool.models.backend import open_clip
from tvtool.models.building import create_for
from tvtool.models.hub_access import (
    hub_access,
    tokenizer_cached,
    tokenizer_hint,
    tokenizer_uses_hub,
)
from tvtool.models.quiet import quiet_open_clip
from tvtool.models.refs import NAME_IT, ModelRef, RefKind, check_recorded_architecture
from tvtool.models.sources import base_source, resolve_ref


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
        check_recorded_architecture(resolved.architecture, repr(resolved.text), NAME_IT)
    model, pre_train, pre_eval = create_for(resolved)
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

