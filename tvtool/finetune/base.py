"""What every fine-tuning mode provides: an :class:`Adapter` around the image encoder.

A mode decides which tensors train, how the forward pass runs (plain, linearized, LoRA) and
how the trained state becomes a task vector. The trainer only sees the adapter: it optimises
:meth:`Adapter.trainable`, calls the adapter on images, and at the end asks for
:meth:`Adapter.task_vector`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from tvtool.errors import InvalidInputError
from tvtool.metadata import Mode
from tvtool.types import StateDict

ENCODER_PREFIX = "visual."
"""State-dict prefix of the image encoder inside an open_clip CLIP model."""

LORA_TARGET_KINDS = ("q", "k", "v", "o", "mlp")
"""LoRA targets by projection, in canonical order (``attn`` is an alias of ``q,k,v,o``)."""


@dataclass(frozen=True)
class ModeOptions:
    """Mode-specific settings (only the LoRA modes read them).

    Attributes:
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is (alpha / r)·B·A.
        lora_targets: Which projections get LoRA factors: any of ``q``, ``k``, ``v``
            (rows of the attention in-projection, one factor pair each), ``o`` (attention
            out-projection), ``mlp`` (the MLP linear layers); default ``q, v`` as in the
            LoRA paper.
        seed: Seed of the LoRA factor initialisation.
    """

    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q", "v")
    seed: int = 0


class Adapter(nn.Module):
    """A frozen image encoder plus the tensors one fine-tuning mode trains.

    Subclasses set :attr:`mode` and :attr:`linearized`, register their trainable tensors as
    parameters that require grad, and implement the abstract methods.

    Attributes:
        encoder: The image encoder (``model.visual``); names below are relative to it.
        prefix: Prefix turning encoder names into model state-dict names.
    """

    mode: ClassVar[Mode]
    linearized: ClassVar[bool] = False

    def __init__(self, encoder: nn.Module, prefix: str = ENCODER_PREFIX) -> None:
        super().__init__()
        self.encoder = encoder
        self.prefix = prefix

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable tensors by stable name, in a fixed order (optimizer and checkpoint use it)."""
        raise NotImplementedError

    def decay_anchors(self) -> dict[str, Tensor]:
        """Offsets from fixed weights: name -> θ0, for parameters that store θ − θ0.

        AdamW's decoupled weight decay shrinks the weights θ (as in the reference code), so
        for a parameter holding δ = θ − θ0 the trainer decays toward −θ0 instead of 0.
        """
        return {}

    def task_vector(self) -> StateDict:
        """Trained result as stored in the task-vector file (CPU tensors, model names)."""
        raise NotImplementedError

    def dense_delta(self) -> StateDict:
        """Dense weight change θ − θ0 by model name (equal to :meth:`task_vector` but for LoRA)."""
        return self.task_vector()

    def vector_metadata(self) -> dict[str, str]:
        """Extra ``tvtool.*`` metadata keys (without prefix) for the task-vector file."""
        return {}

    def trainable_state(self) -> StateDict:
        """Detached CPU copy of the trainable tensors (for checkpoints)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.trainable()}

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore trainable tensors saved by :meth:`trainable_state`.

        Raises:
            InvalidInputError: names or shapes do not match this adapter.
        """
        own = dict(self.trainable())
        if set(own) != set(state):
            missing = sorted(set(own) - set(state))[:3]
            extra = sorted(set(state) - set(own))[:3]
            raise InvalidInputError(
                f"checkpoint does not fit this run: missing {missing}, unexpected {extra}",
                hint="resume with the same --mode and LoRA settings, or start a new --workdir")
        with torch.no_grad():
            for name, param in own.items():
                tensor = state[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise InvalidInputError(f"checkpoint tensor {name!r} has shape "
                                            f"{tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.copy_(tensor)


class FinetuneMode(Protocol):
    """A fine-tuning mode: a name, whether it is linearized, and how to build its adapter."""

    name: Mode
    linearized: bool
    summary: str

    def build(self, encoder: nn.Module, options: ModeOptions) -> Adapter:
        """Wrap ``encoder`` (frozen where the mode says so) for training."""
        ...


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad_(False)


def attention_modules(encoder: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """The self-attention modules of the encoder's blocks, found by type and structure.

    Blocks are the elements of the encoder's ``nn.ModuleList`` s (``transformer.resblocks`` in
    open_clip); an attention module outside them (an attentional pooler) is not a block's.
    Encoders with attention but no such list fall back to every attention module.

    Raises:
        InvalidInputError: the encoder has no ``nn.MultiheadAttention`` (e.g. a ResNet).
    """
    found = [(name, module) for name, module in encoder.named_modules()
             if isinstance(module, nn.MultiheadAttention)]
    block_names = {f"{name}.{index}" if name else str(index)
                   for name, module in encoder.named_modules()
                   if isinstance(module, nn.ModuleList) for index in range(len(module))}
    in_blocks = [(name, module) for name, module in found
                 if name.rpartition(".")[0] in block_names]
    found = in_blocks or found
    if not found:
        raise InvalidInputError(
            f"the image encoder ({type(encoder).__name__}) has no nn.MultiheadAttention modules",
            hint="attention-only and LoRA modes need a ViT image encoder; use --mode full")
    return found


def residual_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks holding the attention modules of :func:`attention_modules`."""
    modules = dict(encoder.named_modules())
    parents = dict.fromkeys(name.rpartition(".")[0] for name, _ in attention_modules(encoder))
    return [(name, modules[name]) for name in parents]
