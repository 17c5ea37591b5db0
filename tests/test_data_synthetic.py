"""``synthetic:<task>`` datasets through the public registry API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tvtool.data import SPLITS, list_datasets, load_split, split_manifest, task_spec
from tvtool.errors import InvalidInputError
from tvtool.synthetic_world import GENERATOR_VERSION, TASKS

SYNTHETIC = [f"synthetic:{t}" for t in TASKS]


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image).copy())


@pytest.fixture(scope="session")
def count_splits():
    return {s: load_split("synthetic:count", s, transform=_to_tensor) for s in SPLITS}


def test_at_least_six_synthetic_tasks_are_registered():
    names = [n for n in list_datasets() if n.startswith("synthetic:")]
    assert names == SYNTHETIC and len(names) >= 6
    assert {"shape", "color", "count", "position", "texture", "digit"} <= set(TASKS)


def test_spec_matches_the_world_task():
    spec = task_spec("synthetic:position")
    assert spec.name == "synthetic:position"
    assert spec.classnames == TASKS["position"].classnames
    assert all("{}" in t for t in spec.templates)


def test_split_sizes_items_and_spec(count_splits):
    assert {s: len(d) for s, d in count_splits.items()} == {"train": 4500, "val": 500,
                                                           "test": 1000}
    image, label = count_splits["train"][0]
    assert image.shape == (32, 32, 3) and image.dtype == torch.uint8
    assert isinstance(label, int) and 0 <= label < 4
    assert count_splits["test"].spec == task_spec("synthetic:count")
    labels = [count_splits["test"][i][1] for i in range(len(count_splits["test"]))]
    assert np.bincount(labels).tolist() == [250] * 4


def test_splits_share_no_image(count_splits):
    digests = {}
    for split, dataset in count_splits.items():
        digests[split] = {dataset[i][0].numpy().tobytes() for i in range(len(dataset))}
        assert len(digests[split]) == len(dataset)  # no duplicate images within a split
    assert digests["train"].isdisjoint(digests["val"])
    assert digests["train"].isdisjoint(digests["test"])
    assert digests["val"].isdisjoint(digests["test"])


def test_splits_are_deterministic_and_seeded():
    a = load_split("synthetic:shape", "val", seed=3)
    b = load_split("synthetic:shape", "val", seed=3)
    c = load_split("synthetic:shape", "val", seed=4)
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert len(load_split("synthetic:shape", "val", val_fraction=0.2)) == 1000


def test_manifest_records_counts_and_hashes():
    manifest = split_manifest("synthetic:texture", seed=7)
    assert json.loads(json.dumps(manifest)) == manifest
    assert manifest["dataset"] == "synthetic:texture" and manifest["seed"] == 7
    assert manifest["counts"] == {"train": 4500, "val": 500, "test": 1000}
    assert manifest["source"]["generator_version"] == GENERATOR_VERSION
    other = split_manifest("synthetic:texture", seed=8)
    assert other["hashes"]["test"] == manifest["hashes"]["test"]
    assert other["hashes"]["train"] != manifest["hashes"]["train"]
    assert split_manifest("synthetic:texture", seed=7) == manifest


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_val_fraction_is_rejected(fraction):
    with pytest.raises(InvalidInputError, match="val_fraction"):
        load_split("synthetic:color", "train", val_fraction=fraction)


def test_bad_split_and_task_names_are_rejected():
    with pytest.raises(InvalidInputError, match="unknown split"):
        load_split("synthetic:color", "validation")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="unknown synthetic task 'colour'"):
        task_spec("synthetic:colour")
    with pytest.raises(InvalidInputError, match="empty dataset name"):
        task_spec("  ")


def test_untransformed_items_are_rgb_images():
    image, _ = load_split("synthetic:digit", "test")[5]
    assert image.mode == "RGB" and image.size == (32, 32)
