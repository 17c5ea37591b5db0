"""Named task suites: the 8-, 14- and 20-task benchmarks of the model-merging papers.

The lists and their order are those of the 14/20-task code (nik-dim/tall_masks,
``ALL_DATASETS``; the TSV and iso-merging code use the same): the first 8 are the task-vectors
benchmark, the next 6 make the 14-task suite and the last 6 the 20-task suite.
``--suite N`` on the command line stands for these names (docs/data.md, "Suites").
"""

from __future__ import annotations

from collections.abc import Sequence

from tvtool.data.standard import IMAGENET, STANDARD
from tvtool.errors import UsageError

_ORDER = ("StanfordCars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397",
          "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
          "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST")

SUITES: dict[str, tuple[str, ...]] = {"8": _ORDER[:8], "14": _ORDER[:14], "20": _ORDER}
"""Suite name -> dataset names (tvtool's canonical spelling), in the references' order."""

_SPELLING = {key.lower(): d.name for d in STANDARD for key in (d.name, *d.aliases)}
_SPELLING[IMAGENET.lower()] = IMAGENET


def _standard(name: str) -> tuple[str, bool] | None:
    """A standard name's canonical spelling and whether it is the ``Val`` variant.

    The same answer as :func:`tvtool.data.standard.parse_standard`, without building
    ImageNet's class list (which imports open_clip).
    """
    key = name.strip().lower()
    if key in _SPELLING:
        return _SPELLING[key], False
    if key.endswith("val") and key[:-3] in _SPELLING:
        return _SPELLING[key[:-3]], True
    return None


def suite_datasets(suite: str) -> tuple[str, ...]:
    """The dataset names of a suite (``8``, ``14`` or ``20``).

    Raises:
        UsageError: an unknown suite.
    """
    key = str(suite).strip()
    if key not in SUITES:
        raise UsageError(f"unknown suite {key[:40]!r}", hint=f"use one of {', '.join(SUITES)}")
    return SUITES[key]


def task_identity(name: str) -> str:
    """Which task a dataset name stands for: a standard name's canonical spelling, ``Val`` dropped.

    ``MNISTVal``, ``mnist`` and ``MNIST`` are one task (the ``Val`` variant only splits its
    training set differently); other names are returned stripped.
    """
    found = _standard(name)
    return found[0] if found is not None else name.strip()


def canonical_name(name: str) -> str:
    """A standard name in tvtool's spelling (``mnistval`` -> ``MNISTVal``); others stripped."""
    found = _standard(name)
    if found is None:
        return name.strip()
    return found[0] + ("Val" if found[1] else "")


def with_suite(datasets: Sequence[str], suite: str | None) -> list[str]:
    """``--dataset`` values followed by the suite's datasets.

    Raises:
        UsageError: an unknown suite, or a dataset named twice (``-d mnist --suite 8``).
    """
    names = list(datasets)
    if suite is None:
        return names  # -d alone: as given (this check is about what the suite adds)
    names += suite_datasets(suite)
    seen: dict[str, str] = {}
    for name in names:
        task = canonical_name(name)
        if task in seen:
            raise UsageError(f"dataset {name[:60]!r} is named twice (also as "
                             f"{seen[task][:60]!r}); suite {suite} already holds it",
                             hint="give each dataset once")
        seen[task] = name
    return names


def match_suite(recorded: Sequence[str | None], suite: str, paths: Sequence[str]) -> list[str]:
    """Check that vectors cover a suite, one vector per task, by the datasets they record.

    Args:
        recorded: Dataset each vector records (None: records none).
        suite: Suite name.
        paths: The vectors' paths, for messages.

    Returns:
        The recorded names (``X`` or ``XVal``), in the vectors' order.

    Raises:
        UsageError: a vector records no dataset, or the tasks are not exactly the suite's.
    """
    wanted = suite_datasets(suite)
    names: list[str] = []
    owner: dict[str, str] = {}
    for path, name in zip(paths, recorded, strict=True):
        if not name:
            raise UsageError(f"{path!r} records no dataset, so --suite cannot place it",
                             hint="pass one --dataset per vector, in order, instead of --suite")
        task = task_identity(name)
        if task not in wanted:
            raise UsageError(f"{path!r} records dataset {name[:60]!r}, which is not in suite "
                             f"{suite}", hint=f"suite {suite}: {', '.join(wanted)}")
        if task in owner:
            raise UsageError(f"{owner[task]!r} and {path!r} are both {task} vectors")
        owner[task] = path
        names.append(name)
    missing = [t for t in wanted if t not in owner]
    if missing:
        raise UsageError(f"suite {suite} needs one vector per dataset; none for "
                         f"{', '.join(missing)}", hint="add their vectors, or use --dataset")
    return names
