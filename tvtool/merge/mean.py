"""Mean (weight averaging): ``τ = (1/N) Σ_i α_i · τ_i``.

Averaging fine-tuned weights ("model soups", Wortsman et al., ICML 2022, arXiv 2203.05482)
is task arithmetic with every coefficient equal to 1/N; with coefficients α_i the mean is
``(1/N) Σ α_i τ_i``, so ``mean == sum / N`` for any coefficients. With ``--missing-as-zero``
N counts every vector, including those that lack a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvtool.merge.method import MergeMethod, TensorContext, sum_of_terms


@dataclass(frozen=True)
class MeanParams:
    """The mean has no hyper-parameter besides the coefficients."""


def accumulate(acc: torch.Tensor, tensor: torch.Tensor, index: int, weight: float,
               params: MeanParams, ctx: TensorContext) -> None:
    """Add vector ``index``'s term ``(w / N) · τ`` to ``acc``.

    Args:
        acc: Accumulator, updated in place.
        tensor: The vector's tensor.
        index: Its position among the vectors (unused).
        weight: Its coefficient.
        params: Unused (the method has none).
        ctx: Number of vectors N.

    """
    acc.add_(tensor, alpha=weight / ctx.count)


merge = sum_of_terms(accumulate)
"""``(1/N) Σ_i w_i · tensors_i``."""

METHOD = MergeMethod(
    name="mean",
    paper="Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
    summary="average of the task vectors: (1/N) sum_i coef_i * tau_i",
    streaming=True,
    params=MeanParams,
    fn=merge,
    accumulate=accumulate,
)
