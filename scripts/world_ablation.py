"""Ablation of the embedded world: does task arithmetic work on it, and why (issue 11).

For one base model and one fine-tuning recipe, in one process:

1. zero-shot test accuracy of every task (frozen zero-shot head from the task's templates);
2. a full fine-tune of the image encoder per task (AdamW, warm-up + cosine, grad-clip 1,
   frozen head), its test accuracy, and its task vector tau_t = theta_t - theta_0;
3. task addition theta_0 + alpha * sum_t tau_t with alpha searched on the validation splits
   (best average normalized accuracy), its test accuracy, and the fraction of the fine-tuning
   gain it recovers: (TA - zero-shot) / (fine-tuned - zero-shot), averaged over tasks;
4. negation of the first task (theta_0 - alpha * tau_target, largest drop of the target's
   validation accuracy with the control task kept at >= 95 % of zero-shot);
5. the pairwise cosine matrix of the task vectors and ||tau|| / ||theta_0||.

Standard errors: the binomial standard error of each test accuracy, sqrt(p(1-p)/n), and of
averages over tasks (independent test sets), are reported next to every figure.

Usage::

    python scripts/world_ablation.py --model tvtool-tiny --lr 1e-4 --steps 400 \
        --tasks shape,color,texture -o out.json

Progress goes to stderr; one JSON document to stdout (and to ``-o``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tvtool.data import load_split
from tvtool.io import read_json, write_json
from tvtool.models import build_zero_shot_head, load_clip
from tvtool.synthetic_world import TASKS, generate_task
from tvtool.synthetic_world.pretrain import images_to_tensor, normalization


def _log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def task_data(task: str, mean: torch.Tensor, std: torch.Tensor,
              n_test: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / val / test tensors of a synthetic task (val is the registry's carve)."""
    images, labels = generate_task(task, "train")
    out = {}
    for split in ("train", "val"):
        idx = load_split(f"synthetic:{task}", split).indices
        out[split] = (images_to_tensor(images[idx], mean, std), torch.tensor(labels[idx]))
    test_images, test_labels = generate_task(task, "test")
    if n_test is not None:
        test_images, test_labels = test_images[:n_test], test_labels[:n_test]
    out["test"] = (images_to_tensor(test_images, mean, std), torch.tensor(test_labels))
    return out


@torch.no_grad()
def accuracy(visual: torch.nn.Module, params: dict[str, torch.Tensor], head: torch.Tensor,
             data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Top-1 accuracy of ``normalize(visual(x; params)) @ head.T``."""
    x, y = data
    correct = 0
    for start in range(0, len(y), 500):
        feats = functional_call(visual, params, (x[start:start + 500],))
        pred = (F.normalize(feats, dim=-1) @ head.T).argmax(-1)
        correct += int((pred == y[start:start + 500]).sum())
    return correct / len(y)


def finetune(visual: torch.nn.Module, theta0: dict[str, torch.Tensor], head: torch.Tensor,
             data: tuple[torch.Tensor, torch.Tensor], lr: float, steps: int, batch: int,
             seed: int, weight_decay: float) -> dict[str, torch.Tensor]:
    """Full fine-tune of the image encoder from ``theta0``; returns the fine-tuned params."""
    params = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    gen = np.random.default_rng(seed)
    x, y = data
    warmup = max(1, steps // 10)
    visual.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        idx = torch.from_numpy(gen.integers(0, len(y), size=batch))
        feats = functional_call(visual, params, (x[idx],))
        loss = F.cross_entropy(F.normalize(feats, dim=-1) @ head.T, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
    visual.eval()
    return {k: v.detach() for k, v in params.items()}


def se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` examples."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def table(runs: list[dict[str, Any]]) -> str:
    """The Markdown ablation table of docs/embedded-world.md, one row per run."""
    lines = ["| run | tasks | recipe | zero-shot | fine-tuned | task addition (α) | "
             "gain recovered | one vector at α 0.2 keeps | max off-diagonal cosine | "
             "‖τ‖/‖θ0‖ | negation: target (control) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        avg, err, neg = run["avg"], run["avg_se"], run["negation"]
        ratios = list(run["tau_norm_ratio"].values())
        kept = run.get("single_vector_gain_kept", {}).get("0.2")
        lines.append(
            f"| {run['label']} | {len(run['tasks'])} | lr {run['lr']:g}, {run['steps']} steps, "
            f"batch {run['batch']} | {100 * avg['zero_shot']:.1f} ± {100 * err['zero_shot']:.1f}"
            f" | {100 * avg['finetuned']:.1f} ± {100 * err['finetuned']:.1f} | "
            f"{100 * avg['task_addition']:.1f} ± {100 * err['task_addition']:.1f} "
            f"({run['alpha']:g}) | **{run['gain_recovered']:.2f}** | "
            f"{'-' if kept is None else f'{kept:.2f}'} | "
            f"{run['max_abs_offdiag_cosine']:.3f} | {min(ratios):.3f}–{max(ratios):.3f} | "
            f"{neg['target']} {100 * neg['target_zero_shot']:.1f} → "
            f"{100 * neg['target_negated']:.1f} ({100 * neg['control_zero_shot']:.1f} → "
            f"{100 * neg['control_negated']:.1f}) |")
    return "\n".join(lines)


def main() -> int:
    """Run the ablation and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tvtool-tiny")
    parser.add_argument("--tasks", default="shape,color,size,count,position,texture")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--control", default=None, help="negation control task (default: 2nd)")
    parser.add_argument("--label", default="")
    parser.add_argument("-o", "--output")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the Markdown ablation table of earlier runs and exit")
    args = parser.parse_args()
    if args.table:
        print(table([read_json(path) for path in args.table]))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    bundle = load_clip(args.model)
    visual: Any = bundle.model.visual.eval()
    theta0 = {k: v.detach().clone() for k, v in visual.named_parameters()}
    mean, std = normalization(bundle.preprocess_eval)
    tasks = args.tasks.split(",")
    alphas = [float(a) for a in args.alphas.split(",")]

    heads, data, zero, tuned, taus = {}, {}, {}, {}, {}
    zero_val, tuned_val = {}, {}
    for task in tasks:
        spec = TASKS[task]
        heads[task] = build_zero_shot_head(bundle, spec.classnames, spec.templates)
        data[task] = task_data(task, mean, std, args.n_test)
        zero[task] = accuracy(visual, theta0, heads[task], data[task]["test"])
        zero_val[task] = accuracy(visual, theta0, heads[task], data[task]["val"])
        t0 = time.perf_counter()
        params = finetune(visual, theta0, heads[task], data[task]["train"], args.lr,
                          args.steps, args.batch, args.seed, args.weight_decay)
        tuned[task] = accuracy(visual, params, heads[task], data[task]["test"])
        tuned_val[task] = accuracy(visual, params, heads[task], data[task]["val"])
        taus[task] = {k: params[k] - theta0[k] for k in theta0}
        _log(f"{task}: zero-shot {zero[task]:.3f} fine-tuned {tuned[task]:.3f} "
             f"({time.perf_counter() - t0:.0f}s)")

    def flat(tau: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tau[k].flatten() for k in sorted(tau)])

    flats = {t: flat(taus[t]) for t in tasks}
    theta_norm = float(flat(theta0).norm())
    cosine = [[float(F.cosine_similarity(flats[a], flats[b], dim=0)) for b in tasks]
              for a in tasks]

    def combine(alpha: float, signs: dict[str, float]) -> dict[str, torch.Tensor]:
        return {k: theta0[k] + alpha * sum(s * taus[t][k] for t, s in signs.items())
                for k in theta0}

    # Task addition: alpha searched on val for the best average normalized accuracy.
    search = []
    for alpha in alphas:
        merged = combine(alpha, {t: 1.0 for t in tasks})
        norm = np.mean([accuracy(visual, merged, heads[t], data[t]["val"]) / tuned_val[t]
                        for t in tasks])
        search.append((alpha, float(norm)))
    best_alpha = max(search, key=lambda item: item[1])[0]
    merged = combine(best_alpha, {t: 1.0 for t in tasks})
    added = {t: accuracy(visual, merged, heads[t], data[t]["test"]) for t in tasks}
    n = {t: len(data[t]["test"][1]) for t in tasks}
    gains = {t: tuned[t] - zero[t] for t in tasks}
    recovered = {t: (added[t] - zero[t]) / gains[t] if abs(gains[t]) > 1e-9 else float("nan")
                 for t in tasks}

    def avg(values: dict[str, float]) -> float:
        return float(np.mean([values[t] for t in tasks]))

    def avg_se(values: dict[str, float]) -> float:
        return math.sqrt(sum(se(values[t], n[t]) ** 2 for t in tasks)) / len(tasks)

    gain_recovered = (avg(added) - avg(zero)) / (avg(tuned) - avg(zero))

    # One vector alone at a fraction of its length: how much of its own gain survives. Task
    # addition at alpha ~ 1/T can only recover what a single vector keeps at that alpha.
    single = {t: {str(alpha): accuracy(visual, combine(alpha, {t: 1.0}), heads[t],
                                       data[t]["test"])
                  for alpha in (0.2, 0.4, 0.6, 0.8)} for t in tasks}
    single_kept = {str(alpha): float(np.mean([(single[t][str(alpha)] - zero[t]) / gains[t]
                                              for t in tasks]))
                   for alpha in (0.2, 0.4, 0.6, 0.8)}

    # Negation of the first task, control = the given one (default the second task).
    target = tasks[0]
    control = args.control or tasks[1]
    if control not in heads:
        spec = TASKS[control]
        heads[control] = build_zero_shot_head(bundle, spec.classnames, spec.templates)
        data[control] = task_data(control, mean, std, args.n_test)
    control_zero_val = accuracy(visual, theta0, heads[control], data[control]["val"])
    best = (0.0, zero_val[target])
    for alpha in [0.05 * i for i in range(1, 41)]:
        edited = combine(alpha, {target: -1.0})
        if accuracy(visual, edited, heads[control], data[control]["val"]) < \
                0.95 * control_zero_val:
            continue
        target_val = accuracy(visual, edited, heads[target], data[target]["val"])
        if target_val < best[1]:
            best = (alpha, target_val)
    edited = combine(best[0], {target: -1.0})
    chance = 1 / len(TASKS[target].classnames)
    neg_target = accuracy(visual, edited, heads[target], data[target]["test"])
    neg_control = accuracy(visual, edited, heads[control], data[control]["test"])
    control_zero = accuracy(visual, theta0, heads[control], data[control]["test"])
    negation = {
        "target": target, "control": control, "alpha": -best[0],
        "target_zero_shot": zero[target], "target_negated": neg_target,
        "control_zero_shot": control_zero, "control_negated": neg_control,
        "chance": chance,
        "fraction_of_distance_to_chance": (zero[target] - neg_target) /
        max(1e-9, zero[target] - chance),
    }

    result = {
        "label": args.label, "model": args.model, "tasks": tasks, "lr": args.lr,
        "steps": args.steps, "batch": args.batch, "seed": args.seed,
        "zero_shot": zero, "finetuned": tuned, "task_addition": added,
        "alpha": best_alpha, "alpha_search_val": search,
        "avg": {"zero_shot": avg(zero), "finetuned": avg(tuned), "task_addition": avg(added)},
        "avg_se": {"zero_shot": avg_se(zero), "finetuned": avg_se(tuned),
                   "task_addition": avg_se(added)},
        "gain_recovered": gain_recovered, "gain_recovered_per_task": recovered,
        "single_vector_accuracy": single, "single_vector_gain_kept": single_kept,
        "cosine": cosine,
        "max_abs_offdiag_cosine": max(abs(cosine[i][j]) for i in range(len(tasks))
                                      for j in range(len(tasks)) if i != j),
        "tau_norm_ratio": {t: float(flats[t].norm()) / theta_norm for t in tasks},
        "negation": negation,
        "seconds": time.perf_counter() - started,
    }
    _log(f"avg zero-shot {avg(zero):.3f} fine-tuned {avg(tuned):.3f} TA {avg(added):.3f} "
         f"(alpha {best_alpha}) gain recovered {gain_recovered:.2f}; single vector keeps "
         f"{single_kept}; negation {target} "
         f"{zero[target]:.3f}->{neg_target:.3f} control {control_zero:.3f}->{neg_control:.3f}")
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
