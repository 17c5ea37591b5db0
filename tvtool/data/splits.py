"""Deterministic train/val/test splits and the manifest that records them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tvtool.errors import InvalidInputError
from tvtool.synthetic_world.scenes import rng_for

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")

TEST_FRACTION = 0.2
"""Share of the images held out as test where a dataset has no official test split."""

MANIFEST_FORMAT = "tvtool.split_manifest/1"


@dataclass(frozen=True)
class SplitPart:
    """One split: which pool its examples come from and their indices in that pool."""

    pool: str
    indices: np.ndarray


def _carve(n: int, fraction: float, *key: object) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (held-out, rest) by a seeded permutation; both sorted."""
    held = round(n * fraction)
    order = rng_for("tvtool-split", *key).permutation(n)
    return np.sort(order[:held]), np.sort(order[held:])


def plan_splits(pool_sizes: Mapping[str, int], seed: int, val_fraction: float,
                label: str) -> dict[Split, SplitPart]:
    """Decide which examples form train, val and test.

    * ``test`` is the ``test`` pool when the dataset has one; otherwise a fixed
      :data:`TEST_FRACTION` of the ``train`` pool chosen with a seed that never changes, so
      the test set is the same whatever ``seed`` a run uses.
    * ``val`` is the ``val`` pool when there is one; otherwise ``val_fraction`` of the
      remaining training examples, chosen by a permutation seeded with ``seed``.

    The permutations depend only on the pool sizes and the seed, never on paths or names.

    Args:
        pool_sizes: Number of examples in each pool (``train`` required; ``val``, ``test``
            optional).
        seed: Seed of the val carve.
        val_fraction: Fraction of the training examples held out for validation.
        label: Dataset name for error messages.

    Raises:
        InvalidInputError: ``val_fraction`` outside ``[0, 1)``, or too few examples.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = pool_sizes["train"]
    parts: dict[Split, SplitPart] = {}
    if "test" in pool_sizes:
        parts["test"] = SplitPart("test", np.arange(pool_sizes["test"]))
        rest = np.arange(n_train)
    else:
        test, rest = _carve(n_train, TEST_FRACTION, "test", n_train)
        parts["test"] = SplitPart("train", test)
    if "val" in pool_sizes:
        parts["val"] = SplitPart("val", np.arange(pool_sizes["val"]))
        parts["train"] = SplitPart("train", rest)
    else:
        val_pos, train_pos = _carve(len(rest), val_fraction, "val", len(rest), int(seed))
        parts["val"] = SplitPart("train", rest[val_pos])
        parts["train"] = SplitPart("train", rest[train_pos])
    if len(parts["train"].indices) == 0:
        raise InvalidInputError(f"{label} has too few images to split ({n_train} in the "
                                "training pool)", hint="add images or lower val_fraction")
    for part in parts.values():
        part.indices.setflags(write=False)
    return {name: parts[name] for name in SPLITS}


def members_hash(members: Iterable[str]) -> str:
    """``sha256:<hex>`` of member identities, one per line, in split order."""
    digest = hashlib.sha256()
    for member in members:
        digest.update(member.encode("utf-8") + b"\n")
    return "sha256:" + digest.hexdigest()
