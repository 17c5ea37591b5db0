"""TSV-M, Task Singular Vectors merge.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR
2025 (arXiv 2412.00081); reference code AntoAndGar/task_singular_vectors,
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction`` (what ``method=TSVM`` runs).

For each 2-D tensor other than ``text_projection``, with N vectors and r = min(m, n):

1. per task, the thin SVD ``τ_i = U_i S_i V_iᵀ`` and its top ``k = int(r · 1/N)`` components;
2. the kept components of all tasks side by side: ``U = [U_1,k … U_N,k]`` (m × Nk),
   ``S = diag(S_1,k … S_N,k)``, ``V = [V_1,k … V_N,k]`` (n × Nk);
3. decorrelation: U and V are replaced by their orthogonal polar factors (the reference takes
   the SVD ``U = P Σ Qᵀ`` and uses ``P Qᵀ``, likewise for V);
4. the merged tensor ``polar(U) · S · polar(V)ᵀ``.

Every other tensor (biases, LayerNorms, the class embedding, the patch-embedding conv, the
text projection) is the mean ``(1/N) Σ τ_i``, as in the reference. The coefficient α scales
the whole result (the reference's ``scaling_coef`` is applied to the merged vector).

Coefficients: each task's singular values are multiplied by its coefficient ``w_i`` (signs
included) before step 2. That is exactly the SVD of ``w_i · τ_i`` (a negative ``w_i`` flips
the rows of ``V_iᵀ``, and the polar factor commutes with such a flip), so one shared α gives
α × the reference's merged tensor, ``merge(α) = α · merge(1)``, as for every other method.

Two deliberate differences, which change nothing for the full-rank task vectors the reference
merges: components whose singular value is zero to working precision are not kept (a task
with weight 0, an absent tensor under ``--missing-as-zero``, a LoRA delta whose rank is below
k), and the polar factors leave out directions of zero singular value. In both places the
reference keeps vectors LAPACK picks arbitrarily for a zero singular value, which would then
steer the decorrelation of the other tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvtool.io import all_finite
from tvtool.limits import short_repr
from tvtool.merge.method import MergeMethod, TensorContext, compute_dtype, output_dtype
from tvtool.vectors.lowrank import polar_factor, rank_tolerance, thin_svd

AVERAGED = ("text_projection",)
"""Names (substrings) of 2-D tensors the reference averages instead of decomposing."""

TSV_GRID = "0.1:3:0.1"
"""``merge --search-coef``'s default grid for TSV-M: the reference's own validation grid
(``src/eval/eval.py``, ``np.linspace(0.0, 3.0, 31)[1:]`` for TSVM), around its α = 1."""

PER_TASK = "1/N"


@dataclass(frozen=True)
class TsvParams:
    """Hyper-parameters of TSV-M.

    Attributes:
        share: Fraction of each task's singular components kept per matrix,
            ``k = int(min(m, n) · share)``. ``"1/N"`` (the default) keeps 1/N of them for N
            vectors, which is what the reference does (its only setting).

    """

    share: float | str = PER_TASK

    def __post_init__(self) -> None:
        value = self.share
        if value == PER_TASK:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 < value <= 1:
            raise ValueError(f"share must be '1/N' or a number in (0, 1], got "
                             f"{short_repr(value)}")


def decomposed(name: str, tensor: torch.Tensor) -> bool:
    """Whether TSV-M decomposes this tensor (2-D, not the text projection) or averages it."""
    return tensor.dim() == 2 and not any(part in name for part in AVERAGED)


def kept_rank(shape: Sequence[int], count: int, params: TsvParams) -> int:
    """k: the components each task keeps, ``int(min(m, n) · share)`` as the reference rounds."""
    share = 1 / count if params.share == PER_TASK else float(params.share)
    return int(min(shape) * share)


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: TsvParams,
          ctx: TensorContext) -> torch.Tensor:
    """TSV-merge the N tensors of one name.

    Args:
        tensors: The N task-vector tensors (same shape; an absent tensor is zero).
        weights: One coefficient per tensor (scales that task's singular values).
        params: TSV-M hyper-parameters.
        ctx: The tensor's name (the text projection is averaged).

    Returns:
        The merged tensor, in the promoted dtype of the inputs. A NaN/Inf input gives a
        non-finite result, which the engine blames on that input.

    """
    dtype = compute_dtype(tensors)
    out_dtype = output_dtype(tensors)
    shape = tensors[0].shape
    if not all(all_finite(t) for t in tensors):
        # No SVD of NaN (LAPACK fails): the engine's check of the result names the input.
        return torch.full(shape, float("nan"), dtype=out_dtype)
    count = len(tensors)
    if not decomposed(ctx.name, tensors[0]):
        acc = torch.zeros(shape, dtype=dtype)
        for tensor, weight in zip(tensors, weights, strict=True):
            acc.add_(tensor, alpha=weight / count)
        return acc.to(out_dtype)
    k = kept_rank(shape, count, params)
    us: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    vhs: list[torch.Tensor] = []
    for tensor, weight in zip(tensors, weights, strict=True):
        if k == 0 or weight == 0:
            continue  # w·τ = 0: no component
        u, s, vh = thin_svd(tensor, dtype, ctx.name)
        top = min(k, int((s > rank_tolerance(s, tuple(shape))).sum()))
        us.append(u[:, :top])
        ss.append(s[:top] * weight)
        vhs.append(vh[:top])
        del u, s, vh
    if not ss or sum(s.numel() for s in ss) == 0:
        return torch.zeros(shape, dtype=out_dtype)
    # The polar factors in float64: only there can an exact rank deficiency (a duplicated
    # task) be told from a small but real singular value (see polar_factor).
    u_orth = polar_factor(torch.cat(us, dim=1))
    vh_orth = polar_factor(torch.cat(vhs, dim=0))
    return ((u_orth * torch.cat(ss).double()) @ vh_orth).to(out_dtype)


METHOD = MergeMethod(
    name="tsv",
    paper="Gargiulo et al., Task Singular Vectors (TSV-M), CVPR 2025, arXiv:2412.00081",
    summary="per matrix: each task's top 1/N singular components, U and V orthogonalised, "
            "reassembled; other tensors averaged",
    streaming=True,
    params=TsvParams,
    fn=merge,
    search_grid=lambda _params: TSV_GRID,
)
