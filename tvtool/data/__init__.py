"""Dataset registry: synthetic world tasks, image folders, standard datasets from a local root.

Public API:

* :func:`task_spec` -- class names and prompt templates of a dataset (:class:`TaskSpec`).
* :func:`load_split` -- a torch ``Dataset`` of ``(transform(image), label)`` for one split.
* :func:`split_manifest` -- JSON-able record of a split (counts and member hashes).
* :func:`list_datasets` -- the names tvtool knows (plus ``imagefolder:PATH`` and ``hf:PATH``).
* :data:`SUITES`, :func:`suite_datasets`, :func:`with_suite`, :func:`match_suite` -- the named
  8/14/20-task suites (``--suite``).

Dataset names: ``synthetic:<task>``, ``imagefolder:PATH``, ``hf:PATH`` (a Hugging Face dataset
saved on the local disk), or a standard name (``MNIST``, ``SVHN``, ``GTSRB``, ``EuroSAT``,
``DTD``, ``StanfordCars``/``Cars``, ``SUN397``, ``RESISC45``, ``CIFAR10``, ``CIFAR100``,
``ImageNet``, and the 14/20-task ``STL10``, ``Flowers102``, ``OxfordIIITPet``, ``PCAM``,
``FER2013``, ``EMNIST``, ``Food101``, ``FashionMNIST``, ``RenderedSST2``, ``KMNIST``;
case-insensitive), or the task-vectors validation variant ``<name>Val`` of one (``MNISTVal``).
See docs/data.md.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

from tvtool import __version__
from tvtool.data.base import Pool, Source, SplitDataset, TaskSpec, Transform
from tvtool.data.hf import PREFIX as HF_PREFIX
from tvtool.data.hf import resolve_hf
from tvtool.data.imagefolder import PATH_PREFIXES, imagefolder_identity, resolve_imagefolder
from tvtool.data.imagefolder import PREFIX as IMAGEFOLDER_PREFIX
from tvtool.data.splits import (
    MANIFEST_FORMAT,
    SPLITS,
    TEST_FRACTION,
    Split,
    members_hash,
    plan_splits,
)
from tvtool.data.standard import (
    DATA_ROOT_ENV,
    IMAGENET,
    STANDARD,
    StandardSource,
    parse_standard,
)
from tvtool.data.suites import SUITES, match_suite, suite_datasets, with_suite
from tvtool.data.synthetic import PREFIX as SYNTHETIC_PREFIX
from tvtool.data.synthetic import resolve_synthetic, synthetic_names
from tvtool.errors import InvalidInputError

__all__ = [
    "DATA_ROOT_ENV",
    "SPLITS",
    "SUITES",
    "Split",
    "SplitDataset",
    "TaskSpec",
    "data_source",
    "dataset_identity",
    "download",
    "list_datasets",
    "load_split",
    "match_suite",
    "recorded_dataset_name",
    "split_manifest",
    "suite_datasets",
    "task_spec",
    "with_suite",
]

PathLike = str | os.PathLike[str]


def list_datasets() -> list[str]:
    """Names of the datasets tvtool knows: standard ones, then ``synthetic:<task>``.

    ``imagefolder:PATH`` is accepted too but, being open-ended, is not listed; nor are the
    task-vectors validation variants ``<name>Val`` of the standard names.
    """
    return [d.name for d in STANDARD] + [IMAGENET] + synthetic_names()


def dataset_identity(name: str) -> str:
    """The one spelling of a dataset: what every comparison of dataset names compares.

    ``imagefolder:PATH`` gets its absolute path (so ``imagefolder:./data`` typed here equals the
    ``imagefolder:/home/me/data`` a vector recorded), ``synthetic:`` tasks and standard names
    their canonical case (``mnist`` -> ``MNIST``, ``cars`` -> ``StanfordCars``, ``mnistval``
    -> ``MNISTVal``). Reads no data (a path is only resolved); a name tvtool does not know is
    returned stripped, so references to it still compare.

    Args:
        name: A dataset name as typed or as recorded in a file or report.
    """
    text = name.strip()
    lowered = text.lower()
    if lowered.startswith(SYNTHETIC_PREFIX):
        return SYNTHETIC_PREFIX + text[len(SYNTHETIC_PREFIX):].strip().lower()
    if lowered.startswith(PATH_PREFIXES):
        return imagefolder_identity(text)
    found = parse_standard(text)
    if found is not None:
        return found[0].name + ("Val" if found[1] else "")
    return text


def recorded_dataset_name(name: str) -> str:
    """The form of a dataset name recorded in a file: its :func:`dataset_identity`."""
    return dataset_identity(name)


def _resolve(name: str, data_root: PathLike | None, download: bool = False) -> Source:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("empty dataset name", hint="e.g. synthetic:shape or MNIST")
    text = name.strip()
    lowered = text.lower()
    if lowered.startswith(SYNTHETIC_PREFIX):
        return resolve_synthetic(text)
    if lowered.startswith(IMAGEFOLDER_PREFIX):
        return resolve_imagefolder(IMAGEFOLDER_PREFIX + text[len(IMAGEFOLDER_PREFIX):])
    if lowered.startswith(HF_PREFIX):
        return resolve_hf(HF_PREFIX + text[len(HF_PREFIX):])
    found = parse_standard(text)
    if found is not None:
        return StandardSource(found[0], data_root, download, val_variant=found[1])
    close = difflib.get_close_matches(text, list_datasets(), n=3, cutoff=0.5)
    raise InvalidInputError(
        f"unknown dataset {text!r}",
        hint=(f"did you mean {', '.join(close)}? " if close else "")
        + "`tvtool datasets` lists the names; imagefolder:PATH reads your own images",
    )


def task_spec(name: str, data_root: PathLike | None = None) -> TaskSpec:
    """Class names and zero-shot templates of a dataset.

    Reads nothing for standard and synthetic datasets; for ``imagefolder:PATH`` it lists the
    class folders (and reads ``classnames.txt`` / ``templates.txt`` where present).

    Args:
        name: Dataset name.
        data_root: Local data root (standard datasets); unused otherwise.

    Raises:
        InvalidInputError: unknown name, or an image folder that cannot be used.
    """
    return _resolve(name, data_root).spec


def _plan(source: Source, seed: int, val_fraction: float
          ) -> tuple[dict[str, Pool], dict[Split, Any]]:
    pools = dict(source.pools())
    sizes = {pool_name: len(pool) for pool_name, pool in pools.items()}
    return pools, plan_splits(sizes, seed, val_fraction, source.spec.name)


def load_split(
    name: str,
    split: Split,
    transform: Transform | None = None,
    data_root: PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> SplitDataset:
    """One split of a dataset as a torch ``Dataset``.

    ``dataset[i]`` is ``(transform(image), label)`` with an RGB ``PIL.Image`` passed to the
    transform (the image itself when ``transform`` is ``None``); ``dataset.spec`` is the
    dataset's :class:`TaskSpec`.

    Splits are deterministic: ``test`` is the official test split (or a fixed 20% hold-out
    where there is none), ``val`` is ``val_fraction`` of the training pool chosen by a
    permutation seeded with ``seed``, and ``train`` is the rest. Train, val and test never
    share an example.

    Args:
        name: Dataset name (see :func:`list_datasets`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: Image transform, e.g. ``bundle.preprocess_train``.
        data_root: Local data root for standard datasets (default ``$TVTOOL_DATA_ROOT``).
        download: Let torchvision download a missing standard dataset into the data root.
        seed: Seed of the val carve.
        val_fraction: Fraction of the training pool used for validation, in ``[0, 1)``.

    Raises:
        InvalidInputError: unknown name or split, missing data root or dataset directory,
            malformed image folder.
    """
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}", hint="use train, val or test")
    source = _resolve(name, data_root, download)
    pools, plan = _plan(source, seed, val_fraction)
    part = plan[split]
    return SplitDataset(source.spec, split, pools[part.pool], part, transform)


def download(name: str, data_root: PathLike | None = None,
             log: Callable[[str], None] | None = None) -> bool:
    """Fetch a standard dataset into the data root with torchvision's downloaders.

    The only way tvtool touches the network for data; the commands call it for ``--download``.
    A dataset already in place is only checked (torchvision verifies what it finds).

    Args:
        name: Dataset name.
        data_root: Existing local data root (or ``$TVTOOL_DATA_ROOT``).
        log: Told before a standard dataset is fetched or checked.

    Returns:
        True when a standard dataset was fetched or found complete; False for synthetic and
        image-folder datasets, which have nothing to download.

    Raises:
        InvalidInputError: unknown name, no data root, RESISC45 (no public downloader), or a
            download that left an incomplete dataset.
        TvtoolError: a network or disk failure.
    """
    source = _resolve(name, data_root, download=True)
    if not isinstance(source, StandardSource):
        return False
    if source.info.build is None:
        raise InvalidInputError(
            f"{source.info.name} has no downloader (torchvision has none for it)",
            hint=source.info.manual)
    if log is not None:
        log(f"{source.info.name}: downloading what is missing under the data root")
    source.pools()
    return True


def data_source(name: str, data_root: PathLike | None = None) -> dict[str, Any]:
    """Where a dataset's examples come from, without reading them.

    The ``source`` record of :func:`split_manifest` (for ``synthetic:`` tasks it holds the
    generator version). Whatever caches a result computed from a dataset keys on it, so that
    a changed generator or source is never answered from a result of the old data.

    Args:
        name: Dataset name.
        data_root: Local data root for standard datasets.

    Raises:
        InvalidInputError: unknown dataset.
    """
    return _resolve(name, data_root).describe()


def split_manifest(
    name: str,
    data_root: PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
) -> dict[str, Any]:
    """Describe the splits as a JSON-able record, so that a result can be reproduced.

    Per split it holds the count and a ``sha256`` over its members in order (pool name and
    index, or the relative file path for image folders). Two runs used the same examples
    exactly when their manifests are equal. Write it with ``tvtool.io.write_json``.

    Args:
        name: Dataset name.
        data_root: Local data root for standard datasets.
        seed: Seed of the val carve.
        val_fraction: Fraction of the training pool used for validation.
        download: As for :func:`load_split`.

    Returns:
        ``{"format", "dataset", "seed", "val_fraction", "test_fraction", "num_classes",
        "source", "counts", "hashes", "tvtool_version"}``.
    """
    source = _resolve(name, data_root, download)
    pools, plan = _plan(source, seed, val_fraction)
    counts = {split: len(part.indices) for split, part in plan.items()}
    hashes = {
        split: members_hash(f"{part.pool}:{pools[part.pool].member(int(i))}"
                            for i in part.indices)
        for split, part in plan.items()
    }
    return {
        "format": MANIFEST_FORMAT,
        "dataset": source.spec.name,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": None if "test" in pools else TEST_FRACTION,
        "num_classes": source.spec.num_classes,
        "source": source.describe(),
        "counts": counts,
        "hashes": hashes,
        "tvtool_version": __version__,
    }
