"""Weight disentanglement error: definition, grid parsing, CLI (JSON + PNG)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tvtool.errors import UsageError
from tvtool.evaluate import (
    DEFAULT_GRID,
    GRID_LIMITS,
    DisentanglementConfig,
    EvalSettings,
    clear_memory_cache,
    disentanglement,
    error_at,
    open_eval_data,
    open_eval_model,
    predictions,
    render_heatmap,
)
from tvtool.evaluate.accuracy import build_heads
from tvtool.grid import parse_grid

D1, D2 = "synthetic:shape", "synthetic:color"
LIMIT = 24


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(root))
    clear_memory_cache()
    yield root
    clear_memory_cache()


@pytest.fixture(scope="module")
def big_vectors(files, tmp_path_factory):
    """tv1/tv2 scaled up so that predictions actually change on the grid."""
    from tests.conftest import load
    from tvtool.io import open_tensors, write_tensors

    root = tmp_path_factory.mktemp("big")
    out = []
    for index in (1, 2):
        source = open_tensors(files[f"tv{index}"])
        metadata = dict(source.metadata)
        source.close()
        path = root / f"big{index}.safetensors"
        write_tensors(str(path), {k: 40 * v for k, v in load(files[f"tv{index}"]).items()},
                      metadata)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def report(files, big_vectors):
    clear_memory_cache()
    settings = EvalSettings(base=files["base"], limit=LIMIT, device="cpu", cache_heads=False)
    config = DisentanglementConfig(settings, vectors=(big_vectors[0], big_vectors[1]),
                                   datasets=(D1, D2), alphas=parse_grid("-1:1:1", **GRID_LIMITS))
    return disentanglement(config)


def test_error_map_shape_and_axes(report):
    assert report.alphas == [-1.0, 0.0, 1.0]
    error = torch.tensor(report.error)
    terms = [torch.tensor(report.per_task[D1]), torch.tensor(report.per_task[D2])]
    assert error.shape == (3, 3)
    torch.testing.assert_close(error, terms[0] + terms[1])
    assert bool(((error >= 0) & (error <= 2)).all())
    assert error_at(report, 0.0, 0.0) == 0.0
    # α2 = 0: the joint model is the single-task model of τ1, so task 1's term vanishes;
    # likewise α1 = 0 for task 2.
    assert terms[0][:, 1].abs().max() == 0 and terms[1][1, :].abs().max() == 0
    assert error.max() > 0  # scaled vectors do interfere somewhere on the grid


def test_error_matches_brute_force_definition(files, big_vectors, report):
    """ξ(α1, α2) = Σ_t mean_x 1[pred(θ0+α1τ1+α2τ2) ≠ pred(θ0+α_tτ_t)] with task-t heads."""
    with open_eval_model(files["base"], big_vectors) as model:
        datas = [open_eval_data(name, "test", model.bundle.preprocess_eval, limit=LIMIT)
                 for name in (D1, D2)]
        heads = build_heads(model, datas, device=model.device, cache=False)

        def preds(coefs, task):
            model.set_coefficients(coefs)
            return predictions(model, datas[task], heads[datas[task].name], 7)[0]

        # Every point of the grid, the axes included: on an axis one term vanishes by
        # definition, and the other must still be measured (a shortcut there went unnoticed).
        off_axis_terms = 0.0
        for a1, a2 in itertools.product(report.alphas, report.alphas):
            terms = [float((preds([a1, a2], t) != preds([a1 if t == 0 else 0.0,
                                                         a2 if t == 1 else 0.0], t))
                           .double().mean()) for t in (0, 1)]
            assert error_at(report, a1, a2) == pytest.approx(sum(terms)), (a1, a2)
            assert report.per_task[D1][report.alphas.index(a1)][report.alphas.index(a2)] \
                == pytest.approx(terms[0]), (a1, a2)
            if (a1 == 0) != (a2 == 0):
                off_axis_terms += sum(terms)
        assert off_axis_terms > 0, "the axes must carry a non-zero term for this test to bite"


def test_report_json_is_self_describing(report):
    document = report.as_json()
    json.dumps(document)
    assert document["report"] == "disentanglement"
    assert document["datasets"] == [D1, D2]
    assert document["axes"]["rows"].startswith("alpha1")
    assert [s["examples"] for s in document["splits"]] == [LIMIT, LIMIT]


def test_heatmap_is_png(report):
    data = render_heatmap(report)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# A:B:C is START:STOP:STEP here as in merge searches (it meant START:STOP:NUM before).
@pytest.mark.parametrize("text, expected", [
    (DEFAULT_GRID, tuple(-3 + 0.5 * i for i in range(13))),
    ("0,0.5,1", (0.0, 0.5, 1.0)),
    ("-1:1:1", (-1.0, 0.0, 1.0)),
])
def test_parse_grid(text, expected):
    assert parse_grid(text, **GRID_LIMITS) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "1:0:3", "1:1:1", "0:1", "a,b", "0,0", "0:1:500",
                                  "-3:3:0.01", "nan,1"])
def test_parse_grid_refuses(text):
    with pytest.raises(UsageError):
        parse_grid(text, **GRID_LIMITS)


@given(st.integers(-5, 5), st.integers(1, 6), st.integers(2, 41))
def test_parse_grid_endpoints_and_spacing(start, width, num):
    values = parse_grid(f"{start}:{start + width}:{width / (num - 1)!r}", **GRID_LIMITS)
    assert len(values) == num and values[0] == start and values[-1] == start + width
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert all(math.isclose(s, width / (num - 1), abs_tol=1e-9) for s in steps)


def test_cli_writes_json_and_png(cli, files, big_vectors, tmp_path):
    out, png = tmp_path / "map.json", tmp_path / "map.png"
    result = cli(["eval", "disentanglement", "--base", files["base"], *big_vectors,
                  "--dataset", D1, "--dataset", D2, "--coef-grid", "-1:1:1", "--limit", "12",
                  "--device", "cpu", "-o", str(out), "--png", str(png)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    document = json.loads(out.read_text())
    assert document["alphas"] == [-1.0, 0.0, 1.0] and len(document["error"]) == 3
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "mean error within 1" in result.stderr


def test_cli_without_output_prints_the_map(cli, files, big_vectors):
    result = cli(["eval", "disentanglement", *big_vectors, "--base", files["base"], "-d", D1,
                  "-d", D2, "--coef-grid", "0,1", "--limit", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["alphas"] == [0.0, 1.0]


@pytest.mark.parametrize("extra, message", [
    (["--coef-grid", "3:1:4"], "malformed grid"),
    (["-d", "synthetic:size"], "exactly two"),
])
def test_cli_bad_input_writes_nothing(cli, files, big_vectors, tmp_path, extra, message):
    out = tmp_path / "map.json"
    args = ["eval", "disentanglement", "--base", files["base"], *big_vectors, "-d", D1, "-d",
            D2, "--limit", "8", "--device", "cpu", "-o", str(out), *extra]
    result = cli(args)
    assert result.exit_code == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changes, message", [
    ({"datasets": (D1, D1)}, "must differ"),
    ({"vectors": ("a",)}, "exactly two"),
    ({"alphas": (1.0,)}, "two distinct"),
    ({"alphas": (1.0, 1.0)}, "two distinct"),
])
def test_config_is_checked_on_construction(changes, message):
    with pytest.raises(UsageError, match=message):
        DisentanglementConfig(**{"settings": EvalSettings(base="unused"), "vectors": ("a", "b"),
                                 "datasets": (D1, D2), **changes})


def test_report_settings_keep_their_order():
    config = DisentanglementConfig(EvalSettings(base="b", workers=2), vectors=("a", "b"),
                                   datasets=(D1, D2), alphas=(0.0, 1.0))
    assert list(config.arguments()) == [
        "base", "vectors", "datasets", "alphas", "split", "data_root", "batch_size", "device",
        "precision", "limit", "seed", "workers", "allow_base_mismatch",
        "approximate_linearized", "cache_heads"]
    assert config.arguments()["alphas"] == [0.0, 1.0]
    assert config.arguments()["workers"] == 2
