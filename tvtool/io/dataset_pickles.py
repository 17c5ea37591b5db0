"""Dataset files that torchvision unpickles, read here without running code from them.

torchvision's classes read these with ``pickle.load`` or ``torch.load``; tvtool reads the same
files with the restricted unpicklers of :mod:`tvtool.io.unpickle` and checks that each holds
what its dataset's files hold, nothing else:

* CIFAR-10 and CIFAR-100, python version (``data_batch_1`` ... ``test_batch``, ``train``,
  ``test``; ``batches.meta``, ``meta``): plain pickles of a dict holding a uint8 array
  ``data`` of shape (n, 3072) and lists of labels, file names and class names
  (:func:`read_cifar_batch`, :func:`read_cifar_names`);
* MNIST, FashionMNIST, KMNIST and EMNIST as torchvision before 0.9 saved them
  (``processed/training.pt``, ``processed/test.pt``; torchvision still prefers them to the raw
  files): ``torch.save`` of ``(images, labels)`` (:func:`read_mnist_processed`);
* ImageNet's ``meta.bin`` (written by torchvision from the devkit): ``torch.save`` of
  ``(wnid -> class names, validation wnids)`` (:func:`read_imagenet_meta`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvtool.errors import InvalidInputError
from tvtool.io.images import open_regular
from tvtool.io.unpickle import PlainPickleBounds, read_plain_pickle, read_root_file
from tvtool.limits import (
    MAX_DATA_PICKLE_BYTES,
    MAX_DATA_PICKLE_OPS,
    MAX_TEXT_LIST_BYTES,
    short_name,
    short_repr,
)

CIFAR_IMAGE_BYTES = 3 * 32 * 32
"""Bytes of one CIFAR image: 32 × 32 pixels, the red plane, then green, then blue."""

_BATCH_BOUNDS = PlainPickleBounds(MAX_DATA_PICKLE_BYTES, MAX_DATA_PICKLE_OPS)
_NAMES_BOUNDS = PlainPickleBounds(MAX_TEXT_LIST_BYTES, 100_000)

_HINT = "download the dataset again (--download after removing the folder)"


def _bad(message: str) -> InvalidInputError:
    return InvalidInputError(message, hint=_HINT)


@dataclass(frozen=True)
class CifarBatch:
    """One CIFAR batch file.

    Attributes:
        data: ``(n, 3072)`` uint8 images (read-only; rows are channel planes, as stored).
        labels: ``n`` labels (``labels`` in CIFAR-10, ``fine_labels`` in CIFAR-100).
    """

    data: np.ndarray
    labels: list[int]


def _label(path: Path) -> str:
    return short_name(str(path), 200)


def read_cifar_batch(path: Path) -> CifarBatch:
    """Read a CIFAR-10/100 batch file as torchvision's ``CIFAR10`` does, without ``pickle.load``.

    The labels are the entry ``labels``, else ``fine_labels`` (torchvision's rule).

    Raises:
        InvalidInputError: a file that is not such a batch, one line naming it.
    """
    label = _label(path)
    root = read_plain_pickle(path, label, _BATCH_BOUNDS)
    if not isinstance(root, dict):
        raise _bad(f"{label} holds a {type(root).__name__}, not the dict of a CIFAR batch")
    if "data" not in root:
        raise _bad(f"{label} has no 'data' entry; it is not a CIFAR batch")
    data = root["data"]
    if not (isinstance(data, np.ndarray) and data.ndim == 2
            and data.shape[1] == CIFAR_IMAGE_BYTES):
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad(f"{label}: 'data' is {short_repr(shape, 60)}, not uint8 images of shape "
                   f"(n, {CIFAR_IMAGE_BYTES})")
    key = "labels" if "labels" in root else "fine_labels"
    labels = root.get(key)
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise _bad(f"{label}: {key!r} is {short_repr(labels, 60)}, not a list of integer "
                   "labels")
    if len(labels) != data.shape[0]:
        raise _bad(f"{label} holds {data.shape[0]} images and {len(labels)} labels")
    return CifarBatch(data, labels)


def read_cifar_names(path: Path, key: str) -> list[str | bytes]:
    """The class names of a CIFAR meta file, read as torchvision does, without ``pickle.load``.

    ``key`` is ``label_names`` in CIFAR-10's ``batches.meta``, ``fine_label_names`` in
    CIFAR-100's ``meta``.

    Raises:
        InvalidInputError: a file that is not such a meta file, one line naming it.
    """
    label = _label(path)
    root = read_plain_pickle(path, label, _NAMES_BOUNDS)
    if not isinstance(root, dict) or key not in root:
        raise _bad(f"{label} has no {key!r} entry; it is not a CIFAR meta file")
    names = root[key]
    if not (isinstance(names, list) and all(isinstance(n, (str, bytes)) for n in names)):
        raise _bad(f"{label}: {key!r} is {short_repr(names, 60)}, not a list of class names")
    return names


def _read_torch_file(path: Path, label: str, what: str) -> Any:
    """A ``torch.save`` file read by the restricted unpickler; any class it names is refused."""
    try:
        with open_regular(path, what) as handle:
            size = handle.seek(0, 2)
    except FileNotFoundError:
        raise _bad(f"{label} does not exist") from None
    except OSError as exc:
        raise _bad(f"cannot read {label}: {' '.join(str(exc).split())[:120]}") from None
    root, classes = read_root_file(path, label, size)
    if classes:
        raise _bad(f"{label} names {short_name(sorted(classes)[0], 80)}, which {what} never "
                   "holds; tvtool does not run code from data files")
    return root


def read_mnist_processed(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An MNIST-family ``processed/*.pt`` file: ``(uint8 images (n, h, w), labels (n,))``.

    Raises:
        InvalidInputError: a file that is not such a pair, one line naming it.
    """
    label = _label(path)
    root = _read_torch_file(path, label, "a processed MNIST file")
    if not (isinstance(root, (tuple, list)) and len(root) == 2
            and all(isinstance(t, torch.Tensor) for t in root)):
        raise _bad(f"{label} holds {short_repr(root, 60)}, not the (images, labels) tensors "
                   "of a processed MNIST file")
    images, labels = root
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise _bad(f"{label}: the images are {images.dtype} of shape {tuple(images.shape)}, "
                   "not uint8 (n, height, width)")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise _bad(f"{label}: the labels are {labels.dtype} of shape {tuple(labels.shape)}, "
                   "not one integer per image")
    if labels.shape[0] != images.shape[0]:
        raise _bad(f"{label} holds {images.shape[0]} images and {labels.shape[0]} labels")
    return images, labels


def read_imagenet_meta(path: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """ImageNet's ``meta.bin``: ``(wnid -> class names, wnids of the validation images)``.

    Raises:
        InvalidInputError: a file that is not such a pair, one line naming it.
    """
    label = _label(path)
    root = _read_torch_file(path, label, "ImageNet's meta.bin")
    if not (isinstance(root, (tuple, list)) and len(root) == 2):
        raise _bad(f"{label} holds {short_repr(root, 60)}, not ImageNet's (classes, "
                   "validation wnids)")
    classes, val_wnids = root
    if not (isinstance(classes, dict) and all(
            isinstance(k, str) and isinstance(v, tuple) and all(isinstance(n, str) for n in v)
            for k, v in classes.items())):
        raise _bad(f"{label}: the classes are {short_repr(classes, 60)}, not wnid -> names")
    if not (isinstance(val_wnids, list) and all(isinstance(w, str) for w in val_wnids)):
        raise _bad(f"{label}: the validation wnids are {short_repr(val_wnids, 60)}, not a "
                   "list of strings")
    return classes, val_wnids
