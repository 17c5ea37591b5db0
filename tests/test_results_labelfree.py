"""scripts/results_labelfree.py: the seeds tables and path study of issue 23 (no model runs)."""

from __future__ import annotations

import json
import math
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_script

TASKS = ["synthetic:a", "synthetic:b"]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("results_labelfree")


def _acc(a: float, b: float) -> dict[str, float]:
    return dict(zip(TASKS, (a, b), strict=True))


def _path(accuracies: list[float], information: list[float]) -> list[dict[str, Any]]:
    return [{"step": 10 * i, "candidate": True, "admissible": True, "information": info,
             "neg_entropy": -1.0 + 0.01 * i, "class_ratio": 0.9, "accuracy": _acc(a, a),
             "mean_accuracy": a}
            for i, (a, info) in enumerate(zip(accuracies, information, strict=True))]


def _run(seed: int, entropy: tuple[float, float]) -> dict[str, Any]:
    results = {mode: {"zero_shot": _acc(0.4, 0.6), "finetuned": _acc(0.8, 1.0),
                      "task_arithmetic": {"coef": 0.3, "accuracy": _acc(0.6, 0.8)}}
               for mode in ("full", "linear")}
    return {"base": "tvtool-small", "base_fingerprint": "sha256:x", "tasks": TASKS,
            "seed": seed, "steps": 200, "lr": 1e-3, "batch_size": 64, "limit": None,
            "augment": "train", "path_every": 25, "atlas_steps": None, "tta_shots": None,
            "granularity": "tensor", "methods": ["entropy@adamerging"], "shots_curve": [1, 4],
            "modes": ["full", "linear"], "results": results,
            "labelfree": [{"method": "entropy@adamerging", "accuracy": _acc(*entropy),
                           "path": _path([0.5, 0.6, 0.7, 0.65], [0.1, 0.2, 0.3, 0.25])}],
            "fewshot": [{"mode": m, "shots": k, "accuracy": _acc(0.5 + 0.05 * k, 0.9)}
                        for m in ("full", "linear") for k in (1, 4)]}


def test_spearman_is_rank_correlation_with_average_ranks(script):
    assert script.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert script.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties: ranks 0.5, 0.5, 2, 3 against 0, 1, 2, 3 -> Pearson of the ranks.
    xs, ys = [1, 1, 2, 3], [1, 2, 3, 4]
    rx, ry = [0.5, 0.5, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]
    mx, my = sum(rx) / 4, sum(ry) / 4
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert script.spearman(xs, ys) == pytest.approx(expected)
    assert math.isnan(script.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(script.spearman([1, 2], [1, 2]))


def test_path_study_compares_ways_of_picking_a_step(script):
    path = _path([0.5, 0.9, 0.7, 0.6], [0.1, 0.2, 0.4, 0.3])
    path[2]["admissible"] = False  # the highest information, but collapsed
    study = script.path_study(path)
    assert study["last"] == 0.6 and study["oracle"] == 0.9
    assert study["rule"] == 0.6  # admissible first, then information: step 30 (0.3)
    assert study["rho_information"] == pytest.approx(script.spearman(
        [0.1, 0.2, 0.4, 0.3], [0.5, 0.9, 0.7, 0.6]))


def test_normalized_accuracy_averages_per_task_ratios(script):
    assert script.normalized(_acc(0.6, 0.8), _acc(0.8, 1.0), TASKS) == pytest.approx(
        (0.6 / 0.8 + 0.8 / 1.0) / 2)


def test_summary_tables_over_seeds(script, tmp_path):
    runs = [_run(0, (0.7, 0.8)), _run(1, (0.5, 0.8))]
    paths = []
    for index, run in enumerate(runs):
        path = tmp_path / f"r{index}.json"
        path.write_text(json.dumps(run))
        paths.append(path)
    summary = script.summarise(script.load_runs(paths))
    ta = (0.6 / 0.8 + 0.8) / 2
    entropy = [(0.7 / 0.8 + 0.8) / 2, (0.5 / 0.8 + 0.8) / 2]
    assert summary["methods"]["entropy@adamerging"] == pytest.approx(entropy)
    assert summary["deltas"]["entropy@adamerging"] == pytest.approx([e - ta for e in entropy])
    text = script.markdown(summary, None)
    mean = sum(entropy) / 2
    se = abs(entropy[0] - entropy[1]) / 2  # stdev of two values / sqrt(2)
    assert f"{100 * mean:.1f} ± {100 * se:.1f}" in text
    assert "| linear |" in text and "k = 4" in text and "ρ(H(mean p) − mean H(p))" in text
    assert "Base `tvtool-small` (fingerprint `sha256:x…`)" in text  # which build was measured
    assert "protocols: `tvtool-small` (build `x…`)" in text
    assert ("--modes full,linear --path-every 25 --methods entropy@adamerging "
            "--shots-curve 1,4` per seed") in text
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkeep me\n")
    script.update_doc(doc, text, "small")
    script.update_doc(doc, text, "small")  # replaced, not appended twice
    written = doc.read_text()
    assert written.count("labelfree-results-small:begin") == 1 and "keep me" in written


def test_runs_of_different_recipes_are_refused(script, tmp_path):
    first, second = _run(0, (0.7, 0.8)), _run(1, (0.5, 0.8))
    second["path_every"] = 10
    other_build = _run(1, (0.5, 0.8)) | {"base_fingerprint": "sha256:y"}
    paths = []
    for index, run in enumerate((first, second)):
        path = tmp_path / f"r{index}.json"
        path.write_text(json.dumps(run))
        paths.append(path)
    with pytest.raises(SystemExit, match="path_every"):
        script.load_runs(paths)
    # Two builds of the same base name (tvtool-base is made on each machine) never mix.
    paths[1].write_text(json.dumps(other_build))
    with pytest.raises(SystemExit, match="base_fingerprint"):
        script.load_runs(paths)
    with pytest.raises(SystemExit, match="OBJECTIVE@PROTOCOL"):
        script.parse_method("entropy")
    assert script.parse_method("ufm@atlas/code") == ("ufm", "atlas", "code")


def test_a_curve_measured_by_some_seeds_only_is_averaged_over_those(script, tmp_path):
    with_curve, without = _run(0, (0.7, 0.8)), _run(1, (0.5, 0.8))
    without.update(shots_curve=[], modes=["full"], fewshot=[])
    without["results"] = {"full": without["results"]["full"]}
    paths = []
    for index, run in enumerate((with_curve, without)):
        path = tmp_path / f"r{index}.json"
        path.write_text(json.dumps(run))
        paths.append(path)
    text = script.markdown(script.summarise(script.load_runs(paths)), None)
    full_row = next(line for line in text.splitlines() if line.startswith("| full |"))
    linear_row = next(line for line in text.splitlines() if line.startswith("| linear |"))
    # full: task arithmetic over both seeds, the curve over seed 0 alone; linear: seed 0 alone.
    assert full_row.split(" | ")[1] == "1/2" and linear_row.split(" | ")[1] == "1"
    k4 = ((0.5 + 0.2) / 0.8 + 0.9) / 2  # seed 0's k = 4 normalized accuracy, no s.e.
    assert full_row.rstrip(" |").endswith(f"{100 * k4:.1f}")
    assert "the curve: seeds 0" in text


def test_checkpoint_keeps_measurements_and_refuses_another_recipe(script, tmp_path):
    path = tmp_path / "run.partial.json"
    calls = []
    first = script.Checkpoint(path, {"seed": 0})
    assert first.get("a", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    again = script.Checkpoint(path, {"seed": 0})
    assert again.get("a", lambda: calls.append(2) or {"x": 2}) == {"x": 1}
    assert calls == [1]  # measured once, then read back
    assert json.loads(path.read_text())["done"] == {"a": {"x": 1}}
    with pytest.raises(SystemExit, match="another recipe"):
        script.Checkpoint(path, {"seed": 1})


def test_per_task_table_is_the_kept_model_minus_task_arithmetic(script):
    # TA accuracy is (0.6, 0.8) in every run; entropy keeps (0.7, 0.8) and (0.5, 0.9).
    runs = [_run(0, (0.7, 0.8)), _run(1, (0.5, 0.9))]
    deltas = script.per_task_deltas(runs)["entropy@adamerging"]
    assert deltas["synthetic:a"] == pytest.approx([0.1, -0.1])
    assert deltas["synthetic:b"] == pytest.approx([0.0, 0.1])
    text = script.markdown(script.summarise(runs), None)
    table = text.split("### Per task")[1]
    # a: mean 0.0, s.e. 0.1; b: 5.0 ± 5.0; average of the per-run means (0.05, 0.0): 2.5 ± 2.5
    assert "| entropy@adamerging | 0.0 ± 10.0 | 5.0 ± 5.0 | 2.5 ± 2.5 |" in table


def test_regenerate_line_names_an_empty_curve(script):
    run = _run(0, (0.7, 0.8))
    run["shots_curve"], run["fewshot"] = [], []
    text = script.markdown(script.summarise([run]), None)
    assert "--shots-curve ''` per seed" in text
    assert "| mode | n | task arithmetic |\n|---|---|---|" in text
