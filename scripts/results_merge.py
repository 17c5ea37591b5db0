"""Produce the merge results of docs/results.md on the embedded world (tvtool-small).

For every synthetic task: fine-tune the image encoder with ``tvtool.finetune`` (cached in the
work directory), then compare on the test splits

* zero-shot (the base), fine-tuned (each vector on its own task),
* task arithmetic, TIES, DARE, TSV-M, Iso-C, Iso-CTS, consensus and Breadcrumbs with the
  coefficient searched on the validation splits over each method's default grid (``tvtool
  merge --search-coef``: best average normalized accuracy); TIES over ``--coef-grid auto``
  (its default grid, extended past an end where the optimum sits), so its α is interior or
  the run says it is not; every searched α records whether it sits at a grid edge;
* the plain mean (coefficient 1);
* TSV-C (``tvtool compress``) of each fine-tuned vector under a few rules: size kept (bytes
  of the compressed file / bytes of the full vector's file) and accuracy kept (the
  compressed vector's own-task test accuracy / the full vector's).

All merges share one evaluator (:func:`tvtool.workflows.merge_search.measure_merges`), so the
zero-shot and fine-tuned references are measured once.

Usage::

    python scripts/results_merge.py [--base tvtool-small]
        [--tasks shape,color,count,position,texture,digit]
        [--steps 200] [--lr 1e-3] [--grid GRID] [--limit N] [--workdir out/results-merge]
        [--vectors-dir DIR] [--compress fraction=1/N,fraction=0.05,energy=0.9]
        [--doc docs/results.md]

``--vectors-dir`` (default: the work directory) caches the fine-tuned vectors, so runs of
several seeds can use separate work directories and one vector cache (the cache key names
base, recipe, seed and task data, so seeds never share a vector).

The table is printed and written between the ``merge-results`` markers of ``--doc`` (the rest
of the file is left alone; the file is created if missing); the raw numbers go to
``WORKDIR/results_merge.json``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from doc_sections import replace_section
from seed_runs import mean_se

DEFAULT_BASE = "tvtool-small"


def markers(section: str | None) -> tuple[str, str]:
    """The doc markers of ``merge-results``, or of ``merge-results-NAME`` (``--section``)."""
    name = "merge-results" if not section else f"merge-results-{section}"
    return f"<!-- {name}:begin (scripts/results_merge.py) -->", f"<!-- {name}:end -->"


SEARCH, AUTO, ONE = "default", "auto", "one"
"""How a method's α is chosen: its default grid, ``--coef-grid auto``, or coefficient 1."""

METHODS: list[tuple[str, str, dict[str, Any], str]] = [
    ("task arithmetic", "task_arithmetic", {}, SEARCH),
    ("TIES (density 0.2, global trim)", "ties", {"density": 0.2, "trim": "global"}, AUTO),
    ("DARE (density 0.2, sum)", "dare", {"density": 0.2}, SEARCH),
    ("TSV-M", "tsv", {}, SEARCH),
    ("Iso-C", "iso-c", {}, SEARCH),
    ("Iso-CTS (common space 0.8)", "iso-cts", {}, SEARCH),
    ("consensus (k 2, λ 0.4, TA)", "consensus", {}, SEARCH),
    ("Breadcrumbs (density 0.15, γ 0.006)", "breadcrumbs", {}, SEARCH),
    ("mean", "mean", {}, ONE),
]
"""(label, method, params, how α is chosen), in table order; the labels name the rows of the
JSON (``key`` holds the method), so results_seeds.py can read older runs."""

ZERO_SHOT, FINE_TUNED = "zero-shot", "fine-tuned (one vector per task)"

DEFAULT_COMPRESS = "fraction=1/N,fraction=0.05,fraction=0.025,energy=0.9"
"""TSV-C rules: the reference's ``1/N`` for N tasks and smaller ranks towards ~10 % size."""

COMPRESSION_CLAIM = (0.95, 0.15)
"""TSV-C's claim as tested here: ≥ 95 % of the accuracy kept at ≤ 15 % of the size (the paper
says ~99 % at ~10 %)."""


def log(message: str) -> None:
    """Progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def finetune_vectors(args: argparse.Namespace, workdir: Path) -> list[str]:
    """One task vector per task, fine-tuned once and cached in ``workdir`` (the vector cache).

    The cache key (the file name's hash) names the base's fingerprint, the recipe, the seed
    and the task's data source; it is unchanged from earlier runs, so their vectors are reused.
    """
    import hashlib
    import json

    from tvtool.data import data_source
    from tvtool.finetune import FinetuneConfig, finetune

    # The recipe, the base's fingerprint and the task's data source (for synthetic tasks, the
    # generator version) name the cached file, so a changed base, recipe or task data
    # fine-tunes afresh instead of reusing a stale vector.
    recipe = [base_fingerprint(args.base), args.steps, args.lr, args.batch_size, args.seed]
    paths = []
    for task in args.tasks:
        named = json.dumps([*recipe, data_source(task)], sort_keys=True)
        key = hashlib.sha256(named.encode()).hexdigest()[:12]
        path = workdir / f"{task.replace(':', '_')}.full.{key}.safetensors"
        if not path.exists():
            log(f"fine-tuning {task} ({args.steps} steps)")
            started = time.perf_counter()
            finetune(FinetuneConfig(base=args.base, dataset=task, output=str(path),
                                    steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    device=args.device, seed=args.seed), log=log)
            log(f"  {time.perf_counter() - started:.0f} s")
        paths.append(str(path))
    return paths


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune, merge, search, compress and evaluate; return the results document."""
    from tvtool.evaluate import EvalSettings
    from tvtool.grid import AutoGrid, parse_grid
    from tvtool.merge import MergeConfig
    from tvtool.workflows.merge_search import default_grid_text, measure_merges, normalize

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vectors_dir = Path(args.vectors_dir) if args.vectors_dir else workdir
    vectors_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    vectors = finetune_vectors(args, vectors_dir)
    phases["finetune"], clock = time.perf_counter() - clock, time.perf_counter()
    settings = EvalSettings(base=args.base, batch_size=args.eval_batch_size, device=args.device,
                            limit=args.limit, seed=args.seed)
    configs: list[MergeConfig] = []
    searched: list[tuple[float, ...] | AutoGrid] = []
    grids: dict[str, dict[str, Any]] = {}
    for label, method, params, how in METHODS:
        configs.append(MergeConfig(vectors=tuple(vectors), method=method, params=params,
                                   seed=args.seed,
                                   output=str(workdir / f"merged-{method}.safetensors")))
        if how == ONE:
            searched.append((1.0,))
            continue
        # Each method's default grid (`merge --search-coef`); TIES's extends past an edge
        # (`--coef-grid auto`, never below 0), as the CLI does.
        start = parse_grid(args.grid or default_grid_text(method, params))
        searched.append(AutoGrid(start, floor=0.0) if how == AUTO and not args.grid else start)
        grids[label] = {"start": list(start), "auto": how == AUTO and not args.grid}
    log(f"measuring {len(configs)} merges in one evaluator")
    measured = measure_merges(configs, searched, settings, datasets=args.tasks, log=log)
    phases["merge_search"], clock = time.perf_counter() - clock, time.perf_counter()
    log(f"  merges measured in {phases['merge_search']:.0f} s")
    finetuned = measured.finetuned["test"]
    zero_shot = measured.zero_shot["test"]
    rows: list[dict[str, Any]] = [
        {"method": ZERO_SHOT, "key": "zero-shot", "coef": None, "accuracy": zero_shot,
         "normalized": normalize(zero_shot, finetuned)},
        {"method": FINE_TUNED, "key": "fine-tuned", "coef": None, "accuracy": finetuned,
         "normalized": {k: 1.0 for k in finetuned}}]
    for (label, method, _params, how), search, test in zip(
            METHODS, measured.searches, measured.tests, strict=True):
        record = search.as_json()
        rows.append({"method": label, "key": method, "coef": search.best,
                     "grid": sorted({p.coef for p in search.points}),
                     "searched": how != ONE, "at_grid_edge": record["at_grid_edge"],
                     "grid_edge": record["grid_edge"],
                     "grid_extensions": record["grid_extensions"],
                     "val_score": search.best_point.score,
                     "accuracy": test, "normalized": normalize(test, finetuned)})
    negation = negate(args, vectors, settings, workdir)
    phases["negation"], clock = time.perf_counter() - clock, time.perf_counter()
    compression = compress_vectors(args, vectors, settings, workdir, finetuned)
    phases["compression"] = time.perf_counter() - clock
    log("  seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    return {"base": args.base, "base_fingerprint": base_fingerprint(args.base),
            "tasks": args.tasks, "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, "seed": args.seed, "limit": args.limit,
            "grids": grids, "rows": rows, "negation": negation, "compression": compression,
            "phase_seconds": phases}


def compress_rules(text: str, tasks: int) -> list[tuple[str, float, str]]:
    """Parse ``--compress``: ``RULE=VALUE`` items (``fraction=1/N`` is 1 / number of tasks).

    Returns:
        ``(rule, value, label)`` per item, the label as written (``fraction=1/N``).
    """
    rules = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, value = item.partition("=")
        if name not in ("rank", "energy", "fraction") or not value:
            raise SystemExit(f"--compress: {item!r} is not rank=K, energy=E or fraction=F")
        number: float = 1 / tasks if value.upper() == "1/N" else float(value)
        if name == "rank":
            number = int(number)
        rules.append((name, number, item))
    return rules


def compress_vectors(args: argparse.Namespace, vectors: list[str], settings: Any,
                     workdir: Path, finetuned: dict[str, float]) -> list[dict[str, Any]]:
    """TSV-C of each vector under each ``--compress`` rule: size kept and accuracy kept.

    Size kept is the compressed file's bytes over the full vector file's (headers included;
    ``parameters_kept`` is the same ratio in numbers stored); accuracy kept is the compressed
    vector's test accuracy on its own task over the full vector's (``finetuned``).
    """
    import os

    from tvtool.commands.compress import CompressConfig, compress
    from tvtool.workflows.evaluator import Evaluator

    out = []
    for rule, value, label in compress_rules(args.compress, len(args.tasks)):
        log(f"compress ({label}): {len(vectors)} vectors")
        paths, figures = [], []
        for task, vector in zip(args.tasks, vectors, strict=True):
            path = workdir / f"compressed-{task.replace(':', '_')}-{rule}-{value:g}.safetensors"
            path.unlink(missing_ok=True)
            result = compress(CompressConfig(
                vector=vector, output=str(path), threads=None,
                rank=int(value) if rule == "rank" else None,
                energy=value if rule == "energy" else None,
                fraction=value if rule == "fraction" else None))
            paths.append(str(path))
            figures.append(result.details)
        accuracy: dict[str, float] = {}
        with Evaluator(settings, paths, args.tasks, splits=("test",), log=log) as evaluator:
            for index, task in enumerate(args.tasks):
                onehot = [1.0 if i == index else 0.0 for i in range(len(paths))]
                accuracy[task] = evaluator.accuracies(onehot, "test", [task])[task]
        tasks = {}
        for task, vector, written, fig in zip(args.tasks, vectors, paths, figures, strict=True):
            tasks[task] = {
                "bytes": os.path.getsize(written), "full_bytes": os.path.getsize(vector),
                "size_kept": os.path.getsize(written) / os.path.getsize(vector),
                "parameters_kept": fig["size_kept"], "energy_kept": fig["energy_kept"],
                "accuracy": accuracy[task], "full_accuracy": finetuned[task],
                "accuracy_kept": (accuracy[task] / finetuned[task] if finetuned[task] > 0
                                  else math.nan)}
        out.append({"rule": rule, "value": value, "label": label, "tasks": tasks})
    return out


def negate(args: argparse.Namespace, vectors: list[str], settings: Any,
           workdir: Path) -> dict[str, Any]:
    """``tvtool negate --search`` on the target task's vector against the control task."""
    from tvtool.grid import parse_grid
    from tvtool.workflows.negation import search_negate

    target = args.tasks[args.tasks.index(args.negate_target)]
    log(f"negation: forgetting {target}, keeping {args.negate_control}")
    report = search_negate(vectors[args.tasks.index(target)],
                           str(workdir / "negated.safetensors"), settings,
                           parse_grid(args.negate_grid), control=args.negate_control,
                           target=target, threshold=args.negate_threshold, log=log)
    return report.as_json()


def base_fingerprint(base: str) -> str:
    """The base's tensor fingerprint (names the cached vectors and the doc's base)."""
    from tvtool.models import base_source, fingerprint

    source, _ = base_source(base)
    try:
        return fingerprint(source)
    finally:
        source.close()


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _grid_text(label: str, grid: Any) -> str:
    # Older runs recorded the grid as a list; newer ones {"start": [...], "auto": bool}.
    start = grid["start"] if isinstance(grid, dict) else grid
    auto = isinstance(grid, dict) and grid.get("auto")
    return (f"{label.split(' (')[0]}: {len(start)} values in [{start[0]:g}, {start[-1]:g}]"
            + (", extended past an edge where the optimum sat (`--coef-grid auto`)"
               if auto else ""))


def row_edge(row: dict[str, Any]) -> str | None:
    """The grid end (``low``/``high``) a row's α sat at.

    Recomputed from the row's grid for runs that predate the ``grid_edge`` field.
    """
    from tvtool.grid import grid_edge

    if "grid_edge" in row:
        return row["grid_edge"]  # type: ignore[no-any-return]
    return grid_edge(row.get("coef"), row.get("grid") or [])


def _coef_text(row: dict[str, Any]) -> str:
    if row["coef"] is None:
        return ""
    edge = row_edge(row)
    return f"{row['coef']:g}" + (f" ({edge} edge)" if edge else "")


def markdown(results: dict[str, Any], section: str | None = None) -> str:
    """The results section (between the markers of ``section``)."""
    tasks = results["tasks"]
    short = [t.split(":", 1)[-1] for t in tasks]
    lines = [
        f"## Merging on the embedded world: `{results['base']}`",
        "",
        f"Base `{results['base']}`"
        + (f" (fingerprint `{results['base_fingerprint'][:19]}…`)"
           if results.get("base_fingerprint") else "")
        + "; one full fine-tune of the image encoder per task "
        f"({results['steps']} steps, lr {results['lr']:g}, batch {results['batch_size']}, "
        f"seed {results['seed']}); accuracy on the test splits"
        + (f" (seeded subsets of {results['limit']} examples)" if results["limit"] else "")
        + ". Coefficients searched on the validation splits for the best average normalized "
        "accuracy (`tvtool merge --search-coef`) over each method's grid ("
        + "; ".join(_grid_text(label, g) for label, g in results["grids"].items())
        + "); the mean uses coefficient 1; an α at an end of its searched grid is marked "
        "(low/high edge). Normalized = accuracy / fine-tuned accuracy on that task.",
        "",
        "| method | α | " + " | ".join(short) + " | avg ± s.e. | avg normalized | gain "
        "recovered |",
        "|---|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    n_test = results["limit"] or test_split_size(tasks)
    zero_avg, tuned_avg = (average_accuracy(results["rows"][i], tasks) for i in (0, 1))
    for row in results["rows"]:
        accs = [row["accuracy"][t] for t in tasks]
        norms = [row["normalized"][t] for t in tasks]
        avg = average_accuracy(row, tasks)
        # Binomial standard error of an average over tasks with independent test sets.
        se = math.sqrt(sum(a * (1 - a) / n_test for a in accs)) / len(accs)
        gain = gain_recovered(avg, zero_avg, tuned_avg)
        lines.append(f"| {row['method']} | {_coef_text(row)} | "
                     + " | ".join(_pct(a) for a in accs)
                     + f" | {_pct(avg)} ± {_pct(se)} | {_pct(sum(norms) / len(norms))} | "
                     f"{gain:.2f} |")
    lines += ["", "Gain recovered = (avg − zero-shot avg) / (fine-tuned avg − zero-shot avg), "
              "the fraction of the fine-tuning gain a merged model keeps (issue 11's measure; "
              "about 0.5 for task arithmetic on CLIP ViT-B/32 and the eight published tasks)."]
    if results.get("note"):
        lines += ["", results["note"]]
    if results.get("compression"):
        lines += ["", *compression_markdown(results["compression"], tasks)]
    if results.get("negation"):
        lines += ["", *negation_markdown(results["negation"])]
    listed = claims([results])
    if listed:
        lines += ["", "### Claims (one seed; computed from the numbers above)", "",
                  *claims_markdown(listed)]
    lines += [
        "",
        f"Run time: {results.get('seconds', float('nan')) / 60:.1f} min on CPU. For scale, the "
        "published 8-task ViT-B/32 averages (absolute accuracy): "
        + "; ".join(f"{name} {figure}" for name, figure, _ in PUBLISHED.values())
        + f" ({ISO_TABLE_1}; TALL-masks checkpoints).",
        "",
        "Regenerate with `python scripts/results_merge.py"
        + ("" if results["base"] == DEFAULT_BASE else f" --base {results['base']}")
        + (f" --section {section}" if section else "")
        + "` (fine-tuned vectors are cached in its work directory or `--vectors-dir`).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- compression and claims

ISO_TABLE_1 = "Marczak et al. 2025 (ICML, arXiv 2502.04959v3), Table 1, 8 tasks"

PUBLISHED: dict[str, tuple[str, str, str]] = {
    "zero-shot": ("zero-shot", "48.3", ISO_TABLE_1),
    "fine-tuned": ("fine-tuned", "92.8", ISO_TABLE_1),
    "task_arithmetic": ("task arithmetic", "70.8", ISO_TABLE_1),
    "ties": ("TIES", "75.1", ISO_TABLE_1),
    "consensus": ("consensus TA", "75.0", ISO_TABLE_1),
    "tsv": ("TSV-M", "85.9", ISO_TABLE_1 + "; 85.86 in Gargiulo et al. 2025 (CVPR, arXiv "
            "2412.00081v3), Table 2"),
    "iso-c": ("Iso-C", "86.3", ISO_TABLE_1),
    "iso-cts": ("Iso-CTS", "86.2", ISO_TABLE_1),
}
"""Published 8-task ViT-B/32 average absolute accuracies, by method key: (name, figure,
source), for scale only. One table for all of them, so that every figure comes from the same
fine-tuned checkpoints (the TALL-masks ones, fine-tuned 92.8; Ilharco et al.'s original
checkpoints give fine-tuned 90.5 and task arithmetic 69–70, and Iso-C 84.1 / Iso-CTS 84.3 in
the Iso paper's Table 4). Breadcrumbs has no ViT-B/32 8-task figure in these tables and is
left out. TSV-C's own claim: 99 % of the accuracy at 10 % of the size (Gargiulo et al. 2025,
abstract; Table 3: 92.62 against fine-tuned 92.83)."""

ORDERING_CLAIMS = [("tsv", "task_arithmetic"), ("tsv", "ties"),
                   ("iso-cts", "task_arithmetic"), ("iso-cts", "ties"),
                   ("iso-c", "task_arithmetic"), ("iso-c", "ties")]
"""The papers' central orderings: (higher, lower) in average test accuracy."""

LABEL_KEYS = {label: method for label, method, _params, _how in METHODS}
LABEL_KEYS.update({ZERO_SHOT: "zero-shot", FINE_TUNED: "fine-tuned"})


def method_key(row: dict[str, Any]) -> str:
    """A results row's method (``tsv``, ``ties``...; older runs' rows by their label)."""
    return str(row.get("key") or LABEL_KEYS.get(row["method"], row["method"]))


def compression_summary(compression: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rule of one run: size kept, parameters kept, accuracy kept (means over tasks)."""
    out = []
    for entry in compression:
        tasks = list(entry["tasks"].values())
        out.append({"label": entry["label"],
                    "size_kept": statistics_mean([t["size_kept"] for t in tasks]),
                    "parameters_kept": statistics_mean([t["parameters_kept"] for t in tasks]),
                    "energy_kept": statistics_mean([t["energy_kept"] for t in tasks]),
                    "accuracy_kept": statistics_mean([t["accuracy_kept"] for t in tasks]),
                    "worst_accuracy_kept": min(t["accuracy_kept"] for t in tasks)})
    return out


def statistics_mean(values: list[float]) -> float:
    """The mean of ``values`` (NaN for none)."""
    return sum(values) / len(values) if values else math.nan


def compression_markdown(compression: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """The TSV-C table: per rule, size kept and each task's accuracy kept."""
    short = [t.split(":", 1)[-1] for t in tasks]
    lines = ["### Compression (TSV-C, `tvtool compress`)", "",
             "Each fine-tuned vector compressed alone; size kept = bytes of the compressed file "
             "/ bytes of the full vector's file (parameters kept in brackets); accuracy kept = "
             "the compressed vector's test accuracy on its own task / the full vector's, in %.",
             "",
             "| rule | size kept (params) | energy kept | " + " | ".join(short)
             + " | mean accuracy kept |",
             "|---|---|---|" + "---|" * len(tasks) + "---|"]
    for entry, summary in zip(compression, compression_summary(compression), strict=True):
        kept = [entry["tasks"][t]["accuracy_kept"] for t in tasks]
        lines.append(f"| `{entry['label']}` | {_pct(summary['size_kept'])} % "
                     f"({_pct(summary['parameters_kept'])} %) | "
                     f"{_pct(summary['energy_kept'])} % | "
                     + " | ".join(_pct(k) for k in kept)
                     + f" | {_pct(summary['accuracy_kept'])} |")
    return lines


def claims(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The papers' central claims, judged from the runs (one per seed), never by hand.

    Orderings (TSV-M / Iso-CTS / Iso-C above task arithmetic and TIES): the per-seed
    difference of average test accuracy, its mean and standard error; ``holds`` is True when
    the mean is positive and beyond two standard errors (one run: positive), ``"weak"`` when
    positive but within two, False otherwise. Compression: some rule keeps, on average over
    tasks and seeds, ≥ 95 % of the accuracy at ≤ 15 % of the size (bytes).
    """
    out: list[dict[str, Any]] = []
    per_run = [{method_key(row): average_accuracy(row, run["tasks"]) for row in run["rows"]}
               for run in runs]
    for high, low in ORDERING_CLAIMS:
        if not all(high in r and low in r for r in per_run):
            continue
        diffs = [r[high] - r[low] for r in per_run]
        mean, se = mean_se(diffs)
        beyond = len(diffs) == 1 or (not math.isnan(se) and mean > 2 * se)
        holds: bool | str = (mean > 0 and beyond) or ("weak" if mean > 0 else False)
        names = {m: PUBLISHED.get(m, (m, "", ""))[0] for m in (high, low)}
        out.append({"claim": f"{names[high]} above {names[low]}", "holds": holds,
                    "difference_mean": mean, "difference_se": se, "runs": len(diffs)})
    if all(run.get("compression") for run in runs):
        least, most = COMPRESSION_CLAIM
        by_rule: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            for summary in compression_summary(run["compression"]):
                by_rule.setdefault(summary["label"], []).append(summary)
        rules = []
        for label, summaries in by_rule.items():
            if len(summaries) != len(runs):
                continue
            acc, acc_se = mean_se([s["accuracy_kept"] for s in summaries])
            rules.append({"rule": label, "size_kept": statistics_mean(
                [s["size_kept"] for s in summaries]), "accuracy_kept": acc,
                "accuracy_kept_se": acc_se,
                "worst_accuracy_kept": min(s["worst_accuracy_kept"] for s in summaries)})
        small = [r for r in rules if r["size_kept"] <= most]
        best = max(small, key=lambda r: r["accuracy_kept"]) if small else None
        out.append({"claim": f"compression keeps ≥ {least:.0%} of the accuracy at ≤ {most:.0%} "
                             "of the size", "holds": bool(best and best["accuracy_kept"] >= least),
                    "best_rule": best, "rules": rules, "runs": len(runs)})
    return out


def claims_markdown(listed: list[dict[str, Any]]) -> list[str]:
    """One bullet per claim, with the figures that decide it."""
    lines = []
    for claim in listed:
        verdict = {True: "**holds**", "weak": "**holds in the mean, within 2 s.e.**",
                   False: "**does not hold**"}[claim["holds"]]
        if "difference_mean" in claim:
            se = claim["difference_se"]
            figure = (f"difference {100 * claim['difference_mean']:+.1f} points"
                      + ("" if math.isnan(se) else f" ± {100 * se:.1f} (s.e.)")
                      + f" over {claim['runs']} seed(s)")
        elif claim["best_rule"] is None:
            figure = "no rule kept ≤ the size bound"
        else:
            best = claim["best_rule"]
            figure = (f"best rule within the size bound: `{best['rule']}`, size kept "
                      f"{_pct(best['size_kept'])} %, accuracy kept "
                      f"{_pct(best['accuracy_kept'])} % (worst task "
                      f"{_pct(best['worst_accuracy_kept'])} %) over {claim['runs']} seed(s)")
        lines.append(f"- {claim['claim']}: {verdict} ({figure}).")
    return lines


def gain_recovered(average: float, zero_shot: float, fine_tuned: float) -> float:
    """(average − zero-shot) / (fine-tuned − zero-shot): issue 11's measure; NaN without a gain."""
    return (average - zero_shot) / (fine_tuned - zero_shot) if fine_tuned > zero_shot else math.nan


def average_accuracy(row: dict[str, Any], tasks: list[str]) -> float:
    """A results row's accuracy averaged over ``tasks``."""
    return sum(row["accuracy"][t] for t in tasks) / len(tasks)


def test_split_size(tasks: list[str]) -> int:
    """Test examples per task when no ``--limit`` is set (the synthetic tasks' test pool)."""
    from tvtool.synthetic_world.tasks import POOL_SIZES

    if not all(t.startswith("synthetic:") for t in tasks):
        raise SystemExit("standard errors need --limit for non-synthetic tasks")
    return POOL_SIZES["test"]


def _control(report: dict[str, Any]) -> str:
    """The control dataset of a negate-search report.

    ``control`` in version 1; the only one of ``controls`` in version 2 (where ``negate
    --control`` became repeatable).
    """
    if "control" in report:
        return str(report["control"])
    (control,) = report["controls"]
    return str(control)


def negation_figures(report: dict[str, Any]) -> tuple[float, float, float | None]:
    """A negation's test figures: the target's fall towards chance, control kept, chance.

    The fall is the fraction of the target's distance to chance it lost; the chance level is
    ``None`` (and the fall NaN) where it is not known.
    """
    target, control = report["target"], _control(report)
    base, negated = report["test"]["base"], report["test"]["negated"]
    kept = negated[control] / base[control] if base[control] > 0 else float("nan")
    chance = _chance(target)
    fraction = ((base[target] - negated[target]) / (base[target] - chance)
                if chance and base[target] > chance else float("nan"))
    return fraction, kept, chance


def negation_markdown(report: dict[str, Any]) -> list[str]:
    """The negation table: base and negated test accuracy of target and control."""
    target, control = report["target"], _control(report)
    base, negated = report["test"]["base"], report["test"]["negated"]
    threshold = report["val"]["threshold"]
    fraction, kept, chance = negation_figures(report)
    return [
        "### Negation",
        "",
        f"`tvtool negate --search`: the vector fine-tuned on `{target}` subtracted with the "
        f"largest α (searched on the validation splits over {len(report['val']['grid'])} "
        f"values) that keeps `{control}` accuracy at ≥ {threshold:.0%} of the base's while "
        "lowering the target's. Test accuracy in %:",
        "",
        "| model | α | target (" + target.split(":", 1)[-1] + ") | control ("
        + control.split(":", 1)[-1] + ") |",
        "|---|---|---|---|",
        f"| zero-shot |  | {_pct(base[target])} | {_pct(base[control])} |",
        f"| negated | −{report['best_coef']:g} | {_pct(negated[target])} | "
        f"{_pct(negated[control])} |",
        "",
        f"Target accuracy {_pct(base[target])} → {_pct(negated[target])}"
        + (f", {fraction:.2f} of its distance to chance ({_pct(chance)})" if chance else "")
        + f"; control kept at {_pct(kept)} % of zero-shot on the test split (the α was chosen "
        f"to keep ≥ {threshold:.0%} on the validation split).",
    ]


def _chance(task: str) -> float | None:
    if not task.startswith("synthetic:"):
        return None
    from tvtool.synthetic_world import TASKS

    return 1 / len(TASKS[task.split(":", 1)[1]].classnames)


def update_doc(path: Path, section: str, name: str | None = None) -> None:
    """Replace the text between the markers of section ``name`` (or append it), atomically."""
    replace_section(path, *markers(name), section)


def main() -> int:
    """Run and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--tasks", default="shape,color,count,position,texture,digit",
                        help="comma-separated synthetic tasks (at least 4 for the doc)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--grid", default=None,
                        help="coefficient grid for every method (default: each method's, as "
                             "merge --search-coef)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--negate-target", default="synthetic:shape",
                        help="task whose vector is negated (one of --tasks)")
    parser.add_argument("--negate-control", default="synthetic:color",
                        help="task whose accuracy the negation must keep")
    parser.add_argument("--negate-grid", default="0.05:1:0.05")
    parser.add_argument("--negate-threshold", type=float, default=0.95)
    parser.add_argument("--workdir", default="out/results-merge")
    parser.add_argument("--vectors-dir", default=None,
                        help="where the fine-tuned vectors are cached (default: --workdir); "
                             "runs of several seeds may share one")
    parser.add_argument("--compress", default=DEFAULT_COMPRESS,
                        help="TSV-C rules, comma-separated RULE=VALUE (rank, energy, fraction; "
                             "fraction=1/N is 1 / number of tasks); empty: no compression")
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--note", default=None, help="a sentence added under the table")
    parser.add_argument("--section", default=None,
                        help="write between the merge-results-SECTION markers of --doc, so one "
                             "doc can hold runs of several bases (default: merge-results)")
    parser.add_argument("--base-label", default=None,
                        help="how to name the base in the doc (default: --base)")
    parser.add_argument("--from-json", default=None,
                        help="only render an earlier run's results_merge.json into --doc")
    args = parser.parse_args()
    args.tasks = [t if ":" in t else f"synthetic:{t}" for t in args.tasks.split(",") if t]
    args.negate_target, args.negate_control = (
        t if ":" in t else f"synthetic:{t}" for t in (args.negate_target, args.negate_control))
    if args.negate_target not in args.tasks:
        parser.error("--negate-target must be one of --tasks")
    from tvtool.io import read_json, write_json

    if args.from_json:
        results = read_json(args.from_json)
    else:
        if args.limit is None:
            test_split_size(args.tasks)  # fail now, not after the run, if s.e. is undefined
        started = time.perf_counter()
        results = run(args)
        results["seconds"] = time.perf_counter() - started
        write_json(str(Path(args.workdir) / "results_merge.json"), results)
    if args.note:
        results["note"] = args.note
    if args.base_label:
        results["base"] = args.base_label
    section = markdown(results, args.section)
    print(section)
    update_doc(Path(args.doc), section, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
