"""Hugging Face ``datasets`` data kept on the local disk, read with pyarrow (never the hub).

Two on-disk forms are recognised (docs/data.md, "hf:PATH"):

* a directory written by ``Dataset.save_to_disk`` (``state.json`` + ``*.arrow`` files) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such directory per split); the
  Arrow files are memory-mapped, so opening a split reads no image;
* parquet files (a hub snapshot's ``data/train-00000-of-00002.parquet``, ``train.parquet``,
  ``train/0000.parquet``, ...), whose split is named by the file or its folder; their images
  are read one row group at a time.

Only pyarrow is needed (the ``hf`` extra); the ``datasets`` package itself is not imported.
Every path comes from the directory's own listing: a ``state.json`` naming a file outside its
folder is refused, and nothing here opens a URL.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvtool.errors import InvalidInputError
from tvtool.io.documents import read_json
from tvtool.limits import loads_json, short_repr

HF_EXTRA = "tvtool[hf]"
"""The optional-dependency extra that installs pyarrow, which reads these files."""

MAX_FILES = 10_000
"""Most data files one dataset directory may hold."""
MAX_DEPTH = 3
"""Deepest folder below the dataset directory searched for parquet files."""

_SHARD = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_]*?)(?:[-_.]\d.*)?$")


def _pyarrow(what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InvalidInputError(f"reading {what} needs pyarrow, which is not installed",
                                hint=f"pip install '{HF_EXTRA}'") from None
    return pyarrow


@dataclass(frozen=True)
class HFSplitFiles:
    """The data files of one stored split, in row order.

    Attributes:
        name: The split's name as stored (``train``, ``validation``, ...).
        files: Data files (``.arrow`` or ``.parquet``).
        kind: ``arrow`` (``save_to_disk``) or ``parquet``.
    """

    name: str
    files: tuple[Path, ...]
    kind: str


def _state_files(folder: Path) -> tuple[Path, ...]:
    """The Arrow files a ``save_to_disk`` folder's ``state.json`` lists, checked to stay inside."""
    state = read_json(str(folder / "state.json"))
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries or len(entries) > MAX_FILES:
        raise InvalidInputError(f"{str(folder / 'state.json')!r} lists no data files",
                                hint="is it a directory written by datasets' save_to_disk?")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if (not isinstance(name, str) or not name.endswith(".arrow") or "/" in name
                or "\\" in name or name.startswith(".")):
            raise InvalidInputError(
                f"{str(folder / 'state.json')!r} names data file {short_repr(name)}, which is "
                "not an .arrow file of its own folder")
        path = folder / name
        if not path.is_file():
            raise InvalidInputError(f"{str(path)!r} is listed in state.json but missing")
        files.append(path)
    return tuple(files)


def _parquet_files(root: Path) -> list[Path]:
    found: list[Path] = []
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and depth < MAX_DEPTH:
                pending.append((entry, depth + 1))
            elif entry.is_file() and entry.suffix.lower() == ".parquet":
                found.append(entry)
                if len(found) > MAX_FILES:
                    raise InvalidInputError(f"{str(root)!r} holds more than {MAX_FILES} "
                                            "parquet files")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _parquet_split(path: Path, root: Path, known: set[str]) -> str:
    """The split a parquet file belongs to: its name's first part, else its folder's name."""
    match = _SHARD.match(path.stem)
    if match and match.group("split").lower() in known:
        return match.group("split")
    for parent in path.relative_to(root).parents:
        if parent.name and parent.name.lower() in known:
            return parent.name
    if match:
        raise InvalidInputError(
            f"{path.relative_to(root).as_posix()!r} in {str(root)!r} belongs to split "
            f"{short_repr(match.group('split'))}, which is none of train, validation and test",
            hint="move the other splits' files out of the directory (a split tvtool cannot "
                 "place is never silently dropped)")
    raise InvalidInputError(
        f"cannot tell the split of {path.relative_to(root).as_posix()!r} in {str(root)!r}",
        hint="name parquet files SPLIT.parquet or SPLIT-00000-of-00001.parquet, or put them in "
             "a SPLIT/ folder (train, validation, test)")


def find_hf_splits(root: Path, split_names: set[str]) -> tuple[str, list[HFSplitFiles]]:
    """Find the stored splits of a local Hugging Face dataset directory.

    Args:
        root: The directory.
        split_names: Lowercase split names that parquet file and folder names may carry.

    Returns:
        The layout (``save_to_disk`` or ``parquet``) and the splits in stored order.

    Raises:
        InvalidInputError: neither layout is there, or its files are inconsistent.
    """
    if (root / "dataset_dict.json").is_file():
        listing = read_json(str(root / "dataset_dict.json"))
        names = listing.get("splits") if isinstance(listing, dict) else None
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, str) and re.fullmatch(r"[\w.-]{1,100}", n)
                           and n not in (".", "..") for n in names)):
            raise InvalidInputError(f"{str(root / 'dataset_dict.json')!r} lists no valid splits",
                                    hint="is it a directory written by datasets' save_to_disk?")
        splits = []
        for name in names:
            folder = root / name
            if not (folder / "state.json").is_file():
                raise InvalidInputError(f"split {name!r} of {str(root)!r} has no "
                                        f"{name}/state.json")
            splits.append(HFSplitFiles(name, _state_files(folder), "arrow"))
        return "save_to_disk", splits
    if (root / "state.json").is_file():
        return "save_to_disk", [HFSplitFiles("train", _state_files(root), "arrow")]
    files = _parquet_files(root)
    if not files:
        raise InvalidInputError(
            f"{str(root)!r} holds neither a saved dataset (dataset_dict.json or state.json) nor "
            "parquet files",
            hint="save it with datasets' save_to_disk(PATH), or copy the dataset's parquet "
                 "files there (docs/data.md)")
    grouped: dict[str, list[Path]] = {}
    for path in files:
        grouped.setdefault(_parquet_split(path, root, split_names), []).append(path)
    return "parquet", [HFSplitFiles(name, tuple(paths), "parquet")
                       for name, paths in grouped.items()]


def _features(schema: Any) -> dict[str, Any]:
    """The ``datasets`` features recorded in an Arrow schema's metadata (empty if none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    document = loads_json(raw, "the dataset's huggingface schema metadata")
    info = document.get("info") if isinstance(document, dict) else None
    features = info.get("features") if isinstance(info, dict) else None
    return features if isinstance(features, dict) else {}


class HFSplit:
    """One stored split, opened lazily: its columns, labels and images by row.

    Opening reads only schemas and row counts. Each process opens the files itself on first
    use (the object pickles without them), so data-loader workers can share it.
    """

    def __init__(self, files: HFSplitFiles, label: str) -> None:
        self.files = files
        self.label = label
        pa = _pyarrow(label)
        schemas = []
        self._rows: list[int] = []
        self._groups: list[list[int]] = []
        try:
            for path in files.files:
                if files.kind == "arrow":
                    with pa.memory_map(str(path)) as source:
                        reader = pa.ipc.open_stream(source)
                        schemas.append(reader.schema)
                        self._rows.append(sum(batch.num_rows for batch in reader))
                        self._groups.append([self._rows[-1]])
                else:
                    with pa.memory_map(str(path)) as source:
                        meta = pa.parquet.ParquetFile(source).metadata
                        schemas.append(meta.schema.to_arrow_schema())
                        self._groups.append([meta.row_group(g).num_rows
                                             for g in range(meta.num_row_groups)])
                        self._rows.append(sum(self._groups[-1]))
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise InvalidInputError(f"{label}: cannot read {str(path)!r}: "
                                    f"{' '.join(str(exc).split())[:160]}",
                                    hint="the file may be damaged or not Arrow/parquet") from None
        first = schemas[0]
        for path, schema in zip(files.files[1:], schemas[1:], strict=True):
            if not schema.remove_metadata().equals(first.remove_metadata()):
                raise InvalidInputError(f"{label}: {str(path)!r} has other columns than "
                                        f"{str(files.files[0])!r}")
        self.schema = first
        self.features = _features(first)
        self.columns = tuple(first.names)
        self.num_rows = sum(self._rows)
        self._starts = np.cumsum([0, *self._rows])
        self._tables: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int, str], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"], state["_cache"] = {}, OrderedDict()
        return state

    def type_of(self, column: str) -> Any:
        """The Arrow type of a column."""
        return self.schema.field(column).type

    def kind_of(self, column: str) -> str:
        """``image`` (datasets' Image: bytes in a struct), ``bytes``, ``integer``, ``other``."""
        types = _pyarrow(self.label).types
        kind = self.type_of(column)
        if types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            return "image"
        if types.is_binary(kind) or types.is_large_binary(kind):
            return "bytes"
        return "integer" if types.is_integer(kind) else "other"

    def column(self, column: str) -> np.ndarray:
        """A whole (small, e.g. label) column as a numpy array, in row order."""
        parts: list[np.ndarray] = []
        for index in range(len(self.files.files)):
            parts.extend(chunk.to_numpy(zero_copy_only=False)
                         for chunk in self._read(index, column, None).chunks)
        return np.concatenate(parts) if parts else np.zeros(0)

    def value(self, column: str, row: int) -> Any:
        """One cell as a Python value (a struct becomes a dict)."""
        if not 0 <= row < self.num_rows:
            raise IndexError(row)
        index = int(np.searchsorted(self._starts, row, side="right")) - 1
        offset = row - int(self._starts[index])
        if self.files.kind == "arrow":
            return self._read(index, column, None)[offset].as_py()
        group = 0
        for size in self._groups[index]:
            if offset < size:
                break
            offset -= size
            group += 1
        return self._read(index, column, group)[offset].as_py()

    def _read(self, index: int, column: str, group: int | None) -> Any:
        pa = _pyarrow(self.label)
        path = self.files.files[index]
        try:
            if self.files.kind == "arrow":
                if index not in self._tables:
                    # Memory-mapped: the table's buffers stay on disk until a cell is read.
                    source = pa.memory_map(str(path))
                    self._tables[index] = pa.ipc.open_stream(source).read_all()
                return self._tables[index].column(column)
            key = (index, -1 if group is None else group, column)
            if key not in self._cache:
                with pa.memory_map(str(path)) as source:
                    parquet = pa.parquet.ParquetFile(source)
                    table = (parquet.read(columns=[column]) if group is None
                             else parquet.read_row_group(group, columns=[column]))
                self._cache[key] = table.column(column)
                while len(self._cache) > 2:  # one row group being read, one being left
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return self._cache[key]
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise InvalidInputError(f"{self.label}: cannot read {str(path)!r}: "
                                    f"{' '.join(str(exc).split())[:160]}",
                                    hint="the file may be damaged") from None


def iter_feature_names(features: dict[str, Any], column: str) -> Iterator[str]:
    """The class names a ``ClassLabel`` feature of ``column`` records (nothing otherwise)."""
    feature = features.get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        names = feature.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            yield from names

