"""Iso-C: isotropic merging in the common subspace.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025 (arXiv 2502.04959); reference code danielm1405/iso-merging,
``src/utils/iso.py`` (``iso_c``).

For every 2-D tensor (except ``text_projection``, as the reference): the sum of the task
matrices ``M = Σ_i α_i τ_i`` is decomposed, ``M = U Σ Vᵀ``, and its singular values are all
replaced by their mean: ``iso(M) = σ̄ · U Vᵀ`` with ``σ̄ = mean(diag Σ)``. Every other tensor
(biases, LayerNorm, the patch convolution, the class embedding) is averaged:
``(1/N) Σ_i α_i τ_i``. With one coefficient α for all vectors this is α × the reference's merged
vector (both parts scale linearly in α).

The decompositions run on one CPU thread whatever ``--threads`` says: LAPACK's and BLAS's
results change in the last bits with the thread count, and a merge must give the same bytes
however it is run.

The polar factor ``U Vᵀ`` of a matrix that is not of full rank depends on the basis the SVD
picks for its null space, which is arbitrary; LoRA deltas (rank r each) sum to such matrices,
so LoRA vectors are refused (:data:`LOW_RANK_REFUSAL`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvtool.merge.method import MergeMethod, TensorContext, compute_dtype, output_dtype
from tvtool.threads import intra_op_threads
from tvtool.vectors.lowrank import thin_svd

ISO_GRID = "0.1:3:0.1"
"""The Iso reference's α grid (``np.linspace(0.0, 3.0, 31)[1:]`` in ``src/eval/eval.py`` for
``iso_c``, ``iso_cts`` and ``TSVM``): the merged matrices have a flat spectrum at the mean
singular value of the *sum*, so the best α lies near or above 1."""

LOW_RANK_REFUSAL = (
    "it flattens every singular value of each summed weight matrix, and LoRA deltas of rank r "
    "sum to matrices of rank at most N*r: the remaining directions would be whatever basis the "
    "SVD happens to return")


def is_matrix(name: str, shape: Sequence[int]) -> bool:
    """Whether the Iso reference decomposes this tensor (2-D and not ``text_projection``)."""
    return len(shape) == 2 and "text_projection" not in name


def term(tensor: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """``α_i τ_i`` in the compute dtype (a new tensor: the input is not modified)."""
    return tensor.to(dtype) * weight


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 dtype: torch.dtype) -> torch.Tensor:
    """``Σ_i α_i τ_i`` in a new tensor of the compute dtype, in vector order."""
    total = term(tensors[0], weights[0], dtype)
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        total.add_(tensor.to(dtype), alpha=weight)
    return total


def not_finite_result(like: torch.Tensor) -> torch.Tensor:
    """A NaN tensor: the result for inputs that are not finite (or whose sum overflows).

    The streaming combination checks every result and then names the input holding the
    NaN/Inf (or reports an overflow), instead of LAPACK failing on it.
    """
    return torch.full_like(like, float("nan"))


def polar(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The orthogonal polar factor ``U Vh`` of a matrix (its nearest semi-orthogonal matrix)."""
    u, _, vh = thin_svd(matrix, matrix.dtype, name)
    return u @ vh


@dataclass(frozen=True)
class IsoCParams:
    """Iso-C has no hyper-parameter besides the coefficient α."""


def iso_matrix(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """``σ̄ · U Vᵀ`` of one matrix: its spectrum flattened to the mean singular value."""
    u, s, vh = thin_svd(matrix, matrix.dtype, name)
    return (u * s.mean()) @ vh


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: IsoCParams,
          ctx: TensorContext) -> torch.Tensor:
    """Iso-C-merge the N tensors of one name.

    Args:
        tensors: The N task-vector tensors (same shape).
        weights: One coefficient per tensor; it multiplies its tensor before the sum.
        params: Unused (the method has none).
        ctx: The tensor's name (decides whether it is decomposed).

    Returns:
        ``σ̄ · U Vᵀ`` of ``Σ α_i τ_i`` for a matrix, ``(1/N) Σ α_i τ_i`` otherwise, in the
        inputs' promoted dtype. An input's NaN/Inf yields a NaN result, which the streaming
        combination then traces to that input.

    """
    total = weighted_sum(tensors, weights, compute_dtype(tensors))
    if not is_matrix(ctx.name, total.shape) or total.numel() == 0:
        return total.div_(len(tensors)).to(output_dtype(tensors))
    if not torch.isfinite(total).all():
        return not_finite_result(total).to(output_dtype(tensors))
    with intra_op_threads(1):
        return iso_matrix(total, ctx.name).to(output_dtype(tensors))


METHOD = MergeMethod(
    name="iso-c",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
          "Task-Specific Subspaces (Iso-C), ICML 2025, arXiv:2502.04959",
    summary="SVD of the summed task matrices, singular values flattened to their mean; "
            "other tensors averaged",
    streaming=True,
    params=IsoCParams,
    fn=merge,
    search_grid=lambda _params: ISO_GRID,
    lora_refusal=LOW_RANK_REFUSAL,
)
