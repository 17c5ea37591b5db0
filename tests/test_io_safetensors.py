"""tvtool.io: safetensors reading/writing, atomic outputs, stdin/stdout, malformed files."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import stat
import struct
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvtool.commands.inspect import InspectConfig
from tvtool.commands.inspect import inspect as run_inspect
from tvtool.commands.negate import NegateConfig
from tvtool.commands.negate import negate as run_negate
from tvtool.errors import InvalidInputError, NumericalError, TvtoolError
from tvtool.io import (
    TensorInfo,
    check_distinct_paths,
    check_output,
    open_tensors,
    read_json,
    write_bytes,
    write_json,
    write_tensors,
)
from tvtool.io import safetensors_io as sio
from tvtool.metadata import FileMeta, Kind, Mode

VECTOR_META = FileMeta(kind=Kind.TASK_VECTOR, architecture="tvtool-tiny", base_ref="b",
                       base_fingerprint="sha256:" + "0" * 64, mode=Mode.FULL,
                       dataset="d").to_header()


def small_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=gen),
            "a.bias": torch.randn(4, generator=gen).half(),
            "b": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
            "c": torch.randn(5, generator=gen).double()}


def raw_file(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    tensors = small_tensors()
    path = tmp_path / "v.safetensors"
    write_tensors(str(path), tensors, VECTOR_META)
    source = open_tensors(str(path))
    try:
        assert source.metadata == VECTOR_META
        assert source.keys() == list(tensors)
        for name, tensor in tensors.items():
            got = source.get(name)
            assert got.dtype == tensor.dtype
            assert torch.equal(got.view(torch.uint8), tensor.contiguous().view(torch.uint8))
            assert source.info(name) == TensorInfo(name, tensor.dtype, tuple(tensor.shape))
    finally:
        source.close()
    assert FileMeta.from_header(source.metadata, "x").to_header() == VECTOR_META


def test_streaming_write_with_layout(tmp_path):
    tensors = small_tensors()
    layout = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    made: list[str] = []

    def produce():
        for name, tensor in tensors.items():
            made.append(name)
            yield name, tensor

    path = tmp_path / "s.safetensors"
    write_tensors(str(path), produce(), {}, layout=layout)
    assert made == list(tensors)
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(str(path))[n], t) for n, t in tensors.items())


def test_writer_refuses_a_producer_that_breaks_its_layout(tmp_path):
    layout = [TensorInfo("x", torch.float32, (2,))]
    path = tmp_path / "o.safetensors"
    with pytest.raises(TvtoolError, match="internal error"):
        write_tensors(str(path), iter([("x", torch.ones(3))]), {}, layout=layout)
    with pytest.raises(TypeError):
        write_tensors(str(path), iter([]), {})
    assert listing(tmp_path) == []


def test_output_permissions_follow_umask(tmp_path):
    path = tmp_path / "p.safetensors"
    old = os.umask(0o022)
    try:
        write_tensors(str(path), {"x": torch.ones(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


class _FakeStdout:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, text: str) -> int:
        return self.buffer.write(text.encode())

    def flush(self) -> None:
        pass


def test_stdout_and_stdin(monkeypatch):
    tensors = small_tensors()
    fake = _FakeStdout()
    monkeypatch.setattr(sys, "stdout", fake)
    write_tensors("-", tensors, VECTOR_META)
    data = fake.buffer.getvalue()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    source = open_tensors("-")
    try:
        assert source.label == "stdin"
        assert source.metadata == VECTOR_META
        assert torch.equal(source.get("c"), tensors["c"])
    finally:
        source.close()


def test_empty_stdin_is_invalid(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(InvalidInputError, match="stdin was empty"):
        open_tensors("-")


def test_json_and_bytes_helpers(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_json(str(path), {"a": [1, 2]})
    assert read_json(str(path)) == {"a": [1, 2]}
    path.write_text("{nope")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_json(str(path))
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_json(str(tmp_path / "missing.json"))
    fake = _FakeStdout()
    monkeypatch.setattr(sys, "stdout", fake)
    write_bytes("-", b"\x89PNG")
    assert fake.buffer.getvalue() == b"\x89PNG"


# ---------------------------------------------------------------- atomic writes


def _failing_after(count: int, exc: BaseException):
    calls = {"n": 0}
    real = sio._write

    def write(handle, data):
        calls["n"] += 1
        if calls["n"] > count:
            raise exc
        real(handle, data)

    return write


@pytest.mark.parametrize("exc", [RuntimeError("injected crash"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_target_unchanged(tmp_path, monkeypatch, exc):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous content")
    monkeypatch.setattr(sio, "_write", _failing_after(2, exc))
    with pytest.raises(type(exc)):
        write_tensors(str(path), small_tensors())
    assert path.read_bytes() == b"previous content"
    assert listing(tmp_path) == ["out.safetensors"]


def test_disk_full_is_a_clean_error(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    monkeypatch.setattr(sio, "_write", _failing_after(1, OSError(errno.ENOSPC, "No space")))
    with pytest.raises(TvtoolError, match="no space left on device") as info:
        write_tensors(str(path), small_tensors())
    assert info.value.exit_code == 1
    assert listing(tmp_path) == []


def test_disk_full_while_buffering_stdout(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _FakeStdout())
    monkeypatch.setattr(sio, "_write", _failing_after(0, OSError(errno.ENOSPC, "No space")))
    with pytest.raises(TvtoolError, match="no space left"):
        write_tensors("-", small_tensors())
    assert sys.stdout.buffer.getvalue() == b""


def test_nan_result_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "n.safetensors"
    with pytest.raises(NumericalError, match="NaN or Inf"):
        write_tensors(str(path), {"ok": torch.ones(2), "bad": torch.tensor([1.0, float("inf")])})
    assert listing(tmp_path) == []


def test_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "in.safetensors"
    write_tensors(str(src), {"x": torch.ones(1)})
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    hard = tmp_path / "hard.safetensors"
    os.link(src, hard)
    for output in (str(src), str(link), str(hard), os.path.relpath(src)):
        with pytest.raises(InvalidInputError, match="also an input"):
            check_distinct_paths(output, [str(src)])
    with pytest.raises(InvalidInputError, match="also an input"):
        check_distinct_paths(str(src), [str(link)])
    check_distinct_paths("-", [str(src)])
    check_distinct_paths(str(tmp_path / "new.safetensors"), [str(src), "-"])


def test_unusable_output_paths(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        check_output(str(tmp_path / "missing" / "o.safetensors"))
    with pytest.raises(InvalidInputError, match="is a directory"):
        check_output(str(tmp_path))
    with pytest.raises(InvalidInputError, match="empty output"):
        check_output("")


# ---------------------------------------------------------------- malformed inputs

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("content", "message"), [
    (b"", "only 0 bytes"),
    (b"abc", "only 3 bytes"),
    # Fixed bytes (not os.urandom at collection time): stable test ids, reproducible failures.
    (random.Random(64).randbytes(64), "not a valid safetensors file"),
    (raw_file({"a": F32x2}, b"\0" * 8, header_len=2**40), "header length"),
    (raw_file({"a": F32x2}, b"\0" * 8, header_len=10**6), "header length"),
    (raw_file({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
              b"\0" * 12), "invalid offset"),
    (raw_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     "invalid shape"),
    (raw_file({"a": F32x2}, b"\0" * 4), "not a valid safetensors file"),
    (raw_file({"a": F32x2}, b"\0" * 16), "not a valid safetensors file"),
    (raw_file({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8),
     "unsupported dtype"),
    (raw_file({"__metadata__": {"k": 1}, "a": F32x2}, b"\0" * 8), "not a valid safetensors"),
    (b"\x80\x02}q\x00.", "pickled PyTorch checkpoint"),
    (b"PK\x03\x04" + b"\0" * 60, "pickled PyTorch checkpoint"),
])
def test_malformed_files_are_invalid_input(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message) as info:
        open_tensors(str(path))
    assert "\n" not in info.value.one_line()


def test_pickle_hint_points_to_convert(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"x": torch.ones(1)}, path)
    with pytest.raises(InvalidInputError) as info:
        open_tensors(str(path))
    assert "tvtool convert" in info.value.one_line()


def test_missing_and_non_regular_inputs(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_tensors(str(tmp_path / "nope.safetensors"))
    with pytest.raises(InvalidInputError, match="not a regular file"):
        open_tensors(str(tmp_path))


# ---------------------------------------------------------------- byte mutations


def _valid_vector_bytes() -> bytes:
    buffer = _FakeStdout()
    real = sys.stdout
    sys.stdout = buffer  # type: ignore[assignment]
    try:
        write_tensors("-", {"w": torch.linspace(-1, 1, 12).reshape(3, 4),
                            "b": torch.linspace(0, 1, 4)}, VECTOR_META)
    finally:
        sys.stdout = real
    return buffer.buffer.getvalue()


VALID = _valid_vector_bytes()


@st.composite
def mutations(draw) -> bytes:
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "insert":
        pos = draw(st.integers(0, len(data)))
        return bytes(data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:])
    (header_len,) = struct.unpack("<Q", data[:8])
    upper = 8 + header_len - 1 if kind == "header" else len(data) - 1
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, upper))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=mutations())
def test_mutated_files_load_or_fail_cleanly(tmp_path, content):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    try:
        run_negate(NegateConfig(vector=str(path), output=str(out)))
        report = run_inspect(InspectConfig(files=(str(out),)))
        assert report["files"][0]["kind"] == "task_vector"
    except InvalidInputError as exc:
        assert "\n" not in exc.one_line()
        assert not out.exists()
    assert set(listing(tmp_path)) <= {"m.safetensors", "out.safetensors"}


@pytest.mark.parametrize("header_len", [0x280, 0x380, 0x480, 0x580])
def test_header_lengths_that_look_like_pickle_magic(tmp_path, header_len):
    # Found by the mutation test: a header of 640 bytes starts with b"\x80\x02" like a pickle.
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "__metadata__": {"pad": ""}}
    text = json.dumps(header).encode()
    header["__metadata__"]["pad"] = "x" * (header_len - len(text))
    content = raw_file(header, struct.pack("<2f", 1, 2))
    assert content[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    path = tmp_path / "ok.safetensors"
    path.write_bytes(content)
    source = open_tensors(str(path))
    try:
        assert source.get("a").tolist() == [1.0, 2.0]
    finally:
        source.close()
