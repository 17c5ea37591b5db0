"""``llora`` (L-LoRA, arXiv 2310.04742) and ``llora-net`` modes.

**llora** is the published L-LoRA: every LoRA layer on its own is replaced by its first-order
Taylor expansion in its factors around their initial values, and the rest of the network
stays nonlinear (the authors' ``linearize_lora_model_`` wraps each peft ``LoraLayer`` in a
``LinearizedModelWraper``). An adapted layer y = W0·x + s·B·A·x (s = alpha/r) becomes

    y = W0·x + s·(B0·A0 + ΔB·A0 + B0·ΔA)·x,

and with peft's default initialisation B0 = 0 this is W0·x + s·ΔB·A0·x: the network runs at
the weights W0 + s·B·A0, A has no effect (its gradient is exactly zero), and the trained
model is an ordinary open_clip model. tvtool keeps A frozen at A0 (training it would only let
weight decay shrink the stored A without changing the model) and trains B; the vector is
not linearized (``tvtool.linearized=false``), folds into the weights (``apply``,
``--checkpoint-out``) and costs what the base costs to evaluate.

**llora-net** is tvtool's earlier variant: the whole network linearized in the LoRA factors,
f(x; θ0) + J_W f(x; θ0)·(s·B·A0) (again A frozen, B0 = 0). It needs a Jacobian-vector
product at every evaluation (``tvtool.linearized=true``). Vectors written by tvtool before
the change carry ``tvtool.mode=llora`` with ``tvtool.linearized=true`` and are read as
``llora-net`` (:func:`tvtool.vectors.open_vector_meta`).

Both store A0 and the trained B in the LoRA format of :mod:`tvtool.finetune.lora`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor, nn

from tvtool.finetune.base import Adapter
from tvtool.finetune.lora import LoraAdapter, LoraMode, LoraOptions
from tvtool.linearize import linearized_forward
from tvtool.metadata import Mode


class LloraAdapter(LoraAdapter):
    """L-LoRA: frozen encoder, frozen A0, trainable B; runs at W0 + (alpha/r)·B·A0."""

    mode = Mode.LLORA
    train_a = False


class LloraNetAdapter(LloraAdapter):
    """The network linearized in the LoRA factors: f(x; θ0) + J_W f(x; θ0)·((alpha/r)·B·A0)."""

    mode = Mode.LLORA_NET

    def forward(self, images: Tensor) -> Tensor:
        return linearized_forward(self.encoder, None, self.weight_deltas(), images)


class LloraMode(LoraMode):
    """L-LoRA (per-adapter linearization): LoRA with A frozen at its initial value."""

    name = Mode.LLORA
    label = "L-LoRA"
    summary = "L-LoRA: each LoRA layer linearized in its factors (A frozen at init, B trained)"
    # `llora` trained the network-level linearization before it became the per-adapter
    # L-LoRA; a state without this mark belongs to that other model and must not resume.
    run_marks: ClassVar[Mapping[str, str]] = {"llora": "per-adapter"}

    def build(self, encoder: nn.Module, options: LoraOptions, *, seed: int = 0) -> Adapter:
        return LloraAdapter(encoder, options, seed=seed)


class LloraNetMode(LoraMode):
    """The whole network linearized in the LoRA factors (needs a JVP at inference)."""

    name = Mode.LLORA_NET
    summary = "network linearized in the LoRA factors (A frozen at init, B trained)"

    def build(self, encoder: nn.Module, options: LoraOptions, *, seed: int = 0) -> Adapter:
        return LloraNetAdapter(encoder, options, seed=seed)
