"""Model references: one grammar for naming a base model everywhere.

``NAME`` (the embedded ``tvtool-tiny`` and ``tvtool-small`` only), ``NAME:PRETRAINED`` (an
open_clip pretrained tag, ``random``, or a local weights file), ``hf-hub:ORG/REPO``, or the path
of a tvtool checkpoint.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType

from tvtool.errors import InvalidInputError
from tvtool.limits import short_repr

TINY_MODEL = "tvtool-tiny"
SMALL_MODEL = "tvtool-small"
BASE_MODEL = "tvtool-base"
# open_clip configs tvtool registers and pre-trains on its own corpus (docs/embedded-world.md):
# the tiny model of the unit tests and the small one of the demo, whose weights ship in the
# package, and the wider base of the results at width 256, whose 26 MB would take the package
# past its size budget: `tvtool pretrain --model tvtool-base` writes its cache copy.
EMBEDDED_MODELS = (TINY_MODEL, SMALL_MODEL, BASE_MODEL)
PACKAGED_MODELS = (TINY_MODEL, SMALL_MODEL)
NAME_IT = "name the architecture yourself: --base NAME:PATH"
"""The hint for a checkpoint whose recorded architecture tvtool refuses."""
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _open_clip() -> ModuleType:
    """open_clip with tvtool's configs registered, imported on first use (it is slow)."""
    from tvtool.models.backend import open_clip

    return open_clip


class RefKind(str, Enum):
    """How a reference resolves to weights."""

    EMBEDDED = "embedded"
    RANDOM = "random"
    PRETRAINED_TAG = "pretrained_tag"
    WEIGHTS_FILE = "weights_file"
    HF_HUB = "hf_hub"
    CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
        text: The reference as the user wrote it.
        kind: How it resolves to weights.
        architecture: open_clip model name (``hf-hub:...`` for hub models).
        location: Pretrained tag or file path, where the kind has one.
    """

    text: str
    kind: RefKind
    architecture: str
    location: str | None = None

    @property
    def is_file(self) -> bool:
        """Whether the weights come from a local file tvtool reads."""
        return self.kind in (RefKind.EMBEDDED, RefKind.WEIGHTS_FILE, RefKind.CHECKPOINT)


def cache_dir() -> Path:
    """Return tvtool's cache directory (``$TVTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/tvtool``)."""
    if os.environ.get("TVTOOL_CACHE_DIR"):
        return Path(os.environ["TVTOOL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tvtool"


def embedded_weights_path(name: str = TINY_MODEL) -> Path:
    """Where the pre-trained weights of an embedded model live.

    Args:
        name: One of :data:`EMBEDDED_MODELS`.

    Returns:
        The packaged file if it exists, else the copy ``tvtool pretrain`` writes to the cache
        directory.
    """
    if name not in EMBEDDED_MODELS:
        raise InvalidInputError(f"{short_repr(name, 60)} is not an embedded model",
                                hint=did_you_mean(name, EMBEDDED_MODELS)
                                + f"use one of {', '.join(EMBEDDED_MODELS)}")
    packaged = Path(__file__).parent / "weights" / f"{name}.safetensors"
    if packaged.is_file():
        return packaged
    return cache_dir() / f"{name}.safetensors"


def known_architectures() -> list[str]:
    """open_clip model names tvtool can build (tvtool-tiny included)."""
    return list(_open_clip().list_models())


def is_known_architecture(name: str) -> bool:
    """Whether open_clip knows the model name ``name``, without importing open_clip if possible.

    The same answer as ``name in known_architectures()``: before open_clip is imported, its
    config directory is read as open_clip's registry reads it (the ``*.json`` files holding
    ``embed_dim``, ``vision_cfg`` and ``text_cfg``, tvtool's own configs added), which takes
    milliseconds where importing open_clip takes seconds; once it is imported (configs may
    have been added since), open_clip's registry answers.
    """
    if name in EMBEDDED_MODELS:
        return True
    if "open_clip" not in sys.modules:
        names = _config_names()
        if names is not None:
            return name in names
    return name in known_architectures()


@functools.cache
def _config_names() -> frozenset[str] | None:
    """open_clip's config names read from its package files; None where they are not found."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    if not folder.is_dir():  # another layout: ask open_clip itself
        return None
    names = set(EMBEDDED_MODELS)
    for path in folder.glob("*.json"):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # open_clip would fail on it too: not a name tvtool can build
        if isinstance(config, dict) and all(key in config for key in
                                            ("embed_dim", "vision_cfg", "text_cfg")):
            names.add(path.stem)
    return frozenset(names)


def network_need(architecture: str, *, tokenizer: bool = True) -> str | None:
    """Why building ``architecture`` would reach the network, if it would.

    ``hf-hub:`` names are downloaded; open_clip configs whose text tower is a Hugging Face
    model (``hf_model_name``: RoBERTa, XLM-R, mT5, NLLB) fetch its config to build the model,
    and those with a Hugging Face tokenizer (``hf_tokenizer_name``: SigLIP, CLIPA, ...) fetch
    the tokenizer.

    Args:
        architecture: open_clip model name.
        tokenizer: Whether its tokenizer is built too (not for module tables or shapes).

    Returns:
        One phrase saying what would be fetched, or None when everything is local.
    """
    if architecture.startswith("hf-hub:"):
        return "it is a Hugging Face hub model"
    text = (_open_clip().get_model_config(architecture) or {}).get("text_cfg", {})
    if text.get("hf_model_name"):
        return f"its text tower is the Hugging Face model {text['hf_model_name']!r}"
    if tokenizer and text.get("hf_tokenizer_name"):
        return f"its tokenizer comes from the Hugging Face hub ({text['hf_tokenizer_name']!r})"
    return None


def check_recorded_architecture(architecture: str, origin: str, hint: str, *,
                                model: bool = True, tokenizer: bool = True) -> None:
    """Refuse an architecture read from a file that is unknown or would need the network.

    Nothing read from a file may make tvtool go online: a name the user types is their
    choice, a name recorded in a file someone sent is not.

    Args:
        architecture: The recorded open_clip name.
        origin: The file, for the message.
        hint: How to name the architecture explicitly instead.
        model: The model will be built (checks what that needs).
        tokenizer: Its tokenizer will be built too.

    Raises:
        InvalidInputError: an unknown name, or one :func:`network_need` says needs the network.
    """
    if architecture in EMBEDDED_MODELS:  # tvtool's own configs: known and local (no open_clip)
        return
    if not is_known_architecture(architecture):
        raise InvalidInputError(f"{origin} records the architecture "
                                f"{short_repr(architecture, 60)}, which open_clip does not know",
                                hint=hint)
    need = network_need(architecture, tokenizer=tokenizer) if model or tokenizer else None
    if need is not None:
        raise InvalidInputError(
            f"{origin} records the architecture {architecture!r}: {need}, and tvtool never "
            "goes online for a name read from a file", hint=hint)


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """``did you mean 'X'? `` for the closest names of ``known`` (difflib), else ``''``.

    The start of a hint: typos in model names (``tvtool-tinny``, ``ViT-B-23``) are the usual
    reason a reference is unknown.
    """
    # Compared without case: a case slip (vit-b-32) is one name, not three close ones.
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        close = [lowered[name.lower()]]
    else:
        close = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered),
                                                               n=3, cutoff=0.75)]
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def parse_ref(text: str) -> ModelRef:
    """Parse a model reference.

    Args:
        text: ``NAME``, ``NAME:PRETRAINED``, ``hf-hub:ORG/REPO`` or a tvtool checkpoint path.

    Returns:
        The parsed reference (files are checked for existence, not read). For a pretrained
        tag whose weights were trained with QuickGELU (the OpenAI models), the architecture is
        the ``-quickgelu`` config, so the model computes what the weights were trained for
        and the name recorded in output files rebuilds the same model.

    Raises:
        InvalidInputError: unknown model name or tag, or missing file.
    """
    text = text.strip()
    if not text:
        raise InvalidInputError("empty model reference", hint=f"try {TINY_MODEL}")
    if text.startswith("hf-hub:"):
        if len(text) == len("hf-hub:"):
            raise InvalidInputError("empty hf-hub reference", hint="use hf-hub:ORG/REPO")
        return ModelRef(text, RefKind.HF_HUB, text, text[len("hf-hub:"):])
    path = Path(text).expanduser()
    if path.is_file():
        return _file_ref(text, path)
    name, colon, tag = text.partition(":")
    # The embedded names are checked first: they need no open_clip (slow to import), so a
    # pipeline stage given `tvtool-tiny` or tvtool-tiny:PATH only reads files.
    if not colon and name in EMBEDDED_MODELS:
        return ModelRef(text, RefKind.EMBEDDED, name, str(embedded_weights_path(name)))
    if colon and is_known_architecture(name):
        return _tagged_ref(text, name, tag)
    if path.suffix in _WEIGHT_SUFFIXES or os.sep in text:
        raise InvalidInputError(f"model reference {text!r} is not an existing file")
    if name not in known_architectures():
        raise InvalidInputError(
            f"unknown model {short_repr(name, 60)} in reference {short_repr(text, 80)}",
            hint=did_you_mean(name, known_architectures())
            + f"use an open_clip model name (e.g. ViT-B-32), {TINY_MODEL}, or a checkpoint path",
        )
    raise InvalidInputError(
        f"model reference {text!r} names no weights",
        hint=f"use {name}:TAG (e.g. {name}:openai), {name}:PATH for a local file, "
             f"or {name}:random",
    )


def _file_ref(text: str, path: Path) -> ModelRef:
    if path.suffix != ".safetensors":
        raise InvalidInputError(
            f"model reference {text!r} is a file without an architecture",
            hint="use NAME:PATH (e.g. ViT-B-32-quickgelu:weights.pt), or convert it with "
                 "`tvtool convert`",
        )
    # Architecture comes from the file's tvtool metadata (resolved by the loader).
    return ModelRef(text, RefKind.CHECKPOINT, "", str(path))


def _tagged_ref(text: str, name: str, tag: str) -> ModelRef:
    if not tag:
        raise InvalidInputError(
            f"model reference {text!r} names no weights after ':'",
            hint=f"use {name}:TAG, {name}:PATH for a local file, or {name}:random")
    if tag == "random":
        return ModelRef(text, RefKind.RANDOM, name)
    tag_path = Path(tag).expanduser()
    if tag_path.suffix in _WEIGHT_SUFFIXES or os.sep in tag or tag_path.exists():
        if not tag_path.is_file():
            raise InvalidInputError(f"weights file {tag!r} in reference {text!r} does not exist")
        return ModelRef(text, RefKind.WEIGHTS_FILE, name, str(tag_path))
    tags = _open_clip().list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise InvalidInputError(
            f"unknown pretrained tag {short_repr(tag, 60)} for {name}",
            hint=did_you_mean(tag, tags)
            + f"known tags: {', '.join(tags) or 'none'}; or give a local weights file",
        )
    return ModelRef(text, RefKind.PRETRAINED_TAG, _effective_architecture(name, tag), tag)


def _effective_architecture(name: str, tag: str) -> str:
    """The config that matches how the tagged weights were trained (QuickGELU or not)."""
    open_clip = _open_clip()
    tag_quick = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    model_quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    variant = f"{name}-quickgelu"
    if tag_quick and not model_quick and variant in known_architectures() \
            and tag in open_clip.list_pretrained_tags_by_model(variant):
        return variant
    return name
