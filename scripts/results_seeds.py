"""Summarise ``scripts/results_merge.py`` runs that differ only in ``--seed``.

Each run fine-tunes one vector per task with its own seed and searches every merge's
coefficient on the validation splits; the fraction of the fine-tuning gain a merge recovers,
(merged − zero-shot) / (fine-tuned − zero-shot) on average test accuracies, moves between
seeds by more than the test sample's standard error (docs/results.md). This prints one row
per seed and the mean over seeds with its standard error (sample standard deviation / √n),
the figure that says on which side of a threshold the world lies; and, where the runs
negated a task, how far negation took the target's test accuracy towards chance, with the
share of the control's accuracy it kept.

Usage::

    python scripts/results_seeds.py docs/data/results/results_merge*.json
    python scripts/results_seeds.py --json RUN.json ...   # the summary as JSON on stdout

Every file must come from the same base, tasks and recipe (everything but the seed); the
script stops with an error otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

# The gain and negation figures are results_merge.py's own (this directory is on sys.path
# when a script here runs).
from results_merge import average_accuracy, gain_recovered, negation_figures

RECIPE_KEYS = ("base", "base_fingerprint", "tasks", "steps", "lr", "batch_size", "limit")


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Read the runs and check that they differ only in the seed.

    Raises:
        SystemExit: a file that is not a results_merge.py output, runs of different recipes,
            or two runs of the same seed.
    """
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"results_seeds.py: cannot read {path}: {error}") from None
        needed = (*RECIPE_KEYS, "seed", "rows")
        if not isinstance(run, dict) or not all(key in run for key in needed):
            raise SystemExit(f"results_seeds.py: {path} is not a scripts/results_merge.py output")
        runs.append(run)
    first = runs[0]
    for path, run in zip(paths, runs, strict=True):
        differing = [key for key in RECIPE_KEYS if run[key] != first[key]]
        if differing:
            raise SystemExit(f"results_seeds.py: {path} differs from {paths[0]} in "
                             f"{', '.join(differing)}, not only in the seed")
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"results_seeds.py: a seed appears twice ({sorted(seeds)})")
    return sorted(runs, key=lambda run: run["seed"])


def gains(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method of one run: average test accuracy, coefficient and gain recovered."""
    tasks = run["tasks"]
    rows = {row["method"]: row for row in run["rows"]}
    zero = average_accuracy(rows["zero-shot"], tasks)
    tuned = average_accuracy(rows["fine-tuned (one vector per task)"], tasks)
    out = {}
    for method, row in rows.items():
        average = average_accuracy(row, tasks)
        out[method] = {"accuracy": average, "coef": row.get("coef"),
                       "gain": gain_recovered(average, zero, tuned)}
    return out


def negation(run: dict[str, Any]) -> dict[str, float] | None:
    """How far negation took the target towards chance, and the control's kept share (test).

    ``None`` for a run without a negation, or whose target has no known chance level.
    """
    report = run.get("negation")
    if not report:
        return None
    fraction, kept, chance = negation_figures(report)
    if chance is None:
        return None
    return {"fraction_to_chance": fraction, "control_kept": kept, "coef": report["best_coef"]}


def _mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed figures and, per method, the mean gain over seeds ± its standard error."""
    per_seed = [{"seed": run["seed"], "methods": gains(run), "negation": negation(run)}
                for run in runs]
    methods = list(per_seed[0]["methods"])
    summary = {}
    for method in methods:
        mean, se = _mean_se([seed["methods"][method]["gain"] for seed in per_seed])
        accuracies = [seed["methods"][method]["accuracy"] for seed in per_seed]
        summary[method] = {"gain_mean": mean, "gain_se": se,
                           "accuracy_mean": statistics.fmean(accuracies)}
    negations = [seed["negation"] for seed in per_seed]
    if all(negations):
        mean, se = _mean_se([n["fraction_to_chance"] for n in negations if n])
        kept = statistics.fmean(n["control_kept"] for n in negations if n)
        summary["negation"] = {"fraction_mean": mean, "fraction_se": se, "control_kept_mean": kept}
    return {"base": runs[0]["base"], "tasks": runs[0]["tasks"], "seeds": [r["seed"] for r in runs],
            "per_seed": per_seed, "summary": summary}


def _se_text(se: float) -> str:
    # Two decimals hide a standard error under 0.005 as "0.00".
    return f"{se:.2f}" if se >= 0.01 or math.isnan(se) else f"{se:.3f}"


def markdown(result: dict[str, Any]) -> str:
    """The table of docs/results.md: gain recovered per method (columns) and seed (rows)."""
    zero, tuned = "zero-shot", "fine-tuned (one vector per task)"
    methods = [m for m in result["summary"] if m not in (zero, tuned, "negation")]
    with_negation = "negation" in result["summary"]
    # "TIES (density 0.2, global trim)" -> "TIES": the recipes are in results_merge.py's table.
    head = ["seed", "zero-shot avg", "fine-tuned avg",
            *(f"{m.split(' (')[0]}: gain (α)" for m in methods)]
    if with_negation:
        head.append("negation: target's fall to chance (control kept)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed in result["per_seed"]:
        row = seed["methods"]
        cells = [str(seed["seed"]), f"{100 * row[zero]['accuracy']:.1f}",
                 f"{100 * row[tuned]['accuracy']:.1f}"]
        for method in methods:
            coef = row[method]["coef"]
            coef_text = f" ({coef:g})" if isinstance(coef, (int, float)) else ""
            cells.append(f"{row[method]['gain']:.2f}{coef_text}")
        if with_negation:
            neg = seed["negation"]
            cells.append(f"{neg['fraction_to_chance']:.2f} ({100 * neg['control_kept']:.1f} %)")
        lines.append("| " + " | ".join(cells) + " |")
    summary = result["summary"]
    cells = [f"mean of {len(result['seeds'])} ± s.e.",
             f"{100 * summary[zero]['accuracy_mean']:.1f}",
             f"{100 * summary[tuned]['accuracy_mean']:.1f}"]
    cells += [f"**{summary[m]['gain_mean']:.2f} ± {_se_text(summary[m]['gain_se'])}**"
              for m in methods]
    if with_negation:
        neg = summary["negation"]
        cells.append(f"**{neg['fraction_mean']:.2f} ± {_se_text(neg['fraction_se'])}** "
                     f"({100 * neg['control_kept_mean']:.1f} %)")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the per-seed table (or ``--json``) of the runs named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="results_merge.py JSON outputs")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    result = summarise(load_runs(args.runs))
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
