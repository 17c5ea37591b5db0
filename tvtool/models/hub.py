"""What an open_clip Hugging Face directory says about its base: config and card facts."""

from __future__ import annotations

import copy
from pathlib import PurePath
from typing import Any

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from tvtool.cards import CardBase
from tvtool.errors import InvalidInputError
from tvtool.models.backend import open_clip
from tvtool.models.refs import EMBEDDED_MODELS, ModelRef, RefKind, known_architectures

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
EMBEDDED_LICENSE = "mit"
"""License of the embedded models' weights: tvtool pre-trains them on its own synthetic
images (docs/embedded-world.md) and ships them under the package's license."""


def card_base(text: str, fingerprint: str, license: str | None = None) -> CardBase:
    """A base model reference as a model card publishes it, from its text alone.

    Nothing is read: the text may come from a file's metadata (``export-peft`` publishes the
    ``tvtool.base_ref`` of a vector). Local paths become file names (``NAME:PATH`` ->
    ``NAME:file``, a checkpoint path -> its file name); an open_clip pretrained tag gives the
    Hugging Face repository open_clip downloads its weights from (``base_model``), an
    ``hf-hub:`` reference its repository; the embedded models are MIT-licensed.

    Args:
        text: The reference as given (``ViT-B-32:openai``, ``NAME:PATH``, a path, ...).
        fingerprint: ``sha256:`` of the base tensors ("" when unknown).
        license: A license given by the user (``--license``); else the base's where known.
    """
    text = text.strip()
    hub_id: str | None = None
    known: str | None = None
    name, colon, tag = text.partition(":")
    if text.startswith("hf-hub:"):
        public, hub_id = text, text[len("hf-hub:"):]
    elif text in EMBEDDED_MODELS:
        public, known = text, EMBEDDED_LICENSE
    elif colon and name in known_architectures():
        is_file = tag.endswith(_WEIGHT_SUFFIXES) or "/" in tag or "\\" in tag
        if not is_file and tag in open_clip.list_pretrained_tags_by_model(name):
            public = text
            hub = str((open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub") or "")
            hub_id = hub.strip("/") or None
        elif is_file:
            public = f"{name}:{PurePath(tag).name}"
        else:
            public = text  # NAME:random
    else:
        public = PurePath(text).name or text
    return CardBase(public, fingerprint, hub_id, license or known)

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
