"""``attn`` mode: only the image encoder's attention modules train (Jin et al., 2407.07089).

The modules are found by type (every ``nn.MultiheadAttention`` in the encoder's blocks), so
the trained and stored tensors are exactly their in-projection and out-projection weights and
biases, whatever the blocks are called.
"""

from __future__ import annotations

from torch import nn

from tvtool.finetune.base import Adapter, ModeOptions, attention_modules
from tvtool.finetune.full import DirectAdapter
from tvtool.metadata import Mode


def attention_parameter_names(encoder: nn.Module) -> list[str]:
    """Names (relative to ``encoder``) of every parameter inside its attention modules.

    Raises:
        InvalidInputError: the encoder has no ``nn.MultiheadAttention``.
    """
    names: list[str] = []
    for module_name, module in attention_modules(encoder):
        names.extend(f"{module_name}.{n}" for n, p in module.named_parameters()
                     if p.requires_grad)
    return names


class AttnAdapter(DirectAdapter):
    """A :class:`DirectAdapter` over the attention parameters only."""

    mode = Mode.ATTN


class AttnMode:
    """Attention-only fine-tuning of the image encoder."""

    name = Mode.ATTN
    linearized = False
    summary = "attention in/out projections of the image encoder's blocks"

    def build(self, encoder: nn.Module, options: ModeOptions) -> Adapter:
        return AttnAdapter(encoder, attention_parameter_names(encoder))
