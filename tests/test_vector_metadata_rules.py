"""Task vectors whose metadata was removed, contradicts itself, or names another activation.

Each case starts from a real vector of the tiny model and edits only its ``tvtool.*`` header,
as a user (or another tool) might have done.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tvtool.errors import InvalidInputError
from tvtool.metadata import FileMeta
from tvtool.vectors import check_architecture, check_vector_consistency, metadata_warnings


def _edited(source: str, target: Path, drop: tuple[str, ...] = (), **changes: str) -> str:
    """Copy a safetensors file with some ``tvtool.*`` metadata keys removed or changed."""
    from safetensors import safe_open

    with safe_open(source, framework="pt") as handle:
        header = dict(handle.metadata())
    for key in drop:
        header.pop("tvtool." + key)
    header.update({"tvtool." + key: value for key, value in changes.items()})
    save_file(load_file(source), str(target), metadata=header)
    return str(target)


def _one_error_line(result) -> None:
    assert result.stderr.startswith("tvtool: error:") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("drop", [("base_fingerprint",), ("architecture",),
                                  ("base_fingerprint", "architecture")])
def test_apply_warns_when_provenance_was_removed(cli, files, tmp_path, drop):
    vector = _edited(files["tv1"], tmp_path / "stripped.safetensors", drop)
    result = cli(["apply", vector, "--base", files["base"], "-o",
                  str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "records no" in line)
    assert warning.startswith("warning:") and "stripped.safetensors" in warning
    for key in drop:
        assert f"tvtool.{key}" in warning


def test_merge_and_eval_warn_when_provenance_was_removed(cli, files, tmp_path):
    vector = _edited(files["tv1"], tmp_path / "stripped.safetensors", ("base_fingerprint",))
    merged = cli(["merge", vector, files["tv2"], "-o", str(tmp_path / "m.safetensors")])
    assert merged.exit_code == 0, merged.stderr
    assert "stripped.safetensors' records no tvtool.base_fingerprint" in merged.stderr
    evaluated = cli(["eval", "--base", files["base"], vector, "-d", "synthetic:shape",
                     "--limit", "8", "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert "records no tvtool.base_fingerprint" in evaluated.stderr
    notes = json.loads(evaluated.stdout)["notes"]
    assert any("records no tvtool.base_fingerprint" in note for note in notes)


def test_complete_metadata_gives_no_warning(files):
    from tvtool.io import open_tensors
    from tvtool.vectors import open_vector_meta

    source = open_tensors(files["tv1"])
    try:
        assert metadata_warnings(open_vector_meta(source, "tv1"), "tv1") == []
    finally:
        source.close()


def test_linear_vector_recorded_as_not_linearized_is_refused(cli, files, tmp_path):
    # Was applied without --approximate-linearized and evaluated as an ordinary network.
    vector = _edited(files["tv1"], tmp_path / "lin.safetensors", mode="linear",
                     linearized="false")
    out = tmp_path / "out.safetensors"
    for args in (["apply", vector, "--base", files["base"], "-o", str(out)],
                 ["eval", "--base", files["base"], vector, "-d", "synthetic:shape",
                  "--limit", "8", "--device", "cpu"],
                 ["merge", vector, files["tv2"], "-o", str(out)]):
        result = cli(args)
        assert result.exit_code == 2, (args[0], result.stderr)
        assert "tvtool.mode=linear but tvtool.linearized=false" in result.stderr
        _one_error_line(result)
        assert not out.exists()


def test_lora_vector_without_lora_factors_is_refused(cli, files, tmp_path):
    vector = _edited(files["tv1"], tmp_path / "lora.safetensors", mode="lora")
    result = cli(["apply", vector, "--base", files["base"], "-o",
                  str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2, result.stderr
    assert "tvtool.mode=lora but holds no LoRA factors" in result.stderr
    _one_error_line(result)


def test_consistency_rule_accepts_consistent_metadata():
    from tvtool.metadata import Kind, Mode

    check_vector_consistency(FileMeta(Kind.TASK_VECTOR, mode=Mode.LINEAR, linearized=True),
                             ["visual.proj"], "v")
    check_vector_consistency(FileMeta(Kind.TASK_VECTOR, mode=Mode.LORA),
                             ["visual.x.lora_A", "visual.x.lora_B"], "v")
    # L-LoRA's linearization is decided by its own flag; the rule does not touch it.
    check_vector_consistency(FileMeta(Kind.TASK_VECTOR, mode=Mode.LLORA, linearized=False),
                             ["visual.x.lora_A", "visual.x.lora_B"], "v")


def test_architecture_rule():
    assert check_architecture("v", "ViT-B-32", "ViT-B-32") is None
    assert check_architecture("v", None, "ViT-B-32") is None
    warning = check_architecture("v", "ViT-B-32", "ViT-B-32-quickgelu")
    assert warning is not None and "activation" in warning
    assert "GELU" in warning and "QuickGELU" in warning
    assert check_architecture("v", "ViT-B-32-quickgelu", "ViT-B-32") is not None
    with pytest.raises(InvalidInputError, match="made for ViT-B-32, the base is ViT-S-32"):
        check_architecture("v", "ViT-B-32", "ViT-S-32")


def test_apply_and_merge_share_the_activation_rule(cli, files, tmp_path):
    # A vector trained on X applied to X-quickgelu: accepted before without a word.
    quick = _edited(files["tv1"], tmp_path / "quick.safetensors",
                    architecture="tvtool-tiny-quickgelu")
    applied = cli(["apply", quick, "--base", files["base"], "-o",
                   str(tmp_path / "a.safetensors")])
    assert applied.exit_code == 0, applied.stderr
    assert "different activation" in applied.stderr
    # merge used to refuse what apply accepted; now both warn.
    merged = cli(["merge", files["tv2"], quick, "-o", str(tmp_path / "m.safetensors")])
    assert merged.exit_code == 0, merged.stderr
    assert "different activation" in merged.stderr
    evaluated = cli(["eval", "--base", files["base"], quick, "-d", "synthetic:shape",
                     "--limit", "8", "--device", "cpu"])
    assert evaluated.exit_code == 0 and "different activation" in evaluated.stderr


def test_apply_and_merge_refuse_another_architecture(cli, files, tmp_path):
    other = _edited(files["tv1"], tmp_path / "other.safetensors", architecture="ViT-S-32")
    out = tmp_path / "out.safetensors"
    applied = cli(["apply", other, "--base", files["base"], "-o", str(out)])
    merged = cli(["merge", files["tv2"], other, "-o", str(out)])
    for result in (applied, merged):
        assert result.exit_code == 2, result.stderr
        assert "was made for ViT-S-32" in result.stderr and "tvtool-tiny" in result.stderr
        _one_error_line(result)
    assert not out.exists()
