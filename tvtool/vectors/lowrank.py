"""Low-rank maths over one matrix: thin SVD, numerical rank, energy ranks, polar factors.

Shared by the SVD merge methods (:mod:`tvtool.merge.tsv`) and ``tvtool compress``
(:mod:`tvtool.commands.compress`). Pure functions of tensors; no file is read here.
"""

from __future__ import annotations

import torch

from tvtool.errors import NumericalError


def thin_svd(matrix: torch.Tensor, dtype: torch.dtype, name: str = "matrix"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``matrix = U · diag(S) · Vh`` computed in ``dtype``.

    A wide matrix is decomposed through its transpose: LAPACK's divide and conquer is about
    twice as fast on the tall orientation (``benchmarks/svd_bench.py``: 0.90 s wide, 0.46 s
    tall for a 768×3072 float32 block, one thread). The factors are the same up to the usual
    sign and degenerate-subspace freedom of any SVD.

    Args:
        matrix: A 2-D tensor (any floating dtype; not modified).
        dtype: The compute dtype (float32 or float64).
        name: How to name the matrix if the SVD fails.

    Returns:
        ``U`` [m, r], ``S`` [r] (descending, non-negative), ``Vh`` [r, n], r = min(m, n).

    Raises:
        NumericalError: the SVD did not converge (LAPACK gave up).
    """
    x = matrix.to(dtype)
    try:
        if x.shape[0] < x.shape[1]:
            u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
            return vh.T, s, u.T
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u, s, vh
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise NumericalError(f"the SVD of {name} {tuple(matrix.shape)} did not converge: "
                             f"{' '.join(str(exc).split())[:120]}") from None


def singular_values(matrix: torch.Tensor, dtype: torch.dtype, name: str = "matrix"
                    ) -> torch.Tensor:
    """The singular values of ``matrix`` in ``dtype`` (descending), without the vectors.

    Raises:
        NumericalError: the SVD did not converge.
    """
    x = matrix.to(dtype)
    try:
        return torch.linalg.svdvals(x.T if x.shape[0] < x.shape[1] else x)
    except RuntimeError as exc:
        raise NumericalError(f"the SVD of {name} {tuple(matrix.shape)} did not converge: "
                             f"{' '.join(str(exc).split())[:120]}") from None


def rank_tolerance(values: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Singular values at or below this are zero to working precision.

    ``max(m, n) · eps · σ_max``, the default of ``torch.linalg.matrix_rank`` (and NumPy's): a
    matrix that is zero, or whose rank is lower than its size (a LoRA delta, a duplicated
    task), has components that are rounding noise, not directions of the data.
    """
    if values.numel() == 0:
        return 0.0
    return float(values[0]) * max(shape) * torch.finfo(values.dtype).eps


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of ``Σ σ²``.

    Args:
        values: Singular values, descending.
        energy: Fraction in (0, 1].

    Returns:
        k in [0, len(values)]; 0 for a zero matrix (nothing to keep).
    """
    squares = values.double().square()
    cumulative = torch.cumsum(squares, 0)
    if cumulative.numel() == 0 or float(cumulative[-1]) == 0.0:
        return 0
    # The last cumulative sum *is* the total, so energy 1 reaches it exactly (no rounding
    # makes it ask for more components than exist).
    target = energy * float(cumulative[-1])
    reached = (cumulative >= target).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(values.numel())


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P = U · Vh`` of ``matrix = U · diag(S) · Vh``.

    P is the orthonormal matrix closest to ``matrix`` (Frobenius norm). It is computed in
    float64 whatever the input's dtype, and directions whose singular value is zero to
    float64 precision (:func:`rank_tolerance`) are left out: a matrix that is exactly
    rank-deficient (the same columns twice) gets the partial isometry on its range instead of
    the arbitrary completions LAPACK would pick. In float64 that tolerance (2e-13·σ_max for
    768 columns) is far below the smallest singular value of a matrix of real data: eight
    random orthonormal 768×96 blocks side by side gave σ_min/σ_max of 1e-3 and, in one of three
    draws, 3e-5, which float32's tolerance (2.6e-4) would have dropped. For a matrix of full
    rank this is the plain polar factor.

    Returns:
        P in float64, the shape of ``matrix``.

    Raises:
        NumericalError: the SVD did not converge.
    """
    u, s, vh = thin_svd(matrix, torch.float64, "the concatenated singular vectors")
    keep = int((s > rank_tolerance(s, tuple(matrix.shape))).sum())
    if keep == s.numel():
        return u @ vh
    return u[:, :keep] @ vh[:keep]
