"""Why label-free coefficient learning does (not) beat task arithmetic: the experiment of issue 23.

AdaMerging (Yang et al., ICLR 2024) rests on one observation about real CLIP: on the merged
model, a test example's prediction entropy goes with its prediction loss, so lowering the
entropy of unlabelled test predictions lowers the loss that labels would measure. This script
measures that precondition on the embedded world, for one base and one set of task vectors:

1. **Per example**, at the task-arithmetic model: Spearman correlation between an example's
   prediction entropy and its cross-entropy loss against the true label, and the AUROC of
   entropy for telling wrong predictions from right ones (0.5: entropy says nothing), per task.
2. **Per direction**, at the task-arithmetic model: cosine similarity between the gradient of
   the summed per-task mean entropy (what AdaMerging descends) and the gradient of the summed
   per-task cross-entropy with true labels (what labels would descend), over the per-tensor
   coefficients (AdaMerging's "layer-wise" λ), overall and per task.
3. **Along the path**: AdaMerging's protocol (init 0.3, Adam lr 1e-3, per task two batches of
   16 unlabelled test images each step with the losses summed, λ clamped to [0, 1] where it
   enters the model, 500 steps, last iterate; docs/coeffs.md), and the same protocol with the
   true labels' cross-entropy (an *oracle* that
   shows what per-tensor coefficients can reach on this world). Every ``--eval-every`` steps,
   each task's mean entropy and accuracy on a fixed evaluation subset; per task, Spearman
   correlation of −entropy with accuracy along the path.

It is implemented here independently of ``tvtool.atlas.learner`` (plain Adam over the
composed encoder), so it also cross-checks the learner's AdaMerging protocol.

Usage::

    python scripts/labelfree_diagnosis.py --base tvtool-small VEC... \
        --tasks shape,color,count,position,texture,digit --alpha 0.25 --out diag.json

    python scripts/labelfree_diagnosis.py --render diag.json   # the markdown table

Progress on stderr; the JSON report on stdout or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def log(message: str) -> None:
    """Progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def spearman(x: list[float] | Tensor, y: list[float] | Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); nan when a side is constant."""
    a = torch.as_tensor(x, dtype=torch.float64)
    b = torch.as_tensor(y, dtype=torch.float64)

    def ranks(v: Tensor) -> Tensor:
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        # average ranks over ties
        uniq, inverse = torch.unique(v, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(
            0, inverse, torch.ones_like(r))
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for ``positives`` (Mann-Whitney U)."""
    pos = scores[positives]
    neg = scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def entropy(logits: Tensor) -> Tensor:
    """Per-example Shannon entropy of softmax(logits), in nats."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def render(report: dict[str, Any]) -> str:
    """The report as the markdown table of docs/results.md (``--render REPORT.json``)."""
    tasks = [t.split(":")[-1] for t in report["tasks"]]
    per_example = report["per_example_at_task_arithmetic"]
    cosines = report["gradients_at_task_arithmetic"]["cosine_per_task"]
    paths = report.get("paths", {})
    lines = ["| measured at task arithmetic (α " + f"{report['alpha']:g})"
             + " | " + " | ".join(tasks) + " | all |",
             "|---|" + "---|" * (len(tasks) + 1)]

    def row(label: str, values: list[float], total: float | None, digits: int = 2) -> None:
        cells = [f"{v:.{digits}f}" if not math.isnan(v) else "–" for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + ("" if total is None else f"{total:.{digits}f}") + " |")

    row("accuracy (×100)", [100 * e["accuracy"] for e in per_example],
        100 * sum(e["accuracy"] for e in per_example) / len(per_example), 1)
    row("ρ(entropy, CE loss) per example", [e["spearman_entropy_vs_loss"] for e in per_example],
        None)
    row("AUROC of entropy for errors", [e["auroc_entropy_for_errors"] for e in per_example], None)
    row("cos(∇ entropy, ∇ labelled CE) over λ", cosines,
        report["gradients_at_task_arithmetic"]["cosine_summed"])
    for kind, path in paths.items():
        first, last = path["history"][0]["accuracy"], path["history"][-1]["accuracy"]
        row(f"{kind} path: accuracy at step 0 → last (×100, change)",
            [100 * (b - a) for a, b in zip(first, last, strict=True)],
            100 * (path["final_average_accuracy"] - path["start_average_accuracy"]), 1)
        row(f"{kind} path: ρ(−entropy, accuracy) over its checkpoints",
            path["spearman_negentropy_vs_accuracy_per_task"],
            path["spearman_negentropy_vs_accuracy_average"])
    for kind, path in paths.items():
        lines.append("")
        lines.append(f"{kind} path: average accuracy {100 * path['start_average_accuracy']:.1f}"
                     f" at step 0 (λ = {report.get('init', 0.3):g}) → "
                     f"{100 * path['final_average_accuracy']:.1f} at the last step; final λ mean "
                     f"{path['final_coefficients']['mean']:.3f}, "
                     f"{100 * path['final_coefficients']['at_0']:.0f} % at 0, "
                     f"{100 * path['final_coefficients']['at_1']:.0f} % at 1.")
    return "\n".join(lines)


def main() -> int:
    """Run the three measurements and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("vectors", nargs="+", help="task vectors, one per task, in --tasks order")
    parser.add_argument("--base", default="tvtool-small")
    parser.add_argument("--tasks", default="shape,color,count,position,texture,digit")
    parser.add_argument("--alpha", type=float, required=True,
                        help="task arithmetic's α (searched on validation)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init", type=float, default=0.3)
    parser.add_argument("--per-task-batch", type=int, default=16)
    parser.add_argument("--batches-per-task", type=int, default=2,
                        help="batches per task and step (AdaMerging's loop adds two)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-limit", type=int, default=500,
                        help="test examples per task in the path's evaluation subset")
    parser.add_argument("--grad-examples", type=int, default=500,
                        help="test examples per task for the gradient comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="entropy,oracle",
                        help="which paths to run (entropy, oracle, none)")
    parser.add_argument("--out", default=None)
    if sys.argv[1:2] == ["--render"]:
        if len(sys.argv) != 3:
            parser.error("--render takes one report")
        print(render(json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))))
        return 0
    args = parser.parse_args()
    tasks = [t if ":" in t else f"synthetic:{t}" for t in args.tasks.split(",") if t]
    if len(tasks) != len(args.vectors):
        parser.error("one vector per task")
    torch.manual_seed(args.seed)

    from torch import nn

    from tvtool.atlas import ComposedEncoder, Packing, VectorStack, build_partition
    from tvtool.evaluate import head_key, open_eval_data, open_eval_model, zero_shot_head
    from tvtool.workflows.learn_coeffs import _SourceTensors, covered_tensors

    started = time.perf_counter()
    device = torch.device("cpu")
    model = open_eval_model(args.base, args.vectors, device=device)
    report: dict[str, Any] = {"base": args.base, "tasks": tasks, "vectors": args.vectors,
                              "alpha": args.alpha, "seed": args.seed, "init": args.init,
                              "steps": args.steps, "eval_every": args.eval_every,
                              "eval_limit": args.eval_limit}
    with model:
        visual: nn.Module = model.bundle.model.visual  # type: ignore[assignment]
        params = dict(visual.named_parameters())
        sources = [v.source for v in model.vectors]
        specs, _ = covered_tensors(params, sources)
        partition = build_partition(specs, "tensor")
        names = [s.name for s in specs]
        stack = VectorStack(Packing(partition), [_SourceTensors(s, names) for s in sources],
                            torch.float32, device)
        encoder = ComposedEncoder(visual, stack, linearized=model.linearized)
        shape = (len(tasks), partition.num_blocks)
        report["coefficients"] = list(shape)

        # Every task's test split in memory (the world's images are 32 px).
        data: list[tuple[Tensor, Tensor, Tensor]] = []
        for name in tasks:
            split = open_eval_data(name, "test", model.bundle.preprocess_eval, seed=args.seed)
            key = head_key(model.base_fingerprint, split.name, split.classnames, split.templates)
            head = zero_shot_head(model.bundle, key, split.templates, device=device)
            images, labels = zip(*[split.dataset[i] for i in range(len(split.dataset))],
                                 strict=True)
            data.append((torch.stack(images), torch.tensor(labels), head))
            log(f"{name}: {len(labels)} test images, {head.shape[0]} classes")
        gen = torch.Generator().manual_seed(args.seed)
        eval_idx = [torch.randperm(len(x[1]), generator=gen)[:args.eval_limit] for x in data]
        grad_idx = [torch.randperm(len(x[1]), generator=gen)[:args.grad_examples] for x in data]

        def logits_of(weights: dict[str, Tensor], t: int, idx: Tensor) -> Tensor:
            images, _, head = data[t]
            feats = encoder.features(images[idx], weights)
            return F.normalize(feats.float(), dim=-1) @ head.T

        def measure(matrix: Tensor) -> dict[str, list[float]]:
            with torch.no_grad():
                weights = encoder.weights(matrix)
                accs, ents = [], []
                for t in range(len(tasks)):
                    logits = logits_of(weights, t, eval_idx[t])
                    labels = data[t][1][eval_idx[t]]
                    accs.append(float((logits.argmax(-1) == labels).float().mean()))
                    ents.append(float(entropy(logits).mean()))
            return {"accuracy": accs, "entropy": ents}

        ta = torch.full(shape, args.alpha)
        # 1. Per example, at task arithmetic.
        per_example = []
        with torch.no_grad():
            weights = encoder.weights(ta)
            for t, name in enumerate(tasks):
                idx = torch.arange(len(data[t][1]))
                logits = torch.cat([logits_of(weights, t, idx[i:i + 500])
                                    for i in range(0, len(idx), 500)])
                labels = data[t][1]
                ent = entropy(logits)
                ce = F.cross_entropy(logits, labels, reduction="none")
                wrong = logits.argmax(-1) != labels
                per_example.append({
                    "task": name, "accuracy": float((~wrong).float().mean()),
                    "mean_entropy": float(ent.mean()),
                    "max_entropy": math.log(logits.shape[1]),
                    "mean_max_probability": float(logits.softmax(-1).max(-1).values.mean()),
                    "spearman_entropy_vs_loss": spearman(ent, ce),
                    "auroc_entropy_for_errors": auroc(ent, wrong),
                })
                log(f"per example {name}: acc {per_example[-1]['accuracy']:.3f} "
                    f"ρ(H, CE) {per_example[-1]['spearman_entropy_vs_loss']:.2f} "
                    f"AUROC {per_example[-1]['auroc_entropy_for_errors']:.2f}")
        report["per_example_at_task_arithmetic"] = per_example

        # 2. Gradient directions at task arithmetic (and at AdaMerging's init).
        def gradients(start: Tensor) -> dict[str, Any]:
            grads_h, grads_ce = [], []
            for t in range(len(tasks)):
                lam = start.clone().requires_grad_(True)
                logits = logits_of(encoder.weights(lam), t, grad_idx[t])
                h = entropy(logits).mean()
                (gh,) = torch.autograd.grad(h, lam)
                lam = start.clone().requires_grad_(True)
                logits = logits_of(encoder.weights(lam), t, grad_idx[t])
                ce = F.cross_entropy(logits, data[t][1][grad_idx[t]])
                (gc,) = torch.autograd.grad(ce, lam)
                grads_h.append(gh)
                grads_ce.append(gc)
            total_h, total_ce = sum(grads_h), sum(grads_ce)
            cos = float(F.cosine_similarity(total_h.flatten(), total_ce.flatten(), dim=0))
            per_task = [float(F.cosine_similarity(h.flatten(), c.flatten(), dim=0))
                        for h, c in zip(grads_h, grads_ce, strict=True)]
            # Does one small step down the entropy gradient lower the labelled loss?
            return {"cosine_summed": cos, "cosine_per_task": per_task}

        report["gradients_at_task_arithmetic"] = gradients(ta)
        report["gradients_at_init"] = gradients(torch.full(shape, args.init))
        log(f"gradient cosine (entropy vs labelled CE) at TA: "
            f"{report['gradients_at_task_arithmetic']['cosine_summed']:.3f}, per task "
            + ", ".join(f"{c:.2f}" for c in report["gradients_at_task_arithmetic"]
                        ["cosine_per_task"]))

        # 3. Paths.
        report["task_arithmetic"] = measure(ta)
        paths: dict[str, Any] = {}
        for kind in [p for p in args.paths.split(",") if p and p != "none"]:
            lam = torch.full(shape, args.init).requires_grad_(True)
            optimizer = torch.optim.Adam([lam], lr=args.lr, betas=(0.9, 0.999))
            history = [{"step": 0, **measure(lam.detach())}]
            step_gen = torch.Generator().manual_seed(args.seed + 1)
            for step in range(1, args.steps + 1):
                # AdaMerging clamps where λ enters the model (no gradient outside [0, 1]).
                weights = encoder.weights(lam.clamp(0.0, 1.0))
                losses = []
                for t in range(len(tasks)):
                    for _ in range(args.batches_per_task):
                        idx = torch.randint(len(data[t][1]), (args.per_task_batch,),
                                            generator=step_gen)
                        logits = logits_of(weights, t, idx)
                        if kind == "entropy":
                            losses.append(entropy(logits).mean())
                        else:
                            losses.append(F.cross_entropy(logits, data[t][1][idx]))
                loss = torch.stack(losses).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % args.eval_every == 0 or step == args.steps:
                    history.append({"step": step,
                                    **measure(lam.detach().clamp(0.0, 1.0))})
                    avg = sum(history[-1]["accuracy"]) / len(tasks)
                    log(f"{kind} step {step}: loss {float(loss.detach()):.3f} avg acc {avg:.3f}")
            per_task_rho = []
            for t in range(len(tasks)):
                acc = [h["accuracy"][t] for h in history]
                ent = [-h["entropy"][t] for h in history]
                per_task_rho.append(spearman(ent, acc))
            avg_acc = [sum(h["accuracy"]) / len(tasks) for h in history]
            avg_neg_ent = [-sum(h["entropy"]) / len(tasks) for h in history]
            final = lam.detach().clamp(0.0, 1.0)
            paths[kind] = {
                "history": history,
                "spearman_negentropy_vs_accuracy_per_task": per_task_rho,
                "spearman_negentropy_vs_accuracy_average": spearman(avg_neg_ent, avg_acc),
                "final_average_accuracy": avg_acc[-1],
                "start_average_accuracy": avg_acc[0],
                "final_coefficients": {"mean": float(final.mean()),
                                       "per_vector_mean": final.mean(1).tolist(),
                                       "at_0": float((final == 0).float().mean()),
                                       "at_1": float((final == 1).float().mean())},
            }
        report["paths"] = paths
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if not args.out else args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
