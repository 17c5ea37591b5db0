"""``imagefolder:PATH`` datasets built from PNG files the tests write."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tvtool.data import load_split, split_manifest, task_spec
from tvtool.errors import InvalidInputError
from tvtool.io.images import read_image

# Each class gets its own colour, so a loaded image tells which label it must carry.
COLOURS = {"cat": (250, 0, 0), "dog": (0, 0, 250), "a_b": (0, 250, 0), "c": (250, 250, 0)}


def _png(path: Path, colour: tuple[int, int, int], shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 8, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    pixels[0, 0] = shade  # makes every file distinct
    Image.fromarray(pixels).save(path)


def _fill(root: Path, classes: dict[str, int], sub: str = "") -> None:
    for name, count in classes.items():
        for i in range(count):
            _png(root / sub / name / f"img{i:02d}.png", COLOURS[name], shade=i)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagefolders")
    splits = base / "splits"
    _fill(splits, {"cat": 6, "dog": 4}, "train")
    _fill(splits, {"cat": 2, "dog": 2}, "test")
    # Hidden entries are ignored everywhere: a hidden class, a hidden file, a hidden sub-folder.
    (splits / "train" / ".thumbnails").mkdir()
    (splits / "train" / ".thumbnails" / "junk.txt").write_text("not an image")
    (splits / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    (splits / "README.txt").write_text("a file beside the split folders")

    single = base / "single"
    _fill(single, {"a_b": 10, "c": 10})
    _png(single / "c" / "nested" / "deep.png", COLOURS["c"], shade=99)
    # A mapping in an order other than the folders': matched by folder name.
    (single / "classnames.txt").write_text("c\tgamma\n\n# comment\na_b\talpha beta\n")
    (single / "templates.txt").write_text("a sketch of a {}.\na {} drawn small.\n")
    return {"splits": splits, "single": single, "base": base}


def _labels_match_colours(dataset, classes: list[str]) -> None:
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.mode == "RGB"
        assert tuple(np.asarray(image)[4, 4]) == COLOURS[classes[label]]


def test_split_layout_uses_the_test_folder_and_carves_val(folders):
    name = f"imagefolder:{folders['splits']}"
    spec = task_spec(name)
    assert spec.classnames == ("cat", "dog") and spec.templates == ("a photo of a {}.",)
    train, val, test = (load_split(name, s, val_fraction=0.2) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (8, 2, 4)
    assert set(train.indices).isdisjoint(val.indices)
    for dataset in (train, val, test):
        assert dataset.spec == spec
        _labels_match_colours(dataset, ["cat", "dog"])


def test_single_layout_reads_classnames_templates_and_nested_files(folders):
    name = f"imagefolder:{folders['single']}"
    spec = task_spec(name)
    assert spec.classnames == ("alpha beta", "gamma")
    assert spec.templates == ("a sketch of a {}.", "a {} drawn small.")
    parts = {s: load_split(name, s) for s in ("train", "val", "test")}
    # 21 images: 4 held out for test (20%), then 2 of the remaining 17 for val (10%).
    assert {s: len(d) for s, d in parts.items()} == {"train": 15, "val": 2, "test": 4}
    seen = [set(d.indices.tolist()) for d in parts.values()]
    assert set.union(*seen) == set(range(21)) and sum(map(len, seen)) == 21
    for dataset in parts.values():
        _labels_match_colours(dataset, ["a_b", "c"])


def test_transform_is_applied(folders):
    dataset = load_split(f"imagefolder:{folders['splits']}", "test",
                         transform=lambda image: np.asarray(image).shape)
    assert dataset[0] == ((8, 8, 3), 0)


def test_splits_are_seeded_and_manifest_is_location_independent(folders, tmp_path):
    name = f"imagefolder:{folders['single']}"
    a, b = split_manifest(name, seed=1), split_manifest(name, seed=1)
    c = split_manifest(name, seed=2)
    assert a == b
    assert a["hashes"]["test"] == c["hashes"]["test"]
    assert a["hashes"]["val"] != c["hashes"]["val"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(folders["single"], moved)
    d = split_manifest(f"imagefolder:{moved}", seed=1)
    assert d["hashes"] == a["hashes"] and d["counts"] == a["counts"]


def _broken(base: Path, label: str) -> Path:
    root = base / label
    _fill(root, {"cat": 3, "dog": 3})
    return root


def test_empty_class_folder_is_an_error(folders):
    root = _broken(folders["base"], "empty-class")
    (root / "bird").mkdir()
    with pytest.raises(InvalidInputError, match=r"'bird'.*no images"):
        load_split(f"imagefolder:{root}", "train")


def test_unreadable_image_is_an_error(folders):
    root = _broken(folders["base"], "corrupt")
    (root / "dog" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    datasets = [load_split(f"imagefolder:{root}", s) for s in ("train", "val", "test")]
    with pytest.raises(InvalidInputError, match=r"zz-broken\.png"):
        for dataset in datasets:
            for i in range(len(dataset)):
                dataset[i]
    with pytest.raises(InvalidInputError, match="cannot read image"):
        read_image(root / "dog" / "zz-broken.png")


def test_non_image_file_in_class_folder_is_an_error(folders):
    root = _broken(folders["base"], "stray-file")
    (root / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match=r"notes\.txt.*not an image"):
        load_split(f"imagefolder:{root}", "train")


def test_classnames_file_must_match_the_folders(folders):
    root = _broken(folders["base"], "bad-classnames")
    (root / "classnames.txt").write_text("only one\n")
    with pytest.raises(InvalidInputError, match="lists 1 class names but there are 2"):
        task_spec(f"imagefolder:{root}")


def test_plain_classnames_list_is_matched_by_folder_name(folders):
    # Listed in reverse order and spelled differently: matched to the folders, not by position.
    root = _broken(folders["base"], "classnames-by-name")
    (root / "classnames.txt").write_text("Dog\nCat\n")
    assert task_spec(f"imagefolder:{root}").classnames == ("Cat", "Dog")
    train = load_split(f"imagefolder:{root}", "train")
    _labels_match_colours(train, ["cat", "dog"])


def test_plain_classnames_list_of_other_names_is_ambiguous(folders):
    # The original failure: "dog" listed first would silently label every cat a dog.
    root = _broken(folders["base"], "classnames-ambiguous")
    (root / "classnames.txt").write_text("puppy\nkitten\n")
    with pytest.raises(InvalidInputError, match="order cannot be checked") as info:
        task_spec(f"imagefolder:{root}")
    assert "folder<TAB>class name" in info.value.hint


@pytest.mark.parametrize(("text", "message"), [
    ("cat\tkitten\n", "no name for class folder 'dog'"),
    ("cat\tkitten\ndog\tpuppy\nbird\tparrot\n", "folder 'bird', which is not a class"),
    ("cat\tkitten\ncat\tmoggy\ndog\tpuppy\n", "folder 'cat' twice"),
    ("cat\tkitten\npuppy\n", "is not 'folder<TAB>class name'"),
])
def test_classnames_mapping_must_cover_each_folder_once(folders, text, message):
    root = _broken(folders["base"], f"classnames-map-{abs(hash(text)) % 10**6}")
    (root / "classnames.txt").write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        task_spec(f"imagefolder:{root}")


def test_classnames_mapping_gives_names_in_label_order(folders):
    root = _broken(folders["base"], "classnames-map")
    (root / "classnames.txt").write_text("dog\tpuppy\ncat\tkitten\n")
    assert task_spec(f"imagefolder:{root}").classnames == ("kitten", "puppy")


def test_test_folder_without_train_is_an_error(folders):
    # The original failure: read as one class named "test", 100% accuracy, exit 0.
    root = folders["base"] / "test-only"
    _fill(root, {"cat": 2, "dog": 2}, "test")
    with pytest.raises(InvalidInputError, match=r"split folders \('test'\) but no training"):
        task_spec(f"imagefolder:{root}")


def test_single_class_is_an_error(folders):
    root = folders["base"] / "one-class"
    _fill(root, {"cat": 4})
    with pytest.raises(InvalidInputError, match=r"only one class folder \('cat'\)"):
        task_spec(f"imagefolder:{root}")
    split_root = folders["base"] / "one-class-split"
    _fill(split_root, {"cat": 4}, "train")
    with pytest.raises(InvalidInputError, match="at least two classes"):
        task_spec(f"imagefolder:{split_root}")


def test_class_folder_named_like_a_split_is_an_error(folders):
    root = folders["base"] / "nested-split"
    _fill(root, {"cat": 2, "dog": 2}, "train")
    _fill(root / "train", {"cat": 2}, "Test")
    with pytest.raises(InvalidInputError, match=r"'Test'.*named like a split"):
        task_spec(f"imagefolder:{root}")


def test_common_split_names_are_recognised_in_any_case(folders):
    # The original failure: validation/ and Test/ ignored, test carved out of train/.
    root = folders["base"] / "split-names"
    _fill(root, {"cat": 6, "dog": 6}, "Training")
    _fill(root, {"cat": 3, "dog": 2}, "validation")
    _fill(root, {"cat": 4, "dog": 5}, "Test")
    name = f"imagefolder:{root}"
    sizes = {s: len(load_split(name, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 5, "test": 9}
    for split in ("train", "val", "test"):
        _labels_match_colours(load_split(name, split), ["cat", "dog"])
    assert split_manifest(name)["source"]["split_folders"] == ["train", "val", "test"]


def test_unknown_folder_beside_the_splits_is_an_error(folders):
    root = folders["base"] / "stray-split"
    _fill(root, {"cat": 2, "dog": 2}, "train")
    _fill(root, {"cat": 2, "dog": 2}, "holdout")
    with pytest.raises(InvalidInputError, match="'holdout' beside its split folders"):
        task_spec(f"imagefolder:{root}")


def test_two_folders_for_one_split_are_an_error(folders):
    root = folders["base"] / "two-vals"
    _fill(root, {"cat": 2, "dog": 2}, "train")
    _fill(root, {"cat": 1, "dog": 1}, "val")
    _fill(root, {"cat": 1, "dog": 1}, "Validation")
    with pytest.raises(InvalidInputError, match="two val folders"):
        task_spec(f"imagefolder:{root}")


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    # The original failure: convert("RGB") clipped every value above 255 to white.
    values = np.array([[0, 257, 1000], [32768, 60000, 65535]], dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # PIL really reads it as a 16-bit image
    image = read_image(path)
    expected = np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert image.mode == "RGB"
    for channel in range(3):
        assert np.array_equal(np.asarray(image)[..., channel], expected)


def test_templates_need_a_placeholder(folders):
    root = _broken(folders["base"], "bad-templates")
    (root / "templates.txt").write_text("a photo\n")
    with pytest.raises(InvalidInputError, match="exactly one"):
        task_spec(f"imagefolder:{root}")


def test_test_class_missing_from_train_is_an_error(folders):
    root = folders["base"] / "mismatch"
    _fill(root, {"cat": 2, "dog": 2}, "train")
    _fill(root, {"cat": 1, "c": 1}, "test")
    with pytest.raises(InvalidInputError, match="training folder lacks"):
        load_split(f"imagefolder:{root}", "test")


@pytest.mark.parametrize("suffix", ["does-not-exist", "file.png"])
def test_missing_or_non_directory_path_is_an_error(folders, suffix):
    target = folders["base"] / suffix
    if suffix.endswith(".png"):
        _png(target, (1, 2, 3))
    with pytest.raises(InvalidInputError, match=r"does not exist|not a directory"):
        task_spec(f"imagefolder:{target}")


def test_folder_without_classes_is_an_error(folders):
    root = folders["base"] / "no-classes"
    root.mkdir()
    (root / ".hidden").mkdir()
    with pytest.raises(InvalidInputError, match="no class folders"):
        task_spec(f"imagefolder:{root}")


# ------------------------------------------------------------ hostile folders (issue 22)


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO read blocks forever without a writer)."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_labels_follow_torchvision_imagefolder_class_order(tmp_path):
    # Independent reference: torchvision's ImageFolder sorts class folders by name, case
    # included ('B' < 'a' < 'c'); a case-insensitive sort would swap the first two labels.
    from torchvision.datasets import ImageFolder

    for index, name in enumerate(["B", "a", "c"]):
        for i in range(2):
            _png(tmp_path / name / f"{i}.png", (40 * index, 0, 0), shade=i)
    expected = ImageFolder(str(tmp_path)).class_to_idx
    name = f"imagefolder:{tmp_path}"
    assert list(task_spec(name).classnames) == sorted(expected, key=expected.__getitem__)
    train = load_split(name, "train", val_fraction=0.0)
    for i in range(len(train)):
        image, label = train[i]
        red = int(np.asarray(image)[4, 4, 0])
        assert label == expected[["B", "a", "c"][red // 40]]


def test_fifo_in_a_class_folder_is_refused_before_anything_is_read(folders):
    root = _broken(folders["base"], "fifo")
    os.mkfifo(root / "cat" / "zz-pipe.png")
    with _deadline(10), pytest.raises(InvalidInputError, match=r"zz-pipe\.png.*a FIFO"):
        load_split(f"imagefolder:{root}", "train")


def test_reading_a_fifo_as_an_image_does_not_block(tmp_path):
    # The reader checks what it opened too (the file may change after the folder scan).
    os.mkfifo(tmp_path / "pipe.png")
    with _deadline(10), pytest.raises(InvalidInputError, match="a FIFO, not a regular file"):
        read_image(tmp_path / "pipe.png")


def test_symlink_loop_and_dangling_link_are_refused(folders):
    root = _broken(folders["base"], "link-loop")
    (root / "cat" / "again").symlink_to(root / "cat", target_is_directory=True)
    with _deadline(10), pytest.raises(InvalidInputError, match="already read"):
        load_split(f"imagefolder:{root}", "train")
    root = _broken(folders["base"], "dangling")
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    with pytest.raises(InvalidInputError, match=r"gone\.png.*dangling"):
        load_split(f"imagefolder:{root}", "train")


@pytest.mark.parametrize(("classes", "text"), [
    ({"cat": 1, "dog": 1}, "cat\tanimal\ndog\tanimal\n"),
    ({"cat": 1, "dog": 1}, "cat\tpet dog\ndog\tpet  dog\n"),  # the same once spaces collapse
])
def test_two_folders_with_one_class_name_are_refused(tmp_path, classes, text):
    _fill(tmp_path, classes)
    (tmp_path / "classnames.txt").write_text(text)
    with pytest.raises(InvalidInputError, match="get the same class name"):
        task_spec(f"imagefolder:{tmp_path}")


def test_folder_names_that_become_one_class_name_are_refused(tmp_path):
    for name in ("sea_lion", "sea lion"):
        _png(tmp_path / name / "0.png", (1, 2, 3))
    with pytest.raises(InvalidInputError, match="'sea lion' and 'sea_lion' get the same"):
        task_spec(f"imagefolder:{tmp_path}")


def test_too_many_templates_are_refused(tmp_path):
    from tvtool.limits import MAX_TEMPLATES

    _fill(tmp_path, {"cat": 1, "dog": 1})
    (tmp_path / "templates.txt").write_text("a {}.\n" * (MAX_TEMPLATES + 1))
    with pytest.raises(InvalidInputError, match=f"holds {MAX_TEMPLATES + 1:,} templates"):
        task_spec(f"imagefolder:{tmp_path}")
    (tmp_path / "templates.txt").write_text("a {}.\n" * MAX_TEMPLATES)
    assert len(task_spec(f"imagefolder:{tmp_path}").templates) == MAX_TEMPLATES


@pytest.mark.parametrize("line", ["a {} {0:>999999999}", "a {} and {{}}", "{x} {}"])
def test_templates_with_other_braces_are_refused(tmp_path, line):
    _fill(tmp_path, {"cat": 1, "dog": 1})
    (tmp_path / "templates.txt").write_text(line + "\n")
    with pytest.raises(InvalidInputError, match="no other brace"):
        task_spec(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("name", ["templates.txt", "classnames.txt"])
def test_text_lists_are_bounded_and_regular(tmp_path, name):
    from tvtool.limits import MAX_TEXT_LIST_BYTES

    _fill(tmp_path, {"cat": 1, "dog": 1})
    (tmp_path / name).write_text("# " + "x" * MAX_TEXT_LIST_BYTES + "\n")
    with pytest.raises(InvalidInputError, match="larger than 1024 KiB"):
        task_spec(f"imagefolder:{tmp_path}")
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)  # was silently ignored: the defaults were used instead
    with _deadline(10), pytest.raises(InvalidInputError, match="a FIFO, not a regular file"):
        task_spec(f"imagefolder:{tmp_path}")


def test_images_past_the_pixel_bound_are_refused_before_decoding(tmp_path, monkeypatch):
    from tvtool.io import images

    path = tmp_path / "big.png"
    Image.new("RGB", (101, 100)).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 101 * 100 - 1)
    with pytest.raises(InvalidInputError, match=r"101 × 100 pixels, more than 10,099"):
        read_image(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 101 * 100)
    assert read_image(path).size == (101, 100)


def test_sixteen_bit_images_decode_without_wide_temporaries(tmp_path, monkeypatch):
    # The reported input: a 16-bit PNG took int64 and float64 copies (24 bytes a pixel). Now
    # only the 8-bit result (1 byte a pixel) and one slice of rows at a time are allocated.
    from tvtool.io import images

    monkeypatch.setattr(images, "_ROWS_PER_SLICE", 32)
    side = 1024
    values = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16)
    values = values.reshape(side, side)
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    tracemalloc.start()
    try:
        image = read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * side * side, f"{peak / side / side:.1f} bytes a pixel of numpy temporaries"
    expected = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 0], expected)
