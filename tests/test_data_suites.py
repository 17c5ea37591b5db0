"""The 14- and 20-task suites: names, class lists, templates, suites and on-disk layouts.

Each layout test writes a miniature in the exact on-disk format the 14/20-task code
(nik-dim/tall_masks) reads through torchvision, under the folder that code uses; an image's
brightness encodes its label, so a loaded example shows which label it carries. torchvision
checks some files' md5 sums, which a miniature cannot match: those checks are patched out, the
reading itself is torchvision's.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tvtool.data import (
    SUITES,
    catalog,
    list_datasets,
    load_split,
    match_suite,
    split_manifest,
    suite_datasets,
    task_spec,
    with_suite,
)
from tvtool.data.standard import val_split
from tvtool.errors import InvalidInputError, UsageError

NEW = ("STL10", "Flowers102", "OxfordIIITPet", "PCAM", "FER2013", "EMNIST", "Food101",
       "FashionMNIST", "RenderedSST2", "KMNIST")


def _level(label: int) -> int:
    return label % 25 * 10


def _label_ok(dataset, i: int) -> bool:
    image, label = dataset[i]
    return image.mode == "RGB" and abs(int(np.asarray(image)[1, 1, 0]) - _level(label)) <= 3


def _save(path: Path, label: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), _level(label), dtype=np.uint8)).save(path,
                                                                                 quality=100)


def _idx(path: Path, array: np.ndarray) -> None:
    """An idx (MNIST) file: big-endian magic and dimensions, then the uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x800 + array.ndim) + b"".join(struct.pack(">I", d)
                                                              for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_like(raw: Path, prefix: str = "", counts=(("train", 30), ("t10k", 20))) -> None:
    for part, n in counts:
        labels = np.arange(n) % 10
        images = np.repeat(np.array([_level(x) for x in labels])[:, None, None], 28 * 28,
                           axis=1).reshape(n, 28, 28)
        name = prefix + ("train" if part == "train" else "test") if prefix else part
        _idx(raw / f"{name}-images-idx3-ubyte", images)
        _idx(raw / f"{name}-labels-idx1-ubyte", labels)


# ---------------------------------------------------------------- names, lists, suites


def test_suites_are_the_references_lists_in_order():
    # nik-dim/tall_masks src/utils/variables_and_paths.py, ALL_DATASETS (Cars = StanfordCars).
    reference = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397",
                 "STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013",
                 "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST"]
    expected = ["StanfordCars" if n == "Cars" else n for n in reference]
    assert {k: list(v) for k, v in SUITES.items()} == {
        "8": expected[:8], "14": expected[:14], "20": expected}
    assert set(NEW) <= set(list_datasets())
    for name in expected:
        assert task_spec(name).name == name and task_spec(name + "Val").name == name + "Val"
    with pytest.raises(UsageError, match="unknown suite"):
        suite_datasets("12")


@pytest.mark.parametrize(("name", "classes", "templates"), [
    ("STL10", 10, ("a photo of a {}.", "a photo of the {}.")),
    ("Flowers102", 102, ("a photo of a {}, a type of flower.",)),
    ("OxfordIIITPet", 37, ("a photo of a {}, a type of pet.",)),
    ("PCAM", 2, ("this is a photo of {}",)),
    ("FER2013", 7, ("a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
                    "a photo of a face looking {}.", "a face that looks {}.", "they look {}.",
                    "look at how {} they are.")),
    ("EMNIST", 10, ('a photo of the digit character: "{}".',)),
    ("Food101", 101, ("a photo of {}, a type of food.",)),
    ("FashionMNIST", 10, ("a photo of a {}.", "a photo of the {}.")),
    ("RenderedSST2", 2, ("a {} review of a movie.",)),
    ("KMNIST", 10, ("a photo of the character {}.",)),
])
def test_templates_and_class_counts_are_the_references(name, classes, templates):
    spec = task_spec(name)
    assert spec.num_classes == classes and len(set(spec.classnames)) == classes
    assert spec.templates == templates


def test_class_names_the_reference_takes_from_torchvision():
    import torchvision.datasets as tv

    assert task_spec("FashionMNIST").classnames == tuple(tv.FashionMNIST.classes)
    assert task_spec("KMNIST").classnames == tuple(tv.KMNIST.classes)
    assert task_spec("EMNIST").classnames == tuple(tv.EMNIST.classes_split_dict["digits"])
    assert task_spec("RenderedSST2").classnames == ("negative", "positive")
    # CIFAR100: the dataset's own names, underscores kept, as the references prompt with them.
    cifar = task_spec("CIFAR100").classnames
    assert "aquarium_fish" in cifar and "sweet_pepper" in cifar and " " not in "".join(cifar)


def test_flowers_differs_from_torchvision_only_where_documented():
    import torchvision.datasets as tv

    differs = {(i, a, b) for i, (a, b) in enumerate(zip(catalog.FLOWERS102_CLASSNAMES,
                                                        tv.Flowers102.classes, strict=True))
               if a != b}
    assert {(a, b) for _, a, b in differs} == {("globe flower", "globe-flower"),
                                               ("pink and yellow dahlia", "pink-yellow dahlia?"),
                                               ("air plant", "ball moss")}


def test_fer2013_names_are_the_lists_the_reference_formats():
    reference = [["angry"], ["disgusted"], ["fearful"], ["happy", "smiling"], ["sad", "depressed"],
                 ["surprised", "shocked", "spooked"], ["neutral", "bored"]]
    spec = task_spec("FER2013")
    # What the reference's f"a face that looks {c}." gives for the list c.
    assert [spec.templates[3].format(c) for c in spec.classnames] == \
        [f"a face that looks {c}." for c in reference]


def test_with_suite_and_match_suite():
    from tvtool.data.standard import parse_standard
    from tvtool.data.suites import canonical_name

    for name in ("mnistval", "Cars", "carsval", "imagenet", "IMAGENETVAL", "pcam", "foo"):
        found = parse_standard(name)
        assert canonical_name(name) == (found[0].name + "Val" * found[1] if found else "foo")
    assert with_suite(["ImageNet"], "8") == ["ImageNet", *SUITES["8"]]
    assert with_suite(["MNIST", "mnist"], None) == ["MNIST", "mnist"]  # -d alone: unchanged
    with pytest.raises(UsageError, match="named twice"):
        with_suite(["mnist"], "8")
    recorded = list(reversed(SUITES["8"]))
    recorded[0] = recorded[0] + "Val"  # XVal counts as X's vector
    paths = [f"v{i}" for i in range(8)]
    assert match_suite(recorded, "8", paths) == recorded
    with pytest.raises(UsageError, match="none for MNIST"):
        match_suite([n for n in SUITES["8"] if n != "MNIST"], "8", paths[:7])
    with pytest.raises(UsageError, match="'ImageNet', which is not in suite 8"):
        match_suite([n if n != "MNIST" else "ImageNet" for n in SUITES["8"]], "8", paths)
    with pytest.raises(UsageError, match="both DTD vectors"):
        match_suite([*SUITES["8"][:7], "DTDVal"], "8", paths)
    with pytest.raises(UsageError, match="records no dataset"):
        match_suite([None, *SUITES["8"][1:]], "8", paths)


# ---------------------------------------------------------------- torchvision layouts


def test_stl10_layout(tmp_path, monkeypatch):
    import torchvision.datasets as tv

    monkeypatch.setattr(tv.STL10, "_check_integrity", lambda self: True)
    folder = tmp_path / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(catalog.STL10_CLASSNAMES) + "\n")
    for part, n in (("train", 20), ("test", 10)):
        labels = np.arange(n) % 10
        images = np.stack([np.full((3, 96, 96), _level(x), np.uint8) for x in labels])
        images.tofile(folder / f"{part}_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / f"{part}_y.bin")  # stored 1-based
    test = load_split("STL10", "test", data_root=tmp_path)
    assert len(test) == 10 and [test[i][1] for i in range(10)] == list(range(10))
    assert all(_label_ok(test, i) for i in range(10))
    held = load_split("STL10Val", "test", data_root=tmp_path)
    assert len(held) == 2 and [held[i][1] for i in range(2)] == [j % 10 for j in val_split(20)[1]]
    manifest = split_manifest("STL10", data_root=tmp_path)
    assert manifest["source"]["published_test_split"] is True
    assert manifest["source"]["layout"] == "torchvision"


def test_stl10_with_other_class_names_is_refused(tmp_path, monkeypatch):
    import torchvision.datasets as tv

    monkeypatch.setattr(tv.STL10, "_check_integrity", lambda self: True)
    folder = tmp_path / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    names = list(catalog.STL10_CLASSNAMES)
    names[2] = "automobile"
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    for part in ("train", "test"):
        np.zeros((1, 3, 96, 96), np.uint8).tofile(folder / f"{part}_X.bin")
        np.ones(1, np.uint8).tofile(folder / f"{part}_y.bin")
    with pytest.raises(InvalidInputError, match="names class 2 'automobile'"):
        load_split("STL10", "test", data_root=tmp_path)


def _cifar(root: Path, folder: str, files: list[str], key: str, names: list[str],
           meta: str, label_key: str) -> None:
    base = root / folder
    base.mkdir(parents=True)
    for index, name in enumerate(files):
        labels = [(index * 4 + i) % len(names) for i in range(4)]
        data = np.stack([np.full(3072, _level(x), np.uint8) for x in labels])
        with open(base / name, "wb") as handle:
            pickle.dump({"data": data, label_key: labels}, handle)
    with open(base / meta, "wb") as handle:
        pickle.dump({key: names}, handle)


def test_cifar100_and_cifar10_layouts(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    _cifar(tmp_path, "cifar-100-python", ["train", "test"], "fine_label_names",
           list(catalog.CIFAR100_CLASSNAMES), "meta", "fine_labels")
    _cifar(tmp_path, "cifar-10-batches-py",
           [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], "label_names",
           list(catalog.CIFAR10_CLASSNAMES), "batches.meta", "labels")
    for name, n_train in (("CIFAR100", 4), ("CIFAR10", 20)):
        test = load_split(name, "test", data_root=tmp_path)
        assert len(test) == 4 and all(_label_ok(test, i) for i in range(4))
        train = load_split(name, "train", data_root=tmp_path, val_fraction=0.0)
        assert len(train) == n_train
    # A CIFAR-100 whose meta spells a class with a space is another dataset's names.
    spaced = tmp_path / "spaced"
    names = list(catalog.CIFAR100_CLASSNAMES)
    names[1] = "aquarium fish"
    _cifar(spaced, "cifar-100-python", ["train", "test"], "fine_label_names", names, "meta",
           "fine_labels")
    with pytest.raises(InvalidInputError, match="names class 1 'aquarium fish'"):
        load_split("CIFAR100", "test", data_root=spaced)


def test_flowers102_layout(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    import torchvision.datasets.flowers102 as flowers

    monkeypatch.setattr(flowers, "check_integrity", lambda *args, **kwargs: True)
    base = tmp_path / "flowers102" / "flowers-102"
    labels = [i % 102 for i in range(306)]  # three images per class
    for number, label in enumerate(labels, 1):
        _save(base / "jpg" / f"image_{number:05d}.jpg", label)
    scipy_io.savemat(base / "imagelabels.mat", {"labels": np.array(labels) + 1})
    ids = np.arange(1, 307)
    scipy_io.savemat(base / "setid.mat", {"trnid": ids[:102], "valid": ids[102:204],
                                          "tstid": ids[204:]})
    test = load_split("Flowers102", "test", data_root=tmp_path)
    train = load_split("Flowers102", "train", data_root=tmp_path, val_fraction=0.0)
    # The reference trains on torchvision's "train" split and tests on "test"; "val" is unused.
    assert (len(train), len(test)) == (102, 102)
    assert all(_label_ok(test, i) for i in range(0, 102, 17))
    assert len(load_split("Flowers102Val", "test", data_root=tmp_path)) == 10


def test_flowers102_without_scipy_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    (tmp_path / "flowers102").mkdir()
    with pytest.raises(InvalidInputError, match="needs scipy") as info:
        load_split("Flowers102", "test", data_root=tmp_path)
    assert "tvtool[datasets]" in (info.value.hint or "")


# Breed ids as the Oxford-IIIT Pet annotation files spell them, in class-id order.
PET_IDS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound",
           "beagle", "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua",
           "Egyptian_Mau", "english_cocker_spaniel", "english_setter", "german_shorthaired",
           "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon",
           "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
           "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu",
           "Siamese", "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier",
           "yorkshire_terrier"]


def test_oxford_pets_layout(tmp_path):
    base = tmp_path / "OxfordIIITPet" / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, numbers in (("trainval", (1, 2)), ("test", (3,))):
        lines = []
        for label, breed in enumerate(PET_IDS):
            for number in numbers:
                _save(base / "images" / f"{breed}_{number}.jpg", label)
                lines.append(f"{breed}_{number} {label + 1} {1 + (breed[0].islower())} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    test = load_split("OxfordIIITPet", "test", data_root=tmp_path)
    assert len(test) == 37 and all(_label_ok(test, i) for i in range(37))
    assert len(load_split("OxfordIIITPet", "train", data_root=tmp_path, val_fraction=0.0)) == 74
    assert len(load_split("OxfordIIITPetVal", "test", data_root=tmp_path)) == 7


def test_pcam_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    base = tmp_path / "PCAM" / "pcam"
    base.mkdir(parents=True)
    for split, n in (("train", 20), ("test", 6)):
        labels = np.arange(n) % 2
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = np.stack([np.full((96, 96, 3), _level(x), np.uint8) for x in labels])
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = labels.reshape(n, 1, 1, 1).astype(np.uint8)
    test = load_split("PCAM", "test", data_root=tmp_path)
    assert len(test) == 6 and [test[i][1] for i in range(6)] == [0, 1] * 3
    assert all(_label_ok(test, i) for i in range(6))
    assert len(load_split("PCAMVal", "test", data_root=tmp_path)) == 2


def test_pcam_without_h5py_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)
    (tmp_path / "PCAM").mkdir()
    with pytest.raises(InvalidInputError, match="needs h5py") as info:
        load_split("PCAM", "test", data_root=tmp_path)
    assert "tvtool[datasets]" in (info.value.hint or "")


@pytest.mark.parametrize("layout", ["tall_masks", "tsv"])
def test_emnist_digits_layouts(tmp_path, layout):
    # tall_masks/iso-merging: root DATA_ROOT/EMNIST -> EMNIST/EMNIST/raw; TSV: EMNIST/raw.
    raw = tmp_path / "EMNIST" / ("EMNIST" if layout == "tall_masks" else "") / "raw"
    _mnist_like(raw, prefix="emnist-digits-")
    test = load_split("EMNIST", "test", data_root=tmp_path)
    assert len(test) == 20 and all(_label_ok(test, i) for i in range(20))
    assert len(load_split("EMNISTVal", "test", data_root=tmp_path)) == 3


@pytest.mark.parametrize("name", ["FashionMNIST", "KMNIST"])
def test_fashion_mnist_and_kmnist_layouts(tmp_path, name):
    _mnist_like(tmp_path / name / name / "raw")
    test = load_split(name, "test", data_root=tmp_path)
    assert len(test) == 20 and all(_label_ok(test, i) for i in range(20))
    assert split_manifest(name, data_root=tmp_path)["source"]["published_test_split"] is True


def test_food101_layout(tmp_path):
    base = tmp_path / "food101" / "food-101"
    names = list(catalog.FOOD101_CLASSNAMES)
    shuffled = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    for split, numbers in (("train", (1, 2)), ("test", (3,))):
        meta = {}
        for name in shuffled:  # torchvision sorts the keys; the file need not
            meta[name] = [f"{name}/{n}" for n in numbers]
            for n in numbers:
                _save(base / "images" / name / f"{n}.jpg", names.index(name))
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    test = load_split("Food101", "test", data_root=tmp_path)
    assert len(test) == 101 and all(_label_ok(test, i) for i in range(0, 101, 10))
    assert len(load_split("Food101Val", "test", data_root=tmp_path)) == 20


def test_rendered_sst2_layout(tmp_path):
    base = tmp_path / "RenderedSST2" / "rendered-sst2"
    for split, n in (("train", 10), ("valid", 2), ("test", 4)):
        for i in range(n):
            label = i % 2
            _save(base / split / ("negative", "positive")[label] / f"{i}.png", label)
    test = load_split("RenderedSST2", "test", data_root=tmp_path)
    assert len(test) == 4 and sorted(test[i][1] for i in range(4)) == [0, 0, 1, 1]
    assert all(_label_ok(test, i) for i in range(4))
    # The reference trains on "train" and tests on "test"; torchvision's "val" is unused.
    assert len(load_split("RenderedSST2", "train", data_root=tmp_path, val_fraction=0.0)) == 10


# ---------------------------------------------------------------- FER2013 and hf:PATH


def _png(label: int, mode: str = "RGB") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), _level(label), np.uint8)).convert(mode).save(buffer,
                                                                                     "PNG")
    return buffer.getvalue()


def test_fer2013_from_a_saved_copy_of_the_references_hub_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    # Jeneral/fer-2013's columns: grey PNG bytes in img_bytes, integer labels.
    parts = {split: datasets.Dataset.from_dict(
        {"img_bytes": [_png(i % 7, "L") for i in range(n)], "labels": [i % 7 for i in range(n)]})
        for split, n in (("train", 21), ("test", 7))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "FER2013"))
    test = load_split("FER2013", "test", data_root=tmp_path)
    assert len(test) == 7 and [test[i][1] for i in range(7)] == list(range(7))
    assert all(_label_ok(test, i) for i in range(7))  # grey images come back as RGB
    # The reference opens each image with convert("L"): a colour image is read grey too.
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[..., 0] = 200
    import io

    buffer = io.BytesIO()
    Image.fromarray(colour).save(buffer, "PNG")
    datasets.DatasetDict({"train": parts["train"], "test": datasets.Dataset.from_dict(
        {"img_bytes": [buffer.getvalue()], "labels": [0]})}).save_to_disk(
        str(tmp_path / "colour" / "FER2013"))
    image, _ = load_split("FER2013", "test", data_root=tmp_path / "colour")[0]
    expected = np.asarray(Image.fromarray(colour).convert("L").convert("RGB"))
    assert np.array_equal(np.asarray(image), expected)
    assert len(load_split("FER2013Val", "test", data_root=tmp_path)) == 2
    source = split_manifest("FER2013", data_root=tmp_path)["source"]
    assert source["layout"] == "save_to_disk" and source["published_test_split"] is True
    assert source["columns"] == {"image": "img_bytes", "label": "labels"}
    from tvtool.data import download

    with pytest.raises(InvalidInputError, match="no downloader") as info:
        download("FER2013", tmp_path)
    assert "Jeneral/fer-2013" in (info.value.hint or "")


def _write_parquet(path: Path, images: list[bytes | None], labels: list[int],
                   names: list[str] | None, row_group: int = 3, paths: bool = False) -> None:
    """A parquet file as the hub stores a datasets Image + ClassLabel table."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": "x.png" if paths else None} for b in images],
                          type=image_type),
        "label": pa.array(labels, type=pa.int64())})
    label_feature = ({"names": names, "_type": "ClassLabel"} if names
                     else {"dtype": "int64", "_type": "Value"})
    features = {"image": {"_type": "Image"}, "label": label_feature}
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture
def parquet_dir(tmp_path):
    names = ["cat", "dog", "bird"]
    root = tmp_path / "snapshot"
    labels = [i % 3 for i in range(14)]
    _write_parquet(root / "data" / "train-00000-of-00002.parquet",
                   [_png(x) for x in labels[:8]], labels[:8], names)
    _write_parquet(root / "data" / "train-00001-of-00002.parquet",
                   [_png(x) for x in labels[8:]], labels[8:], names)
    _write_parquet(root / "data" / "test-00000-of-00001.parquet",
                   [_png(x) for x in (2, 1, 0)], [2, 1, 0], names)
    return root


def test_hf_parquet_snapshot(parquet_dir):
    name = f"hf:{parquet_dir}"
    spec = task_spec(name)
    assert spec.classnames == ("cat", "dog", "bird") and spec.templates == ("a photo of a {}.",)
    test = load_split(name, "test")
    assert [test[i][1] for i in range(3)] == [2, 1, 0]
    train = load_split(name, "train", val_fraction=0.0)
    assert len(train) == 14  # both shards, read across row groups of 3
    assert [train[i][1] for i in range(14)] == [i % 3 for i in range(14)]
    assert all(_label_ok(train, i) for i in range(14))
    manifest = split_manifest(name)
    assert manifest["source"] == {"kind": "hf", "layout": "parquet",
                                  "splits": {"train": "train", "test": "test"},
                                  "columns": {"image": "image", "label": "label"},
                                  "rows": {"train": 14, "test": 3}}
    # Pools pickle without their open files (data-loader workers open their own).
    again = pickle.loads(pickle.dumps(train))
    assert again[5][1] == 2 and _label_ok(again, 5)


def test_hf_templates_and_classnames_files_override(parquet_dir):
    (parquet_dir / "templates.txt").write_text("a photo of the {}.\nart of a {}.\n")
    (parquet_dir / "classnames.txt").write_text("kitty\npuppy\nbirdie\n")
    spec = task_spec(f"hf:{parquet_dir}")
    assert spec.classnames == ("kitty", "puppy", "birdie")
    assert spec.templates == ("a photo of the {}.", "art of a {}.")
    (parquet_dir / "classnames.txt").write_text("kitty\npuppy\n")
    with pytest.raises(InvalidInputError, match="lists 2 class names"):
        task_spec(f"hf:{parquet_dir}")


def test_hf_save_to_disk_dataset_dict_and_single_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})

    def part(n: int, offset: int = 0):
        labels = [(i + offset) % 4 for i in range(n)]
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(x), "path": None} for x in labels], "label": labels},
            features=features)

    datasets.DatasetDict({"train": part(12), "validation": part(4, 1), "test": part(8, 2)}
                         ).save_to_disk(str(tmp_path / "dict"), max_shard_size="2KB")
    name = f"hf:{tmp_path / 'dict'}"
    splits = {s: load_split(name, s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 12, "val": 4, "test": 8}
    assert [splits["val"][i][1] for i in range(4)] == [1, 2, 3, 0]
    assert all(_label_ok(d, i) for d in splits.values() for i in range(len(d)))
    assert split_manifest(name)["source"]["splits"] == {"train": "train", "val": "validation",
                                                        "test": "test"}
    part(10).save_to_disk(str(tmp_path / "single"))
    single = f"hf:{tmp_path / 'single'}"
    assert task_spec(single).classnames == ("a", "b", "c", "d")
    assert len(load_split(single, "test")) == 2  # one pool: tvtool's fixed 20% hold-out
    assert split_manifest(single)["test_fraction"] == 0.2


def test_hf_refusals(tmp_path, parquet_dir):
    with pytest.raises(InvalidInputError, match="reads a local directory") as info:
        task_spec("hf:tanganke/sun397")
    assert "never downloads" in (info.value.hint or "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="neither a saved dataset"):
        task_spec(f"hf:{tmp_path / 'empty'}")
    other = tmp_path / "corruptions"
    _write_parquet(other / "train.parquet", [_png(0), _png(1)], [0, 1], ["a", "b"])
    _write_parquet(other / "contrast-00000-of-00001.parquet", [_png(0)], [0], ["a", "b"])
    with pytest.raises(InvalidInputError, match="belongs to split 'contrast'"):
        task_spec(f"hf:{other}")
    unnamed = tmp_path / "unnamed"
    _write_parquet(unnamed / "train.parquet", [_png(0), _png(1)], [0, 1], None)
    with pytest.raises(InvalidInputError, match="records no class names"):
        task_spec(f"hf:{unnamed}")
    unlabelled = tmp_path / "unlabelled"
    _write_parquet(unlabelled / "train.parquet", [_png(0), _png(1)], [0, 1], ["a", "b"])
    _write_parquet(unlabelled / "test.parquet", [_png(0)], [-1], ["a", "b"])
    with pytest.raises(InvalidInputError, match="unlabelled row"):
        load_split(f"hf:{unlabelled}", "test")
    linked = tmp_path / "linked"
    _write_parquet(linked / "train.parquet", [None, None], [0, 1], ["a", "b"], paths=True)
    dataset = load_split(f"hf:{linked}", "train", val_fraction=0.0)
    with pytest.raises(InvalidInputError, match=r"stores no image bytes.*only a path"):
        dataset[0]
    damaged = tmp_path / "damaged"
    _write_parquet(damaged / "train.parquet", [b"not a png", _png(1)], [0, 1], ["a", "b"])
    dataset = load_split(f"hf:{damaged}", "train", val_fraction=0.0)
    with pytest.raises(InvalidInputError, match=r"cannot read image .*row 0"):
        dataset[0]


def test_hf_without_pyarrow_names_the_extra(parquet_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(InvalidInputError, match="pyarrow") as info:
        task_spec(f"hf:{parquet_dir}")
    assert "tvtool[hf]" in (info.value.hint or "")


def test_hf_state_json_cannot_point_outside_its_folder(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.arrow"}]}))
    with pytest.raises(InvalidInputError, match=r"not an \.arrow file of its own folder"):
        task_spec(f"hf:{folder}")


def test_eval_reads_an_hf_directory_and_expands_suites(cli, parquet_dir, tmp_path):
    result = cli(["eval", "--base", "tvtool-tiny:random", "-d", f"hf:{parquet_dir}",
                  "--limit", "3", "--no-head-cache", "--json"])
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["total"] == 3
    # --suite 8 adds the eight names after -d: the first one missing under the root is named.
    empty = tmp_path / "root"
    empty.mkdir()
    missing = cli(["eval", "--base", "tvtool-tiny:random", "--suite", "8",
                   "--data-root", str(empty), "--limit", "2", "--no-head-cache"])
    assert missing.exit_code == 2 and "StanfordCars not found" in missing.stderr
    bad = cli(["eval", "--base", "tvtool-tiny:random", "--suite", "9"])
    assert bad.exit_code == 2 and "unknown suite" in bad.stderr
    twice = cli(["eval", "--base", "tvtool-tiny:random", "--suite", "8", "-d", "mnist"])
    assert twice.exit_code == 2 and "named twice" in twice.stderr


def test_pools_read_with_torch_data_loader_workers(parquet_dir):
    dataset = load_split(f"hf:{parquet_dir}", "train", val_fraction=0.0,
                         transform=lambda image: torch.from_numpy(np.asarray(image).copy()))
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, num_workers=1)
    labels = torch.cat([batch[1] for batch in loader]).tolist()
    assert labels == [i % 3 for i in range(14)]


# ---------------------------------------------------------------- merge --search-coef --suite


@pytest.fixture(scope="module")
def suite_vectors(files, tmp_path_factory):
    """Eight copies of a vector, each recording one of suite 8's datasets (shuffled, one Val)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("suite-vectors")
    with safe_open(files["tv1"], framework="pt") as handle:
        header = dict(handle.metadata())
    tensors = load_file(files["tv1"])
    names = [SUITES["8"][i] for i in (3, 0, 7, 5, 1, 6, 2, 4)]
    names[2] += "Val"
    paths = []
    for index, name in enumerate(names):
        path = root / f"v{index}.safetensors"
        save_file(tensors, str(path), metadata={**header, "tvtool.dataset": name})
        paths.append(str(path))
    return paths, names


def test_merge_search_suite_matches_vectors_by_their_datasets(suite_vectors, files, cli,
                                                              tmp_path):
    from tvtool.merge import MergeConfig
    from tvtool.workflows.merge_search import vector_datasets

    paths, names = suite_vectors
    config = MergeConfig(vectors=tuple(paths), output="-")
    assert vector_datasets(config, None, "8") == names
    with pytest.raises(UsageError, match="none for"):
        vector_datasets(MergeConfig(vectors=tuple(paths[:7]), output="-"), None, "8")
    with pytest.raises(UsageError, match="none for STL10"):
        vector_datasets(config, None, "14")
    with pytest.raises(UsageError, match="--suite or --dataset"):
        vector_datasets(config, list(SUITES["8"]), "8")
    out = tmp_path / "m.safetensors"
    base = ["merge", *paths, "-o", str(out)]
    no_search = cli([*base, "--suite", "8"])
    assert no_search.exit_code == 2 and "--search-coef" in no_search.stderr
    # With the search, the suite's datasets are what it evaluates: here, the first one
    # missing under an empty data root is named (exit 2, nothing written).
    empty = tmp_path / "root"
    empty.mkdir()
    search = cli([*base, "--search-coef", "--suite", "8", "--base", files["base"],
                  "--data-root", str(empty), "--limit", "2"])
    assert search.exit_code == 2 and "not found" in search.stderr and not out.exists()
    other = cli(["merge", files["tv1"], files["tv2"], "-o", str(out), "--search-coef",
                 "--suite", "8", "--base", files["base"]])
    assert other.exit_code == 2 and "records dataset 'task1', which is not in suite 8" in \
        other.stderr


def test_learn_coeffs_suite_adds_the_datasets(cli, files, tmp_path):
    args = ["learn-coeffs", files["tv1"], "-b", files["base"], "-o", str(tmp_path / "c.json")]
    none = cli(args)
    assert none.exit_code == 2 and "at least one --dataset" in none.stderr
    twice = cli([*args, "--suite", "8", "-d", "mnist"])
    assert twice.exit_code == 2 and "named twice" in twice.stderr
    empty = tmp_path / "root"
    empty.mkdir()
    missing = cli([*args, "--suite", "14", "--data-root", str(empty)])
    assert missing.exit_code == 2 and "not found" in missing.stderr
    assert not (tmp_path / "c.json").exists()


# ---------------------------------------------------------------- negate --search --suite


def test_negate_suite_controls_are_the_suite_without_the_target():
    from tvtool.workflows.negation import suite_controls

    notes: list[str] = []
    # Independent expectation: the references' 8-task list, minus the task being forgotten.
    expected = [name for name in SUITES["8"] if name != "MNIST"]
    assert suite_controls([], "8", "MNIST", notes.append) == expected
    assert notes == ["suite 8: MNIST is the target; the suite's other 7 datasets are controls"]
    assert suite_controls([], "8", "mnistval") == expected  # MNISTVal: the same task
    assert suite_controls(["ImageNet"], "14", "MNIST") == \
        ["ImageNet", *[n for n in SUITES["14"] if n != "MNIST"]]
    with pytest.raises(UsageError, match="named twice"):
        suite_controls(["svhn"], "8", "MNIST")
    with pytest.raises(UsageError, match="unknown suite"):
        suite_controls([], "9", "MNIST")


def test_negate_search_suite_reaches_the_search_and_the_provenance(files, tmp_path,
                                                                    monkeypatch):
    import tvtool.workflows.negation as negation
    from tvtool.evaluate import EvalSettings
    from tvtool.io import open_tensors
    from tvtool.metadata import FileMeta

    seen = {}

    def measure(settings, vector, grid, *, target, control, threshold, log, progress):
        seen.update(target=target, controls=list(control))
        accs = {target: 0.9, **{c: 0.8 for c in control}}
        search = negation.search_negation(lambda a: {k: v - 0.1 * a * (k == target)
                                                     for k, v in accs.items()},
                                          [0.5, 1.0], target=target, control=control,
                                          threshold=threshold)
        return negation.NegationMeasurement(search, search.best, {})

    monkeypatch.setattr(negation, "measure_negation", measure)
    out = tmp_path / "neg.safetensors"
    settings = EvalSettings(base=files["base"], device="cpu", limit=2)
    report = negation.search_negate(files["tv1"], str(out), settings, [0.5, 1.0], control=[],
                                    target="EuroSAT", suite="8")
    assert seen == {"target": "EuroSAT",
                    "controls": [n for n in SUITES["8"] if n != "EuroSAT"]}
    assert list(report.controls) == seen["controls"] and report.search.best == 1.0
    source = open_tensors(str(out))
    search = FileMeta.from_header(source.metadata, "neg").provenance["search"]
    source.close()
    assert search["suite"] == "8" and search["controls"] == seen["controls"]
    # The target's task named as a control under its Val name is refused.
    with pytest.raises(UsageError, match="same task"):
        negation.search_negate(files["tv1"], str(tmp_path / "x.safetensors"), settings,
                               [0.5], control=["EuroSATVal"], target="EuroSAT")


def test_negate_suite_on_the_command_line(cli, files, tmp_path):
    out = tmp_path / "neg.safetensors"
    args = ["negate", files["tv1"], "-o", str(out)]
    no_search = cli([*args, "--suite", "8"])
    assert no_search.exit_code == 2 and "--suite goes with --search" in no_search.stderr
    neither = cli([*args, "--search", "-b", files["base"]])
    assert neither.exit_code == 2 and "--suite" in neither.stderr
    twice = cli([*args, "--search", "-b", files["base"], "--suite", "8", "--control", "mnist",
                 "--target", "EuroSAT"])
    assert twice.exit_code == 2 and "named twice" in twice.stderr
    # The suite's datasets are what the search evaluates: the first one missing under an
    # empty data root is named (exit 2, nothing written).
    empty = tmp_path / "root"
    empty.mkdir()
    search = cli([*args, "--search", "-b", files["base"], "--suite", "8",
                  "--target", "synthetic:shape", "--data-root", str(empty), "--limit", "2",
                  "--device", "cpu"])
    assert search.exit_code == 2 and "not found" in search.stderr and not out.exists()
    assert any(name in search.stderr for name in SUITES["8"])
