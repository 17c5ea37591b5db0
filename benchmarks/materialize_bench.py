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

TASKS = ("synthetic:shape", "synthetic:color", "synthetic:count", "synthetic:position",
         "synthetic:texture", "synthetic:digit")


def _write_vectors(root: Path, base: str, count: int, scale: float) -> list[str]:
    """``count`` plain vectors and their sum (the merge at α = 1), last."""
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind
    from tvtool.models import base_source

    source, ref = base_source(base)
    try:
        names = [n for n in source.keys() if n.startswith("visual.")
                 and source.info(n).dtype.is_floating_point]
        shapes = {n: source.info(n).shape for n in names}
    finally:
        source.close()
    paths, total = [], {n: torch.zeros(shapes[n]) for n in names}
    for index in range(count + 1):
        if index < count:
            gen = torch.Generator().manual_seed(index)
            tensors = {n: scale * torch.randn(shapes[n], generator=gen) for n in names}
            for n in names:
                total[n] += tensors[n]
        else:
            tensors = total
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                        dataset=TASKS[index] if index < count else None)
        path = root / f"tv{index}.safetensors"
        write_tensors(str(path), tensors, meta.to_header())
        paths.append(str(path))
    return paths


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
    parser.add_argument("--base", default="tvtool-small")
    parser.add_argument("--vectors", type=int, default=6)
    parser.add_argument("--grid", type=int, default=11, help="points of the α grid (0 to 1)")
    parser.add_argument("--limit", type=int, default=300, help="examples per split")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--scale", type=float, default=1e-3, help="std of the vectors' noise")
    parser.add_argument("--threads", type=int, default=1)
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
        paths = _write_vectors(Path(tmp), args.base, args.vectors, args.scale)
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
