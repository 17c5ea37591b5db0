"""Coefficient searches over plain vectors: images kept in memory vs read at every point.

A search evaluates the same validation images at every coefficient. The search evaluator
(:class:`tvtool.workflows.evaluator.Evaluator`) keeps each split's preprocessed images after
their first pass (``materialize_bytes``, 1 GiB for all splits by default); with
``materialize_bytes=0`` it reads and preprocesses them again at every point, as before. Both
ways run in this process on the same vectors and must give the same accuracies (checked).

The case is what ``tvtool merge --search-coef`` evaluates: zero-shot, each vector alone on its
own dataset, then the grid over the merge at α = 1 (the vectors' sum, a vector of its own), on
the T validation splits of the embedded world's tasks (generated images: what a reader of
image files pays in decoding and resizing, the synthetic tasks pay in drawing). The vectors
are seeded noise on every image-encoder tensor. Prints one JSON line per way (wall and
process-CPU seconds, DataLoaders built), then the ratio.

    OMP_NUM_THREADS=1 python benchmarks/materialize_bench.py                  # tvtool-small
    OMP_NUM_THREADS=1 python benchmarks/materialize_bench.py --base tvtool-tiny --limit 16  # check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from search_bench import TASKS, add_search_arguments, write_noise_vectors


def _search(evaluator: Any, count: int, grid: list[float]) -> list[dict[str, float]]:
    """Zero-shot, each vector alone on its dataset, then the grid over the merge (val)."""
    out = [evaluator.accuracies([0.0] * (count + 1), "val")]
    for index, task in enumerate(TASKS[:count]):
        onehot = [1.0 if i == index else 0.0 for i in range(count + 1)]
        out.append(evaluator.accuracies(onehot, "val", [task]))
    out += [evaluator.accuracies([0.0] * count + [alpha], "val") for alpha in grid]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_search_arguments(parser, base="tvtool-small", vectors=6, grid=11, limit=300, batch=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tvtool.evaluate.batches as batches_module
    from tvtool.evaluate import EvalSettings
    from tvtool.workflows.evaluator import Evaluator

    made = {"n": 0}
    real = batches_module.DataLoader

    def counting(*a: Any, **k: Any) -> Any:
        made["n"] += 1
        return real(*a, **k)

    batches_module.DataLoader = counting  # type: ignore[misc]
    grid = [i / (args.grid - 1) for i in range(args.grid)]
    tasks = list(TASKS[:args.vectors])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tvtool-materialize-bench-") as tmp:
        vectors, merged = write_noise_vectors(Path(tmp), args.base, args.vectors, args.scale,
                                              linearized=False)
        paths = [*vectors, merged]
        settings = EvalSettings(base=args.base, batch_size=args.batch, device="cpu",
                                limit=args.limit)
        for way, budget in (("read every point", 0), ("kept in memory", None)):
            kwargs = {} if budget is None else {"materialize_bytes": budget}
            with Evaluator(settings, paths, tasks, splits=("val",), **kwargs) as evaluator:
                made["n"] = 0
                wall, cpu = time.perf_counter(), time.process_time()
                accuracies = _search(evaluator, args.vectors, grid)
                record = {"case": "merge-search", "way": way,
                          "wall_s": round(time.perf_counter() - wall, 3),
                          "cpu_s": round(time.process_time() - cpu, 3),
                          "loaders": made["n"], "evaluations": len(accuracies)}
            print(json.dumps(record), flush=True)
            results[way] = {"record": record, "accuracies": accuracies}
    if results["read every point"]["accuracies"] != results["kept in memory"]["accuracies"]:
        print("accuracies differ between the two ways", file=sys.stderr)
        return 1
    base, kept = results["read every point"]["record"], results["kept in memory"]["record"]
    print(json.dumps({"case": "merge-search", "base": args.base, "limit": args.limit,
                      "grid": args.grid, "vectors": args.vectors,
                      "speedup_wall": round(base["wall_s"] / kept["wall_s"], 2),
                      "speedup_cpu": round(base["cpu_s"] / kept["cpu_s"], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
