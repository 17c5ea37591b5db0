"""Iso-CTS: isotropic merging in the common and task-specific subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025 (arXiv 2502.04959); reference code danielm1405/iso-merging,
``src/utils/iso.py`` (``iso_cts``), run with ``common_space_fraction: 0.8``
(``config/method/iso_cts.yaml``).

For every 2-D tensor (except ``text_projection``) of shape r x k, with m = min(r, k) and T
vectors (the reference's split of the rank budget, kept exactly):

1. ``c = int(m · common_space_fraction)``; the task-specific budget is rounded to a multiple of
   T, ``m − c ← round((m − c) / T) · T`` (Python's ``round``), so every task gets
   ``n = (m − c) / T`` components and the common subspace the other ``c``;
2. common subspace: the top c singular triplets ``U_c, S_c, V_c`` of ``M = Σ_i α_i τ_i``;
3. task-specific subspaces: for each task, ``τ_i' = α_i τ_i − U_c U_cᵀ α_i τ_i`` (the common
   column space projected out) and its top n singular triplets;
4. the m columns ``[U_1 … U_T | U_c]`` and the m rows ``[V_1; …; V_T; V_c]`` are each
   replaced by their orthogonal polar factor (``U Vᵀ`` of their own SVD, as the reference
   does), and every singular value by the mean of the m kept ones:
   ``σ̄ · polar([U_1 … U_c]) · polar([V_1; …; V_c])``.

Other tensors are averaged, ``(1/N) Σ_i α_i τ_i``, as in Iso-C. With one α for all vectors the
result is α × the reference's merged vector.

What tvtool computes differently (same maths, fewer flops; tests compare with a float64
re-derivation of the reference's steps):

* for r ≤ k, ``U`` is square, so ``I − U_c U_cᵀ = Q Qᵀ`` with ``Q`` its last m − c columns, and
  the top triplets of ``τ_i'`` are ``Q ·`` those of the small ``(m − c) x k`` matrix ``Qᵀ τ_i``;
* for r > k, the top n triplets of ``τ_i'`` come from the eigenvectors of its k x k Gram matrix
  (only the n largest are used, which the Gram matrix resolves to within the input precision);
* the task-specific columns are orthogonal to ``U_c`` (they lie in its complement), so the polar
  factor of ``[U_1 … U_T | U_c]`` is ``[polar([U_1 … U_T]) | U_c]``: one SVD of an r x (m − c)
  matrix instead of r x m.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvtool.errors import NumericalError
from tvtool.merge.iso_c import (
    ISO_GRID,
    LOW_RANK_REFUSAL,
    is_matrix,
    not_finite_result,
    polar,
    term,
    weighted_sum,
)
from tvtool.merge.method import (
    MergeMethod,
    TensorContext,
    check_density,
    compute_dtype,
    output_dtype,
)
from tvtool.threads import intra_op_threads
from tvtool.vectors.lowrank import thin_svd


@dataclass(frozen=True)
class IsoCtsParams:
    """Hyper-parameters of Iso-CTS.

    Attributes:
        common_space_fraction: Share of each matrix's rank budget m = min(r, k) given to the
            common subspace before rounding (reference: 0.8); the rest is split equally
            between the tasks.

    """

    common_space_fraction: float = 0.8

    def __post_init__(self) -> None:
        check_density(self.common_space_fraction, "common_space_fraction")


def rank_split(m: int, tasks: int, fraction: float) -> tuple[int, int]:
    """The reference's split of a rank budget ``m`` between the common and task subspaces.

    Returns:
        ``(c, n)``: c components for the common subspace and n for each of the ``tasks``
        tasks, with ``c + tasks · n == m``.

    """
    common = int(m * fraction)
    specific = round((m - common) / tasks) * tasks
    return m - specific, specific // tasks


def _top_of_projected(term: torch.Tensor, u_common: torch.Tensor, n: int,
                      name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top n singular triplets of ``term − U_c U_cᵀ term`` for a tall ``term`` (r > k).

    From the eigenvectors of the k x k Gram matrix: the n largest eigenpairs give ``V`` and
    ``S``, and ``U = term' V / S``.
    """
    projected = term - u_common @ (u_common.T @ term)
    gram = projected.T @ projected
    try:
        values, vectors = torch.linalg.eigh(gram)
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise NumericalError(f"the eigendecomposition for {name} did not converge: "
                             f"{' '.join(str(exc).split())[:120]}") from None
    values, vectors = values.flip(0)[:n], vectors.flip(1)[:, :n]
    s = values.clamp_min(0).sqrt()
    u = (projected @ vectors) / torch.where(s > 0, s, 1)
    return u, s, vectors.T


def iso_cts_matrix(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                   total: torch.Tensor, fraction: float, name: str) -> torch.Tensor:
    """Iso-CTS of one matrix name, given the task matrices, their weights and the weighted sum.

    Each weighted task matrix ``α_i τ_i`` is formed when its turn comes (one at a time).
    """
    rows, cols = total.shape
    m = min(rows, cols)
    common, n = rank_split(m, len(tensors), fraction)
    u, s, vh = thin_svd(total, total.dtype, name)
    if n == 0:
        # The common subspace is the whole SVD (its polar factors are U and Vh themselves).
        return (u * s.mean()) @ vh
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    complement = u[:, common:] if rows <= cols else None
    for tensor, weight in zip(tensors, weights, strict=True):
        task = term(tensor, weight, total.dtype)
        if complement is not None:
            # I − U_c U_cᵀ = Q Qᵀ: decompose the small (m − c) x k matrix Qᵀ τ instead.
            small_u, small_s, small_vh = thin_svd(complement.T @ task, task.dtype, name)
            us.append(complement @ small_u[:, :n])
            ss.append(small_s[:n])
            vhs.append(small_vh[:n])
        else:
            task_u, task_s, task_vh = _top_of_projected(task, u_common, n, name)
            us.append(task_u)
            ss.append(task_s)
            vhs.append(task_vh)
    specific = torch.cat(us, dim=1)
    # Exactly in the complement of U_c up to rounding; projecting once more keeps the block
    # polar factor below orthogonal to U_c even where the task components were resolved
    # less precisely.
    specific_u = polar(specific - u_common @ (u_common.T @ specific), name)
    mean = torch.cat([*ss, s_common]).mean()
    rows_v = polar(torch.cat([*vhs, vh_common], dim=0), name)
    columns_u = torch.cat([specific_u, u_common], dim=1)
    return (columns_u * mean) @ rows_v


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: IsoCtsParams,
          ctx: TensorContext) -> torch.Tensor:
    """Iso-CTS-merge the N tensors of one name.

    Args:
        tensors: The N task-vector tensors (same shape).
        weights: One coefficient per tensor; it multiplies its tensor first.
        params: The common subspace's share of the rank budget.
        ctx: The tensor's name (decides whether it is decomposed).

    Returns:
        The merged tensor in the inputs' promoted dtype (NaN when an input is not finite;
        the streaming combination then names that input).

    """
    total = weighted_sum(tensors, weights, compute_dtype(tensors))
    if not is_matrix(ctx.name, total.shape) or total.numel() == 0:
        return total.div_(len(tensors)).to(output_dtype(tensors))
    if not torch.isfinite(total).all():  # a NaN or Inf of any term reaches the sum
        return not_finite_result(total).to(output_dtype(tensors))
    with intra_op_threads(1):  # the bytes must not depend on --threads (see iso_c)
        return iso_cts_matrix(tensors, weights, total, params.common_space_fraction, ctx.name
                              ).to(output_dtype(tensors))


METHOD = MergeMethod(
    name="iso-cts",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
          "Task-Specific Subspaces (Iso-CTS), ICML 2025, arXiv:2502.04959",
    summary="common subspace of the summed matrices plus each task's top components of the "
            "rest, orthogonalised, singular values flattened to their mean; other tensors "
            "averaged",
    streaming=True,
    params=IsoCtsParams,
    fn=merge,
    search_grid=lambda _params: ISO_GRID,
    lora_refusal=LOW_RANK_REFUSAL,
)
