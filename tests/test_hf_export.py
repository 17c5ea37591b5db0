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
    # Publishable: the base's file name and fingerprint, never a local path.
    assert str(tmp_path) not in card and str(files["root"]) not in card
    assert "the base `base.safetensors`" in card
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


def _fingerprint_of(path: str) -> str:
    from tvtool.io import open_tensors
    from tvtool.models import fingerprint

    source = open_tensors(path)
    try:
        return fingerprint(source)
    finally:
        source.close()


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_of_a_merged_vector_lists_its_sources_and_datasets(cli, tmp_path, files):
    # The merge's own source records reach the card: datasets in the YAML, and per merged
    # vector its file name, mode and fingerprint (computed here from the files themselves).
    merged = tmp_path / "merged.safetensors"
    assert cli(["merge", files["tv1"], files["tv2"], "-o", str(merged)]).exit_code == 0
    target = tmp_path / "card"
    result = cli(["apply", str(merged), "-b", files["base"], "--hf-dir", str(target)])
    assert result.exit_code == 0, result.stderr
    card = (target / "README.md").read_text()
    assert _front_matter(card)["datasets"] == ["task1", "task2"]
    for key, dataset in (("tv1", "task1"), ("tv2", "task2")):
        row = f"| `{key}.safetensors` | {dataset} | full | no | `{_fingerprint_of(files[key])}` |"
        assert row in card
    assert str(files["root"]) not in card


def test_card_publishes_image_folder_names_not_paths(cli, tmp_path, files):
    from tvtool.io import open_tensors, write_tensors

    source = open_tensors(files["tv1"])
    try:
        tensors = {n: source.get(n) for n in source.keys()}
        header = dict(source.metadata)
    finally:
        source.close()
    folder = tmp_path / "private" / "my-pets"
    header["tvtool.dataset"] = f"imagefolder:{folder}"
    vector = tmp_path / "pets.safetensors"
    write_tensors(str(vector), tensors, header)
    target = tmp_path / "card"
    result = cli(["apply", str(vector), "-b", f"tvtool-tiny:{files['base']}",
                  "--hf-dir", str(target)])
    assert result.exit_code == 0, result.stderr
    card = (target / "README.md").read_text()
    assert str(tmp_path) not in card and "/private/" not in card
    assert _front_matter(card)["datasets"] == ["imagefolder:my-pets"]
    assert "the base `tvtool-tiny:base.safetensors`" in card


def test_card_license_and_base_model(cli, tmp_path, files):
    target = tmp_path / "unknown"
    result = cli(["apply", files["tv1"], "-b", files["base"], "--hf-dir", str(target)])
    assert result.exit_code == 0, result.stderr
    card = (target / "README.md").read_text()
    matter = _front_matter(card)
    assert "license" not in matter and "base_model" not in matter
    assert "**License:** not stated" in card and "--license" in result.stderr
    target = tmp_path / "given"
    result = cli(["apply", files["tv1"], "-b", files["base"], "--hf-dir", str(target),
                  "--license", "apache-2.0"])
    assert result.exit_code == 0, result.stderr
    card = (target / "README.md").read_text()
    assert _front_matter(card)["license"] == "apache-2.0" and "not stated" not in card
    for bad in (["--license", "Apache 2.0"], ["--license", "mit"]):
        args = ["apply", files["tv1"], "-b", files["base"], *bad]
        args += ["--hf-dir", str(tmp_path / "x")] if bad[1] != "mit" else \
            ["-o", str(tmp_path / "x.safetensors")]
        result = cli(args)
        assert result.exit_code == 2 and "--license" in result.stderr, result.stderr


def test_card_base_facts_from_the_reference():
    # base_model: the Hugging Face repository open_clip downloads a pretrained tag from.
    import open_clip

    from tvtool.models.hub import card_base

    tagged = card_base("ViT-B-32:laion2b_s34b_b79k", "sha256:x")
    hub = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].strip("/")
    assert tagged.hub_id == hub and tagged.name == "ViT-B-32:laion2b_s34b_b79k"
    assert card_base("hf-hub:org/model", "").hub_id == "org/model"
    assert card_base("tvtool-tiny", "").license == "mit"
    local = card_base("ViT-B-32:/home/me/weights.pt", "")
    assert (local.name, local.hub_id, local.license) == ("ViT-B-32:weights.pt", None, None)
    assert card_base("/home/me/ckpt.safetensors", "").name == "ckpt.safetensors"
    assert card_base("tvtool-tiny", "", "cc-by-4.0").license == "cc-by-4.0"
