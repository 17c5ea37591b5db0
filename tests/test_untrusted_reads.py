"""Reads of untrusted files are bounded (issue 22 §2, §4): errors, network, YAML, NaN, BatchNorm.

Each test feeds a small hostile input, just past a bound where there is one, and checks the
documented refusal: one short line, the documented exit code, nothing written.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY
from tvtool.errors import MAX_LINE, InvalidInputError, bounded_line
from tvtool.io import write_tensors
from tvtool.io.yaml_io import parse_yaml
from tvtool.limits import (
    MAX_DOCUMENT_BYTES,
    MAX_INT_DIGITS,
    MAX_NESTING,
    MAX_YAML_BYTES,
    loads_json,
    short_list,
    short_name,
)
from tvtool.metadata import FileMeta, Kind


def _error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tvtool: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ------------------------------------------------------------------ error lines are short


def test_bounded_line_keeps_short_text_and_cuts_long_runs():
    assert bounded_line("a  b\n c") == "a b c"
    path = "/tmp/" + "d" * 100 + "/file.safetensors"
    assert bounded_line(f"cannot read {path}") == f"cannot read {path}"  # 122 chars: whole
    line = bounded_line("value 'x" + "x" * 10**6 + "' is bad")
    assert len(line) < 250 and line.endswith("' is bad")
    many = bounded_line(" ".join(["word"] * 10**5))
    assert len(many) <= MAX_LINE


def test_short_names_and_lists_are_bounded():
    assert short_name("visual.transformer.resblocks.11.attn.in_proj_weight") == \
        "'visual.transformer.resblocks.11.attn.in_proj_weight'"
    cut = short_name("n" * 10**6 + ".tail", 80)
    assert len(cut) <= 82 and cut.endswith(".tail'")
    assert len(short_list(["x" * 10**6] * 10)) < 300


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    from tvtool.models import load_clip

    return {k: v.contiguous() for k, v in load_clip(TINY).model.state_dict().items()}


def test_huge_values_give_short_error_lines(tmp_path, cli, state):
    # The five reported sources of multi-megabyte error lines.
    big = "x" * 100_000  # within the YAML bound: the value itself must be cut
    (tmp_path / "method.yaml").write_text(f"vectors: [v.safetensors]\nmethod: {big}\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4)},
              str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"text_config": {"hidden_act": "g" * 10**6}}))
    save_file({**state, "y" * 10**6: torch.zeros(1)}, str(tmp_path / "names.safetensors"))
    write_tensors(str(tmp_path / "arch.safetensors"), state,
                  FileMeta(kind=Kind.CHECKPOINT, architecture="z" * 10**6).to_header())
    vector = tmp_path / "vec.safetensors"
    write_tensors(str(vector), {"visual.proj": torch.zeros(2, 2)},
                  FileMeta(kind=Kind.TASK_VECTOR, architecture="w" * 10**6).to_header())
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["merge", "--config", str(tmp_path / "method.yaml"), "-o", out],
         "unknown merge method"),
        (["convert", str(hf), "-o", out], "uses activation"),
        (["extract", str(tmp_path / "names.safetensors"), "--base", TINY, "-o", out],
         "not in the base"),
        (["eval", "--base", str(tmp_path / "arch.safetensors"), "-d", "synthetic:shape"],
         "records the architecture"),
        (["apply", "--base", TINY, str(vector), "-o", out], "was made for"),
    ]
    for args, fragment in cases:
        line = _error_line(cli(args))
        assert fragment in line
        assert len(line) < 300, f"{args[0]}: {len(line)} characters"


# ------------------------------------------------------------------ no network from a file


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a connection fails the test."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("tvtool tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("architecture", ["roberta-ViT-B-32", "ViT-B-16-SigLIP"])
def test_checkpoint_architecture_never_triggers_network_access(tmp_path, cli, state, offline,
                                                               architecture):
    checkpoint = tmp_path / "ckpt.safetensors"
    write_tensors(str(checkpoint), state,
                  FileMeta(kind=Kind.CHECKPOINT, architecture=architecture).to_header())
    line = _error_line(cli(["eval", "--base", str(checkpoint), "-d", "synthetic:shape"]))
    assert "never goes online for a name read from a file" in line
    assert "--base NAME:PATH" in line
    assert not offline


def test_adapter_architecture_never_triggers_network_access(tmp_path, cli, offline):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["out_proj"]}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.x.lora_B.weight": torch.zeros(4, 2)},
              str(adapter / "adapter_model.safetensors"),
              {"format": "pt", "tvtool.architecture": "roberta-ViT-B-32"})
    line = _error_line(cli(["convert", str(adapter), "-o", str(tmp_path / "v.safetensors")]))
    assert "'roberta-ViT-B-32': its text tower is the Hugging Face model" in line
    assert "--architecture" in line
    assert not offline


def test_what_needs_the_network():
    from tvtool.models.refs import network_need

    assert network_need("roberta-ViT-B-32", tokenizer=False) is not None  # HF text tower
    assert network_need("ViT-B-16-SigLIP", tokenizer=False) is None  # built offline
    assert network_need("ViT-B-16-SigLIP") is not None  # its tokenizer is on the hub
    assert network_need("hf-hub:org/model") is not None
    assert network_need(TINY) is None


# ------------------------------------------------------------------ YAML and JSON bounds


@pytest.fixture(params=["libyaml", "python"])
def loader(request, monkeypatch):
    """Run a test with each YAML loader tvtool may use."""
    from tvtool.io import yaml_io

    if request.param == "python":
        monkeypatch.setattr(yaml_io, "_CLoader", None)
    elif yaml_io._CLoader is None:
        pytest.skip("PyYAML without libyaml")
    return request.param


def test_yaml_bounds_hold_with_either_loader(loader):
    with pytest.raises(InvalidInputError, match="aliases"):
        parse_yaml("x: &x [1]\ny: *x\n", "doc")
    with pytest.raises(InvalidInputError, match=f"nested more than {MAX_NESTING}"):
        parse_yaml("[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), "doc")
    assert parse_yaml("x: [[1]]\ny: {a: 2}", "doc") == {"x": [[1]], "y": {"a": 2}}
    # Both loaders count the same way: 63 lists around a scalar are 64 levels, 64 are 65.
    assert parse_yaml("[" * 63 + "1" + "]" * 63, "doc") is not None
    with pytest.raises(InvalidInputError, match="nested more than"):
        parse_yaml("[" * 64 + "1" + "]" * 64, "doc")
    with pytest.raises(InvalidInputError, match=f"larger than {MAX_YAML_BYTES // 1024} KiB"):
        parse_yaml("#" * (MAX_YAML_BYTES + 1), "doc")


def test_base60_integers_are_bounded(loader):
    # YAML 1.1 reads 1:2:3 as a base-60 integer, built by repeated multiplication: quadratic.
    assert parse_yaml("x: 1:30", "doc") == {"x": 90}
    text = "x: 1" + ":1" * (MAX_INT_DIGITS // 2)
    started = time.process_time()
    with pytest.raises(InvalidInputError, match="an integer of"):
        parse_yaml(text, "doc")
    assert time.process_time() - started < 1


def test_json_in_a_file_header_is_bounded(tmp_path, cli):
    assert loads_json("[1]", "doc") == [1]
    with pytest.raises(InvalidInputError, match="larger than 4 MiB"):
        loads_json(" " * MAX_DOCUMENT_BYTES + "[]", "doc")
    vector = tmp_path / "v.safetensors"
    header = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY).to_header()
    header["tvtool.provenance"] = "{" + " " * MAX_DOCUMENT_BYTES + "}"
    write_tensors(str(vector), {"visual.proj": torch.zeros(2, 2)}, header)
    line = _error_line(cli(["negate", str(vector), "-o", str(tmp_path / "n.safetensors")]))
    assert "tvtool.provenance is larger than 4 MiB" in line


def test_json_documents_are_bounded(tmp_path, cli, files):
    coefs = tmp_path / "coefs.json"
    coefs.write_text("[0.5" + " " * MAX_DOCUMENT_BYTES + "]")
    line = _error_line(cli(["merge", files["tv1"], "--coefs", str(coefs), "-o",
                            str(tmp_path / "o.safetensors")]))
    assert "larger than 4 MiB" in line


# ------------------------------------------------------------------ NaN logits, BatchNorm


def test_nan_logits_are_an_error_naming_the_batch(tmp_path, cli, files):
    # Finite weights whose forward pass overflows: the features become NaN once normalised.
    vector = tmp_path / "huge.safetensors"
    header = FileMeta.from_header(_header(files["tv1"]), "tv1").to_header()
    write_tensors(str(vector), {"visual.proj": torch.full((64, 64), 3e38)}, header)
    result = cli(["eval", "--base", files["base"], str(vector), "--allow-base-mismatch",
                  "-d", "synthetic:shape", "--limit", "8", "--batch-size", "4"])
    line = _error_line(result, code=1)
    assert "NaN or Inf logits on synthetic:shape (test split), batch 0 (examples 0..3)" in line
    assert "accuracy" not in result.stdout


def _header(path: str) -> dict[str, str]:
    from tvtool.io import open_tensors

    source = open_tensors(path)
    try:
        return dict(source.metadata)
    finally:
        source.close()


def _batchnorm_files(tmp_path: Path, state: dict[str, torch.Tensor]) -> tuple[str, str]:
    stats = {"visual.bn.running_mean": torch.zeros(4), "visual.bn.running_var": torch.ones(4)}
    base = tmp_path / "base.safetensors"
    save_file({**state, **stats}, str(base))
    tuned = {**state, **stats, "visual.bn.running_var": torch.full((4,), 0.5)}
    tuned["visual.proj"] = state["visual.proj"] + 0.01
    finetuned = tmp_path / "ft.safetensors"
    write_tensors(str(finetuned), tuned, FileMeta(kind=Kind.CHECKPOINT,
                                                  architecture=TINY).to_header())
    return f"{TINY}:{base}", str(finetuned)


def test_extract_and_apply_warn_when_batchnorm_statistics_move(tmp_path, cli, state):
    base, finetuned = _batchnorm_files(tmp_path, state)
    vector = tmp_path / "tv.safetensors"
    result = cli(["extract", finetuned, "--base", base, "-o", str(vector)])
    assert result.exit_code == 0, result.stderr
    assert "changes the BatchNorm statistics of 1 tensors (e.g. 'visual.bn.running_var')" \
        in result.stderr
    result = cli(["apply", "--base", base, str(vector), "--coef", "-1", "-o",
                  str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert "changes the BatchNorm statistics of 1 tensors" in result.stderr


def test_no_batchnorm_warning_for_ordinary_vectors(cli, files, tmp_path):
    result = cli(["apply", "--base", files["base"], files["tv1"], "-o",
                  str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert "BatchNorm" not in result.stderr
