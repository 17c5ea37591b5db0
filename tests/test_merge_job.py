"""A merge config that produces the model (issue 25 §6): base, apply, per-vector parameters,
dtype and sweep in one ``tvtool merge --config``; every output confined to the config's folder.

Expectations are recomputed here with plain torch from the input files (merged vector, applied
checkpoint) or from an independent evaluation (the sweep's test accuracy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import load


@pytest.fixture()
def repo(tmp_path, files) -> Path:
    """A folder holding two task vectors, as a repository checkout would."""
    folder = tmp_path / "repo"
    folder.mkdir()
    for key in ("tv1", "tv2"):
        shutil.copy(files[key], folder / f"{key}.safetensors")
    return folder


def _write(folder: Path, document: dict, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _job(files, **extra) -> dict:
    return {"vectors": ["tv1.safetensors", "tv2.safetensors"], "coef": [0.3, 0.7],
            "output": "merged.tv.safetensors", "base": files["base"], **extra}


def test_one_config_writes_the_vector_the_checkpoint_and_the_model_card(cli, repo, files):
    config = _write(repo, _job(files, apply={"coef": 0.8, "output": "model.safetensors",
                                             "hf_dir": "clip-merged", "license": "mit"}))
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 0, result.stderr
    vector, model, hf_dir = (repo / "merged.tv.safetensors", repo / "model.safetensors",
                             repo / "clip-merged")
    assert result.stdout.splitlines() == [str(vector), str(model), str(hf_dir)]
    t1, t2 = load(str(repo / "tv1.safetensors")), load(str(repo / "tv2.safetensors"))
    base, merged, applied = load(files["base"]), load(str(vector)), load(str(model))
    assert set(merged) == set(t1)
    for name in t1:
        expected = (0.3 * t1[name].double() + 0.7 * t2[name].double()).float()
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7)
    # The checkpoint: base + 0.8 · merged on the vector's tensors, the base elsewhere.
    assert set(applied) == set(base)
    for name, tensor in base.items():
        expected = tensor.double() + 0.8 * merged[name].double() if name in merged \
            else tensor.double()
        torch.testing.assert_close(applied[name].double(), expected, rtol=0, atol=1e-6)
    # The open_clip directory holds the same weights and a card naming the merge.
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    in_dir = load(str(hf_dir / "open_clip_model.safetensors"))
    for name in base:
        assert torch.equal(in_dir[name], applied[name])
    card = (hf_dir / "README.md").read_text()
    assert "task_arithmetic" in card and "license: mit" in card


def test_json_report_of_a_job(cli, repo, files):
    config = _write(repo, _job(files, apply={"output": "model.safetensors"}))
    result = cli(["merge", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["report"] == "merge-job" and report["report_version"] == 1
    assert report["outputs"] == [str(repo / "merged.tv.safetensors"),
                                 str(repo / "model.safetensors")]
    assert report["apply"][0]["output"] == str(repo / "model.safetensors")
    assert report["sweep"] is None


def test_dry_run_shows_everything_it_would_write_and_writes_nothing(cli, repo, files):
    config = _write(repo, _job(files, apply={"coef": 0.5, "output": "model.safetensors",
                                             "hf_dir": "clip-merged"}, dtype="float16"))
    result = cli(["merge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "base: " in text and "the vectors were made from it" in text
    assert f"apply: base + 0.5 × merged -> {repo / 'model.safetensors'}" in text
    assert "README.md model card" in text and "dtype: float16" in text
    assert (f"writes: {repo / 'merged.tv.safetensors'}, {repo / 'model.safetensors'}, "
            f"{repo / 'clip-merged'}") in text
    as_json = cli(["merge", "--config", str(config), "--dry-run", "--json"])
    assert as_json.exit_code == 0, as_json.stderr
    plan = json.loads(as_json.stdout)
    assert plan["report"] == "merge-plan" and plan["job"]["writes"] == [
        str(repo / "merged.tv.safetensors"), str(repo / "model.safetensors"),
        str(repo / "clip-merged")]
    assert sorted(p.name for p in repo.iterdir()) == ["merge.yaml", "tv1.safetensors",
                                                      "tv2.safetensors"]


@pytest.mark.parametrize(("where", "value", "message"), [
    ("apply.output", "../model.safetensors", "leads outside the config file's folder"),
    ("apply.output", "/tmp/model.safetensors", "is an absolute path"),
    ("apply.hf_dir", "../clip", "leads outside the config file's folder"),
    ("apply.hf_dir", "~/clip", "is an absolute path"),
    ("sweep_report", "../sweep.json", "leads outside the config file's folder"),
    ("apply.output", "link/model.safetensors", "leads outside the config file's folder"),
])
def test_every_output_a_config_names_stays_in_its_folder(cli, repo, files, tmp_path, where,
                                                         value, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "link").symlink_to(outside, target_is_directory=True)
    extra: dict = {}
    if where.startswith("apply."):
        extra["apply"] = {where.split(".")[1]: value}
    else:
        extra.update(sweep=[{"method": "task_arithmetic"}], sweep_report=value)
        extra_doc = _job(files, **extra)
        del extra_doc["coef"]
        config = _write(repo, extra_doc)
    if where.startswith("apply."):
        config = _write(repo, _job(files, **extra))
    for dry in ([], ["--dry-run"]):
        result = cli(["merge", "--config", str(config), "--force", *dry])
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr and where in result.stderr
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in repo.iterdir()) == ["link", "merge.yaml", "tv1.safetensors",
                                                      "tv2.safetensors"]


def test_existing_outputs_need_force(cli, repo, files):
    (repo / "model.safetensors").write_bytes(b"an earlier model")
    config = _write(repo, _job(files, apply={"output": "model.safetensors"}))
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 2 and "apply.output" in result.stderr
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (repo / "model.safetensors").read_bytes() == b"an earlier model"
    assert not (repo / "merged.tv.safetensors").exists()
    forced = cli(["merge", "--config", str(config), "--force"])
    assert forced.exit_code == 0, forced.stderr
    assert load(str(repo / "model.safetensors"))


def test_a_job_refuses_before_writing_anything(cli, repo, files, tiny_state, tmp_path):
    from tests.conftest import perturbed
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind

    other = tmp_path / "other-base.safetensors"
    write_tensors(str(other), perturbed(tiny_state, 99, prefix=""),
                  FileMeta(kind=Kind.CHECKPOINT, architecture="tvtool-tiny").to_header())
    cases = [
        (_job(files, base=str(other), apply={"output": "m.safetensors"}),
         "extracted from another base"),
        (_job(files, base="tvtool-tinny", apply={"output": "m.safetensors"}),
         "did you mean 'tvtool-tiny'"),
        (_job(files, apply={"output": "m.safetensors"}, output="-"), "cannot go to stdout"),
        ({**_job(files), "apply": {"coef": 1}}, "'apply' needs 'output'"),
        ({**_job(files), "base": None, "apply": {"output": "m.safetensors"}},
         "'apply' needs 'base'"),
        (_job(files, apply={"output": "merged.tv.safetensors"}), "two outputs"),
        (_job(files, apply={"output": "m.safetensors", "colour": 1}), "apply: unknown key"),
        (_job(files, sweep=[{"method": "ties"}]), "drop the merge's 'coef'"),
        (_job(files, datasets=["a", "b"]), "'datasets' goes with 'sweep'"),
    ]
    for document, message in cases:
        config = _write(repo, document)
        result = cli(["merge", "--config", str(config)])
        assert result.exit_code == 2, (message, result.stderr)
        assert message in result.stderr, (message, result.stderr)
        assert sorted(p.name for p in repo.iterdir()) == [
            "merge.yaml", "tv1.safetensors", "tv2.safetensors"], message


def test_a_failure_after_the_merge_removes_what_the_job_wrote(cli, repo, files, monkeypatch):
    import tvtool.workflows.merge_job as merge_job
    from tvtool.errors import TvtoolError

    def broken(config, log):
        raise TvtoolError("disk full (simulated)")

    monkeypatch.setattr(merge_job, "apply", broken)
    config = _write(repo, _job(files, apply={"output": "model.safetensors"}))
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 1 and "disk full" in result.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["merge.yaml", "tv1.safetensors",
                                                      "tv2.safetensors"]


def test_search_flags_a_job_says_in_its_keys_are_refused(cli, repo, files):
    config = _write(repo, _job(files, apply={"output": "model.safetensors"}))
    for flags in (["--search-coef"], ["--base", files["base"]], ["--suite", "8"],
                  ["--save-config", str(repo / "again.yaml")]):
        result = cli(["merge", "--config", str(config), *flags])
        assert result.exit_code == 2 and "this config is a job" in result.stderr, flags
    assert not (repo / "merged.tv.safetensors").exists()


def test_a_base_path_in_a_config_is_relative_to_its_folder(cli, repo, files, tmp_path,
                                                           monkeypatch):
    shutil.copy(files["base"], repo / "base.safetensors")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = _write(repo, _job(files, base="base.safetensors",
                               apply={"output": "model.safetensors"}))
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 0, result.stderr
    assert (repo / "model.safetensors").is_file() and list(elsewhere.iterdir()) == []


def test_job_documents_resolve_base_references():
    from tvtool.merge.job import _resolve_base

    folder = Path("/configs")
    assert _resolve_base("tvtool-tiny", folder) == "tvtool-tiny"
    assert _resolve_base("ViT-B-32:openai", folder) == "ViT-B-32:openai"
    assert _resolve_base("hf-hub:org/repo", folder) == "hf-hub:org/repo"
    assert _resolve_base("base.safetensors", folder) == "/configs/base.safetensors"
    assert _resolve_base("ckpt/base.safetensors", folder) == "/configs/ckpt/base.safetensors"
    assert _resolve_base("/abs/base.safetensors", folder) == "/abs/base.safetensors"
    assert _resolve_base("ViT-B-32:w/ft.pt", folder) == "ViT-B-32:/configs/w/ft.pt"
    assert _resolve_base("ViT-B-32:/abs/ft.pt", folder) == "ViT-B-32:/abs/ft.pt"


# ---------------------------------------------------------------- sweep


def test_sweep_evaluates_every_variant_and_writes_the_best(cli, repo, files):
    """Two variants on two synthetic tasks; the one with the best validation score is written,
    and its test accuracy is what an independent `evaluate` of the written vector measures."""
    from tvtool.evaluate import EvalConfig, EvalSettings, evaluate

    datasets = ["synthetic:shape", "synthetic:color"]
    document = {"vectors": ["tv1.safetensors", "tv2.safetensors"], "base": files["base"],
                "output": "merged.tv.safetensors", "datasets": datasets,
                "sweep": [{"method": "task_arithmetic", "coef_grid": "0.5,1"},
                          {"method": "task_arithmetic", "coef": 0.25},
                          {"method": "mean", "coef": 1.0}],
                "sweep_report": "sweep.json", "apply": {"output": "model.safetensors"}}
    config = _write(repo, document)
    args = ["merge", "--config", str(config), "--limit", "24", "--device", "cpu",
            "--batch-size", "24"]
    result = cli(args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(repo / "merged.tv.safetensors"),
                                          str(repo / "model.safetensors"),
                                          str(repo / "sweep.json")]
    assert "merge sweep on" in result.stderr  # the table
    report = json.loads((repo / "sweep.json").read_text())
    assert report["report"] == "merge-sweep" and len(report["variants"]) == 3
    rows = report["variants"]
    # Each variant's val score is the best average normalized accuracy over its grid
    # (recomputed from the report's own accuracies), and the written one has the best score.
    for row in rows:
        scores = [sum(p["accuracies"][d] / report["finetuned"]["val"][d] for d in datasets)
                  / len(datasets) for p in row["val"]["grid"]]
        assert row["val_score"] == pytest.approx(max(scores))
    assert [p["coef"] for p in rows[0]["val"]["grid"]] == [0.5, 1.0]
    assert [p["coef"] for p in rows[1]["val"]["grid"]] == [0.25] and rows[1]["coef"] == 0.25
    chosen = report["chosen"]
    assert chosen == max(range(3), key=lambda i: (rows[i]["val_score"], -i))
    assert [row["chosen"] for row in rows] == [i == chosen for i in range(3)]
    # The written vector is the chosen variant at its α: α·(τ1 + τ2), halved for the mean.
    merged = load(str(repo / "merged.tv.safetensors"))
    alpha = rows[chosen]["best_coef"] * (0.5 if rows[chosen]["method"] == "mean" else 1.0)
    t1, t2 = load(str(repo / "tv1.safetensors")), load(str(repo / "tv2.safetensors"))
    for name in t1:
        expected = (alpha * (t1[name].double() + t2[name].double())).float()
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7)
    # An independent evaluation of the written vector gives the report's test accuracy.
    settings = EvalSettings(base=files["base"], device="cpu", limit=24, batch_size=24)
    measured = evaluate(EvalConfig(settings, datasets=tuple(datasets),
                                   vectors=(str(repo / "merged.tv.safetensors"),)))
    for item in measured.results:
        assert item.accuracy == pytest.approx(rows[chosen]["test"]["accuracy"][item.dataset])
    provenance = json.loads(
        _metadata(repo / "merged.tv.safetensors")["tvtool.provenance"])["search"]
    assert provenance["chosen"] == chosen and len(provenance["sweep"]) == 3


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def test_sweep_dry_run_lists_the_variants(cli, repo, files):
    document = {"vectors": ["tv1.safetensors", "tv2.safetensors"], "base": files["base"],
                "output": "merged.tv.safetensors", "datasets": ["synthetic:shape",
                                                                "synthetic:color"],
                "method": "ties", "sweep": [{"params": {"density": 0.1}},
                                            {"params": {"density": 0.4}, "coef": 1.2},
                                            {"method": "dare", "coef_grid": "auto"}],
                "sweep_report": "sweep.json"}
    config = _write(repo, document)
    result = cli(["merge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "sweep: 3 variants evaluated on synthetic:shape, synthetic:color" in result.stdout
    assert "[0] ties density=0.1: α searched over 0.8:2.5:0.1" in result.stdout
    assert "[1] ties density=0.4: fixed α 1.2" in result.stdout
    assert "[2] dare: α searched over auto" in result.stdout
    assert f"{repo / 'sweep.json'}" in result.stdout.splitlines()[-1]
    assert sorted(p.name for p in repo.iterdir()) == ["merge.yaml", "tv1.safetensors",
                                                      "tv2.safetensors"]


@pytest.mark.parametrize(("sweep", "message"), [
    ([{"method": "tie"}], "sweep[0]: unknown merge method"),
    ([{"method": "ties", "params": {"densty": 0.2}}], "sweep[0]: method 'ties' has no"),
    ([{"coef": 1, "coef_grid": "0:1:0.5"}], "both 'coef'"),
    ([{"coef_grid": "1:0"}], "sweep[0].coef_grid"),
    ([{"speed": 3}], "sweep[0]: unknown key"),
    ([], "non-empty list"),
])
def test_bad_sweeps_are_refused(cli, repo, files, sweep, message):
    document = {"vectors": ["tv1.safetensors", "tv2.safetensors"], "base": files["base"],
                "output": "m.safetensors", "sweep": sweep}
    config = _write(repo, document)
    result = cli(["merge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_per_vector_density_applies_to_every_variant(cli, repo, files):
    document = {"vectors": [{"path": "tv1.safetensors", "density": 0.3}, "tv2.safetensors"],
                "base": files["base"], "output": "m.safetensors",
                "datasets": ["synthetic:shape", "synthetic:color"],
                "method": "ties", "sweep": [{"params": {"density": 0.5}},
                                            {"method": "task_arithmetic"}]}
    config = _write(repo, document)
    result = cli(["merge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 2
    assert "sweep[1]" in result.stderr and "takes no per-vector ['density']" in result.stderr


def test_the_config_examples_in_the_docs_are_valid():
    """Every merge config in docs/merge.md parses and validates (methods, parameters, keys)."""
    import re

    from tvtool.merge.job import job_from_document

    text = (Path(__file__).resolve().parents[1] / "docs" / "merge.md").read_text()
    documents = [yaml.safe_load(body) for body in
                 re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)]
    configs = [d for d in documents if isinstance(d, dict) and "vectors" in d]
    assert len(configs) >= 3
    for document in configs:
        job = job_from_document(document, label="docs")
        assert job.merge.vectors
    jobs = [job_from_document(d, label="docs") for d in configs]
    assert any(j.apply is not None and j.apply.hf_dir for j in jobs)
    assert any(len(j.sweep) == 4 for j in jobs)
    # The CI example runs the dry run, then the merge: both lines are parsed by
    # tests/test_docs_commands.py (its `run:` steps).
    from tests.test_docs_commands import SHELL_CASES

    ci = [case.values[0] for case in SHELL_CASES if ":run" in case.id]
    assert ["merge", "--config", "models/merge.yaml", "--dry-run"] in ci
    assert ["merge", "--config", "models/merge.yaml", "--json"] in ci
