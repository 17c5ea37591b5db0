"""``imagefolder:PATH`` datasets: class folders of image files on the local disk.

Two layouts (see docs/data.md):

* ``PATH/train/<class>/...`` plus optional ``PATH/test/<class>/...`` and ``PATH/val/<class>/...``
  (split folders recognised by their common names, any case: ``training``, ``valid``,
  ``validation``, ``testing``, ...);
* ``PATH/<class>/...``: one pool, split deterministically.

A folder named like a split makes the layout a split layout, and then every other folder beside
it is an error, so a misspelt or missing split can never turn into a class. Fewer than two
classes is an error too: accuracy over one class means nothing.

Hidden entries (names starting with ``.``) are ignored everywhere. Every other file inside a
class folder must be a regular image file (a FIFO, socket or device is refused: reading one
could block forever or never end); an empty class folder is an error, never silently dropped.
Folders are followed through symbolic links, each at most once (a link back to a folder already
read is refused, so a loop cannot make the scan endless).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from tvtool.data.base import Pool, TaskSpec
from tvtool.errors import InvalidInputError
from tvtool.io.images import IMAGE_SUFFIXES, file_kind, read_image, read_text_lines
from tvtool.limits import MAX_TEMPLATES, short_list, short_repr

PREFIX = "imagefolder:"
PATH_PREFIXES = (PREFIX, "hf:")
"""Dataset-name prefixes followed by a local path (``hf:`` is :mod:`tvtool.data.hf`'s)."""
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_SPLIT_DIRS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}
"""Folder names (lowercase) recognised as split folders, and the split each one holds."""


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)),
                  key=lambda p: p.name)


def _images_in(class_dir: Path, root: Path) -> list[Path]:
    """Image files under one class folder (recursively), sorted by path.

    Raises:
        InvalidInputError: a non-image file, a file that is not regular (FIFO, socket,
            device), a dangling link, a folder reached twice (a link loop), or no images.
    """
    found: list[Path] = []
    pending = [class_dir]
    start = class_dir.stat()
    visited = {(start.st_dev, start.st_ino)}
    while pending:
        folder = pending.pop()
        for entry in folder.iterdir():
            if not _visible(entry):
                continue
            name = entry.relative_to(root).as_posix()
            try:
                info = entry.stat()  # through links: what a reader would open
            except OSError:
                raise InvalidInputError(
                    f"{name!r} in image folder {str(root)!r} cannot be read (a dangling link?)",
                    hint="remove it, or hide it (name starting with '.')") from None
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in visited:
                    raise InvalidInputError(
                        f"{name!r} in image folder {str(root)!r} leads to a folder already "
                        "read (a symbolic-link loop?)", hint="remove the link")
                visited.add(key)
                pending.append(entry)
            elif not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(
                    f"{name!r} in image folder {str(root)!r} is {file_kind(info.st_mode)}, not "
                    "a regular file",
                    hint="tvtool reads only regular files from image folders; move it out or "
                         "hide it (name starting with '.')")
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                found.append(entry)
            else:
                raise InvalidInputError(
                    f"{name!r} in image folder {str(root)!r} is "
                    f"not an image (known endings: {', '.join(sorted(IMAGE_SUFFIXES))})",
                    hint="move it out of the class folder, or hide it (name starting with '.')",
                )
    if not found:
        raise InvalidInputError(
            f"class folder {class_dir.relative_to(root).as_posix()!r} in {str(root)!r} has no "
            "images", hint="add images or remove the empty folder")
    return sorted(found, key=lambda p: p.as_posix())


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders of ``root`` by split (empty for the single-folder layout).

    Raises:
        InvalidInputError: two folders for one split, split folders without a training
            folder, or other folders beside the split folders.
    """
    found: dict[str, Path] = {}
    others: list[str] = []
    for folder in _class_dirs(root):
        split = SPLIT_NAMES.get(folder.name.lower())
        if split is None:
            others.append(folder.name)
        elif split in found:
            raise InvalidInputError(
                f"image folder {str(root)!r} has two {split} folders: {found[split].name!r} and "
                f"{folder.name!r}", hint="merge them into one folder")
        else:
            found[split] = folder
    if not found:
        return {}
    names = ", ".join(repr(p.name) for p in found.values())
    if "train" not in found:
        raise InvalidInputError(
            f"image folder {str(root)!r} has split folders ({names}) but no training folder",
            hint="put the training images in PATH/train/<class>/ (a split folder is never a "
                 "class: docs/data.md)")
    if others:
        raise InvalidInputError(
            f"image folder {str(root)!r} has {others[0]!r} beside its split folders ({names}); "
            "it is neither a split nor used",
            hint="split folders are train/training, val/valid/validation and test/testing (any "
                 "case); move or hide (leading '.') the others")
    return found


def _normalised(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _read_classnames(listed: Path, folders: list[str]) -> tuple[str, ...]:
    """Class names from ``classnames.txt``, in the label order of ``folders``.

    Either every line is ``folder<TAB>name`` (a mapping, any order), or every line names a
    class folder (``_``/``-``/spaces and case aside; matched by name, any order). A plain list
    of other names is refused: nothing could tell whether it follows the folders' order.

    Raises:
        InvalidInputError: a malformed, incomplete or ambiguous list.
    """
    lines = read_text_lines(listed)
    hint = "write one 'folder<TAB>class name' line per class folder (docs/data.md)"
    if any("\t" in line for line in lines):
        mapping: dict[str, str] = {}
        for line in lines:
            folder, tab, name = line.partition("\t")
            folder, name = folder.strip(), name.strip()
            if not tab or not folder or not name:
                raise InvalidInputError(f"{str(listed)!r}: line {line[:80]!r} is not "
                                        "'folder<TAB>class name'", hint=hint)
            if folder not in folders:
                raise InvalidInputError(f"{str(listed)!r} names folder {folder[:80]!r}, which is "
                                        "not a class folder", hint=hint)
            if folder in mapping:
                raise InvalidInputError(f"{str(listed)!r} names folder {folder[:80]!r} twice",
                                        hint=hint)
            mapping[folder] = name
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise InvalidInputError(f"{str(listed)!r} gives no name for class folder "
                                    f"{missing[0]!r} ({len(missing)} missing)", hint=hint)
        return tuple(mapping[f] for f in folders)
    if len(lines) != len(folders):
        raise InvalidInputError(
            f"{str(listed)!r} lists {len(lines)} class names but there are "
            f"{len(folders)} class folders", hint=hint)
    by_key: dict[str, str] = {}
    for line in lines:
        by_key.setdefault(_normalised(line), line)
    keys = [_normalised(f) for f in folders]
    if len(by_key) == len(lines) and len(set(keys)) == len(keys) and set(keys) == set(by_key):
        return tuple(by_key[k] for k in keys)
    raise InvalidInputError(
        f"{str(listed)!r} lists names that are not the class folders' names, so their order "
        "cannot be checked (a list in another order would mislabel every class)", hint=hint)


def read_templates(root: Path) -> tuple[str, ...]:
    """Prompt templates from ``root/templates.txt``, or :data:`DEFAULT_TEMPLATES` without one.

    Raises:
        InvalidInputError: an empty file, more than :data:`~tvtool.limits.MAX_TEMPLATES`
            lines, or a line without exactly one ``{}`` (or with any other brace).
    """
    listed = root / TEMPLATES_FILE
    if not os.path.lexists(listed):
        return DEFAULT_TEMPLATES
    templates = read_text_lines(listed)
    if len(templates) > MAX_TEMPLATES:
        raise InvalidInputError(
            f"{str(listed)!r} holds {len(templates):,} templates; tvtool uses at most "
            f"{MAX_TEMPLATES:,} (the zero-shot head encodes every class with each)",
            hint="keep the templates that matter; OpenAI's ImageNet ensemble has 80")
    # Exactly one '{}' and no other brace: str.format then only inserts the class name
    # (a field such as '{0:>999999999}' would allocate gigabytes).
    bad = [t for t in templates if t.count("{}") != 1
           or "{" in t.replace("{}", "") or "}" in t.replace("{}", "")]
    if not templates or bad:
        raise InvalidInputError(
            f"{str(listed)!r} must hold templates with exactly one '{{}}' and no other "
            "brace each" + (f"; bad line: {short_repr(bad[0], 60)}" if bad
                            else "; it is empty"),
            hint="e.g. 'a photo of a {}.'")
    return tuple(templates)


def _check_distinct(names: tuple[str, ...], folders: list[str], origin: str) -> None:
    """Refuse two classes with the same name: their zero-shot classes would be identical.

    Names are compared as the text encoders see them, runs of blanks aside.

    Raises:
        InvalidInputError: two folders with one class name.
    """
    seen: dict[str, str] = {}
    for folder, name in zip(folders, names, strict=True):
        key = " ".join(name.split())
        if key in seen:
            raise InvalidInputError(
                f"class folders {short_repr(seen[key], 60)} and {short_repr(folder, 60)} get "
                f"the same class name {short_repr(name, 60)} ({origin}); their zero-shot "
                "classes would be identical and one could never be predicted",
                hint="give every class folder its own name (classnames.txt: docs/data.md)")
        seen[key] = folder


class FilePool:
    """A pool over ``(path, label)`` pairs; images are read when an example is loaded."""

    def __init__(self, root: Path, items: list[tuple[Path, int]]) -> None:
        self._root = root
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.items[index]
        return read_image(path), label

    def member(self, index: int) -> str:
        return self.items[index][0].relative_to(self._root).as_posix()


def scan_class_folders(folder: Path, root: Path, class_order: list[str] | None = None,
                       ) -> tuple[list[str], list[tuple[Path, int]]]:
    """List ``(path, label)`` for every image under the class folders of ``folder``.

    Args:
        folder: Directory whose visible subdirectories are classes.
        root: Dataset root, for messages and relative names.
        class_order: Folder names that define the labels (the training classes); classes of
            ``folder`` must be among them. ``None`` uses ``folder``'s own sorted classes.

    Returns:
        The folder names in label order and the labelled files.

    Raises:
        InvalidInputError: no class folders, an empty class, a non-image file, or a class
            that the training folder does not have.
    """
    dirs = _class_dirs(folder)
    if not dirs:
        raise InvalidInputError(f"{str(folder)!r} has no class folders",
                                hint="expected one sub-folder of images per class")
    names = [d.name for d in dirs]
    order = names if class_order is None else class_order
    unknown = sorted(set(names) - set(order))
    if unknown:
        raise InvalidInputError(
            f"{str(folder)!r} has classes that the training folder lacks: {short_list(unknown, 5)}",
            hint="every class folder of val/ and test/ must also exist under train/")
    label_of = {name: i for i, name in enumerate(order)}
    items = [(path, label_of[d.name]) for d in dirs for path in _images_in(d, root)]
    return list(order), items


class ImageFolderSource:
    """A dataset read from class folders under ``root``."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.split_dirs = _split_folders(root)
        self.layout = "splits" if self.split_dirs else "single"
        top = self.split_dirs["train"] if self.split_dirs else root
        folders = [d.name for d in _class_dirs(top)]
        if not folders:
            raise InvalidInputError(
                f"image folder {str(root)!r} has no class folders",
                hint="use PATH/<class>/<images> or PATH/train/<class>/<images> (docs/data.md)")
        if len(folders) < 2:
            raise InvalidInputError(
                f"image folder {str(top)!r} has only one class folder ({folders[0]!r}); "
                "classification needs at least two classes",
                hint="use PATH/<class>/<images> with one folder per class (docs/data.md)")
        split_named = [f for f in folders if f.lower() in SPLIT_NAMES]
        if split_named:
            raise InvalidInputError(
                f"class folder {split_named[0]!r} in {str(top)!r} is named like a split",
                hint="splits go directly under PATH (PATH/train/<class>/...), never inside a "
                     "split folder")
        self.folders = folders
        self.spec = TaskSpec(name, self._classnames(folders), self._templates())

    def _classnames(self, folders: list[str]) -> tuple[str, ...]:
        listed = self.root / CLASSNAMES_FILE
        if not os.path.lexists(listed):
            names = tuple(f.replace("_", " ") for f in folders)
            _check_distinct(names, folders, "from the folder names")
            return names
        names = _read_classnames(listed, folders)
        _check_distinct(names, folders, f"in {str(listed)!r}")
        return names

    def _templates(self) -> tuple[str, ...]:
        return read_templates(self.root)

    def pools(self) -> Mapping[str, Pool]:
        if self.layout == "single":
            _, items = scan_class_folders(self.root, self.root)
            return {"train": FilePool(self.root, items)}
        pools: dict[str, Pool] = {}
        for split in _SPLIT_DIRS:
            folder = self.split_dirs.get(split)
            if folder is not None:
                _, items = scan_class_folders(folder, self.root, self.folders)
                pools[split] = FilePool(self.root, items)
        return pools

    def describe(self) -> dict[str, Any]:
        present = [s for s in _SPLIT_DIRS if s in self.split_dirs]
        return {"kind": "imagefolder", "layout": self.layout,
                "split_folders": present if self.layout == "splits" else [],
                "classes": list(self.folders)}


def imagefolder_identity(name: str) -> str:
    """``imagefolder:PATH`` / ``hf:PATH`` with PATH made absolute (symbolic links resolved).

    A relative path recorded in a vector would point elsewhere once the vector is used from
    another directory (``merge --search-coef``, ``negate --search``), and two spellings of one
    folder must compare equal (see :func:`tvtool.data.dataset_identity`).
    """
    lowered = name.strip().lower()
    prefix = next((p for p in PATH_PREFIXES if lowered.startswith(p)), None)
    if prefix is None:
        return name
    text = name.strip()[len(prefix):].strip()
    if not text:
        return name
    return prefix + str(Path(text).expanduser().resolve())


def resolve_imagefolder(name: str) -> ImageFolderSource:
    """Resolve ``imagefolder:PATH`` to its source.

    Raises:
        InvalidInputError: the path is missing, not a directory, or has no class folders.
    """
    text = name[len(PREFIX):].strip()
    if not text:
        raise InvalidInputError("imagefolder: needs a path", hint="e.g. imagefolder:./my-data")
    root = Path(text).expanduser()
    if not root.exists():
        raise InvalidInputError(f"image folder {text!r} does not exist")
    if not root.is_dir():
        raise InvalidInputError(f"image folder {text!r} is not a directory")
    return ImageFolderSource(PREFIX + text, root)
