"""Produce the merge results of docs/results.md on the embedded world (tvtool-small).

For every synthetic task: fine-tune the image encoder with ``tvtool.finetune`` (cached in the
work directory), then compare on the test splits

* zero-shot (the base), fine-tuned (each vector on its own task),
* task arithmetic, TIES and DARE with the coefficient searched on the validation splits
  (``tvtool merge --search-coef``: best average normalized accuracy), and the plain mean.

Usage::

    python scripts/results_merge.py [--base tvtool-small]
        [--tasks shape,color,count,position,texture,digit]
        [--steps 200] [--lr 1e-3] [--grid GRID] [--limit N] [--workdir out/results-merge]
        [--doc docs/results.md]

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

DEFAULT_BASE = "tvtool-small"


def markers(section: str | None) -> tuple[str, str]:
    """The doc markers of ``merge-results``, or of ``merge-results-NAME`` (``--section``)."""
    name = "merge-results" if not section else f"merge-results-{section}"
    return f"<!-- {name}:begin (scripts/results_merge.py) -->", f"<!-- {name}:end -->"


METHODS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("task arithmetic", "task_arithmetic", {}, True),
    ("TIES (density 0.2, global trim)", "ties", {"density": 0.2, "trim": "global"}, True),
    ("DARE (density 0.2, sum)", "dare", {"density": 0.2}, True),
    ("mean", "mean", {}, False),
]


def log(message: str) -> None:
    """Progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def finetune_vectors(args: argparse.Namespace, workdir: Path) -> list[str]:
    """One task vector per task, fine-tuned once and cached in the work directory."""
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
    """Fine-tune, merge, search and evaluate; return the results document."""
    from tvtool.evaluate import EvalSettings
    from tvtool.grid import parse_grid
    from tvtool.merge import MergeConfig, merge
    from tvtool.workflows.evaluator import Evaluator
    from tvtool.workflows.merge_search import default_grid_text, normalize, search_merge

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vectors = finetune_vectors(args, workdir)
    settings = EvalSettings(base=args.base, batch_size=args.eval_batch_size, device=args.device,
                            limit=args.limit, seed=args.seed)
    grids: dict[str, list[float]] = {}
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    for label, method, params, search in METHODS:
        config = MergeConfig(vectors=tuple(vectors), method=method, params=params,
                             seed=args.seed, output=str(workdir / f"merged-{method}.safetensors"))
        log(f"{label}: {'searching the coefficient' if search else 'merging'}")
        if search:
            # Each method's default grid (`merge --search-coef`): TIES λ over 0.8-2.5.
            grid = parse_grid(args.grid or default_grid_text(method, params))
            grids[label] = list(grid)
            report = search_merge(config, settings, grid, datasets=args.tasks, log=log).as_json()
            reference = reference or report
            rows.append({"method": label, "coef": report["best_coef"], "grid": list(grid),
                         "accuracy": report["test"]["accuracy"],
                         "normalized": report["test"]["normalized_accuracy"]})
        else:
            merge(config, log)
            with Evaluator(settings, [config.output], args.tasks, splits=("test",),
                           log=log) as evaluator:
                accuracy = evaluator.accuracies([1.0], "test")
            assert reference is not None
            rows.append({"method": label, "coef": 1.0, "accuracy": accuracy,
                         "normalized": normalize(accuracy, reference["finetuned"]["test"])})
    assert reference is not None
    negation = negate(args, vectors, settings, workdir)
    finetuned = reference["finetuned"]["test"]
    zero_shot = reference["zero_shot"]["test"]
    rows = [{"method": "zero-shot", "coef": None, "accuracy": zero_shot,
             "normalized": normalize(zero_shot, finetuned)},
            {"method": "fine-tuned (one vector per task)", "coef": None, "accuracy": finetuned,
             "normalized": {k: 1.0 for k in finetuned}}, *rows]
    return {"base": args.base, "base_fingerprint": base_fingerprint(args.base),
            "tasks": args.tasks, "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, "seed": args.seed, "limit": args.limit,
            "grids": grids, "rows": rows, "negation": negation}


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
        + "; ".join(f"{label}: {len(g)} values in [{g[0]:g}, {g[-1]:g}]"
                    for label, g in results["grids"].items())
        + "); the mean uses coefficient 1. Normalized = accuracy / fine-tuned accuracy on "
        "that task.",
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
        coef = "" if row["coef"] is None else f"{row['coef']:g}"
        avg = average_accuracy(row, tasks)
        # Binomial standard error of an average over tasks with independent test sets.
        se = math.sqrt(sum(a * (1 - a) / n_test for a in accs)) / len(accs)
        gain = gain_recovered(avg, zero_avg, tuned_avg)
        lines.append(f"| {row['method']} | {coef} | " + " | ".join(_pct(a) for a in accs)
                     + f" | {_pct(avg)} ± {_pct(se)} | {_pct(sum(norms) / len(norms))} | "
                     f"{gain:.2f} |")
    lines += ["", "Gain recovered = (avg − zero-shot avg) / (fine-tuned avg − zero-shot avg), "
              "the fraction of the fine-tuning gain a merged model keeps (issue 11's measure; "
              "about 0.5 for task arithmetic on CLIP ViT-B/32 and the eight published tasks)."]
    if results.get("note"):
        lines += ["", results["note"]]
    if results.get("negation"):
        lines += ["", *negation_markdown(results["negation"])]
    lines += [
        "",
        f"Run time: {results.get('seconds', float('nan')) / 60:.1f} min on CPU. For scale, the "
        "published 8-task ViT-B/32 averages: zero-shot 48.2, fine-tuned 90.5, task arithmetic "
        "69–70, TIES 72.4 (absolute accuracy).",
        "",
        "Regenerate with `python scripts/results_merge.py"
        + ("" if results["base"] == DEFAULT_BASE else f" --base {results['base']}")
        + (f" --section {section}" if section else "")
        + "` (fine-tuned vectors are cached in its work directory).",
    ]
    return "\n".join(lines)


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
    from tvtool.io import write_bytes

    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    begin, end = markers(name)
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_bytes(str(path), text.encode("utf-8"))


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
