"""Dataset files torchvision unpickles, read by tvtool without running code from them.

CIFAR-10/100 (python version) are plain pickles that torchvision reads with ``pickle.load``;
MNIST-family ``processed/*.pt`` files and ImageNet's ``meta.bin`` are ``torch.save`` files it
reads with ``torch.load``. Each parity test writes a miniature in the exact on-disk format
(for CIFAR also hand-assembled as Python 2's cPickle wrote the published files), reads it with
tvtool and with torchvision's own class, and compares every image and label, and the images
with the arrays the test wrote. Each hostile test hands tvtool a file whose unpickling would
write a marker file, and checks that it is refused (one line, exit 2) and the marker never
appears. torchvision checks the md5 sum of each CIFAR file, which a miniature cannot match:
that check (``torchvision.datasets.cifar.check_integrity``) is patched out where a test must
reach the reader itself.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from tvtool.data import catalog, load_split, unpickled
from tvtool.errors import InvalidInputError
from tvtool.io.dataset_pickles import read_cifar_batch
from tvtool.io.unpickle import PlainPickleBounds, read_plain_pickle

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


# ---------------------------------------------------------------- Python 2 pickles, by hand


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _py2_str(value: str | bytes) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    head = b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))
    return head + raw


class _Py2Pickler:
    """Protocol 2 as Python 2's cPickle wrote CIFAR's files: str as SHORT_BINSTRING/BINSTRING,
    every string and container memoized (BINPUT), lists in APPENDS of 1,000, and a numpy array
    through ``numpy.core.multiarray._reconstruct`` with its raw bytes as one str."""

    def __init__(self) -> None:
        self.memo = 0

    def put(self) -> bytes:
        self.memo += 1
        return b"q" + bytes([self.memo % 256]) if self.memo < 256 else \
            b"r" + struct.pack("<I", self.memo)

    def dump(self, value: object) -> bytes:
        if isinstance(value, bool):
            return b"\x88" if value else b"\x89"
        if isinstance(value, int):
            return _py2_int(value)
        if isinstance(value, (str, bytes)):
            return _py2_str(value) + self.put()
        if isinstance(value, list):
            out = [b"]", self.put()]
            for start in range(0, len(value), 1000):
                out.append(b"(" + b"".join(self.dump(v) for v in value[start:start + 1000])
                           + b"e")
            return b"".join(out)
        if isinstance(value, dict):
            return b"}" + self.put() + b"(" + b"".join(
                self.dump(k) + self.dump(v) for k, v in value.items()) + b"u"
        if isinstance(value, np.ndarray):
            assert value.dtype == np.uint8
            shape = b"(" + b"".join(_py2_int(n) for n in value.shape) + b"t"
            dtype = (b"cnumpy\ndtype\n" + self.put() + _py2_str("u1") + b"K\x00K\x01\x87R"
                     + self.put() + b"(K\x03" + _py2_str("|")
                     + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            return (b"cnumpy.core.multiarray\n_reconstruct\n" + self.put() + b"cnumpy\nndarray\n"
                    + self.put() + b"K\x00\x85" + _py2_str("b") + b"\x87R" + self.put()
                    + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(value.tobytes()) + b"tb")
        raise TypeError(type(value))


def py2_dumps(value: object) -> bytes:
    return b"\x80\x02" + _Py2Pickler().dump(value) + b"."


def _dumps(value: object, form: str) -> bytes:
    return py2_dumps(value) if form == "py2" else pickle.dumps(value, protocol=int(form))


# ---------------------------------------------------------------- miniature CIFAR roots


def _cifar_root(root: Path, name: str, form: str, per_batch: int = 7, seed: int = 0
                ) -> dict[str, tuple[np.ndarray, list[int]]]:
    """CIFAR10 or CIFAR100 under ``root`` with random images; returns what each file holds."""
    rng = np.random.default_rng(seed)
    if name == "CIFAR10":
        folder, files = root / "cifar-10-batches-py", [*CIFAR10_TRAIN, "test_batch"]
        key, names = "labels", list(catalog.CIFAR10_CLASSNAMES)
        meta = ("batches.meta", {"num_cases_per_batch": per_batch, "label_names": names,
                                 "num_vis": 3072})
    else:
        folder, files = root / "cifar-100-python", ["train", "test"]
        key, names = "fine_labels", list(catalog.CIFAR100_CLASSNAMES)
        meta = ("meta", {"fine_label_names": names,
                         "coarse_label_names": [f"coarse {i}" for i in range(20)]})
    folder.mkdir(parents=True)
    written = {}
    for index, file in enumerate(files):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, len(names), per_batch)]
        entry: dict[str, object] = {"batch_label": f"batch {index}", key: labels, "data": data,
                                    "filenames": [f"img_{index}_{i}.png" for i in
                                                  range(per_batch)]}
        if name == "CIFAR100":
            entry["coarse_labels"] = [v % 20 for v in labels]
        (folder / file).write_bytes(_dumps(entry, form))
        written[file] = (data, labels)
    (folder / meta[0]).write_bytes(_dumps(meta[1], form))
    return written


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's md5 check of CIFAR files, patched out (miniatures cannot match it)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("form", ["py2", "2", "4", "5"])
@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100"])
def test_cifar_gives_exactly_torchvisions_images_and_labels(tmp_path, no_md5, name, form):
    import torchvision.datasets as tvd

    written = _cifar_root(tmp_path, name, form)
    for train in (True, False):
        ours = unpickled.cifar(name, tmp_path, train, download=False)
        theirs = getattr(tvd, name)(str(tmp_path), train=train)
        assert len(ours) == len(theirs) == (35 if train and name == "CIFAR10" else 7)
        assert ours.classes == theirs.classes
        files = ([*CIFAR10_TRAIN] if name == "CIFAR10" else ["train"]) if train else \
            (["test_batch"] if name == "CIFAR10" else ["test"])
        # Independently: row r of a batch is the red, green, blue 32x32 planes of image r.
        expected = [(row.reshape(3, 32, 32).transpose(1, 2, 0), label)
                    for file in files for row, label in zip(*written[file], strict=True)]
        for index in range(len(theirs)):
            image, label = ours[index]
            their_image, their_label = theirs[index]
            assert image.mode == their_image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.asarray(their_image))
            assert np.array_equal(np.asarray(image), expected[index][0])
            assert label == their_label == expected[index][1]
            assert type(label) is int


def test_cifar_through_load_split_gives_the_same_examples(tmp_path, no_md5):
    import torchvision.datasets as tvd

    _cifar_root(tmp_path, "CIFAR100", "py2")
    test = load_split("CIFAR100", "test", data_root=tmp_path)
    theirs = tvd.CIFAR100(str(tmp_path), train=False)
    assert len(test) == len(theirs)
    for index in range(len(theirs)):
        image, label = test[index]
        assert np.array_equal(np.asarray(image), np.asarray(theirs[index][0]))
        assert label == theirs[index][1]


def test_cifar_files_are_checked_with_torchvisions_md5_sums(tmp_path):
    # Without the patch a miniature is not the published file: refused before it is read.
    _cifar_root(tmp_path, "CIFAR10", "py2")
    with pytest.raises(InvalidInputError, match="data_batch_1 is missing or is not the "
                                                "published file"):
        unpickled.cifar("CIFAR10", tmp_path, True, download=False)


def test_cifar_label_outside_the_classes_is_refused(tmp_path, no_md5):
    _cifar_root(tmp_path, "CIFAR10", "4")
    folder = tmp_path / "cifar-10-batches-py"
    entry = pickle.loads((folder / "test_batch").read_bytes())
    entry["labels"][3] = 10
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(InvalidInputError, match="holds the label 10, but its meta data names 10"):
        unpickled.cifar("CIFAR10", tmp_path, False, download=False)


# ---------------------------------------------------------------- hostile CIFAR files


class _Marker:
    """Unpickling it writes the marker file (the payload a hostile file would carry)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _OpenMarker(_Marker):
    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _ObjectArray(_Marker):
    """An object array holding the payload: numpy would unpickle its items as objects."""

    def __reduce__(self):
        array = np.empty(1, dtype=object)
        array[0] = _Marker(self.path)
        return array.__reduce__()


def _hostile_entries(marker: Path) -> dict[str, dict[str, object]]:
    images = np.zeros((1, 3072), np.uint8)
    return {
        "os.system as the root": {"evil": _Marker(marker)},
        "open in the labels": {"data": images, "labels": [_OpenMarker(marker)]},
        "an object array as data": {"data": _ObjectArray(marker), "labels": [0]},
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("case", list(_hostile_entries(Path("x"))))
def test_hostile_cifar_batch_is_refused_and_runs_nothing(tmp_path, no_md5, protocol, case):
    _cifar_root(tmp_path, "CIFAR10", "py2")
    marker = tmp_path / "marker"
    hostile = _hostile_entries(marker)[case]
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps(hostile, protocol=protocol))
    with pytest.raises(InvalidInputError) as info:
        unpickled.cifar("CIFAR10", tmp_path, True, download=False)
    assert "data_batch_3" in info.value.message and info.value.exit_code == 2
    assert "\n" not in info.value.one_line()
    assert not marker.exists()


def test_hostile_cifar_meta_is_refused_and_runs_nothing(tmp_path, no_md5):
    _cifar_root(tmp_path, "CIFAR100", "py2")
    marker = tmp_path / "marker"
    (tmp_path / "cifar-100-python" / "meta").write_bytes(
        pickle.dumps({"fine_label_names": _Marker(marker)}, protocol=2))
    with pytest.raises(InvalidInputError, match=r"names '(posix|os)\.system'"):
        unpickled.cifar("CIFAR100", tmp_path, False, download=False)
    assert not marker.exists()


def test_hostile_cifar_batch_on_the_command_line(cli, files, tmp_path, no_md5):
    _cifar_root(tmp_path, "CIFAR10", "py2")
    marker = tmp_path / "marker"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({"data": _Marker(marker)}, protocol=2))
    result = cli(["eval", "--base", files["base"], "-d", "CIFAR10", "--data-root",
                  str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("tvtool: error:") and result.stderr.count("\n") == 1
    assert "test_batch" in result.stderr and "does not run code" in result.stderr
    assert result.stdout == "" and not marker.exists()


# ---------------------------------------------------------------- bounds of the plain reader


class _Array:
    """Pickles as numpy pickles a uint8 array, with any declared shape and bytes."""

    def __init__(self, shape: tuple[int, ...], raw: bytes) -> None:
        self.shape, self.raw = shape, raw

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]
        return (reconstruct, (np.ndarray, (0,), b"b"),
                (1, self.shape, np.dtype(np.uint8), False, self.raw))


def _hostile_array(shape: tuple[int, ...], raw: bytes) -> bytes:
    return pickle.dumps({"data": _Array(shape, raw)}, protocol=2)


def test_declared_array_larger_than_the_file_is_refused_before_allocating(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_hostile_array((10**12, 3072), b"\x00" * 16))
    assert len(path.read_bytes()) < 300
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError, match="declares more bytes than the whole file"):
            read_cifar_batch(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_declared_array_not_matching_its_bytes_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_hostile_array((2, 3), b"\x00" * 5))
    with pytest.raises(InvalidInputError, match=r"holds 5 bytes, 6 expected"):
        read_cifar_batch(path)


def test_the_reference_reading_of_the_array_helper(tmp_path):
    # The helper above only rewrites the shape and bytes: with matching ones numpy reads it.
    raw = _hostile_array((2, 3), bytes(range(6)))
    assert np.array_equal(pickle.loads(raw)["data"], np.arange(6, dtype=np.uint8).reshape(2, 3))


def test_too_many_pickle_operations_are_refused_before_building(tmp_path):
    path = tmp_path / "many"
    path.write_bytes(pickle.dumps({"labels": list(range(5000))}, protocol=2))
    with pytest.raises(InvalidInputError, match="more than 1,000 pickle operations"):
        read_plain_pickle(path, "'many'", PlainPickleBounds(1024 * 1024, 1000))
    assert read_plain_pickle(path, "'many'", PlainPickleBounds(1024 * 1024, 10_000)) == {
        "labels": list(range(5000))}


def test_file_over_the_size_bound_is_refused(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(pickle.dumps(b"\x00" * 5000))
    with pytest.raises(InvalidInputError, match="larger than 4,096 bytes"):
        read_plain_pickle(path, "'big'", PlainPickleBounds(4096, 100))


@pytest.mark.parametrize("value", [np.zeros(3, np.int64), np.zeros(3, np.float32),
                                   np.zeros(2, dtype=[("a", np.uint8)]), {1, 2},
                                   np.uint8(3)])
def test_only_uint8_arrays_and_plain_values_are_admitted(tmp_path, value):
    path = tmp_path / "x"
    path.write_bytes(pickle.dumps({"data": value}, protocol=2))
    with pytest.raises(InvalidInputError):
        read_plain_pickle(path, "'x'", PlainPickleBounds(1024 * 1024, 1000))


def test_plain_pickle_keeps_what_the_format_holds(tmp_path):
    value = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"raw": b"\xff\x00",
             "names": ["a", "b"], "n": 3, "t": (1.5, None, True)}
    for protocol in (0, 2, 4, 5):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        got = read_plain_pickle(path, "'p'", PlainPickleBounds(1024 * 1024, 1000))
        assert set(got) == set(value) and np.array_equal(got["data"], value["data"])
        assert {k: v for k, v in got.items() if k != "data"} == {
            k: v for k, v in value.items() if k != "data"}
    fortran = np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3))
    path = tmp_path / "f"
    path.write_bytes(pickle.dumps(fortran, protocol=2))
    assert np.array_equal(read_plain_pickle(path, "'f'", PlainPickleBounds(4096, 100)),
                          fortran)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(InvalidInputError, match="FIFO"):
        read_plain_pickle(path, "'fifo'", PlainPickleBounds(4096, 100))


# ---------------------------------------------------------------- MNIST-family processed files


_MNIST_KIN = [("MNIST", None), ("FashionMNIST", None), ("KMNIST", None), ("EMNIST", "digits")]


def _processed(root: Path, name: str, split: str | None, zipped: bool, seed: int = 0
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    folder = root / name / "processed"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    written = {}
    for part, n in (("training", 9), ("test", 5)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen)
        file = f"{part}_{split}.pt" if split else f"{part}.pt"
        torch.save((images, labels), folder / file, _use_new_zipfile_serialization=zipped)
        written[part] = (images, labels)
    return written


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize(("name", "split"), _MNIST_KIN)
def test_processed_mnist_files_give_torchvisions_examples(tmp_path, name, split, zipped):
    import torchvision.datasets as tvd

    written = _processed(tmp_path, name, split, zipped)
    extra = {"split": split} if split else {}
    for train, part in ((True, "training"), (False, "test")):
        ours = unpickled.mnist_family(name, tmp_path, train, False, split=split)
        theirs = getattr(tvd, name)(str(tmp_path), train=train, **extra)
        assert len(ours) == len(theirs) == len(written[part][0])
        assert list(ours.classes) == list(theirs.classes)
        for index in range(len(theirs)):
            image, label = ours[index]
            their_image, their_label = theirs[index]
            assert image.mode == their_image.mode == "L"
            assert np.array_equal(np.asarray(image), np.asarray(their_image))
            assert np.array_equal(np.asarray(image), written[part][0][index].numpy())
            assert label == their_label == int(written[part][1][index])


def test_processed_mnist_through_load_split(tmp_path):
    written = _processed(tmp_path, "MNIST", None, True)
    test = load_split("MNIST", "test", data_root=tmp_path)
    assert len(test) == 5
    for index in range(5):
        image, label = test[index]
        grey = written["test"][0][index].numpy()
        assert np.array_equal(np.asarray(image), np.stack([grey] * 3, axis=-1))
        assert label == int(written["test"][1][index])


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_hostile_processed_mnist_file_is_refused_and_runs_nothing(tmp_path, zipped):
    _processed(tmp_path, "MNIST", None, zipped)
    marker = tmp_path / "marker"
    torch.save((torch.zeros(1, 28, 28, dtype=torch.uint8), _Evil(marker)),
               tmp_path / "MNIST" / "processed" / "test.pt",
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(InvalidInputError, match=r"system.*does not run code") as info:
        load_split("MNIST", "test", data_root=tmp_path)
    assert info.value.exit_code == 2 and not marker.exists()


def test_processed_mnist_file_of_other_content_is_refused(tmp_path):
    _processed(tmp_path, "KMNIST", None, True)
    path = tmp_path / "KMNIST" / "KMNIST" / "processed"
    path.mkdir(parents=True)
    torch.save((torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long)), path / "test.pt")
    torch.save((torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long)), path / "training.pt")
    with pytest.raises(InvalidInputError, match=r"torch\.float32 of shape .* not uint8"):
        load_split("KMNIST", "test", data_root=tmp_path)


def test_raw_mnist_files_are_still_read_by_torchvision(tmp_path):
    # Without processed files torchvision's class reads the raw idx files itself.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, 3, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, 3) + bytes([4, 5, 6]))
    test = unpickled.mnist_family("MNIST", tmp_path, False, False)
    assert not isinstance(test, unpickled.ArrayImages)
    assert [test[i][1] for i in range(3)] == [4, 5, 6]
    assert np.array_equal(np.asarray(test[2][0]), images[2])


# ---------------------------------------------------------------- ImageNet's meta.bin


def _imagenet(root: Path, meta: object) -> Path:
    from PIL import Image

    folder = root / "imagenet"
    folder.mkdir()
    torch.save(meta, folder / "meta.bin")
    for label, wnid in enumerate(("n01", "n02", "n03")):
        for split in ("train", "val"):
            path = folder / split / wnid / f"{wnid}_{split}.JPEG"
            path.parent.mkdir(parents=True)
            Image.new("RGB", (4, 4), (label * 60, 0, 0)).save(path)
    return folder


def test_imagenet_meta_gives_torchvisions_dataset(tmp_path):
    import torchvision.datasets as tvd

    from tvtool.io.images import read_image

    classes = {"n01": ("tench", "Tinca tinca"), "n02": ("goldfish",), "n03": ("shark",)}
    folder = _imagenet(tmp_path, (classes, ["n02", "n01"]))
    for part, split in (("train", "train"), ("test", "val")):
        ours = unpickled.imagenet(folder, part, read_image)
        theirs = tvd.ImageNet(str(folder), split=split, loader=read_image)
        assert ours.classes == theirs.classes == list(classes.values())
        assert ours.samples == theirs.samples
        assert [ours[i][1] for i in range(3)] == [theirs[i][1] for i in range(3)] == [0, 1, 2]


def test_hostile_imagenet_meta_is_refused_and_runs_nothing(tmp_path):
    from tvtool.io.images import read_image

    marker = tmp_path / "marker"
    folder = _imagenet(tmp_path, ({"n01": ("a",)}, [_Evil(marker)]))
    with pytest.raises(InvalidInputError, match="does not run code"):
        unpickled.imagenet(folder, "test", read_image)
    assert not marker.exists()


def test_py2_helper_matches_pickle_semantics():
    # The hand-assembled Python 2 stream reads back, with Python's own pickle, as written.
    value = {"data": np.arange(300, dtype=np.uint8).reshape(100, 3), "labels": list(range(2500)),
             "name": "x" * 300}
    loaded = pickle.load(io.BytesIO(py2_dumps(value)), encoding="latin1")
    assert np.array_equal(loaded["data"], value["data"])
    assert loaded["labels"] == value["labels"] and loaded["name"] == value["name"]


class _Plain:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("stream", [
    b"(S'touch MARKER'\nios\nsystem\n.",  # INST: find_class, then a call
    pickle.dumps(_Plain(), protocol=2),  # NEWOBJ + BUILD of a named class
    b"\x80\x02(X\x05\x00\x00\x00touch\x82\x01.",  # EXT1: the extension registry
    b"\x80\x02X\x01\x00\x00\x00aQ.",  # BINPERSID
])
def test_instances_and_outside_references_are_refused_unread(tmp_path, stream):
    path = tmp_path / "x"
    path.write_bytes(stream.replace(b"MARKER", str(tmp_path / "marker").encode()))
    with pytest.raises(InvalidInputError, match=r"never holds|not a readable pickle"):
        read_plain_pickle(path, "'x'", PlainPickleBounds(4096, 100))
    assert not (tmp_path / "marker").exists()


def test_shared_and_cyclic_containers_are_resolved_once(tmp_path):
    inner = [np.arange(3, dtype=np.uint8)]
    value: list[object] = [inner, inner, (inner,)]
    value.append(value)
    path = tmp_path / "x"
    path.write_bytes(pickle.dumps(value, protocol=2))
    got = read_plain_pickle(path, "'x'", PlainPickleBounds(4096, 100))
    assert got[0] is got[1] is got[2][0] and got[3] is got
    assert np.array_equal(got[0][0], np.arange(3))
    path.write_bytes(pickle.dumps({(1, 2): 3}, protocol=2))
    with pytest.raises(InvalidInputError, match="dict key of type tuple"):
        read_plain_pickle(path, "'x'", PlainPickleBounds(4096, 100))
