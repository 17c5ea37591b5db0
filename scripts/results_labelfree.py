"""Issue 23's results: label-free and few-shot aTLAS under the references' protocols.

One run (one ``--seed``) fine-tunes a vector per task (the full vectors shared with
``scripts/results_merge.py``: same ``--vectors-dir``, file names and recipe; ``linear`` and
``lora`` vectors next to them), then reports test accuracy per task for

* zero-shot, fine-tuned, and task arithmetic with α searched on the validation splits, per
  mode (``tvtool merge --search-coef``);
* every label-free method of ``--methods`` on the full vectors, each ``OBJECTIVE@PROTOCOL``
  or ``ufm@PROTOCOL/READING`` (``learn-coeffs --protocol``, ``--ufm-reading``), trained on
  the whole unlabelled test split (test-time adaptation, as the references);
* the few-shot cross-entropy curve (``ce@atlas``: aTLAS' ``learn_few_shots.py`` protocol,
  selection on the labelled val split) over ``--shots-curve`` for every mode of ``--modes``;

and, for every label-free run, its *path*: every ``--path-every`` steps the coefficients'
label-free statistics and their true test accuracy (``learn-coeffs --audit-split test``:
recorded, never used to learn or select). The test accuracy of a learned model is the audit
accuracy of the step its protocol kept.

The summary (``--summarise RUN.json ...``) checks that the runs differ only in their seed and
writes three tables between the ``labelfree-results[-SECTION]`` markers of ``--doc``: the
methods' average normalized accuracy per seed with mean ± s.e. and the paired difference to
task arithmetic; the few-shot curve against task arithmetic per mode; and, per label-free
method, the Spearman correlation between a label-free score and the true accuracy along the
path, next to the accuracy of the last iterate, of the step the score would select, of the
step the protocol kept and of the best step on the path (the oracle).

Usage::

    python scripts/results_labelfree.py --seed S [--base tvtool-small]
        [--tasks shape,color,count,position,texture,digit] [--modes full,linear,lora]
        [--methods entropy@adamerging,infomax@adamerging,infomax@tvtool,ufm@atlas/code,
                   ufm@tvtool/paper]
        [--shots-curve 1,2,4,8,16] [--path-every 25] [--augment train]
        [--limit N] [--atlas-steps N] [--vectors-dir out/results-merge]
        [--workdir out/results-labelfree]
    python scripts/results_labelfree.py --summarise RUN.json ... [--doc docs/results.md]
        [--section NAME]

Each run writes ``WORKDIR/results_labelfree-seedS.json``. ``--limit`` (seeded test, val and
audit subsets) and ``--atlas-steps`` (every learner's steps) are for smoke runs only. Progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from doc_sections import replace_section

# The fine-tuning recipe and the full-vector cache are results_merge.py's (same directory).
from results_merge import base_fingerprint, finetune_vectors, log
from seed_runs import load_seed_runs, mean_se

DEFAULT_METHODS = ("entropy@adamerging,infomax@adamerging,infomax@tvtool,ufm@atlas/code,"
                   "ufm@tvtool/paper")
RECIPE_KEYS = ("base", "base_fingerprint", "tasks", "steps", "lr", "batch_size", "limit",
               "augment", "path_every", "atlas_steps", "tta_shots", "granularity", "methods")
# What a run may measure in addition (the few-shot curve and the linear/LoRA modes cost hours on
# 2 cores): each table cell says over how many seeds it is taken.
OPTIONAL_KEYS = ("shots_curve", "modes")
SCORES = {
    "information": "H(mean p) − mean H(p)",
    "neg_entropy": "− mean H(p)",
    "class_ratio": "min predicted-class entropy / prior's",
}


def markers(section: str | None) -> tuple[str, str]:
    """The doc markers of ``labelfree-results``, or of ``labelfree-results-NAME``."""
    name = "labelfree-results" if not section else f"labelfree-results-{section}"
    return f"<!-- {name}:begin (scripts/results_labelfree.py) -->", f"<!-- {name}:end -->"


def parse_method(text: str) -> tuple[str, str, str | None]:
    """``OBJECTIVE@PROTOCOL[/READING]`` -> (objective, protocol, ufm reading)."""
    objective, _, rest = text.partition("@")
    protocol, _, reading = rest.partition("/")
    if not objective or not protocol:
        raise SystemExit(f"results_labelfree.py: bad method {text!r} (OBJECTIVE@PROTOCOL)")
    return objective, protocol, reading or None


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def mode_vectors(args: argparse.Namespace, mode: str) -> list[str]:
    """One vector per task in ``mode``; full ones are results_merge.py's cache."""
    from tvtool.data import data_source
    from tvtool.finetune import FinetuneConfig, finetune
    from tvtool.metadata import Mode

    workdir = Path(args.vectors_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    if mode == "full":
        return finetune_vectors(args, workdir)
    recipe = [base_fingerprint(args.base), mode, args.steps, args.lr, args.batch_size,
              args.seed]
    paths = []
    for task in args.tasks:
        named = json.dumps([*recipe, data_source(task)], sort_keys=True)
        key = hashlib.sha256(named.encode()).hexdigest()[:12]
        path = workdir / f"{task.replace(':', '_')}.{mode}.{key}.safetensors"
        if not path.exists():
            log(f"fine-tuning {task} ({mode}, {args.steps} steps)")
            finetune(FinetuneConfig(base=args.base, dataset=task, output=str(path),
                                    mode=Mode(mode), steps=args.steps,
                                    batch_size=args.batch_size, lr=args.lr,
                                    device=args.device, seed=args.seed), log=log)
        paths.append(str(path))
    return paths


# What a checkpointed measurement depends on (not the list of methods, modes or shots: each
# measurement is stored under its own name).
CHECKPOINT_KEYS = ("base", "tasks", "seed", "steps", "lr", "batch_size", "limit", "augment",
                   "path_every", "atlas_steps", "tta_shots", "granularity", "grid",
                   "eval_batch_size")


class Checkpoint:
    """Measurements of one run kept in a JSON file, refused when the recipe differs."""

    def __init__(self, path: Path, recipe: dict[str, Any]) -> None:
        self.path = path
        self.recipe = json.loads(json.dumps(recipe))
        self.done: dict[str, Any] = {}
        if path.exists():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("recipe") != self.recipe:
                raise SystemExit(f"results_labelfree.py: {path} was measured with another "
                                 "recipe; remove it or use another --workdir")
            self.done = stored["done"]

    def get(self, name: str, measure: Any) -> Any:
        """The stored measurement ``name``, or ``measure()`` stored now."""
        if name in self.done:
            log(f"{name}: kept from {self.path.name}")
            return self.done[name]
        self.done[name] = measure()
        from tvtool.io import write_bytes

        write_bytes(str(self.path), json.dumps({"recipe": self.recipe, "done": self.done},
                                               sort_keys=True).encode("utf-8"))
        return self.done[name]


def task_arithmetic(args: argparse.Namespace, mode: str, vectors: list[str]) -> dict[str, Any]:
    """Zero-shot, fine-tuned and task arithmetic (α searched on val) test accuracies."""
    from tvtool.evaluate import EvalSettings
    from tvtool.grid import parse_grid
    from tvtool.merge import MergeConfig
    from tvtool.workflows.merge_search import search_merge

    settings = EvalSettings(base=args.base, batch_size=args.eval_batch_size, device=args.device,
                            limit=args.limit, seed=args.seed)
    output = Path(args.workdir) / f"task-arithmetic-{mode}-seed{args.seed}.safetensors"
    log(f"task arithmetic ({mode}): searching α on the validation splits")
    report = search_merge(MergeConfig(vectors=tuple(vectors), method="task_arithmetic",
                                      output=str(output)), settings, parse_grid(args.grid),
                          datasets=args.tasks, log=log).as_json()
    return {"zero_shot": report["zero_shot"]["test"], "finetuned": report["finetuned"]["test"],
            "task_arithmetic": {"coef": report["best_coef"],
                                "accuracy": report["test"]["accuracy"]}}


def learn_run(args: argparse.Namespace, vectors: list[str], objective: str, protocol: str,
              reading: str | None, shots: int | None, name: str) -> dict[str, Any]:
    """One ``learn-coeffs`` run; its test accuracy is the audit accuracy of the kept step."""
    from tvtool.atlas.learner import LearnerConfig
    from tvtool.workflows.learn_coeffs import LearnCoeffsConfig, learn_coeffs

    labelled = objective == "ce"
    workdir = Path(args.workdir)
    started = time.perf_counter()
    # Evaluations are the candidates of a selecting protocol: keep theirs (tvtool every 10
    # steps, atlas every epoch); AdaMerging selects nothing, so its path is sampled densely.
    learner = LearnerConfig(
        objective=objective, protocol=protocol, ufm_reading=reading, steps=args.atlas_steps,
        eval_every=args.path_every if protocol == "adamerging" else None,
        augment=args.augment if objective in ("ce", "ufm") else None, seed=args.seed)
    result = learn_coeffs(LearnCoeffsConfig(
        vectors=tuple(vectors), base=args.base,
        output=str(workdir / f"{name}-seed{args.seed}.safetensors"),
        datasets=tuple(args.tasks), learner=learner, granularity=args.granularity,
        shots=shots, split="train" if labelled else "test", device=args.device,
        audit_split="test", eval_limit=args.limit), log=log).as_json()
    kept = next(r for r in result["candidates"] if r["step"] == result["best_step"]
                and r.get("candidate", True))
    seconds = time.perf_counter() - started
    log(f"  {name}: {seconds:.0f} s, kept step {result['best_step']} of "
        f"{result['steps_run']}")
    return {"accuracy": kept["audit_accuracy"], "best_step": result["best_step"],
            "steps_run": result["steps_run"], "at_edge": result["at_edge"],
            "selection": result["selection"], "settings": result["settings"],
            "path": [_path_point(r) for r in result["candidates"] if r.get("audit_accuracy")],
            "seconds": seconds}


def _path_point(record: dict[str, Any]) -> dict[str, Any]:
    """A path record reduced to its label-free scores and its true (audit) accuracy."""
    stats = record.get("datasets") or []

    def mean(key: str) -> float | None:
        values = [s[key] for s in stats if s.get(key) is not None]
        return sum(values) / len(values) if values else None

    ratios = [s["class_entropy_ratio"] for s in stats if s.get("class_entropy_ratio") is not None]
    audit = record["audit_accuracy"]
    entropy = mean("entropy")
    return {"step": record["step"], "candidate": record.get("candidate", True),
            "admissible": record.get("admissible"),
            "information": mean("information"),
            "neg_entropy": None if entropy is None else -entropy,
            "class_ratio": min(ratios) if ratios else None,
            "accuracy": audit, "mean_accuracy": sum(audit.values()) / len(audit)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode's vectors and task arithmetic, the label-free runs, the few-shot curve."""
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    # Each measurement is kept as soon as it is made (hours on 2 cores): a run stopped and
    # started again with the same recipe measures only what is missing.
    checkpoint = Checkpoint(Path(args.workdir) / f"results_labelfree-seed{args.seed}.partial.json",
                            {key: getattr(args, key) for key in CHECKPOINT_KEYS}
                            | {"base_fingerprint": base_fingerprint(args.base)})
    modes: dict[str, Any] = {}
    vectors: dict[str, list[str]] = {}
    for mode in args.modes:
        vectors[mode] = mode_vectors(args, mode)
        modes[mode] = checkpoint.get(f"task_arithmetic/{mode}",
                                     lambda m=mode: task_arithmetic(args, m, vectors[m]))
    labelfree = []
    for method in args.methods:
        objective, protocol, reading = parse_method(method)

        def learn(objective: str = objective, protocol: str = protocol,
                  reading: str | None = reading, method: str = method) -> dict[str, Any]:
            log(f"{method}: learning coefficients on the unlabelled test images")
            return learn_run(args, vectors["full"], objective, protocol, reading,
                             args.tta_shots, method.replace("@", "-").replace("/", "-"))

        record = checkpoint.get(f"labelfree/{method}", learn)
        labelfree.append({"method": method, "objective": objective, "protocol": protocol,
                          "reading": reading, **record})
    fewshot = []
    for mode in args.modes:
        for shots in args.shots_curve:
            def few(mode: str = mode, shots: int = shots) -> dict[str, Any]:
                log(f"ce@atlas ({mode}): {shots} shots per class")
                return learn_run(args, vectors[mode], "ce", "atlas", None, shots,
                                 f"fewshot-{mode}-{shots}")

            record = checkpoint.get(f"fewshot/{mode}/{shots}", few)
            fewshot.append({"mode": mode, "shots": shots, **record})
    return {"base": args.base, "base_fingerprint": base_fingerprint(args.base),
            "tasks": args.tasks, "seed": args.seed, "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, "limit": args.limit, "augment": args.augment,
            "path_every": args.path_every, "atlas_steps": args.atlas_steps,
            "tta_shots": args.tta_shots,
            "granularity": args.granularity, "methods": args.methods,
            "shots_curve": args.shots_curve, "modes": args.modes, "results": modes,
            "labelfree": labelfree, "fewshot": fewshot}


# ---------------------------------------------------------------------------------------------
# Summary over seeds
# ---------------------------------------------------------------------------------------------


def normalized(accuracy: dict[str, float], finetuned: dict[str, float],
               tasks: list[str]) -> float:
    """Average over tasks of accuracy / fine-tuned accuracy (issue 23's measure)."""
    return sum(accuracy[t] / finetuned[t] for t in tasks) / len(tasks)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties; NaN when undefined)."""
    if len(xs) < 3:
        return math.nan

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def path_study(path: list[dict[str, Any]]) -> dict[str, float]:
    """A path's correlations and the accuracy each way of picking a step gets (mean over tasks).

    ``rule``: the tvtool label-free rule on this path (admissible first, then the highest
    information); ``last``: the last iterate; ``oracle``: the best step by true accuracy.
    """
    points = [p for p in path if p["step"] >= 0]
    out: dict[str, float] = {}
    for score in SCORES:
        pairs = [(p[score], p["mean_accuracy"]) for p in points if p[score] is not None]
        out[f"rho_{score}"] = spearman([a for a, _ in pairs], [b for _, b in pairs])
    if points:
        out["last"] = points[-1]["mean_accuracy"]
        out["oracle"] = max(p["mean_accuracy"] for p in points)
        ruled = max(points, key=lambda p: (bool(p["admissible"]), p["information"] or -math.inf))
        out["rule"] = ruled["mean_accuracy"]
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    return mean_se([v for v in values if not math.isnan(v)])


def _fmt(mean: float, se: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(se) else f"{text} ± {scale * se:.{digits}f}"


def per_task_deltas(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Each label-free method's kept accuracy minus task arithmetic's, per task and run.

    Task arithmetic is the full vectors' searched α; one value per run, in run order.
    """
    deltas: dict[str, dict[str, list[float]]] = {}
    for run_ in runs:
        ta = run_["results"]["full"]["task_arithmetic"]["accuracy"]
        for entry in run_["labelfree"]:
            per_task = deltas.setdefault(entry["method"], {})
            for task in run_["tasks"]:
                per_task.setdefault(task, []).append(entry["accuracy"][task] - ta[task])
    return deltas


def _per_task_lines(runs: list[dict[str, Any]]) -> list[str]:
    tasks = runs[0]["tasks"]
    head = ["method", *(t.split(":")[-1] for t in tasks), "average"]
    lines = ["", "### Per task: the learned model against task arithmetic", "",
             "Test accuracy of each label-free method's kept model minus task arithmetic's, "
             "per task, in points (mean ± s.e. over seeds); the average is the difference of "
             "average (not normalized) accuracy.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, per_task in per_task_deltas(runs).items():
        average = [statistics.fmean(values) for values in zip(*per_task.values(), strict=True)]
        cells = [method, *(_fmt(*_mean_se(per_task[t])) for t in tasks),
                 _fmt(*_mean_se(average))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Read the runs; refuse runs that differ in anything but the seed."""
    return load_seed_runs(paths, RECIPE_KEYS, (), "results_labelfree.py",
                          "a results_labelfree.py run")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed and over seeds: normalized accuracies, differences to TA, path studies."""
    tasks = runs[0]["tasks"]
    methods: dict[str, list[float]] = {}
    deltas: dict[str, list[float]] = {}
    fewshot: dict[tuple[str, int], list[float]] = {}
    ta_mode: dict[str, list[float]] = {}
    studies: dict[str, dict[str, list[float]]] = {}
    for run_ in runs:
        full = run_["results"]["full"]
        tuned = full["finetuned"]
        ta = normalized(full["task_arithmetic"]["accuracy"], tuned, tasks)
        methods.setdefault("zero-shot", []).append(normalized(full["zero_shot"], tuned, tasks))
        methods.setdefault("task arithmetic (α searched)", []).append(ta)
        for entry in run_["labelfree"]:
            value = normalized(entry["accuracy"], tuned, tasks)
            methods.setdefault(entry["method"], []).append(value)
            deltas.setdefault(entry["method"], []).append(value - ta)
            for key, number in path_study(entry["path"]).items():
                studies.setdefault(entry["method"], {}).setdefault(key, []).append(number)
        for mode, result in run_["results"].items():
            ta_mode.setdefault(mode, []).append(
                normalized(result["task_arithmetic"]["accuracy"], result["finetuned"], tasks))
        for entry in run_["fewshot"]:
            tuned_mode = run_["results"][entry["mode"]]["finetuned"]
            fewshot.setdefault((entry["mode"], entry["shots"]), []).append(
                normalized(entry["accuracy"], tuned_mode, tasks))
    return {"base": runs[0]["base"], "base_fingerprint": runs[0].get("base_fingerprint"),
            "tasks": tasks, "seeds": [r["seed"] for r in runs],
            "methods": methods, "deltas": deltas, "ta_mode": ta_mode,
            "fewshot": {f"{m}:{k}": v for (m, k), v in fewshot.items()},
            "studies": studies, "runs": runs}


def markdown(summary: dict[str, Any], section: str | None,
             paths: list[Path] | None = None) -> str:
    """The three tables of docs/results.md (``paths``: the runs, for the command line)."""
    seeds, runs = summary["seeds"], summary["runs"]
    first = runs[0]
    head = ["method", *(f"seed {s}" for s in seeds), "mean ± s.e.", "Δ vs task arithmetic"]
    # Two builds of one base name can both be in the doc (tvtool-base is made per machine).
    fingerprint = summary.get("base_fingerprint") or ""
    build = f" (build `{fingerprint.removeprefix('sha256:')[:8]}…`)" if fingerprint else ""
    named = f" (fingerprint `{fingerprint[:19]}…`)" if fingerprint else ""
    lines = [
        f"## Label-free and few-shot aTLAS under the references' protocols: "
        f"`{summary['base']}`{build}",
        "",
        f"Base `{summary['base']}`{named}, "
        f"tasks {', '.join(t.split(':')[-1] for t in first['tasks'])}; "
        f"vectors fine-tuned {first['steps']} steps (lr {first['lr']:g}, batch "
        f"{first['batch_size']}) with each seed; accuracy on the test splits"
        + (f" (seeded subsets of {first['limit']})" if first["limit"] else "")
        + ", normalized by the fine-tuned accuracy of the same mode and averaged over tasks "
        "(×100). Label-free methods learn tensor-granularity coefficients of the full vectors "
        "on the unlabelled test images (`learn-coeffs --split test --all-examples "
        "--protocol P`; `METHOD@PROTOCOL[/UFM READING]`, docs/coeffs.md); ce and ufm use "
        f"`--augment {first['augment']}`. Δ: paired difference to task arithmetic over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for method, values in summary["methods"].items():
        cells = [method, *(_fmt(v, math.nan) for v in values),
                 _fmt(*_mean_se(values))]
        delta = summary["deltas"].get(method)
        cells.append(_fmt(*_mean_se(delta)) if delta else "")
        lines.append("| " + " | ".join(cells) + " |")
    modes = list(dict.fromkeys(mode for r in runs for mode in r["results"]))
    shots = sorted({int(k) for r in runs for k in r["shots_curve"]})
    curve_seeds = sorted({r["seed"] for r in runs if r["shots_curve"]})
    lines += ["", "### Few-shot aTLAS over shots (`ce@atlas`: learn_few_shots.py's protocol)",
              "", "Average normalized test accuracy (×100), mean ± s.e. over the seeds that "
              "measured it (n: how many; the curve: seeds "
              f"{', '.join(map(str, curve_seeds)) or 'none'}); selection on the labelled val "
              "split; task arithmetic's α searched on the full val splits.", "",
              "| " + " | ".join(["mode", "n", "task arithmetic",
                                 *(f"k = {k}" for k in shots)]) + " |",
              "|---|---|---|" + "---|" * len(shots)]
    for mode in modes:
        ta_values = summary["ta_mode"][mode]
        curve = [summary["fewshot"].get(f"{mode}:{k}", []) for k in shots]
        counts = sorted({len(ta_values), *(len(c) for c in curve if c)})
        cells = [mode, "/".join(map(str, counts)), _fmt(*_mean_se(ta_values))]
        cells += [_fmt(*_mean_se(values)) for values in curve]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### Does a label-free score rank the path's checkpoints by true accuracy?",
              "", "At every evaluation of each label-free run (AdaMerging: every "
              f"{first['path_every']} steps; tvtool: every 10; atlas: every epoch), the "
              "coefficients' label-free scores on the run's own selection data (AdaMerging: "
              "the unlabelled test images; tvtool: its held-out part; atlas: the val images) "
              "against their "
              "true test accuracy (`--audit-split test`, never used to learn or select). "
              "Spearman ρ per run, mean ± s.e. over seeds; then the average test accuracy "
              "(×100, not normalized) of the step each way of choosing keeps: the last "
              "iterate, the tvtool label-free rule (admissible, then highest information), "
              "the protocol's own choice, and the best step on the path (oracle).", "",
              "| method | " + " | ".join(f"ρ({label})" for label in SCORES.values())
              + " | last | rule | protocol | oracle |",
              "|---|" + "---|" * (len(SCORES) + 4)]
    for method, study in summary["studies"].items():
        kept = [statistics.fmean(e["accuracy"].values()) for r in runs for e in r["labelfree"]
                if e["method"] == method]
        cells = [method, *(_fmt(*_mean_se(study.get(f"rho_{s}", [])), scale=1, digits=2)
                           for s in SCORES)]
        cells += [_fmt(*_mean_se(study.get("last", []))), _fmt(*_mean_se(study.get("rule", []))),
                  _fmt(*_mean_se(kept)), _fmt(*_mean_se(study.get("oracle", [])))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _per_task_lines(runs)
    named = [str(p) for p in paths] if paths else [f"RUN-seed{s}.json" for s in seeds]
    command = ("python scripts/results_labelfree.py --summarise " + " ".join(named)
               + (f" --section {section}" if section else ""))
    recipe = (f" --modes {','.join(modes)} --path-every {first['path_every']} --methods "
              + ",".join(first["methods"])
              + f" --shots-curve {','.join(map(str, shots)) or chr(39) * 2}")
    lines += ["", "Regenerate: one `python scripts/results_labelfree.py --seed S"
              + ("" if summary["base"] == "tvtool-small" else f" --base {summary['base']}")
              + f"{recipe}` per seed, then `{command}`."]
    return "\n".join(lines)


def update_doc(path: Path, section_text: str, section: str | None) -> None:
    """Replace the text between the section's markers (or append it), atomically."""
    replace_section(path, *markers(section), section_text)


def main(argv: list[str] | None = None) -> int:
    """Run one seed, or summarise runs into the doc."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--summarise", nargs="+", type=Path, default=None,
                        help="results_labelfree.py JSON runs to summarise (no run)")
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--section", default=None)
    parser.add_argument("--base", default="tvtool-small")
    parser.add_argument("--tasks", default="shape,color,count,position,texture,digit")
    parser.add_argument("--modes", default="full,linear,lora")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--shots-curve", default="1,2,4,8,16")
    parser.add_argument("--granularity", default="tensor")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per task")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch")
    parser.add_argument("--grid", default="0:1:0.05", help="task-arithmetic α grid")
    parser.add_argument("--path-every", type=int, default=25,
                        help="steps between the label-free runs' path records")
    parser.add_argument("--augment", default="train",
                        help="ce and ufm augmentation (the references' flip changes this "
                             "world's labels)")
    parser.add_argument("--atlas-steps", type=int, default=None,
                        help="every learner's steps (smoke runs; default: the protocol's)")
    parser.add_argument("--tta-shots", type=int, default=None,
                        help="label-free runs adapt on K x classes test images instead of "
                             "all of them (smoke runs)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vectors-dir", default="out/results-merge")
    parser.add_argument("--workdir", default="out/results-labelfree")
    args = parser.parse_args(argv)
    if args.summarise:
        summary = summarise(load_runs(args.summarise))
        text = markdown(summary, args.section, args.summarise)
        print(text)
        update_doc(Path(args.doc), text, args.section)
        return 0
    args.tasks = [t if ":" in t else f"synthetic:{t}" for t in args.tasks.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    if "full" not in args.modes:
        parser.error("--modes must include full (the label-free methods use the full vectors)")
    args.methods = [m for m in args.methods.split(",") if m]
    for method in args.methods:
        parse_method(method)
    args.shots_curve = [int(k) for k in args.shots_curve.split(",") if k]
    started = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - started
    from tvtool.io import write_json

    output = Path(args.workdir) / f"results_labelfree-seed{args.seed}.json"
    write_json(str(output), results)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
