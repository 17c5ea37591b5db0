"""Model Breadcrumbs: mask the largest and the smallest magnitudes of each vector, then add.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024 (arXiv 2312.06795); reference code rezazzr/breadcrumbs, ``src/task_vectors.py``
(``TaskVectorMiddleKeep``, ``remove_first=True``).

Per task vector and per row of each tensor (the reference ranks along the last dimension:
each output unit's weights of a matrix, a whole bias or LayerNorm vector, each last-axis row of
the patch convolution; 0-d tensors are kept whole):

1. the ``int(n · gamma)`` largest magnitudes of the row are zeroed (the outliers);
2. of what remains, the ``int(n · density)`` largest magnitudes are kept, everything else is
   zeroed (the small, noisy entries).

So an entry survives when its magnitude ranks between the ``gamma`` and ``gamma + density``
fractions of its row. The merge is the weighted sum ``Σ_i α_i · breadcrumbs(τ_i)``, a sum of
per-vector terms that the engine accumulates one input at a time. ``scope="tensor"`` ranks each
whole tensor instead (the paper's text speaks of layers; the reference code ranks rows).
The reference selects with ``torch.topk``, which breaks ties between equal magnitudes
arbitrarily; so does tvtool (the same calls), so on data with ties the kept set can differ
from another implementation's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvtool.merge.method import (
    MergeMethod,
    TensorContext,
    check_choice,
    check_density,
    sum_of_terms,
)

SCOPES = ("row", "tensor")


@dataclass(frozen=True)
class BreadcrumbsParams:
    """Hyper-parameters of Model Breadcrumbs.

    Attributes:
        density: Fraction of each row kept after the outliers are removed (the reference's
            ``beta`` / ``top_k_keep``; its search starts at 0.15).
        gamma: Fraction of each row's largest magnitudes removed first (the reference's
            ``gamma`` / ``top_k_remove``; its search starts at 0.006).
        scope: ``row`` (rank along the last dimension, the reference) or ``tensor``.

    """

    density: float = 0.15
    gamma: float = 0.006
    scope: str = "row"

    def __post_init__(self) -> None:
        check_density(self.density)
        check_density(self.gamma, "gamma")
        check_choice(self.scope, SCOPES, "scope")


def breadcrumbs(tensor: torch.Tensor, density: float, gamma: float, scope: str) -> torch.Tensor:
    """The breadcrumbs of one tensor: its outliers and its small entries zeroed.

    Args:
        tensor: One task vector's tensor (not modified).
        density: Fraction of each row kept after removing the outliers.
        gamma: Fraction of each row's largest magnitudes removed.
        scope: ``row`` (last dimension) or ``tensor``.

    Returns:
        A new tensor of the same shape and dtype.

    """
    if tensor.dim() == 0:
        return tensor.clone()
    rows = tensor.reshape(-1, tensor.shape[-1]) if scope == "row" else tensor.reshape(1, -1)
    width = rows.shape[1]
    removed, kept = int(width * gamma), int(width * density)
    if kept == 0 or width == 0:
        return torch.zeros_like(tensor)
    rows = rows.clone()
    if removed:
        rows.scatter_(1, rows.abs().topk(removed, dim=1).indices, 0.0)
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    keep.scatter_(1, rows.abs().topk(min(kept, width), dim=1).indices, True)
    return (rows * keep).reshape(tensor.shape)


def accumulate(acc: torch.Tensor, tensor: torch.Tensor, index: int, weight: float,
               params: BreadcrumbsParams, ctx: TensorContext) -> None:
    """Add vector ``index``'s term ``w · breadcrumbs(τ)`` to ``acc``.

    Args:
        acc: Accumulator, updated in place.
        tensor: The vector's tensor.
        index: Its position among the vectors (unused).
        weight: Its coefficient.
        params: Density, gamma and scope.
        ctx: Accumulation dtype.

    """
    acc.add_(breadcrumbs(tensor.to(ctx.dtype), params.density, params.gamma, params.scope),
             alpha=weight)


merge = sum_of_terms(accumulate)
"""Weighted sum of the breadcrumbs of the tensors of one name."""

METHOD = MergeMethod(
    name="breadcrumbs",
    paper="Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with "
          "Sparse Masks, ECCV 2024, arXiv:2312.06795",
    summary="per row, drop the top-gamma magnitudes, keep the next density fraction, then a "
            "weighted sum",
    streaming=True,
    params=BreadcrumbsParams,
    fn=merge,
    accumulate=accumulate,
)
