"""SVD micro-benchmark: the choices of tvtool.vectors.lowrank, timed on ViT-B/32 block shapes.

* ``wide``: ``torch.linalg.svd`` of a 768×3072 float32 matrix as given, against ``tall``: the
  same matrix through its transpose (what ``thin_svd`` does);
* ``svdvals``: singular values only (``compress``'s first pass) against the full thin SVD;
* ``float64``: the thin SVD of a 3072×768 matrix in float64 (TSV-M's polar factors) against
  float32.

One thread, random ``randn`` matrices (seed 0), medians of ``--repeats`` interleaved rounds;
ratios are within the same process.

    python benchmarks/svd_bench.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(768, 3072, generator=gen)
    tall = torch.randn(3072, 768, generator=gen)
    tall64 = tall.double()
    cases = {
        "svd 768x3072 as given (wide)": lambda: torch.linalg.svd(wide, full_matrices=False),
        "svd 768x3072 via transpose (tall)": lambda: torch.linalg.svd(wide.T,
                                                                      full_matrices=False),
        "svd 3072x768 float32": lambda: torch.linalg.svd(tall, full_matrices=False),
        "svdvals 3072x768 float32": lambda: torch.linalg.svdvals(tall),
        "svd 3072x768 float64": lambda: torch.linalg.svd(tall64, full_matrices=False),
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            runs[name].append(timed(fn))
    medians = {name: statistics.median(times) for name, times in runs.items()}
    print(f"{args.threads} thread(s), median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:<36}{seconds:>8.3f} s")
    print(f"wide / tall: {medians['svd 768x3072 as given (wide)'] / medians['svd 768x3072 via transpose (tall)']:.2f}")  # noqa: E501
    print(f"svdvals / svd: {medians['svdvals 3072x768 float32'] / medians['svd 3072x768 float32']:.2f}")  # noqa: E501
    print(f"float64 / float32: {medians['svd 3072x768 float64'] / medians['svd 3072x768 float32']:.2f}")  # noqa: E501


if __name__ == "__main__":
    main()
