"""``hf:PATH`` datasets: a Hugging Face ``datasets`` directory on the local disk (never the hub).

``PATH`` is a directory written by ``save_to_disk`` (a ``DatasetDict`` with its splits, or one
``Dataset``) or a folder of parquet files (a hub snapshot); see :mod:`tvtool.io.hf_datasets`
for what is read and docs/data.md for the rules below.

* Splits: ``train`` (required), ``validation``/``val``/``valid`` and ``test``/``testing``, any
  case, as for image folders; another split name is an error, never silently dropped. A single
  saved ``Dataset`` is one training pool, split like a single-folder image folder.
* Columns: the image is the column named ``image``, else the one ``Image`` feature, else
  ``img``/``img_bytes``/``image_bytes``; the label is ``label``, else the one ``ClassLabel``
  feature, else ``labels``. Images are stored bytes (an ``Image`` feature's ``bytes`` or a
  binary column); an image stored only as a path is refused.
* Class names: ``PATH/classnames.txt`` (one per line, in label order), else the label's
  ``ClassLabel`` names. Templates: ``PATH/templates.txt``, else ``a photo of a {}.``.
* Every label must be an integer in ``[0, classes)``: unlabelled rows (``-1``) are refused.

Reading needs pyarrow, the ``hf`` extra (``pip install 'tvtool[hf]'``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tvtool.data.base import Pool, TaskSpec
from tvtool.data.imagefolder import CLASSNAMES_FILE, PATH_PREFIXES, SPLIT_NAMES, read_templates
from tvtool.errors import InvalidInputError
from tvtool.io.hf_datasets import HF_EXTRA, HFSplit, find_hf_splits, iter_feature_names
from tvtool.io.images import read_image, read_text_lines
from tvtool.limits import short_repr

PREFIX = "hf:"
assert PREFIX in PATH_PREFIXES

IMAGE_COLUMNS = ("img", "img_bytes", "image_bytes")
"""Binary columns taken as the image when there is no ``image`` column or ``Image`` feature."""


def _by_type(split: HFSplit, wanted: str) -> list[str]:
    return [c for c in split.columns
            if isinstance(split.features.get(c), dict)
            and split.features[c].get("_type") == wanted]


def image_column(split: HFSplit) -> str:
    """The column holding the images (rule in the module docstring).

    Raises:
        InvalidInputError: none or several candidates, or a column of another type.
    """
    typed = _by_type(split, "Image")
    if "image" in split.columns:
        column = "image"
    elif len(typed) == 1:
        column = typed[0]
    else:
        named = [c for c in IMAGE_COLUMNS if c in split.columns]
        if len(typed) > 1 or len(named) != 1:
            raise InvalidInputError(
                f"{split.label}: cannot tell which column holds the images (columns "
                f"{short_repr(list(split.columns), 120)})",
                hint="name it 'image' (datasets' Image feature or raw bytes)")
        column = named[0]
    if split.kind_of(column) not in ("image", "bytes"):
        raise InvalidInputError(f"{split.label}: column {column!r} holds "
                                f"{split.type_of(column)}, not image bytes",
                                hint="store the images as datasets' Image feature or as bytes")
    return column


def label_column(split: HFSplit) -> str:
    """The column holding the integer labels (rule in the module docstring).

    Raises:
        InvalidInputError: none or several candidates, or a column that is not integer.
    """
    typed = _by_type(split, "ClassLabel")
    if "label" in split.columns:
        column = "label"
    elif len(typed) == 1:
        column = typed[0]
    elif "labels" in split.columns and not typed:
        column = "labels"
    else:
        raise InvalidInputError(
            f"{split.label}: cannot tell which column holds the labels (columns "
            f"{short_repr(list(split.columns), 120)})",
            hint="name it 'label' (a ClassLabel or integer column)")
    if split.kind_of(column) != "integer":
        raise InvalidInputError(f"{split.label}: label column {column!r} holds "
                                f"{split.type_of(column)}, not integers")
    return column


class HFPool:
    """The rows of one stored split: ``(decoded RGB image, label)``."""

    def __init__(self, split: HFSplit, image: str, labels: np.ndarray,
                 grey: bool = False) -> None:
        self._split = split
        self._image = image
        self._labels = labels
        self._grey = grey

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def load(self, index: int) -> tuple[Image.Image, int]:
        cell = self._split.value(self._image, index)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        name = f"{self._split.label} row {index}"
        if not isinstance(data, bytes | bytearray):
            where = f" (only a path: {short_repr(cell.get('path'))})" \
                if isinstance(cell, dict) and cell.get("path") else ""
            raise InvalidInputError(f"{name} stores no image bytes{where}",
                                    hint="save the dataset with its images embedded (datasets "
                                         "embeds them in save_to_disk and parquet files)")
        image = read_image(io.BytesIO(data), name=name)
        if self._grey:
            image = image.convert("L").convert("RGB")
        return image, int(self._labels[index])

    def member(self, index: int) -> str:
        return str(index)


def _labels(split: HFSplit, column: str, classes: int) -> np.ndarray:
    labels = split.column(column)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise InvalidInputError(
            f"{split.label}: label {bad} in column {column!r} is outside 0..{classes - 1}"
            + (" (an unlabelled row)" if bad == -1 else ""),
            hint="every row needs a label of one of the classes (docs/data.md, hf:PATH)")
    return labels.astype(np.int64)


def open_hf_splits(root: Path, label: str) -> tuple[str, dict[str, HFSplit]]:
    """The stored splits of a dataset directory, by tvtool split (``train``, ``val``, ``test``).

    Raises:
        InvalidInputError: no training split, two splits for one, an unknown split name.
    """
    layout, stored = find_hf_splits(root, set(SPLIT_NAMES))
    splits: dict[str, HFSplit] = {}
    for files in stored:
        split = SPLIT_NAMES.get(files.name.lower())
        if split is None:
            raise InvalidInputError(
                f"{label} has split {short_repr(files.name)}, which is none of train, "
                "validation and test", hint="save only those splits (docs/data.md)")
        if split in splits:
            raise InvalidInputError(f"{label} has two {split} splits: "
                                    f"{splits[split].files.name!r} and {files.name!r}")
        splits[split] = HFSplit(files, f"{label} [{files.name}]")
    if "train" not in splits:
        raise InvalidInputError(f"{label} has no training split (it has "
                                f"{', '.join(s.files.name for s in splits.values())})",
                                hint="tvtool trains, and carves val, from a 'train' split")
    return layout, splits


def hf_pools(root: Path, label: str, classes: int, grey: bool = False
             ) -> tuple[str, dict[str, Pool], dict[str, Any]]:
    """Pools of a Hugging Face dataset directory whose classes are known (``classes`` of them).

    Args:
        root: The directory.
        label: How to name the dataset in errors.
        classes: Number of classes; every label must be below it.
        grey: Convert every image to greyscale (then RGB), as a reference that reads them
            with ``convert("L")`` does.

    Returns:
        The layout, the pools by split, and the columns read (for the manifest).
    """
    layout, splits = open_hf_splits(root, label)
    train = splits["train"]
    image, target = image_column(train), label_column(train)
    pools: dict[str, Pool] = {}
    for name, split in splits.items():
        if image not in split.columns or target not in split.columns:
            raise InvalidInputError(f"{split.label} lacks column {image!r} or {target!r}")
        pools[name] = HFPool(split, image, _labels(split, target, classes), grey)
    return layout, pools, {"image": image, "label": target}


class HFSource:
    """``hf:PATH``: a local Hugging Face dataset directory as a tvtool dataset."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.layout, self._splits = open_hf_splits(root, name)
        train = self._splits["train"]
        self._image, self._label = image_column(train), label_column(train)
        self.spec = TaskSpec(name, self._classnames(train), read_templates(root))
        if self.spec.num_classes < 2:
            raise InvalidInputError(f"{name} has {self.spec.num_classes} class; classification "
                                    "needs at least two")
        self._pools: dict[str, Pool] | None = None

    def _classnames(self, train: HFSplit) -> tuple[str, ...]:
        recorded = list(iter_feature_names(train.features, self._label))
        listed = self.root / CLASSNAMES_FILE
        if listed.is_file():
            names = read_text_lines(listed)
            if recorded and len(names) != len(recorded):
                raise InvalidInputError(
                    f"{str(listed)!r} lists {len(names)} class names, but column "
                    f"{self._label!r} has {len(recorded)} classes",
                    hint="one name per line, in label order (docs/data.md)")
        elif recorded:
            names = recorded
        else:
            raise InvalidInputError(
                f"{self.name}: column {self._label!r} records no class names",
                hint=f"write them to {str(listed)!r}, one per line in label order")
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{self.name}: two classes share one name",
                                    hint="give every class its own name (classnames.txt)")
        return tuple(names)

    def pools(self) -> Mapping[str, Pool]:
        if self._pools is None:
            pools: dict[str, Pool] = {}
            for split, stored in self._splits.items():
                if self._image not in stored.columns or self._label not in stored.columns:
                    raise InvalidInputError(f"{stored.label} lacks column {self._image!r} or "
                                            f"{self._label!r}")
                pools[split] = HFPool(stored, self._image,
                                      _labels(stored, self._label, self.spec.num_classes))
            self._pools = pools
        return self._pools

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "layout": self.layout,
                "splits": {split: s.files.name for split, s in self._splits.items()},
                "columns": {"image": self._image, "label": self._label},
                "rows": {split: s.num_rows for split, s in self._splits.items()}}


def resolve_hf(name: str) -> HFSource:
    """Resolve ``hf:PATH`` to its source (a local directory; nothing is fetched).

    Raises:
        InvalidInputError: the path is missing or not a directory, pyarrow is missing, or the
            directory is not a dataset tvtool can read.
    """
    text = name[len(PREFIX):].strip()
    if not text:
        raise InvalidInputError("hf: needs the path of a local directory",
                                hint="e.g. hf:./sun397 (a save_to_disk directory or parquet "
                                     "files; no hub access)")
    root = Path(text).expanduser()
    if not root.is_dir():
        raise InvalidInputError(
            f"hf: reads a local directory, and {text[:120]!r} is not one",
            hint="tvtool never downloads from the hub: save the dataset first, e.g. "
                 "datasets.load_dataset(NAME).save_to_disk(PATH) (docs/data.md)")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InvalidInputError("hf: datasets are read with pyarrow, which is not installed",
                                hint=f"pip install '{HF_EXTRA}'") from None
    return HFSource(PREFIX + text, root)
