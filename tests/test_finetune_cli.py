"""``tvtool finetune`` on the command line: outputs, JSON, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

BASE = "tvtool-tiny:random"
COMMON = ["finetune", "--base", BASE, "--dataset", "synthetic:shape", "--steps", "2",
          "--batch-size", "4", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_json_summary_and_vector_metadata(cli, tmp_path):
    from tvtool.io import open_tensors
    from tvtool.metadata import FileMeta, Kind, Mode

    out = tmp_path / "tv.safetensors"
    result = cli([*COMMON, "--mode", "lora", "--lora-rank", "2", "--lora-targets", "attn,mlp",
                  "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mode"] == "lora" and summary["steps"] == 2 and summary["tensors"] == 24
    source = open_tensors(str(out))
    meta = FileMeta.from_header(source.metadata, "tv")
    source.close()
    assert meta.kind is Kind.TASK_VECTOR and meta.mode is Mode.LORA and not meta.linearized
    assert meta.extra["lora_rank"] == "2" and float(meta.extra["lora_alpha"]) == 32.0
    assert meta.extra["lora_targets"] == "attn,mlp"
    assert meta.provenance["arguments"]["batch_size"] == 4


def test_vector_to_stdout_and_checkpoint_loadable(cli, tmp_path):
    from tvtool.models import load_clip

    checkpoint = tmp_path / "ft.safetensors"
    result = cli([*COMMON, "--mode", "attn", "-o", "-", "--checkpoint-out", str(checkpoint)])
    assert result.exit_code == 0, result.stderr
    vector = load_bytes(result.stdout_bytes)
    assert vector and all(".attn." in k for k in vector)
    tuned = load_clip(str(checkpoint)).model.state_dict()
    base = load_clip(BASE).model.state_dict()
    for name, delta in vector.items():
        torch.testing.assert_close(tuned[name], base[name] + delta, rtol=0, atol=1e-7)
    assert load_file(str(checkpoint)).keys() == base.keys()


@pytest.mark.parametrize("args", [
    ["--mode", "partial", "-o", "x.safetensors"],
    ["--mode", "llora", "--checkpoint-out", "ft.safetensors", "-o", "x.safetensors"],
    ["-o", "-", "--json"],
    ["--resume", "-o", "x.safetensors"],
    ["--lora-targets", ",", "--mode", "lora", "-o", "x.safetensors"],
    ["--precision", "fp64", "-o", "x.safetensors"],
])
def test_usage_errors_exit_2(cli, tmp_path, args):
    result = cli([*COMMON, *[a.replace("x.safetensors", str(tmp_path / "x.safetensors"))
                             for a in args]])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "error" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_output_directory_fails_before_training(cli, tmp_path):
    result = cli([*COMMON, "-o", str(tmp_path / "missing" / "tv.safetensors")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_stdout_carries_only_the_path(cli, tmp_path):
    out = tmp_path / "tv.safetensors"
    result = cli([*COMMON, "--mode", "linear", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.stat().st_size > 0
