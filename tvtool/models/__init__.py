"""The only package that imports open_clip: model references, loading, heads, fingerprints."""

from tvtool.io.fingerprints import fingerprint, state_dict_fingerprint
from tvtool.models.heads import build_zero_shot_head
from tvtool.models.hf_clip import HfClipMapping, hf_activation, hf_clip_to_open_clip, is_hf_clip
from tvtool.models.infer import (
    ArchitectureMatch,
    architecture_shapes,
    match_architecture,
    uses_quick_gelu,
)
from tvtool.models.loading import (
    ClipBundle,
    base_source,
    image_encoder_skeleton,
    load_clip,
    load_state_into,
    resolve_ref,
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
