"""The standard datasets whose torchvision classes unpickle files, built without unpickling.

torchvision's ``CIFAR10``/``CIFAR100`` read their batch files with ``pickle.load``, which runs
whatever code a pickle names; ``MNIST``, ``FashionMNIST``, ``KMNIST`` and ``EMNIST`` read the
``processed/*.pt`` files of torchvision < 0.9 with ``torch.load`` when they are there (before
the raw files), and ``ImageNet`` reads its ``meta.bin`` with ``torch.load``: ``weights_only``
loads, which torch < 2.6 (CVE-2025-32434) and < 2.10 (CVE-2026-24747) did not keep from
running code. Here the same files are read by :mod:`tvtool.io.dataset_pickles` instead, and
the datasets give exactly the images and labels torchvision's classes give:

* CIFAR: the files torchvision would read, after torchvision's own md5 check of each
  (``torchvision.datasets.cifar.check_integrity`` with the md5 sums of its classes), so the
  same files are accepted; images ``np.vstack(data).reshape(-1, 3, 32, 32)`` in HWC order,
  labels ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100), class names from the meta file;
* MNIST and its kin: the processed files when torchvision would read them (the processed
  folder exists and holds both files), else torchvision's class itself, which then reads
  the raw idx files (no pickle);
* ImageNet: torchvision's own steps (the devkit parsed into ``meta.bin`` where it is
  missing, an archive unpacked where a split folder is missing), then ``meta.bin`` read here
  and the split folder read by ``ImageFolder``, as ``ImageNet`` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tvtool.errors import InvalidInputError
from tvtool.io.dataset_pickles import (
    read_cifar_batch,
    read_cifar_names,
    read_imagenet_meta,
    read_mnist_processed,
)

_HINT = "download the dataset again (--download after removing the folder)"


class ArrayImages(Dataset):
    """Images held in a uint8 array, with integer labels (torchvision's CIFAR and MNIST items).

    Attributes:
        data: ``(n, height, width, 3)`` (RGB) or ``(n, height, width)`` (greyscale) uint8.
        targets: ``n`` labels.
        classes: The class names the files gave.
    """

    def __init__(self, data: Any, targets: Sequence[int] | Any, classes: Sequence[Any]) -> None:
        self.data = data
        self.targets = targets
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        # What torchvision's CIFAR10 and MNIST do: Image.fromarray of the row (RGB for
        # (h, w, 3), "L" for (h, w) uint8), and the label as an int.
        return Image.fromarray(np.asarray(self.data[index])), int(self.targets[index])


def _check_labels(labels: Any, count: int, what: str) -> None:
    """Every label names one of ``count`` classes (torchvision does not check this)."""
    values = np.asarray(labels)
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= count:
        bad = low if low < 0 else high
        raise InvalidInputError(f"{what} holds the label {bad}, but its meta data names "
                                f"{count} classes", hint=_HINT)


def cifar(name: str, root: Path, train: bool, download: bool) -> ArrayImages:
    """CIFAR10 or CIFAR100 under ``root`` as torchvision's class gives it, read without pickle.

    Args:
        name: ``CIFAR10`` or ``CIFAR100`` (the torchvision class whose files are read).
        root: The directory torchvision's class is given (it holds ``cls.base_folder``).
        train: The training batches, else the test batch.
        download: Fetch the archive first where a file is missing or damaged (torchvision's
            downloader, as its class does).

    Raises:
        InvalidInputError: a missing or altered file (md5), or one that is not what it should
            be; nothing in it is run.
    """
    import torchvision.datasets.cifar as tv

    cls = getattr(tv, name)
    folder = root / cls.base_folder
    if download and not all(tv.check_integrity(str(folder / file), md5)
                            for file, md5 in cls.train_list + cls.test_list):
        tv.download_and_extract_archive(cls.url, str(root), filename=cls.filename,
                                        md5=cls.tgz_md5)
    files = cls.train_list if train else cls.test_list
    meta = (cls.meta["filename"], cls.meta["md5"])
    for file, md5 in [*files, meta]:
        # torchvision's own check of the files it reads: only the published files pass.
        if not tv.check_integrity(str(folder / file), md5):
            raise InvalidInputError(
                f"{name} under {str(folder)!r}: {file} is missing or is not the published "
                "file (its md5 sum differs)",
                hint="download=True (--download) fetches the dataset again where the network "
                     "allows")
    batches = [read_cifar_batch(folder / file) for file, _ in files]
    classes = read_cifar_names(folder / meta[0], cls.meta["key"])
    targets = [label for batch in batches for label in batch.labels]
    _check_labels(targets, len(classes), f"{name} under {str(folder)!r}")
    data = np.vstack([batch.data for batch in batches]).reshape(-1, 3, 32, 32)
    return ArrayImages(data.transpose((0, 2, 3, 1)), targets, classes)  # CHW rows -> HWC


def mnist_family(name: str, root: Path, train: bool, download: bool,
                 split: str | None = None) -> Dataset:
    """MNIST, FashionMNIST, KMNIST or EMNIST (``split``) as torchvision's class gives it.

    Where torchvision would read the processed files of torchvision < 0.9 (``torch.load``),
    they are read here without unpickling; otherwise torchvision's class reads the raw idx
    files (and downloads them when asked).

    Args:
        name: The torchvision class.
        root: The directory torchvision's class is given (it holds ``name/processed``).
        train: The training set, else the test set.
        download: Passed to torchvision's class when it reads the raw files.
        split: EMNIST's split.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    if split is not None:
        files = (cls._training_file(split), cls._test_file(split))
        classes = cls.classes_split_dict[split]
    else:
        files = (cls.training_file, cls.test_file)
        classes = cls.classes
    processed = root / name / "processed"
    # torchvision's _check_legacy_exist: the folder exists and holds both files.
    if processed.exists() and all((processed / f).is_file() for f in files):
        path = processed / files[0 if train else 1]
        images, labels = read_mnist_processed(path)
        _check_labels(labels, len(classes), repr(str(path)))
        return ArrayImages(images.numpy(), labels, classes)
    extra = {} if split is None else {"split": split}
    return cls(str(root), train=train, download=download, **extra)


def imagenet(folder: Path, part: str, loader: Callable[[str], Any]) -> Dataset:
    """ImageNet as torchvision's ``ImageNet`` gives it, ``meta.bin`` read without unpickling.

    Args:
        folder: torchvision's ImageNet root (``meta.bin``, ``train/``, ``val/``, archives).
        part: ``train``, else the held-out ``val`` split.
        loader: Reads one image file.
    """
    import torchvision.datasets as tvd
    import torchvision.datasets.imagenet as tv

    split = "train" if part == "train" else "val"
    meta = folder / tv.META_FILE
    if not tv.check_integrity(str(meta)):
        tv.parse_devkit_archive(str(folder))  # writes meta.bin from the devkit's .mat files
    wnid_to_classes, val_wnids = read_imagenet_meta(meta)
    split_folder = folder / split
    if not split_folder.is_dir():
        if split == "train":
            tv.parse_train_archive(str(folder))
        else:
            tv.parse_val_archive(str(folder), wnids=val_wnids)
    dataset = tvd.ImageFolder(os.fspath(split_folder), loader=loader)
    missing = [w for w in dataset.classes if w not in wnid_to_classes]
    if missing:
        raise InvalidInputError(
            f"ImageNet under {str(folder)!r}: class folder {missing[0][:40]!r} is not in "
            f"{tv.META_FILE}", hint=_HINT)
    dataset.classes = [wnid_to_classes[w] for w in dataset.classes]
    return dataset
