"""Whole-vector TIES against an independent reference written from the paper.

Yadav et al., "TIES-Merging" (arXiv 2306.01708), Algorithm 1, for task vectors τ_1..τ_n
flattened into one row each (all tensors concatenated):

1. Trim: keep the top-k entries of |τ_t| over the *whole* vector, k = ⌊density · d⌋.
2. Elect: γ = sgn(Σ_t τ̂_t) per entry.
3. Disjoint mean: per entry, the mean of the τ̂_t whose sign equals γ (kept entries only).
4. The merge is λ · that mean.

(The authors' code, ``topk_values_mask`` in prateeky2806/ties-merging, takes the
``(d − k)``-th smallest magnitude as threshold with ``>=`` and so keeps k + 1 entries; tvtool
and this reference keep the paper's k.)

The reference below is plain numpy over the concatenated vector; nothing is shared with
tvtool's streaming implementation (radix thresholds, chunked per-tensor steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvtool.merge import merge_state_dicts

SHAPES = {"visual.a": (6, 5), "visual.b": (17,), "visual.c": (3, 2, 4)}


def _vectors(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    vectors = []
    for index in range(count):
        vector = {}
        for position, (name, shape) in enumerate(SHAPES.items()):
            # Different scales per tensor and per vector: a global trim then keeps a very
            # different set than a per-tensor trim would (checked below).
            scale = (1.0, 8.0, 0.2)[position] * (1.0 + index)
            vector[name] = torch.randn(shape, generator=gen) * scale
        vectors.append(vector)
    return vectors


def _reference_ties(vectors: list[dict[str, torch.Tensor]], density: float | list[float],
                    lam: float) -> dict[str, np.ndarray]:
    names = sorted(vectors[0])
    rows = np.stack([np.concatenate([v[n].double().numpy().reshape(-1) for n in names])
                     for v in vectors])
    count, width = rows.shape
    densities = density if isinstance(density, list) else [density] * count
    trimmed = np.zeros_like(rows)
    for t in range(count):
        top = np.argsort(-np.abs(rows[t]), kind="stable")[:int(densities[t] * width)]
        trimmed[t, top] = rows[t, top]
    elected = np.sign(trimmed.sum(axis=0))
    merged = np.zeros(width)
    for e in range(width):
        agreeing = [trimmed[t, e] for t in range(count)
                    if trimmed[t, e] != 0 and np.sign(trimmed[t, e]) == elected[e]]
        merged[e] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    merged *= lam
    out, start = {}, 0
    for name in names:
        size = int(np.prod(SHAPES[name]))
        out[name] = merged[start:start + size].reshape(SHAPES[name])
        start += size
    return out


@pytest.mark.parametrize(("seed", "count", "density", "lam"), [
    (0, 3, 0.2, 1.0), (1, 2, 0.1, 0.7), (2, 4, 0.5, 1.3), (3, 3, 0.9, -0.4)])
def test_whole_vector_ties_equals_the_paper(seed, count, density, lam):
    vectors = _vectors(seed, count)
    ours = merge_state_dicts(vectors, "ties", lam, {"density": density})
    reference = _reference_ties(vectors, density, lam)
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        np.testing.assert_allclose(ours[name].double().numpy(), expected, rtol=1e-6, atol=1e-6)
    # The defaults are the paper's: global trim, sign by total mass, disjoint mean.
    explicit = merge_state_dicts(vectors, "ties", lam, {"density": density, "trim": "global",
                                                       "sign": "total", "disjoint": "mean"})
    for name in ours:
        assert torch.equal(ours[name], explicit[name])


def test_the_reference_tells_global_from_per_tensor_trim():
    # Guards the test itself: with these scales, per-tensor trimming gives another merge.
    vectors = _vectors(0, 3)
    per_tensor = merge_state_dicts(vectors, "ties", 1.0, {"density": 0.2, "trim": "tensor"})
    reference = _reference_ties(vectors, 0.2, 1.0)
    assert any(not np.allclose(per_tensor[n].double().numpy(), reference[n], atol=1e-6)
               for n in reference)


def test_whole_vector_ties_kept_count():
    # Exactly ⌊density · d⌋ entries survive the trim of one vector (tie-free data).
    vector = _vectors(5, 1)
    width = sum(int(np.prod(s)) for s in SHAPES.values())
    merged = merge_state_dicts(vector, "ties", 1.0, {"density": 0.25})
    assert sum(int((t != 0).sum()) for t in merged.values()) == int(0.25 * width)


# ---------------------------------------------------------------- per-vector density


@pytest.mark.parametrize(("seed", "densities", "lam"), [
    (0, [0.1, 0.5, 0.3], 1.0), (1, [1.0, 0.2], 0.8), (2, [0.05, 0.6, 0.25, 0.9], 1.2)])
def test_per_vector_density_equals_the_reference(seed, densities, lam):
    """mergekit's per-model density: vector t keeps its own top-⌊d_t · width⌋ entries."""
    vectors = _vectors(seed, len(densities))
    ours = merge_state_dicts(vectors, "ties", lam, {"density": 0.2},
                             vector_params=[{"density": d} for d in densities])
    reference = _reference_ties(vectors, densities, lam)
    for name, expected in reference.items():
        np.testing.assert_allclose(ours[name].double().numpy(), expected, rtol=1e-6, atol=1e-6)
    # Magnitude (trim, then a weighted sum), recomputed from the same trimmed rows.
    names = sorted(vectors[0])
    rows = np.stack([np.concatenate([v[n].double().numpy().reshape(-1) for n in names])
                     for v in vectors])
    kept = np.zeros_like(rows)
    for t, d in enumerate(densities):
        top = np.argsort(-np.abs(rows[t]), kind="stable")[:int(d * rows.shape[1])]
        kept[t, top] = rows[t, top]
    summed = lam * kept.sum(axis=0)
    magnitude = merge_state_dicts(vectors, "magnitude", lam,
                                  vector_params=[{"density": d} for d in densities])
    start = 0
    for name in names:
        size = int(np.prod(SHAPES[name]))
        np.testing.assert_allclose(magnitude[name].double().numpy(),
                                   summed[start:start + size].reshape(SHAPES[name]),
                                   rtol=1e-6, atol=1e-6)
        start += size


def test_per_tensor_trim_with_per_vector_density():
    vectors = _vectors(4, 2)
    densities = [0.25, 0.75]
    ours = merge_state_dicts(vectors, "ties", 1.0, {"trim": "tensor"},
                             vector_params=[{"density": d} for d in densities])
    for name in SHAPES:
        rows = np.stack([v[name].double().numpy().reshape(-1) for v in vectors])
        trimmed = np.zeros_like(rows)
        for t, d in enumerate(densities):
            top = np.argsort(-np.abs(rows[t]), kind="stable")[:int(d * rows.shape[1])]
            trimmed[t, top] = rows[t, top]
        elected = np.sign(trimmed.sum(axis=0))
        agree = (trimmed != 0) & (np.sign(trimmed) == elected)
        expected = (trimmed * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
        np.testing.assert_allclose(ours[name].double().numpy().reshape(-1), expected,
                                   rtol=1e-6, atol=1e-6)
