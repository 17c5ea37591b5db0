"""``tvtool learn-coeffs`` end to end on the tiny model and the synthetic world."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load as load_bytes

from tests.conftest import load
from tvtool.atlas import LearnerConfig, compose_state, composed_vector, read_coefficients
from tvtool.evaluate import EvalConfig, EvalSettings, evaluate
from tvtool.workflows.learn_coeffs import LearnCoeffsConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine run several times faster on one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Zero-shot heads are cached on disk; keep them out of the repository.
    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(tmp_path / "cache"))


def _args(files, *extra):
    return ["learn-coeffs", files["tv1"], files["tv2"], "--base", files["base"],
            "-d", "synthetic:shape", "--shots", "2", "--steps", "2", "--eval-every", "1",
            "--device", "cpu", *extra]


def test_help_lists_learn_coeffs(cli):
    result = cli(["--help"])
    assert "learn-coeffs" in result.stdout
    result = cli(["learn-coeffs", "--help"])
    assert result.exit_code == 0
    for flag in ("--granularity", "--objective", "--shots", "--merged-out", "--vector-dtype"):
        assert flag in result.stdout


def test_end_to_end_writes_a_valid_coefficient_file_and_merged_model(cli, files, tmp_path):
    out, merged = tmp_path / "c.safetensors", tmp_path / "m.safetensors"
    result = cli(_args(files, "-o", str(out), "--merged-out", str(merged), "--json"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and report["merged_output"] == str(merged)
    assert report["vectors"] == 2 and report["granularity"] == "tensor"
    assert report["steps_run"] == 2 and report["objective"] == "ce"
    assert report["initial"][0]["dataset"] == "synthetic:shape"

    coefs = read_coefficients(str(out))
    visual = [n for n in load(files["tv1"]) if n.startswith("visual.")]
    assert coefs.coefficients.shape == (2, len(visual))
    assert list(coefs.partition.block_names) == visual
    assert [s["path"] for s in coefs.sources] == [files["tv1"], files["tv2"]]
    assert [s["dataset"] for s in coefs.sources] == ["task1", "task2"]
    header = coefs.to_header()
    assert header["tvtool.base_fingerprint"] == coefs.sources[0]["base_fingerprint"]
    assert header["tvtool.dataset"] == "synthetic:shape"
    assert coefs.meta.provenance["command"] == "learn-coeffs"
    arguments = coefs.meta.provenance["arguments"]
    assert arguments["objective"] == "ce" and arguments["steps"] == 2
    assert arguments["precision"] == "auto" and arguments["shots"] == 2

    base, edited = load(files["base"]), load(str(merged))
    expected = compose_state(base, [load(files["tv1"]), load(files["tv2"])],
                             coefs.coefficients, coefs.partition)
    assert set(edited) == set(base)
    for name in base:
        torch.testing.assert_close(edited[name], expected[name], rtol=0, atol=1e-6)
    model = open_clip.create_model("tvtool-tiny", pretrained=str(merged))
    torch.testing.assert_close(model.state_dict()["visual.proj"], edited["visual.proj"])

    # The file is what `merge --coefs` and the evaluation library consume.
    merged_vector = tmp_path / "mv.safetensors"
    result = cli(["merge", files["tv1"], files["tv2"], "--coefs", str(out), "-o",
                  str(merged_vector)])
    assert result.exit_code == 0, result.stderr
    composed = composed_vector([load(files["tv1"]), load(files["tv2"])], coefs.coefficients,
                               coefs.partition)
    merged_tensors = load(str(merged_vector))
    for name, tensor in composed.items():
        torch.testing.assert_close(merged_tensors[name].float(), tensor, rtol=0, atol=1e-6)
    common = {"datasets": ("synthetic:shape",), "split": "test"}
    with_builder = evaluate(EvalConfig(EvalSettings(base=files["base"], limit=24, device="cpu"),
                                       vectors=(files["tv1"], files["tv2"]),
                                       weights=coefs.weight_builder(), **common))
    with_checkpoint = evaluate(EvalConfig(EvalSettings(base=str(merged), limit=24,
                                                       device="cpu"), **common))
    assert with_builder.results[0].correct == with_checkpoint.results[0].correct
    # ... and what `tvtool eval --coefs` evaluates.
    result = cli(["eval", files["tv1"], files["tv2"], "--coefs", str(out), "--base",
                  files["base"], "-d", "synthetic:shape", "--limit", "24", "--device", "cpu",
                  "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["correct"] == with_checkpoint.results[0].correct


def test_random_granularity_is_deterministic(cli, files, tmp_path):
    paths = [tmp_path / f"c{i}.safetensors" for i in range(2)]
    for path in paths:
        result = cli(_args(files, "-g", "random:2", "--partition-seed", "3", "-o", str(path)))
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == str(path)
    first, second = (read_coefficients(str(p)) for p in paths)
    assert torch.equal(first.coefficients, second.coefficients)
    header = first.to_header()
    assert header["tvtool.granularity"] == "random:2"
    assert header["tvtool.partition_seed"] == "3" and header["tvtool.partition_k"] == "2"
    assert first.coefficients.shape[1] == 2 * len(first.partition.tensors)


def test_entropy_objective_to_stdout(cli, files, tmp_path):
    merged = tmp_path / "m.safetensors"
    result = cli(_args(files, "--objective", "entropy", "--split", "test",
                       "--granularity", "layer", "--vector-dtype", "bf16", "-o", "-",
                       "--merged-out", str(merged)))
    assert result.exit_code == 0, result.stderr
    assert merged.exists()
    tensors = load_bytes(result.stdout_bytes)  # nothing but the safetensors bytes
    assert list(tensors) == ["coefficients"]
    # class_embedding, positional_embedding, proj, conv1, ln_pre, 3 resblocks, ln_post
    assert tensors["coefficients"].shape == (2, 9)


@pytest.mark.parametrize("objective", ["ufm", "infomax"])
def test_unlabelled_objectives_run_with_their_reference_defaults(cli, files, tmp_path,
                                                                  objective):
    # tvtool's protocol (infomax's default; ufm's is atlas, tested below).
    out = tmp_path / "u.safetensors"
    result = cli(_args(files, "--objective", objective, "--split", "test", "--shots", "4",
                       "--granularity", "task", "--protocol", "tvtool", "-o", str(out),
                       "--json"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    settings = report["settings"]
    assert settings["lr"] == 1e-3 and settings["steps"] == 2
    assert settings["init"] == (0.0 if objective == "ufm" else 0.3)
    assert settings["augment"] == ("reference" if objective == "ufm" else "none")
    assert report["initial"][0]["accuracy"] is None  # labels are never read
    assert report["selection"].startswith("held-out information")
    if objective == "ufm":
        assert "trusted examples" in result.stderr
    assert read_coefficients(str(out)).meta.extra["objective"] == objective


def test_reference_protocols_report_their_path(cli, files, tmp_path):
    # ufm under its reference protocol: every example trusted, selection on the val split.
    out, path = tmp_path / "u.safetensors", tmp_path / "path.json"
    result = cli(_args(files, "--objective", "ufm", "--split", "test", "--shots", "20",
                       "--granularity", "atlas:2", "--batch-size", "64", "--epochs", "1",
                       "--eval-limit", "30", "--audit-split", "test", "--path-out", str(path),
                       "-o", str(out), "--json"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["protocol"] == "atlas" and report["settings"]["ufm_reading"] == "code"
    assert report["selection"].startswith("accuracy on the labelled val split")
    assert "every example trusted" in result.stderr and "not 2-D keep" in result.stderr
    assert report["settings"]["steps"] == report["steps_run"]  # one epoch
    first = report["candidates"][0]
    assert first["datasets"][0]["examples"] == 30 and first["datasets"][0]["accuracy"] is not None
    assert set(first["audit_accuracy"]) == {"synthetic:shape"}
    document = json.loads(path.read_text())
    assert len(document["records"]) == len(report["candidates"])
    coefs = read_coefficients(str(out))
    assert str(coefs.partition.granularity) == "atlas:2"
    assert all(len(s.shape) == 2 for s in coefs.partition.tensors)
    assert torch.tensor(document["records"][-1]["coefficients"]).shape == \
        coefs.coefficients.shape
    # atlas:K scales parts of tensors: merge --coefs refuses it, as random:K.
    refused = cli(["merge", files["tv1"], files["tv2"], "--coefs", str(out), "-o",
                   str(tmp_path / "m.safetensors")])
    assert refused.exit_code == 2 and "atlas:2" in refused.stderr


def test_adamerging_protocol_keeps_the_last_iterate(cli, files, tmp_path):
    out = tmp_path / "a.safetensors"
    result = cli(_args(files, "--objective", "entropy", "--split", "test", "--shots", "4",
                       "--granularity", "task", "-o", str(out), "--json"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["protocol"] == "adamerging" and report["best_step"] == report["steps_run"]
    assert report["at_edge"] is None and report["settings"]["batch_size"] == 16
    assert 0.0 <= report["coefficients"][0]["min"] <= report["coefficients"][0]["max"] <= 1.0


def test_negation_objective_runs_from_the_command_line(cli, files, tmp_path):
    out = tmp_path / "neg.safetensors"
    result = cli(_args(files, "--objective", "negation", "--control", "synthetic:color",
                       "--granularity", "task", "-o", str(out), "--json"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["objective"] == "negation"
    assert {(r["dataset"], r["role"]) for r in report["initial"]} == {
        ("synthetic:shape", "target"), ("synthetic:color", "control")}
    coefs = read_coefficients(str(out))
    assert coefs.coefficients.shape == (2, 1) and torch.isfinite(coefs.coefficients).all()


@pytest.mark.parametrize("extra, message", [
    (["-g", "random:0"], "unknown granularity"),
    (["--control", "synthetic:color"], "--control is only used"),
    (["--objective", "negation"], "needs --control"),
    (["--objective", "fancy"], "unknown objective"),
    (["--augment", "heavy"], "unknown augmentation"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--objective", "negation", "--control", "synthetic:color", "--negation-loss", "x"],
     "unknown negation loss"),
    (["--shots", "0"], "--shots must be at least 1"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--vector-dtype", "int8"], "--vector-dtype"),
    (["-d", "synthetic:nope"], "unknown synthetic task"),
    (["-o", "-", "--json"], "--json prints a document on stdout"),
    (["--protocol", "adamerging"], "does not run the ce objective"),
    (["--protocol", "nope"], "unknown protocol"),
    (["--epochs", "2", "--protocol", "tvtool"], "--epochs is the atlas"),
    (["--val-fraction", "0.2"], "selects on the dataset's val split"),
    (["--audit-split", "train"], "--audit-split"),
    (["--objective", "ufm", "--ufm-reading", "x"], "unknown UFM reading"),
    (["--schedule", "linear"], "unknown schedule"),
    (["-g", "atlas:0"], "unknown granularity"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, files, tmp_path, extra, message):
    out = tmp_path / "c.safetensors"
    result = cli(_args(files, "-o", str(out), *extra))
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("tvtool: error:") == 1
    assert result.stdout == ""
    assert not out.exists()


def test_refuses_overwriting_an_input_and_non_vectors(cli, files, tmp_path):
    result = cli(_args(files, "-o", files["tv2"]))
    assert result.exit_code == 2 and "also an input" in result.stderr
    out = tmp_path / "c.safetensors"
    result = cli(["learn-coeffs", files["base"], "--base", files["base"], "-d",
                  "synthetic:shape", "-o", str(out)])
    assert result.exit_code == 2 and "not a task vector" in result.stderr
    result = cli(_args(files, "-o", str(tmp_path / "missing" / "c.safetensors")))
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert not out.exists()


def test_config_arguments_are_one_flat_mapping_of_every_setting():
    # The learner's settings are declared once (LearnerConfig) and held by the command's
    # config; provenance still records every setting under its flag's name, as before.
    config = LearnCoeffsConfig(vectors=("a", "b"), base="tvtool-tiny", output="c",
                               datasets=("synthetic:shape",),
                               learner=LearnerConfig(objective="entropy", steps=5, seed=3))
    arguments = config.arguments()
    assert arguments == {
        "vectors": ["a", "b"], "base": "tvtool-tiny", "output": "c",
        "datasets": ["synthetic:shape"], "control": [], "granularity": "tensor", "shots": 16,
        "split": "train", "val_fraction": None, "partition_seed": 0, "vector_dtype": "fp32",
        "device": "auto", "data_root": None, "merged_out": None,
        "allow_base_mismatch": False, "audit_split": None, "eval_limit": None,
        "path_out": None, "objective": "entropy", "protocol": None, "steps": 5,
        "epochs": None, "lr": None, "weight_decay": None, "batch_size": None,
        "eval_every": None, "patience": None, "negation_weight": 1.0, "negation_loss": None,
        "control_threshold": 0.95, "ufm_threshold": 0.99, "ufm_reading": None, "init": None,
        "grad_clip": None, "augment": None, "schedule": None, "precision": "auto", "seed": 3,
        "workers": 0}
    assert json.loads(json.dumps(arguments)) == arguments
