"""Magnitude pruning, then task arithmetic: ``τ = Σ_i α_i · trim(τ_i)``.

The "trim only" baseline of the TIES paper (Yadav et al., NeurIPS 2023, arXiv 2306.01708,
ablation without sign election); ``peft.utils.merge_utils.magnitude_prune`` computes the same
with a per-tensor trim. Trimming follows :mod:`tvtool.merge.trim`: over the whole vector
(``trim="global"``, default, as in TIES) or within each tensor (``trim="tensor"``, as peft).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvtool.merge.method import (
    TRIM_SCOPES,
    MergeMethod,
    TensorContext,
    check_choice,
    check_density,
    sum_of_terms,
)
from tvtool.merge.trim import tensor_threshold, trim


@dataclass(frozen=True)
class MagnitudeParams:
    """Hyper-parameters of magnitude pruning.

    Attributes:
        density: Fraction of entries each vector keeps.
        trim: ``global`` (top-k over the whole vector) or ``tensor`` (per tensor).

    """

    density: float = 0.2
    trim: str = "global"

    def __post_init__(self) -> None:
        check_density(self.density)
        check_choice(self.trim, TRIM_SCOPES, "trim")


def accumulate(acc: torch.Tensor, tensor: torch.Tensor, index: int, weight: float,
               params: MagnitudeParams, ctx: TensorContext) -> None:
    """Add vector ``index``'s term ``w · trim(τ)`` to ``acc``.

    Args:
        acc: Accumulator, updated in place.
        tensor: The vector's tensor.
        index: Its position among the vectors (selects its global threshold).
        weight: Its coefficient.
        params: Density and trim scope.
        ctx: Global thresholds (for ``trim="global"``) and accumulation dtype.

    Raises:
        ValueError: a global trim without thresholds in ``ctx``.

    """
    part = tensor.to(ctx.dtype)
    if params.density >= 1.0:
        threshold = None
    elif params.trim == "tensor":
        threshold = tensor_threshold(part, params.density)
    else:
        if ctx.thresholds is None:
            raise ValueError("a global trim needs per-vector thresholds in the TensorContext "
                             "(tvtool.merge.merge_state_dicts computes them)")
        threshold = ctx.thresholds[index]
    acc.add_(trim(part, threshold), alpha=weight)


merge = sum_of_terms(accumulate)
"""Weighted sum of the magnitude-trimmed tensors of one name."""


def _global_density(params: MagnitudeParams) -> float | None:
    return params.density if params.trim == "global" and params.density < 1.0 else None


METHOD = MergeMethod(
    name="magnitude",
    paper="Yadav et al., TIES-Merging (trim-only ablation), NeurIPS 2023, arXiv:2306.01708",
    summary="keep the top-density magnitudes of each vector, then a weighted sum",
    streaming=True,
    params=MagnitudeParams,
    fn=merge,
    global_density=_global_density,
    accumulate=accumulate,
    per_vector=("density",),
)
