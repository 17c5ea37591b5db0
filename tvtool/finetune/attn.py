"""``attn`` mode: only the image encoder's attention modules train (Jin et al., 2407.07089).

The modules are found by type and structure (:func:`tvtool.finetune.base.attention_projections`):
every ``nn.MultiheadAttention`` in the encoder's blocks (open_clip's own ViTs), whose in- and
out-projection weights and biases train; or, for timm towers (timm ViTs, EVA, MobileCLIP),
every timm attention module in the blocks, whose ``qkv`` (or ``q_proj``/``k_proj``/``v_proj``)
and ``proj`` linear layers train. Whatever the blocks are called, the trained and stored tensors
are exactly these projections.
"""

from __future__ import annotations

from torch import nn

from tvtool.finetune.base import Adapter, ModeBase, NoOptions, attention_projections
from tvtool.finetune.full import DirectAdapter
from tvtool.metadata import Mode


def attention_parameter_names(encoder: nn.Module) -> list[str]:
    """Names (relative to ``encoder``) of the attention projections' parameters.

    Raises:
        InvalidInputError: the encoder has no attention blocks (``nn.MultiheadAttention`` or
            timm-style attention), e.g. a ResNet or ConvNeXt.
    """
    return [f"{module_name}.{name}" for module_name, names in attention_projections(encoder)
            for name in names]


class AttnAdapter(DirectAdapter):
    """A :class:`DirectAdapter` over the attention parameters only."""

    mode = Mode.ATTN


class AttnMode(ModeBase):
    """Attention-only fine-tuning of the image encoder."""

    name = Mode.ATTN
    summary = "attention projections of the image encoder's blocks"

    def check_encoder(self, encoder: nn.Module, options: NoOptions) -> None:
        attention_parameter_names(encoder)

    def build(self, encoder: nn.Module, options: NoOptions, *, seed: int = 0) -> Adapter:
        return AttnAdapter(encoder, attention_parameter_names(encoder))
