"""Run every benchmark of this folder in turn, each in its own process (``make bench``).

Each script prints its own table and ratios against a baseline measured in the same process;
this runner only sequences them and reports which failed. Extra arguments are not passed on:
run a script directly to change its settings.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ("startup_bench.py", "streaming_bench.py", "merge_bench.py", "svd_bench.py",
              "finetune_bench.py",
              "atlas_bench.py", "search_bench.py", "materialize_bench.py", "sampling_bench.py",
              "bounds_bench.py")


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHMARKS:
        print(f"=== {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(here / name)])
        print(f"=== {name}: exit {code} after {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
