"""CPU time and memory of reading untrusted inputs at tvtool's bounds (docs/cli.md's table).

Each case writes the costliest input known just inside a bound (e.g. nested empty lists for
YAML and JSON, a uniform image that compresses to almost nothing) to a temporary directory,
then reads it in a fresh subprocess with tvtool's own reader, and reports that child's CPU
time and its peak resident set size while reading, over its resident size before (Linux: the
peak is reset through ``/proc/self/clear_refs`` once the imports are done):

* ``yaml-libyaml``, ``yaml-python``: a 128 KiB YAML document with PyYAML's C and pure-Python
  loaders (``tvtool.io.yaml_io.parse_yaml``);
* ``json``: a 4 MiB JSON document (``tvtool.limits.loads_json``);
* ``regex``: adapter_config.json regular expressions until the per-adapter step budget is spent
  (``(.*)*z``, which Python's ``re`` takes exponential time on);
* ``image-16bit``, ``image-rgb``: an 8192 x 8192 PNG (the pixel bound) through
  ``tvtool.io.images.read_image``;
* ``templates``: a zero-shot head of 2 classes x 1,000 templates (the template bound) on
  ``tvtool-tiny``;
* ``cifar-batch``: a CIFAR batch just under the 256 MiB file bound (87,000 images), written as
  Python 2's cPickle wrote the published files (the image bytes one latin-1 str, the costliest
  form to read), through ``tvtool.io.dataset_pickles.read_cifar_batch``; ``cifar-pickle``: the
  same file through ``pickle.load(..., encoding="latin1")``, as torchvision's ``CIFAR10`` reads
  it (the baseline);
* ``pickle-ops``: a pickle of 997,000 empty dicts (one operation each, just inside the
  1,000,000-operation bound) through ``tvtool.io.unpickle.read_plain_pickle``.

Usage::

    python benchmarks/bounds_bench.py [--cases yaml-libyaml,json,...] [--json]

Needs ~600 MB of disk in ``$TMPDIR`` for the images and the CIFAR batch and ~2 GB of memory;
everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 1024 * 1024

_CHILD = r"""
import json, sys, time
case, path = sys.argv[1], sys.argv[2]


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB

import tvtool.io.yaml_io as yaml_io, tvtool.limits as limits, tvtool.io.images as images
from tvtool.formats.peft_adapters import patterns
if case == "templates":
    from tvtool.models import build_zero_shot_head, load_clip
    bundle = load_clip("tvtool-tiny")
if case == "yaml-python":
    yaml_io._CLoader = None
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak (VmHWM) to the current size
start = time.process_time()
if case.startswith("yaml"):
    yaml_io.parse_yaml(open(path).read(), "doc")
elif case == "json":
    limits.loads_json(open(path).read(), "doc")
elif case == "regex":
    compiled = patterns.compile_pattern("(.*)*z", "target_modules")
    budget = patterns.MatchBudget()
    try:
        while True:
            compiled.fullmatch("visual.transformer.resblocks.11.attn.out_proj" + "a" * 14,
                               budget)
    except Exception as exc:
        assert "steps" in str(exc), exc
elif case.startswith("image"):
    images.read_image(path)
elif case == "templates":
    templates = [line for line in open(path).read().splitlines() if line]
    build_zero_shot_head(bundle, ["cat", "dog"], templates)
elif case == "cifar-batch":
    from pathlib import Path
    from tvtool.io.dataset_pickles import read_cifar_batch
    read_cifar_batch(Path(path))
elif case == "cifar-pickle":
    import pickle
    with open(path, "rb") as handle:
        pickle.load(handle, encoding="latin1")
elif case == "pickle-ops":
    from pathlib import Path
    from tvtool.io.dataset_pickles import _BATCH_BOUNDS
    from tvtool.io.unpickle import read_plain_pickle
    read_plain_pickle(Path(path), "ops", _BATCH_BOUNDS)
seconds = time.process_time() - start
grown = status("VmHWM") - before
print(json.dumps({"cpu_s": round(seconds, 2), "memory_mb": round(grown)}))
"""


def _inputs(case: str, folder: Path) -> tuple[Path, str]:
    """Write the input of one case; return its path and a description."""
    from tvtool.limits import MAX_DOCUMENT_BYTES, MAX_IMAGE_PIXELS, MAX_TEMPLATES, MAX_YAML_BYTES

    path = folder / case
    if case.startswith("yaml") or case == "json":
        size = MAX_YAML_BYTES if case.startswith("yaml") else MAX_DOCUMENT_BYTES
        block = "[" * 60 + "]" * 60
        text = "[" + ",".join([block] * ((size - 2) // (len(block) + 1))) + "]"
        path.write_text(text)
        return path, f"{len(text) / 1024:,.0f} KiB of nested empty lists"
    if case.startswith("image"):
        import numpy as np
        from PIL import Image

        side = int(MAX_IMAGE_PIXELS ** 0.5)
        path = path.with_suffix(".png")
        if case == "image-16bit":
            Image.fromarray(np.full((side, side), 40000, dtype=np.uint16)).save(path)
        else:
            Image.new("RGB", (side, side), (10, 20, 30)).save(path)
        return path, f"{side} x {side} PNG, {path.stat().st_size / 1024:,.0f} KiB"
    if case == "templates":
        path.write_text("".join(f"a photo number {i} of a {{}}.\n" for i in range(MAX_TEMPLATES)))
        return path, f"2 classes x {MAX_TEMPLATES:,} templates, tvtool-tiny"
    if case in ("cifar-batch", "cifar-pickle"):
        import struct

        path = folder / "cifar-batch"
        if not path.exists():
            count = 87_000
            labels = b"".join(b"(" + b"K\x07" * 1000 + b"e" for _ in range(count // 1000))
            array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b"
                     b"\x87R(K\x01(J" + struct.pack("<i", count) + b"M\x00\x0ctcnumpy\ndtype\n"
                     b"U\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
                     b"K\x00tb\x89T" + struct.pack("<I", count * 3072))
            with open(path, "wb") as handle:
                handle.write(b"\x80\x02}(U\x04data" + array)
                for _ in range(count // 1000):
                    handle.write(bytes(range(256)) * 12000)  # 1,000 images of every byte value
                handle.write(b"tbU\x06labels]" + labels + b"u.")
        return path, f"{path.stat().st_size / MB:,.1f} MiB, 87,000 images"
    if case == "pickle-ops":
        path.write_bytes(b"\x80\x02]" + b"".join(b"(" + b"}" * 997 + b"e" for _ in range(1000))
                         + b".")
        return path, f"997,000 empty dicts, {path.stat().st_size / 1024:,.0f} KiB"
    if case == "regex":
        from tvtool.formats.peft_adapters.patterns import MAX_STEPS

        return path, f"(.*)*z until {MAX_STEPS:,} steps"
    raise ValueError(case)


CASES = ("yaml-libyaml", "yaml-python", "json", "regex", "image-16bit", "image-rgb",
         "templates", "cifar-batch", "cifar-pickle", "pickle-ops")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvtool-bounds-") as tmp:
        for case in args.cases.split(","):
            path, what = _inputs(case, Path(tmp))
            out = subprocess.run([sys.executable, "-c", _CHILD, case, str(path)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            rows.append({"case": case, "input": what, **json.loads(out.stdout.splitlines()[-1])})
            print(f"{case}: {rows[-1]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| case | input | CPU s | memory MB |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['input']} | {row['cpu_s']} | {row['memory_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
