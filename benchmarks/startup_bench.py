"""Start-up of tvtool's file-level commands against a bare ``import torch``.

Each stage of ``tvtool extract ... -o - | tvtool negate - -o - | tvtool apply ...`` is its
own process, so on small files a stage costs mostly its imports. This script makes (in a
child process) a tvtool-tiny base checkpoint, a fine-tuned checkpoint and two task vectors in
a temporary directory, then times, in one run and interleaved round by round (so that a
change of load on a shared machine hits every row alike):

* ``import torch``: ``python -c "import torch"``, the baseline every ratio divides by;
* ``import torch, open_clip``: what every stage paid before open_clip was imported lazily;
* ``extract``, ``negate``, ``apply``, ``inspect``, ``merge``: each command on files, in a
  fresh ``python -m tvtool`` process (wall time of the whole command, work included: on
  tvtool-tiny the work is a few milliseconds);
* ``pipeline``: ``extract ... -o - | negate - -o - | apply --base BASE - -o OUT`` in ``sh``,
  the three processes starting together as a shell starts them.

It prints the median and the fastest wall time of each row over ``--rounds`` rounds and the
ratio of the medians to the baseline's; a file-level stage should cost at most
:data:`TARGET` times the baseline (the pipeline, three processes on however many cores, is
reported, not held to it). Exit status 1 when a stage misses the target and ``--check`` is
given.

Usage::

    python benchmarks/startup_bench.py [--rounds 7] [--json] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.3
"""A file-level stage costs at most this many times ``python -c "import torch"``."""

_MAKE = """
import sys
import torch
from tvtool.commands.extract import ExtractConfig, extract
from tvtool.io import write_tensors
from tvtool.metadata import FileMeta, Kind
from tvtool.models import load_clip

root = sys.argv[1]
state = {k: v.clone() for k, v in load_clip("tvtool-tiny:random").model.state_dict().items()}
header = FileMeta(kind=Kind.CHECKPOINT, architecture="tvtool-tiny").to_header()
write_tensors(f"{root}/base.safetensors", state, header)
for index in (1, 2):
    gen = torch.Generator().manual_seed(index)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen)
             if k.startswith("visual.") and v.is_floating_point() else v
             for k, v in state.items()}
    write_tensors(f"{root}/ft{index}.safetensors", tuned, header)
    extract(ExtractConfig(base=f"{root}/base.safetensors",
                          finetuned=f"{root}/ft{index}.safetensors",
                          output=f"{root}/tv{index}.safetensors", dataset=f"task{index}"))
"""


def _env() -> dict[str, str]:
    # The checkout this script is in, whatever tvtool is installed.
    return {**os.environ, "PYTHONPATH": str(ROOT), "TVTOOL_CACHE_DIR": os.environ.get(
        "TVTOOL_CACHE_DIR", tempfile.gettempdir() + "/tvtool-startup-bench-cache")}


def cases(root: Path) -> dict[str, tuple[list[str] | str, bool]]:
    """Name -> (argv, or a shell line; whether the row is a file-level stage held to TARGET)."""
    py = [sys.executable]
    tv = [*py, "-m", "tvtool"]
    out = str(root / "out")
    base, ft, tv1, tv2 = (str(root / f) for f in ("base.safetensors", "ft1.safetensors",
                                                  "tv1.safetensors", "tv2.safetensors"))
    q = " ".join
    return {
        "import torch": ([*py, "-c", "import torch"], False),
        "import torch, open_clip": ([*py, "-c", "import torch, open_clip"], False),
        "extract": ([*tv, "extract", ft, "--base", base, "-o", f"{out}/ex.safetensors"], True),
        "negate": ([*tv, "negate", tv1, "-o", f"{out}/neg.safetensors"], True),
        "apply": ([*tv, "apply", "--base", base, tv1, "-o", f"{out}/ap.safetensors"], True),
        "inspect": ([*tv, "inspect", tv1], True),
        "merge": ([*tv, "merge", tv1, tv2, "-o", f"{out}/merged.safetensors"], True),
        "pipeline (3 stages)": (
            f"{q(tv)} extract {ft} --base {base} -o - | {q(tv)} negate - -o - "
            f"| {q(tv)} apply --base {base} - -o {out}/pipe.safetensors", False),
    }


def time_once(command: list[str] | str, out: Path) -> float:
    """Wall seconds of one run (outputs removed first: tvtool refuses to overwrite)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    started = time.perf_counter()
    done = subprocess.run(command, shell=isinstance(command, str), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{command!r} failed ({done.returncode}): "
                         f"{done.stderr.decode(errors='replace')[-400:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when a file-level stage costs more than {TARGET}x")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tvtool-startup-") as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-c", _MAKE, str(root)], env=_env(), check=True,
                       stderr=subprocess.DEVNULL)
        table = cases(root)
        times: dict[str, list[float]] = {name: [] for name in table}
        time_once(table["import torch"][0], root / "out")  # warm the page cache once
        for _ in range(args.rounds):
            for name, (command, _) in table.items():
                times[name].append(time_once(command, root / "out"))
    baseline = statistics.median(times["import torch"])
    rows = [{"row": name, "median_s": round(statistics.median(t), 3),
             "min_s": round(min(t), 3),
             "ratio": round(statistics.median(t) / baseline, 2),
             "target": TARGET if table[name][1] else None} for name, t in times.items()]
    missed = [r["row"] for r in rows if r["target"] is not None and r["ratio"] > TARGET]
    if args.json:
        print(json.dumps({"rounds": args.rounds, "cpus": os.cpu_count(), "rows": rows,
                          "missed": missed}, indent=2))
    else:
        print(f"start-up, {args.rounds} rounds, {os.cpu_count()} CPUs; ratio = median / "
              f"median of `import torch` ({baseline:.2f} s); target for file-level stages: "
              f"<= {TARGET}x")
        print(f"{'row':<26}{'median s':>10}{'min s':>9}{'ratio':>8}  target")
        for r in rows:
            verdict = "" if r["target"] is None else (
                "ok" if r["ratio"] <= TARGET else "MISSED")
            print(f"{r['row']:<26}{r['median_s']:>10.2f}{r['min_s']:>9.2f}"
                  f"{r['ratio']:>7.2f}x  {verdict}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
