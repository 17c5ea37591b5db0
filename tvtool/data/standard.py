"""The standard task-arithmetic datasets, read from a local data root.

tvtool never downloads unless asked (``download=True``); the data root is the ``data_root``
argument or ``$TVTOOL_DATA_ROOT``. Under it each dataset sits where torchvision puts it, so a
root that torchvision already filled works as it is, or in the layout of the task-vectors code
(mlfoundations/task_vectors: ``EuroSAT_splits/``, ``dtd/train``, ``sun397/train``...), whose
published splits are then used (layouts in docs/data.md).

The 14/20-task datasets (STL10, Flowers102, OxfordIIITPet, PCAM, FER2013, EMNIST, Food101,
FashionMNIST, RenderedSST2, KMNIST) sit where the 14/20-task code (nik-dim/tall_masks) puts
them; FER2013 is that code's hub dataset saved locally (read like ``hf:PATH``).

Names are case-insensitive; ``<name>Val`` (``MNISTVal``...) is the task-vectors validation
variant: its ``test`` split is the published held-out validation set and its ``train`` split
the rest of the training pool.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from tvtool.data import catalog, unpickled
from tvtool.data.base import Pool, TaskSpec
from tvtool.data.hf import hf_pools
from tvtool.data.imagefolder import FilePool, scan_class_folders
from tvtool.errors import InvalidInputError, TvtoolError
from tvtool.io.images import read_image, read_text_lines
from tvtool.limits import short_list

DATA_ROOT_ENV = "TVTOOL_DATA_ROOT"

Builder = Callable[[Path, str, bool], Dataset]
"""``(root, part, download) -> torchvision dataset``; ``part`` is ``train`` or ``test``."""
Reader = Callable[[Path, "StandardDataset"], tuple[str, dict[str, Pool], dict[str, Any]]]
"""``(folder, info) -> (layout, pools, facts)`` for data tvtool reads without torchvision."""


def _tv(name: str) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


# torchvision's CIFAR classes unpickle their files, and its MNIST-family classes and ImageNet
# torch.load some: those datasets are built by tvtool.data.unpickled from the same files.
def _mnist(root: Path, part: str, download: bool) -> Dataset:
    return unpickled.mnist_family("MNIST", root, part == "train", download)


def _cifar10(root: Path, part: str, download: bool) -> Dataset:
    return unpickled.cifar("CIFAR10", root, part == "train", download)


def _cifar100(root: Path, part: str, download: bool) -> Dataset:
    return unpickled.cifar("CIFAR100", root, part == "train", download)


DATASETS_EXTRA = "tvtool[datasets]"
"""The optional-dependency extra that installs what the standard datasets need."""


def _need_scipy(dataset: str) -> None:
    try:
        import scipy.io  # noqa: F401  (torchvision reads .mat files with it)
    except ImportError:
        raise InvalidInputError(f"reading {dataset} needs scipy, which is not installed",
                                hint=f"pip install '{DATASETS_EXTRA}'") from None


def _svhn(root: Path, part: str, download: bool) -> Dataset:
    _need_scipy("SVHN")
    return _tv("SVHN")(str(root / "svhn"), split=part, download=download)


def _gtsrb(root: Path, part: str, download: bool) -> Dataset:
    return _tv("GTSRB")(str(root), split=part, download=download)


def _cars(root: Path, part: str, download: bool) -> Dataset:
    _need_scipy("StanfordCars")
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


def _need_h5py(dataset: str) -> None:
    try:
        import h5py  # noqa: F401  (torchvision reads PCAM's .h5 files with it)
    except ImportError:
        raise InvalidInputError(f"reading {dataset} needs h5py, which is not installed",
                                hint=f"pip install '{DATASETS_EXTRA}'") from None


# The 14/20-task datasets, each where the 14/20-task code (nik-dim/tall_masks) puts it: a
# folder under the data root given to torchvision as its root (torchvision then adds its own
# sub-folder, e.g. stl10/stl10_binary/), with the splits that code reads.
def _stl10(root: Path, part: str, download: bool) -> Dataset:
    return _tv("STL10")(str(root / "stl10"), split=part, download=download)


def _flowers102(root: Path, part: str, download: bool) -> Dataset:
    _need_scipy("Flowers102")
    return _tv("Flowers102")(str(root / "flowers102"), split=part, download=download,
                             loader=read_image)


def _oxford_pets(root: Path, part: str, download: bool) -> Dataset:
    return _tv("OxfordIIITPet")(str(root / "OxfordIIITPet"),
                                split="trainval" if part == "train" else "test",
                                download=download)


def _pcam(root: Path, part: str, download: bool) -> Dataset:
    _need_h5py("PCAM")
    return _tv("PCAM")(str(root / "PCAM"), split=part, download=download)


def _emnist(root: Path, part: str, download: bool) -> Dataset:
    # tall_masks and iso-merging pass DATA_ROOT/EMNIST (files in EMNIST/EMNIST/raw/); the TSV
    # code passes the root itself (EMNIST/raw/). Either works; a download takes the first.
    folder = root / "EMNIST"
    flat = (folder / "raw").is_dir() and not (folder / "EMNIST").is_dir()
    return unpickled.mnist_family("EMNIST", root if flat else folder, part == "train", download,
                                  split="digits")


def _food101(root: Path, part: str, download: bool) -> Dataset:
    return _tv("Food101")(str(root / "food101"), split=part, download=download,
                          loader=read_image)


def _fashion_mnist(root: Path, part: str, download: bool) -> Dataset:
    return unpickled.mnist_family("FashionMNIST", root / "FashionMNIST", part == "train",
                                  download)


def _kmnist(root: Path, part: str, download: bool) -> Dataset:
    return unpickled.mnist_family("KMNIST", root / "KMNIST", part == "train", download)


def _rendered_sst2(root: Path, part: str, download: bool) -> Dataset:
    return _tv("RenderedSST2")(str(root / "RenderedSST2"), split=part, download=download,
                               loader=read_image)


def _fer2013_pools(folder: Path, info: StandardDataset) -> tuple[str, dict[str, Pool],
                                                                  dict[str, Any]]:
    """FER2013 as the 14/20-task code reads it: the hub dataset ``Jeneral/fer-2013``.

    Here it is a local copy under ``FER2013/`` (``save_to_disk``, or its parquet files).
    """
    # The reference opens each image with convert("L").
    return hf_pools(folder, info.name, len(info.classnames), grey=True)


def _imagenet(root: Path, part: str, download: bool) -> Dataset:
    if download:
        raise InvalidInputError("ImageNet cannot be downloaded automatically",
                                hint="place it under DATA_ROOT/imagenet as docs/data.md shows")
    # torchvision's ImageNet calls its held-out 50,000 images "val": that is the test pool.
    return unpickled.imagenet(root / "imagenet", part, read_image)


EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
"""EuroSAT's class folders in label order (sorted; the class names follow the same order)."""


@dataclass(frozen=True)
class PublishedLayout:
    """Where the task-vectors code reads a dataset from (torchvision ``ImageFolder`` folders).

    Attributes:
        folder: Directory under the data root.
        train: Sub-folder of the training set.
        test: Sub-folder the code evaluates on (its ``test_dataset``).
        val: Sub-folder of the ``<name>Val`` variant's held-out set, where the code has one
            (EuroSAT); otherwise that variant splits the training set (see :func:`val_split`).
        class_folders: Class names -> folder names, in label (sorted folder) order.
    """

    folder: str
    train: str
    test: str
    val: str | None
    class_folders: Callable[[tuple[str, ...]], list[str]]


def _sun397_folders(names: tuple[str, ...]) -> list[str]:
    # The prepared SUN397 folders are "<first letter>_<name with underscores>"; the
    # task-vectors code strips the two-character prefix to get the class name.
    return [f"{n[0]}_{n.replace(' ', '_')}" for n in names]


_EUROSAT_LAYOUT = PublishedLayout("EuroSAT_splits", "train", "test", "val",
                                  lambda _: list(EUROSAT_FOLDERS))
# The task-vectors code evaluates DTD and SUN397 on their prepared "val" folders.
_DTD_LAYOUT = PublishedLayout("dtd", "train", "val", None, list)
_SUN397_LAYOUT = PublishedLayout("sun397", "train", "val", None, _sun397_folders)

VAL_FRACTION = 0.1
"""Fraction of the training set the task-vectors code holds out for ``<name>Val``."""
MAX_VAL_SAMPLES = 5000
"""Cap on that held-out set."""
VAL_SEED = 0
"""Seed of ``torch.utils.data.random_split`` in the task-vectors code."""


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
        published: The task-vectors layout, read instead when its training folder exists.
        reader: For data tvtool reads itself from ``DATA_ROOT/folder`` without torchvision
            (``build`` is None): ``(folder, info) -> (layout, pools, facts)``.
        torchvision_names: The reference code takes its class names from the torchvision
            dataset's ``classes``; a dataset on disk whose ``classes`` differ is refused.
        manual: How to place the data by hand where nothing downloads it.
    """

    name: str
    folder: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    parts: tuple[str, ...]
    build: Builder | None
    aliases: tuple[str, ...] = ()
    published: PublishedLayout | None = None
    reader: Reader | None = None
    torchvision_names: bool = False
    manual: str = "download NWPU-RESISC45 by hand and unpack it as docs/data.md shows"


STANDARD: tuple[StandardDataset, ...] = (
    StandardDataset("MNIST", "MNIST", catalog.DIGIT_CLASSNAMES, catalog.NUMBER_TEMPLATES,
                    ("train", "test"), _mnist),
    StandardDataset("SVHN", "svhn", catalog.DIGIT_CLASSNAMES, catalog.NUMBER_TEMPLATES,
                    ("train", "test"), _svhn),
    StandardDataset("GTSRB", "gtsrb", catalog.GTSRB_CLASSNAMES, catalog.GTSRB_TEMPLATES,
                    ("train", "test"), _gtsrb),
    StandardDataset("EuroSAT", "eurosat", catalog.EUROSAT_CLASSNAMES, catalog.EUROSAT_TEMPLATES,
                    ("train",), _eurosat, published=_EUROSAT_LAYOUT),
    StandardDataset("DTD", "dtd", catalog.DTD_CLASSNAMES, catalog.DTD_TEMPLATES,
                    ("train", "test"), _dtd, published=_DTD_LAYOUT),
    StandardDataset("StanfordCars", "stanford_cars", catalog.STANFORD_CARS_CLASSNAMES,
                    catalog.STANFORD_CARS_TEMPLATES, ("train", "test"), _cars,
                    aliases=("cars",)),
    StandardDataset("SUN397", "SUN397", catalog.SUN397_CLASSNAMES, catalog.SUN397_TEMPLATES,
                    ("train",), _sun397, published=_SUN397_LAYOUT),
    StandardDataset("RESISC45", "resisc45", catalog.RESISC45_CLASSNAMES,
                    catalog.RESISC45_TEMPLATES, ("train", "test"), None),
    StandardDataset("CIFAR10", "cifar-10-batches-py", catalog.CIFAR10_CLASSNAMES,
                    catalog.CIFAR_TEMPLATES, ("train", "test"), _cifar10),
    StandardDataset("CIFAR100", "cifar-100-python", catalog.CIFAR100_CLASSNAMES,
                    catalog.CIFAR_TEMPLATES, ("train", "test"), _cifar100,
                    torchvision_names=True),
    # The 14- and 20-task suites (docs/data.md): tall_masks' names, folders and splits.
    StandardDataset("STL10", "stl10", catalog.STL10_CLASSNAMES, catalog.STL10_TEMPLATES,
                    ("train", "test"), _stl10, torchvision_names=True),
    StandardDataset("Flowers102", "flowers102", catalog.FLOWERS102_CLASSNAMES,
                    catalog.FLOWERS102_TEMPLATES, ("train", "test"), _flowers102),
    StandardDataset("OxfordIIITPet", "OxfordIIITPet", catalog.OXFORD_PETS_CLASSNAMES,
                    catalog.OXFORD_PETS_TEMPLATES, ("train", "test"), _oxford_pets,
                    torchvision_names=True),
    StandardDataset("PCAM", "PCAM", catalog.PCAM_CLASSNAMES, catalog.PCAM_TEMPLATES,
                    ("train", "test"), _pcam),
    StandardDataset("FER2013", "FER2013", catalog.FER2013_CLASSNAMES, catalog.FER2013_TEMPLATES,
                    ("train", "test"), None, reader=_fer2013_pools,
                    manual="save the hub dataset Jeneral/fer-2013 into DATA_ROOT/FER2013 "
                           "(save_to_disk, or its parquet files) as docs/data.md shows"),
    StandardDataset("EMNIST", "EMNIST", catalog.DIGIT_CLASSNAMES, catalog.EMNIST_TEMPLATES,
                    ("train", "test"), _emnist, torchvision_names=True),
    StandardDataset("Food101", "food101", catalog.FOOD101_CLASSNAMES, catalog.FOOD101_TEMPLATES,
                    ("train", "test"), _food101, torchvision_names=True),
    StandardDataset("FashionMNIST", "FashionMNIST", catalog.FASHION_MNIST_CLASSNAMES,
                    catalog.FASHION_MNIST_TEMPLATES, ("train", "test"), _fashion_mnist,
                    torchvision_names=True),
    StandardDataset("RenderedSST2", "RenderedSST2", catalog.RENDERED_SST2_CLASSNAMES,
                    catalog.RENDERED_SST2_TEMPLATES, ("train", "test"), _rendered_sst2,
                    torchvision_names=True),
    StandardDataset("KMNIST", "KMNIST", catalog.KMNIST_CLASSNAMES, catalog.KMNIST_TEMPLATES,
                    ("train", "test"), _kmnist, torchvision_names=True),
)
_BY_KEY = {key.lower(): d for d in STANDARD for key in (d.name, *d.aliases)}
IMAGENET = "ImageNet"


def _imagenet_info() -> StandardDataset:
    # Class names and templates are open_clip's zero-shot metadata (read via tvtool.models,
    # the only package that imports open_clip).
    from tvtool.models.zero_shot import imagenet_zero_shot

    classnames, templates = imagenet_zero_shot()
    return StandardDataset(IMAGENET, "imagenet", classnames, templates, ("train", "test"),
                           _imagenet)


def find_standard(name: str) -> StandardDataset | None:
    """Find the standard dataset called ``name`` (case-insensitive, aliases allowed)."""
    key = name.strip().lower()
    if key == IMAGENET.lower():
        return _imagenet_info()
    return _BY_KEY.get(key)


def parse_standard(name: str) -> tuple[StandardDataset, bool] | None:
    """A standard name, or its task-vectors validation variant ``<name>Val``.

    Returns:
        The dataset and whether the ``Val`` variant was named; None for unknown names.
    """
    info = find_standard(name)
    if info is not None:
        return info, False
    text = name.strip()
    if text.lower().endswith("val"):
        base = find_standard(text[: -len("val")])
        if base is not None:
            return base, True
    return None


def val_split(n: int) -> tuple[list[int], list[int]]:
    """The task-vectors ``<name>Val`` split of a training set of ``n`` examples.

    ``torch.utils.data.random_split(train, [n - v, v], generator=Generator().manual_seed(0))``
    with ``v = min(int(0.1 n), 5000)``: one ``randperm`` of ``n``, the first ``n - v`` indices
    for training, the rest held out.

    Returns:
        (training indices, held-out indices), in the permutation's order.

    Raises:
        InvalidInputError: a training set too small to split.
    """
    import torch

    held = min(int(n * VAL_FRACTION), MAX_VAL_SAMPLES)
    if held <= 0 or held >= n:
        raise InvalidInputError(f"a training set of {n} examples is too small for the "
                                "task-vectors validation split (10%)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED)).tolist()
    return order[: n - held], order[n - held:]


class SubsetPool:
    """Some examples of another pool, in a given order."""

    def __init__(self, pool: Pool, indices: Sequence[int]) -> None:
        self._pool = pool
        self._indices = list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self._pool.load(self._indices[index])

    def member(self, index: int) -> str:
        return self._pool.member(self._indices[index])


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
    """A standard dataset under a data root (or its task-vectors ``Val`` variant)."""

    def __init__(self, info: StandardDataset, root: str | os.PathLike[str] | None,
                 download: bool, val_variant: bool = False) -> None:
        self.info = info
        self.val_variant = val_variant
        name = info.name + ("Val" if val_variant else "")
        self.spec = TaskSpec(name, info.classnames, info.templates)
        self._root_arg = root
        self._download = download
        self._layout: str | None = None  # decided by pools()
        self._facts: dict[str, Any] = {}

    def _published_root(self) -> Path | None:
        """The task-vectors folder of this dataset, when it is there."""
        layout = self.info.published
        if layout is None:
            return None
        root = data_root(self._root_arg, self.info.name)
        folder = root / layout.folder
        return folder if (folder / layout.train).is_dir() else None

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
        pools = self._official_pools()
        if not self.val_variant:
            return pools
        layout = self.info.published
        if self._layout == "task_vectors" and layout is not None and layout.val is not None:
            # The code has a prepared folder for it (EuroSATVal evaluates EuroSAT_splits/val).
            return {"train": pools["train"], "test": pools["val"]}
        train, held = val_split(len(pools["train"]))
        return {"train": SubsetPool(pools["train"], train),
                "test": SubsetPool(pools["train"], held)}

    def _official_pools(self) -> dict[str, Pool]:
        published = self._published_root()
        if published is not None and self.info.published is not None:
            self._layout = "task_vectors"
            return _published_pools(published, self.info, self.info.published)
        root = self._location()
        if self.info.reader is not None:
            self._layout, read, self._facts = self.info.reader(root / self.info.folder,
                                                               self.info)
            return read
        if self.info.build is None:
            resisc = dict(_resisc45_pools(root / self.info.folder, self.info))
            self._layout = "task_vectors" if "test" in resisc else "single folder"
            return resisc
        self._layout = "torchvision"
        pools: dict[str, Pool] = {}
        for part in self.info.parts:
            dataset = self._build(root, part)
            classes: Sequence[Any] | None = getattr(dataset, "classes", None)
            if classes is not None and len(classes) != len(self.info.classnames):
                raise InvalidInputError(
                    f"{self.info.name} under {str(root)!r} has {len(classes)} classes, tvtool "
                    f"expects {len(self.info.classnames)}",
                    hint="is it a different version of the dataset?")
            if (self.info.torchvision_names and classes is not None
                    and tuple(classes) != self.info.classnames):
                # The reference prompts with these names: other names are other data.
                first = next(i for i, (a, b) in enumerate(
                    zip(classes, self.info.classnames, strict=True)) if a != b)
                raise InvalidInputError(
                    f"{self.info.name} under {str(root)!r} names class {first} "
                    f"{str(classes[first])[:60]!r}, tvtool expects "
                    f"{self.info.classnames[first][:60]!r}",
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
        except (AssertionError, TypeError, ValueError, KeyError, IndexError,
                struct.error) as exc:
            # torchvision's readers check file headers with assert and raise TypeError or
            # ValueError on a wrong type code or shape (MNIST's idx files): damaged data is
            # invalid input, not a bug of tvtool.
            what = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InvalidInputError(
                f"{self.info.name} under {str(root / self.info.folder)!r} holds a damaged "
                f"file: {what}",
                hint="download the dataset again (--download after removing the folder)",
            ) from None

    def describe(self) -> dict[str, Any]:
        """Where the data came from, and whether each split is the published one."""
        if self._layout is None:  # pools() not called yet: decide from the folders present
            try:
                found = self._published_root() is not None
            except InvalidInputError:
                found = False
            self._layout = "task_vectors" if found else (
                "torchvision" if self.info.build is not None
                else "hf" if self.info.reader is not None else "resisc45")
        published = self._layout == "task_vectors" or (
            self._layout == "torchvision" and self.info.name in _TORCHVISION_PUBLISHED) or (
            self.info.reader is not None)  # FER2013: the hub dataset the reference loads
        folder = (self.info.published.folder if self.info.published is not None
                  and self._layout == "task_vectors" else self.info.folder)
        record = {"kind": "standard", "dataset": self.spec.name, "folder": folder,
                  "layout": self._layout, "official_parts": list(self.info.parts),
                  "val_variant": self.val_variant,
                  "published_test_split": published,
                  "published_train_split": published}
        return {**record, **({"columns": self._facts} if self._facts else {})}


# Datasets the task-vectors code reads through torchvision (or the same files), so the
# torchvision layout gives the published train and test sets.
_TORCHVISION_PUBLISHED = frozenset({"MNIST", "SVHN", "GTSRB", "StanfordCars", "CIFAR10",
                                    "CIFAR100", IMAGENET,
                                    # the 14/20-task code reads these through torchvision
                                    "STL10", "Flowers102", "OxfordIIITPet", "PCAM", "EMNIST",
                                    "Food101", "FashionMNIST", "RenderedSST2", "KMNIST"})


def _published_pools(folder: Path, info: StandardDataset, layout: PublishedLayout
                     ) -> dict[str, Pool]:
    """The task-vectors ``ImageFolder`` layout: labels are the sorted class folders."""
    order = layout.class_folders(info.classnames)
    if order != sorted(order):
        raise AssertionError(f"{info.name}: class folders must be listed in sorted order")
    parts = [("train", layout.train), ("test", layout.test)]
    if layout.val is not None:
        parts.append(("val", layout.val))
    pools: dict[str, Pool] = {}
    for part, sub in parts:
        directory = folder / sub
        if not directory.is_dir():
            raise InvalidInputError(
                f"{info.name} in the task-vectors layout needs {str(directory)!r}",
                hint=f"the task-vectors code reads its {part} set there (docs/data.md)")
        present = {p.name for p in directory.iterdir() if p.is_dir() and
                   not p.name.startswith(".")}
        missing = sorted(set(order) - present)
        if part == "train" and missing:
            # ImageFolder numbers the classes it finds: a missing folder shifts every label.
            raise InvalidInputError(
                f"{info.name} under {str(directory)!r} lacks class folders "
                f"{short_list(missing, 5)}",
                hint=f"expected the {len(order)} folders of the prepared dataset (docs/data.md)")
        _, items = scan_class_folders(directory, folder, order)
        pools[part] = FilePool(folder, items)
    return pools


def _resisc45_pools(folder: Path, info: StandardDataset) -> Mapping[str, Pool]:
    """RESISC45 from ``resisc45/NWPU-RESISC45/<class>/*.jpg``.

    With the split lists of the task-vectors setup (``resisc45-{train,val,test}.txt`` beside
    the image folder), each list is a pool, as the task-vectors code reads them; without them
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
                                f"{short_list(missing, 5)}", hint="is the archive fully unpacked?")
    _, items = scan_class_folders(images, folder, order)
    lists = {part: folder / f"resisc45-{part}.txt" for part in ("train", "val", "test")}
    if not all(p.is_file() for p in lists.values()):
        return {"train": FilePool(folder, items)}
    wanted = {part: set(read_text_lines(path)) for part, path in lists.items()}
    # The code keeps a file when its base name is listed (ImageFolder's is_valid_file).
    return {part: FilePool(folder, [it for it in items if it[0].name in names])
            for part, names in wanted.items()}
