"""Norms and cosine similarities of task vectors, streamed one tensor name at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvtool.errors import InvalidInputError
from tvtool.io import TensorSource


def vector_norms(source: TensorSource) -> dict[str, float]:
    """L2 norm of every tensor of a vector, computed one tensor at a time."""
    names = source.keys()
    return {name: float(source.get(name).double().norm()) for name in names}


def cosine_matrix(sources: Sequence[TensorSource]) -> list[list[float]]:
    """Cosine similarities between flattened task vectors, one tensor name at a time.

    Tensors missing from one vector count as zero in it; a zero vector has similarity 0
    with everything (itself included).

    Raises:
        InvalidInputError: two vectors hold a tensor of different shapes.
    """
    count = len(sources)
    dots = torch.zeros(count, count, dtype=torch.float64)
    key_sets = [set(s.keys()) for s in sources]
    names: list[str] = []
    seen: set[str] = set()
    for source in sources:
        source_names = source.keys()
        fresh = [n for n in source_names if n not in seen]
        names += fresh
        seen.update(fresh)
    for name in names:
        owners = [i for i in range(count) if name in key_sets[i]]
        shapes = {sources[i].info(name).shape for i in owners}
        if len(shapes) > 1:
            raise InvalidInputError(f"tensor {name!r} has different shapes in the inputs: "
                                    f"{sorted(shapes)}")
        flat = {i: sources[i].get(name).double().reshape(-1) for i in owners}
        for a in owners:
            for b in owners:
                if b >= a:
                    dots[a, b] += torch.dot(flat[a], flat[b])
    dots = torch.triu(dots) + torch.triu(dots, 1).T
    norms = dots.diagonal().sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots))
    return cosine.tolist()


