"""Measure the embedded world: zero-shot vs quickly fine-tuned accuracy of tvtool-tiny.

For every synthetic task: the zero-shot accuracy of the base on the test split, then a full
fine-tune of the image encoder against the frozen zero-shot head (AdamW, cosine schedule) on
the train split, and its test accuracy. This is a quality check of the world, not the
``tvtool finetune`` command.

Usage::

    python scripts/measure_world.py [--model REF] [--steps 300] [--tasks shape,color] [-o out.json]

Progress goes to stderr; the results table goes to stdout (and JSON to ``-o`` if given).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from tvtool.data import load_split
from tvtool.io import write_json
from tvtool.models import ClipBundle, build_zero_shot_head, load_clip
from tvtool.synthetic_world import TASKS, generate_task
from tvtool.synthetic_world.measure import zero_shot_accuracy
from tvtool.synthetic_world.pretrain import images_to_tensor, normalization


@torch.no_grad()
def accuracy(visual: torch.nn.Module, head: torch.Tensor, images: np.ndarray,
             labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> float:
    """Top-1 accuracy of ``normalize(visual(x)) @ head.T``."""
    visual.eval()
    correct = 0
    for start in range(0, len(labels), 500):
        x = images_to_tensor(images[start:start + 500], mean, std)
        pred = (F.normalize(visual(x), dim=-1) @ head.T).argmax(-1)
        correct += int((pred.numpy() == labels[start:start + 500]).sum())
    return correct / len(labels)


def finetune(bundle: ClipBundle, task: str, steps: int, batch: int, lr: float,
             seed: int) -> float:
    """Fine-tune a copy of the image encoder on ``task``; return its test accuracy."""
    spec = TASKS[task]
    head = build_zero_shot_head(bundle, spec.classnames, spec.templates)
    mean, std = normalization(bundle.preprocess_eval)
    pool_images, pool_labels = generate_task(task, "train")
    train = load_split(f"synthetic:{task}", "train", seed=seed)
    images, labels = pool_images[train.indices], pool_labels[train.indices]
    test_images, test_labels = generate_task(task, "test")

    visual = copy.deepcopy(bundle.model.visual).train()
    optimizer = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=0.1)
    gen = np.random.default_rng(seed)
    warmup = max(1, steps // 10)
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        idx = gen.integers(0, len(labels), size=batch)
        x = images_to_tensor(images[idx], mean, std)
        logits = F.normalize(visual(x), dim=-1) @ head.T
        loss = F.cross_entropy(logits, torch.tensor(labels[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(visual.parameters(), 1.0)
        optimizer.step()
    return accuracy(visual, head, test_images, test_labels, mean, std)


def main() -> int:
    """Measure every task and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tvtool-small")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    bundle = load_clip(args.model)
    rows = []
    for task in args.tasks.split(","):
        start = time.perf_counter()
        zero = zero_shot_accuracy(bundle, task)
        tuned = None if args.no_finetune else finetune(bundle, task, args.steps, args.batch,
                                                       args.lr, args.seed)
        chance = 1 / len(TASKS[task].classnames)
        rows.append({"task": f"synthetic:{task}", "classes": len(TASKS[task].classnames),
                     "chance": round(chance, 4), "zero_shot": zero, "finetuned": tuned})
        print(f"{task}: zero-shot {zero:.3f} fine-tuned {tuned} "
              f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    print("| task | classes | chance | zero-shot | fine-tuned |")
    print("|---|---|---|---|---|")
    for r in rows:
        tuned = "-" if r["finetuned"] is None else f"{100 * r['finetuned']:.1f}"
        print(f"| {r['task']} | {r['classes']} | {100 * r['chance']:.1f} | "
              f"{100 * r['zero_shot']:.1f} | {tuned} |")
    if args.output:
        write_json(args.output, {"model": args.model, "steps": args.steps, "batch": args.batch,
                                 "lr": args.lr, "seed": args.seed, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
