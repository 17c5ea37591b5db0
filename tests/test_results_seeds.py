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
    # Another build of the same base name (tvtool-base is made on each machine).
    ({"base_fingerprint": "sha256:other"}, "base_fingerprint"),
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


def _methods_run(seed: int, accs: dict[str, tuple[float, float]],
                 compression: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A run with rows keyed by method (results_merge.py's newer JSON)."""
    run = _run(seed, (0.6, 0.8))
    run["rows"] = run["rows"][:2] + [
        {"method": key.upper(), "key": key, "coef": 1.0, "grid_edge": "low" if key == "ties"
         else None, "accuracy": dict(zip(TASKS, pair, strict=True))}
        for key, pair in accs.items()]
    if compression is not None:
        run["compression"] = compression
    return run


def _compression(label: str, sizes: tuple[float, float], kept: tuple[float, float]
                 ) -> dict[str, Any]:
    return {"rule": "fraction", "value": 0.05, "label": label,
            "tasks": {task: {"size_kept": size, "parameters_kept": size, "energy_kept": 0.5,
                             "accuracy_kept": k}
                      for task, size, k in zip(TASKS, sizes, kept, strict=True)}}


def test_orderings_are_judged_from_the_paired_differences(seeds, tmp_path):
    # Seed 0: TSV-M 0.9 vs TA 0.7 and TIES 0.6 averages; seed 1: 0.8 vs 0.7 and 0.75.
    runs = [_methods_run(0, {"task_arithmetic": (0.7, 0.7), "ties": (0.6, 0.6),
                             "tsv": (0.9, 0.9), "iso-cts": (0.6, 0.7)}),
            _methods_run(1, {"task_arithmetic": (0.6, 0.8), "ties": (0.7, 0.8),
                             "tsv": (0.8, 0.8), "iso-cts": (0.7, 0.7)})]
    result = seeds.summarise(seeds.load_runs(_write(tmp_path, runs)))
    claims = {c["claim"]: c for c in result["claims"]}
    above_ta = claims["TSV-M above task arithmetic"]
    # differences 0.2 and 0.1: mean 0.15, s.e. |0.2 − 0.1| / 2 = 0.05; 0.15 > 2 × 0.05
    assert above_ta["difference_mean"] == pytest.approx(0.15)
    assert above_ta["difference_se"] == pytest.approx(0.05)
    assert above_ta["holds"] is True
    # differences 0.3 and 0.05: mean 0.175, s.e. 0.125: positive, within 2 s.e.
    assert claims["TSV-M above TIES"]["holds"] == "weak"
    # Iso-CTS 0.65 vs TA 0.7, then 0.7 vs 0.7: mean −0.025 → does not hold
    assert claims["Iso-CTS above task arithmetic"]["difference_mean"] == pytest.approx(-0.025)
    assert claims["Iso-CTS above task arithmetic"]["holds"] is False
    # Iso-C was not measured: no claim about it
    assert not any(c["claim"].startswith("Iso-C ") for c in result["claims"])
    table = seeds.markdown(result)
    assert "- TSV-M above task arithmetic: **holds** (difference +15.0 points ± 5.0" in table
    assert "**holds in the mean, within 2 s.e.**" in table and "**does not hold**" in table
    # every column as mean ± s.e.: TSV-M averages 0.9 and 0.8 → 85.0 ± 5.0
    assert "| TSV | 85.0 ± 5.0 |" in table
    # the TIES α sat at the low edge of its grid in both seeds, and its published figure
    assert "| 1 (low), 1 (low) | 75.1 |" in table


def test_compression_claim_needs_both_bounds(seeds, tmp_path):
    small = _compression("fraction=0.05", (0.10, 0.12), (0.97, 0.95))
    large = _compression("fraction=1/N", (0.25, 0.25), (1.0, 1.0))
    runs = [_methods_run(0, {}, [small, large]),
            _methods_run(1, {}, [_compression("fraction=0.05", (0.12, 0.14), (0.93, 0.91)),
                                 large])]
    result = seeds.summarise(seeds.load_runs(_write(tmp_path, runs)))
    (claim,) = result["claims"]
    # fraction=0.05 keeps 0.96 then 0.92 of the accuracy (mean 0.94 < 0.95) at 12 % size;
    # fraction=1/N keeps all of it but at 25 %: the claim does not hold.
    assert claim["best_rule"]["rule"] == "fraction=0.05"
    assert claim["best_rule"]["accuracy_kept"] == pytest.approx(0.94)
    assert claim["best_rule"]["size_kept"] == pytest.approx(0.12)
    assert claim["best_rule"]["worst_accuracy_kept"] == pytest.approx(0.91)
    assert claim["holds"] is False
    assert result["compression"]["fraction=0.05"]["accuracy_kept_se"] == pytest.approx(0.02)
    runs[1]["compression"][0] = small
    runs[1]["seed"] = 1
    result = seeds.summarise(seeds.load_runs(_write(tmp_path, runs)))
    assert result["claims"][0]["holds"] is True


def test_compress_rules_read_one_over_n(seeds):
    merge = load_script("results_merge")
    rules = merge.compress_rules("fraction=1/N, energy=0.9,rank=4", 6)
    assert rules == [("fraction", pytest.approx(1 / 6), "fraction=1/N"),
                     ("energy", 0.9, "energy=0.9"), ("rank", 4, "rank=4")]
    with pytest.raises(SystemExit, match="is not rank=K"):
        merge.compress_rules("size=3", 6)


def test_doc_section_is_replaced_between_its_markers(seeds, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\n<!-- seeds-x:begin (scripts/results_seeds.py) -->\nold\n"
                   "<!-- seeds-x:end -->\n\ntail\n")
    paths = _write(tmp_path, [_run(0, (0.6, 0.8))])
    assert seeds.main([*map(str, paths), "--doc", str(doc), "--section", "x"]) == 0
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- seeds-x:end -->\n\ntail\n")
    assert "| 0 | 50.0 | 95.0 |" in text
