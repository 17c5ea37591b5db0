"""``full`` mode: every image-encoder weight trains; the vector is θ − θ0 over ``visual.*``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from tvtool.finetune.base import ENCODER_PREFIX, Adapter, ModeBase, NoOptions, freeze
from tvtool.metadata import Mode
from tvtool.types import StateDict


class DirectAdapter(Adapter):
    """Trains a subset of the encoder's own parameters in place (full and attention-only).

    Args:
        encoder: The image encoder.
        names: Parameter names (relative to ``encoder``) that train; the rest are frozen.
        prefix: Model state-dict prefix of the encoder.
    """

    mode = Mode.FULL

    def __init__(self, encoder: nn.Module, names: Iterable[str],
                 prefix: str = ENCODER_PREFIX) -> None:
        super().__init__(encoder, prefix)
        params = dict(encoder.named_parameters())
        self.names = list(names)
        freeze(encoder)
        for name in self.names:
            params[name].requires_grad_(True)
        self._params = params
        # θ0 stays on the CPU: it is only needed once, to form the task vector at the end.
        self._theta0 = {n: params[n].detach().to("cpu", copy=True) for n in self.names}

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, self._params[name]) for name in self.names]

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def task_vector(self) -> StateDict:
        with torch.no_grad():
            return {self.prefix + n: self._params[n].detach().to("cpu") - self._theta0[n]
                    for n in self.names}


class FullMode(ModeBase):
    """All image-encoder parameters train (text tower and head stay frozen)."""

    name = Mode.FULL
    summary = "all image-encoder weights"

    def build(self, encoder: nn.Module, options: NoOptions, *, seed: int = 0) -> Adapter:
        names = [n for n, p in encoder.named_parameters() if p.requires_grad]
        return DirectAdapter(encoder, names)
