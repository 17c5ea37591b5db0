"""Hugging Face ``transformers`` CLIP weights under open_clip state-dict names.

``transformers`` stores CLIP (``CLIPModel``, ``CLIPVisionModel``,
``CLIPVisionModelWithProjection``) with separate ``q_proj``/``k_proj``/``v_proj`` linear
layers, ``nn.Embedding`` tables for positions, and ``nn.Linear`` projections; open_clip keeps
OpenAI's layout: one fused ``nn.MultiheadAttention`` input projection, plain positional
parameters and ``x @ proj`` projection matrices. The two compute the same function (same
pre-norm residual blocks, LayerNorm before the first block and on the pooled class token,
causal text attention pooled at the end-of-text token), so the mapping is a pure renaming
plus three reshapes:

* ``in_proj_weight = cat(q_proj.weight, k_proj.weight, v_proj.weight)`` (and the biases): the
  order ``nn.MultiheadAttention`` splits its input projection in; both scale queries by
  ``head_dim ** -0.5`` inside the attention, so no weight is rescaled;
* ``visual.proj = visual_projection.weight.T`` and ``text_projection =
  text_projection.weight.T`` (open_clip multiplies from the right);
* the embedding tables' ``.weight`` becomes the bare parameter.

Nothing here imports ``transformers``; buffers that only hold ``arange`` position ids are
dropped, every other name must be known or the mapping is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.limits import short_list, short_repr
from tvtool.types import StateDict

_VISION = "vision_model."
_TEXT = "text_model."
# transformers >= 5 saves a bare CLIPVisionModel without the ``vision_model.`` prefix.
_BARE_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# At most 6 digits: no model has a million layers, and a longer index (a hostile file's
# 5000 digits) is an unknown name, not an int() past Python's conversion limit.
_LAYER = re.compile(r"^encoder\.layers\.(\d{1,6})\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")
_LAYER_NAMES = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_VISION_NAMES = {
    "embeddings.class_embedding": "visual.class_embedding",
    "embeddings.patch_embedding.weight": "visual.conv1.weight",
    "embeddings.position_embedding.weight": "visual.positional_embedding",
    "pre_layrnorm.weight": "visual.ln_pre.weight",
    "pre_layrnorm.bias": "visual.ln_pre.bias",
    "post_layernorm.weight": "visual.ln_post.weight",
    "post_layernorm.bias": "visual.ln_post.bias",
}
_TEXT_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_POSITION_IDS = "embeddings.position_ids"
# transformers' activation names -> open_clip's quick_gelu flag.
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


@dataclass(frozen=True)
class HfClipMapping:
    """The result of mapping a ``transformers`` CLIP state dict.

    Attributes:
        tensors: open_clip name -> tensor.
        model_class: Which ``transformers`` class the names belong to (``CLIPModel``,
            ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel``).
        notes: Remarks for the user (dropped buffers, missing towers).
    """

    tensors: StateDict
    model_class: str
    notes: tuple[str, ...] = ()


def is_hf_clip(names: list[str] | tuple[str, ...] | Mapping[str, Any]) -> bool:
    """Whether tensor names are those of a ``transformers`` CLIP model."""
    keys = list(names)
    if any(k.startswith((_VISION, _TEXT)) for k in keys) or "visual_projection.weight" in keys:
        return True
    return "embeddings.patch_embedding.weight" in keys and "pre_layrnorm.weight" in keys


def hf_activation(config: Mapping[str, Any]) -> bool | None:
    """Whether a ``transformers`` CLIP ``config.json`` asks for QuickGELU.

    Args:
        config: The parsed ``config.json`` (``CLIPConfig`` with ``vision_config`` and
            ``text_config``, or a ``CLIPVisionConfig``).

    Returns:
        True for ``quick_gelu`` (the OpenAI models), False for ``gelu``, None when the
        config names no activation.

    Raises:
        InvalidInputError: an activation open_clip cannot build, or towers that disagree.
    """
    found: set[str] = set()
    for section in (config, config.get("vision_config"), config.get("text_config")):
        if isinstance(section, Mapping) and isinstance(section.get("hidden_act"), str):
            found.add(section["hidden_act"])
    if not found:
        return None
    unknown = sorted(found - set(_ACTIVATIONS))
    if unknown:
        raise InvalidInputError(f"the Hugging Face config uses activation "
                                f"{short_repr(unknown[0], 40)}; "
                                "open_clip CLIP models use quick_gelu or gelu")
    if len(found) > 1:
        raise InvalidInputError("the Hugging Face config's vision and text towers use "
                                f"different activations ({', '.join(sorted(found))})")
    return _ACTIVATIONS[found.pop()]


def _map_tower(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], block_prefix: str,
               what: str) -> StateDict:
    """One tower (names already without their ``vision_model.``/``text_model.`` prefix)."""
    out: StateDict = {}
    unknown: list[str] = []
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name == _POSITION_IDS:
            continue
        if name in names:
            out[names[name]] = tensor
            continue
        match = _LAYER.match(name)
        if match is None:
            unknown.append(name)
            continue
        index, rest = int(match.group(1)), match.group(2)
        target = f"{block_prefix}{index}."
        if rest in _LAYER_NAMES:
            out[target + _LAYER_NAMES[rest]] = tensor
        elif rest.startswith("self_attn.") and rest.split(".")[1] in _QKV \
                and rest.split(".")[2:] in (["weight"], ["bias"]):
            qkv.setdefault(index, {})[rest.removeprefix("self_attn.")] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise InvalidInputError(f"{len(unknown)} tensors of the Hugging Face {what} are not "
                                f"CLIP weights tvtool knows, e.g. {short_list(unknown, 3)}")
    for index, parts in sorted(qkv.items()):
        for kind in ("weight", "bias"):
            pieces = [parts.get(f"{proj}.{kind}") for proj in _QKV]
            if all(p is None for p in pieces):
                continue
            if any(p is None for p in pieces):
                raise InvalidInputError(f"layer {index} of the Hugging Face {what} lacks some "
                                        f"of q_proj/k_proj/v_proj.{kind}")
            shapes = {tuple(p.shape) for p in pieces if p is not None}
            if len(shapes) != 1:
                raise InvalidInputError(f"layer {index} of the Hugging Face {what}: q/k/v "
                                        f"projections of different shapes {sorted(shapes)}")
            out[f"{block_prefix}{index}.attn.in_proj_{kind}"] = torch.cat(
                [p for p in pieces if p is not None], dim=0)
    return out


def _transposed(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.dim() != 2:
        raise InvalidInputError(f"Hugging Face {name} has shape {tuple(tensor.shape)}, "
                                "a 2-D projection matrix expected")
    return tensor.t().contiguous()


def hf_clip_to_open_clip(tensors: Mapping[str, torch.Tensor]) -> HfClipMapping:
    """Rename (and fuse) a ``transformers`` CLIP state dict into open_clip's names.

    Args:
        tensors: The checkpoint's tensors under ``transformers`` names (``vision_model.*``,
            ``text_model.*``, ``visual_projection.weight``, ``text_projection.weight``,
            ``logit_scale``; or a bare ``CLIPVisionModel`` saved by transformers >= 5).

    Returns:
        The open_clip state dict (complete for ``CLIPModel``; the image tower, with or without
        ``visual.proj``, for the vision-only classes) and the class it came from.

    Raises:
        InvalidInputError: a name that is no CLIP weight, or incomplete q/k/v projections.
    """
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    top: dict[str, torch.Tensor] = {}
    bare = not any(k.startswith((_VISION, _TEXT)) for k in tensors)
    for name, tensor in tensors.items():
        if name.startswith(_VISION):
            vision[name[len(_VISION):]] = tensor
        elif name.startswith(_TEXT):
            text[name[len(_TEXT):]] = tensor
        elif bare and name.startswith(_BARE_VISION_ROOTS):
            vision[name] = tensor
        else:
            top[name] = tensor
    notes: list[str] = []
    dropped = [p + _POSITION_IDS for p, part in ((_VISION, vision), (_TEXT, text))
               if _POSITION_IDS in part]
    if dropped:
        notes.append(f"dropped the position-id buffers {dropped} (arange indices, not weights)")
    if not vision:
        raise InvalidInputError("the Hugging Face checkpoint has no vision tower "
                                "(vision_model.*); tvtool edits CLIP image encoders")
    out = _map_tower(vision, _VISION_NAMES, "visual.transformer.resblocks.", "vision tower")
    if text:
        out.update(_map_tower(text, _TEXT_NAMES, "transformer.resblocks.", "text tower"))
    unknown = sorted(set(top) - {"visual_projection.weight", "text_projection.weight",
                                 "logit_scale"})
    if unknown:
        raise InvalidInputError(f"{len(unknown)} tensors of the Hugging Face checkpoint are "
                                f"not CLIP weights tvtool knows, e.g. {short_list(unknown, 3)}")
    if "visual_projection.weight" in top:
        out["visual.proj"] = _transposed(top["visual_projection.weight"],
                                         "visual_projection.weight")
    if "text_projection.weight" in top:
        out["text_projection"] = _transposed(top["text_projection.weight"],
                                             "text_projection.weight")
    if "logit_scale" in top:
        # Both libraries store the log of the temperature's inverse, as a 0-d parameter.
        out["logit_scale"] = top["logit_scale"].reshape(())
    if text:
        model_class = "CLIPModel"
    elif "visual_projection.weight" in top:
        model_class = "CLIPVisionModelWithProjection"
    else:
        model_class = "CLIPVisionModel"
        notes.append("a CLIPVisionModel has no visual projection (visual.proj): the image "
                     "tower's output projection stays that of the base")
    return HfClipMapping(out, model_class, tuple(notes))
