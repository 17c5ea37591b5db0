"""Building an open_clip model from a reference: the weights open_clip loads itself.

Imported by :mod:`tvtool.models.loading` and, only for references that need it
(``NAME:random``, a pretrained tag, ``hf-hub:``), by :mod:`tvtool.models.sources`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tvtool.models.backend import open_clip
from tvtool.models.hub_access import (
    hub_access,
    hub_model_cached,
    tag_weights_cached,
    weights_hint,
)
from tvtool.models.quiet import quiet_open_clip
from tvtool.models.refs import NAME_IT, ModelRef, RefKind, check_recorded_architecture
from tvtool.types import StateDict

_RANDOM_INIT_SEED = 0


def _create(architecture: str, pretrained: str | None = None,
            level: int = logging.ERROR) -> tuple[nn.Module, Any, Any]:
    with quiet_open_clip(level):
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            architecture, pretrained=pretrained
        )
    return model, preprocess_train, preprocess_eval


def create_for(ref: ModelRef) -> tuple[nn.Module, Any, Any]:
    """Build the model of a reference, with weights where open_clip loads them itself.

    Returns:
        The model and its training and evaluation transforms.
    """
    if ref.kind is RefKind.CHECKPOINT:  # the architecture was read from the file
        check_recorded_architecture(ref.architecture, repr(ref.text), NAME_IT, tokenizer=False)
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


def random_state(architecture: str) -> StateDict:
    """The state dict of ``NAME:random``: the architecture built with a fixed seed."""
    model, _, _ = create_for(ModelRef(f"{architecture}:random", RefKind.RANDOM, architecture))
    return model.state_dict()


def built_state(ref: ModelRef) -> StateDict:
    """The state dict of a reference whose weights open_clip loads (a tag, an ``hf-hub:`` model)."""
    model, _, _ = create_for(ref)
    return model.state_dict()
