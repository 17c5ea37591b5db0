"""DARE: drop and rescale, then sum (or TIES-style sign election).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (DARE), ICML 2024 (arXiv 2311.03099).

Each entry of each task vector is kept with probability ``density`` (the paper's drop rate is
``p = 1 - density``) and, with ``rescale``, the kept entries are divided by ``density`` so the
expected vector is unchanged. Then ``combine="sum"`` gives ``Σ α_i · dare(τ_i)`` (``peft``'s
``dare_linear``) and ``combine="ties"`` elects signs and merges disjointly (``peft``'s
``dare_ties``; same election/merge functions and coefficient placement as :mod:`.ties`).

Masks are seeded, not drawn from the global RNG (why tvtool does not call ``peft``'s
``random_pruning``, which does): the mask of block ``j`` (2^18 entries) of tensor ``name`` of
vector ``i`` comes from a generator seeded with ``hash(seed, i, name, j)``. The merge is
therefore identical across runs, processing orders and chunk sizes, and changes with the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvtool.merge.method import (
    DISJOINT_MEAN_GRID,
    SUM_GRID,
    MergeMethod,
    TensorContext,
    check_choice,
    check_density,
    chunked,
    derived_seed,
    params_of,
    sum_of_terms,
)
from tvtool.merge.ties import DISJOINT_MODES, SIGN_METHODS, elect_and_merge

MASK_BLOCK = 1 << 18  # equal to the engine's chunk, so a chunk draws each block once
COMBINES = ("sum", "ties")


@dataclass(frozen=True)
class DareParams:
    """Hyper-parameters of DARE.

    Attributes:
        density: Probability that an entry is kept (1 - the paper's drop rate p).
        rescale: Divide the kept entries by ``density`` (the paper's rescaling).
        combine: ``sum`` (DARE + task arithmetic) or ``ties`` (DARE + sign election).
        sign: Sign election of ``combine="ties"``: ``total`` or ``frequency``.
        disjoint: Disjoint merge of ``combine="ties"``: ``mean`` or ``sum``.

    """

    density: float = 0.2
    rescale: bool = True
    combine: str = "sum"
    sign: str = "total"
    disjoint: str = "mean"

    def __post_init__(self) -> None:
        check_density(self.density)
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale must be true or false, got {self.rescale!r}")
        check_choice(self.combine, COMBINES, "combine")
        check_choice(self.sign, SIGN_METHODS, "sign")
        check_choice(self.disjoint, DISJOINT_MODES, "disjoint")


def keep_mask(numel: int, start: int, stop: int, density: float, seed: int, vector: int,
              name: str) -> torch.Tensor:
    """Return the keep mask of entries ``[start, stop)`` of one tensor of one vector.

    Built from whole ``MASK_BLOCK``-sized blocks, each from its own seeded generator, so a
    slice of the mask does not depend on how the tensor is chunked.
    """
    pieces = []
    for block in range(start // MASK_BLOCK, (stop - 1) // MASK_BLOCK + 1):
        begin = block * MASK_BLOCK
        length = min(MASK_BLOCK, numel - begin)
        generator = torch.Generator().manual_seed(derived_seed(seed, "dare", vector, name, block))
        mask = torch.rand(length, generator=generator) < density
        lo, hi = max(start, begin) - begin, min(stop, begin + length) - begin
        pieces.append(mask[lo:hi])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def drop_and_rescale(part: torch.Tensor, mask: torch.Tensor, density: float,
                     rescale: bool) -> torch.Tensor:
    """Zero the dropped entries; divide the kept ones by ``density`` when rescaling."""
    kept = part * mask
    return kept / density if rescale else kept


def accumulate(acc: torch.Tensor, tensor: torch.Tensor, index: int, weight: float,
               params: DareParams, ctx: TensorContext) -> None:
    """Add vector ``index``'s term ``w · dare(τ)`` (``combine="sum"``) to ``acc``.

    Args:
        acc: Accumulator, updated in place.
        tensor: The vector's tensor.
        index: Its position among the vectors (part of its masks' seeds).
        weight: Its coefficient.
        params: DARE hyper-parameters.
        ctx: Tensor name, seed and accumulation dtype.

    """
    if params.density <= 0.0:
        return
    part = tensor.reshape(-1)
    if params.density < 1.0:
        numel = part.numel()
        mask = keep_mask(numel, 0, numel, params.density, ctx.seed, index, ctx.name)
        part = drop_and_rescale(part.to(ctx.dtype), mask, params.density, params.rescale)
    acc.view(-1).add_(part, alpha=weight)


_sum_merge = sum_of_terms(accumulate)


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], params: DareParams,
          ctx: TensorContext) -> torch.Tensor:
    """DARE-merge the N tensors of one name.

    Args:
        tensors: The N task-vector tensors (same shape).
        weights: One coefficient per tensor.
        params: DARE hyper-parameters.
        ctx: Tensor name and seed (they determine the masks).

    """
    if params.combine == "sum":
        return _sum_merge(tensors, weights, params, ctx)
    numel = tensors[0].numel()
    densities = [params_of(params, ctx, i).density for i in range(len(tensors))]

    def step(parts: list[torch.Tensor], start: int) -> torch.Tensor:
        stop = start + parts[0].numel()
        dropped = [torch.zeros_like(p) if d <= 0.0 else p if d >= 1.0
                   else drop_and_rescale(p, keep_mask(numel, start, stop, d, ctx.seed, index,
                                                      ctx.name), d, params.rescale)
                   for index, (p, d) in enumerate(zip(parts, densities, strict=True))]
        coef = torch.tensor(list(weights), dtype=parts[0].dtype)
        return elect_and_merge(torch.stack(dropped), coef, params.sign, params.disjoint)

    return chunked(tensors, step)


METHOD = MergeMethod(
    name="dare",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099",
    summary="randomly drop entries (seeded), rescale by 1/density, then sum or TIES-merge",
    streaming=True,
    params=DareParams,
    fn=merge,
    accumulate=accumulate,
    separable=lambda params: params.combine == "sum",
    per_vector=("density",),
    # combine=ties is TIES' disjoint mean of the rescaled vectors
    search_grid=lambda params: DISJOINT_MEAN_GRID if params.combine == "ties" else SUM_GRID,
)
