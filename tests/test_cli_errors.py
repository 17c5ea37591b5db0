"""Bad input on the command line: one-line error, documented exit code, nothing left behind.

Exit codes (docs/cli.md): 2 for usage errors and invalid input, 1 for runtime failures
(a result overflowing to Inf, a full disk, a failed write).
"""

from __future__ import annotations

import errno
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import load, perturbed
from tvtool.io import safetensors_io as sio
from tvtool.io import write_tensors
from tvtool.metadata import FileMeta, Kind, Mode


@pytest.fixture()
def out_dir(tmp_path, monkeypatch):
    """An empty output directory; stdin/stdout spools also go under tmp_path to be checked."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    out = tmp_path / "out"
    out.mkdir()
    yield out
    assert list(spool.iterdir()) == [], "a stdin/stdout spool file was left behind"


def listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def assert_fails(result, code: int, *fragments: str) -> str:
    """The command failed with ``code`` and exactly one error line that names the problem."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("tvtool: error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").endswith(errors[0]), "the error must be the last line"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def vector_with(tmp_path, name: str, tensors: dict, **meta) -> str:
    header = FileMeta(kind=meta.pop("kind", Kind.TASK_VECTOR), **meta).to_header()
    path = tmp_path / name
    write_tensors(str(path), tensors, header, check_finite=False)
    return str(path)


# ---------------------------------------------------------------- malformed files


def test_truncated_vector(cli, files, tmp_path, out_dir):
    data = Path(files["tv1"]).read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert_fails(cli(["negate", str(bad), "-o", str(out_dir / "o.safetensors")]), 2,
                 "not a valid safetensors file")
    assert listing(out_dir) == []


def test_random_bytes(cli, tmp_path, out_dir):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(bytes(range(256)) * 4)
    assert_fails(cli(["negate", str(bad), "-o", str(out_dir / "o.safetensors")]), 2,
                 "not a valid safetensors file")
    assert listing(out_dir) == []


def test_pickle_where_safetensors_expected(cli, tmp_path, out_dir):
    bad = tmp_path / "vector.pt"
    torch.save({"w": torch.ones(2)}, bad)
    line = assert_fails(cli(["negate", str(bad), "-o", str(out_dir / "o.safetensors")]), 2,
                        "pickled PyTorch checkpoint")
    assert "tvtool convert" in line
    assert listing(out_dir) == []


def _lying(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", header_len or len(text)) + text + data


@pytest.mark.parametrize(("content", "fragment"), [
    (_lying({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
            header_len=2**50), "header length"),
    (_lying({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "invalid offset"),
    (_lying({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
     "invalid shape"),
])
def test_header_lies(cli, files, tmp_path, out_dir, content, fragment):
    bad = tmp_path / "liar.safetensors"
    bad.write_bytes(content)
    for args in (["apply", "--base", files["base"], str(bad)], ["negate", str(bad)],
                 ["extract", str(bad), "--base", files["base"]]):
        assert_fails(cli([*args, "-o", str(out_dir / "o.safetensors")]), 2, fragment)
    assert_fails(cli(["inspect", str(bad)]), 2, fragment)
    assert listing(out_dir) == []


# ---------------------------------------------------------------- keys, shapes, dtypes


def test_missing_and_extra_keys_report_counts_and_names(cli, files, tmp_path, out_dir):
    ft = load(files["ft1"])
    missing = {k: v for k, v in ft.items() if k not in ("visual.proj", "ln_final.weight")}
    path = tmp_path / "missing.safetensors"
    write_tensors(str(path), missing)
    out = str(out_dir / "o.safetensors")
    assert_fails(cli(["extract", str(path), "--base", files["base"], "-o", out,
                      "--keep", "all"]), 2,
                 "lacks 2 tensors of the base", "'ln_final.weight'", "--allow-missing")
    # The default keeps the image encoder: only visual.proj counts.
    assert_fails(cli(["extract", str(path), "--base", files["base"], "-o", out]), 2,
                 "lacks 1 tensors of the base's image encoder", "'visual.proj'",
                 "--allow-missing")
    extra = dict(ft, **{"head.weight": torch.ones(2), "head.bias": torch.ones(2)})
    write_tensors(str(path), extra)
    assert_fails(cli(["extract", str(path), "--base", files["base"], "-o", out]), 2,
                 "has 2 tensors that are not in the base", "head.bias")
    vector = vector_with(tmp_path, "extra.safetensors", {"nope.weight": torch.ones(2)})
    assert_fails(cli(["apply", "--base", files["base"], vector, "-o", out]), 2,
                 "1 tensors that are not in the base", "nope.weight")
    assert listing(out_dir) == []


def test_shape_and_dtype_mismatch(cli, files, tmp_path, out_dir):
    ft = load(files["ft1"])
    out = str(out_dir / "o.safetensors")
    path = tmp_path / "shape.safetensors"
    write_tensors(str(path), dict(ft, **{"visual.proj": torch.ones(3, 3)}))
    assert_fails(cli(["extract", str(path), "--base", files["base"], "-o", out]), 2,
                 "visual.proj", "shape")
    write_tensors(str(path), dict(ft, **{"visual.proj": ft["visual.proj"].half()}))
    assert_fails(cli(["extract", str(path), "--base", files["base"], "-o", out]), 2,
                 "visual.proj", "dtype")
    tv = load(files["tv1"])
    half = vector_with(tmp_path, "half.safetensors", {k: v.half() for k, v in tv.items()})
    assert_fails(cli(["apply", "--base", files["base"], half, "-o", out]), 2, "float16")
    wrong = vector_with(tmp_path, "wrong.safetensors", {"visual.proj": torch.ones(2)})
    assert_fails(cli(["apply", "--base", files["base"], wrong, "-o", out]), 2, "shape")
    assert listing(out_dir) == []


# ---------------------------------------------------------------- wrong kinds and bases


def test_vector_from_another_base(cli, files, tmp_path, tiny_state, out_dir):
    other = tmp_path / "other_base.safetensors"
    write_tensors(str(other), perturbed(tiny_state, 99, prefix=""),
                  FileMeta(kind=Kind.CHECKPOINT, architecture="tvtool-tiny").to_header())
    out = out_dir / "o.safetensors"
    assert_fails(cli(["apply", "--base", str(other), files["tv1"], "-o", str(out)]), 2,
                 "extracted from another base", "--allow-base-mismatch")
    assert listing(out_dir) == []
    ok = cli(["apply", "--base", str(other), files["tv1"], "-o", str(out),
              "--allow-base-mismatch"])
    assert ok.exit_code == 0, ok.stderr
    assert "warning" in ok.stderr and out.exists()


def test_checkpoint_where_vector_expected_and_vice_versa(cli, files, out_dir):
    out = str(out_dir / "o.safetensors")
    assert_fails(cli(["negate", files["base"], "-o", out]), 2, "is a tvtool checkpoint",
                 "not a task vector")
    assert_fails(cli(["apply", "--base", files["base"], files["ft1"], "-o", out]), 2,
                 "not a task vector")
    assert_fails(cli(["extract", files["tv1"], "--base", files["base"], "-o", out]), 2,
                 "is a tvtool task_vector, not a model checkpoint")
    assert_fails(cli(["apply", "--base", files["tv1"], files["tv2"], "-o", out]), 2,
                 "not a checkpoint")
    assert listing(out_dir) == []


def test_plain_safetensors_where_vector_expected(cli, files, tmp_path, out_dir):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(load(files["tv1"]), str(plain))
    assert_fails(cli(["negate", str(plain), "-o", str(out_dir / "o.safetensors")]), 2,
                 "no tvtool metadata")


def test_linearized_vector_needs_explicit_approximation(cli, files, tmp_path, out_dir):
    source = load(files["tv1"])
    meta = {k[len("tvtool."):]: v for k, v in json.loads(
        cli(["inspect", files["tv1"], "--json"]).stdout)["files"][0]["metadata"].items()}
    linear = vector_with(tmp_path, "lin.safetensors", source, mode=Mode.LINEAR, linearized=True,
                         base_fingerprint=meta["base_fingerprint"], architecture="tvtool-tiny")
    out = out_dir / "o.safetensors"
    assert_fails(cli(["apply", "--base", files["base"], linear, "-o", str(out)]), 2,
                 "linearized", "--approximate-linearized")
    assert listing(out_dir) == []
    ok = cli(["apply", "--base", files["base"], linear, "-o", str(out),
              "--approximate-linearized"])
    assert ok.exit_code == 0, ok.stderr
    assert "approximates" in ok.stderr


# ---------------------------------------------------------------- NaN / Inf


def test_nan_in_inputs(cli, files, tmp_path, out_dir):
    tv = load(files["tv1"])
    name = next(iter(tv))
    tv[name] = tv[name].clone().view(-1)
    tv[name][0] = float("nan")
    tv[name] = tv[name].view(load(files["tv1"])[name].shape)
    bad = vector_with(tmp_path, "nan.safetensors", tv)
    out = str(out_dir / "o.safetensors")
    assert_fails(cli(["negate", bad, "-o", out]), 2, "contains NaN or Inf", name)
    assert_fails(cli(["apply", "--base", files["base"], bad, "-o", out]), 2, "NaN")
    ft = load(files["ft1"])
    ft["visual.proj"] = torch.full_like(ft["visual.proj"], float("inf"))
    path = tmp_path / "inf.safetensors"
    write_tensors(str(path), ft, check_finite=False)
    assert_fails(cli(["extract", str(path), "--base", files["base"], "-o", out]), 2,
                 "visual.proj", "NaN or Inf")
    assert listing(out_dir) == []


def test_overflowing_result_is_a_runtime_failure(cli, files, out_dir):
    out = str(out_dir / "o.safetensors")
    assert_fails(cli(["apply", "--base", files["base"], files["tv1"], "-a", "1e39", "-o", out]),
                 1, "result tensor", "NaN or Inf")
    assert listing(out_dir) == []


@pytest.mark.parametrize(("args", "fragment"), [
    (["negate", "{tv1}", "-a", "-1"], "must be positive"),
    (["negate", "{tv1}", "-a", "nan"], "finite"),
    (["apply", "--base", "{base}", "{tv1}", "-a", "inf"], "finite"),
    (["apply", "--base", "{base}", "{tv1}", "{tv2}", "-a", "1", "-a", "2", "-a", "3"],
     "3 coefficients given for 2 vectors"),
    (["apply", "--base", "{base}", "-", "-"], "only once"),
    (["extract", "{ft1}", "--base", "{base}", "--mode", "linear"], "cannot record mode linear"),
    (["extract", "{ft1}", "--base", "{base}", "--mode", "weird"], "unknown mode"),
    (["extract", "{ft1}", "--base", "NoSuchModel:openai"], "unknown model"),
    (["extract", "{ft1}", "--base", "{base}", "--keep", "some"], "--keep"),
])
def test_usage_errors(cli, files, out_dir, args, fragment):
    args = [a.format(**files) for a in args]
    assert_fails(cli([*args, "-o", str(out_dir / "o.safetensors")]), 2, fragment)
    assert listing(out_dir) == []


def test_json_with_stdout_output_is_refused(cli, files):
    assert_fails(cli(["negate", files["tv1"], "-o", "-", "--json"]), 2, "--json and -o -")


def test_empty_stdin(cli, out_dir):
    assert_fails(cli(["negate", "-", "-o", str(out_dir / "o.safetensors")], input=b""), 2,
                 "stdin was empty")


# ---------------------------------------------------------------- outputs


def test_output_equal_to_an_input(cli, files, tmp_path, out_dir):
    copy = tmp_path / "tv.safetensors"
    copy.write_bytes(Path(files["tv1"]).read_bytes())
    before = copy.read_bytes()
    link = out_dir / "link.safetensors"
    link.symlink_to(copy)
    for output in (str(copy), str(link)):
        assert_fails(cli(["negate", str(copy), "-o", output]), 2, "also an input")
        assert_fails(cli(["apply", "--base", files["base"], str(copy), "-o", output]), 2,
                     "also an input")
    base_copy = tmp_path / "base.safetensors"
    base_copy.write_bytes(Path(files["base"]).read_bytes())
    assert_fails(cli(["extract", files["ft1"], "--base", str(base_copy), "-o", str(base_copy)]),
                 2, "also an input")
    assert copy.read_bytes() == before
    assert listing(out_dir) == ["link.safetensors"]


def test_missing_output_directory(cli, files, tmp_path):
    assert_fails(cli(["negate", files["tv1"], "-o", str(tmp_path / "no" / "o.safetensors")]), 2,
                 "does not exist")


def _failing_write(after: int, exc: OSError):
    calls = {"n": 0}
    real = sio._write

    def write(handle, data):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        real(handle, data)

    return write


def test_crash_mid_write_keeps_the_target(cli, files, out_dir, monkeypatch):
    target = out_dir / "o.safetensors"
    target.write_bytes(b"old")
    monkeypatch.setattr(sio, "_write", _failing_write(3, OSError(errno.EIO, "I/O error")))
    assert_fails(cli(["negate", files["tv1"], "-o", str(target)]), 1, "I/O error")
    assert target.read_bytes() == b"old"
    assert listing(out_dir) == ["o.safetensors"]


@pytest.mark.parametrize("output", ["file", "-"])
def test_disk_full(cli, files, out_dir, monkeypatch, output):
    target = str(out_dir / "o.safetensors") if output == "file" else "-"
    monkeypatch.setattr(sio, "_write", _failing_write(1, OSError(errno.ENOSPC, "No space")))
    assert_fails(cli(["apply", "--base", files["base"], files["tv1"], "-o", target]), 1,
                 "no space left on device")
    assert listing(out_dir) == []


def test_debug_shows_the_traceback(cli, files, out_dir, monkeypatch):
    monkeypatch.setenv("TVTOOL_DEBUG", "1")
    result = cli(["negate", files["base"], "-o", str(out_dir / "o.safetensors")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "is a tvtool checkpoint, not a task vector" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("tvtool: error: ")
