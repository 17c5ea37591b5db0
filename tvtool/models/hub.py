"""The ``open_clip_config.json`` of an open_clip Hugging Face directory."""

from __future__ import annotations

import copy
from typing import Any

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from tvtool.errors import InvalidInputError
from tvtool.models.refs import ModelRef, RefKind

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def open_clip_hf_config(ref: ModelRef) -> dict[str, Any]:
    """``{"model_cfg", "preprocess_cfg"}`` as open_clip's ``save_for_hf`` writes them.

    ``model_cfg`` is the architecture's open_clip config (the ``-quickgelu`` variants carry
    ``quick_gelu: true``), so ``local-dir:``/``hf-hub:`` loading rebuilds the same model
    without tvtool. ``preprocess_cfg`` is the base's: the pretrained tag's normalisation where
    the base is a tag, otherwise open_clip's defaults (OpenAI's mean and std).

    Raises:
        InvalidInputError: an architecture without a local open_clip config (``hf-hub:`` bases).
    """
    model_cfg = open_clip.get_model_config(ref.architecture)
    if ref.kind is RefKind.HF_HUB or not model_cfg:
        raise InvalidInputError(
            f"no local open_clip config for {ref.architecture!r}; an open_clip directory "
            "needs one", hint="use a base named by an open_clip architecture (NAME:TAG)")
    preprocess: dict[str, Any] = {"mean": list(OPENAI_DATASET_MEAN),
                                  "std": list(OPENAI_DATASET_STD)}
    if ref.kind is RefKind.PRETRAINED_TAG and ref.location:
        tag_cfg = open_clip.get_pretrained_cfg(ref.architecture, ref.location) or {}
        preprocess.update({k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in tag_cfg.items() if k in _PREPROCESS_KEYS and v})
    return {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": preprocess}
