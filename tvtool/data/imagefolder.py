"""``imagefolder:PATH`` datasets: class folders of image files on the local disk.

Two layouts (see docs/data.md):

* ``PATH/train/<class>/...`` plus optional ``PATH/test/<class>/...`` and ``PATH/val/<class>/...``;
* ``PATH/<class>/...``: one pool, split deterministically.

Hidden entries (names starting with ``.``) are ignored everywhere. Every other file inside a
class folder must be an image; an empty class folder is an error, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from tvtool.data.base import Pool, TaskSpec
from tvtool.errors import InvalidInputError
from tvtool.io.images import IMAGE_SUFFIXES, read_image, read_text_lines

PREFIX = "imagefolder:"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_SPLIT_DIRS = ("train", "val", "test")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)),
                  key=lambda p: p.name)


def _images_in(class_dir: Path, root: Path) -> list[Path]:
    """Image files under one class folder (recursively), sorted by path."""
    found: list[Path] = []
    pending = [class_dir]
    while pending:
        folder = pending.pop()
        for entry in folder.iterdir():
            if not _visible(entry):
                continue
            if entry.is_dir():
                pending.append(entry)
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                found.append(entry)
            else:
                raise InvalidInputError(
                    f"{entry.relative_to(root).as_posix()!r} in image folder {str(root)!r} is "
                    f"not an image (known endings: {', '.join(sorted(IMAGE_SUFFIXES))})",
                    hint="move it out of the class folder, or hide it (name starting with '.')",
                )
    if not found:
        raise InvalidInputError(
            f"class folder {class_dir.relative_to(root).as_posix()!r} in {str(root)!r} has no "
            "images", hint="add images or remove the empty folder")
    return sorted(found, key=lambda p: p.as_posix())


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
            f"{str(folder)!r} has classes that the training folder lacks: {unknown[:5]}",
            hint="every class folder of val/ and test/ must also exist under train/")
    label_of = {name: i for i, name in enumerate(order)}
    items = [(path, label_of[d.name]) for d in dirs for path in _images_in(d, root)]
    return list(order), items


class ImageFolderSource:
    """A dataset read from class folders under ``root``."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.layout = "splits" if (root / "train").is_dir() else "single"
        top = root / "train" if self.layout == "splits" else root
        folders = [d.name for d in _class_dirs(top)] if top.is_dir() else []
        if not folders:
            raise InvalidInputError(
                f"image folder {str(root)!r} has no class folders",
                hint="use PATH/<class>/<images> or PATH/train/<class>/<images> (docs/data.md)")
        self.folders = folders
        self.spec = TaskSpec(name, self._classnames(folders), self._templates())

    def _classnames(self, folders: list[str]) -> tuple[str, ...]:
        listed = self.root / CLASSNAMES_FILE
        if not listed.is_file():
            return tuple(f.replace("_", " ") for f in folders)
        names = read_text_lines(listed)
        if len(names) != len(folders):
            raise InvalidInputError(
                f"{str(listed)!r} lists {len(names)} class names but there are "
                f"{len(folders)} class folders",
                hint="one name per line, in the sorted order of the class folders")
        return tuple(names)

    def _templates(self) -> tuple[str, ...]:
        listed = self.root / TEMPLATES_FILE
        if not listed.is_file():
            return DEFAULT_TEMPLATES
        templates = read_text_lines(listed)
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise InvalidInputError(
                f"{str(listed)!r} must hold templates with exactly one '{{}}' each"
                + (f"; bad line: {bad[0]!r}" if bad else "; it is empty"),
                hint="e.g. 'a photo of a {}.'")
        return tuple(templates)

    def pools(self) -> Mapping[str, Pool]:
        if self.layout == "single":
            _, items = scan_class_folders(self.root, self.root)
            return {"train": FilePool(self.root, items)}
        pools: dict[str, Pool] = {}
        for split in _SPLIT_DIRS:
            folder = self.root / split
            if folder.is_dir():
                _, items = scan_class_folders(folder, self.root, self.folders)
                pools[split] = FilePool(self.root, items)
        return pools

    def describe(self) -> dict[str, Any]:
        present = [s for s in _SPLIT_DIRS if (self.root / s).is_dir()]
        return {"kind": "imagefolder", "layout": self.layout,
                "split_folders": present if self.layout == "splits" else [],
                "classes": list(self.folders)}


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
