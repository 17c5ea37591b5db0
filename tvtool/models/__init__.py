"""The only package that imports open_clip: model references, loading, heads, fingerprints.

Importing the package is light: every name below is loaded on first use (PEP 562), so the
commands that only read files (``negate``, ``inspect``, ``merge``, ``extract`` and ``apply``
with a file base) never import open_clip or torchvision, which take seconds. open_clip itself
is imported by :mod:`tvtool.models.backend` alone, which registers tvtool's model configs;
the light modules are :mod:`tvtool.models.refs` (parsing references) and
:mod:`tvtool.models.sources` (reading a base from files).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tvtool.io.fingerprints import fingerprint, state_dict_fingerprint
    from tvtool.models.heads import build_zero_shot_head
    from tvtool.models.hf_clip import (
        HfClipMapping,
        hf_activation,
        hf_clip_to_open_clip,
        is_hf_clip,
    )
    from tvtool.models.infer import (
        ArchitectureMatch,
        architecture_shapes,
        match_architecture,
        uses_quick_gelu,
    )
    from tvtool.models.loading import (
        ClipBundle,
        image_encoder_skeleton,
        load_clip,
        load_state_into,
    )
    from tvtool.models.refs import (
        BASE_MODEL,
        EMBEDDED_MODELS,
        PACKAGED_MODELS,
        SMALL_MODEL,
        TINY_MODEL,
        ModelRef,
        RefKind,
        cache_dir,
        embedded_weights_path,
        known_architectures,
        parse_ref,
    )
    from tvtool.models.sources import base_source, resolve_ref

# Where each public name lives; the light modules (no open_clip) are io.fingerprints, hf_clip,
# refs and sources.
_HOMES: dict[str, str] = {
    **dict.fromkeys(("fingerprint", "state_dict_fingerprint"), "tvtool.io.fingerprints"),
    "build_zero_shot_head": "tvtool.models.heads",
    **dict.fromkeys(("HfClipMapping", "hf_activation", "hf_clip_to_open_clip", "is_hf_clip"),
                    "tvtool.models.hf_clip"),
    **dict.fromkeys(("ArchitectureMatch", "architecture_shapes", "match_architecture",
                     "uses_quick_gelu"), "tvtool.models.infer"),
    **dict.fromkeys(("ClipBundle", "image_encoder_skeleton", "load_clip", "load_state_into"),
                    "tvtool.models.loading"),
    **dict.fromkeys(("BASE_MODEL", "EMBEDDED_MODELS", "PACKAGED_MODELS", "SMALL_MODEL",
                     "TINY_MODEL", "ModelRef", "RefKind", "cache_dir", "embedded_weights_path",
                     "known_architectures", "parse_ref"), "tvtool.models.refs"),
    **dict.fromkeys(("base_source", "resolve_ref"), "tvtool.models.sources"),
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "BASE_MODEL",
    "EMBEDDED_MODELS",
    "PACKAGED_MODELS",
    "SMALL_MODEL",
    "TINY_MODEL",
    "ArchitectureMatch",
    "ClipBundle",
    "HfClipMapping",
    "ModelRef",
    "RefKind",
    "architecture_shapes",
    "base_source",
    "build_zero_shot_head",
    "cache_dir",
    "embedded_weights_path",
    "fingerprint",
    "hf_activation",
    "hf_clip_to_open_clip",
    "image_encoder_skeleton",
    "is_hf_clip",
    "known_architectures",
    "load_clip",
    "load_state_into",
    "match_architecture",
    "parse_ref",
    "resolve_ref",
    "state_dict_fingerprint",
    "uses_quick_gelu",
]
