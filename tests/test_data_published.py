"""The 8-task benchmark as published: task-vectors names, Val variants and on-disk layouts.

Fixtures are tiny copies of each layout the task-vectors code (mlfoundations/task_vectors)
reads, with the real folder names; an image's brightness encodes its label so a loaded example
shows which label it must carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tvtool.data import catalog, list_datasets, load_split, split_manifest, task_spec
from tvtool.data.standard import EUROSAT_FOLDERS, val_split
from tvtool.errors import InvalidInputError


def _image(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), label % 50 * 5, dtype=np.uint8)).save(path)


def _folders(root: Path, folders: list[str], per_class: int, tag: str) -> None:
    for label, name in enumerate(folders):
        for i in range(per_class):
            _image(root / name / f"{tag}_{i:02d}.png", label)


def _label_ok(dataset, i: int) -> bool:
    image, label = dataset[i]
    return abs(int(np.asarray(image)[1, 1, 0]) - label % 50 * 5) <= 1


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(("name", "canonical"), [
    ("MNIST", "MNIST"), ("mnistval", "MNISTVal"), ("SVHNVal", "SVHNVal"),
    ("eurosat", "EuroSAT"), ("EuroSATVal", "EuroSATVal"), ("GTSRBVal", "GTSRBVal"),
    ("dtd", "DTD"), ("RESISC45Val", "RESISC45Val"), ("sun397val", "SUN397Val"),
    ("Cars", "StanfordCars"), ("CarsVal", "StanfordCarsVal"), ("imagenet", "ImageNet"),
])
def test_task_vectors_names_and_val_variants(name, canonical):
    spec = task_spec(name)
    assert spec.name == canonical
    plain = task_spec(canonical.removesuffix("Val"))
    assert (spec.classnames, spec.templates) == (plain.classnames, plain.templates)


def test_imagenet_uses_open_clip_zero_shot_metadata():
    from open_clip import zero_shot_metadata

    spec = task_spec("ImageNet")
    assert spec.classnames == tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert spec.templates == tuple(t("{}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    assert "ImageNet" in list_datasets()


def test_unknown_val_name_is_refused():
    with pytest.raises(InvalidInputError, match="unknown dataset"):
        task_spec("FooVal")


@pytest.mark.parametrize("n", [50, 1000, 60000, 73257])
def test_val_split_is_the_reference_random_split(n):
    """The task-vectors code's split_train_into_train_val, computed with torch itself."""
    held = min(int(n * 0.1), 5000)
    train, val = torch.utils.data.random_split(range(n), [n - held, held],
                                               generator=torch.Generator().manual_seed(0))
    assert val_split(n) == (list(train.indices), list(val.indices))
    if n == 60000:
        assert val_split(n)[0][0] == 36044  # the reference asserts this for MNISTVal


# ---------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-vectors-root")
    eurosat = root / "EuroSAT_splits"
    for part, count in (("train", 3), ("val", 2), ("test", 1)):
        _folders(eurosat / part, list(EUROSAT_FOLDERS), count, part)
    for part, count in (("train", 2), ("val", 1), ("test", 1)):
        _folders(root / "dtd" / part, list(catalog.DTD_CLASSNAMES), count, part)
    sun = [f"{n[0]}_{n.replace(' ', '_')}" for n in catalog.SUN397_CLASSNAMES]
    for part in ("train", "val"):
        _folders(root / "sun397" / part, sun, 1, part)
    return root


def test_eurosat_splits_layout(root):
    test = load_split("EuroSAT", "test", data_root=root)
    val = load_split("EuroSAT", "val", data_root=root)
    train = load_split("EuroSAT", "train", data_root=root)
    assert (len(train), len(val), len(test)) == (30, 20, 10)
    assert [test[i][1] for i in range(10)] == list(range(10))
    assert all(_label_ok(d, i) for d in (train, val, test) for i in range(len(d)))
    # EuroSATVal evaluates on the prepared val folder and trains on the whole train folder.
    val_test = load_split("EuroSATVal", "test", data_root=root)
    assert len(val_test) == 20 and load_split("eurosatval", "train", data_root=root,
                                              val_fraction=0.0).spec.name == "EuroSATVal"
    manifest = split_manifest("EuroSAT", data_root=root)
    assert manifest["source"]["layout"] == "task_vectors"
    assert manifest["source"]["published_test_split"] is True
    assert manifest["source"]["folder"] == "EuroSAT_splits"


def test_eurosat_missing_class_folder_is_refused(tmp_path):
    _folders(tmp_path / "EuroSAT_splits" / "train", list(EUROSAT_FOLDERS[1:]), 1, "train")
    _folders(tmp_path / "EuroSAT_splits" / "test", list(EUROSAT_FOLDERS), 1, "test")
    _folders(tmp_path / "EuroSAT_splits" / "val", list(EUROSAT_FOLDERS), 1, "val")
    with pytest.raises(InvalidInputError, match=r"lacks class folders.*AnnualCrop"):
        load_split("EuroSAT", "train", data_root=tmp_path)


def test_dtd_layout_tests_on_the_val_folder_as_the_code_does(root):
    test = load_split("DTD", "test", data_root=root)
    assert len(test) == 47
    assert all(test.indices == np.arange(47))
    assert sorted(test[i][1] for i in range(47)) == list(range(47))
    from tvtool.data.splits import members_hash

    val_files = sorted(f"test:val/{n}/val_00.png" for n in catalog.DTD_CLASSNAMES)
    assert split_manifest("DTD", data_root=root)["hashes"]["test"] == members_hash(val_files)
    # DTDVal: the reference's random_split of the 94 training images (9 held out).
    held = load_split("DTDVal", "test", data_root=root)
    train = load_split("DTDVal", "train", data_root=root, val_fraction=0.0)
    assert (len(train), len(held)) == (85, 9)
    _, expected = val_split(94)
    tv_train = load_split("DTD", "train", data_root=root, val_fraction=0.0)
    assert [held[i][1] for i in range(9)] == [tv_train[j][1] for j in expected]


def test_sun397_layout(root):
    test = load_split("SUN397", "test", data_root=root)
    assert len(test) == 397
    assert all(_label_ok(test, i) for i in range(0, 397, 37))
    assert load_split("sun397", "train", data_root=root, val_fraction=0.0).spec.num_classes == 397
    assert len(load_split("SUN397Val", "test", data_root=root)) == 39


def test_resisc45_split_lists_are_read_as_the_code_reads_them(tmp_path):
    folder = tmp_path / "resisc45"
    names = [c.replace(" ", "_") for c in catalog.RESISC45_CLASSNAMES]
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        for i, part in enumerate(("train", "train", "val", "test")):
            file = folder / "NWPU-RESISC45" / name / f"{name}_{i + 1:03d}.jpg"
            _image(file, label)
            lists[part].append(file.name)
    for part, files in lists.items():
        (folder / f"resisc45-{part}.txt").write_text("\n".join(files) + "\n")
    train = load_split("RESISC45", "train", data_root=tmp_path)
    val = load_split("RESISC45", "val", data_root=tmp_path)
    test = load_split("RESISC45", "test", data_root=tmp_path)
    assert (len(train), len(val), len(test)) == (90, 45, 45)
    held = load_split("RESISC45Val", "test", data_root=tmp_path)
    assert len(held) == 9  # 10% of the 90 listed training images


def test_imagenet_torchvision_layout(tmp_path):
    from open_clip import zero_shot_metadata

    folder = tmp_path / "imagenet"
    wnids = [f"n{index:08d}" for index in range(1000)]
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, wnids[:2]),
               folder.mkdir() or folder / "meta.bin")
    for label, wnid in enumerate(wnids):
        _image(folder / "train" / wnid / f"{wnid}_1.JPEG", label)
        if label < 3:
            _image(folder / "val" / wnid / f"ILSVRC2012_val_{label:08d}.JPEG", label)
    for label in range(3, 1000):  # every class folder must exist in val/ as well
        _image(folder / "val" / wnids[label] / f"ILSVRC2012_val_{label:08d}.JPEG", label)
    test = load_split("ImageNet", "test", data_root=tmp_path)
    assert len(test) == 1000 and test.spec.classnames[0] == \
        zero_shot_metadata.IMAGENET_CLASSNAMES[0]
    assert all(_label_ok(test, i) for i in (0, 1, 500, 999))


def test_missing_scipy_names_the_extra(tmp_path):
    try:
        import scipy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("scipy is installed")
    (tmp_path / "svhn").mkdir()
    with pytest.raises(InvalidInputError) as info:
        load_split("SVHN", "test", data_root=tmp_path)
    line = info.value.one_line()
    assert "scipy" in line and "tvtool[datasets]" in line and "\n" not in line


def test_gtsrb_torchvision_layout(tmp_path):
    """gtsrb/GTSRB/Training/<00000..00042>/*.ppm, Final_Test/Images/*.ppm + GT-final_test.csv."""
    base = tmp_path / "gtsrb"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for label in range(43):
        _image(base / "GTSRB" / "Training" / f"{label:05d}" / f"00000_{label:05d}.ppm", label)
        name = f"{label:05d}.ppm"
        _image(base / "GTSRB" / "Final_Test" / "Images" / name, 42 - label)
        rows.append(f"{name};4;4;0;0;3;3;{42 - label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    test = load_split("gtsrb", "test", data_root=tmp_path)
    assert len(test) == 43 and all(_label_ok(test, i) for i in range(43))
    assert sorted(test[i][1] for i in range(43)) == list(range(43))
    assert len(load_split("GTSRBVal", "test", data_root=tmp_path)) == 4
    assert split_manifest("GTSRB", data_root=tmp_path)["source"]["published_test_split"]
