"""TSV-M against the reference's formula, re-derived here with plain torch.linalg.

The reference (AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py,
compute_and_sum_svd_mem_reduction) is written out again below the way it computes: per task
a thin SVD, the top int(r · 1/T) columns of U, entries of S and rows of Vᵀ placed in the
task's slot of zero matrices of the sizes of U, S and Vᵀ, then the SVD of each concatenated
factor, and ``u_u @ v_u @ diag(sum_s) @ u_v @ v_v``; every other tensor is the mean. Nothing
here calls tvtool's own SVD helpers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvtool.errors import InvalidInputError, UsageError
from tvtool.merge import get_method, merge_state_dicts
from tvtool.workflows.merge_search import default_grid_text

FAST = settings(max_examples=20, deadline=None)


def reference_matrix(taus: list[torch.Tensor]) -> torch.Tensor:
    """The reference's merged 2-D tensor for T task matrices (float64)."""
    taus = [t.double() for t in taus]
    sv_reduction = 1 / len(taus)
    sum_u = sum_s = sum_v = None
    for i, tau in enumerate(taus):
        u, s, v = torch.linalg.svd(tau, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def reference(vectors: list[dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """The reference's merged vector times α: 2-D tensors (but the text projection) by
    TSV, the rest averaged."""
    out = {}
    for name in vectors[0]:
        taus = [v[name] for v in vectors]
        if taus[0].dim() == 2 and "text_projection" not in name:
            out[name] = alpha * reference_matrix(taus)
        else:
            out[name] = alpha * sum(t.double() for t in taus) / len(taus)
    return out


def random_vectors(count: int, shapes: dict[str, tuple[int, ...]], seed: int,
                   dtype: torch.dtype = torch.float64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
             for name, shape in shapes.items()} for _ in range(count)]


def assert_matches(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   rtol: float, atol: float) -> None:
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name].double(), tensor, rtol=rtol, atol=atol)


SHAPES = {"visual.transformer.resblocks.0.mlp.c_fc.weight": (12, 8),
          "visual.transformer.resblocks.0.mlp.c_proj.weight": (8, 12),
          "visual.transformer.resblocks.0.mlp.c_fc.bias": (12,),
          "visual.conv1.weight": (4, 3, 2, 2),
          "text_projection": (6, 5)}


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_tsv_equals_the_reference_formula(count):
    # T = 3 on 12x8 keeps 2 of 8 components per task (6 < 8: the reference's zero padding);
    # T = 4 keeps 2 (8 = 8, no padding); T = 5 keeps 1.
    vectors = random_vectors(count, SHAPES, seed=count)
    merged = merge_state_dicts(vectors, "tsv", 1.0)
    assert_matches(merged, reference(vectors, 1.0), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5, -0.7])
def test_float32_inputs_match_within_float32_rounding(alpha):
    vectors = random_vectors(3, SHAPES, seed=11, dtype=torch.float32)
    merged = merge_state_dicts(vectors, "tsv", alpha)
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert_matches(merged, reference([{k: t.double() for k, t in v.items()} for v in vectors],
                                     alpha), rtol=1e-4, atol=1e-5)


@FAST
@given(st.integers(2, 6), st.integers(2, 14), st.integers(2, 14), st.integers(0, 2**31 - 1))
def test_tsv_equals_the_reference_for_random_shapes(count, rows, cols, seed):
    vectors = random_vectors(count, {"w": (rows, cols)}, seed)
    merged = merge_state_dicts(vectors, "tsv", 1.0)
    assert_matches(merged, reference(vectors, 1.0), rtol=1e-8, atol=1e-9)


@FAST
@given(st.lists(st.floats(-3, 3, allow_nan=False).filter(lambda c: abs(c) > 1e-3),
                min_size=3, max_size=3), st.integers(0, 2**31 - 1))
def test_coefficients_act_as_the_reference_on_weighted_vectors(coefs, seed):
    # Each coefficient scales its task before the SVD (negative ones included).
    vectors = random_vectors(3, SHAPES, seed)
    merged = merge_state_dicts(vectors, "tsv", coefs)
    weighted = [{k: c * t for k, t in v.items()} for v, c in zip(vectors, coefs, strict=True)]
    assert_matches(merged, reference(weighted, 1.0), rtol=1e-8, atol=1e-9)


def test_merge_is_linear_in_a_shared_coefficient():
    vectors = random_vectors(4, SHAPES, seed=3)
    one = merge_state_dicts(vectors, "tsv", 1.0)
    for alpha in (0.0, 0.4, -1.3):
        scaled = merge_state_dicts(vectors, "tsv", alpha)
        assert_matches(scaled, {k: alpha * t for k, t in one.items()}, rtol=1e-9, atol=1e-12)


def truncation(tau: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def test_one_vector_is_its_own_svd():
    # T = 1 keeps every component: the merge is the vector itself.
    vector = random_vectors(1, {"w": (9, 7)}, seed=5)
    torch.testing.assert_close(merge_state_dicts(vector, "tsv", 1.0)["w"], vector[0]["w"])


def test_duplicates_collapse_to_the_truncated_vector():
    # [U U] has rank k: the polar factor on its range is [U U]/√2, so two copies of τ merge
    # to τ truncated to int(r/2) components (the reference would add arbitrary completions).
    tau = random_vectors(1, {"w": (12, 8)}, seed=6)[0]
    merged = merge_state_dicts([tau, tau], "tsv", 1.0)
    torch.testing.assert_close(merged["w"].double(), truncation(tau["w"], 4), rtol=1e-9,
                               atol=1e-10)


def test_float32_duplicates_collapse_too():
    # Bit-identical tasks give an exactly rank-deficient [U U]; the polar factor in float64
    # tells its null directions from real ones.
    tau = random_vectors(1, {"w": (12, 8)}, seed=6, dtype=torch.float32)[0]
    merged = merge_state_dicts([tau, tau, tau, tau], "tsv", 1.0)
    torch.testing.assert_close(merged["w"].double(), truncation(tau["w"], 2), rtol=1e-5,
                               atol=1e-5)


def test_tasks_filling_the_rank_keep_every_direction():
    # N·k = r: [U_1 … U_8] is square and its smallest singular values can be small (1e-3 to
    # 3e-5 of the largest for 768 columns); the reference keeps every direction, so must we.
    vectors = random_vectors(8, {"w": (64, 64), "v": (64, 96)}, seed=14)
    merged = merge_state_dicts(vectors, "tsv", 1.0)
    assert_matches(merged, reference(vectors, 1.0), rtol=1e-9, atol=1e-10)


def test_zero_weight_and_absent_tensors_contribute_no_direction():
    vectors = random_vectors(2, {"w": (12, 8)}, seed=7)
    merged = merge_state_dicts(vectors, "tsv", [1.0, 0.0])
    torch.testing.assert_close(merged["w"].double(), truncation(vectors[0]["w"], 4),
                               rtol=1e-9, atol=1e-10)
    # --missing-as-zero: the absent tensor is zero, not a set of arbitrary singular vectors.
    partial = [vectors[0], {"other": torch.ones(3, dtype=torch.float64)}]
    merged = merge_state_dicts(partial, "tsv", 1.0, missing="zero")
    torch.testing.assert_close(merged["w"].double(), truncation(vectors[0]["w"], 4),
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(merged["other"], torch.full((3,), 0.5, dtype=torch.float64))


def test_low_rank_tasks_in_orthogonal_subspaces_add_exactly():
    # Rank-2 deltas (LoRA-like) on disjoint rows and columns: each task's kept components are
    # already orthogonal to the others', so TSV-M is their plain sum. k = 4 > rank 2: the
    # zero singular values are not kept (kept, their arbitrary vectors would mix the tasks).
    gen = torch.Generator().manual_seed(8)
    taus = []
    for block in range(2):
        tau = torch.zeros(12, 8, dtype=torch.float64)
        tau[6 * block:6 * block + 6, 4 * block:4 * block + 4] = (
            torch.randn(6, 2, generator=gen, dtype=torch.float64)
            @ torch.randn(2, 4, generator=gen, dtype=torch.float64))
        taus.append({"w": tau})
    merged = merge_state_dicts(taus, "tsv", 1.0)
    torch.testing.assert_close(merged["w"], taus[0]["w"] + taus[1]["w"], rtol=1e-9, atol=1e-10)


def test_share_parameter_sets_the_components_kept():
    vectors = random_vectors(2, {"w": (10, 10)}, seed=9)
    # share 1 with orthogonalisation of two full bases: compare with the formula, k = 10.
    merged = merge_state_dicts(vectors, "tsv", 1.0, {"share": 0.3})
    u = [torch.linalg.svd(v["w"], full_matrices=False) for v in vectors]
    cat_u = torch.cat([x[0][:, :3] for x in u], dim=1)
    cat_v = torch.cat([x[2][:3] for x in u], dim=0)
    s = torch.cat([x[1][:3] for x in u])
    pu, _, qu = torch.linalg.svd(cat_u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(cat_v, full_matrices=False)
    expected = (pu @ qu) @ torch.diag(s) @ (pv @ qv)
    torch.testing.assert_close(merged["w"], expected, rtol=1e-9, atol=1e-10)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(UsageError, match="share"):
            merge_state_dicts(vectors, "tsv", 1.0, {"share": bad})


def test_more_tasks_than_rank_keep_nothing_as_the_reference():
    vectors = random_vectors(5, {"w": (3, 9), "b": (3,)}, seed=10)
    merged = merge_state_dicts(vectors, "tsv", 1.0)
    assert not merged["w"].any()  # int(3 / 5) = 0 components per task
    torch.testing.assert_close(merged["b"], sum(v["b"] for v in vectors) / 5)


def test_half_precision_inputs_are_merged_in_float32():
    vectors = random_vectors(3, {"w": (12, 8)}, seed=12, dtype=torch.float16)
    merged = merge_state_dicts(vectors, "tsv", 1.0)
    assert merged["w"].dtype == torch.float16
    expected = reference([{k: t.double() for k, t in v.items()} for v in vectors], 1.0)
    torch.testing.assert_close(merged["w"].double(), expected["w"], rtol=2e-3, atol=2e-3)


def test_nan_input_is_blamed_on_its_vector():
    vectors = random_vectors(2, {"w": (6, 4)}, seed=13)
    vectors[1]["w"][2, 1] = float("nan")
    with pytest.raises(InvalidInputError, match=r"vector 1.*'w'.*NaN"):
        merge_state_dicts(vectors, "tsv", 1.0)


def test_default_grid_is_the_references_and_default_share():
    from tvtool.grid import parse_grid

    grid = parse_grid(default_grid_text("tsv"))
    assert grid == tuple(round(0.1 * i, 10) for i in range(1, 31))  # linspace(0, 3, 31)[1:]
    assert get_method("tsv").make_params().share == "1/N"


# ---------------------------------------------------------------- files and the command line


def test_cli_merge_of_tiny_vectors_equals_the_reference(cli, files, tmp_path):
    from tests.conftest import load

    out = tmp_path / "tsv.safetensors"
    result = cli(["merge", files["tv1"], files["tv2"], "-m", "tsv", "--coef", "0.9",
                  "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    vectors = [{k: t.double() for k, t in load(files[n]).items()} for n in ("tv1", "tv2")]
    merged = load(str(out))
    # float32 SVDs of random (flat-spectrum) deltas of size 0.01: subspaces to ~1e-4.
    assert_matches(merged, reference(vectors, 0.9), rtol=1e-3, atol=1e-5)
    assert any(t.dim() == 2 for t in merged.values()) and any(t.dim() != 2
                                                              for t in merged.values())


def test_yaml_config_params_and_provenance(cli, files, tmp_path):
    import json

    from tvtool.io import open_tensors

    config = tmp_path / "m.yaml"
    config.write_text(f"vectors: [{files['tv1']}, {files['tv2']}]\nmethod: tsv\n"
                      "params: {share: 0.25}\ncoef: 1.0\n")
    out = tmp_path / "m.safetensors"
    result = cli(["merge", "--config", str(config), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    source = open_tensors(str(out))
    meta = dict(source.metadata)
    source.close()
    assert json.loads(meta["tvtool.merge_params"]) == {"share": 0.25}
    flags = cli(["merge", files["tv1"], files["tv2"], "-m", "tsv", "-p", "share=0.25",
                 "-o", str(tmp_path / "f.safetensors")])
    assert flags.exit_code == 0, flags.stderr
    from tests.conftest import load

    by_flags, by_config = load(str(tmp_path / "f.safetensors")), load(str(out))
    assert by_flags.keys() == by_config.keys()
    assert all(torch.equal(by_flags[k], by_config[k]) for k in by_config)
    bad = cli(["merge", files["tv1"], files["tv2"], "-m", "tsv", "-p", "share=2",
               "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "share" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_vectors_are_merged_on_their_dense_deltas(cli, files, tmp_path):
    from tests.conftest import TINY, load, reference_lora_dense
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode

    paths, dense = [], []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        stem = "visual.transformer.resblocks.1.mlp.c_fc.weight"
        factors = {f"{stem}.lora_A": torch.randn(4, 64, generator=gen),
                   f"{stem}.lora_B": 0.1 * torch.randn(256, 4, generator=gen)}
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=Mode.LORA,
                        dataset=f"t{seed}", extra={"lora_alpha": "8", "lora_rank": "4"})
        path = tmp_path / f"l{seed}.safetensors"
        write_tensors(str(path), factors, meta.to_header())
        paths.append(str(path))
        dense.append(reference_lora_dense(factors, 8.0, 64))
    out = tmp_path / "m.safetensors"
    result = cli(["merge", *paths, "-m", "tsv", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    # Rank 4 < k = 32: only the non-zero components count. Generic rank-4 tasks span
    # independent subspaces, so the result is the orthogonalised pair, compared with the
    # formula on the four components of each task.
    (name, merged), = load(str(out)).items()
    us, ss, vs = [], [], []
    for d in dense:
        u, s, vh = torch.linalg.svd(d[name], full_matrices=False)
        us.append(u[:, :4]), ss.append(s[:4]), vs.append(vh[:4])
    pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    pv, _, qv = torch.linalg.svd(torch.cat(vs, 0), full_matrices=False)
    expected = (pu @ qu) @ torch.diag(torch.cat(ss)) @ (pv @ qv)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-3, atol=1e-5)


def test_linearized_vectors_merge_into_a_linearized_vector(cli, tmp_path):
    from tests.conftest import TINY, load
    from tvtool.io import open_tensors, write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode

    vectors = random_vectors(2, {"visual.proj": (64, 32), "visual.ln_post.bias": (64,)}, 15,
                             dtype=torch.float32)
    paths = []
    for index, tensors in enumerate(vectors):
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=Mode.LINEAR,
                        linearized=True, dataset=f"t{index}")
        paths.append(str(tmp_path / f"lin{index}.safetensors"))
        write_tensors(paths[-1], tensors, meta.to_header())
    out = tmp_path / "m.safetensors"
    result = cli(["merge", *paths, "-m", "tsv", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    source = open_tensors(str(out))
    meta = FileMeta.from_header(source.metadata, "m")
    source.close()
    assert meta.linearized and meta.mode is Mode.LINEAR
    expected = reference([{k: t.double() for k, t in v.items()} for v in vectors], 1.0)
    assert_matches(load(str(out)), expected, rtol=1e-4, atol=1e-5)
