"""Coefficient searches over linearized vectors: cached encoder parts vs one evaluation per point.

A linearized model's features are ``f0 + Σ α_t J τ_t``, linear in α, so tvtool evaluates a
grid from one primal pass and one JVP per vector and split (``linear_cache=True``, the
default); ``linear_cache=False`` runs the encoder at every grid point, as before. Both ways run
in this process on the same data and must give the same accuracies (checked). Cases:

* ``addition`` -- a 21-point search of one α shared by T linearized vectors (``α·(1,…,1)``)
  on their T validation splits;
* ``merge-search`` -- what ``tvtool merge --search-coef`` evaluates: zero-shot, each vector
  alone on its own dataset, then the 21-point grid over the merge at α = 1 (the sum of the
  vectors, a vector of its own);
* ``disentanglement`` -- the G × G error map of two vectors (the demo's 7-point grid).

The vectors are seeded noise on every image-encoder tensor (the cost does not depend on what
they hold). The evaluated images are kept in memory for both ways (the synthetic tasks are
generated once), so the times compare model work. Prints one JSON line per case and way
(wall and process-CPU seconds, encoder batches), then the ratios.

    OMP_NUM_THREADS=1 python benchmarks/search_bench.py             # 64 examples, batch 64
    OMP_NUM_THREADS=1 python benchmarks/search_bench.py --limit 256 --batch 128
    OMP_NUM_THREADS=1 python benchmarks/search_bench.py --limit 16 --grid 3 --dis-grid 3  # check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TASKS = ("synthetic:shape", "synthetic:color", "synthetic:count", "synthetic:position",
         "synthetic:texture", "synthetic:digit")


def write_noise_vectors(root: Path, base: str, count: int, scale: float, *,
                        linearized: bool = True) -> tuple[list[str], str]:
    """``count`` task vectors of seeded noise on every image-encoder tensor, and their sum (the
    merge at α = 1); linearized ones by default."""
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode
    from tvtool.models import base_source

    mode = {"mode": Mode.LINEAR, "linearized": True} if linearized else {}
    source, ref = base_source(base)
    names = [n for n in source.keys() if n.startswith("visual.")
             and source.info(n).dtype.is_floating_point]
    total: dict[str, torch.Tensor] = {}
    paths = []
    for index in range(count):
        gen = torch.Generator().manual_seed(index)
        tensors = {n: scale * torch.randn(tuple(source.info(n).shape), generator=gen)
                   for n in names}
        for n, t in tensors.items():
            total[n] = total[n] + t if n in total else t.clone()
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture, **mode,
                        dataset=TASKS[index % len(TASKS)])
        path = root / f"tv{index}.safetensors"
        write_tensors(str(path), tensors, meta.to_header())
        paths.append(str(path))
    source.close()
    merged = root / "merged.safetensors"
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture, **mode)
    write_tensors(str(merged), total, meta.to_header())
    return paths, str(merged)


def add_search_arguments(parser: argparse.ArgumentParser, *, base: str, vectors: int, grid: int,
                         limit: int, batch: int) -> None:
    """The options the search benchmarks share (base, vectors, grid, data, noise, threads)."""
    parser.add_argument("--base", default=base)
    parser.add_argument("--vectors", type=int, default=vectors)
    parser.add_argument("--grid", type=int, default=grid, help="points of the α grid (0 to 1)")
    parser.add_argument("--limit", type=int, default=limit, help="examples per split")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--scale", type=float, default=1e-3, help="std of the vectors' noise")
    parser.add_argument("--threads", type=int, default=1)


class _Counter:
    """Counts batches through the linearized image encoder (either way)."""

    def __init__(self) -> None:
        import tvtool.linearize as linearize

        self.calls = 0
        self._module = linearize
        self._dual = linearize.vit_dual_forward
        self._jvp = linearize.jvp_parts

        def dual(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._dual(*args, **kwargs)

        def jvp(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._jvp(*args, **kwargs)

        linearize.vit_dual_forward = dual  # type: ignore[assignment]
        linearize.jvp_parts = jvp  # type: ignore[assignment]


def _timed(run: Callable[[], Any], counter: _Counter) -> tuple[Any, dict[str, float]]:
    before = counter.calls
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, {"wall_s": round(time.perf_counter() - wall, 3),
                    "cpu_s": round(time.process_time() - cpu, 3),
                    "encoder_batches": counter.calls - before}


def _materialize(evaluator: Any, batch: int) -> None:
    """Keep the evaluator's preprocessed images in memory (both ways alike)."""
    from tvtool.evaluate.batches import batches

    for datas in evaluator._data.values():
        for data in datas:
            for _ in batches(data, batch, materialize=True):
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_arguments(parser, base="tvtool-tiny", vectors=4, grid=21, limit=64, batch=64)
    parser.add_argument("--dis-grid", type=int, default=7, help="points per disentanglement axis")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tvtool.evaluate import DisentanglementConfig, EvalSettings, disentanglement
    from tvtool.workflows.evaluator import Evaluator

    counter = _Counter()
    grid = [i / (args.grid - 1) for i in range(args.grid)]
    datasets = list(TASKS[:args.vectors])
    settings = EvalSettings(base=args.base, batch_size=args.batch, device="cpu",
                            precision="fp32", limit=args.limit, cache_heads=False)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tvtool-search-bench-") as tmp:
        vectors, merged = write_noise_vectors(Path(tmp), args.base, args.vectors, args.scale)
        count = len(vectors)

        def addition(evaluator: Any) -> list[dict[str, float]]:
            return [evaluator.accuracies([a] * count, "val") for a in grid]

        def merge_search(evaluator: Any) -> list[dict[str, float]]:
            out = [evaluator.accuracies([0.0] * (count + 1), "val")]
            for index, name in enumerate(datasets):
                onehot = [1.0 if i == index else 0.0 for i in range(count)] + [0.0]
                out.append(evaluator.accuracies(onehot, "val", [name]))
            out += [evaluator.accuracies([0.0] * count + [a], "val") for a in grid]
            return out

        cases: list[tuple[str, list[str], Callable[[Any], Any]]] = [
            ("addition", vectors, addition), ("merge-search", [*vectors, merged], merge_search)]
        for case, paths, run in cases:
            results = {}
            rows[case] = {}
            for way, cached in (("per-point", False), ("cached", True)):
                with Evaluator(settings, paths, datasets, splits=("val",),
                               linear_cache=cached) as evaluator:
                    _materialize(evaluator, args.batch)
                    results[way], rows[case][way] = _timed(lambda e=evaluator, r=run: r(e),
                                                           counter)
                print(json.dumps({"case": case, "way": way, **rows[case][way]}), flush=True)
            if results["per-point"] != results["cached"]:
                print(f"{case}: accuracies differ between the two ways", file=sys.stderr)
                return 1

        alphas = tuple(round(-3.0 + 6.0 * i / (args.dis_grid - 1), 10)
                       for i in range(args.dis_grid))
        config = DisentanglementConfig(settings, vectors=(vectors[0], vectors[1]),
                                       datasets=(datasets[0], datasets[1]), alphas=alphas)
        # Generate the two datasets once (kept in memory by the synthetic source) outside the
        # timings.
        disentanglement(dataclasses.replace(config, alphas=(0.0, 1.0)))
        maps = {}
        rows["disentanglement"] = {}
        for way, cached in (("per-point", False), ("cached", True)):
            maps[way], rows["disentanglement"][way] = _timed(
                lambda c=cached: disentanglement(config, linear_cache=c), counter)
            print(json.dumps({"case": "disentanglement", "way": way,
                              **rows["disentanglement"][way]}), flush=True)
        if maps["per-point"].error != maps["cached"].error:
            print("disentanglement: maps differ between the two ways", file=sys.stderr)
            return 1

    print(f"{args.vectors} linearized vectors, {args.grid}-point grid, "
          f"{args.dis_grid}x{args.dis_grid} disentanglement map, {args.limit} examples per "
          f"split, batch {args.batch}, {args.threads} thread(s); accuracies identical both ways",
          flush=True)
    for case, ways in rows.items():
        slow, fast = ways["per-point"], ways["cached"]
        print(f"{case}: per-point {slow['wall_s']:.1f} s wall / {slow['cpu_s']:.1f} s CPU, "
              f"{slow['encoder_batches']} encoder batches; cached {fast['wall_s']:.1f} s / "
              f"{fast['cpu_s']:.1f} s, {fast['encoder_batches']} batches; speed-up "
              f"{slow['wall_s'] / fast['wall_s']:.1f}x wall, {slow['cpu_s'] / fast['cpu_s']:.1f}x "
              "CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
