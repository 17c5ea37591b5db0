"""``tvtool merge``: outputs and metadata, refusals (exit 2, nothing written), configs, coefs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.conftest import load
from tvtool.io import write_tensors
from tvtool.merge import MergeConfig, config_from_document, merge_state_dicts
from tvtool.metadata import FileMeta, Kind, Mode


def metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata())


def write_vector(path: Path, tensors, *, dataset="d", fingerprint="sha256:base", mode=Mode.FULL,
                 linearized=False, kind=Kind.TASK_VECTOR, check_finite=True) -> str:
    meta = FileMeta(kind=kind, architecture="tvtool-tiny", base_ref="tvtool-tiny",
                    base_fingerprint=fingerprint, mode=mode, linearized=linearized,
                    dataset=dataset)
    write_tensors(str(path), tensors, meta.to_header(), check_finite=check_finite)
    return str(path)


def random_tensors(seed: int, keys=("a", "b")) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(6, 5, generator=gen) for k in keys}


@pytest.fixture()
def vecs(tmp_path):
    """Three compatible small vectors and some that do not fit them, in their own directory."""
    root = tmp_path / "in"
    root.mkdir()
    out = {f"v{i}": write_vector(root / f"v{i}.safetensors", random_tensors(i), dataset=f"d{i}")
           for i in (1, 2, 3)}
    out["other_base"] = write_vector(root / "ob.safetensors", random_tensors(4),
                                     fingerprint="sha256:other")
    out["linear"] = write_vector(root / "lin.safetensors", random_tensors(5), mode=Mode.LINEAR,
                                 linearized=True)
    out["fewer"] = write_vector(root / "fewer.safetensors", random_tensors(6, keys=("a",)))
    out["ckpt"] = write_vector(root / "ckpt.safetensors", random_tensors(7),
                               kind=Kind.CHECKPOINT)
    out["wrong_shape"] = write_vector(root / "ws.safetensors",
                                      {"a": torch.ones(2), "b": torch.ones(6, 5)})
    return out


def tensors_of(paths):
    return [load(p) for p in paths]


# ---------------------------------------------------------------- happy paths


@pytest.mark.parametrize("method,extra,params", [
    ("task_arithmetic", ["--coef", "0.3"], None),
    ("mean", [], None),
    ("ties", ["--density", "0.4"], {"density": 0.4}),
    ("ties", ["--density", "0.4", "--trim", "tensor", "-p", "sign=frequency"],
     {"density": 0.4, "trim": "tensor", "sign": "frequency"}),
    ("dare", ["--density", "0.5", "--seed", "3"], {"density": 0.5}),
    ("magnitude", ["--density", "0.2"], {"density": 0.2}),
])
def test_merge_writes_the_library_result(cli, vecs, tmp_path, method, extra, params):
    out = tmp_path / "merged.safetensors"
    paths = [vecs["v1"], vecs["v2"], vecs["v3"]]
    result = cli(["merge", *paths, "--method", method, *extra, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    coef = 0.3 if method == "task_arithmetic" else 1.0
    seed = 3 if method == "dare" else 0
    expected = merge_state_dicts(tensors_of(paths), method, coef, params, seed=seed)
    got = load(str(out))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_merged_metadata_records_sources_method_and_coefficients(cli, vecs, tmp_path):
    out = tmp_path / "m.safetensors"
    result = cli(["merge", vecs["v1"], vecs["v2"], "-m", "ties", "--coef", "0.5", "--coef",
                  "0.7", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    meta = metadata(str(out))
    parsed = FileMeta.from_header(meta, "m")
    assert parsed.kind is Kind.TASK_VECTOR
    assert parsed.base_fingerprint == "sha256:base"
    assert parsed.mode is Mode.FULL and parsed.linearized is False
    assert json.loads(meta["tvtool.sources"]) == ["d1", "d2"]
    assert meta["tvtool.merge_method"] == "ties"
    assert json.loads(meta["tvtool.merge_params"])["trim"] == "global"
    assert json.loads(meta["tvtool.coefficients"])["values"] == [0.5, 0.7]
    assert json.loads(meta["tvtool.input_modes"]) == [{"mode": "full", "linearized": False}] * 2
    assert parsed.provenance["command"] == "merge"


def test_merge_reads_stdin_and_writes_stdout(cli, vecs):
    first = Path(vecs["v1"]).read_bytes()
    result = cli(["merge", "-", vecs["v2"], "-o", "-"], input=first)
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load as load_bytes

    got = load_bytes(result.stdout_bytes)
    expected = merge_state_dicts(tensors_of([vecs["v1"], vecs["v2"]]))
    torch.testing.assert_close(got["a"], expected["a"])


def test_merge_of_real_extracted_vectors(cli, files, tmp_path):
    out = tmp_path / "m.safetensors"
    result = cli(["merge", files["tv1"], files["tv2"], "-m", "ties", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out)
    assert report["details"]["read_passes_per_input"] == 3
    applied = cli(["apply", "--base", files["base"], str(out), "-o",
                   str(tmp_path / "model.safetensors")])
    assert applied.exit_code == 0, applied.stderr


def test_dare_output_is_byte_identical_across_runs(cli, vecs, tmp_path):
    outs = [tmp_path / f"dare{i}.safetensors" for i in range(2)]
    for out in outs:
        result = cli(["merge", vecs["v1"], vecs["v2"], "-m", "dare", "--seed", "9", "-o",
                      str(out)])
        assert result.exit_code == 0, result.stderr
    assert load(str(outs[0])).keys() == load(str(outs[1])).keys()
    for name, tensor in load(str(outs[0])).items():
        assert torch.equal(tensor, load(str(outs[1]))[name])


def test_flags_that_allow_what_is_refused_by_default(cli, vecs, tmp_path):
    out = tmp_path / "a.safetensors"
    ok = cli(["merge", vecs["v1"], vecs["other_base"], "--allow-base-mismatch", "-o", str(out)])
    assert ok.exit_code == 0, ok.stderr
    out = tmp_path / "b.safetensors"
    ok = cli(["merge", vecs["v1"], vecs["linear"], "--mixed-modes-as", "linearized", "-o",
              str(out)])
    assert ok.exit_code == 0, ok.stderr
    meta = FileMeta.from_header(metadata(str(out)), "b")
    assert meta.linearized is True and meta.mode is None
    out = tmp_path / "c.safetensors"
    ok = cli(["merge", vecs["v1"], vecs["fewer"], "--missing-as-zero", "-o", str(out)])
    assert ok.exit_code == 0, ok.stderr
    assert set(load(str(out))) == {"a", "b"}
    torch.testing.assert_close(load(str(out))["b"], load(vecs["v1"])["b"])
    out = tmp_path / "d.safetensors"
    ok = cli(["merge", vecs["v1"], vecs["fewer"], "--common-only", "-o", str(out)])
    assert ok.exit_code == 0, ok.stderr
    assert set(load(str(out))) == {"a"}


def test_linearized_vectors_merge_into_a_linearized_vector(cli, vecs, tmp_path):
    other = write_vector(tmp_path / "lin2.safetensors", random_tensors(8), mode=Mode.LINEAR,
                         linearized=True)
    out = tmp_path / "lin.safetensors"
    result = cli(["merge", vecs["linear"], other, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    meta = FileMeta.from_header(metadata(str(out)), "lin")
    assert meta.linearized and meta.mode is Mode.LINEAR


# ---------------------------------------------------------------- refusals


REFUSALS = {
    "different bases": (lambda v: [v["v1"], v["other_base"]], [], "different bases"),
    "linearized mix": (lambda v: [v["v1"], v["linear"]], [], "linearized"),
    "different keys": (lambda v: [v["v1"], v["fewer"]], [], "--missing-as-zero"),
    "not a vector": (lambda v: [v["v1"], v["ckpt"]], [], "not a task vector"),
    "shape mismatch": (lambda v: [v["v1"], v["wrong_shape"]], [], "shape"),
    "coef count": (lambda v: [v["v1"], v["v2"]], ["--coef", "1", "--coef", "2", "--coef", "3"],
                   "3 coefficients"),
    "unknown method": (lambda v: [v["v1"], v["v2"]], ["-m", "soup"], "unknown merge method"),
    "bad density": (lambda v: [v["v1"], v["v2"]], ["-m", "ties", "--density", "1.5"],
                    "density"),
    "param for another method": (lambda v: [v["v1"], v["v2"]], ["--density", "0.5"],
                                 "no parameter"),
    "bad param syntax": (lambda v: [v["v1"], v["v2"]], ["-p", "density"], "KEY=VALUE"),
    "stdin twice": (lambda v: ["-", "-"], [], "only once"),
    "two key policies": (lambda v: [v["v1"], v["fewer"]], ["--missing-as-zero",
                                                           "--common-only"], "exclude"),
    "bad mixed mode": (lambda v: [v["v1"], v["linear"]], ["--mixed-modes-as", "both"],
                       "mixed-modes-as"),
    "coef and coefs": (lambda v: [v["v1"], v["v2"]], ["--coef", "1", "--coefs", "x.json"],
                       "not both"),
    "missing coefs file": (lambda v: [v["v1"], v["v2"]], ["--coefs", "nope.json"],
                           "does not exist"),
    "missing vector": (lambda v: [v["v1"], "absent.safetensors"], [], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_exit_2_and_write_nothing(cli, vecs, tmp_path, case):
    inputs, extra, message = REFUSALS[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    result = cli(["merge", *inputs(vecs), *extra, "-o", str(out)])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tvtool: error:")
    assert list(out_dir.iterdir()) == []


def test_output_that_is_an_input_is_refused(cli, vecs):
    before = Path(vecs["v1"]).read_bytes()
    result = cli(["merge", vecs["v1"], vecs["v2"], "-o", vecs["v1"]])
    assert result.exit_code == 2
    assert "also an input" in result.stderr
    assert Path(vecs["v1"]).read_bytes() == before


def test_missing_output_is_a_usage_error(cli, vecs):
    result = cli(["merge", vecs["v1"], vecs["v2"]])
    assert result.exit_code == 2 and "--output" in result.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method,extra", [
    ("task_arithmetic", ["--coef", "0"]), ("mean", []), ("ties", ["--density", "0.1"]),
    ("ties", ["--density", "0.1", "--trim", "tensor"]), ("dare", ["--density", "0.1"]),
    ("dare", ["-p", "combine=ties"]), ("magnitude", ["--density", "0.1"])])
def test_non_finite_inputs_are_refused_naming_the_input(cli, tmp_path, vecs, value, method,
                                                        extra):
    bad = random_tensors(1)
    bad["a"][0, 0] = value
    path = write_vector(tmp_path / "bad.safetensors", bad, check_finite=False)
    out = tmp_path / "o.safetensors"
    result = cli(["merge", vecs["v1"], path, "-m", method, *extra, "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    assert "bad.safetensors" in result.stderr and "NaN or Inf" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------- dry run


def test_dry_run_prints_the_plan_and_writes_nothing(cli, vecs, tmp_path):
    out = tmp_path / "never.safetensors"
    result = cli(["merge", vecs["v1"], vecs["fewer"], "--missing-as-zero", "-m", "ties",
                  "--dry-run", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "method: ties" in result.stdout
    assert "b  (6, 5)  float32  absent in [1]" in result.stdout
    assert "reads per input: 3" in result.stdout
    assert not out.exists()
    as_json = cli(["merge", vecs["v1"], vecs["v2"], "--dry-run", "--json"])
    plan = json.loads(as_json.stdout)
    assert plan["dry_run"] is True
    assert plan["output"]["bytes"] == 2 * 6 * 5 * 4
    assert [k["name"] for k in plan["keys"]] == ["a", "b"]
    assert plan["inputs"][0]["dataset"] == "d1"


def test_dry_run_still_refuses_bad_inputs(cli, vecs):
    result = cli(["merge", vecs["v1"], vecs["other_base"], "--dry-run"])
    assert result.exit_code == 2
    assert "were extracted from different bases" in result.stderr, result.stderr


# ---------------------------------------------------------------- configs


def test_config_round_trips_through_documents_and_yaml(tmp_path):
    configs = [
        MergeConfig(vectors=("a.safetensors", "b.safetensors"), output="o.safetensors"),
        MergeConfig(vectors=("a", "b", "c"), output="-", method="ties",
                    params={"density": 0.3, "trim": "tensor"}, coefs=(0.1, 0.2, 0.3), seed=4,
                    missing="zero", allow_base_mismatch=True, mixed_modes_as="nonlinear"),
        MergeConfig(vectors=("a",), output="o", method="dare", coefs_file="c.json",
                    missing="common"),
        MergeConfig(vectors=("a", "b"), output="o", method="ties",
                    vector_params=({"density": 0.1}, {}), dtype="float16"),
    ]
    for config in configs:
        assert config_from_document(config.to_document()) == config
        text = yaml.safe_dump(config.to_document())
        assert config_from_document(yaml.safe_load(text)) == config
        assert config_from_document(json.loads(config.to_json())) == config


def test_merge_from_config_file_reproduces_and_is_recorded(cli, vecs, tmp_path):
    config_dir = Path(vecs["v1"]).parent
    config = config_dir / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "version": 1,
        "vectors": ["v1.safetensors", {"path": "v2.safetensors"}],
        "method": "dare", "params": {"density": 0.5, "combine": "ties"},
        "coef": [0.6, 0.8], "seed": 11, "output": "from-config.safetensors",
    }))
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 0, result.stderr
    out = config_dir / "from-config.safetensors"
    assert result.stdout.strip() == str(out)
    expected = merge_state_dicts(tensors_of([vecs["v1"], vecs["v2"]]), "dare", [0.6, 0.8],
                                 {"density": 0.5, "combine": "ties"}, seed=11)
    for name, tensor in expected.items():
        assert torch.equal(load(str(out))[name], tensor)
    # The stored config (defaults resolved) reproduces the merge byte for byte.
    stored = json.loads(metadata(str(out))["tvtool.merge_config"])
    assert stored["params"] == {"density": 0.5, "combine": "ties", "rescale": True,
                                "sign": "total", "disjoint": "mean"}
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(stored))
    out2 = tmp_path / "again.safetensors"
    rerun = cli(["merge", "--config", str(again), "-o", str(out2)])
    assert rerun.exit_code == 0, rerun.stderr
    assert out.read_bytes()[-200:] == out2.read_bytes()[-200:]
    for name, tensor in load(str(out)).items():
        assert torch.equal(load(str(out2))[name], tensor)


def test_save_config_writes_a_reproducible_config(cli, vecs, tmp_path):
    saved = tmp_path / "saved.yaml"
    out = tmp_path / "m1.safetensors"
    result = cli(["merge", vecs["v1"], vecs["v2"], "-m", "ties", "--density", "0.5", "--coef",
                  "0.4", "-o", str(out), "--save-config", str(saved)])
    assert result.exit_code == 0, result.stderr
    out2 = tmp_path / "m2.safetensors"
    rerun = cli(["merge", "--config", str(saved), "-o", str(out2)])
    assert rerun.exit_code == 0, rerun.stderr
    for name, tensor in load(str(out)).items():
        assert torch.equal(load(str(out2))[name], tensor)


CONFIG_ERRORS = {
    "unknown key": ({"vectors": ["v1.safetensors"], "methd": "ties"}, "unknown key"),
    "no vectors": ({"method": "ties"}, "'vectors'"),
    "bad coef": ({"vectors": ["v1.safetensors"], "coef": "high"},
                 "coef: coefficient 'high' is not a number"),
    "two coef sources": ({"vectors": ["v1.safetensors"], "coef": 1, "coefs_file": "c.json"},
                         "one way only"),
    "bad missing": ({"vectors": ["v1.safetensors"], "missing": "maybe"}, "'missing'"),
    "bad version": ({"version": 2, "vectors": ["v1.safetensors"]}, "version"),
    "not a mapping": (["v1.safetensors"], "must be a mapping"),
    "partial per-vector coefs": ({"vectors": [{"path": "v1.safetensors", "coef": 1},
                                              "v2.safetensors"]}, "every vector"),
    "per-vector density of task arithmetic": (
        {"vectors": ["v1.safetensors", {"path": "v2.safetensors", "density": 0.5}]},
        "vectors[1]: method 'task_arithmetic' takes no per-vector ['density'] (hint: its "
        "per-vector parameters: none"),
    "per-vector trim of ties": (
        {"vectors": [{"path": "v1.safetensors", "trim": "tensor"}], "method": "ties"},
        "takes no per-vector ['trim'] (hint: its per-vector parameters: density"),
    "per-vector density out of range": (
        {"vectors": [{"path": "v1.safetensors", "density": 2}], "method": "ties"},
        "vectors[0]: method 'ties': density"),
    "bad dtype": ({"vectors": ["v1.safetensors"], "dtype": "int8"}, "'dtype'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_invalid_configs_are_refused(cli, vecs, tmp_path, case):
    document, message = CONFIG_ERRORS[case]
    config = Path(vecs["v1"]).parent / "bad.yaml"
    config.write_text(yaml.safe_dump(document))
    out = tmp_path / "o.safetensors"
    result = cli(["merge", "--config", str(config), "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert not out.exists()


def test_invalid_yaml_and_config_with_flags_are_refused(cli, vecs, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("vectors: [a, b\n")
    result = cli(["merge", "--config", str(config), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and "not valid YAML" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"vectors": [vecs["v1"]]}))
    result = cli(["merge", "--config", str(good), "-m", "ties", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--config defines the merge" in result.stderr
    assert not (tmp_path / "o").exists()


def test_yaml_reader_never_builds_objects(tmp_path):
    from tvtool.errors import InvalidInputError
    from tvtool.io.yaml_io import read_yaml

    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(InvalidInputError):
        read_yaml(str(evil))


# ---------------------------------------------------------------- coefficient files


def test_json_coefficient_files(cli, vecs, tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text("[0.25, 0.5]")
    by_name = tmp_path / "dict.json"
    by_name.write_text(json.dumps({"d1": 0.25, "v2": 0.5}))
    expected = merge_state_dicts(tensors_of([vecs["v1"], vecs["v2"]]), coefs=[0.25, 0.5])
    for coefs in (as_list, by_name):
        out = tmp_path / f"{coefs.stem}.safetensors"
        result = cli(["merge", vecs["v1"], vecs["v2"], "--coefs", str(coefs), "-o", str(out)])
        assert result.exit_code == 0, result.stderr
        torch.testing.assert_close(load(str(out))["a"], expected["a"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"d1": 0.25, "nobody": 0.5}))
    result = cli(["merge", vecs["v1"], vecs["v2"], "--coefs", str(bad), "-o",
                  str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "names none of the vectors" in result.stderr


def write_coefficients(path: Path, table, granularity, *, datasets=("d1", "d2"),
                       fingerprint="sha256:base", keys=("a", "b")) -> str:
    """A coefficients file as learn-coeffs writes it (tvtool.atlas)."""
    from tvtool.atlas import CoefficientSet, TensorSpec, build_partition, write_coefficients

    partition = build_partition([TensorSpec(k, (6, 5)) for k in keys], granularity, seed=1,
                                prefix="")
    sources = tuple({"path": f"{d}.safetensors", "dataset": d, "mode": "full",
                     "linearized": False, "base_fingerprint": fingerprint} for d in datasets)
    meta = FileMeta(kind=Kind.COEFFICIENTS, base_fingerprint=fingerprint)
    write_coefficients(str(path), CoefficientSet(torch.tensor(table), partition, sources, meta))
    return str(path)


def test_coefficients_file_per_task_and_per_tensor(cli, vecs, tmp_path):
    paths = [vecs["v1"], vecs["v2"]]
    per_task = write_coefficients(tmp_path / "task.safetensors", [[0.2], [0.9]], "task")
    out = tmp_path / "t.safetensors"
    result = cli(["merge", *paths, "--coefs", per_task, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    expected = merge_state_dicts(tensors_of(paths), coefs=[0.2, 0.9])
    torch.testing.assert_close(load(str(out))["b"], expected["b"])

    per_tensor = write_coefficients(tmp_path / "tensor.safetensors", [[1.0, 0.0], [0.5, 2.0]],
                                    "tensor")
    out = tmp_path / "p.safetensors"
    result = cli(["merge", *paths, "-m", "ties", "--density", "1", "--coefs", per_tensor, "-o",
                  str(out)])
    assert result.exit_code == 0, result.stderr
    expected = merge_state_dicts(tensors_of(paths), "ties", params={"density": 1.0},
                                 per_tensor_coefs={"a": [1.0, 0.5], "b": [0.0, 2.0]})
    for name in ("a", "b"):
        torch.testing.assert_close(load(str(out))[name], expected[name])
    recorded = json.loads(metadata(str(out))["tvtool.coefficients"])
    assert recorded["granularity"] == "tensor" and recorded["values"]["b"] == [0.0, 2.0]


@pytest.mark.parametrize("granularity", ["tensor", "task"])
def test_tensors_a_coefficients_file_does_not_cover_get_zero(cli, vecs, tmp_path, granularity):
    only_a = write_coefficients(tmp_path / "a.safetensors", [[1.0], [1.0]], granularity,
                                keys=("a",))
    out = tmp_path / "o.safetensors"
    result = cli(["merge", vecs["v1"], vecs["v2"], "--coefs", only_a, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert not load(str(out))["b"].any()
    torch.testing.assert_close(load(str(out))["a"], load(vecs["v1"])["a"] + load(vecs["v2"])["a"])


@pytest.mark.parametrize(("case", "message"), [
    ("rows", "the coefficient file has 1 rows (one per task vector) but 2 vectors"),
    ("granularity", "has granularity random:2: it scales parts of tensors"),
    ("order", "row 0 was learned for 'd2', but vector 0 is 'd1'"),
    ("base", "comes from another base than the vector the coefficients were learned for"),
    ("kind", "is a tvtool task_vector, not a coefficient file")])
def test_bad_coefficients_files_are_refused(cli, vecs, tmp_path, case, message):
    target = tmp_path / "c.safetensors"
    if case == "rows":
        write_coefficients(target, [[1.0]], "task", datasets=("d1",))
    elif case == "granularity":
        write_coefficients(target, [[1.0] * 4, [1.0] * 4], "random:2")
    elif case == "order":
        write_coefficients(target, [[1.0], [1.0]], "task", datasets=("d2", "d1"))
    elif case == "base":
        write_coefficients(target, [[1.0], [1.0]], "task", fingerprint="sha256:x")
    else:
        write_vector(target, {"coefficients": torch.ones(2, 1)})
    out = tmp_path / "o.safetensors"
    result = cli(["merge", vecs["v1"], vecs["v2"], "--coefs", str(target), "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert not out.exists()


def test_overflowing_result_is_a_runtime_failure(cli, vecs, tmp_path):
    out = tmp_path / "o.safetensors"
    result = cli(["merge", vecs["v1"], vecs["v2"], "--coef", "3e38", "-o", str(out)])
    assert result.exit_code == 1 and "NaN or Inf" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no output, no temp file
    result = cli(["merge", vecs["v1"], vecs["v2"], "--coef", "1e39", "-o", str(out)])
    assert result.exit_code == 2 and "float32" in result.stderr


def test_lora_vectors_are_merged_as_dense_deltas(cli, vecs, tmp_path):
    gen = torch.Generator().manual_seed(0)
    factors = {"a.lora_A": torch.randn(2, 5, generator=gen),
               "a.lora_B": torch.randn(6, 2, generator=gen),
               "b": torch.randn(6, 5, generator=gen)}
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture="tvtool-tiny",
                    base_fingerprint="sha256:base", mode=Mode.LORA, dataset="lora",
                    extra={"lora_alpha": "4.0", "lora_rank": "2"})
    lora = tmp_path / "lora.safetensors"
    write_tensors(str(lora), factors, meta.to_header())
    out = tmp_path / "m.safetensors"
    result = cli(["merge", vecs["v1"], str(lora), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    dense = factors["a.lora_B"] @ factors["a.lora_A"] * (4.0 / 2)
    torch.testing.assert_close(load(str(out))["a"], load(vecs["v1"])["a"] + dense)
    assert FileMeta.from_header(metadata(str(out)), "m").mode is None


def test_config_per_vector_density_and_dtype_against_plain_torch(cli, vecs, tmp_path):
    """One config: magnitude with a per-tensor trim, each vector at its own density, stored
    in float16 -- recomputed here with plain torch from the input files."""
    config_dir = Path(vecs["v1"]).parent
    config = config_dir / "per-vector.yaml"
    config.write_text(yaml.safe_dump({
        "vectors": [{"path": "v1.safetensors", "density": 0.3},
                    {"path": "v2.safetensors", "density": 0.8}],
        "method": "magnitude", "params": {"trim": "tensor"}, "coef": 0.5,
        "dtype": "float16", "output": "pv.safetensors"}))
    dry = cli(["merge", "--config", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.stderr
    assert "per-vector params: [{'density': 0.3}, {'density': 0.8}]" in dry.stdout
    assert "dtype: float16" in dry.stdout and "float16" in dry.stdout.split("keys:")[1]
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 0, result.stderr
    merged = load(str(config_dir / "pv.safetensors"))
    inputs = tensors_of([vecs["v1"], vecs["v2"]])
    for name in ("a", "b"):
        expected = torch.zeros(30, dtype=torch.float64)
        for vector, density in zip(inputs, (0.3, 0.8), strict=True):
            flat = vector[name].double().reshape(-1)
            keep = int(density * flat.numel())
            top = torch.argsort(flat.abs(), descending=True, stable=True)[:keep]
            kept = torch.zeros_like(flat)
            kept[top] = flat[top]
            expected += 0.5 * kept
        assert merged[name].dtype == torch.float16
        torch.testing.assert_close(merged[name].double().reshape(-1),
                                   expected.half().double(), rtol=0, atol=1e-3)
    meta = metadata(str(config_dir / "pv.safetensors"))
    assert json.loads(meta["tvtool.merge_vector_params"]) == [{"density": 0.3},
                                                              {"density": 0.8}]
    stored = json.loads(meta["tvtool.merge_config"])
    assert stored["dtype"] == "float16" and stored["vectors"][0] == {
        "path": str(config_dir / "v1.safetensors"), "density": 0.3}


def test_dtype_overflow_is_a_runtime_failure(cli, vecs, tmp_path):
    big = write_vector(tmp_path / "big.safetensors", {"a": torch.full((3,), 6e4),
                                                      "b": torch.ones(3)})
    out = tmp_path / "o.safetensors"
    result = cli(["merge", big, big, "--dtype", "float16", "-o", str(out)])
    assert result.exit_code == 1 and "overflow" in result.stderr and not out.exists()
    ok = cli(["merge", big, big, "--dtype", "float64", "-o", str(out)])
    assert ok.exit_code == 0, ok.stderr
    assert load(str(out))["a"].dtype == torch.float64
    assert torch.equal(load(str(out))["a"], torch.full((3,), 1.2e5, dtype=torch.float64))
