"""Hostile and malformed inputs (issue 15): bounded time and memory, exit 2, one-line errors.

Every hostile file is generated here, small, from the shape of the input that failed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tvtool.errors import InvalidInputError, TvtoolError
from tvtool.io import read_pickled_checkpoint, write_tensors
from tvtool.io.atomic import STALE_AFTER_S, STALE_UNKNOWN_AFTER_S, remove_stale_temp_files
from tvtool.io.documents import write_bytes
from tvtool.io.yaml_io import parse_yaml, read_yaml
from tvtool.limits import MAX_NESTING, loads_json, short_repr
from tvtool.merge.config import load_config
from tvtool.metadata import FileMeta, Kind, Mode

ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvtool: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ------------------------------------------------------------------------- YAML configs

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
vectors: [a.safetensors]
params: *i
"""


def test_billion_laughs_config_is_refused_at_once(tmp_path, cli):
    config = tmp_path / "laughs.yaml"
    config.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600
    started = time.process_time()  # CPU time: independent of the machine's load
    with pytest.raises(InvalidInputError, match="aliases"):
        load_config(str(config))
    assert time.process_time() - started < 1, "refused while parsing, before expanding"
    line = _one_error_line(cli(["merge", "--config", str(config), "-o",
                                str(tmp_path / "o.safetensors")]))
    assert "aliases" in line and len(line) < 300
    assert list(tmp_path.iterdir()) == [config]


def test_a_single_alias_is_refused_too():
    with pytest.raises(InvalidInputError, match=r"aliases \(\*name\) are not supported"):
        parse_yaml("x: &x 1\ny: *x\n", "doc")


@pytest.mark.parametrize("text", [
    "vectors: [a]\nparams: {density: " + "[" * 1000 + "]" * 1000 + "}\n",
    "vectors: [a]\nparams:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)),
    "[" * 10_000,
])
def test_deeply_nested_yaml_is_invalid_input(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=f"nested more than {MAX_NESTING}|not valid YAML"):
        read_yaml(str(path))


def test_yaml_nesting_up_to_the_limit_is_fine():
    text = "[" * MAX_NESTING + "]" * MAX_NESTING
    value = parse_yaml(text, "doc")
    for _ in range(MAX_NESTING - 1):
        value = value[0]
    assert value == []


def test_huge_yaml_document_is_refused_before_parsing(tmp_path, monkeypatch):
    from tvtool.io import yaml_io

    monkeypatch.setattr(yaml_io, "MAX_YAML_BYTES", 1000)
    path = tmp_path / "big.yaml"
    path.write_text("vectors: [" + "a, " * 1000 + "b]\n")
    with pytest.raises(InvalidInputError, match="larger than"):
        read_yaml(str(path))


@pytest.mark.parametrize(("body", "message"), [
    # 400 digits: past the largest float (300 digits fit, and are refused later as outside
    # float32, see test_huge_coefficient_in_a_json_coefs_file).
    ("coef: " + "9" * 400, "is not finite"),
    ("coef: [0.5, " + "9" * 400 + "]", "is not finite"),
    ("vectors: [{path: v.safetensors, coef: " + "9" * 400 + "}]", "is not finite"),
    ("seed: " + "9" * 300, "'seed' must be an integer"),
    ("coef: " + "9" * 5000, "not valid YAML"),  # past Python's int-parsing digit limit
    ("method: ties\nparams: {density: " + "9" * 300 + "}", "density must be in"),
])
def test_huge_numbers_are_invalid_input(tmp_path, cli, body, message):
    config = tmp_path / "c.yaml"
    (tmp_path / "v.safetensors").write_bytes(b"")  # the config is refused before it is read
    vectors = "" if body.startswith("vectors:") else "vectors: [v.safetensors]\n"
    config.write_text(f"{vectors}{body}\n")
    line = _one_error_line(cli(["merge", "--config", str(config), "-o",
                                str(tmp_path / "o.safetensors")]))
    assert message in line
    assert len(line) < 400, "the offending value must not be printed in full"


@pytest.mark.parametrize("value", ["9" * 300, "9" * 400, "-" + "9" * 400])
def test_huge_coefficient_in_a_json_coefs_file(tmp_path, files, cli, value):
    coefs = tmp_path / "coefs.json"
    coefs.write_text(f"[0.5, {value}]")
    line = _one_error_line(cli(["merge", files["tv1"], files["tv2"], "--coefs", str(coefs),
                                "-o", str(tmp_path / "o.safetensors")]))
    assert "coefficient" in line and ("not finite" in line or "float32" in line)
    assert len(line) < 300


def test_300_digit_coef_in_a_config_is_invalid_input(tmp_path, files, cli):
    # The reported input: 300 digits fit a float (~1e300) but not the float32 merge.
    config = tmp_path / "c.yaml"
    config.write_text(f"vectors: [{files['tv1']}, {files['tv2']}]\ncoef: {'9' * 300}\n")
    line = _one_error_line(cli(["merge", "--config", str(config), "-o",
                                str(tmp_path / "o.safetensors")]))
    assert "outside the float32 range" in line and len(line) < 300
    assert not (tmp_path / "o.safetensors").exists()


def test_error_messages_truncate_offending_values(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("vectors: [a]\nmissing: [" + ", ".join(["xxxxxxxxxx"] * 2_000) + "]\n")
    with pytest.raises(InvalidInputError) as caught:
        load_config(str(config), output="o")
    assert "'missing' must be one of" in caught.value.message
    assert len(caught.value.one_line()) < 300


def test_short_repr_is_bounded_and_cheap():
    nested: list = []
    for _ in range(10_000):
        nested = [nested]
    assert len(short_repr(nested)) <= 80
    assert len(short_repr("x" * 10**7, 50)) <= 50
    assert short_repr(1.5) == "1.5"


# ------------------------------------------------------------------------- JSON metadata


def _vector(tmp_path: Path, **extra_header: str) -> str:
    path = tmp_path / "v.safetensors"
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture="tvtool-tiny", mode=Mode.FULL,
                    base_fingerprint="0" * 16)
    header = {**meta.to_header(), **extra_header}
    write_tensors(str(path), {"visual.proj": torch.ones(2, 2)}, header)
    return str(path)


DEEP_JSON = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize("key", ["tvtool.provenance", "tvtool.operations"])
def test_metadata_json_nested_very_deep_is_invalid_input(tmp_path, cli, key):
    vector = _vector(tmp_path, **{key: DEEP_JSON})
    line = _one_error_line(cli(["negate", vector, "-o", str(tmp_path / "n.safetensors")]))
    assert "nested more than" in line and key in line


def test_provenance_must_be_an_object(tmp_path):
    with pytest.raises(InvalidInputError, match="must be a JSON object"):
        FileMeta.from_header({"tvtool.format_version": "1", "tvtool.kind": "task_vector",
                              "tvtool.provenance": "[1, 2]"}, "v")


@pytest.mark.parametrize("text", [DEEP_JSON, "[" * 65 + "]" * 65, "1" * 5000, "{", b"\xff"])
def test_loads_json_refuses_cleanly(text):
    with pytest.raises(InvalidInputError):
        loads_json(text, "doc")


# ------------------------------------------------------------------------- legacy torch files

_MAGIC = 0x1950A86A20F9469CFC6C


class _Pid:
    """Pickles as a persistent id of a legacy storage."""

    def __init__(self, key: str, numel: int) -> None:
        self.pid = ("storage", torch.FloatStorage, key, "cpu", numel, None)


class _T:
    def __init__(self, storage: _Pid, numel: int) -> None:
        self.args = (storage, 0, (numel,), (1,), False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def _legacy_stream(root: object, keys: list[str], raw: bytes, padding: int = 0,
                   root_only: bool = False) -> bytes:
    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object):
            return obj.pid if isinstance(obj, _Pid) else None

    out = io.BytesIO()
    for item in (_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(item, out, protocol=2)
    _Pickler(out, protocol=2).dump(root if root_only else {"root": root,
                                                           "pad": b"\0" * padding})
    pickle.dump(keys, out, protocol=2)
    out.write(raw)
    return out.getvalue()


def test_legacy_stream_declaring_more_storage_than_the_file_holds(tmp_path, monkeypatch):
    # The reported file: 1,500 storages of 1 MiB each in 1.1 MB. Here 64 storages of 64 KiB
    # in a ~70 KB file; each fits the file alone, together they are 60 times its size.
    numel = 16 * 1024
    root = {f"w{i}": _T(_Pid(str(i), numel), numel) for i in range(64)}
    data = _legacy_stream(root, [str(i) for i in range(64)], b"", padding=70_000)
    path = tmp_path / "many.pt"
    path.write_bytes(data)
    allocated = []
    real_zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        tensor = real_zeros(*args, **kwargs)
        allocated.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(torch, "zeros", counting_zeros)
    with pytest.raises(InvalidInputError, match=r"storages declare .* more than the whole file"):
        read_pickled_checkpoint(str(path))
    assert sum(allocated) <= len(data), "storages were allocated beyond the file size"


def test_legacy_stream_within_the_file_size_reads(tmp_path):
    raw = struct.pack("<q", 2) + struct.pack("<2f", 1.5, -2.0)
    path = tmp_path / "ok.pt"
    path.write_bytes(_legacy_stream({"w": _T(_Pid("0", 2), 2)}, ["0"], raw, root_only=True))
    tensors = read_pickled_checkpoint(str(path)).tensors
    assert torch.equal(tensors["w"], torch.tensor([1.5, -2.0]))


def _zip(path: Path, members: dict[str, bytes], compression: int) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data, compress_type=compression)


def _zip_pickle(numel: int) -> bytes:
    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object):
            return obj.pid if isinstance(obj, _ZipPid) else None

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"w": _ZipT(numel)})
    return buffer.getvalue()


class _ZipPid:
    def __init__(self, numel: int) -> None:
        self.pid = ("storage", torch.FloatStorage, "0", "cpu", numel)


class _ZipT:
    def __init__(self, numel: int) -> None:
        self.numel = numel

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (_ZipPid(self.numel), 0, (self.numel,), (1,), False, OrderedDict()))


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_compressed_zip_members_are_refused_before_inflating(tmp_path, compression):
    # The reported file: an 893-byte bzip2 member inflating to 512 MiB. Here 4 MiB of zeros.
    numel = 1024 * 1024
    path = tmp_path / "bomb.pt"
    _zip(path, {"archive/data.pkl": _zip_pickle(numel),
                "archive/data/0": b"\0" * (4 * numel)}, compression)
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(InvalidInputError, match="is compressed"):
        read_pickled_checkpoint(str(path))


def test_compressed_data_pkl_is_refused(tmp_path):
    path = tmp_path / "pkl.pt"
    _zip(path, {"archive/data.pkl": _zip_pickle(1) + b"\0" * 100_000,
                "archive/data/0": b"\0" * 4}, zipfile.ZIP_DEFLATED)
    with pytest.raises(InvalidInputError, match=r"data\.pkl' is compressed"):
        read_pickled_checkpoint(str(path))


def test_stored_zip_members_still_read(tmp_path):
    path = tmp_path / "ok.pt"
    _zip(path, {"archive/data.pkl": _zip_pickle(2), "archive/byteorder": b"little",
                "archive/data/0": struct.pack("<2f", 3.0, 4.0)}, zipfile.ZIP_STORED)
    assert torch.equal(read_pickled_checkpoint(str(path)).tensors["w"], torch.tensor([3.0, 4.0]))


def test_real_torch_save_files_still_read(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    for zip_format in (True, False):
        path = tmp_path / f"real-{zip_format}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        loaded = read_pickled_checkpoint(str(path)).tensors
        assert all(torch.equal(loaded[k], state[k]) for k in state)


# ------------------------------------------------------------------------- resume state


def _run_state() -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    import random

    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    for name, param in params.items():
        tensors[f"param/{name}"] = param.clone()
        tensors[f"optim/{name}/exp_avg"] = torch.zeros_like(param)
        tensors[f"optim/{name}/exp_avg_sq"] = torch.zeros_like(param)
        tensors[f"optim/{name}/step"] = torch.tensor(3.0)
    version, internal, gauss = random.getstate()
    state = {"format": 1, "step": 3, "run": {"total_steps": 6},
             "python_random": [version, list(internal), gauss], "scaler": None}
    return tensors, state, params


def _del(mapping: dict, key: str) -> None:
    del mapping[key]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda t, s: _del(s, "step"), "'step' must be an integer"),
    (lambda t, s: s.update(step=-1), "'step' must be an integer"),
    (lambda t, s: s.update(step=2.5), "'step' must be an integer"),
    (lambda t, s: s.update(step="3"), "'step' must be an integer"),
    (lambda t, s: s.update(step=7), r"'step' must be an integer in \[0, 6\]"),
    (lambda t, s: _del(t, "rng/torch_cpu"), "rng/torch_cpu' is missing"),
    (lambda t, s: t.update({"rng/torch_cpu": torch.zeros(3, dtype=torch.uint8)}),
     r"rng/torch_cpu' is torch.uint8 \(3,\)"),
    (lambda t, s: t.update({"rng/torch_cpu": torch.full_like(t["rng/torch_cpu"], 255)}),
     "malformed RNG state"),
    (lambda t, s: t.update({"optim/w/exp_avg": torch.zeros(2, 3)}), "optimizer tensor"),
    (lambda t, s: t.update({"optim/w/step": torch.zeros(2)}), "optimizer tensor"),
    (lambda t, s: t.update({"param/w": torch.zeros(5)}), "has shape"),
    (lambda t, s: t.update({"param/renamed": t.pop("param/w")}), "unexpected tensor"),
    (lambda t, s: _del(t, "param/b"), r"missing tensor\(s\)"),
    (lambda t, s: _del(t, "optim/b/exp_avg_sq"), r"missing tensor\(s\)"),
    (lambda t, s: s.update(python_random=[3, [1, 2], None]), "Python RNG state"),
    (lambda t, s: s.update(python_random="x"), "Python RNG state"),
    (lambda t, s: s.update(run=[1]), "no 'run' record"),
    (lambda t, s: s.update(scaler=[1]), "gradient-scaler"),
])
def test_damaged_resume_state_is_invalid_input(damage, message):
    from tvtool.finetune.resume import _check_state

    tensors, state, params = _run_state()
    _check_state("s", tensors, state, params, total=6)  # the intact state passes
    damage(tensors, state)
    with pytest.raises(InvalidInputError, match=message):
        _check_state("s", tensors, state, params, total=6)


@pytest.mark.parametrize("document", [[1, 2, 3], "text", 5])
def test_resume_state_that_is_not_a_mapping(tmp_path, document):
    from tvtool.io.train_state import STATE_KEY, read_train_state

    path = tmp_path / "state.safetensors"
    write_tensors(str(path), {"x": torch.zeros(1)}, {STATE_KEY: json.dumps(document)})
    with pytest.raises(InvalidInputError, match="not a mapping"):
        read_train_state(str(path))


def test_resume_state_header_nested_deep(tmp_path):
    from tvtool.io.train_state import STATE_KEY, read_train_state

    path = tmp_path / "state.safetensors"
    write_tensors(str(path), {"x": torch.zeros(1)}, {STATE_KEY: DEEP_JSON})
    with pytest.raises(InvalidInputError, match="nested more than"):
        read_train_state(str(path))


def test_finetune_resume_with_a_damaged_state_exits_2(tmp_path):
    # End to end: a real run leaves its state; a 3-byte RNG tensor written into it is refused
    # at --resume with a one-line InvalidInputError (it was a RuntimeError in torch).
    from dataclasses import replace

    from safetensors import safe_open

    from tests.test_finetune_trainer import RandomImages, _config, _head
    from tvtool.finetune.config import RESUME_FILE
    from tvtool.finetune.trainer import finetune
    from tvtool.io.train_state import STATE_KEY

    config = _config(tmp_path, "a", workdir=str(tmp_path / "w"), checkpoint_every=1, steps=3)

    class _Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(config, dataset=RandomImages(size=8), head=_head(), after_step=stop)
    state_path = tmp_path / "w" / RESUME_FILE
    with safe_open(str(state_path), "pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["rng/torch_cpu"] = torch.zeros(3, dtype=torch.uint8)
    write_tensors(str(state_path), tensors, {STATE_KEY: header[STATE_KEY]}, check_finite=False)
    with pytest.raises(InvalidInputError, match="rng/torch_cpu"):
        finetune(replace(config, resume=True), dataset=RandomImages(size=8), head=_head())


# ------------------------------------------------------------------------- one-line errors


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("args", "fragment", "help_of"), [
    (["merge", "--bogus"], "No such option: --bogus", "tvtool merge"),
    (["finetune", "--steps", "x", "a"], "Invalid value for '--steps'", "tvtool finetune"),
    (["nosuchcommand"], "No such command 'nosuchcommand'", "tvtool"),
    (["negate"], "Missing argument", "tvtool negate"),
    (["eval", "--bogus"], "No such option: --bogus", "tvtool eval"),
])
def test_usage_errors_are_one_line_exit_2(cli, args, fragment, help_of):
    line = _one_error_line(cli(args))
    assert fragment in line
    assert line.endswith(f"(hint: see '{help_of} --help')")


def test_usage_error_through_the_real_entry_point():
    result = subprocess.run([sys.executable, "-m", "tvtool", "merge", "--bogus"],
                            capture_output=True, env=_env(), stdin=subprocess.DEVNULL,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "tvtool: error: No such option: --bogus (Possible options: --base) "
        "(hint: see 'tvtool merge --help')"]


def test_ctrl_c_while_the_cli_imports_prints_no_traceback():
    # Deterministic stand-in for Ctrl-C in the first half second: the interrupt arrives while
    # tvtool.cli.common is being imported.
    code = (
        "import sys, runpy\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tvtool.cli.common':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['tvtool', '--help']\n"
        "runpy.run_module('tvtool', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env(),
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 130
    assert result.stderr.decode() == "tvtool: error: interrupted\n"
    assert result.stdout == b""


@pytest.mark.parametrize("write", [
    lambda: write_bytes("-", b"data"),
    lambda: write_tensors("-", {"x": torch.zeros(1)}),
])
def test_output_to_a_closed_stdout_is_invalid_input(monkeypatch, write):
    # What Python does when started with descriptor 1 closed (`tvtool ... -o - >&-`).
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(InvalidInputError, match="stdout is closed"):
        write()


def test_json_to_a_closed_stdout_is_invalid_input(monkeypatch):
    from tvtool.cli.common import emit_json, emit_path

    monkeypatch.setattr(sys, "stdout", None)
    emit_path("out.safetensors")  # the file is the result; its path has nowhere to go
    with pytest.raises(InvalidInputError, match="--json writes to stdout, but stdout is closed"):
        emit_json({"a": 1})


def test_closed_stdout_in_a_real_process_is_one_line_exit_2():
    # ">&-": the process starts with descriptor 1 closed (Python sets sys.stdout to None).
    # --version is the lightest command writing to stdout; -o - and --json take the checks
    # tested above, after importing the whole library.
    command = f"exec '{sys.executable}' -m tvtool --version >&-"
    result = subprocess.run(["bash", "-c", command], stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "tvtool: error: --version writes to stdout, but stdout is closed"]


class _BrokenAt(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 2:
            try:
                raise OSError("decoder failed")
            except OSError as exc:
                raise InvalidInputError("cannot read image 'zz.png': decoder failed",
                                        hint="check that every file is a readable image"
                                        ) from exc
        return torch.zeros(2)


def test_dataloader_worker_error_keeps_its_message_and_hint():
    with pytest.raises(InvalidInputError) as caught:
        list(DataLoader(_BrokenAt(), batch_size=1, num_workers=1))
    assert caught.value.message == "cannot read image 'zz.png': decoder failed"
    assert caught.value.hint == "check that every file is a readable image"
    assert caught.value.one_line() == ("cannot read image 'zz.png': decoder failed "
                                       "(hint: check that every file is a readable image)")


class _PlainFailure(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise ValueError("bad pixel data in 'a.png'")


def test_other_worker_errors_are_reduced_to_their_last_line():
    from tvtool.errors import worker_error_text

    with pytest.raises(ValueError) as caught:
        list(DataLoader(_PlainFailure(), batch_size=1, num_workers=1))
    assert "Original Traceback" in str(caught.value)
    assert worker_error_text(caught.value) == "ValueError: bad pixel data in 'a.png'"
    assert worker_error_text(ValueError("plain")) == "plain"


def test_corrupt_image_with_workers_reports_the_original_error(tmp_path):
    import numpy as np
    from PIL import Image

    from tvtool.evaluate.batches import batches, open_eval_data

    for name, colour in (("cat", 250), ("dog", 0)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), colour, dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")

    def to_tensor(image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image).copy()).float()

    failures = []
    for split in ("train", "val", "test"):
        data = open_eval_data(f"imagefolder:{tmp_path}", split, to_tensor)
        try:
            for _ in batches(data, 2, workers=1):
                pass
        except TvtoolError as exc:
            failures.append(exc)
    assert len(failures) == 1
    text = failures[0].one_line()
    assert "zz-broken.png" in text and "Traceback" not in text
    assert "DataLoader worker" not in text and "hint: " in text
    assert "\n" not in text and len(text) < 400


# ------------------------------------------------------------------------- small items


def test_stale_temp_files_of_killed_runs_are_removed(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead_pid = finished.pid
    names = {
        "stale": f".out.bin.{dead_pid}.abcd_123.tmp",       # dead writer, old: removed
        "fresh": f".out.bin.{dead_pid}.zzzzzzzz.tmp",       # dead writer, recent: kept
        "alive": f".out.bin.{os.getppid()}.yyyyyyyy.tmp",   # live writer, old: kept
        "legacy_old": ".out.bin.k3j4h5g6.tmp",              # no pid, over a day: removed
        "legacy_new": ".out.bin.q1w2e3r4.tmp",              # no pid, an hour: kept
        "other": f".other.bin.{dead_pid}.abcdefgh.tmp",     # another target: kept
        "lookalike": f".out.bin.{dead_pid}.abc.tmp",        # not mkstemp's pattern: kept
        "plain": "out.bin.tmp",                             # not ours: kept
    }
    now = time.time()
    ages = {"stale": STALE_AFTER_S + 60, "fresh": 5, "alive": STALE_AFTER_S + 60,
            "legacy_old": STALE_UNKNOWN_AFTER_S + 60, "legacy_new": 3600,
            "other": STALE_AFTER_S + 60, "lookalike": STALE_AFTER_S + 60,
            "plain": STALE_UNKNOWN_AFTER_S + 60}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (now - ages[key], now - ages[key]))
    write_bytes(str(tmp_path / "out.bin"), b"new")
    left = {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "out.bin").read_bytes() == b"new"
    assert names["stale"] not in left and names["legacy_old"] not in left
    kept = {k for k, n in names.items() if n in left}
    assert kept == {"fresh", "alive", "legacy_new", "other", "lookalike", "plain"}
    assert remove_stale_temp_files(tmp_path / "out.bin") == []


def test_temp_file_name_carries_the_pid(tmp_path):
    from tvtool.io.atomic import atomic_output

    with atomic_output(str(tmp_path / "x.bin")) as tmp:
        assert tmp.name.startswith(f".x.bin.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"1")


def test_datasets_command_lists_the_names(cli):
    from tvtool.data import list_datasets

    result = cli(["datasets"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == [*[n for n in list_datasets() if n.startswith("synthetic:")],
                     *[n for n in list_datasets() if not n.startswith("synthetic:")],
                     "<name>Val", "imagefolder:PATH", "hf:PATH"]
    document = json.loads(cli(["datasets", "--json"]).stdout)
    by_name = {e["name"]: e for e in document["datasets"]}
    assert by_name["MNIST"]["classes"] == 10 and by_name["MNIST"]["kind"] == "standard"
    assert by_name["StanfordCars"]["aliases"] == ["cars"]
    assert by_name["synthetic:shape"]["kind"] == "synthetic"


def test_unknown_dataset_hint_points_at_the_command():
    from tvtool.data import task_spec

    with pytest.raises(InvalidInputError) as caught:
        task_spec("MNSIT")
    assert "`tvtool datasets`" in caught.value.hint and "list_datasets" not in caught.value.hint
    assert "did you mean MNIST" in caught.value.hint
