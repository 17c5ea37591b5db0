import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch

from tests.conftest import load


def test_help_lists_subcommands(cli):
    result = cli(["--help"])
    assert result.exit_code == 0
    for name in ("extract", "negate", "apply", "inspect", "convert"):
        assert name in result.stdout


def test_python_dash_m_runs_the_same_app():
    out = subprocess.run([sys.executable, "-m", "tvtool", "--help"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    for name in ("finetune", "extract", "merge", "negate", "learn-coeffs", "eval", "apply",
                 "inspect", "demo"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tvtool", "no-such-command"],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert bad.returncode == 2
    assert "no-such-command" in bad.stderr, bad.stderr


def test_log_lines_are_printed_verbatim(capsys):
    from tvtool.cli.common import log

    log("[demo] fine-tuning [bold]x[/bold] under /tmp/[a]")
    assert capsys.readouterr().err == "[demo] fine-tuning [bold]x[/bold] under /tmp/[a]\n"


def test_cli_import_does_not_load_the_library():
    # `tvtool --help` must stay fast: command modules import torch/open_clip lazily.
    code = ("import sys, tvtool.cli.app; "
            "print(sorted(m for m in ('torch', 'open_clip', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "[]"


def test_pipeline_extract_negate_apply_loads_in_open_clip(cli, files, tmp_path):
    vector = cli(["extract", files["ft1"], "--base", files["base"], "-o", "-"])
    assert vector.exit_code == 0, vector.stderr
    negated = cli(["negate", "-", "-o", "-"], input=vector.stdout_bytes)
    assert negated.exit_code == 0, negated.stderr
    out = tmp_path / "edited.safetensors"
    applied = cli(["apply", "--base", files["base"], "-", "-o", str(out)],
                  input=negated.stdout_bytes)
    assert applied.exit_code == 0, applied.stderr
    assert applied.stdout.strip() == str(out)
    base, ft, edited = load(files["base"]), load(files["ft1"]), load(str(out))
    for name in base:
        torch.testing.assert_close(edited[name], 2 * base[name] - ft[name], rtol=0, atol=1e-6)
    model = open_clip.create_model("tvtool-tiny", pretrained=str(out))
    torch.testing.assert_close(model.state_dict()["visual.proj"], edited["visual.proj"])


def test_apply_refuses_checkpoint_as_vector(cli, files, tmp_path):
    out = tmp_path / "x.safetensors"
    result = cli(["apply", "--base", files["base"], files["base"], "-o", str(out)])
    assert result.exit_code == 2
    assert "not a task vector" in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", [[], ["--json"]])
def test_inspect_reports_cosine(cli, files, flag):
    result = cli(["inspect", files["tv1"], files["tv2"], *flag])
    assert result.exit_code == 0, result.stderr
    if flag:
        report = json.loads(result.stdout)
        assert report["cosine"][0][0] == pytest.approx(1.0)
        assert abs(report["cosine"][0][1]) < 0.2
        assert [f["kind"] for f in report["files"]] == ["task_vector", "task_vector"]
        assert report["files"][0]["metadata"]["tvtool.dataset"] == "task1"
        assert report["files"][0]["provenance"]["command"] == "extract"
        assert len(report["files"][0]["largest"]) == 10
        norms = report["files"][0]["norms"]
        assert report["files"][0]["norm"] == pytest.approx(sum(v * v for v in norms.values())
                                                           ** 0.5)
    else:
        # Human-readable tables go to stderr (docs/cli.md); stdout carries data only.
        assert result.stdout == ""
        assert "cosine similarity" in result.stderr
        assert "tvtool.dataset" in result.stderr


def test_inspect_checkpoints_and_plain_files(cli, files, tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(plain))
    result = cli(["inspect", files["base"], str(plain), files["tv1"], "--json", "--top", "2"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [f["kind"] for f in report["files"]] == ["checkpoint", None, "task_vector"]
    assert "norm" not in report["files"][0]
    assert len(report["files"][2]["largest"]) == 2
    assert report["cosine"] is None


def test_extract_reports_normalised_prefix_and_json(cli, files, tmp_path):
    wrapped = tmp_path / "wrapped.safetensors"
    from tvtool.io import write_tensors

    write_tensors(str(wrapped), {f"module.{k}": v for k, v in load(files["ft1"]).items()})
    out = tmp_path / "tv.safetensors"
    result = cli(["extract", str(wrapped), "--base", files["base"], "-o", str(out), "--json",
                  "--dataset", "cars", "--mode", "attn"])
    assert result.exit_code == 0, result.stderr
    assert "removing the 'module.' prefix" in result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and report["tensors"] > 0
    meta = json.loads(cli(["inspect", str(out), "--json"]).stdout)["files"][0]["metadata"]
    assert meta["tvtool.mode"] == "attn" and meta["tvtool.dataset"] == "StanfordCars"
    assert meta["tvtool.base_fingerprint"].startswith("sha256:")


def test_negate_scale_and_history(cli, files, tmp_path):
    out = tmp_path / "neg.safetensors"
    result = cli(["negate", files["tv1"], "-o", str(out), "--coef", "0.5"])
    assert result.exit_code == 0, result.stderr
    tv, neg = load(files["tv1"]), load(str(out))
    for name in tv:
        torch.testing.assert_close(neg[name], -0.5 * tv[name])
    meta = json.loads(cli(["inspect", str(out), "--json"]).stdout)["files"][0]["metadata"]
    assert json.loads(meta["tvtool.operations"]) == [{"coef": 0.5, "op": "negate"}]


def test_apply_two_vectors_with_coefficients_and_env_base(cli, files, tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_BASE", files["base"])
    out = tmp_path / "multi.safetensors"
    result = cli(["apply", files["tv1"], files["tv2"], "-a", "0.3", "-a", "0.7", "-o", str(out),
                  "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["details"]["coefficients"] == [0.3, 0.7]
    base, tv1, tv2 = load(files["base"]), load(files["tv1"]), load(files["tv2"])
    edited = load(str(out))
    for name, tensor in base.items():
        expected = tensor.clone()
        if name in tv1:
            expected = expected + 0.3 * tv1[name] + 0.7 * tv2[name]
        torch.testing.assert_close(edited[name], expected)
