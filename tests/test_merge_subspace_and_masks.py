"""Iso-C, Iso-CTS, consensus merging and Model Breadcrumbs against their reference code.

Each reference is re-derived here in plain float64 torch, step by step as the authors' code
computes it (danielm1405/iso-merging ``src/utils/iso.py``; nik-dim/tall_masks
``src/utils/tallmask_utils.py`` and ``src/eval/aggregation.py``; rezazzr/breadcrumbs
``src/task_vectors.py``), and compared with tvtool's merge of the same float32 vectors.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load
from tvtool.errors import InvalidInputError, UsageError
from tvtool.merge import METHODS, get_method, merge_state_dicts
from tvtool.merge.iso_cts import rank_split

# ---------------------------------------------------------------- re-derived references


def ref_svd_isotropic(matrix: torch.Tensor) -> torch.Tensor:
    u, s, v = torch.linalg.svd(matrix, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))


def ref_iso_c(vectors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """iso.py ``iso_c``: mean of the vectors; 2-D tensors (not text_projection) re-summed,
    decomposed, their singular values replaced by their mean."""
    out = {}
    for key in vectors[0]:
        tvs = [v[key].double() for v in vectors]
        merged = sum(tvs) / len(tvs)
        if merged.dim() == 2 and "text_projection" not in key:
            merged = ref_svd_isotropic(merged * len(tvs))
        out[key] = merged
    return out


def ref_iso_cts(vectors: list[dict[str, torch.Tensor]], fraction: float
                ) -> dict[str, torch.Tensor]:
    """iso.py ``iso_cts``, transcribed step by step (full SVDs, full polar factors)."""
    out = {}
    tasks = len(vectors)
    for key in vectors[0]:
        tvs = [v[key].double() for v in vectors]
        shape = tvs[0].shape
        if len(shape) != 2 or "text_projection" in key:
            out[key] = sum(tvs) / tasks
            continue
        combined = sum(tvs)
        common = int(min(shape) * fraction)
        specific_total = round((min(shape) - common) / tasks) * tasks
        common = min(shape) - specific_total
        u, s, v = torch.linalg.svd(combined, full_matrices=False)
        cu, cs, cv = u[:, :common], s[:common], v[:common, :]
        per_task = int((min(shape) - common) / tasks)
        space_u = space_s = space_v = None
        for i, w in enumerate(tvs):
            w_ts = w - cu @ cu.T @ w
            ut, st, vt = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                space_u, space_s, space_v = (torch.zeros_like(ut), torch.zeros_like(st),
                                             torch.zeros_like(vt))
            block = slice(i * per_task, (i + 1) * per_task)
            space_u[:, block] = ut[:, :per_task]
            space_s[block] = st[:per_task]
            space_v[block, :] = vt[:per_task, :]
        rest = slice(tasks * per_task, tasks * per_task + common)
        space_u[:, rest], space_s[rest], space_v[rest, :] = cu, cs, cv
        uu, _, vu = torch.linalg.svd(space_u, full_matrices=False)
        uv, _, vv = torch.linalg.svd(space_v, full_matrices=False)
        flat = torch.ones_like(space_s) * space_s.mean()
        out[key] = torch.linalg.multi_dot((uu @ vu, torch.diag(flat), uv @ vv))
    return out


def ref_ties_dis_sum(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """ties_utils ``ties_merging(reset_thresh=density, merge_func='dis-sum')`` over flat rows,
    keeping floor(density·d) entries per vector (tvtool's documented trim count)."""
    keep = int(tvs.shape[1] * density)
    kth = tvs.abs().sort(dim=1, descending=True).values[:, keep - 1:keep]
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    return (trimmed * agree).sum(dim=0)


def ref_consensus(vectors, mask_lambda: float, k: int, ties_density: float | None = None):
    """tallmask_utils ``generate_task_masks`` + ``construct_consensus_mask``, then the masked
    multi-task vector (aggregation.py), over the flat concatenation of all tensors."""
    keys = list(vectors[0])
    flat = torch.stack([torch.cat([v[key].double().reshape(-1) for key in keys])
                        for v in vectors])
    multi = flat.sum(0) if ties_density is None else ref_ties_dis_sum(flat, ties_density)
    masks = flat.abs() > (multi - flat).abs() * mask_lambda
    merged = multi * (masks.float().sum(0) >= k)
    out, start = {}, 0
    for key in keys:
        size = vectors[0][key].numel()
        out[key] = merged[start:start + size].reshape(vectors[0][key].shape)
        start += size
    return out


def ref_breadcrumbs(tensor: torch.Tensor, keep: float, remove: float) -> torch.Tensor:
    """TaskVectorMiddleKeep: per last-dimension row, zero the int(n·γ) largest magnitudes,
    then keep the int(n·β) largest of the rest -- written here with ranks, not topk."""
    if tensor.dim() == 0:
        return tensor.double()
    rows = tensor.double().reshape(-1, tensor.shape[-1])
    width = rows.shape[1]
    removed, kept = int(width * remove), int(width * keep)
    rank = rows.abs().argsort(dim=1, descending=True).argsort(dim=1)
    survive = (rank >= removed) & (rank < removed + kept)
    return (rows * survive).reshape(tensor.shape)


def vectors_of(seed: int, count: int, shapes: dict[str, tuple[int, ...]]):
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
            for _ in range(count)]


def assert_close(merged, reference, scale=1.0, atol=1e-4):
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key].double(), scale * reference[key], rtol=1e-4,
                                   atol=atol, msg=key)


SHAPES = {"visual.tall": (24, 10), "visual.wide": (9, 26), "visual.square": (16, 16),
          "visual.bias": (16,), "visual.conv": (4, 3, 2, 2), "text_projection": (12, 8),
          "visual.scalar": ()}


# ---------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("count", [1, 3, 8])
def test_iso_c_is_the_reference(count):
    vectors = vectors_of(count, count, SHAPES)
    for alpha in (1.0, 0.7, -1.3):
        assert_close(merge_state_dicts(vectors, "iso-c", alpha), ref_iso_c(vectors), alpha)


def test_iso_c_flattens_the_spectrum_of_the_weighted_sum():
    # Per-vector coefficients weight the vectors before the sum (tvtool's generalisation of the
    # reference's single α): Iso-C of the vectors α_i τ_i.
    vectors = vectors_of(5, 3, {"visual.w": (20, 12), "visual.b": (12,)})
    weights = [0.5, -1.0, 2.0]
    scaled = [{k: w * t for k, t in v.items()} for v, w in zip(vectors, weights, strict=True)]
    merged = merge_state_dicts(vectors, "iso-c", weights)
    assert_close(merged, ref_iso_c(scaled))
    singular = torch.linalg.svdvals(merged["visual.w"].double())
    torch.testing.assert_close(singular, torch.full_like(singular, float(singular.mean())),
                               rtol=1e-5, atol=0)


# ---------------------------------------------------------------- Iso-CTS


def test_rank_split_is_the_references():
    # Hand-evaluated from iso.py's three lines (int, round to a multiple of T, the rest).
    assert rank_split(768, 8, 0.8) == (616, 19)   # ViT-B/32, 8 tasks
    assert rank_split(768, 14, 0.8) == (614, 11)
    assert rank_split(768, 20, 0.8) == (608, 8)
    assert rank_split(512, 8, 0.8) == (408, 13)   # visual.proj
    assert rank_split(10, 4, 0.8) == (10, 0)      # round(0.5) == 0: no task-specific space
    assert rank_split(30, 4, 0.8) == (22, 2)      # round(1.5) == 2
    assert rank_split(16, 3, 0.0) == (1, 5)
    assert rank_split(16, 3, 1.0) == (16, 0)


@pytest.mark.parametrize("count,fraction", [(3, 0.8), (4, 0.5), (2, 0.3), (8, 0.8), (1, 0.5)])
def test_iso_cts_is_the_reference(count, fraction):
    vectors = vectors_of(10 + count, count, SHAPES)
    params = {"common_space_fraction": fraction}
    reference = ref_iso_cts(vectors, fraction)
    # float32 inputs against a float64 reference: the polar factors of ill-conditioned
    # column/row sets amplify rounding (the reference's own float32 run is off by as much).
    assert_close(merge_state_dicts(vectors, "iso-cts", 1.0, params), reference, atol=5e-4)
    assert_close(merge_state_dicts(vectors, "iso-cts", -0.6, params), reference, -0.6,
                 atol=5e-4)
    # In float64 the two computations agree to rounding.
    wide = [{k: t.double() for k, t in v.items()} for v in vectors]
    assert_close(merge_state_dicts(wide, "iso-cts", 1.0, params), reference, atol=1e-10)


def test_iso_cts_weights_each_vector_before_the_decomposition():
    vectors = vectors_of(3, 3, {"visual.tall": (30, 12), "visual.wide": (12, 30)})
    weights = [1.5, 0.25, -0.75]
    scaled = [{k: w * t for k, t in v.items()} for v, w in zip(vectors, weights, strict=True)]
    assert_close(merge_state_dicts(vectors, "iso-cts", weights,
                                   {"common_space_fraction": 0.5}),
                 ref_iso_cts(scaled, 0.5))


def test_iso_cts_without_task_space_is_iso_c():
    vectors = vectors_of(4, 4, {"visual.w": (10, 10)})
    merged = merge_state_dicts(vectors, "iso-cts", 1.0, {"common_space_fraction": 1.0})
    assert_close(merged, ref_iso_c(vectors))


def test_iso_methods_pass_float64_and_keep_half_precision():
    vectors = vectors_of(6, 3, {"visual.w": (12, 8)})
    wide = [{k: t.double() for k, t in v.items()} for v in vectors]
    for method, reference in (("iso-c", ref_iso_c(vectors)),
                              ("iso-cts", ref_iso_cts(vectors, 0.8))):
        merged = merge_state_dicts(wide, method, 1.0)
        assert merged["visual.w"].dtype == torch.float64
        torch.testing.assert_close(merged["visual.w"], reference["visual.w"], rtol=1e-10,
                                   atol=1e-10)
        half = merge_state_dicts([{k: t.half() for k, t in v.items()} for v in vectors],
                                 method, 1.0)
        assert half["visual.w"].dtype == torch.float16


def test_iso_methods_blame_a_non_finite_input():
    vectors = vectors_of(7, 2, {"visual.w": (6, 5)})
    vectors[1]["visual.w"][2, 3] = float("nan")
    for method in ("iso-c", "iso-cts"):
        with pytest.raises(InvalidInputError, match="vector 1"):
            merge_state_dicts(vectors, method, 1.0)


# ---------------------------------------------------------------- consensus


@pytest.mark.parametrize("mask_lambda,k", [(0.4, 2), (0.2, 1), (0.6, 3), (0.4, 0), (1.0, 5)])
def test_consensus_is_the_reference(mask_lambda, k):
    vectors = vectors_of(20 + k, 4, {"a": (30, 7), "b": (50,)})
    reference = ref_consensus(vectors, mask_lambda, k)
    params = {"mask_lambda": mask_lambda, "k": k}
    for alpha in (1.0, 0.3):
        assert_close(merge_state_dicts(vectors, "consensus", alpha, params), reference, alpha,
                     atol=1e-5)


def test_consensus_ties_is_the_reference_with_a_global_trim():
    vectors = vectors_of(31, 5, {"a": (40, 9), "b": (64,)})
    merged = merge_state_dicts(vectors, "consensus", 0.5,
                               {"combine": "ties", "density": 0.3, "mask_lambda": 0.5})
    assert_close(merged, ref_consensus(vectors, 0.5, 2, ties_density=0.3), 0.5, atol=1e-5)


def test_consensus_masks_use_unweighted_vectors():
    vectors = vectors_of(8, 3, {"a": (200,)})
    weights = [0.2, 1.0, -0.5]
    keep = ref_consensus(vectors, 0.4, 2)["a"] != 0
    weighted_sum = sum(w * v["a"].double() for v, w in zip(vectors, weights, strict=True))
    merged = merge_state_dicts(vectors, "consensus", weights)
    torch.testing.assert_close(merged["a"].double(), weighted_sum * keep, rtol=1e-5, atol=1e-6)
    assert 0 < int(keep.sum()) < 200


def test_consensus_with_k_zero_is_task_arithmetic_and_above_n_is_zero():
    vectors = vectors_of(9, 3, {"a": (5, 4)})
    assert_close(merge_state_dicts(vectors, "consensus", 0.5, {"k": 0}),
                 {"a": 0.5 * sum(v["a"].double() for v in vectors)})
    assert not merge_state_dicts(vectors, "consensus", 1.0, {"k": 4})["a"].any()


# ---------------------------------------------------------------- Breadcrumbs


@pytest.mark.parametrize("keep,remove", [(0.15, 0.006), (0.5, 0.1), (0.3, 0.0), (0.9, 0.2),
                                         (1.0, 0.0), (0.0, 0.1)])
def test_breadcrumbs_is_the_reference_per_row(keep, remove):
    vectors = vectors_of(40, 3, {"w": (12, 300), "b": (300,), "c": (2, 3, 4, 25), "s": ()})
    weights = [0.4, -1.0, 0.7]
    merged = merge_state_dicts(vectors, "breadcrumbs", weights,
                               {"density": keep, "gamma": remove})
    reference = {key: sum(w * ref_breadcrumbs(v[key], keep, remove)
                          for v, w in zip(vectors, weights, strict=True)) for key in vectors[0]}
    assert_close(merged, reference, atol=1e-6)


def test_breadcrumbs_default_drops_outliers_and_small_entries_of_each_row():
    row = torch.arange(1, 1001, dtype=torch.float32).reshape(1, 1000)  # magnitudes 1..1000
    kept = merge_state_dicts([{"w": row}], "breadcrumbs")["w"]
    # γ = 0.006 removes the 6 largest (995..1000), β = 0.15 keeps the next 150 (845..994).
    assert torch.equal(kept.nonzero()[:, 1] + 1, torch.arange(845, 995))


def test_breadcrumbs_tensor_scope_ranks_the_whole_tensor():
    vectors = vectors_of(41, 2, {"w": (10, 40)})
    merged = merge_state_dicts(vectors, "breadcrumbs", 1.0,
                               {"density": 0.2, "gamma": 0.05, "scope": "tensor"})
    reference = sum(ref_breadcrumbs(v["w"].reshape(1, -1), 0.2, 0.05).reshape(10, 40)
                    for v in vectors)
    assert_close(merged, {"w": reference}, atol=1e-6)


# ---------------------------------------------------------------- declarations


def test_new_methods_are_registered_with_their_reference_grids():
    from tvtool.grid import parse_grid
    from tvtool.workflows.merge_search import default_grid_text

    for name in ("iso-c", "iso-cts"):
        # iso-merging src/eval/eval.py: np.linspace(0.0, 3.0, 31)[1:]
        grid = parse_grid(default_grid_text(name))
        assert grid == tuple(round(0.1 * i, 10) for i in range(1, 31))
        assert METHODS[name].lora_refusal
    for name in ("consensus", "breadcrumbs"):
        grid = parse_grid(default_grid_text(name))
        assert grid[0] == 0.0 and grid[-1] == 1.0
        assert METHODS[name].lora_refusal is None
    assert METHODS["consensus"].global_density(get_method("consensus").make_params(
        {"combine": "ties"})) == 0.2
    assert METHODS["consensus"].global_density(get_method("consensus").make_params({})) is None


@pytest.mark.parametrize("method,params,words", [
    ("iso-cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("consensus", {"k": -1}, "k must"),
    ("consensus", {"k": 1.5}, "k must"),
    ("consensus", {"mask_lambda": -0.1}, "mask_lambda"),
    ("consensus", {"mask_lambda": float("nan")}, "mask_lambda"),
    ("consensus", {"combine": "mean"}, "combine"),
    ("breadcrumbs", {"gamma": 2}, "gamma"),
    ("breadcrumbs", {"scope": "layer"}, "scope"),
    ("iso-c", {"density": 0.2}, "no parameter"),
])
def test_bad_parameters_are_usage_errors(method, params, words):
    with pytest.raises(UsageError, match=words):
        get_method(method).make_params(params)


# ---------------------------------------------------------------- command line


def _tiny_vectors(files):
    return [files["tv1"], files["tv2"]]


@pytest.mark.parametrize("method,flags,params", [
    ("iso-c", [], {}),
    ("iso-cts", ["-p", "common_space_fraction=0.5"], {"common_space_fraction": 0.5}),
    ("consensus", ["-p", "k=1", "-p", "mask_lambda=0.3"], {"k": 1, "mask_lambda": 0.3}),
    ("breadcrumbs", ["--density", "0.3", "-p", "gamma=0.01"], {"density": 0.3, "gamma": 0.01}),
])
def test_cli_and_config_merge_the_library_result(cli, files, tmp_path, method, flags, params):
    out = tmp_path / "m.safetensors"
    result = cli(["merge", *_tiny_vectors(files), "-m", method, *flags, "--coef", "0.7",
                  "-o", str(out), "--save-config", str(tmp_path / "m.yaml")])
    assert result.exit_code == 0, result.stderr
    expected = merge_state_dicts([load(p) for p in _tiny_vectors(files)], method, 0.7, params)
    merged = load(str(out))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["tvtool.merge_method"] == method
    recorded = json.loads(meta["tvtool.merge_params"])
    assert recorded == {**get_method(method).make_params({}).__dict__, **params}
    again = tmp_path / "again.safetensors"
    from_config = cli(["merge", "--config", str(tmp_path / "m.yaml"), "-o", str(again)])
    assert from_config.exit_code == 0, from_config.stderr
    for name, tensor in load(str(again)).items():
        assert torch.equal(tensor, merged[name])


def test_iso_methods_refuse_lora_vectors_in_one_line(cli, tmp_path):
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode

    gen = torch.Generator().manual_seed(0)
    paths = []
    for index in range(2):
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture="tvtool-tiny",
                        base_fingerprint="sha256:base", mode=Mode.LORA, dataset=f"d{index}",
                        extra={"lora_alpha": "4.0", "lora_rank": "2"})
        path = tmp_path / f"lora{index}.safetensors"
        write_tensors(str(path), {"visual.a.lora_A": torch.randn(2, 5, generator=gen),
                                  "visual.a.lora_B": torch.randn(6, 2, generator=gen)},
                      meta.to_header())
        paths.append(str(path))
    out = tmp_path / "m.safetensors"
    for method in ("iso-c", "iso-cts"):
        result = cli(["merge", *paths, "-m", method, "-o", str(out)])
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1
        assert "does not merge LoRA vectors" in result.stderr and "rank" in result.stderr
        assert not out.exists()
    for method in ("consensus", "breadcrumbs"):
        assert cli(["merge", *paths, "-m", method, "-o", str(out)]).exit_code == 0


def test_merge_help_lists_every_methods_parameters(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    text = " ".join(cli(["merge", "--help"]).stdout.replace("│", " ").split())
    assert "iso-cts: common_space_fraction=0.8" in text
    assert "consensus: k=2, mask_lambda=0.4, combine=sum, density=0.2, trim=global" in text
    assert "breadcrumbs: density=0.15, gamma=0.006, scope=row" in text
    assert "iso-c 0.1:3:0.1" in text


@pytest.mark.parametrize("method", ["iso-c", "iso-cts", "consensus", "breadcrumbs"])
def test_search_coef_runs_each_new_method(cli, files, tmp_path, method):
    from tests.test_merge_search import EVAL

    out = tmp_path / "s.safetensors"
    result = cli(["merge", *_tiny_vectors(files), "-m", method, "--search-coef", "--base",
                  files["base"], "-d", "synthetic:shape", "-d", "synthetic:color",
                  "--coef-grid", "0.5,1", *EVAL, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == method and report["best_coef"] in (0.5, 1.0)
    plain = tmp_path / "plain.safetensors"
    assert cli(["merge", *_tiny_vectors(files), "-m", method, "--coef",
                str(report["best_coef"]), "-o", str(plain)]).exit_code == 0
    for name, tensor in load(str(plain)).items():
        assert torch.equal(load(str(out))[name], tensor)


@pytest.mark.parametrize("method", ["iso-c", "iso-cts", "consensus", "breadcrumbs"])
def test_linearized_vectors_merge_into_a_linearized_vector(cli, tmp_path, method):
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode

    paths, vectors = [], vectors_of(50, 3, {"visual.w": (12, 9), "visual.b": (9,)})
    for index, tensors in enumerate(vectors):
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture="tvtool-tiny",
                        base_fingerprint="sha256:base", mode=Mode.LINEAR, linearized=True,
                        dataset=f"d{index}")
        paths.append(str(tmp_path / f"lin{index}.safetensors"))
        write_tensors(paths[-1], tensors, meta.to_header())
    out = tmp_path / "m.safetensors"
    result = cli(["merge", *paths, "-m", method, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        meta = FileMeta.from_header(handle.metadata(), "m")
    assert meta.linearized and meta.mode is Mode.LINEAR
    expected = merge_state_dicts(vectors, method, 1.0)
    for name, tensor in load(str(out)).items():
        torch.testing.assert_close(tensor, expected[name])
