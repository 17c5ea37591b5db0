"""aTLAS step cost: tvtool's fused learn-coeffs step vs full fine-tuning vs the naive loop.

Times, in one process and on the same batch:

* ``full_finetune`` -- one full fine-tuning step of the image encoder (AdamW, cross-entropy on a
  frozen head; bf16 autocast on GPU), the yardstick of the issue;
* ``atlas_fused`` -- one ``learn-coeffs`` step with T task vectors: tvtool's
  :class:`~tvtool.atlas.ComposedEncoder` (vectors packed into one ``[T, chunks, chunk]``
  tensor, composition as one batched matmul), entropy objective, AdamW on the coefficients;
* ``atlas_naive`` -- the same step as the reference code bases write it (and as
  /work/shared/bench/anchor_gpu.py times it): ``w = w + λ[t, j] · τ_t[j]`` in a Python loop over
  tensors × vectors, reimplemented here.

Default: ViT-B-32, batch 128, bf16 autocast on CUDA, 12 steps per configuration run alone
(median; peak memory per configuration); the tiny embedded architecture, batch 64, fp32 on
CPU, 15 interleaved rounds (median). Prints one JSON line per configuration, then the ratios
(targets: fused <= 1.3x full fine-tuning, naive >= 3x fused).

    python benchmarks/atlas_bench.py [--device cuda] [--model ViT-B-32] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from tvtool.atlas import ComposedEncoder, Packing, TensorSpec, VectorStack, build_partition
from tvtool.atlas.objectives import mean_entropy
from tvtool.models import load_clip

VECTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Step = Callable[[], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_full(encoder: torch.nn.Module, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              amp: Any) -> tuple[Step, dict[str, Any]]:
    """One full fine-tuning step of the image encoder (the yardstick)."""
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)

    def step() -> None:
        with amp:
            feats = encoder(x)
            loss = F.cross_entropy(F.normalize(feats.float(), dim=-1) @ head.T, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"trainable": sum(p.numel() for p in params)}


def make_fused(encoder: torch.nn.Module, specs: list[TensorSpec],
               vectors: list[dict[str, torch.Tensor]], head: torch.Tensor, x: torch.Tensor,
               amp: Any, device: torch.device, args: argparse.Namespace
               ) -> tuple[Step, dict[str, Any]]:
    """One learn-coeffs step with tvtool's packed vectors and fused composition."""
    partition = build_partition(specs, args.granularity, seed=0)
    stack = VectorStack(Packing(partition), vectors, VECTOR_DTYPES[args.vector_dtype], device)
    composed = ComposedEncoder(encoder, stack)
    lam = torch.zeros(len(vectors), partition.num_blocks, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([lam], lr=1e-1)

    def step() -> None:
        weights = composed.weights(lam)
        with amp:
            feats = composed.features(x, weights)
            loss = mean_entropy(F.normalize(feats.float(), dim=-1) @ head.T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"task_vectors": len(vectors), "blocks": partition.num_blocks,
                  "granularity": args.granularity, "vector_dtype": args.vector_dtype,
                  "chunk": stack.packing.chunk}


def make_naive(encoder: torch.nn.Module, vectors: list[dict[str, torch.Tensor]],
               head: torch.Tensor, x: torch.Tensor, amp: Any, device: torch.device
               ) -> tuple[Step, dict[str, Any]]:
    """The same step written as the reference code bases do: a loop over tensors x vectors."""
    p0 = {n: p.detach() for n, p in encoder.named_parameters()}
    taus = [{n: v[f"visual.{n}"].to(device) for n in p0} for v in vectors]
    names = list(p0)
    lam = torch.zeros(len(vectors), len(names), device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([lam], lr=1e-1)

    def step() -> None:
        weights = {}
        for j, n in enumerate(names):
            w = p0[n]
            for t in range(len(vectors)):
                w = w + lam[t, j] * taus[t][n]
            weights[n] = w
        with amp:
            feats = functional_call(encoder, weights, (x,))
            loss = mean_entropy(F.normalize(feats.float(), dim=-1) @ head.T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"task_vectors": len(vectors)}


def _timed(step: Step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def measure(name: str, make: Callable[[], tuple[Step, dict[str, Any]]],
            device: torch.device, steps: int) -> float:
    """Build one configuration, time it alone (3 warm-up steps), print one JSON line.

    Used on CUDA, where each configuration runs alone so its peak memory is its own.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, extra = make()
    for _ in range(3):
        step()
    median = statistics.median(_timed(step, device) for _ in range(steps))
    record = {"config": name, "ms_per_step": round(median * 1e3, 2), **extra}
    if device.type == "cuda":
        record["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(record), flush=True)
    return median


def measure_interleaved(makers: dict[str, Callable[[], tuple[Step, dict[str, Any]]]],
                        device: torch.device, rounds: int) -> dict[str, float]:
    """Time all configurations in interleaved rounds (a loaded CPU drifts less between them).

    Returns:
        Median seconds per step of each configuration.
    """
    built = {name: make() for name, make in makers.items()}
    for step, _ in built.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, (step, _) in built.items():
            times[name].append(_timed(step, device))
    medians = {}
    for name, (_, extra) in built.items():
        medians[name] = statistics.median(times[name])
        print(json.dumps({"config": name, "ms_per_step": round(medians[name] * 1e3, 2),
                          "min_ms": round(min(times[name]) * 1e3, 2), **extra}), flush=True)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="open_clip architecture")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--vectors", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--granularity", default="tensor")
    parser.add_argument("--vector-dtype", default="fp32", choices=sorted(VECTOR_DTYPES))
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    model_name = args.model or ("ViT-B-32" if cuda else "tvtool-tiny")
    batch = args.batch or (128 if cuda else 64)
    steps = args.steps or (12 if cuda else 15)
    size = 224 if model_name != "tvtool-tiny" else 32
    torch.manual_seed(0)
    clip = load_clip(f"{model_name}:random", device).model
    encoder = clip.visual
    for p in clip.parameters():
        p.requires_grad_(False)
    classes = 10
    head = F.normalize(torch.randn(classes, clip.visual.output_dim, device=device), dim=-1) * 100
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    meta = {"model": model_name, "batch": batch, "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if cuda:
        meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(meta), flush=True)

    named = dict(encoder.named_parameters())
    specs = [TensorSpec(f"visual.{n}", tuple(p.shape)) for n, p in named.items()]
    gen = torch.Generator().manual_seed(1)
    # Random vectors: the speed of a step does not depend on their values.
    vectors = [{s.name: 0.01 * torch.randn(s.shape, generator=gen) for s in specs}
               for _ in range(args.vectors)]
    makers = {
        "atlas_fused": lambda: make_fused(encoder, specs, vectors, head, x, amp, device, args),
        "full_finetune": lambda: make_full(encoder, head, x, y, amp),
    }
    if not args.skip_naive:
        makers["atlas_naive"] = lambda: make_naive(encoder, vectors, head, x, amp, device)
    if cuda:
        medians = {name: measure(name, make, device, steps) for name, make in makers.items()}
    else:
        medians = measure_interleaved(makers, device, steps)
    ratios: dict[str, Any] = {
        "fused_over_full": round(medians["atlas_fused"] / medians["full_finetune"], 3)}
    if "atlas_naive" in medians:
        ratios["naive_over_fused"] = round(medians["atlas_naive"] / medians["atlas_fused"], 3)
    ratios["targets"] = "fused_over_full <= 1.3, naive_over_fused >= 3"
    print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
