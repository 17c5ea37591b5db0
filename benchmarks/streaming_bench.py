"""Peak memory of tvtool's streaming commands against the size of their inputs.

Makes (in a child process) a ViT-B-32-shaped base checkpoint (``ViT-B-32:random`` weights,
written as a tvtool checkpoint file), N random task vectors over its image encoder (~88M
parameters, ~350 MB each in float32) and one fine-tuned checkpoint in a temporary directory,
then runs each command in a fresh subprocess and reads its peak resident set size
(``ru_maxrss`` from ``wait4``):

* ``floor``: a Python process that only imports torch, open_clip and tvtool (the fixed cost);
* ``extract``, ``negate``, ``apply`` with N vectors (a merge-like combination);
* ``naive``: loading every input with ``safetensors.torch.load_file`` and summing, which is
  what a tool that holds all inputs needs (skipped with ``--no-naive``).

Usage::

    python benchmarks/streaming_bench.py [--vectors 8] [--full] [--no-naive] [--json]

Needs about (N + 3) x 350 MB of disk (N + 3 x 600 MB with ``--full``) in ``$TMPDIR``;
everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024

_NAIVE = """
import sys
from safetensors.torch import load_file, save_file
base = load_file(sys.argv[1])
vectors = [load_file(p) for p in sys.argv[3:]]
out = {k: v.clone() for k, v in base.items()}
for vec in vectors:
    for k, v in vec.items():
        out[k] += v
save_file(out, sys.argv[2])
"""

_FLOOR = "import torch, open_clip, safetensors, tvtool.commands.apply, tvtool.models"


def make_inputs(root: Path, count: int, full: bool) -> dict[str, object]:
    """Write the base checkpoint, a fine-tuned checkpoint and ``count`` task vectors."""
    import torch

    from tvtool.io import TensorInfo, write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode
    from tvtool.models import base_source, fingerprint

    source, ref = base_source("ViT-B-32:random")
    names_in_order = source.keys()
    base = {name: source.get(name) for name in names_in_order}
    base_fp = fingerprint(source)
    header = FileMeta(kind=Kind.CHECKPOINT, architecture=ref.architecture).to_header()
    write_tensors(str(root / "base.safetensors"), base, header)
    names = [n for n, t in base.items() if t.is_floating_point() and
             (full or n.startswith("visual."))]
    layout = [TensorInfo(n, base[n].dtype, tuple(base[n].shape)) for n in names]
    gen = torch.Generator().manual_seed(0)

    def deltas():
        for name in names:
            yield name, 1e-3 * torch.randn(base[name].shape, generator=gen)

    vector_meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                           base_ref="ViT-B-32:random", base_fingerprint=base_fp,
                           mode=Mode.FULL).to_header()
    vectors = []
    for index in range(count):
        path = root / f"tv{index}.safetensors"
        write_tensors(str(path), deltas(), vector_meta, layout=layout)
        vectors.append(str(path))
    changed = set(names)
    finetuned = {n: (t + 1e-3 * torch.randn(t.shape, generator=gen) if n in changed else t)
                 for n, t in base.items()}
    write_tensors(str(root / "ft.safetensors"), finetuned, header)
    return {"base": str(root / "base.safetensors"), "ft": str(root / "ft.safetensors"),
            "vectors": vectors, "vector_params": sum(i.numel for i in layout),
            "base_params": sum(t.numel() for t in base.values())}


def peak_rss(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return (peak RSS in MiB, wall seconds). Raises on failure."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{command[:4]} failed: {log.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, wall  # ru_maxrss is in KiB on Linux


def size_mb(*paths: str) -> float:
    return sum(Path(p).stat().st_size for p in paths) / MB


def run(count: int, full: bool, naive: bool, workdir: str | None) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="tvtool-bench-", dir=workdir))
    try:
        t0 = time.perf_counter()
        # The inputs are made in a child process: Linux counts the RSS a process had when it
        # forked a child into that child's ru_maxrss, so this process must stay small.
        made = subprocess.run([sys.executable, __file__, "--make-inputs", str(root),
                               "--vectors", str(count), *(["--full"] if full else [])],
                              check=True, capture_output=True, text=True)
        inputs = json.loads(made.stdout)
        setup = time.perf_counter() - t0
        tvtool = [sys.executable, "-m", "tvtool"]
        base, ft, vectors = inputs["base"], inputs["ft"], inputs["vectors"]
        assert isinstance(base, str) and isinstance(ft, str) and isinstance(vectors, list)
        out = str(root / "out.safetensors")
        rows = []

        def measure(name: str, command: list[str], input_paths: list[str]) -> None:
            rss, wall = peak_rss(command)
            rows.append({"case": name, "inputs_mb": round(size_mb(*input_paths)),
                         "peak_rss_mb": round(rss), "seconds": round(wall, 1)})
            Path(out).unlink(missing_ok=True)

        measure("floor (imports only)", [sys.executable, "-c", _FLOOR], [])
        # --keep all: every tensor of the model, the workload docs/performance.md measured
        # (extract's default keeps the image encoder only).
        measure("extract", [*tvtool, "extract", ft, "--base", base, "-o", out, "--keep", "all"],
                [ft, base])
        measure("negate", [*tvtool, "negate", vectors[0], "-o", out], vectors[:1])
        measure(f"apply, {count} vectors", [*tvtool, "apply", "--base", base, *vectors,
                                            "-o", out], [base, *vectors])
        if naive:
            measure(f"naive load_file + sum, {count} vectors",
                    [sys.executable, "-c", _NAIVE, base, out, *vectors], [base, *vectors])
        return {"vectors": count, "vector_params": inputs["vector_params"],
                "base_params": inputs["base_params"], "vector_mb": round(size_mb(vectors[0])),
                "base_mb": round(size_mb(base)), "setup_seconds": round(setup, 1), "rows": rows}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=8)
    parser.add_argument("--full", action="store_true",
                        help="vectors over the whole model instead of the image encoder")
    parser.add_argument("--no-naive", action="store_true", help="skip the non-streaming baseline")
    parser.add_argument("--workdir", default=None, help="where to put the files [$TMPDIR]")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--make-inputs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_inputs:
        print(json.dumps(make_inputs(Path(args.make_inputs), args.vectors, args.full)))
        return
    report = run(args.vectors, args.full, not args.no_naive, args.workdir)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['vectors']} vectors x {report['vector_params']:,} parameters "
          f"({report['vector_mb']} MB each); base {report['base_params']:,} parameters "
          f"({report['base_mb']} MB); setup {report['setup_seconds']} s")
    print("| case | inputs (MB) | peak RSS (MB) | wall (s) |")
    print("|---|---:|---:|---:|")
    for row in report["rows"]:  # type: ignore[union-attr]
        print(f"| {row['case']} | {row['inputs_mb']} | {row['peak_rss_mb']} | {row['seconds']} |")


if __name__ == "__main__":
    main()
