"""Merge benchmark: N random task vectors of ViT-B/32 image-encoder size, merged from disk.

Targets (issue 5): a streaming merge takes at most 1.5x the time of reading its inputs once,
and its peak resident memory stays well under the size of all inputs. Issue 24: the SVD
methods (TSV-M, and Iso-C / Iso-CTS once registered) at most 3x task arithmetic's time, with
peak RSS in the same class; their ratio to ``task_arithmetic`` is printed (``x TA``).

Every measurement runs in a fresh subprocess (so peak RSS is that of one command) after the
inputs have been read once to warm the page cache, and is repeated in rounds over all cases
(so load changes on a shared machine hit every case alike); medians are reported.
"Read once" is the floor: open every input with tvtool.io and touch every tensor once (one
sum each). ``read-bytes`` (plain ``read()`` of the files), ``write`` (write one input-sized
output with tvtool.io) and ``io-floor`` (read once plus that write: the I/O any merge must do)
are shown for reference.
Peak RSS is reported as measured (VmHWM) and above the subprocess's RSS right after its imports
(torch alone maps a few hundred MB of libraries).

    python benchmarks/merge_bench.py                       # 8 vectors, ViT-B-32, 3 repeats
    python benchmarks/merge_bench.py --vectors 2 --scale 0.1 --repeats 1   # quick check
    python benchmarks/merge_bench.py --cases read,task_arithmetic,svd --repeats 1
                                                           # the SVD methods against TA

Cases of methods the registry does not (yet) hold are skipped with a line on stderr; ``svd``
in ``--cases`` stands for every SVD method of :data:`SVD_METHODS`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}
import torch
torch.set_num_threads(int(sys.argv[3]))
import tvtool.io, tvtool.merge
baseline = status()["VmRSS"]
task = json.loads(sys.argv[1])
paths = json.loads(sys.argv[2])
start = time.perf_counter()
if task["kind"] == "read":
    # Sources are memory-mapped: touch every byte (one sum per tensor) so the data is read.
    for path in paths:
        source = tvtool.io.open_tensors(path)
        for name in source.keys():
            source.get(name).sum()
        source.close()
elif task["kind"] in ("io-floor", "write"):
    # io-floor: read every input once and write one input-sized output, the I/O any merge
    # must do; write: only the output (its tensors come from one reused buffer).
    if task["kind"] == "io-floor":
        for path in paths:
            source = tvtool.io.open_tensors(path)
            for name in source.keys():
                source.get(name).sum()
            source.close()
    first = tvtool.io.open_tensors(paths[0])
    layout = [first.info(name) for name in first.keys()]
    first.close()
    scratch = torch.zeros(max(i.numel for i in layout))
    tvtool.io.write_tensors(task["output"], ((i.name, scratch[:i.numel].view(i.shape))
                                             for i in layout), {}, layout=layout,
                            check_finite=False)
elif task["kind"] == "read-bytes":
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 << 20):
                pass
else:
    config = tvtool.merge.MergeConfig(vectors=tuple(paths), output=task["output"],
                                      method=task["method"], params=task["params"])
    tvtool.merge.merge(config, threads=int(sys.argv[3]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": status()["VmHWM"], "baseline": baseline}))
"""

CASES = {
    "read": {"kind": "read"},
    "read-bytes": {"kind": "read-bytes"},
    "io-floor": {"kind": "io-floor"},
    "write": {"kind": "write"},
    "task_arithmetic": {"kind": "merge", "method": "task_arithmetic", "params": {}},
    "mean": {"kind": "merge", "method": "mean", "params": {}},
    "dare": {"kind": "merge", "method": "dare", "params": {"density": 0.2}},
    "ties-tensor": {"kind": "merge", "method": "ties",
                    "params": {"density": 0.2, "trim": "tensor"}},
    "ties-global": {"kind": "merge", "method": "ties",
                    "params": {"density": 0.2, "trim": "global"}},
    "magnitude-global": {"kind": "merge", "method": "magnitude",
                         "params": {"density": 0.2, "trim": "global"}},
    "iso-c": {"kind": "merge", "method": "iso-c", "params": {}},
    "iso-cts": {"kind": "merge", "method": "iso-cts", "params": {}},
    "consensus": {"kind": "merge", "method": "consensus", "params": {}},
    "consensus-ties": {"kind": "merge", "method": "consensus", "params": {"combine": "ties"}},
    "breadcrumbs": {"kind": "merge", "method": "breadcrumbs", "params": {}},
}

SVD_METHODS = ("tsv", "iso-c", "iso-cts")
"""Registry names of the SVD-based merge methods (issue 24), default parameters each."""
CASES.update({name: {"kind": "merge", "method": name, "params": {}} for name in SVD_METHODS})


def registered(cases: list[str]) -> list[str]:
    """The cases whose merge method the registry holds (others are skipped, said on stderr)."""
    from tvtool.merge import METHODS

    kept = []
    for name in cases:
        method = CASES[name].get("method")
        if method is not None and method not in METHODS:
            print(f"skipping {name}: no merge method {method!r} in this tvtool", file=sys.stderr)
            continue
        kept.append(name)
    return kept


def visual_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Image-encoder tensor shapes of an open_clip architecture (built on the meta device)."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.create_model(arch, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith("visual.") and v.is_floating_point()}


def write_vectors(root: Path, count: int, shapes: dict[str, tuple[int, ...]], scale: float
                  ) -> list[str]:
    import torch

    from tvtool.io import write_tensors
    from tvtool.io.safetensors_io import TensorInfo
    from tvtool.metadata import FileMeta, Kind, Mode

    if scale < 1.0:  # shrink the leading dimension of every tensor (quick runs)
        shapes = {k: (max(1, int(s[0] * scale)), *s[1:]) if s else s for k, s in shapes.items()}
    layout = [TensorInfo(name, torch.float32, shape) for name, shape in shapes.items()]
    paths = []
    for index in range(count):
        gen = torch.Generator().manual_seed(index)
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture="ViT-B-32", base_ref="ViT-B-32",
                        base_fingerprint="sha256:bench", mode=Mode.FULL, dataset=f"task{index}")
        path = root / f"tv{index}.safetensors"
        tensors = ((info.name, 1e-3 * torch.randn(info.shape, generator=gen)) for info in layout)
        write_tensors(str(path), tensors, meta.to_header(), layout=layout)
        paths.append(str(path))
    return paths


def run_child(case: dict, paths: list[str], threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case), json.dumps(paths),
                             str(threads)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=8)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of each tensor's first dimension (quick runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="merge kernel threads (tvtool merge --threads)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    parser.add_argument("--dir", default=None, help="where to write the vectors (default: tmp)")
    parser.add_argument("--inputs", default=None,
                        help="keep the vectors in this directory and reuse them across runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    cases = []
    for case in (c.strip() for c in args.cases.split(",") if c.strip()):
        cases.extend(SVD_METHODS if case == "svd" else [case])
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(CASES)} or svd")
    cases = registered(list(dict.fromkeys(cases)))
    if "read" not in cases:
        cases.insert(0, "read")
    with tempfile.TemporaryDirectory(prefix="tvtool-merge-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        if args.inputs is not None:
            keep = Path(args.inputs)
            keep.mkdir(parents=True, exist_ok=True)
            paths = sorted(str(p) for p in keep.glob("tv*.safetensors"))
            if len(paths) != args.vectors:
                for old in paths:
                    Path(old).unlink()
                paths = write_vectors(keep, args.vectors, visual_shapes(args.arch), args.scale)
        else:
            paths = write_vectors(root, args.vectors, visual_shapes(args.arch), args.scale)
        input_bytes = sum(Path(p).stat().st_size for p in paths)
        print(f"wrote {args.vectors} vectors, {input_bytes / 2**20:,.0f} MiB in all "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
        run_child(CASES["read"], paths, args.threads)  # warm the page cache
        # Rounds over all cases (not all repeats of one case, then the next), so that load
        # changes on a shared machine hit every case alike.
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        for round_index in range(args.repeats):
            for name in cases:
                case = {**CASES[name], "output": str(root / "merged.safetensors")}
                runs[name].append(run_child(case, paths, args.threads))
                Path(case["output"]).unlink(missing_ok=True)
            print(f"round {round_index + 1}: " + ", ".join(
                f"{n} {runs[n][-1]['seconds']:.2f} s" for n in cases), file=sys.stderr)
        figures: dict[str, dict] = {
            name: {"seconds": statistics.median(r["seconds"] for r in results),
                   "peak_rss": statistics.median(r["peak"] for r in results),
                   "peak_above_imports": statistics.median(r["peak"] - r["baseline"]
                                                           for r in results)}
            for name, results in runs.items()}
    read = figures["read"]["seconds"]
    report = {"vectors": args.vectors, "arch": args.arch, "scale": args.scale,
              "input_bytes": input_bytes, "threads": args.threads, "repeats": args.repeats,
              "cases": {}}
    print(f"\n{args.vectors} x {args.arch} image-encoder vectors (scale {args.scale}), inputs "
          f"{input_bytes / 2**20:,.0f} MiB, {args.threads} threads, median of {args.repeats}")
    floor = figures["io-floor"]["seconds"] if "io-floor" in figures else None
    # The baseline of the merge methods: task arithmetic, measured in the same rounds.
    arithmetic = figures.get("task_arithmetic")
    print(f"{'case':<18}{'seconds':>9}{'x read':>8}{'x io-floor':>11}{'x TA':>7}"
          f"{'peak RSS MiB':>14}{'above imports':>15}{'/ inputs':>10}{'RSS x TA':>10}")
    for name, fig in figures.items():
        ratio = fig["seconds"] / read
        vs_floor = fig["seconds"] / floor if floor else float("nan")
        vs_ta = fig["seconds"] / arithmetic["seconds"] if arithmetic else float("nan")
        rss_vs_ta = fig["peak_rss"] / arithmetic["peak_rss"] if arithmetic else float("nan")
        share = fig["peak_above_imports"] / input_bytes
        report["cases"][name] = {**fig, "rounds_seconds": [r["seconds"] for r in runs[name]],
                                 "time_vs_read": ratio, "time_vs_io_floor": vs_floor,
                                 "time_vs_task_arithmetic": vs_ta,
                                 "peak_rss_vs_task_arithmetic": rss_vs_ta,
                                 "peak_above_imports_vs_inputs": share,
                                 "peak_rss_vs_inputs": fig["peak_rss"] / input_bytes}
        print(f"{name:<18}{fig['seconds']:>9.2f}{ratio:>8.2f}{vs_floor:>11.2f}{vs_ta:>7.2f}"
              f"{fig['peak_rss'] / 2**20:>14,.0f}{fig['peak_above_imports'] / 2**20:>15,.0f}"
              f"{share:>10.3f}{rss_vs_ta:>10.2f}")
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
