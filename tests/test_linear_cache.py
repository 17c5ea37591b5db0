"""Linearized vectors at many coefficients from cached encoder parts: the same features,
accuracies and disentanglement maps as one evaluation per coefficient, at a cost that does not
grow with the grid."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, count_calls
from tvtool.device import autocast
from tvtool.errors import UsageError
from tvtool.evaluate import (
    DisentanglementConfig,
    EvalConfig,
    EvalSettings,
    disentanglement,
    evaluate,
    open_eval_data,
    open_eval_model,
)
from tvtool.evaluate.batches import batches
from tvtool.evaluate.linear_cache import LinearizedFeatures
from tvtool.workflows.evaluator import Evaluator

D1, D2 = "synthetic:shape", "synthetic:color"
LIMIT = 24
BATCH = 10  # 24 examples: 3 batches per split, the last one partial
COEFS = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (-0.5, 0.7, 1.3), (2.0, -1.0, 0.25), (-1.5,),
         (0.0, -2.0, 0.0)]


@pytest.fixture(scope="module")
def linear_vectors(tiny_state, tmp_path_factory):
    """Three linearized task vectors (seeded noise on the image encoder, large enough that
    predictions move on the grid); the third changes one tensor only."""
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode

    root = tmp_path_factory.mktemp("linear-cache")
    paths = []
    for index in range(3):
        gen = torch.Generator().manual_seed(100 + index)
        names = [k for k, v in tiny_state.items() if k.startswith("visual.")
                 and v.is_floating_point()]
        if index == 2:
            names = ["visual.proj"]
        tensors = {k: 0.3 * torch.randn(tiny_state[k].shape, generator=gen) for k in names}
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=Mode.LINEAR,
                        linearized=True, dataset=f"task{index}")
        path = root / f"lin{index}.safetensors"
        write_tensors(str(path), tensors, meta.to_header())
        paths.append(str(path))
    return paths


def _per_point_features(model, data, coefs, precision="fp32"):
    model.set_coefficients(list(coefs))
    out = []
    with torch.no_grad():
        for images, _ in batches(data, BATCH, materialize=True):
            with autocast(model.device, precision):
                out.append(model.image_features(images))
    return torch.cat(out)


def test_features_equal_per_point_evaluation(files, linear_vectors):
    with open_eval_model(files["base"], linear_vectors) as model:
        assert model.linearized
        data = open_eval_data(D1, "val", model.bundle.preprocess_eval, limit=LIMIT)
        cached = LinearizedFeatures(model, batch_size=BATCH)
        for coefs in COEFS:
            expected = _per_point_features(model, data, coefs)
            got = cached.features(data, coefs)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # The map is not trivially constant: the coefficients move the features.
        assert (cached.features(data, (2.0, -1.0, 0.25)) -
                cached.features(data, (0.0, 0.0, 0.0))).abs().max() > 1e-2
        # The same count check as the per-point path.
        with pytest.raises(UsageError, match="coefficients"):
            cached.features(data, (1.0, 2.0))


def test_bf16_autocast_matches_per_point_path(files, linear_vectors):
    with open_eval_model(files["base"], linear_vectors) as model:
        data = open_eval_data(D1, "val", model.bundle.preprocess_eval, limit=LIMIT)
        bf16 = LinearizedFeatures(model, batch_size=BATCH, precision="bf16")
        fp32 = LinearizedFeatures(model, batch_size=BATCH, precision="fp32")
        coefs = (-0.5, 0.7, 1.3)
        expected = _per_point_features(model, data, coefs, precision="bf16")
        got = bf16.features(data, coefs)
        exact = fp32.features(data, coefs)
    # Both bf16 paths round at bf16 resolution (2^-8 relative), in different places; the
    # cached one is therefore about as close to the fp32 features as the per-point one.
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-2)
    assert (got - exact).abs().max() > 1e-5  # the encoder passes did run under autocast
    assert (got - exact).abs().max() <= 2 * (expected - exact).abs().max() + 1e-3


def _counting(monkeypatch):
    """Count batches through the image encoder (the linearized forward, either path)."""
    import tvtool.linearize as linearize

    return count_calls(monkeypatch, linearize, "vit_dual_forward")


def _settings(files):
    # Heads come from the session's throw-away cache (conftest): built once for all tests.
    return EvalSettings(base=files["base"], batch_size=BATCH, device="cpu", limit=LIMIT)


def test_evaluator_accuracies_equal_per_point(files, linear_vectors):
    settings = _settings(files)
    with Evaluator(settings, linear_vectors, [D1, D2], splits=("val",)) as fast, \
            Evaluator(settings, linear_vectors, [D1, D2], splits=("val",),
                      linear_cache=False) as slow:
        assert fast.linear is not None and slow.linear is None
        results = []
        for coefs in COEFS:
            got = fast.accuracies(coefs, "val")
            assert got == slow.accuracies(coefs, "val")
            results.append(got)
        assert fast.accuracies((1.0, 0.5, -1.0), "val", [D2]) == \
            slow.accuracies((1.0, 0.5, -1.0), "val", [D2])
    assert len({tuple(r.values()) for r in results}) > 1  # accuracies do move on the grid


@pytest.mark.parametrize("grid_size", [3, 11])
def test_evaluator_passes_do_not_grow_with_grid(files, linear_vectors, monkeypatch, grid_size):
    calls = _counting(monkeypatch)
    grid = [-1.0 + 2.0 * i / (grid_size - 1) for i in range(grid_size)]
    with Evaluator(_settings(files), linear_vectors, [D1, D2], splits=("val",)) as evaluator:
        setup = calls["n"]
        for alpha in grid:
            evaluator.accuracies([alpha, 0.5 * alpha, -alpha], "val")
        used = calls["n"] - setup
        assert evaluator.linear is not None
        # The first point has every coefficient non-zero: f0 comes with the first JVP.
        assert (evaluator.linear.primal_passes, evaluator.linear.tangent_passes) == (0, 18)
    # Per dataset (3 batches each): one JVP per vector, whatever the grid.
    assert used == 2 * 3 * 3


def test_per_point_passes_grow_with_grid(files, linear_vectors, monkeypatch):
    calls = _counting(monkeypatch)
    with Evaluator(_settings(files), linear_vectors, [D1], splits=("val",),
                   linear_cache=False) as evaluator:
        setup = calls["n"]
        for alpha in (0.5, 1.0, 1.5, 2.0):
            evaluator.accuracies([alpha], "val")
        assert calls["n"] - setup == 4 * 3


def test_plain_vectors_keep_the_per_point_path(files):
    with Evaluator(_settings(files), [files["tv1"]], [D1], splits=("val",)) as evaluator:
        assert evaluator.linear is None
        accuracy = evaluator.accuracies([0.5], "val")[D1]
    # The same model through `tvtool eval`'s own entry point.
    report = evaluate(EvalConfig(_settings(files), datasets=(D1,), vectors=(files["tv1"],),
                                 coefs=(0.5,), split="val"))
    assert accuracy == report.results[0].accuracy


def test_linearized_features_refuse_a_plain_model(files):
    with open_eval_model(files["base"], [files["tv1"]]) as model, \
            pytest.raises(ValueError, match="linearized"):
        LinearizedFeatures(model, batch_size=BATCH)


def _map(files, vectors, alphas, **kwargs):
    config = DisentanglementConfig(_settings(files), vectors=(vectors[0], vectors[1]),
                                   datasets=(D1, D2), alphas=alphas)
    return disentanglement(config, **kwargs)


def test_disentanglement_map_equals_per_point(files, linear_vectors):
    alphas = (-2.0, -0.5, 0.0, 1.0, 2.5)
    fast = _map(files, linear_vectors, alphas)
    slow = _map(files, linear_vectors, alphas, linear_cache=False)
    assert fast.model["evaluated_as"] == "linearized"
    assert fast.error == slow.error and fast.per_task == slow.per_task
    assert max(max(row) for row in fast.error) > 0  # the map is not trivially zero


@pytest.mark.parametrize("alphas", [(-1.0, 1.0), (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)])
def test_disentanglement_passes_do_not_grow_with_grid(files, linear_vectors, monkeypatch,
                                                      alphas):
    calls = _counting(monkeypatch)
    _map(files, linear_vectors, alphas)
    # Per dataset (3 batches): one pass gives f0 and j1, a second j2; heads use no encoder.
    assert calls["n"] == 2 * 2 * 3
