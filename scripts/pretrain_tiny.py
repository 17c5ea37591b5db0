"""Pre-train an embedded CLIP and write its weights (packaged ones: tvtool/models/weights/).

Usage::

    python scripts/pretrain_tiny.py [--model tvtool-small] [--steps N] [--batch B] [--seed S]
                                    [-o PATH] [--threads T]

Progress and timing go to stderr; the output path goes to stdout. With ``--eval`` the
zero-shot accuracy of the result on every synthetic task is printed to stderr as well.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers waste most of the CPU when other processes share the cores (4x
# slower steps measured on a loaded 2-core machine); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from tvtool.models import PACKAGED_MODELS, embedded_weights_path
from tvtool.synthetic_world.pretrain import PretrainConfig, pretrain_tiny, write_pretrained

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "tvtool/models/weights"


def main() -> int:
    """Run pre-training with the command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PretrainConfig.model,
                        help="tvtool-tiny (the tests' model), tvtool-small (the demo's) or "
                             "tvtool-base (docs/results.md's)")
    parser.add_argument("-o", "--output", default=None,
                        help="default: the packaged file of --model (tvtool-base: its cache "
                             "copy)")
    parser.add_argument("--steps", type=int, default=None,
                        help="default: the recipe of --model's packaged weights")
    parser.add_argument("--batch", type=int, default=PretrainConfig.batch)
    parser.add_argument("--lr", type=float, default=None,
                        help="default: the recipe of --model's embedded weights")
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval", action="store_true", help="report zero-shot accuracy after")
    args = parser.parse_args()
    if args.output is None:
        # Packaged weights are rewritten in place; the others' home is tvtool's cache copy.
        packaged = args.model in PACKAGED_MODELS
        args.output = str(WEIGHTS_DIR / f"{args.model}.safetensors" if packaged
                          else embedded_weights_path(args.model))

    # Fail before the long run, not after it.
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    defaults = PretrainConfig.recipe(args.model)
    # `is None`, not `or`: an explicit 0 must reach PretrainConfig's refusal, not the recipe.
    config = dataclasses.replace(
        defaults, batch=args.batch, seed=args.seed,
        steps=defaults.steps if args.steps is None else args.steps,
        lr=defaults.lr if args.lr is None else args.lr)
    start = time.perf_counter()
    cpu_start = time.process_time()
    losses: list[float] = []

    def report(step: int, loss: float) -> None:
        losses.append(loss)
        if step % 50 == 0 or step == config.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step + 1}/{config.steps} loss {recent:.3f} "
                  f"elapsed {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)

    state = pretrain_tiny(config, progress=report)
    elapsed = time.perf_counter() - start
    write_pretrained(state, args.output, config, threads=torch.get_num_threads())
    cpu = time.process_time() - cpu_start
    print(f"pretraining took {elapsed:.1f}s wall, {cpu:.1f}s process CPU "
          f"({elapsed / config.steps * 1000:.0f} ms/step, {torch.get_num_threads()} threads)",
          file=sys.stderr)
    if args.eval:
        from tvtool.models import load_clip
        from tvtool.synthetic_world import TASKS
        from tvtool.synthetic_world.measure import zero_shot_accuracy

        bundle = load_clip(args.output)
        for task in TASKS:
            acc = zero_shot_accuracy(bundle, task)
            chance = 1 / len(TASKS[task].classnames)
            print(f"zero-shot {task:9s} {acc:.3f} (chance {chance:.3f})", file=sys.stderr)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
