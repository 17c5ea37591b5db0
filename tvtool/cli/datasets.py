"""``tvtool datasets``: the dataset names every ``--dataset`` option accepts."""

from __future__ import annotations

import sys
from typing import Any

from tvtool.cli.common import JsonOpt, emit_json, handles_errors

NO_WORKING_DOWNLOAD = frozenset({"StanfordCars"})
"""Standard datasets whose torchvision downloader exists but whose source links are dead."""


def dataset_listing() -> list[dict[str, Any]]:
    """One entry per dataset name tvtool knows, then the ``<name>Val`` and image-folder forms."""
    from tvtool.data.standard import IMAGENET, STANDARD
    from tvtool.synthetic_world.tasks import TASKS

    entries: list[dict[str, Any]] = []
    for task in TASKS.values():
        entries.append({"name": f"synthetic:{task.name}", "kind": "synthetic",
                        "classes": len(task.classnames), "description": task.description,
                        "aliases": []})
    for info in STANDARD:
        # Only torchvision's downloaders fetch: RESISC45 has none (tvtool reads its files),
        # and StanfordCars' original links are dead (docs/data.md).
        fetch = ("no --download: unpack it by hand" if info.build is None
                 else "--download's links are dead: place it by hand"
                 if info.name in NO_WORKING_DOWNLOAD else "--download fetches it")
        entries.append({"name": info.name, "kind": "standard", "classes": len(info.classnames),
                        "description": f"read from DATA_ROOT/{info.folder} "
                                       f"(--data-root or TVTOOL_DATA_ROOT; {fetch})",
                        "aliases": list(info.aliases)})
    # Its class names come from open_clip's zero-shot metadata; listing needs no model import.
    entries.append({"name": IMAGENET, "kind": "standard", "classes": 1000,
                    "description": "read from DATA_ROOT/imagenet (torchvision's layout; "
                                   "no --download)", "aliases": []})
    entries.append({"name": "<name>Val", "kind": "standard", "classes": None,
                    "description": "the task-vectors validation variant of a standard name, "
                                   "e.g. MNISTVal, CarsVal: its test split is the held-out part "
                                   "of the training set (docs/data.md)",
                    "aliases": []})
    entries.append({"name": "imagefolder:PATH", "kind": "imagefolder", "classes": None,
                    "description": "your own images: PATH/<class>/*.png, or PATH/train/<class>"
                                   " and PATH/test/<class> (docs/data.md)",
                    "aliases": []})
    entries.append({"name": "hf:PATH", "kind": "hf", "classes": None,
                    "description": "a Hugging Face dataset on disk: a save_to_disk directory or "
                                   "parquet files; no hub access (needs tvtool[hf])",
                    "aliases": []})
    return entries


@handles_errors
def datasets(as_json: JsonOpt = False) -> None:
    """List the dataset names --dataset accepts (one per line on stdout).

    Synthetic tasks need no files; standard datasets are read from the data root;
    imagefolder:PATH reads your own class folders, hf:PATH a Hugging Face dataset saved on
    disk. Names are case-insensitive. --json also gives the --suite lists.
    """
    from tvtool.data.suites import SUITES

    entries = dataset_listing()
    if as_json:
        emit_json({"datasets": entries, "suites": {k: list(v) for k, v in SUITES.items()}})
        return
    width = max(len(e["name"]) for e in entries)
    for entry in entries:
        classes = f"{entry['classes']} classes" if entry["classes"] else "-"
        sys.stdout.write(f"{entry['name']:<{width}}  {entry['kind']:<11}  {classes:<12}  "
                         f"{entry['description']}\n")
    sys.stdout.flush()
