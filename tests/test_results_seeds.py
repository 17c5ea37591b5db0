"""scripts/results_seeds.py: the seed-averaged gain of docs/results.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_script

TASKS = ["synthetic:a", "synthetic:b"]


@pytest.fixture(scope="module")
def seeds() -> ModuleType:
    return load_script("results_seeds")


def _run(seed: int, merged: tuple[float, float], changes: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    def row(method: str, a: float, b: float, coef: float | None = None) -> dict[str, Any]:
        return {"method": method, "coef": coef, "accuracy": dict(zip(TASKS, (a, b), strict=True))}
    run = {"base": "tvtool-small", "base_fingerprint": "sha256:x", "tasks": TASKS, "steps": 200,
           "lr": 1e-3, "batch_size": 64, "limit": None, "seed": seed,
           "rows": [row("zero-shot", 0.4, 0.6), row("fine-tuned (one vector per task)", 0.9, 1.0),
                    row("task arithmetic", *merged, coef=0.25)]}
    run.update(changes or {})
    return run


def _write(tmp_path: Path, runs: list[dict[str, Any]]) -> list[Path]:
    paths = []
    for index, run in enumerate(runs):
        path = tmp_path / f"run{index}.json"
        path.write_text(json.dumps(run))
        paths.append(path)
    return paths


def test_mean_and_standard_error_of_the_gain_over_seeds(seeds, tmp_path):
    # zero-shot average 0.5, fine-tuned 0.95: a merged average of 0.7 recovers 0.2/0.45.
    paths = _write(tmp_path, [_run(1, (0.8, 0.7)), _run(0, (0.6, 0.8))])
    result = seeds.summarise(seeds.load_runs(paths))
    assert result["seeds"] == [0, 1]
    ta = result["summary"]["task arithmetic"]
    per_seed = [s["methods"]["task arithmetic"]["gain"] for s in result["per_seed"]]
    assert per_seed == pytest.approx([0.2 / 0.45, 0.25 / 0.45])
    assert ta["gain_mean"] == pytest.approx(0.225 / 0.45)
    # sample sd of two values is |a − b| / √2; its standard error divides by √2 again
    assert ta["gain_se"] == pytest.approx((0.05 / 0.45) / 2)
    assert result["summary"]["fine-tuned (one vector per task)"]["gain_mean"] == pytest.approx(1)
    table = seeds.markdown(result)
    assert "| 0 | 50.0 | 95.0 | 0.44 (0.25) |" in table
    assert "**0.50 ± 0.06**" in table


def test_one_seed_has_no_standard_error(seeds, tmp_path):
    result = seeds.summarise(seeds.load_runs(_write(tmp_path, [_run(0, (0.6, 0.8))])))
    assert math.isnan(result["summary"]["task arithmetic"]["gain_se"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"lr": 3e-4}, "differs from"),
    ({"seed": 0}, "a seed appears twice"),
])
def test_runs_must_differ_only_in_the_seed(seeds, tmp_path, changes, message):
    paths = _write(tmp_path, [_run(0, (0.6, 0.8)), _run(1, (0.6, 0.8), changes)])
    with pytest.raises(SystemExit, match=message):
        seeds.load_runs(paths)


def test_a_file_that_is_not_a_run_is_refused(seeds, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match=r"not a scripts/results_merge\.py output"):
        seeds.load_runs([path])


def test_negation_is_summarised_as_the_fall_towards_chance(seeds, tmp_path):
    # synthetic:shape has 6 classes: chance 1/6. 0.8 → 0.5 is 0.3 of a distance of 0.8 − 1/6.
    def negated(target_after: float, control_after: float) -> dict[str, Any]:
        return {"negation": {"target": "synthetic:shape", "control": "synthetic:color",
                             "best_coef": 0.5,
                             "test": {"base": {"synthetic:shape": 0.8, "synthetic:color": 0.8},
                                      "negated": {"synthetic:shape": target_after,
                                                  "synthetic:color": control_after}}}}
    runs = [_run(0, (0.6, 0.8), negated(0.5, 0.76)), _run(1, (0.6, 0.8), negated(0.3, 0.78))]
    result = seeds.summarise(seeds.load_runs(_write(tmp_path, runs)))
    distance = 0.8 - 1 / 6
    fractions = [s["negation"]["fraction_to_chance"] for s in result["per_seed"]]
    assert fractions == pytest.approx([0.3 / distance, 0.5 / distance])
    summary = result["summary"]["negation"]
    assert summary["fraction_mean"] == pytest.approx(0.4 / distance)
    assert summary["control_kept_mean"] == pytest.approx((0.95 + 0.975) / 2)
    table = seeds.markdown(result)
    assert f"| {0.3 / distance:.2f} (95.0 %) |" in table
    # A standard error under 0.005 is not rounded away to 0.00.
    assert seeds._se_text(0.004) == "0.004" and seeds._se_text(0.04) == "0.04"
