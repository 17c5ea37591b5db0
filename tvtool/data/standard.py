"""The standard task-arithmetic datasets, read from a local data root.

tvtool never downloads unless asked (``download=True``); the data root is the ``data_root``
argument or ``$TVTOOL_DATA_ROOT``. Under it each dataset sits where torchvision puts it, so a
root that torchvision already filled works as it is (layout in docs/data.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from tvtool.data import catalog
from tvtool.data.base import Pool, TaskSpec
from tvtool.data.imagefolder import FilePool, scan_class_folders
from tvtool.errors import InvalidInputError, TvtoolError
from tvtool.io.images import read_image, read_text_lines

DATA_ROOT_ENV = "TVTOOL_DATA_ROOT"

Builder = Callable[[Path, str, bool], Dataset]
"""``(root, part, download) -> torchvision dataset``; ``part`` is ``train`` or ``test``."""


def _tv(name: str) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def _mnist(root: Path, part: str, download: bool) -> Dataset:
    return _tv("MNIST")(str(root), train=part == "train", download=download)


def _cifar10(root: Path, part: str, download: bool) -> Dataset:
    return _tv("CIFAR10")(str(root), train=part == "train", download=download)


def _cifar100(root: Path, part: str, download: bool) -> Dataset:
    return _tv("CIFAR100")(str(root), train=part == "train", download=download)


def _svhn(root: Path, part: str, download: bool) -> Dataset:
    try:
        import scipy.io  # noqa: F401  (torchvision reads SVHN's .mat files with it)
    except ImportError:
        raise InvalidInputError("reading SVHN needs scipy",
                                hint="pip install scipy") from None
    return _tv("SVHN")(str(root / "svhn"), split=part, download=download)


def _gtsrb(root: Path, part: str, download: bool) -> Dataset:
    return _tv("GTSRB")(str(root), split=part, download=download)


def _cars(root: Path, part: str, download: bool) -> Dataset:
    return _tv("StanfordCars")(str(root), split=part, download=download, loader=read_image)


def _dtd(root: Path, part: str, download: bool) -> Dataset:
    dtd = _tv("DTD")
    if part == "test":
        return dtd(str(root), split="test", download=download, loader=read_image)
    # The official train and val partitions together form the training pool, as in the
    # task-vectors setup; tvtool carves its own val from it.
    return ConcatDataset([dtd(str(root), split=s, download=download, loader=read_image)
                          for s in ("train", "val")])


def _eurosat(root: Path, part: str, download: bool) -> Dataset:
    return _tv("EuroSAT")(str(root), download=download, loader=read_image)


def _sun397(root: Path, part: str, download: bool) -> Dataset:
    return _tv("SUN397")(str(root), download=download, loader=read_image)


@dataclass(frozen=True)
class StandardDataset:
    """A standard dataset tvtool knows by name.

    Attributes:
        name: Canonical name.
        folder: Directory under the data root that must exist (where torchvision looks).
        classnames: CLIP class names in label order.
        templates: CLIP prompt templates.
        parts: Official parts read from disk (``("train", "test")`` or ``("train",)``).
        build: Constructor of the torchvision dataset (``None``: tvtool reads the files).
        aliases: Other accepted spellings (matched case-insensitively).
    """

    name: str
    folder: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    parts: tuple[str, ...]
    build: Builder | None
    aliases: tuple[str, ...] = ()


STANDARD: tuple[StandardDataset, ...] = (
    StandardDataset("MNIST", "MNIST", catalog.DIGIT_CLASSNAMES, catalog.NUMBER_TEMPLATES,
                    ("train", "test"), _mnist),
    StandardDataset("SVHN", "svhn", catalog.DIGIT_CLASSNAMES, catalog.NUMBER_TEMPLATES,
                    ("train", "test"), _svhn),
    StandardDataset("GTSRB", "gtsrb", catalog.GTSRB_CLASSNAMES, catalog.GTSRB_TEMPLATES,
                    ("train", "test"), _gtsrb),
    StandardDataset("EuroSAT", "eurosat", catalog.EUROSAT_CLASSNAMES, catalog.EUROSAT_TEMPLATES,
                    ("train",), _eurosat),
    StandardDataset("DTD", "dtd", catalog.DTD_CLASSNAMES, catalog.DTD_TEMPLATES,
                    ("train", "test"), _dtd),
    StandardDataset("StanfordCars", "stanford_cars", catalog.STANFORD_CARS_CLASSNAMES,
                    catalog.STANFORD_CARS_TEMPLATES, ("train", "test"), _cars,
                    aliases=("cars",)),
    StandardDataset("SUN397", "SUN397", catalog.SUN397_CLASSNAMES, catalog.SUN397_TEMPLATES,
                    ("train",), _sun397),
    StandardDataset("RESISC45", "resisc45", catalog.RESISC45_CLASSNAMES,
                    catalog.RESISC45_TEMPLATES, ("train", "test"), None),
    StandardDataset("CIFAR10", "cifar-10-batches-py", catalog.CIFAR10_CLASSNAMES,
                    catalog.CIFAR_TEMPLATES, ("train", "test"), _cifar10),
    StandardDataset("CIFAR100", "cifar-100-python", catalog.CIFAR100_CLASSNAMES,
                    catalog.CIFAR_TEMPLATES, ("train", "test"), _cifar100),
)
_BY_KEY = {key.lower(): d for d in STANDARD for key in (d.name, *d.aliases)}


def find_standard(name: str) -> StandardDataset | None:
    """Find the standard dataset called ``name`` (case-insensitive, aliases allowed)."""
    return _BY_KEY.get(name.strip().lower())


def data_root(explicit: str | os.PathLike[str] | None, dataset: str) -> Path:
    """Locate the data root: the argument, else ``$TVTOOL_DATA_ROOT``.

    Raises:
        InvalidInputError: neither is set, or the root is not a directory.
    """
    text = os.fspath(explicit) if explicit is not None else os.environ.get(DATA_ROOT_ENV, "")
    if not text:
        raise InvalidInputError(
            f"{dataset} is read from a local data root, but none was given",
            hint=f"pass --data-root DIR (data_root=...) or set {DATA_ROOT_ENV}; "
                 "layout in docs/data.md")
    root = Path(text).expanduser()
    if not root.is_dir():
        raise InvalidInputError(f"data root {text!r} is not a directory",
                                hint=f"create it and put {dataset} under it (docs/data.md)")
    return root


class TorchvisionPool:
    """A pool over a torchvision dataset whose items are ``(PIL image, label)``."""

    def __init__(self, dataset: Dataset, label: str) -> None:
        self._dataset = dataset
        self._label = label

    def __len__(self) -> int:
        return len(self._dataset)  # type: ignore[arg-type]

    def load(self, index: int) -> tuple[Image.Image, int]:
        try:
            image, label = self._dataset[index]
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{self._label}: cannot read example {index}: {exc}",
                                    hint="the dataset files may be damaged") from None
        if not isinstance(image, Image.Image):
            raise InvalidInputError(f"{self._label}: example {index} is not an image")
        return (image if image.mode == "RGB" else image.convert("RGB")), int(label)

    def member(self, index: int) -> str:
        return str(index)


class StandardSource:
    """A standard dataset under a data root."""

    def __init__(self, info: StandardDataset, root: str | os.PathLike[str] | None,
                 download: bool) -> None:
        self.info = info
        self.spec = TaskSpec(info.name, info.classnames, info.templates)
        self._root_arg = root
        self._download = download

    def _location(self) -> Path:
        root = data_root(self._root_arg, self.info.name)
        expected = root / self.info.folder
        if not self._download and not expected.is_dir():
            raise InvalidInputError(
                f"{self.info.name} not found: expected directory {str(expected)!r}",
                hint=f"put {self.info.name} there (layout in docs/data.md) or pass download=True"
                     " (--download) where the network allows")
        return root

    def pools(self) -> Mapping[str, Pool]:
        root = self._location()
        if self.info.build is None:
            return _resisc45_pools(root / self.info.folder, self.info)
        pools: dict[str, Pool] = {}
        for part in self.info.parts:
            dataset = self._build(root, part)
            classes: Sequence[Any] | None = getattr(dataset, "classes", None)
            if classes is not None and len(classes) != len(self.info.classnames):
                raise InvalidInputError(
                    f"{self.info.name} under {str(root)!r} has {len(classes)} classes, tvtool "
                    f"expects {len(self.info.classnames)}",
                    hint="is it a different version of the dataset?")
            pools[part] = TorchvisionPool(dataset, self.info.name)
        return pools

    def _build(self, root: Path, part: str) -> Dataset:
        assert self.info.build is not None
        try:
            return self.info.build(root, part, self._download)
        except RuntimeError as exc:
            raise InvalidInputError(
                f"{self.info.name} under {str(root / self.info.folder)!r} is missing or "
                f"incomplete: {' '.join(str(exc).split())[:200]}",
                hint="check the layout in docs/data.md, or pass download=True (--download)",
            ) from None
        except OSError as exc:
            raise TvtoolError(f"could not read or download {self.info.name}: {exc}",
                              hint="check the network, disk space and permissions") from None

    def describe(self) -> dict[str, Any]:
        return {"kind": "standard", "dataset": self.info.name, "folder": self.info.folder,
                "official_parts": list(self.info.parts)}


def _resisc45_pools(folder: Path, info: StandardDataset) -> Mapping[str, Pool]:
    """RESISC45 from ``resisc45/NWPU-RESISC45/<class>/*.jpg``.

    With the split lists of the task-vectors setup (``resisc45-{train,val,test}.txt`` beside
    the image folder), train+val form the training pool and test the test pool; without them
    the whole set is one pool and tvtool carves a test split.
    """
    images = folder / "NWPU-RESISC45"
    if not images.is_dir():
        raise InvalidInputError(f"RESISC45 not found: expected directory {str(images)!r}",
                                hint="unpack NWPU-RESISC45 there (docs/data.md)")
    # Folder names are the class names with underscores, and sorted folders give the labels.
    order = [n.replace(" ", "_") for n in info.classnames]
    missing = sorted(set(order) - {p.name for p in images.iterdir() if p.is_dir()})
    if missing:
        raise InvalidInputError(f"RESISC45 under {str(images)!r} lacks class folders "
                                f"{missing[:5]}", hint="is the archive fully unpacked?")
    _, items = scan_class_folders(images, folder, order)
    lists = {part: folder / f"resisc45-{part}.txt" for part in ("train", "val", "test")}
    if not all(p.is_file() for p in lists.values()):
        return {"train": FilePool(folder, items)}
    wanted = {part: set(read_text_lines(path)) for part, path in lists.items()}
    train = [it for it in items if it[0].name in wanted["train"] | wanted["val"]]
    test = [it for it in items if it[0].name in wanted["test"]]
    return {"train": FilePool(folder, train), "test": FilePool(folder, test)}
