"""Consensus merging: keep only the weights that at least k tasks' TALL masks mark.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML
2024 (arXiv 2405.07813); reference code nik-dim/tall_masks (``src/utils/tallmask_utils.py``:
``generate_task_masks``, ``construct_consensus_mask``; ``src/eval/aggregation.py``:
``create_task_vector``), also vendored in danielm1405/iso-merging.

1. The multi-task vector ``τ_MTL``: the sum of the task vectors (``combine="sum"``, the
   reference's default) or their TIES merge with a disjoint *sum* (``combine="ties"``, the
   reference's ``use_ties``: top-``density`` trim, sign of the summed trimmed values, sum of the
   agreeing entries).
2. Each task's TALL mask ``m_t = |τ_t| > λ · |τ_MTL − τ_t|`` (strictly greater, on the
   untrimmed τ_t, as the reference).
3. The consensus mask keeps an entry where ``Σ_t m_t ≥ k``: k = 2 drops the "catastrophic"
   weights (no task marks them) and the "selfish" ones (one task does); k = 0 keeps
   everything (the plain merge), k > N nothing.
4. The merge: ``τ_MTL ⊙ consensus`` with the coefficients applied as in the multi-task merge
   (``Σ_i α_i τ_i`` or TIES' weighted disjoint sum), so one α for all vectors gives α × the
   reference's merged vector.

Masks and τ_MTL are computed from the *unweighted* vectors, as the reference builds them before
any α; the coefficients weight each vector in the merge itself. Everything is elementwise once
the (optional) global trim thresholds are known, so the method runs over flat chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvtool.limits import short_repr
from tvtool.merge.method import (
    SUM_GRID,
    TRIM_SCOPES,
    MergeMethod,
    TensorContext,
    check_choice,
    check_density,
    chunked,
)
from tvtool.merge.ties import elect_and_merge, thresholds_for
from tvtool.merge.trim import trim

COMBINES = ("sum", "ties")


@dataclass(frozen=True)
class ConsensusParams:
    """Hyper-parameters of consensus merging.

    Attributes:
        k: Minimum number of tasks whose TALL mask marks an entry for it to be kept
            (reference ``prun_thre_k``: 2).
        mask_lambda: λ of the TALL masks ``|τ_t| > λ |τ_MTL − τ_t|`` (the reference picks
            it per task from 0.2..0.6 on validation data; one value for all tasks here).
        combine: ``sum`` (consensus task arithmetic) or ``ties`` (consensus TIES).
        density: Fraction each vector keeps in the TIES trim (reference: 20 %).
        trim: ``global`` (whole vector, the reference) or ``tensor``.

    """

    k: int = 2
    mask_lambda: float = 0.4
    combine: str = "sum"
    density: float = 0.2
    trim: str = "global"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be a non-negative integer, got {short_repr(self.k)}")
        lam = self.mask_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
            raise ValueError(f"mask_lambda must be a finite number >= 0, got {short_repr(lam)}")
        check_choice(self.combine, COMBINES, "combine")
        check_density(self.density)
        check_choice(self.trim, TRIM_SCOPES, "trim")


def consensus_mask(stacked: torch.Tensor, multi_task: torch.Tensor, mask_lambda: float,
                   k: int) -> torch.Tensor:
    """Entries marked by at least k TALL masks, for stacked vectors ``[N, ...]``."""
    marks = stacked.abs() > (multi_task - stacked).abs().mul_(mask_lambda)
    return marks.sum(dim=0) >= k


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: ConsensusParams,
          ctx: TensorContext) -> torch.Tensor:
    """Consensus-merge the N tensors of one name.

    Args:
        tensors: The N task-vector tensors (same shape).
        weights: One coefficient per tensor (applied in the merge, not in the masks).
        params: Consensus hyper-parameters.
        ctx: Tensor name and, for a global TIES trim, each vector's threshold.

    """
    ties = params.combine == "ties"
    thresholds = (thresholds_for(tensors, params.density, params.trim, ctx) if ties
                  else [None] * len(tensors))

    def step(parts: list[torch.Tensor], _start: int) -> torch.Tensor:
        stacked = torch.stack(parts)
        if ties:
            coef = torch.tensor(list(weights), dtype=stacked.dtype)
            trimmed = torch.stack([trim(p, t) for p, t in zip(parts, thresholds, strict=True)])
            multi_task = elect_and_merge(trimmed, torch.ones_like(coef), "total", "sum")
            merged = elect_and_merge(trimmed, coef, "total", "sum")
        else:
            multi_task = stacked.sum(dim=0)
            # Elementwise, in vector order (a BLAS product could split the sum by thread).
            merged = torch.zeros_like(multi_task)
            for part, weight in zip(parts, weights, strict=True):
                merged.add_(part, alpha=weight)
        return merged * consensus_mask(stacked, multi_task, params.mask_lambda, params.k)

    return chunked(tensors, step)


def _global_density(params: ConsensusParams) -> float | None:
    if params.combine == "ties" and params.trim == "global" and params.density < 1.0:
        return params.density
    return None


METHOD = MergeMethod(
    name="consensus",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and "
          "Compression (consensus merging, TALL masks), ICML 2024, arXiv:2405.07813",
    summary="keep the entries that at least k tasks' TALL masks mark, then task arithmetic "
            "(or TIES) of the vectors",
    streaming=True,
    params=ConsensusParams,
    fn=merge,
    global_density=_global_density,
    search_grid=lambda _params: SUM_GRID,
)
