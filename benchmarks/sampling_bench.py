"""Cost of drawing one seeded training sample, against per-sample ``torch.manual_seed``.

The fine-tuning data pipeline (:class:`tvtool.finetune.sampling.SeededSamples`) reseeds the
random generators before every sample, so that augmentations depend only on the run seed
and the sample's position in the stream. The reference way to do that is
``torch.manual_seed(seed)``; on a machine without an initialised accelerator it also queues a
lazy seed for each accelerator backend (CUDA, XPU, MTIA), and each queued call records a
Python stack trace. tvtool seeds the CPU generator only, which is what CPU-side
augmentations draw from, so the samples are the same (checked here, tensor for tensor).

Both variants run in this process, interleaved, over the same positions of a
``synthetic:shape`` training split with the train transform of ``tvtool-small``.

Usage::

    python benchmarks/sampling_bench.py [--samples 512] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

import torch

from tvtool.data import load_split
from tvtool.finetune.sampling import SeededSamples, _sample_seed
from tvtool.models import load_clip


class ReferenceSeededSamples(SeededSamples):
    """The same sampler with ``torch.manual_seed`` (every backend) before each sample."""

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, position = item
        sample_seed = _sample_seed(self.seed, position)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


def _time(samples: SeededSamples, positions: range) -> float:
    start = time.perf_counter()
    for position in positions:
        samples[(position % len(samples), position)]
    return (time.perf_counter() - start) / len(positions) * 1000.0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print ms per sample and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    bundle = load_clip("tvtool-small", "cpu")
    dataset = load_split("synthetic:shape", "train", bundle.preprocess_train)
    ours, reference = SeededSamples(dataset, 0), ReferenceSeededSamples(dataset, 0)
    for position in range(32):  # same samples, tensor for tensor
        a, b = ours[(position, position)], reference[(position, position)]
        if not (torch.equal(a[0], b[0]) and a[1] == b[1]):
            print(f"samples differ at position {position}", file=sys.stderr)
            return 1
    positions = range(args.samples)
    times: dict[str, list[float]] = {"reference (torch.manual_seed)": [], "tvtool": []}
    for _ in range(args.rounds):
        times["reference (torch.manual_seed)"].append(_time(reference, positions))
        times["tvtool"].append(_time(ours, positions))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["reference (torch.manual_seed)"] / medians["tvtool"]
    if args.json:
        print(json.dumps({"ms_per_sample": medians, "speedup": ratio}, indent=2))
    else:
        for name, value in medians.items():
            print(f"{name:32s} {value:7.3f} ms/sample")
        print(f"speed-up {ratio:.2f}x ({args.samples} samples, {args.rounds} rounds, median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
