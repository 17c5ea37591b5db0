"""Recognising the open_clip architecture of a bare set of tensors (by names and shapes).

Used by ``tvtool convert``: legacy checkpoints do not say which open_clip config they were
made from. Candidate configs are narrowed cheaply from the JSON configs, then each survivor is
built on PyTorch's ``meta`` device (shapes only, no memory, no weights) and compared name by
name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.limits import short_repr
from tvtool.models.backend import open_clip
from tvtool.models.quiet import quiet_open_clip
from tvtool.models.refs import did_you_mean, known_architectures

Shapes = Mapping[str, tuple[int, ...]]
# Block indices have at most 6 digits: a longer one (5000 digits in a hostile file) is an
# unknown name, not an int() past Python's conversion limit.
_INDEX = r"(\d{1,6})"
_VIT_BLOCK = re.compile(rf"^visual\.transformer\.resblocks\.{_INDEX}\.")


@dataclass(frozen=True)
class ArchitectureMatch:
    """How a set of tensors fits an open_clip architecture.

    Attributes:
        architecture: The open_clip model name.
        missing: Names of the architecture's state dict that the tensors lack (sorted).
        inferred: Whether the name was inferred (False: the user gave it).
    """

    architecture: str
    missing: tuple[str, ...] = ()
    inferred: bool = True



def architecture_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an architecture's state dict, computed without allocating weights.

    Raises:
        InvalidInputError: unknown architecture.
    """
    if name not in known_architectures():
        raise InvalidInputError(f"unknown architecture {short_repr(name, 60)}",
                                hint=did_you_mean(name, known_architectures())
                                + "use an open_clip model name, e.g. ViT-B-32-quickgelu")
    try:
        with quiet_open_clip(), torch.device("meta"):
            model = open_clip.create_model(name, device="meta")
    except Exception as exc:  # open_clip raises many types (HF towers need the network)
        raise InvalidInputError(f"cannot build architecture {name!r} here: "
                                f"{' '.join(str(exc).split())[:160]}") from exc
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _config(name: str) -> dict[str, Any]:
    return open_clip.get_model_config(name) or {}


def _quick_gelu(name: str) -> bool:
    return bool(_config(name).get("quick_gelu", False))


def uses_quick_gelu(name: str) -> bool:
    """Whether the open_clip architecture ``name`` builds its MLPs with QuickGELU."""
    return _quick_gelu(name)


def _block_count(shapes: Shapes, pattern: re.Pattern[str]) -> int | None:
    indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    return max(indices) + 1 if indices else None


def _plausible(name: str, shapes: Shapes) -> bool:
    """Cheap test on the JSON config (no model built) that rules most configs out.

    Each check applies only when the tensors hold the name it looks at; defaults are
    open_clip's ``CLIPTextCfg``/``CLIPVisionCfg`` defaults.
    """
    cfg = _config(name)
    vision = cfg.get("vision_cfg") or {}
    text = cfg.get("text_cfg") or {}
    if text.get("hf_model_name"):
        # Hugging Face text towers need their config from the network to be built; tvtool
        # never goes online to guess (--architecture still names them explicitly).
        return False
    if any(k.startswith("visual.trunk.") for k in shapes) != bool(vision.get("timm_model_name")):
        return False
    expected: list[tuple[Any, Any]] = []
    conv = shapes.get("visual.conv1.weight")
    if conv is not None and len(conv) == 4 and conv[2] > 3:  # ViT patch embedding
        expected += [(vision.get("width", 768), conv[0]), (vision.get("patch_size", 16), conv[2]),
                     (vision.get("layers", 12), _block_count(shapes, _VIT_BLOCK))]
    elif conv is not None and len(conv) == 4:  # ModifiedResNet stem: width // 2 channels
        layers = vision.get("layers")
        counts = [_block_count(shapes, re.compile(rf"^visual\.layer{i}\.{_INDEX}\."))
                  for i in range(1, 5)]
        expected += [(vision.get("width", 64) // 2, conv[0]),
                     (list(layers) if isinstance(layers, (list, tuple)) else layers, counts)]
    for key, axis in (("visual.proj", 1), ("text_projection", 1),
                      ("visual.attnpool.c_proj.weight", 0)):
        shape = shapes.get(key)
        if shape is not None and len(shape) == 2:
            expected.append((cfg.get("embed_dim"), shape[axis]))
    for prefix in ("", "text."):
        tokens = shapes.get(f"{prefix}token_embedding.weight")
        if tokens is not None and len(tokens) == 2:
            expected += [(text.get("vocab_size", 49408), tokens[0]),
                         (text.get("width", 512), tokens[1])]
        positions = shapes.get(f"{prefix}positional_embedding")
        if positions is not None and len(positions) == 2:
            # A text tower with a class token (CoCa) has one position more than its context.
            context = text.get("context_length", 77) + int(bool(text.get("embed_cls")))
            expected.append((context, positions[0]))
        blocks = _block_count(shapes, re.compile(rf"^{re.escape(prefix)}transformer\.resblocks"
                                                 rf"\.{_INDEX}\."))
        if blocks is not None:
            expected.append((text.get("layers", 12), blocks))
    return all(want == got for want, got in expected if got is not None)


def _fit(shapes: Shapes, expected: Shapes) -> tuple[list[str], list[str], list[str]]:
    """(unexpected names, shape mismatches, missing names)."""
    unexpected = [n for n in shapes if n not in expected]
    wrong = [n for n in shapes if n in expected and tuple(shapes[n]) != tuple(expected[n])]
    missing = sorted(n for n in expected if n not in shapes)
    return unexpected, wrong, missing


def match_architecture(shapes: Shapes, *, architecture: str | None = None,
                       quick_gelu: bool | None = None,
                       optional: frozenset[str] = frozenset()) -> ArchitectureMatch:
    """Find (or check) the open_clip architecture that tensors with these shapes belong to.

    A fit means: every tensor is a tensor of the architecture with the same shape, and the
    image tower (``visual.*``) is complete; text-tower tensors may be missing (the published
    ``ImageEncoder`` checkpoints drop the text transformer).

    Args:
        shapes: Tensor name -> shape.
        architecture: The user's choice; it is checked, not searched for.
        quick_gelu: Activation of the saved model when the file revealed it (a pickled module
            names its activation classes); picks between configs that differ only in that.
        optional: Image-tower names the tensors may lack (a Hugging Face ``CLIPVisionModel``
            has no ``visual.proj``).

    Returns:
        The architecture and the names the tensors lack.

    Raises:
        InvalidInputError: the tensors do not fit the given architecture, fit none, or fit
            several that cannot be told apart.
    """
    if architecture is not None:
        unexpected, wrong, missing = _fit(shapes, architecture_shapes(architecture))
        if unexpected or wrong:
            parts = [f"{len(names)} {what} {names[:3]}" for names, what in
                     ((unexpected, "unexpected tensors"), (wrong, "tensors of other shapes"))
                     if names]
            raise InvalidInputError(
                f"the checkpoint does not fit {architecture}: {', '.join(parts)}",
                hint="check --architecture, or leave it out to infer it")
        return ArchitectureMatch(architecture, tuple(missing), inferred=False)
    fits: list[ArchitectureMatch] = []
    for name in known_architectures():
        if not _plausible(name, shapes):
            continue
        try:
            expected = architecture_shapes(name)
        except InvalidInputError:
            continue
        unexpected, wrong, missing = _fit(shapes, expected)
        if unexpected or wrong or any(n.startswith("visual.") and n not in optional
                                      for n in missing):
            continue
        fits.append(ArchitectureMatch(name, tuple(missing)))
    if quick_gelu is not None and len(fits) > 1:
        fits = [f for f in fits if _quick_gelu(f.architecture) == quick_gelu] or fits
    if len(fits) > 1:
        # Prefer configs the tensors cover completely over those they only partly cover.
        complete = [f for f in fits if not f.missing]
        fits = complete or fits
    if not fits:
        raise InvalidInputError(
            f"the checkpoint's {len(shapes)} tensors fit no open_clip architecture",
            hint="pass --architecture NAME to see what does not fit")
    if len(fits) > 1:
        names = ", ".join(f.architecture for f in fits[:6])
        raise InvalidInputError(
            f"the checkpoint fits several architectures ({names}); a state dict does not "
            "record the activation function or the text tower that tell them apart",
            hint="pass --architecture NAME")
    return fits[0]
