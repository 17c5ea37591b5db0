"""LoRA task vectors <-> peft LoRA adapters of an open_clip model (pure functions on tensors).

peft names adapter weights by module: ``base_model.model.<module>.lora_A.weight`` [r, in] and
``.lora_B.weight`` [out, r], with ΔW = scaling·B·A, scaling = lora_alpha / r (or
lora_alpha / √r with ``use_rslora``), r and lora_alpha per module from ``rank_pattern`` /
``alpha_pattern`` where those match. For an ``nn.MultiheadAttention`` (open_clip's attention)
peft adapts the whole fused in-projection ``in_proj_weight`` [3E, E] with one pair
(``<attn>.lora_A.weight``, ``<attn>.lora_B.weight``) and the out-projection with a second
pair of the same rank (``<attn>.base_layer.out_proj.lora_A.weight`` ...); it cannot give the
q, k and v row blocks their own factors.

tvtool stores one pair per q/k/v row block (see :mod:`tvtool.finetune.lora`). The exact
correspondence used here: the row blocks present become one in-projection pair of rank
Σ r_b, A = [A_q; A_v] (stacked rows) and B block-diagonal (B_q in the q rows and the first
r_q columns, B_v in the v rows and the next columns, zeros elsewhere), so B·A =
[B_q·A_q; 0; B_v·A_v]. Pairs of a smaller rank are padded with zero rows of A and zero
columns of B (B·A is unchanged), so every module of the adapter has one rank r and one
lora_alpha = s·r for the vector's scale s = alpha/r: the adapter needs neither
``rank_pattern`` nor ``alpha_pattern``, which older peft versions match differently.

Before 0.22, peft's wrapper of ``nn.MultiheadAttention`` applied the out-projection's delta
**twice**: its ``merge()`` added ΔW to ``out_proj``'s weight and then called the inner
layer's ``merge()``, which added it again; every forward pass merged that way (measured with
peft 0.21.2). peft 0.22 (huggingface/peft PR #3774) applies it once in a model made by
``get_peft_model`` (the model it trains), but still twice in one loaded by
``PeftModel.from_pretrained`` (measured with 0.22.0). A peft model with out-projection factors
(A, B) therefore computes W + f·scaling·B·A. tvtool reproduces what peft computes: import
multiplies the out-projection's B by the f of the model the adapter was trained as
(:func:`mha_out_proj_applied` of the ``peft_version`` that ``adapter_config.json`` records,
or of the installed peft's when it records none); export divides it by
:data:`MHA_OUT_PROJ_LOADED` = 2, what a loading peft applies. Both exact (powers of two).

Nothing here reads files or imports peft or open_clip; module structure comes from
:func:`tvtool.models.modules.module_table`.

The package: :mod:`~tvtool.formats.peft_adapters.layout` (peft's key layout and the shared
forms), :mod:`~tvtool.formats.peft_adapters.config` (``adapter_config.json`` rules),
:mod:`~tvtool.formats.peft_adapters.to_peft` (export) and
:mod:`~tvtool.formats.peft_adapters.from_peft` (import).
"""

from tvtool.formats.peft_adapters.config import PeftSettings, check_peft_config
from tvtool.formats.peft_adapters.from_peft import peft_to_lora_vector
from tvtool.formats.peft_adapters.layout import (
    MHA_OUT,
    MHA_OUT_PROJ_LOADED,
    PEFT_A,
    PEFT_B,
    PEFT_PREFIX,
    ImportedVector,
    PeftAdapter,
    mha_out_proj_applied,
)
from tvtool.formats.peft_adapters.to_peft import lora_vector_to_peft

__all__ = [
    "MHA_OUT",
    "MHA_OUT_PROJ_LOADED",
    "PEFT_A",
    "PEFT_B",
    "PEFT_PREFIX",
    "ImportedVector",
    "PeftAdapter",
    "PeftSettings",
    "check_peft_config",
    "lora_vector_to_peft",
    "mha_out_proj_applied",
    "peft_to_lora_vector",
]
