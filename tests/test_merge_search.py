"""Coefficient searches: pure logic with fake evaluators, then the real CLI on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from tvtool.errors import UsageError
from tvtool.grid import parse_grid
from tvtool.workflows.merge_search import search_coef
from tvtool.workflows.negation import DEFAULT_NEGATION_GRID_TEXT, DEFAULT_THRESHOLD, search_negation

# ---------------------------------------------------------------- grids


def test_default_grid_is_0_to_1_step_005():
    grid = parse_grid("0:1:0.05")
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0
    assert grid[3] == 0.15


@pytest.mark.parametrize("text,expected", [("0.2,0.4, 1", (0.2, 0.4, 1.0)), ("1:1:0.5", (1.0,)),
                                           ("-1:1:1", (-1.0, 0.0, 1.0))])
def test_grid_forms(text, expected):
    assert parse_grid(text) == expected


@pytest.mark.parametrize("text", ["", "a,b", "0:1", "0:1:0", "1:0:0.1", "0:1:-1", "nan"])
def test_bad_grids(text):
    with pytest.raises(UsageError):
        parse_grid(text)


# ---------------------------------------------------------------- merge search


def peaked(best: dict[str, float]):
    """A fake evaluator: accuracy per dataset peaks at its own α."""
    calls = []

    def evaluate(alpha):
        calls.append(alpha)
        return {name: 0.9 - abs(alpha - peak) for name, peak in best.items()}

    return evaluate, calls


def test_search_picks_best_average_normalized_accuracy():
    evaluate, calls = peaked({"a": 0.3, "b": 0.5})
    # Normalization weighs dataset b ten times more (its fine-tuned accuracy is tiny).
    result = search_coef(evaluate, parse_grid("0:1:0.1"), references={"a": 1.0, "b": 0.1})
    assert result.best == 0.5
    assert result.criterion == "normalized"
    assert calls == list(parse_grid("0:1:0.1"))
    point = result.best_point
    assert point.normalized == pytest.approx({"a": 0.7 / 1.0, "b": 0.9 / 0.1})
    assert point.score == pytest.approx((0.7 + 9.0) / 2)


def test_search_without_references_uses_average_accuracy():
    evaluate, _ = peaked({"a": 0.2, "b": 0.4})
    result = search_coef(evaluate, [0.0, 0.2, 0.3, 0.4])
    assert result.criterion == "absolute"
    assert result.best == 0.2  # 0.2, 0.3 and 0.4 tie: the earliest grid point wins


def test_search_refuses_missing_references_and_empty_grid():
    evaluate, _ = peaked({"a": 0.2, "b": 0.4})
    with pytest.raises(UsageError, match="reference"):
        search_coef(evaluate, [0.1], references={"a": 0.9})
    with pytest.raises(UsageError, match="empty"):
        search_coef(evaluate, [])


def test_search_record_is_json_ready():
    evaluate, _ = peaked({"a": 0.5})
    document = search_coef(evaluate, [0.0, 0.5], references={"a": 0.9}).as_json()
    assert json.loads(json.dumps(document))["best_coef"] == 0.5


# ---------------------------------------------------------------- negation search


def negation_world(control_drop: float):
    """Target accuracy falls with α; control accuracy falls ``control_drop`` per unit α."""

    def evaluate(alpha):
        return {"target": max(0.0, 0.8 - alpha), "control": 0.6 - control_drop * alpha}

    return evaluate


def test_negation_picks_lowest_target_within_control_threshold():
    result = search_negation(negation_world(0.1), parse_grid("0.1:1:0.1"), target="target",
                             control="control", threshold=0.95)
    # control/base >= 0.95  <=>  0.6 - 0.1 α >= 0.57  <=>  α <= 0.3
    assert result.best == pytest.approx(0.3)
    assert result.base_control == pytest.approx(0.6)
    assert [p.feasible for p in result.points][:4] == [True, True, True, False]


def test_negation_ties_go_to_the_largest_alpha():
    result = search_negation(negation_world(0.0), parse_grid("0.5:1.5:0.25"), target="target",
                             control="control")
    # The target is at 0 from α = 0.8 on; every point is feasible: the largest α with target 0.
    assert result.best == 1.5


def test_negation_without_a_feasible_alpha():
    result = search_negation(negation_world(1.0), [0.5, 1.0], target="target", control="control")
    assert result.best is None


def test_negation_refuses_bad_threshold():
    with pytest.raises(UsageError):
        search_negation(negation_world(0.1), [0.5], target="target", control="control",
                        threshold=1.5)


# ---------------------------------------------------------------- the real evaluator


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_state):
    """A random tiny base and two vectors recorded for two synthetic datasets."""
    from tests.conftest import perturbed
    from tvtool.commands.extract import ExtractConfig
    from tvtool.commands.extract import extract as run_extract
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind

    root = tmp_path_factory.mktemp("search")
    header = FileMeta(kind=Kind.CHECKPOINT, architecture="tvtool-tiny").to_header()
    base = root / "base.safetensors"
    write_tensors(str(base), tiny_state, header)
    paths = {"root": root, "base": str(base)}
    for index, dataset in ((1, "synthetic:shape"), (2, "synthetic:color")):
        ft = root / f"ft{index}.safetensors"
        write_tensors(str(ft), perturbed(tiny_state, index, scale=0.05), header)
        tv = root / f"tv{index}.safetensors"
        run_extract(ExtractConfig(base=str(base), finetuned=str(ft),
                                                    output=str(tv), dataset=dataset,
                                                    keep="changed"))
        paths[f"tv{index}"] = str(tv)
    return paths


EVAL = ["--limit", "8", "--batch-size", "8", "--device", "cpu"]


def test_merge_search_coef_end_to_end(cli, world, tmp_path):
    out = tmp_path / "searched.safetensors"
    report_path = tmp_path / "report.json"
    result = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "--base", world["base"],
                  "--coef-grid", "0,0.5", *EVAL, "-o", str(out), "--search-report",
                  str(report_path), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(report_path.read_text())
    assert report["datasets"] == ["synthetic:shape", "synthetic:color"]
    # Recomputed here from the reported accuracies: normalized = accuracy / fine-tuned accuracy
    # (never zero-shot), on the validation split for the search and the test split after it.
    finetuned = report["finetuned"]
    for split in ("val", "test"):
        assert finetuned[split] != report["zero_shot"][split], "needs a vector that changes "\
            "an accuracy, or normalizing by the zero-shot accuracy would go unnoticed"
        for dataset, accuracy in finetuned[split].items():  # fine-tuned: base + its own vector
            assert accuracy == _eval_accuracy(cli, world, split, dataset)
    scores = []
    for point in report["val"]["grid"]:
        for dataset, accuracy in point["accuracies"].items():
            assert point["normalized"][dataset] == pytest.approx(
                accuracy / finetuned["val"][dataset])
        scores.append(sum(point["normalized"].values()) / len(point["normalized"]))
        assert point["score"] == pytest.approx(scores[-1])
    assert report["best_coef"] == report["val"]["grid"][scores.index(max(scores))]["coef"]
    for dataset, accuracy in report["test"]["accuracy"].items():
        assert report["test"]["normalized_accuracy"][dataset] == pytest.approx(
            accuracy / finetuned["test"][dataset])
    assert [p["coef"] for p in report["val"]["grid"]] == [0.0, 0.5]
    assert set(report["test"]["accuracy"]) == {"synthetic:shape", "synthetic:color"}
    assert "zero-shot %" in result.stderr
    # The written vector is the ordinary merge at the chosen coefficient.
    plain = tmp_path / "plain.safetensors"
    again = cli(["merge", world["tv1"], world["tv2"], "--coef", str(report["best_coef"]), "-o",
                 str(plain)])
    assert again.exit_code == 0, again.stderr
    from tests.conftest import load

    for name, tensor in load(str(plain)).items():
        assert torch.equal(load(str(out))[name], tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors", "report.json",
                                                         "searched.safetensors"]
    # ... whose metadata records the search that chose it, not a plain --coef.
    from safetensors import safe_open

    with safe_open(str(out), "np") as handle:
        meta = handle.metadata()
    assert json.loads(meta["tvtool.coefficients"])["origin"] == "--search-coef"
    search = json.loads(meta["tvtool.provenance"])["search"]
    assert search["best_coef"] == report["best_coef"] and search["split"] == "val"
    assert search["datasets"] == report["datasets"]
    assert [p["coef"] for p in search["grid"]] == [0.0, 0.5]
    assert [p["accuracies"] for p in search["grid"]] == [
        p["accuracies"] for p in report["val"]["grid"]]
    assert search["limit"] == 8


def _eval_accuracy(cli, world, split: str, dataset: str) -> float:
    """`tvtool eval` of base + the vector recorded for ``dataset``, on ``dataset``."""
    vector = world["tv1"] if dataset == "synthetic:shape" else world["tv2"]
    result = cli(["eval", "--base", world["base"], vector, "-d", dataset, "--split", split,
                  *EVAL, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["results"][0]["accuracy"]


def test_ties_search_uses_the_ties_reference_grid_by_default(cli, world, tmp_path):
    out = tmp_path / "ties.safetensors"
    result = cli(["merge", world["tv1"], world["tv2"], "--method", "ties", "--search-coef",
                  "--base", world["base"], "--limit", "4", "--batch-size", "8", "--device",
                  "cpu", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    grid = [p["coef"] for p in json.loads(result.stdout)["val"]["grid"]]
    assert grid == [round(0.8 + 0.1 * i, 10) for i in range(18)]
    assert "coefficient grid for ties: 0.8:2.5:0.1" in result.stderr
    # Rich wraps help text at spaces only, so the grid stays one token.
    assert "0.8:2.5:0.1" in cli(["merge", "--help"]).stdout


def test_merge_search_refusals(cli, world, tmp_path):
    out = tmp_path / "o.safetensors"
    no_base = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "-o", str(out)],)
    assert no_base.exit_code == 2 and "--base" in no_base.stderr
    coefs = tmp_path / "c.json"
    coefs.write_text("[1, 1]")
    with_file = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "--base",
                     world["base"], "--coefs", str(coefs), "-o", str(out)])
    assert with_file.exit_code == 2 and "--coefs" in with_file.stderr
    same = cli(["merge", world["tv1"], world["tv1"], "--search-coef", "--base", world["base"],
                "-o", str(out)])
    assert same.exit_code == 2 and "share a dataset" in same.stderr
    assert not out.exists()


def test_negate_search_end_to_end(cli, world, tmp_path):
    out = tmp_path / "neg.safetensors"
    # α = 1e-6 leaves the predictions as the base's, so the grid always has a feasible α and
    # the test never passes by refusing (it once returned early on exit 1).
    result = cli(["negate", world["tv1"], "--search", "--base", world["base"], "--control",
                  "synthetic:color", "--control-threshold", "0.01", "--coef-grid",
                  "0.000001,0.5,1",
                  *EVAL, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target"] == "synthetic:shape" and report["best_coef"] in (1e-6, 0.5, 1.0)
    assert [p["coef"] for p in report["val"]["grid"]] == [1e-6, 0.5, 1.0]
    from tests.conftest import load

    vector = load(world["tv1"])
    negated = load(str(out))
    name = next(iter(vector))
    torch.testing.assert_close(negated[name], -report["best_coef"] * vector[name])
    assert report["report_version"] == 2 and report["controls"] == ["synthetic:color"]
    from safetensors import safe_open

    with safe_open(str(out), "np") as handle:
        search = json.loads(handle.metadata()["tvtool.provenance"])["search"]
    assert search["best_coef"] == report["best_coef"] and search["controls"] == ["synthetic:color"]
    assert search["target"] == "synthetic:shape" and search["threshold"] == 0.01
    assert [p["coef"] for p in search["grid"]] == [1e-6, 0.5, 1.0]


def test_negate_search_needs_control(cli, world, tmp_path):
    out = tmp_path / "neg.safetensors"
    result = cli(["negate", world["tv1"], "--search", "--base", world["base"], "-o", str(out)])
    assert result.exit_code == 2 and "--control" in result.stderr
    assert not out.exists()


def test_negate_cli_defaults_are_the_library_defaults():
    # The CLI module may not import the library at import time (fast --help), so its
    # defaults are literals; they must stay the negation workflow's.
    import inspect

    from tvtool.cli.negate import negate

    params = inspect.signature(negate).parameters
    assert params["coef_grid"].default == DEFAULT_NEGATION_GRID_TEXT
    assert params["control_threshold"].default == DEFAULT_THRESHOLD


def test_measure_negation_falls_back_or_refuses_when_no_alpha_is_feasible(world, monkeypatch):
    import dataclasses

    from tvtool.errors import TvtoolError
    from tvtool.evaluate import EvalSettings
    from tvtool.workflows import negation

    real = negation.search_negation

    def infeasible(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), best=None)

    monkeypatch.setattr(negation, "search_negation", infeasible)
    settings = EvalSettings(base=world["base"], batch_size=8, device="cpu", limit=8)
    kwargs = {"target": "synthetic:shape", "control": "synthetic:color"}
    measured = negation.measure_negation(settings, world["tv1"], [0.5, 1.0], fallback=0.5,
                                         **kwargs)
    assert measured.search.best is None and measured.coef == 0.5
    assert set(measured.test) == {"base", "negated"}
    assert set(measured.test["negated"]) == {"synthetic:shape", "synthetic:color"}
    with pytest.raises(TvtoolError, match="no coefficient of the grid"):
        negation.measure_negation(settings, world["tv1"], [0.5, 1.0], **kwargs)


def test_merge_search_refuses_a_bad_output_before_searching(cli, world, tmp_path):
    result = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "--base", world["base"],
                  "-o", str(tmp_path / "missing-dir" / "o.safetensors")])
    assert result.exit_code == 2
    assert "missing-dir' does not exist" in result.stderr, result.stderr
    assert "searching" not in result.stderr


def _with_dataset(source: str, target, dataset: str) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(source, framework="pt") as handle:
        header = dict(handle.metadata())
    header["tvtool.dataset"] = dataset
    save_file(load_file(source), str(target), metadata=header)
    return str(target)


def test_extract_records_an_absolute_imagefolder_path(cli, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tv.safetensors"
    from tvtool.commands.extract import ExtractConfig
    from tvtool.commands.extract import extract as run_extract

    run_extract(ExtractConfig(
        base=world["base"], finetuned=world["base"].replace("base", "ft1"), output=str(out),
        dataset="imagefolder:data/cats", keep="changed"))
    result = cli(["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    recorded = json.loads(result.stdout)["files"][0]["metadata"]["tvtool.dataset"]
    assert recorded == f"imagefolder:{tmp_path / 'data' / 'cats'}"


def test_search_with_a_recorded_relative_imagefolder_hints_at_dataset(cli, world, tmp_path,
                                                                      monkeypatch):
    # Files written before paths were made absolute record them relative to where they ran.
    one = _with_dataset(world["tv1"], tmp_path / "one.safetensors", "imagefolder:./my-data")
    two = _with_dataset(world["tv2"], tmp_path / "two.safetensors", "synthetic:color")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "merged.safetensors"
    merged = cli(["merge", one, two, "--search-coef", "--base", world["base"], *EVAL,
                  "-o", str(out)])
    assert merged.exit_code == 2, merged.stderr
    assert "records dataset 'imagefolder:./my-data', which is not a directory here" \
        in merged.stderr
    assert "--dataset" in merged.stderr and not out.exists()
    negated = cli(["negate", one, "--search", "--base", world["base"], "--control",
                   "synthetic:color", *EVAL, "-o", str(out)])
    assert negated.exit_code == 2, negated.stderr
    assert "not a directory here" in negated.stderr and "--target" in negated.stderr


def test_negation_control_thresholds_are_the_documented_095():
    # The paper's rule (Ilharco et al. 2023, §3: control accuracy at least 95% of the base's),
    # pinned to the literal and to the docs: a change in both the library and the CLI must fail.
    import inspect
    import re
    from pathlib import Path

    from tvtool.atlas.objectives import DEFAULT_CONTROL_THRESHOLD
    from tvtool.cli.learn_coeffs import learn_coeffs
    from tvtool.cli.negate import negate

    docs = Path(__file__).resolve().parents[1] / "docs"
    documented = re.search(r"negate TV --search [^`]*?\[--control-threshold ([0-9.]+)\]",
                           (docs / "cli.md").read_text())
    assert documented is not None and float(documented.group(1)) == 0.95
    assert "`--control-threshold` (0.95)" in (docs / "coeffs.md").read_text()
    assert DEFAULT_THRESHOLD == 0.95 == DEFAULT_CONTROL_THRESHOLD
    assert inspect.signature(negate).parameters["control_threshold"].default == 0.95
    assert inspect.signature(learn_coeffs).parameters["control_threshold"].default == 0.95
