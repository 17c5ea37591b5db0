"""Fine-tuning step-time benchmark: tvtool's modes against reference-style steps.

Reference-style steps mimic the public code bases (see /work/shared/bench/anchor_gpu.py): a
plain fp32 AdamW step for ordinary fine-tuning, and ``torch.func.jvp`` over ``functional_call``
with PyTorch's math attention kernel for the linearized model. tvtool's steps are the
trainer's own (:func:`tvtool.finetune.loop.classification_loss` and
:class:`~tvtool.finetune.loop.Optimisation`), with each mode's adapter.

Targets (issue 4): linear/full <= 1.8 (theory 1.67); linear at least 2x faster than the
reference jvp step.

* CPU (default without CUDA): the tiny model (``tvtool-tiny:random``), batch 128, one thread;
  configurations are interleaved round by round and medians reported, because the machines
  are shared. Peak memory is the peak of live tensor bytes during one step, from the
  profiler's allocation events.
* GPU (CUDA available): ViT-B-32 batch 128 and ViT-L-14 batch 64, random weights, tvtool in
  bf16 autocast (its ``auto`` precision), references in fp32 as in the anchor table; each
  configuration measured alone; peak = ``torch.cuda.max_memory_allocated``.

    python benchmarks/finetune_bench.py                  # CPU suite, or the GPU suite on CUDA
    python benchmarks/finetune_bench.py --rounds 5       # quicker CPU run
    python benchmarks/finetune_bench.py --model ViT-B-32 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

# The profiler's C++ side logs start/stop lines on stderr; the JSON lines are the output.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from tvtool.finetune import get_mode
from tvtool.finetune.loop import Optimisation, classification_loss
from tvtool.models import load_clip

Step = Callable[[], None]
N_CLASSES = 10


def reference_full(enc: nn.Module, x: torch.Tensor, y: torch.Tensor, head: torch.Tensor,
                   device: torch.device, amp: bool = False) -> Step:
    """Plain AdamW step as the reference code bases run it (fp32 unless ``amp``)."""
    enc = copy.deepcopy(enc).train()
    for p in enc.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-5, weight_decay=0.1)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = enc(x)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            loss = F.cross_entropy((feats @ head.T).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference_linear(enc: nn.Module, x: torch.Tensor, y: torch.Tensor, head: torch.Tensor,
                     device: torch.device, amp: bool = False) -> Step:
    """Linearized step via torch.func.jvp and the math attention kernel (the reference way)."""
    enc = copy.deepcopy(enc).train()
    for p in enc.parameters():
        p.requires_grad_(False)
    p0 = {n: p.detach().clone() for n, p in enc.named_parameters()}
    delta = {n: torch.zeros_like(p, requires_grad=True) for n, p in p0.items()}
    opt = torch.optim.AdamW(list(delta.values()), lr=1e-5, weight_decay=0.1)

    def step() -> None:
        def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(enc, params, (x,))

        # Fused SDPA kernels have no forward-mode AD: the math kernel is the only one jvp runs.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), \
                sdpa_kernel(SDPBackend.MATH):
            out, dout = jvp(f, (p0,), (delta,))
            feats = out + dout
            feats = feats / feats.norm(dim=-1, keepdim=True)
            loss = F.cross_entropy((feats @ head.T).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def tvtool_step(mode: str, enc: nn.Module, x: torch.Tensor, y: torch.Tensor,
                head: torch.Tensor, device: torch.device, precision: str) -> Step:
    """One optimizer step exactly as tvtool's trainer runs it, for ``mode``."""
    spec = get_mode(mode)
    adapter = spec.build(copy.deepcopy(enc),
                         spec.make_options({"lora_rank": 16, "lora_alpha": 32.0}))
    adapter.to(device).train()
    opt = Optimisation.for_adapter(adapter, 1e-5, 0.1, device, precision, grad_clip=1.0)

    def step() -> None:
        loss, _ = classification_loss(adapter, x, y, head, device, precision)
        opt.scaler.scale(loss).backward()
        opt.update(1e-5)

    return step


def without_shortcut(step: Step) -> Step:
    """Run ``step`` with the last block computed for every token (no class-token shortcut)."""
    import tvtool.linearize.vit as linearize_vit

    def wrapped() -> None:
        linearize_vit.CLASS_TOKEN_SHORTCUT = False
        try:
            step()
        finally:
            linearize_vit.CLASS_TOKEN_SHORTCUT = True

    return wrapped


def cpu_peak_bytes(step: Step) -> int:
    """Peak of live tensor bytes allocated during one step (profiler allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = []
    for event in prof.events():
        amount = event.cpu_memory_usage if event.name == "[memory]" else \
            event.self_cpu_memory_usage
        if amount:
            changes.append((event.time_range.start, amount))
    current = peak = 0
    for _, amount in sorted(changes):
        current += amount
        peak = max(peak, current)
    return peak


def configs(enc: nn.Module, x: torch.Tensor, y: torch.Tensor, head: torch.Tensor,
            device: torch.device, precision: str,
            extra_bf16: bool) -> dict[str, Callable[[], Step]]:
    made: dict[str, Callable[[], Step]] = {
        "reference_full_fp32": lambda: reference_full(enc, x, y, head, device),
        "reference_linear_jvp_fp32": lambda: reference_linear(enc, x, y, head, device),
    }
    for mode in ("full", "attn", "linear", "lora", "llora", "llora-net"):
        made[mode] = (lambda m=mode: tvtool_step(m, enc, x, y, head, device, precision))
    made["linear_all_tokens"] = lambda: without_shortcut(
        tvtool_step("linear", enc, x, y, head, device, precision))
    if extra_bf16:
        for mode in ("full", "linear"):
            made[f"{mode}_bf16"] = (lambda m=mode: tvtool_step(m, enc, x, y, head, device,
                                                               "bf16"))
    return made


def run_cpu(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    enc = load_clip(args.model or "tvtool-tiny:random").model.visual
    size = enc.image_size[0] if isinstance(enc.image_size, tuple) else enc.image_size
    x = torch.randn(args.batch, 3, size, size)
    y = torch.randint(0, N_CLASSES, (args.batch,))
    head = 20 * F.normalize(torch.randn(N_CLASSES, enc.output_dim), dim=-1)
    factories = configs(enc, x, y, head, device, "fp32", extra_bf16=not args.no_bf16)
    steps = {name: make() for name, make in factories.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, step in steps.items():
        ms = statistics.median(times[name]) * 1e3
        results[name] = {"ms_per_step": round(ms, 2), "img_per_s": round(args.batch / ms * 1e3, 1),
                         "peak_MiB": round(cpu_peak_bytes(step) / 2**20, 1)}
        print(json.dumps({"config": name, "batch": args.batch, **results[name]}), flush=True)
    return results


def run_gpu(args: argparse.Namespace, model: str, batch: int) -> dict[str, dict[str, float]]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    enc = load_clip(f"{model}:random", device).model.visual
    size = enc.image_size[0] if isinstance(enc.image_size, tuple) else enc.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, N_CLASSES, (batch,), device=device)
    head = 20 * F.normalize(torch.randn(N_CLASSES, enc.output_dim, device=device), dim=-1)
    results = {}
    for name, make in configs(enc, x, y, head, device, "bf16", extra_bf16=False).items():
        torch.cuda.empty_cache()
        step = make()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            # Each step timed on its own (CUDA events), the median reported, as the anchor.
            times = []
            for _ in range(args.rounds):
                begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                begin.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end))
        except torch.cuda.OutOfMemoryError as exc:
            print(json.dumps({"config": name, "model": model, "error": repr(exc)[:200]}))
            del step
            continue
        ms = statistics.median(times)
        results[name] = {"ms_per_step": round(ms, 2), "img_per_s": round(batch / ms * 1e3, 1),
                         "peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
        print(json.dumps({"config": name, "model": model, "batch": batch, **results[name]}),
              flush=True)
        del step
    return results


RATIOS: dict[str, tuple[str, str, str]] = {
    # name: (numerator, denominator, what is divided)
    "full_speedup_vs_reference_fp32": ("reference_full_fp32", "full", "ms"),
    "attn_over_full": ("attn", "full", "ms"),
    "linear_over_full": ("linear", "full", "ms"),
    "peak_mem_linear_over_full": ("linear", "full", "peak"),
    "linear_speedup_vs_reference_jvp": ("reference_linear_jvp_fp32", "linear", "ms"),
    "linear_all_tokens_over_full": ("linear_all_tokens", "full", "ms"),
    "linear_all_tokens_speedup_vs_reference_jvp": ("reference_linear_jvp_fp32",
                                                   "linear_all_tokens", "ms"),
    "lora_over_full": ("lora", "full", "ms"),
    "llora_over_full": ("llora", "full", "ms"),
    "llora_net_over_full": ("llora-net", "full", "ms"),
    "linear_bf16_speedup_vs_reference_jvp_fp32": ("reference_linear_jvp_fp32", "linear_bf16",
                                                  "ms"),
    "linear_bf16_over_full_bf16": ("linear_bf16", "full_bf16", "ms"),
    "linear_bf16_over_full_fp32": ("linear_bf16", "full", "ms"),
}

# Issue targets (GPU): (ratio, comparison, bound); the full speed-up bound depends on the model.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("attn_over_full", "<=", 0.8),
    ("linear_over_full", "<=", 1.8),
    ("peak_mem_linear_over_full", "<=", 1.7),
    ("linear_speedup_vs_reference_jvp", ">=", 2.0),
)
FULL_SPEEDUP_TARGET = {"ViT-B-32": 2.5, "ViT-L-14": 6.0}


def ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The ratios whose configurations all ran (an out-of-memory one leaves its ratios out)."""
    out = {}
    for name, (top, bottom, what) in RATIOS.items():
        if top in results and bottom in results:
            key = "ms_per_step" if what == "ms" else "peak_MiB"
            out[name] = round(results[top][key] / results[bottom][key], 3)
    return out


def target_checks(found: dict[str, float], model: str) -> dict[str, str]:
    """``met`` / ``missed`` / ``not measured`` for each of the issue's targets."""
    targets = list(TARGETS)
    if model in FULL_SPEEDUP_TARGET:
        targets.append(("full_speedup_vs_reference_fp32", ">=", FULL_SPEEDUP_TARGET[model]))
    checks = {}
    for name, op, bound in targets:
        if name not in found:
            checks[name] = "not measured"
            continue
        ok = found[name] <= bound if op == "<=" else found[name] >= bound
        checks[name] = f"{'met' if ok else 'missed'} ({found[name]} {op} {bound})"
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", default=None, help="model reference / GPU model name")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed steps per configuration (CPU: interleaved rounds)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--no-bf16", action="store_true", help="CPU: skip the bf16 variants")
    args = parser.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if use_cuda
            else f"cpu x{args.threads} thread(s)"}
    if use_cuda:
        args.rounds = args.rounds or 12
        suites = [(args.model, args.batch)] if args.model else [("ViT-B-32", 128),
                                                                 ("ViT-L-14", 64)]
        for model, batch in suites:
            results = run_gpu(args, model, batch or 128)
            found = ratios(results)
            print(json.dumps({"model": model, "ratios": found,
                              "targets": target_checks(found, model), **info}), flush=True)
    else:
        args.rounds = args.rounds or 15
        args.batch = args.batch or 128
        results = run_cpu(args)
        found = ratios(results)
        print(json.dumps({"model": args.model or "tvtool-tiny:random", "batch": args.batch,
                          "ratios": found, "targets": target_checks(found, ""), **info}),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
