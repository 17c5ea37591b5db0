"""``llora`` mode: LoRA linearized in the LoRA parameters only (L-LoRA, arXiv 2310.04742).

The model is f(x; θ0, φ0) + J_φ f(x; θ0, φ0)·(φ − φ0) with φ = (A, B) the LoRA factors and
W = W0 + s·B·A, s = alpha/r. By the chain rule J_φ·Δφ = J_W·s·(ΔB·A0 + B0·ΔA). tvtool uses
peft's default initialisation, B0 = 0, so the first-order term is J_W·(s·ΔB·A0): A receives
exactly zero gradient and moving it would change nothing but the stored factors (AdamW's
weight decay would shrink it). tvtool therefore keeps A frozen at A0 and trains B only; the
linearized model is then exactly f(x; θ0) + J_W f(x; θ0)·(s·B·A0), i.e. the full linearized
model restricted to the rank-r subspace spanned by A0.

The vector stores A0 and the trained B in the LoRA format of :mod:`tvtool.finetune.lora`, so
:func:`~tvtool.finetune.lora.materialize_lora` gives the dense ΔW = s·B·A0, which must be
evaluated linearized (``tvtool.linearized=true``).
"""

from __future__ import annotations

from torch import Tensor, nn

from tvtool.finetune.base import ENCODER_PREFIX, Adapter, ModeOptions, freeze
from tvtool.finetune.lora import (
    SUFFIX_A,
    SUFFIX_B,
    check_lora_options,
    init_lora_factors,
    lora_metadata,
    lora_targets,
    materialize_lora,
    target_shapes,
)
from tvtool.linearize import linearized_forward
from tvtool.metadata import Mode
from tvtool.types import StateDict


class LloraAdapter(Adapter):
    """Frozen encoder, frozen A0, trainable B; evaluated linearized in the LoRA parameters."""

    mode = Mode.LLORA
    linearized = True

    def __init__(self, encoder: nn.Module, options: ModeOptions,
                 prefix: str = ENCODER_PREFIX) -> None:
        super().__init__(encoder, prefix)
        check_lora_options(options)
        self.options = options
        self.targets = lora_targets(encoder, options.lora_targets)
        self.scaling = options.lora_alpha / options.lora_rank
        freeze(encoder)
        params = dict(encoder.named_parameters())
        first = params[self.targets[0]]
        factors = init_lora_factors(target_shapes(encoder, self.targets), options.lora_rank,
                                    options.seed, first.dtype)
        for index, target in enumerate(self.targets):
            self.register_buffer(f"lora_a0_{index}", factors[target][0].to(first.device))
        self.lora_b = nn.ParameterList([nn.Parameter(factors[t][1].to(first.device))
                                        for t in self.targets])

    def _a0(self, index: int) -> Tensor:
        return getattr(self, f"lora_a0_{index}")

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(t + SUFFIX_B, b) for t, b in zip(self.targets, self.lora_b, strict=True)]

    def weight_deltas(self) -> dict[str, Tensor]:
        """s·B·A0 per target: the first-order weight change, differentiable in B."""
        return {t: (b @ self._a0(i)) * self.scaling
                for i, (t, b) in enumerate(zip(self.targets, self.lora_b, strict=True))}

    def forward(self, images: Tensor) -> Tensor:
        return linearized_forward(self.encoder, None, self.weight_deltas(), images)

    def task_vector(self) -> StateDict:
        out: StateDict = {}
        for index, (target, b) in enumerate(zip(self.targets, self.lora_b, strict=True)):
            out[self.prefix + target + SUFFIX_A] = self._a0(index).detach().to("cpu", copy=True)
            out[self.prefix + target + SUFFIX_B] = b.detach().to("cpu", copy=True)
        return out

    def dense_delta(self) -> StateDict:
        return materialize_lora(self.task_vector(), lora_metadata(self.options))

    def vector_metadata(self) -> dict[str, str]:
        return lora_metadata(self.options)


class LloraMode:
    """L-LoRA: LoRA factors trained in the model linearized in those factors."""

    name = Mode.LLORA
    linearized = True
    summary = "LoRA linearized in the LoRA parameters (A frozen at init, B trained)"

    def build(self, encoder: nn.Module, options: ModeOptions) -> Adapter:
        return LloraAdapter(encoder, options)
