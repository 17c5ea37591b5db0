"""`tvtool apply --hf-dir`: an open_clip Hugging Face directory that open_clip itself loads."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from tests.conftest import load


def _expected(files, coefs: dict[str, float]) -> dict[str, torch.Tensor]:
    """base + Σ λ τ, computed from the files (independent of tvtool's apply)."""
    out = {n: t.double() for n, t in load(files["base"]).items()}
    for key, coef in coefs.items():
        for name, delta in load(files[key]).items():
            out[name] = out[name] + coef * delta.double()
    return {n: t.float() for n, t in out.items()}


def test_hf_dir_loads_with_open_clip_local_dir(cli, tmp_path, files):
    target = tmp_path / "edited"
    result = cli(["apply", files["tv1"], files["tv2"], "-b", files["base"], "-a", "0.7",
                  "-a", "0.3", "--hf-dir", str(target), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["details"]["files"]) == sorted(p.name for p in target.iterdir())
    assert {p.name for p in target.iterdir()} == {"open_clip_model.safetensors",
                                                  "open_clip_config.json", "README.md"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tvtool")]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{target}")
    expected = _expected(files, {"tv1": 0.7, "tv2": 0.3})
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=1e-6)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{target}")
    assert tokenizer(["a photo"]).shape[-1] == 16  # the tiny config's context length
    config = json.loads((target / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config("tvtool-tiny")
    assert set(config["preprocess_cfg"]) >= {"mean", "std"}


def test_model_card_records_the_recipe(cli, tmp_path, files):
    from tvtool.io import open_tensors
    from tvtool.models import fingerprint

    merged = tmp_path / "merged.safetensors"
    assert cli(["merge", files["tv1"], files["tv2"], "-m", "ties", "-o", str(merged)]
               ).exit_code == 0
    target = tmp_path / "card"
    result = cli(["apply", files["tv1"], str(merged), "-b", files["base"], "-a", "0.5",
                  "-a", "0.25", "--hf-dir", str(target)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(target)
    card = (target / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: open_clip" in card
    base = open_tensors(files["base"])
    vector = open_tensors(files["tv1"])
    try:
        assert fingerprint(base) in card and fingerprint(vector) in card
    finally:
        base.close()
        vector.close()
    assert files["base"] in card
    assert "| 1 | `tv1.safetensors` | 0.5 | task1 | full | no |" in card
    assert "| 2 | `merged.safetensors` | 0.25 |" in card
    assert "Method:** `ties`" in card
    meta = load_meta(target / "open_clip_model.safetensors")
    assert meta["tvtool.kind"] == "checkpoint" and json.loads(meta["tvtool.coefficients"]) \
        == [0.5, 0.25]


def load_meta(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("case", ["both", "neither", "nonempty"])
def test_hf_dir_usage_errors(cli, tmp_path, files, case):
    target = tmp_path / "out"
    args = ["apply", files["tv1"], "-b", files["base"]]
    if case == "both":
        args += ["-o", str(tmp_path / "x.safetensors"), "--hf-dir", str(target)]
    elif case == "nonempty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        args += ["--hf-dir", str(target)]
    result = cli(args)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    if case == "nonempty":
        assert [p.name for p in target.iterdir()] == ["keep.txt"]
    else:
        assert not target.exists()


def test_hf_dir_needs_a_complete_base(cli, tmp_path, files, tiny_state):
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind

    partial = tmp_path / "image-only.safetensors"
    write_tensors(str(partial), {n: t for n, t in tiny_state.items() if n.startswith("visual.")},
                  FileMeta(kind=Kind.CHECKPOINT, architecture="tvtool-tiny").to_header())
    target = tmp_path / "out"
    result = cli(["apply", files["tv1"], "-b", str(partial), "--allow-base-mismatch",
                  "--hf-dir", str(target)])
    assert result.exit_code == 2 and "complete model" in result.stderr
    assert not target.exists()
