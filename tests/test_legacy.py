"""The restricted unpickler and `tvtool convert`: pickled checkpoints, read without running code."""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvtool.models  # noqa: F401 - registers the tvtool-tiny open_clip config
from tests.conftest import TINY, load
from tvtool.errors import InvalidInputError
from tvtool.io import load_legacy, read_checkpoint, read_pickled_checkpoint
from tvtool.io.names import strip_wrapper_prefixes
from tvtool.io.unpickle import Stub

SENTINEL_ENV = "TVTOOL_TEST_SENTINEL"


def _touch_sentinel(*_: object) -> None:
    Path(os.environ[SENTINEL_ENV]).write_text("pickle code ran")


class EvilReduce:
    """Unpickling this runs os.system (the classic pickle exploit)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class EvilModule(torch.nn.Module):
    """A module wrapping a CLIP model whose unpickling writes a file (via __setstate__)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.note = "published checkpoints pickle whole wrapper modules like this"

    def __setstate__(self, state: dict) -> None:
        _touch_sentinel()
        super().__setstate__(state)


class ImageEncoder(torch.nn.Module):
    """Like the published task-vector code: an open_clip model as `.model`, text tower dropped."""

    def __init__(self, keep_lang: bool = False) -> None:
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = \
            open_clip.create_model_and_transforms(TINY)
        if not keep_lang:
            delattr(self.model, "transformer")


@pytest.fixture()
def sentinel(tmp_path, monkeypatch):
    path = tmp_path / "SENTINEL"
    monkeypatch.setenv(SENTINEL_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder()


def _shared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items()}


# ---------------------------------------------------------------- no code runs


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_module_with_setstate_is_read_without_running_it(tmp_path, sentinel, encoder,
                                                                 zip_format):
    path = tmp_path / "evil.pt"
    torch.save(EvilModule(encoder.model), path, _use_new_zipfile_serialization=zip_format)
    # Control: an ordinary unpickle of this file runs the module's code.
    torch.load(path, weights_only=False)
    assert sentinel.exists()
    sentinel.unlink()

    checkpoint = read_pickled_checkpoint(str(path))
    assert not sentinel.exists()
    expected = encoder.model.state_dict()
    assert set(checkpoint.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(checkpoint.tensors[name], tensor), name
    assert checkpoint.stripped_prefix == "model."
    assert any(name.endswith("EvilModule") for name in checkpoint.classes)


@pytest.mark.parametrize("zip_format", [True, False])
def test_os_system_reduce_in_a_checkpoint_stays_inert(tmp_path, sentinel, encoder, zip_format):
    path = tmp_path / "evil.pt"
    payload = {"state_dict": encoder.model.state_dict(), "extra": EvilReduce(sentinel)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    checkpoint = read_pickled_checkpoint(str(path))
    assert not sentinel.exists()
    assert "posix.system" in checkpoint.classes or "os.system" in checkpoint.classes
    assert len(checkpoint.tensors) == len(encoder.model.state_dict())


def test_plain_pickle_exploit_is_refused_and_inert(tmp_path, sentinel):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(EvilReduce(sentinel), protocol=2))
    pickle.loads(path.read_bytes())  # control: an ordinary unpickle runs the command
    assert sentinel.exists()
    sentinel.unlink()
    with pytest.raises(InvalidInputError, match=r"neither a state dict nor an nn\.Module"):
        read_pickled_checkpoint(str(path))
    assert not sentinel.exists()


def test_exploit_as_state_dict_value_is_refused(tmp_path, sentinel):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "bias": EvilReduce(sentinel)}, path)
    with pytest.raises(InvalidInputError, match="neither a state dict nor a module"):
        read_pickled_checkpoint(str(path))
    assert not sentinel.exists()


def test_stub_records_instead_of_running():
    class Demo(Stub):
        stub_module, stub_name = "os", "system"

    made = Demo("touch x")
    made.__setstate__({"a": 1})
    made.append(3)
    made["k"] = "v"
    assert made.stub_args == ("touch x",)
    assert made.stub_state == {"a": 1}
    assert made.stub_items == [3]
    assert made.stub_mapping == {"k": "v"}
    assert isinstance(made("again"), Stub)
    assert "os.system" in repr(made)


# ---------------------------------------------------------------- what is read


@pytest.mark.parametrize("zip_format", [True, False])
def test_whole_image_encoder_module(tmp_path, encoder, zip_format):
    path = tmp_path / "finetuned.pt"
    torch.save(encoder, path, _use_new_zipfile_serialization=zip_format)
    checkpoint = read_pickled_checkpoint(str(path))
    expected = encoder.state_dict()  # names under "model."
    assert {f"model.{name}" for name in checkpoint.tensors} == set(expected)
    for name, tensor in checkpoint.tensors.items():
        assert torch.equal(tensor, expected[f"model.{name}"])
    assert "ImageEncoder" in checkpoint.container
    assert not any(name.startswith("transformer.") for name in checkpoint.tensors)


def test_non_persistent_buffers_are_left_out(tmp_path):
    module = torch.nn.Linear(2, 2)
    module.register_buffer("scratch", torch.zeros(3), persistent=False)
    module.register_buffer("kept", torch.ones(1))
    path = tmp_path / "m.pt"
    torch.save(module, path)
    assert set(load_legacy(str(path))) == {"weight", "bias", "kept"}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_state_dict_layouts(tmp_path, encoder, wrap):
    state = encoder.model.state_dict()
    payload = {
        "plain": state,
        "state_dict": {"epoch": 3, "state_dict": state},
        "model": {"model": OrderedDict(state)},
        "module_prefix": {f"module.model.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "sd.pt"
    torch.save(payload, path)
    tensors = load_legacy(str(path))
    assert set(tensors) == set(state)


def test_dtypes_views_and_shared_storage_survive(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"full": base, "view": base[1:3, ::2], "half": torch.ones(3, dtype=torch.float16),
               "bf16": torch.full((2,), 1.5, dtype=torch.bfloat16),
               "int": torch.arange(5), "flag": torch.tensor([True, False])}
    path = tmp_path / "mixed.pt"
    torch.save(tensors, path)
    loaded = load_legacy(str(path))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].is_contiguous()


def test_read_checkpoint_accepts_plain_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"module.a": torch.ones(2)}, str(path))
    checkpoint = read_checkpoint(str(path))
    assert list(checkpoint.tensors) == ["a"]
    with pytest.raises(InvalidInputError):
        read_pickled_checkpoint(str(path))


def test_strip_wrapper_prefixes():
    assert strip_wrapper_prefixes(["module.model.a", "module.model.b"]) == (
        {"module.model.a": "a", "module.model.b": "b"}, "module.model.")
    assert strip_wrapper_prefixes(["model.a", "b"])[1] == ""
    assert strip_wrapper_prefixes(["model."])[1] == ""


# ---------------------------------------------------------------- malformed files


def _torch_zip(path: Path, root: object, storages: dict[str, bytes]) -> None:
    """A torch-style zip whose data.pkl is pickled with our own persistent ids."""

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object):
            return obj.pid if isinstance(obj, _Storage) else None

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(root)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)


class _Storage:
    def __init__(self, key: str, numel: int, storage_type: object = torch.FloatStorage) -> None:
        self.pid = ("storage", storage_type, key, "cpu", numel)


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


FOUR_FLOATS = struct.pack("<4f", 1, 2, 3, 4)


def test_handmade_zip_reads(tmp_path):
    path = tmp_path / "ok.pt"
    _torch_zip(path, {"w": _Tensor(_Storage("0", 4), 1, (2,), (1,))}, {"0": FOUR_FLOATS})
    assert torch.equal(load_legacy(str(path))["w"], torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize(("root", "storages", "message"), [
    ({"w": _Tensor(_Storage("0", 4), 3, (2,), (1,))}, {"0": FOUR_FLOATS}, "past the end"),
    ({"w": _Tensor(_Storage("0", 4), -1, (2,), (1,))}, {"0": FOUR_FLOATS}, "storage offset"),
    ({"w": _Tensor(_Storage("0", 4), 0, (2, 2), (1,))}, {"0": FOUR_FLOATS}, "differ in length"),
    ({"w": _Tensor(_Storage("0", 4), 0, ("a",), (1,))}, {"0": FOUR_FLOATS}, "malformed tensor"),
    ({"w": _Tensor(_Storage("0", 8), 0, (2,), (1,))}, {"0": FOUR_FLOATS}, "truncated"),
    ({"w": _Tensor(_Storage("1", 4), 0, (2,), (1,))}, {"0": FOUR_FLOATS}, "missing"),
    ({"w": _Tensor(_Storage("0", 4, EvilReduce), 0, (2,), (1,))}, {"0": FOUR_FLOATS},
     "unsupported storage type"),
    ({"w": torch.ones(1).numpy()}, {}, "not a model|neither"),
    ({}, {}, "neither a state dict"),
])
def test_malformed_torch_zip(tmp_path, root, storages, message):
    path = tmp_path / "bad.pt"
    _torch_zip(path, root, storages)
    with pytest.raises(InvalidInputError, match=message):
        read_pickled_checkpoint(str(path))


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(InvalidInputError, match="not a torch checkpoint"):
        read_pickled_checkpoint(str(path))


# Fixed bytes (not os.urandom at collection time): stable test ids, reproducible failures.
@pytest.mark.parametrize("content", [b"", b"hello world", b"\x80\x02",
                                     random.Random(300).randbytes(300)])
def test_garbage_is_invalid_input(tmp_path, content):
    path = tmp_path / "g.pt"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError):
        read_pickled_checkpoint(str(path))


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncations_are_invalid_input(tmp_path, zip_format):
    path = tmp_path / "t.pt"
    torch.save({"a": torch.arange(64, dtype=torch.float32)}, path,
               _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    for cut in (1, len(data) // 3, len(data) // 2, len(data) - 9, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidInputError):
            read_pickled_checkpoint(str(path))


_SMALL = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}


def _saved(zip_format: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(_SMALL, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(zip_format=st.booleans(), data=st.data())
def test_byte_mutations_never_crash(tmp_path, zip_format, data):
    original = _saved(zip_format)
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(mutated))
    try:
        tensors = load_legacy(str(path))
    except InvalidInputError as exc:
        assert "\n" not in exc.one_line()
    else:
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())


# ---------------------------------------------------------------- the convert command


def test_convert_whole_module_loads_in_open_clip(cli, tmp_path, sentinel):
    torch.manual_seed(1)
    full = ImageEncoder(keep_lang=True)
    path = tmp_path / "finetuned.pt"
    torch.save(EvilModule(full.model), path)
    out = tmp_path / "converted.safetensors"
    result = cli(["convert", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert not sentinel.exists()
    assert "architecture tvtool-tiny" in result.stderr
    model = open_clip.create_model(TINY, pretrained=str(out))
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    meta = open_tensors_meta(out)
    assert meta["tvtool.kind"] == "checkpoint"
    assert meta["tvtool.architecture"] == TINY


def open_tensors_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata())


def test_convert_image_encoder_then_extract(cli, tmp_path, files, encoder):
    path = tmp_path / "ft.pt"
    torch.save(encoder, path)
    converted = tmp_path / "ft.safetensors"
    result = cli(["convert", str(path), "-o", str(converted), "--json"])
    assert result.exit_code == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["details"]["missing"] > 0  # the text transformer was dropped
    # Only the text tower is missing: extract's default (the image encoder) needs no flag.
    assert "none is in the image encoder" in result.stderr
    vector = tmp_path / "tv.safetensors"
    whole = cli(["extract", str(converted), "--base", files["base"], "-o", str(vector),
                 "--keep", "all"])
    assert whole.exit_code == 2 and "--allow-missing" in whole.stderr
    ok = cli(["extract", str(converted), "--base", files["base"], "-o", str(vector)])
    assert ok.exit_code == 0, ok.stderr
    base = load(files["base"])
    delta = load(str(vector))
    assert set(delta) == {n for n, t in base.items()
                          if n.startswith("visual.") and t.is_floating_point()}
    for name, tensor in delta.items():
        torch.testing.assert_close(tensor, encoder.model.state_dict()[name] - base[name])


def test_convert_from_stdin_and_to_stdout(cli, tmp_path, encoder):
    buffer = io.BytesIO()
    torch.save(encoder.model.state_dict(), buffer)
    result = cli(["convert", "-", "-o", "-", "--architecture", TINY], input=buffer.getvalue())
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load as load_bytes

    tensors = load_bytes(result.stdout_bytes)
    assert set(tensors) == set(encoder.model.state_dict())


def test_convert_state_dict_ambiguity_and_wrong_architecture(cli, tmp_path, encoder):
    path = tmp_path / "sd.pt"
    torch.save(encoder.model.state_dict(), path)
    out = tmp_path / "o.safetensors"
    wrong = cli(["convert", str(path), "-o", str(out), "--architecture", "ViT-B-32"])
    assert wrong.exit_code == 2
    assert "does not fit ViT-B-32" in wrong.stderr
    unknown = cli(["convert", str(path), "-o", str(out), "--architecture", "nope"])
    assert unknown.exit_code == 2 and "unknown architecture" in unknown.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd.pt"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "bad.pt' is empty"),
    (b"not a checkpoint at all", "is neither a torch zip archive nor a pickle"),
    (b"\x80\x02garbage", "is not a readable torch checkpoint: pickle data was truncated")])
def test_convert_bad_inputs(cli, tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    out = tmp_path / "o.safetensors"
    result = cli(["convert", str(path), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith("tvtool: error: ")
    assert result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_convert_refuses_output_equal_to_input(cli, tmp_path, encoder):
    path = tmp_path / "sd.pt"
    torch.save(encoder.model.state_dict(), path)
    result = cli(["convert", str(path), "-o", str(path)])
    assert result.exit_code == 2 and "also an input" in result.stderr


def test_modules_named_by_the_file_are_never_imported(tmp_path, monkeypatch, sentinel):
    # A module whose import alone writes the sentinel; pickle's own find_class would import it.
    package = tmp_path / "evilpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "modeling.py").write_text(
        "import os, pathlib, torch\n"
        "pathlib.Path(os.environ['TVTOOL_TEST_SENTINEL']).write_text('imported')\n"
        "class ImageEncoder(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.model = torch.nn.Linear(2, 2)\n")
    path = tmp_path / "finetuned.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); "
            "from evilpkg.modeling import ImageEncoder; torch.save(ImageEncoder(), sys.argv[2])")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(path)], check=True)
    sentinel.unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = read_pickled_checkpoint(str(path))
    assert set(checkpoint.tensors) == {"weight", "bias"}
    assert "evilpkg.modeling.ImageEncoder" in checkpoint.classes
    assert not sentinel.exists()
    assert "evilpkg.modeling" not in sys.modules
