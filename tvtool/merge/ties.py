"""TIES-merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708).

1. Trim: keep the ``density`` fraction of largest-magnitude entries of each task vector —
   over the whole vector (``trim="global"``, the paper) or within each tensor
   (``trim="tensor"``, what ``peft.utils.merge_utils.ties`` does); see :mod:`tvtool.merge.trim`.
2. Elect sign: per entry, the sign of the sum of the trimmed values (``sign="total"``, the
   paper's "mass") or of the sum of their signs (``sign="frequency"``); a zero sum elects +.
   This is ``peft``'s ``calculate_majority_sign_mask``, used as is. Trimmed (zero) entries
   never count as agreeing.
3. Disjoint merge: per entry, combine only the vectors whose sign agrees with the elected
   one: their mean (``disjoint="mean"``, the paper and ``peft``'s ``disjoint_merge``, used as
   is) or their sum (``disjoint="sum"``).

Coefficients follow ``peft``: the sign is elected on the *unweighted* trimmed vectors and
the coefficients multiply each vector after the election, before the disjoint merge. With
one coefficient α for all vectors the result is α × the paper's merged vector (the paper's
λ); per-vector or per-tensor coefficients weight each agreeing vector inside the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvtool.merge.method import (
    DISJOINT_MEAN_GRID,
    TRIM_SCOPES,
    MergeMethod,
    TensorContext,
    check_choice,
    check_density,
    chunked,
    params_of,
)
from tvtool.merge.peft_utils import (
    calculate_majority_sign_mask,
    disjoint_merge,
    reshape_weight_task_tensors,
)
from tvtool.merge.trim import tensor_threshold, trim

SIGN_METHODS = ("total", "frequency")
DISJOINT_MODES = ("mean", "sum")


@dataclass(frozen=True)
class TiesParams:
    """Hyper-parameters of TIES.

    Attributes:
        density: Fraction of entries each vector keeps after trimming (paper: 0.2).
        trim: ``global`` (top-k over the whole vector, the paper) or ``tensor`` (per tensor).
        sign: ``total`` (sign of the summed values) or ``frequency`` (majority of signs).
        disjoint: ``mean`` (the paper) or ``sum`` of the agreeing entries.

    """

    density: float = 0.2
    trim: str = "global"
    sign: str = "total"
    disjoint: str = "mean"

    def __post_init__(self) -> None:
        check_density(self.density)
        check_choice(self.trim, TRIM_SCOPES, "trim")
        check_choice(self.sign, SIGN_METHODS, "sign")
        check_choice(self.disjoint, DISJOINT_MODES, "disjoint")


def thresholds_for(tensors: Sequence[torch.Tensor], density: float | Sequence[float],
                   scope: str, ctx: TensorContext) -> list[float | None]:
    """Per-vector trim thresholds for one tensor name (None = keep everything).

    Args:
        tensors: The N tensors of one name.
        density: One density for all vectors, or one per vector.
        scope: ``global`` or ``tensor``.
        ctx: Holds each vector's whole-vector threshold for a global trim.

    Raises:
        ValueError: a global trim without the thresholds the engine computes beforehand.

    """
    densities = ([float(density)] * len(tensors) if isinstance(density, (int, float))
                 else list(density))
    if all(d >= 1.0 for d in densities):
        return [None] * len(tensors)
    if scope == "tensor":
        return [None if d >= 1.0 else tensor_threshold(t, d)
                for t, d in zip(tensors, densities, strict=True)]
    if ctx.thresholds is None or len(ctx.thresholds) != len(tensors):
        raise ValueError("a global trim needs per-vector thresholds in the TensorContext "
                         "(tvtool.merge.merge_state_dicts computes them)")
    return [None if d >= 1.0 else t for t, d in zip(ctx.thresholds, densities, strict=True)]


def elect_and_merge(trimmed: torch.Tensor, weights: torch.Tensor, sign: str,
                    disjoint: str) -> torch.Tensor:
    """Sign election and disjoint merge of stacked trimmed chunks ``[N, ...]``."""
    # peft returns a bool mask; as floats, the count in disjoint_merge (mask.sum(dim=0)) is a
    # float sum instead of a bool-to-int64 reduction: same values, ~15 % faster per step.
    mask = calculate_majority_sign_mask(trimmed, method=sign).to(trimmed.dtype)  # type: ignore[arg-type]
    weighted = trimmed * reshape_weight_task_tensors(trimmed, weights)
    if disjoint == "mean":
        return disjoint_merge(weighted, mask)
    return (weighted * mask).sum(dim=0)


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: TiesParams,
          ctx: TensorContext) -> torch.Tensor:
    """TIES-merge the N tensors of one name.

    Args:
        tensors: The N task-vector tensors (same shape).
        weights: One coefficient per tensor (applied after sign election).
        params: TIES hyper-parameters.
        ctx: Tensor name and, for a global trim, each vector's threshold.

    """
    densities = [params_of(params, ctx, i).density for i in range(len(tensors))]
    thresholds = thresholds_for(tensors, densities, params.trim, ctx)

    def step(parts: list[torch.Tensor], _start: int) -> torch.Tensor:
        trimmed = torch.stack([trim(p, t) for p, t in zip(parts, thresholds, strict=True)])
        coef = torch.tensor(list(weights), dtype=trimmed.dtype)
        return elect_and_merge(trimmed, coef, params.sign, params.disjoint)

    return chunked(tensors, step)


def _global_density(params: TiesParams) -> float | None:
    return params.density if params.trim == "global" and params.density < 1.0 else None


METHOD = MergeMethod(
    name="ties",
    paper="Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708",
    summary="trim to the top-density magnitudes, elect a sign per entry, merge the agreeing "
            "entries",
    streaming=True,
    params=TiesParams,
    fn=merge,
    global_density=_global_density,
    search_grid=lambda _params: DISJOINT_MEAN_GRID,
    per_vector=("density",),
)
