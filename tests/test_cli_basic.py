import open_clip
import pytest
import torch

from tests.conftest import load


def test_help_lists_subcommands(cli):
    result = cli(["--help"])
    assert result.exit_code == 0
    for name in ("extract", "negate", "apply", "inspect"):
        assert name in result.stdout


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
        import json

        report = json.loads(result.stdout)
        assert report["cosine"][0][0] == pytest.approx(1.0)
        assert abs(report["cosine"][0][1]) < 0.2
    else:
        assert result.stdout == ""
