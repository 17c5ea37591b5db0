"""Produce the aTLAS results of docs/results.md on the embedded world (tvtool-small).

For every synthetic task a full fine-tune of the image encoder gives a task vector (shared with
``scripts/results_merge.py``: same cache directory and file names). On the test splits it then
compares

* zero-shot (the base) and fine-tuned (each vector on its own task),
* task arithmetic with α searched on the validation splits (best average normalized accuracy,
  ``tvtool merge --search-coef``),
* aTLAS, tensor granularity (``tvtool learn-coeffs``): cross-entropy on ``--shots`` labelled
  examples per class from each task's train split (so it sees far fewer labels than the α
  search's validation splits), and the three label-free objectives on the test images
  (test-time adaptation): entropy (AdaMerging), information maximisation, and aTLAS'
  unsupervised FixMatch (``ufm``). Each objective runs with ``learn-coeffs``' defaults (its
  reference's learning rate, initialisation, weight decay, clipping and steps) unless
  ``--atlas-steps`` / ``--atlas-lr`` override them, with one deliberate difference: the
  augmentation is ``--augment train`` (open_clip's mild crop, what the fine-tunes used), as
  the references' strong crop and horizontal flip change the labels of the world's position,
  digit, count and size tasks.

Usage::

    python scripts/results_atlas.py [--base tvtool-small]
        [--tasks shape,color,count,position,texture,digit]
        [--shots 16] [--objectives ce,entropy,infomax,ufm] [--atlas-steps N] [--atlas-lr LR]
        [--augment train] [--protocol tvtool] [--limit N] [--vectors-dir out/results-merge]
        [--workdir out/results-atlas] [--doc docs/results.md]

The table is printed and written between the ``atlas-results`` markers of ``--doc`` (the rest
of the file is left alone); the raw numbers go to ``WORKDIR/results_atlas.json``. Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from doc_sections import replace_section

# The fine-tuning recipe and the vector cache are results_merge.py's (same directory).
from results_merge import base_fingerprint, finetune_vectors, log

BEGIN = "<!-- atlas-results:begin (scripts/results_atlas.py) -->"
END = "<!-- atlas-results:end -->"


def _test_accuracies(args: argparse.Namespace, vectors: list[str], coefs_path: str
                     ) -> dict[str, float]:
    """Test accuracy of the base edited with a coefficient file, per task."""
    from tvtool.atlas import read_coefficients
    from tvtool.evaluate import EvalConfig, EvalSettings, evaluate

    builder = read_coefficients(coefs_path).weight_builder()
    settings = EvalSettings(base=args.base, batch_size=args.eval_batch_size,
                            device=args.device, limit=args.limit, seed=args.seed)
    report = evaluate(EvalConfig(settings, datasets=tuple(args.tasks), vectors=tuple(vectors),
                                 split="test", weights=builder), log=log)
    return {r.dataset: r.accuracy for r in report.results}


def learn(args: argparse.Namespace, vectors: list[str], objective: str,
          workdir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Learn tensor-granularity coefficients and return their test accuracies."""
    from tvtool.atlas.learner import LearnerConfig
    from tvtool.workflows.learn_coeffs import LearnCoeffsConfig, learn_coeffs

    output = workdir / f"atlas-{objective}.safetensors"
    labelled = objective == "ce"
    started = time.perf_counter()
    learner = LearnerConfig(objective=objective, protocol=args.protocol,
                            steps=args.atlas_steps, lr=args.atlas_lr,
                            batch_size=args.atlas_batch_size, eval_every=10,
                            augment=args.augment, seed=args.seed)
    result = learn_coeffs(LearnCoeffsConfig(
        vectors=tuple(vectors), base=args.base, output=str(output),
        datasets=tuple(args.tasks), learner=learner, granularity=args.granularity,
        shots=args.shots, split="train" if labelled else "test", device=args.device), log=log)
    log(f"  {time.perf_counter() - started:.0f} s, selected step {result.best_step}")
    return _test_accuracies(args, vectors, str(output)), result.as_json()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (or reuse), search α, learn coefficients, evaluate; the results document."""
    from tvtool.evaluate import EvalSettings
    from tvtool.grid import parse_grid
    from tvtool.merge import MergeConfig
    from tvtool.workflows.merge_search import normalize, search_merge

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vectors_args = argparse.Namespace(**{**vars(args), "workdir": args.vectors_dir})
    Path(args.vectors_dir).mkdir(parents=True, exist_ok=True)
    vectors = finetune_vectors(vectors_args, Path(args.vectors_dir))
    settings = EvalSettings(base=args.base, batch_size=args.eval_batch_size, device=args.device,
                            limit=args.limit, seed=args.seed)
    log("task arithmetic: searching α on the validation splits")
    search = search_merge(MergeConfig(vectors=tuple(vectors), method="task_arithmetic",
                                      output=str(workdir / "task-arithmetic.safetensors")),
                          settings, parse_grid(args.grid), datasets=args.tasks,
                          log=log).as_json()
    finetuned = search["finetuned"]["test"]
    zero_shot = search["zero_shot"]["test"]
    rows: list[dict[str, Any]] = [
        {"method": "zero-shot", "accuracy": zero_shot},
        {"method": "fine-tuned (one vector per task)", "accuracy": finetuned},
        {"method": f"task arithmetic (α = {search['best_coef']:g}, searched on val)",
         "accuracy": search["test"]["accuracy"]},
    ]
    runs = {}
    names = {"ce": f"{args.shots}-shot cross-entropy",
             "entropy": "entropy (AdaMerging), unlabelled test images",
             "infomax": "information maximisation, unlabelled test images",
             "ufm": "unsupervised FixMatch (aTLAS learn_ufm.py), unlabelled test images"}
    for objective in args.objectives:
        log(f"aTLAS {objective}: learning coefficients")
        accuracy, runs[objective] = learn(args, vectors, objective, workdir)
        used = runs[objective]["settings"]
        rows.append({"method": f"aTLAS {args.granularity}, {names[objective]} "
                               f"({used['steps']} steps, lr {used['lr']:g}, "
                               f"init {used['init']:g})",
                     "accuracy": accuracy, "objective": objective})
    for row in rows:
        row["normalized"] = normalize(row["accuracy"], finetuned)
    return {"base": args.base, "base_fingerprint": base_fingerprint(args.base),
            "tasks": args.tasks, "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, "seed": args.seed, "limit": args.limit,
            "shots": args.shots, "granularity": args.granularity,
            "atlas_steps": args.atlas_steps, "atlas_lr": args.atlas_lr,
            "atlas_batch_size": args.atlas_batch_size, "augment": args.augment,
            "protocol": args.protocol, "rows": rows,
            "task_arithmetic": search, "atlas_runs": runs}


def _pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The results section (between the markers)."""
    tasks = results["tasks"]
    short = [t.split(":", 1)[-1] for t in tasks]
    lines = [
        "## aTLAS on the embedded world",
        "",
        f"Base `{results['base']}` (fingerprint `{results['base_fingerprint'][:19]}…`); one "
        "full fine-tune of the image encoder per task "
        f"({results['steps']} steps, lr {results['lr']:g}, batch {results['batch_size']}, "
        f"seed {results['seed']}); accuracy on the test splits"
        + (f" (seeded subsets of {results['limit']} examples)" if results["limit"] else "")
        + ". aTLAS learns one coefficient per vector per tensor (AdamW with each objective's "
        "reference defaults, steps, lr and initial value in the row; augmentation "
        f"`{results.get('augment', 'train')}`), on "
        f"{results['shots']} labelled examples per class and task (cross-entropy; 20 % of them "
        "held out to select the step by accuracy) or on unlabelled test images (20 % held out "
        "to select the step label-free: highest H(mean p) − mean H(p), candidates whose "
        "predicted classes collapse excluded; the zero-shot model is a candidate; "
        "docs/coeffs.md). Normalized = accuracy / fine-tuned accuracy on that task.",
        "",
        "| method | " + " | ".join(short) + " | avg | avg normalized |",
        "|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for row in results["rows"]:
        accs = [row["accuracy"][t] for t in tasks]
        norms = [row["normalized"][t] for t in tasks]
        lines.append(f"| {row['method']} | " + " | ".join(_pct(a) for a in accs)
                     + f" | {_pct(sum(accs) / len(accs))} | {_pct(sum(norms) / len(norms))} |")
    lines += [
        "",
        "For scale, the published 8-task ViT-B/32 task-addition averages (absolute accuracy): "
        "task arithmetic 69–70, layer-wise AdaMerging 80.2.",
        "",
        "Regenerate with `python scripts/results_atlas.py` (fine-tuned vectors are cached in "
        "`--vectors-dir`, shared with `scripts/results_merge.py`).",
    ]
    return "\n".join(lines)


def update_doc(path: Path, section: str) -> None:
    """Replace the text between the markers (or append it), atomically."""
    replace_section(path, BEGIN, END, section)


def main() -> int:
    """Run and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="tvtool-small")
    parser.add_argument("--tasks", default="shape,color,count,position,texture,digit",
                        help="comma-separated synthetic tasks")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per task")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch")
    parser.add_argument("--grid", default="0:1:0.05", help="task-arithmetic α grid")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--granularity", default="tensor")
    parser.add_argument("--objectives", default="ce,entropy,infomax,ufm",
                        help="comma-separated learn-coeffs objectives")
    parser.add_argument("--atlas-steps", type=int, default=None,
                        help="steps (default: each objective's)")
    parser.add_argument("--atlas-lr", type=float, default=None,
                        help="learning rate (default: each objective's)")
    parser.add_argument("--augment", default="train",
                        help="learn-coeffs --augment (train: the references' strong crop and "
                             "flip change this world's labels)")
    parser.add_argument("--atlas-batch-size", type=int, default=64)
    parser.add_argument("--protocol", default="tvtool",
                        help="learn-coeffs --protocol (the table below was made with tvtool's; "
                             "scripts/results_labelfree.py measures the reference protocols)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vectors-dir", default="out/results-merge")
    parser.add_argument("--workdir", default="out/results-atlas")
    parser.add_argument("--doc", default="docs/results.md")
    args = parser.parse_args()
    args.tasks = [t if ":" in t else f"synthetic:{t}" for t in args.tasks.split(",") if t]
    args.objectives = [o for o in args.objectives.split(",") if o]
    started = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - started
    from tvtool.io import write_json

    write_json(str(Path(args.workdir) / "results_atlas.json"), results)
    section = markdown(results)
    print(section)
    update_doc(Path(args.doc), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
