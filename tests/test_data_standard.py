"""Standard datasets: names, CLIP class lists, local data roots, and fake data on disk."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tvtool.data import DATA_ROOT_ENV, catalog, list_datasets, load_split, split_manifest, task_spec
from tvtool.errors import InvalidInputError

EXPECTED_CLASSES = {"MNIST": 10, "SVHN": 10, "GTSRB": 43, "EuroSAT": 10, "DTD": 47,
                    "StanfordCars": 196, "SUN397": 397, "RESISC45": 45, "CIFAR10": 10,
                    "CIFAR100": 100, "STL10": 10, "Flowers102": 102, "OxfordIIITPet": 37,
                    "PCAM": 2, "FER2013": 7, "EMNIST": 10, "Food101": 101, "FashionMNIST": 10,
                    "RenderedSST2": 2, "KMNIST": 10, "ImageNet": 1000}


def test_every_standard_dataset_has_clip_classnames_and_templates():
    assert [n for n in list_datasets() if not n.startswith("synthetic:")] == list(EXPECTED_CLASSES)
    for name, count in EXPECTED_CLASSES.items():
        spec = task_spec(name)  # no data root needed for the names
        assert spec.name == name and spec.num_classes == count
        # open_clip's ImageNet class-name list repeats two names.
        assert len(set(spec.classnames)) == count - 2 * (name == "ImageNet")
        assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)


def test_names_are_case_insensitive_with_aliases():
    assert task_spec("mnist").name == "MNIST"
    assert task_spec("Cars").name == "StanfordCars"
    assert task_spec("eurosat").classnames[-1] == "lake or sea"


def test_unknown_name_suggests_close_ones():
    with pytest.raises(InvalidInputError, match="unknown dataset 'MNSIT'") as info:
        task_spec("MNSIT")
    assert "MNIST" in (info.value.hint or "")


def test_resisc45_labels_follow_sorted_folder_names():
    folders = [c.replace(" ", "_") for c in catalog.RESISC45_CLASSNAMES]
    assert folders == sorted(folders)


def test_missing_data_root_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(InvalidInputError, match="MNIST is read from a local data root") as info:
        load_split("MNIST", "train")
    assert DATA_ROOT_ENV in (info.value.hint or "")


def test_missing_dataset_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    with pytest.raises(InvalidInputError, match="expected directory") as info:
        load_split("CIFAR10", "test")
    assert str(tmp_path / "cifar-10-batches-py") in info.value.message
    with pytest.raises(InvalidInputError, match="not a directory"):
        load_split("MNIST", "train", data_root=tmp_path / "nope")


def test_incomplete_dataset_directory_is_an_error(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match="missing or incomplete"):
        load_split("MNIST", "train", data_root=tmp_path)


def _idx(path: Path, array: np.ndarray) -> None:
    """Write an MNIST idx file (big-endian header, then raw uint8 data)."""
    magic = 0x800 + array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-root")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 50), ("t10k", 20)):
        labels = np.arange(n) % 10
        # Brightness encodes the label, so a loaded image tells which label it must carry.
        images = np.repeat((labels * 20 + 10)[:, None, None], 28 * 28, axis=1).reshape(n, 28, 28)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_mnist_from_a_local_root(fake_mnist, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(fake_mnist))
    train, val, test = (load_split("MNIST", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (45, 5, 20)
    assert set(train.indices).isdisjoint(val.indices)
    assert set(train.indices) | set(val.indices) == set(range(50))
    for dataset in (train, val, test):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.mode == "RGB" and image.size == (28, 28)
            assert np.asarray(image)[0, 0, 0] == label * 20 + 10
    manifest = split_manifest("MNIST", data_root=fake_mnist)
    assert manifest["counts"] == {"train": 45, "val": 5, "test": 20}
    assert manifest["test_fraction"] is None


def test_resisc45_with_split_lists(tmp_path):
    folder = tmp_path / "resisc45"
    names = [c.replace(" ", "_") for c in catalog.RESISC45_CLASSNAMES]
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        for i, part in enumerate(("train", "val", "test")):
            file = folder / "NWPU-RESISC45" / name / f"{name}_{i:03d}.jpg"
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), label * 5, dtype=np.uint8)).save(file,
                                                                               quality=100)
            lists[part].append(file.name)
    for part, files in lists.items():
        (folder / f"resisc45-{part}.txt").write_text("\n".join(files) + "\n")
    test = load_split("RESISC45", "test", data_root=tmp_path)
    assert len(test) == 45
    assert sorted(test[i][1] for i in range(45)) == list(range(45))
    # As the task-vectors code reads them: the train list is the training pool, the val list
    # tvtool's val split.
    train = load_split("RESISC45", "train", data_root=tmp_path, val_fraction=0.0)
    assert len(train) == 45
    assert len(load_split("RESISC45", "val", data_root=tmp_path)) == 45
    image, label = train[0]
    assert abs(int(np.asarray(image)[1, 1, 0]) - label * 5) <= 2


def test_resisc45_missing_class_folders_is_an_error(tmp_path):
    (tmp_path / "resisc45" / "NWPU-RESISC45" / "airplane").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match="lacks class folders"):
        load_split("RESISC45", "train", data_root=tmp_path)


def _fake_download(monkeypatch, source: Path) -> list[str]:
    """Make torchvision's MNIST download copy ``source``'s files instead of using the network."""
    import shutil

    import torchvision.datasets

    calls: list[str] = []

    def download(self) -> None:
        calls.append(self.root)
        if not self._check_exists():
            shutil.copytree(source / "MNIST", Path(self.root) / "MNIST", dirs_exist_ok=True)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", download)
    return calls


def test_download_fetches_only_standard_datasets(tmp_path, fake_mnist, monkeypatch):
    from tvtool.data import download

    calls = _fake_download(monkeypatch, fake_mnist)
    assert download("MNIST", tmp_path) is True
    assert calls and (tmp_path / "MNIST" / "raw").is_dir()
    assert len(load_split("MNIST", "test", data_root=tmp_path)) == 20
    assert download("synthetic:shape") is False
    with pytest.raises(InvalidInputError, match="RESISC45 has no downloader"):
        download("RESISC45", tmp_path)


def test_cli_download_flag_fetches_before_evaluating(cli, tmp_path, fake_mnist, monkeypatch):
    import json

    calls = _fake_download(monkeypatch, fake_mnist)
    args = ["eval", "--base", "tvtool-tiny:random", "-d", "MNIST", "--data-root", str(tmp_path),
            "--limit", "8", "--no-head-cache", "--json"]
    refused = cli(args)
    assert refused.exit_code == 2 and "--download" in refused.stderr and not calls
    assert not (tmp_path / "MNIST").exists()
    result = cli([*args, "--download"])
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert calls and entry["dataset"] == "MNIST" and entry["total"] == 8
    no_search = cli(["merge", "a.safetensors", "b.safetensors", "-o", str(tmp_path / "m"),
                     "--download"])
    assert no_search.exit_code == 2 and "--search-coef" in no_search.stderr
