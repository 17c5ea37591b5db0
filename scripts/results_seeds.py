"""Summarise ``scripts/results_merge.py`` runs that differ only in ``--seed``.

Each run fine-tunes one vector per task with its own seed and searches every merge's
coefficient on the validation splits; the fraction of the fine-tuning gain a merge recovers,
(merged − zero-shot) / (fine-tuned − zero-shot) on average test accuracies, moves between
seeds by more than the test sample's standard error (docs/results.md). This prints one row
per seed and the mean over seeds with its standard error (sample standard deviation / √n),
the figure that says on which side of a threshold the world lies; and, where the runs
negated a task, how far negation took the target's test accuracy towards chance, with the
share of the control's accuracy it kept.

A second table gives every method's columns as mean ± s.e. over seeds (average test accuracy,
average normalized accuracy, gain recovered, the α chosen per seed and whether it sat at a
grid edge) next to the published 8-task ViT-B/32 figure for scale; a third the TSV-C
compression figures (size kept, accuracy kept); then the papers' central claims, each judged
from these numbers by ``results_merge.claims`` (never written by hand).

Usage::

    python scripts/results_seeds.py docs/data/results/merge-methods-small-seed*.json
    python scripts/results_seeds.py --json RUN.json ...   # the summary as JSON on stdout
    python scripts/results_seeds.py --doc docs/results.md --section small RUN.json ...
        # also writes the tables between the seeds-small markers of docs/results.md

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

from doc_sections import replace_section

# The gain and negation figures are results_merge.py's own (this directory is on sys.path
# when a script here runs).
from results_merge import (
    FINE_TUNED,
    PUBLISHED,
    ZERO_SHOT,
    average_accuracy,
    claims,
    claims_markdown,
    compression_summary,
    gain_recovered,
    method_key,
    negation_figures,
    row_edge,
)
from seed_runs import load_seed_runs, mean_se

RECIPE_KEYS = ("base", "base_fingerprint", "tasks", "steps", "lr", "batch_size", "limit")


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Read the runs and check that they differ only in the seed.

    Raises:
        SystemExit: a file that is not a results_merge.py output, runs of different recipes,
            or two runs of the same seed.
    """
    return load_seed_runs(paths, RECIPE_KEYS, ("rows",), "results_seeds.py",
                          "a scripts/results_merge.py output")


def gains(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method of one run: average test accuracy, coefficient and gain recovered."""
    tasks = run["tasks"]
    rows = {row["method"]: row for row in run["rows"]}
    zero = average_accuracy(rows[ZERO_SHOT], tasks)
    tuned_row = rows[FINE_TUNED]
    tuned = average_accuracy(tuned_row, tasks)
    out = {}
    for method, row in rows.items():
        average = average_accuracy(row, tasks)
        # Normalized accuracy recomputed from the accuracies (older runs' rows lack it).
        normalized = [row["accuracy"][t] / tuned_row["accuracy"][t]
                      if tuned_row["accuracy"][t] > 0 else math.nan for t in tasks]
        out[method] = {"accuracy": average, "coef": row.get("coef"),
                       "normalized": statistics.fmean(normalized),
                       "gain": gain_recovered(average, zero, tuned),
                       "grid_edge": row_edge(row), "key": method_key(row)}
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


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed figures and, per method, the mean gain over seeds ± its standard error."""
    per_seed = [{"seed": run["seed"], "methods": gains(run), "negation": negation(run)}
                for run in runs]
    methods = list(per_seed[0]["methods"])
    summary: dict[str, Any] = {}
    for method in methods:
        if not all(method in seed["methods"] for seed in per_seed):
            continue  # a method that some runs did not measure (older runs)
        mean, se = mean_se([seed["methods"][method]["gain"] for seed in per_seed])
        accuracy, accuracy_se = mean_se([seed["methods"][method]["accuracy"]
                                          for seed in per_seed])
        normalized, normalized_se = mean_se([seed["methods"][method]["normalized"]
                                              for seed in per_seed])
        summary[method] = {"gain_mean": mean, "gain_se": se,
                           "accuracy_mean": accuracy, "accuracy_se": accuracy_se,
                           "normalized_mean": normalized, "normalized_se": normalized_se,
                           "coefs": [seed["methods"][method]["coef"] for seed in per_seed],
                           "edges": [seed["methods"][method]["grid_edge"] for seed in per_seed],
                           "key": per_seed[0]["methods"][method]["key"]}
    negations = [seed["negation"] for seed in per_seed]
    if all(negations):
        mean, se = mean_se([n["fraction_to_chance"] for n in negations if n])
        kept = statistics.fmean(n["control_kept"] for n in negations if n)
        summary["negation"] = {"fraction_mean": mean, "fraction_se": se, "control_kept_mean": kept}
    compression = None
    if all(run.get("compression") for run in runs):
        by_rule: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            for rule in compression_summary(run["compression"]):
                by_rule.setdefault(rule["label"], []).append(rule)
        compression = {}
        for label, rules in by_rule.items():
            if len(rules) != len(runs):
                continue
            kept, kept_se = mean_se([f["accuracy_kept"] for f in rules])
            size, size_se = mean_se([f["size_kept"] for f in rules])
            compression[label] = {
                "size_kept_mean": size, "size_kept_se": size_se,
                "parameters_kept_mean": statistics.fmean(f["parameters_kept"] for f in rules),
                "energy_kept_mean": statistics.fmean(f["energy_kept"] for f in rules),
                "accuracy_kept_mean": kept, "accuracy_kept_se": kept_se,
                "worst_accuracy_kept": min(f["worst_accuracy_kept"] for f in rules)}
    return {"base": runs[0]["base"], "tasks": runs[0]["tasks"], "seeds": [r["seed"] for r in runs],
            "per_seed": per_seed, "summary": summary, "compression": compression,
            "claims": claims(runs),
            "published": {key: {"method": name, "accuracy": figure, "source": source}
                          for key, (name, figure, source) in PUBLISHED.items()}}


def _se_text(se: float) -> str:
    # Two decimals hide a standard error under 0.005 as "0.00".
    return f"{se:.2f}" if se >= 0.01 or math.isnan(se) else f"{se:.3f}"


def markdown(result: dict[str, Any]) -> str:
    """The table of docs/results.md: gain recovered per method (columns) and seed (rows)."""
    zero, tuned = ZERO_SHOT, FINE_TUNED
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
    lines += ["", *columns_markdown(result)]
    if result.get("compression"):
        lines += ["", *compression_table(result)]
    if result.get("claims"):
        lines += ["", f"Claims, judged from the {len(result['seeds'])} seed(s) above "
                  "(a difference of average test accuracy, mean ± s.e. over seeds; \"holds\" "
                  "needs it positive beyond 2 s.e.):", "", *claims_markdown(result["claims"])]
    return "\n".join(lines)


def _pm(mean: float, se: float, scale: float = 100.0, digits: int = 1) -> str:
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(se) else f"{text} ± {scale * se:.{digits}f}"


def columns_markdown(result: dict[str, Any]) -> list[str]:
    """Every method's columns as mean ± s.e. over seeds, with the published figure."""
    head = ["method", "avg accuracy", "avg normalized", "gain recovered", "α per seed",
            "published ViT-B/32 (8 tasks)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, figures in result["summary"].items():
        if method == "negation":
            continue
        coefs = ", ".join(
            "" if c is None else f"{c:g}" + (f" ({e})" if e else "")
            for c, e in zip(figures["coefs"], figures["edges"], strict=True))
        published = PUBLISHED.get(figures["key"])
        lines.append(f"| {method} | {_pm(figures['accuracy_mean'], figures['accuracy_se'])} | "
                     f"{_pm(figures['normalized_mean'], figures['normalized_se'])} | "
                     f"{_pm(figures['gain_mean'], figures['gain_se'], 1, 2)} | "
                     f"{coefs if any(c is not None for c in figures['coefs']) else ''} | "
                     f"{published[1] if published else ''} |")
    by_source: dict[str, list[str]] = {}
    for name, _figure, source in PUBLISHED.values():
        by_source.setdefault(source, []).append(name)
    sources = [f"{', '.join(names)}: {source}" for source, names in by_source.items()]
    lines += ["", "Published figures (absolute accuracy, for scale; not the same tasks or "
              "model): " + "; ".join(sources) + ". An α marked low/high sat at that end of "
              "its grid."]
    return lines


def compression_table(result: dict[str, Any]) -> list[str]:
    """TSV-C over seeds: size kept and accuracy kept per rule (mean ± s.e.)."""
    lines = ["| TSV-C rule | size kept (bytes) | parameters kept | energy kept | accuracy kept "
             "(mean over tasks) | worst task, any seed |", "|---|---|---|---|---|---|"]
    for label, figures in result["compression"].items():
        lines.append(f"| `{label}` | {_pm(figures['size_kept_mean'], figures['size_kept_se'])} % "
                     f"| {100 * figures['parameters_kept_mean']:.1f} % | "
                     f"{100 * figures['energy_kept_mean']:.1f} % | "
                     f"{_pm(figures['accuracy_kept_mean'], figures['accuracy_kept_se'])} % | "
                     f"{100 * figures['worst_accuracy_kept']:.1f} % |")
    return lines


def update_doc(path: Path, text: str, section: str) -> None:
    """Write ``text`` between the ``seeds-SECTION`` markers of ``path`` (appended if absent)."""
    replace_section(path, f"<!-- seeds-{section}:begin (scripts/results_seeds.py) -->",
                    f"<!-- seeds-{section}:end -->", text)


def main(argv: list[str] | None = None) -> int:
    """Print the per-seed table (or ``--json``) of the runs named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="results_merge.py JSON outputs")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--doc", type=Path, default=None,
                        help="also write the tables between the seeds-SECTION markers of DOC")
    parser.add_argument("--section", default=None, help="the marker name (seeds-SECTION)")
    args = parser.parse_args(argv)
    if (args.doc is None) != (args.section is None):
        parser.error("--doc and --section go together")
    result = summarise(load_runs(args.runs))
    text = markdown(result)
    print(json.dumps(result, indent=1) if args.json else text)
    if args.doc is not None:
        update_doc(args.doc, text, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
