"""The module structure of an open_clip model, for tools that address modules by name (peft).

Built on PyTorch's meta device from the open_clip config: no weights are read or allocated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, cast

import torch
from torch import nn

from tvtool.errors import InvalidInputError
from tvtool.limits import short_repr
from tvtool.models.backend import open_clip
from tvtool.models.quiet import quiet_open_clip
from tvtool.models.refs import did_you_mean, known_architectures

ModuleRoot = Literal["clip", "visual"]
"""Which module names are relative to: the whole open_clip model, or its image tower
(``model.visual``)."""

ROOT_PREFIX: dict[str, str] = {"clip": "", "visual": "visual."}
"""The state-dict prefix of a module root's names inside the whole model."""

ModuleKind = Literal["mha", "linear", "embedding", "conv", "other"]


@dataclass(frozen=True)
class ModuleSpec:
    """What one named module of a model is, as far as LoRA adapters care.

    Attributes:
        kind: ``mha`` (``nn.MultiheadAttention``), ``linear`` (``nn.Linear``), ``embedding``,
            ``conv`` or ``other``.
        type_name: The module's class name.
        weight_shape: ``(out, in)`` of a Linear's weight; of an attention module's fused
            in-projection ``in_proj_weight`` ([3E, E]); None otherwise.
        out_proj_shape: ``(out, in)`` of an attention module's ``out_proj.weight``.
        fused_in_proj: Whether an attention module keeps q, k, v in one ``in_proj_weight``
            (False when ``kdim``/``vdim`` differ from its width).
        inside_attention: A Linear that is the ``out_proj`` of an attention module (its
            ``forward`` is never called: the attention uses its weight directly).
    """

    kind: ModuleKind
    type_name: str
    weight_shape: tuple[int, int] | None = None
    out_proj_shape: tuple[int, int] | None = None
    fused_in_proj: bool = True
    inside_attention: bool = False


def _spec(module: nn.Module) -> ModuleSpec:
    name = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        fused = bool(module._qkv_same_embed_dim)
        in_shape = (tuple(module.in_proj_weight.shape) if fused and module.in_proj_weight
                    is not None else None)
        return ModuleSpec("mha", name, in_shape,  # type: ignore[arg-type]
                          tuple(module.out_proj.weight.shape),  # type: ignore[arg-type]
                          fused_in_proj=fused)
    if isinstance(module, nn.Linear):
        return ModuleSpec("linear", name, tuple(module.weight.shape))  # type: ignore[arg-type]
    if isinstance(module, nn.Embedding):
        return ModuleSpec("embedding", name)
    if isinstance(module, nn.modules.conv._ConvNd):
        return ModuleSpec("conv", name)
    return ModuleSpec("other", name)


@functools.lru_cache(maxsize=4)
def _meta_model(architecture: str) -> nn.Module:
    if architecture not in known_architectures():
        raise InvalidInputError(f"unknown architecture {short_repr(architecture, 60)}",
                                hint=did_you_mean(architecture, known_architectures())
                                + "use an open_clip model name, e.g. ViT-B-32-quickgelu")
    try:
        with quiet_open_clip(), torch.device("meta"):
            return cast(nn.Module, open_clip.create_model(architecture, device="meta"))
    except Exception as exc:  # open_clip raises many types (HF towers need the network)
        raise InvalidInputError(f"cannot build architecture {architecture!r} here: "
                                f"{' '.join(str(exc).split())[:160]}") from exc


def _root_module(architecture: str, root: str) -> nn.Module:
    if root not in ROOT_PREFIX:
        raise InvalidInputError(f"unknown module root {root!r}; use clip or visual")
    model = _meta_model(architecture)
    return cast(nn.Module, model.visual) if root == "visual" else model


def root_class(architecture: str, root: ModuleRoot = "clip") -> tuple[str, str]:
    """Class name and module of the model (``clip``) or of its image tower (``visual``).

    E.g. ``("CLIP", "open_clip.model")``, ``("VisionTransformer", "open_clip.transformer")``:
    what peft records as ``auto_mapping`` for a model that is not a transformers model.

    Raises:
        InvalidInputError: unknown architecture, or one that cannot be built offline.
    """
    top = type(_root_module(architecture, root))
    return top.__name__, top.__module__


@functools.lru_cache(maxsize=8)
def _module_table(architecture: str, root: str) -> MappingProxyType[str, ModuleSpec]:
    top = _root_module(architecture, root)
    table: dict[str, ModuleSpec] = {}
    attention_children: set[str] = set()
    for name, module in top.named_modules():
        if not name:
            continue
        table[name] = _spec(module)
        if isinstance(module, nn.MultiheadAttention):
            attention_children.add(f"{name}.out_proj")
    for name in attention_children:
        if name in table:
            spec = table[name]
            table[name] = ModuleSpec(spec.kind, spec.type_name, spec.weight_shape,
                                     inside_attention=True)
    return MappingProxyType(table)


def module_table(architecture: str, root: ModuleRoot = "clip") -> MappingProxyType[str, ModuleSpec]:
    """Every named submodule of an open_clip architecture, with what LoRA needs to know.

    Args:
        architecture: open_clip model name.
        root: ``clip``: names as in the whole model (``visual.transformer.resblocks.0.attn``);
            ``visual``: names inside its image tower (``transformer.resblocks.0.attn``).

    Returns:
        Module name -> :class:`ModuleSpec`, in the model's order (read-only, cached).

    Raises:
        InvalidInputError: unknown architecture, or one that cannot be built offline.
    """
    return _module_table(architecture, root)
