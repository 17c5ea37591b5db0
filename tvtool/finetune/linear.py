"""``linear`` mode: fine-tune the linearized encoder f(x;θ0) + J·(θ − θ0) (arXiv 2305.12827).

The trainable tensors are δ = θ − θ0 for every image-encoder weight; the forward pass is
:func:`tvtool.linearize.linearized_forward` (fast dual path, no fused-attention forward AD).
The stored vector is δ, with ``tvtool.linearized=true``: it must be evaluated linearized.
"""

from __future__ import annotations

from torch import Tensor, nn

from tvtool.finetune.base import ENCODER_PREFIX, Adapter, ModeBase, NoOptions
from tvtool.linearize import LinearizedModule
from tvtool.metadata import Mode
from tvtool.types import StateDict


class LinearAdapter(Adapter):
    """The encoder linearized at its current weights, with a trainable δ per parameter."""

    mode = Mode.LINEAR

    def __init__(self, encoder: nn.Module, prefix: str = ENCODER_PREFIX) -> None:
        super().__init__(encoder, prefix)
        names = [n for n, p in encoder.named_parameters() if p.requires_grad]
        self.linearized_encoder = LinearizedModule(encoder, names)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.linearized_encoder.named_deltas())

    def decay_anchors(self) -> dict[str, Tensor]:
        params = dict(self.encoder.named_parameters())
        return {name: params[name].detach() for name, _ in self.trainable()}

    def forward(self, images: Tensor) -> Tensor:
        return self.linearized_encoder(images)

    def task_vector(self) -> StateDict:
        return {self.prefix + n: d.detach().to("cpu", copy=True) for n, d in self.trainable()}


class LinearMode(ModeBase):
    """Linearized (tangent-space) fine-tuning of all image-encoder weights."""

    name = Mode.LINEAR
    summary = "linearized model f(x;θ0) + J·(θ − θ0), all image-encoder weights"

    def build(self, encoder: nn.Module, options: NoOptions, *, seed: int = 0) -> Adapter:
        return LinearAdapter(encoder)
