"""tangent_task_arithmetic's linearized checkpoints as tvtool ``linear`` task vectors.

Ortiz-Jimenez et al.'s code (github.com/gortizji/tangent_task_arithmetic) fine-tunes
``LinearizedImageEncoder``: its ``LinearizedModel`` holds the parameters of the image encoder
twice, as ``nn.ParameterList``s built by functorch's ``make_functional_with_buffers``:
``params0`` (the point of linearization, frozen) and ``params`` (trained). ``save`` writes
``state_dict()`` plus the open_clip model name, so a file holds ``model.params.<i>``,
``model.params0.<i>`` and ``model_name`` -- indices, not names.

The indices follow ``named_parameters()`` of the wrapped ``ImageEncoder``: the open_clip CLIP
model with its text transformer (``transformer.*``) deleted. tvtool rebuilds that order from
the open_clip architecture on the ``meta`` device, checks every shape, checks ``params0``
against the base the user names, and keeps ``params - params0`` of the image encoder
(``visual.*``): the only tensors the linearized image encoder's output depends on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.limits import short_list
from tvtool.models.backend import open_clip
from tvtool.models.quiet import quiet_open_clip
from tvtool.types import StateDict

# At most 6 digits: a longer index (5000 digits in a hostile file) is an unknown entry,
# not an int() past Python's conversion limit.
_PARAM = re.compile(r"^model\.(params0?)\.(\d{1,6})$")
_IMAGE_PREFIX = "visual."


@dataclass(frozen=True)
class TangentCheckpoint:
    """A linearized checkpoint with its parameters named.

    Attributes:
        model_name: The open_clip model name the file records (``ViT-B-32``).
        params0: Name -> initial (linearization point) parameter.
        params: Name -> fine-tuned parameter.
    """

    model_name: str
    params0: StateDict
    params: StateDict


def is_tangent_linearized(entries: Mapping[str, Any]) -> bool:
    """Whether a pickled dict is a tangent_task_arithmetic ``LinearizedImageEncoder`` save."""
    return any(_PARAM.match(k) for k in entries) and "model.params0.0" in entries


def model_name_architecture(model_name: str) -> str:
    """The open_clip config name in a recorded ``model_name`` (``X__pretrained__TAG`` -> X)."""
    return model_name.split("__pretrained__")[0].split("__init__")[0]



def image_encoder_parameter_order(architecture: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the reference ``ImageEncoder``'s parameters, in functorch's order.

    Raises:
        InvalidInputError: an architecture open_clip cannot build here.
    """
    try:
        with quiet_open_clip(), torch.device("meta"):
            model = open_clip.create_model(architecture, device="meta")
    except Exception as exc:  # open_clip raises many types
        raise InvalidInputError(f"cannot build architecture {architecture!r} here: "
                                f"{' '.join(str(exc).split())[:160]}") from exc
    # The reference deletes the text transformer before make_functional_with_buffers, which
    # visits named_parameters() once per tensor.
    seen: set[int] = set()
    order = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith("transformer.") or id(param) in seen:
            continue
        seen.add(id(param))
        order.append((name, tuple(param.shape)))
    return order


def name_tangent_checkpoint(entries: Mapping[str, Any], architecture: str,
                            label: str) -> TangentCheckpoint:
    """Give the indexed parameters of a linearized checkpoint their open_clip names.

    Args:
        entries: The pickled dict (``model.params.<i>``, ``model.params0.<i>``,
            ``model_name``).
        architecture: The open_clip architecture of the base; must be the recorded model
            (``X`` and ``X-quickgelu`` count as the same).
        label: How to name the file in messages.

    Raises:
        InvalidInputError: missing or extra entries, a count or shape that differs from the
            architecture, or a recorded model of another architecture.
    """
    model_name = entries.get("model_name")
    if not isinstance(model_name, str) or not model_name:
        raise InvalidInputError(f"{label} records no model_name; it is not a "
                                "LinearizedImageEncoder checkpoint")
    recorded = model_name_architecture(model_name)
    if recorded.removesuffix("-quickgelu") != architecture.removesuffix("-quickgelu"):
        raise InvalidInputError(f"{label} was linearized from {model_name!r}, the base is "
                                f"{architecture}", hint="give the base it was trained from")
    groups: dict[str, dict[int, torch.Tensor]] = {"params": {}, "params0": {}}
    other = []
    for key, value in entries.items():
        match = _PARAM.match(key)
        if match is None:
            if key != "model_name":
                other.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(f"{label}: {key} is not a tensor")
        groups[match.group(1)][int(match.group(2))] = value
    if other:
        raise InvalidInputError(f"{label} holds entries a LinearizedImageEncoder does not: "
                                f"{short_list(other, 3)}")
    order = image_encoder_parameter_order(architecture)
    for group, tensors in groups.items():
        if sorted(tensors) != list(range(len(order))):
            raise InvalidInputError(
                f"{label} holds {len(tensors)} model.{group} entries, the image encoder of "
                f"{architecture} has {len(order)} parameters",
                hint="the base architecture must be the one the checkpoint was linearized from")
    named: dict[str, StateDict] = {"params": {}, "params0": {}}
    for index, (name, shape) in enumerate(order):
        for group, tensors in groups.items():
            tensor = tensors[index]
            if tuple(tensor.shape) != shape:
                raise InvalidInputError(
                    f"{label}: model.{group}.{index} has shape {tuple(tensor.shape)}, but "
                    f"parameter {index} of {architecture}'s image encoder ({name}) has {shape}")
            named[group][name] = tensor
    return TangentCheckpoint(model_name, named["params0"], named["params"])


def tangent_task_vector(checkpoint: TangentCheckpoint, base: Mapping[str, torch.Tensor],
                        label: str) -> tuple[StateDict, list[str]]:
    """``params - params0`` of the image encoder, after checking ``params0`` is the base.

    The difference is taken in float64 and stored in the base's dtype, as ``extract`` does.

    Args:
        checkpoint: The named checkpoint.
        base: The base model's tensors by open_clip name (read lazily by the caller).
        label: How to name the file in messages.

    Returns:
        The vector (``visual.*`` names) and notes for the user.

    Raises:
        InvalidInputError: ``params0`` differs from the base (the vector would be evaluated
            linearized at another point), or NaN/Inf.
    """
    notes = []
    for name, initial in checkpoint.params0.items():
        if name not in base:
            raise InvalidInputError(f"the base has no tensor {name!r} that {label} holds")
        reference = base[name]
        if initial.dtype != reference.dtype or not torch.equal(initial, reference):
            diff = (initial.double() - reference.double()).abs().max().item() \
                if initial.shape == reference.shape else float("nan")
            raise InvalidInputError(
                f"{label} was linearized at other weights than the base: {name} differs "
                f"(max |difference| {diff:.3g}, dtypes {initial.dtype} / {reference.dtype})",
                hint="give the pre-trained model the checkpoint was fine-tuned from, in the "
                     "same dtype")
    vector: StateDict = {}
    dropped = []
    for name, tuned in checkpoint.params.items():
        initial = checkpoint.params0[name]
        if not torch.isfinite(tuned).all():
            raise InvalidInputError(f"{label}: parameter {name} contains NaN or Inf")
        delta = (tuned.double() - initial.double()).to(initial.dtype)
        if name.startswith(_IMAGE_PREFIX):
            vector[name] = delta
        else:
            dropped.append((name, float(delta.abs().max()) if delta.numel() else 0.0))
    if dropped:
        moved = [name for name, size in dropped if size > 0]
        notes.append(f"kept the {len(vector)} image-encoder tensors; left out {len(dropped)} "
                     f"text-side parameters the image encoder never reads "
                     f"({', '.join(n for n, _ in dropped)})"
                     + (f", of which {len(moved)} moved during fine-tuning" if moved else ""))
    return vector, notes
