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
    result = cli([*COMMON, "--mode", "lora", "--lora-rank", "2", "--lora-targets", "v,q,mlp",
                  "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mode"] == "lora" and summary["steps"] == 2 and summary["tensors"] == 24
    source = open_tensors(str(out))
    meta = FileMeta.from_header(source.metadata, "tv")
    source.close()
    assert meta.kind is Kind.TASK_VECTOR and meta.mode is Mode.LORA and not meta.linearized
    assert meta.extra["lora_rank"] == "2" and float(meta.extra["lora_alpha"]) == 32.0
    assert meta.extra["lora_targets"] == "q,v,mlp"
    assert meta.provenance["arguments"]["batch_size"] == 4
    # Where the examples came from: the training split's manifest, generator version included.
    from tvtool.data import split_manifest
    from tvtool.synthetic_world.tasks import GENERATOR_VERSION

    data = meta.provenance["dataset"]
    assert data["name"] == "synthetic:shape" and data["split"] == "train"
    assert data["manifest"]["source"]["generator_version"] == GENERATOR_VERSION
    assert data["manifest"]["hashes"] == split_manifest("synthetic:shape", seed=0)["hashes"]
    assert meta.provenance["versions"]["open_clip"] and meta.provenance["time"]


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


def _dense_qv(vector: dict, scale: float) -> dict:
    """Independent ΔW of a q,v LoRA vector: in_proj rows [q; 0; v], each s·B·A."""
    out = {}
    for key in vector:
        if key.endswith(".in_proj_weight.q.lora_A"):
            weight = key[: -len(".q.lora_A")]
            q, v = (scale * vector[f"{weight}.{kind}.lora_B"].double()
                    @ vector[f"{weight}.{kind}.lora_A"].double() for kind in "qv")
            out[weight] = torch.cat([q, torch.zeros_like(q), v])
    return out


def test_llora_vector_folds_into_the_weights(cli, tmp_path):
    """Published L-LoRA is an ordinary model: --checkpoint-out and apply give W0 + s·B·A0."""
    from tvtool.io import open_tensors
    from tvtool.metadata import FileMeta, Mode
    from tvtool.models import load_clip

    out, checkpoint = tmp_path / "ll.safetensors", tmp_path / "ft.safetensors"
    result = cli([*COMMON, "--mode", "llora", "--lora-rank", "2", "--lora-alpha", "4",
                  "-o", str(out), "--checkpoint-out", str(checkpoint)])
    assert result.exit_code == 0, result.stderr
    source = open_tensors(str(out))
    meta = FileMeta.from_header(source.metadata, "ll")
    source.close()
    assert meta.mode is Mode.LLORA and not meta.linearized
    assert meta.extra["lora_targets"] == "q,v"
    vector = load_file(str(out))
    assert len(vector) == 12
    dense = _dense_qv(vector, 4.0 / 2)
    assert len(dense) == 3 and all(d.abs().max() > 0 for d in dense.values())
    base = load_clip(BASE).model.state_dict()
    tuned = load_file(str(checkpoint))
    applied_path = tmp_path / "applied.safetensors"
    result = cli(["apply", "--base", BASE, str(out), "-o", str(applied_path)])
    assert result.exit_code == 0, result.stderr
    applied = load_file(str(applied_path))
    for name, tensor in base.items():
        expected = (tensor.double() + dense[name]).float() if name in dense else tensor
        torch.testing.assert_close(tuned[name], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(applied[name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("args", [
    ["--mode", "partial", "-o", "x.safetensors"],
    ["--mode", "llora-net", "--checkpoint-out", "ft.safetensors", "-o", "x.safetensors"],
    ["--lora-targets", "q,qkv", "--mode", "lora", "-o", "x.safetensors"],
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


def test_extracted_vector_holds_what_a_finetune_vector_holds_and_merges(cli, tmp_path):
    """extract's default keeps the image encoder, as finetune does: the two merge as they are."""
    vector, checkpoint = tmp_path / "ft.tv.safetensors", tmp_path / "ft.safetensors"
    result = cli([*COMMON, "-o", str(vector), "--checkpoint-out", str(checkpoint)])
    assert result.exit_code == 0, result.stderr
    extracted = tmp_path / "ex.tv.safetensors"
    result = cli(["extract", str(checkpoint), "--base", BASE, "-o", str(extracted)])
    assert result.exit_code == 0, result.stderr
    tuned, ext = load_file(str(vector)), load_file(str(extracted))
    base = load_file(str(checkpoint))
    image = {n for n, t in base.items() if n.startswith("visual.") and t.is_floating_point()}
    assert set(ext) == set(tuned) == image
    for name in tuned:
        torch.testing.assert_close(ext[name], tuned[name], rtol=0, atol=1e-7)
    merged = tmp_path / "m.safetensors"
    result = cli(["merge", str(vector), str(extracted), "-o", str(merged)])
    assert result.exit_code == 0, result.stderr
    assert set(load_file(str(merged))) == image
    # --keep all opts in to every floating tensor (the text tower's deltas are zero here).
    whole = tmp_path / "all.tv.safetensors"
    result = cli(["extract", str(checkpoint), "--base", BASE, "-o", str(whole), "--keep", "all"])
    assert result.exit_code == 0, result.stderr
    assert set(load_file(str(whole))) == {n for n, t in base.items() if t.is_floating_point()}


def test_bare_resume_means_yes():
    from tvtool.cli.common import RESUME_NAMES
    from tvtool.cli.finetune import bare_resume
    from tvtool.finetune.config import RESUME_CHOICES

    assert RESUME_NAMES == RESUME_CHOICES
    assert bare_resume(["--resume"]) == ["--resume", "yes"]
    assert bare_resume(["--resume", "-o", "x"]) == ["--resume", "yes", "-o", "x"]
    assert bare_resume(["--resume", "auto", "-o", "x"]) == ["--resume", "auto", "-o", "x"]
    assert bare_resume(["-o", "x", "--", "--resume"]) == ["-o", "x", "--", "--resume"]


def test_workdir_runs_resume_automatically_and_refuse_another_run(cli, tmp_path, monkeypatch):
    """A CI retry of the same command continues; other settings are refused, the state kept."""
    import tvtool.finetune.loop as loop

    workdir = tmp_path / "wd"
    state = workdir / "resume.safetensors"
    args = [*COMMON, "--steps", "3", "--workdir", str(workdir), "--checkpoint-every", "1",
            "-o", str(tmp_path / "tv.safetensors")]  # the last --steps wins
    # No state yet: --resume (bare: yes) refuses; the default (auto) would start.
    result = cli([*args, "--resume"])
    assert result.exit_code == 2 and "no training state" in result.stderr
    # Ctrl-C in the second step: the message says where the state is and how to continue.
    real = loop.learning_rate

    def interrupted(step, *rest):
        if step == 1:
            raise KeyboardInterrupt
        return real(step, *rest)

    monkeypatch.setattr(loop, "learning_rate", interrupted)
    result = cli(args)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == (
        f"tvtool: error: interrupted; stopped after step 1 of 3; the training state of step 1 "
        f"is in {state}: run the same command again to continue from it")
    monkeypatch.setattr(loop, "learning_rate", real)
    saved = state.read_bytes()
    other = cli([*args, "--lr", "2e-3"])
    assert other.exit_code == 2 and "different run" in other.stderr
    assert other.stderr.count("tvtool: error") == 1
    assert "--resume no" in other.stderr.strip().splitlines()[-1]
    assert state.read_bytes() == saved
    again = cli(args)
    assert again.exit_code == 0, again.stderr
    assert "resuming from step 1 of 3" in again.stderr
    over = cli([*args, "--lr", "2e-3", "--resume", "no", "--json"])
    assert over.exit_code == 0, over.stderr
    assert json.loads(over.stdout)["resumed_from"] == 0
    assert "--resume no replaces it" in over.stderr
