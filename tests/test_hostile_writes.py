"""Writes go only where the user said, and every exit path leaves nothing behind (issue 22).

Each test states its expectation independently of tvtool: file bytes and modes before and
after (``os.stat``), what a directory holds, exit codes and the number of stderr lines.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import TINY, load

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _one_error_line(stderr: str) -> str:
    """The error line: exactly one, the last line, no traceback (logs may precede it)."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("tvtool: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def _leftovers(folder: Path) -> list[str]:
    """Temp files and staging directories tvtool might leave in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")
                  and (p.name.endswith(".tmp") or p.name.startswith(".tvtool-")))


# ------------------------------------------------------------------ merge --config outputs


@pytest.fixture()
def config_dir(tmp_path, files) -> Path:
    """A folder holding two task vectors, as a repository checkout would."""
    folder = tmp_path / "repo"
    folder.mkdir()
    for key in ("tv1", "tv2"):
        shutil.copy(files[key], folder / f"{key}.safetensors")
    return folder


def _config(folder: Path, output: str | None, name: str = "merge.yaml", **extra) -> Path:
    document = {"vectors": ["tv1.safetensors", "tv2.safetensors"], "coef": 0.5, **extra}
    if output is not None:
        document["output"] = output
    path = folder / name
    path.write_text(yaml.safe_dump(document))
    return path


def _victim(folder: Path) -> tuple[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    victim = folder / "victim.safetensors"
    victim.write_bytes(b"precious, not tvtool's")
    return victim, victim.read_bytes()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "home"])
def test_config_output_outside_its_folder_is_refused(cli, config_dir, tmp_path, how):
    victim, before = _victim(tmp_path / "elsewhere")
    output = {"absolute": str(victim),
              "dotdot": "../elsewhere/victim.safetensors",
              "home": "~/victim.safetensors"}[how]
    config = _config(config_dir, output)
    result = cli(["merge", "--config", str(config), "--force"])
    assert result.exit_code == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "output" in line and "config" in line
    assert victim.read_bytes() == before
    assert sorted(p.name for p in config_dir.iterdir()) == [
        "merge.yaml", "tv1.safetensors", "tv2.safetensors"]


def test_config_output_through_a_symlink_out_of_its_folder_is_refused(cli, config_dir,
                                                                       tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (config_dir / "build").symlink_to(outside, target_is_directory=True)
    config = _config(config_dir, "build/merged.safetensors")
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 2, result.stderr
    assert "outside" in _one_error_line(result.stderr)
    assert list(outside.iterdir()) == []


def test_config_escape_is_refused_by_a_dry_run_too(cli, config_dir, tmp_path):
    config = _config(config_dir, "../merged.safetensors")
    result = cli(["merge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""


def test_config_output_is_relative_to_the_config_folder(cli, config_dir, tmp_path,
                                                        monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (config_dir / "out").mkdir()
    config = _config(config_dir, "out/../out/merged.safetensors")  # stays inside: allowed
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 0, result.stderr
    written = config_dir / "out" / "merged.safetensors"
    assert written.is_file() and list(elsewhere.iterdir()) == []
    # 0.5·(τ1 + τ2), recomputed here.
    t1, t2 = load(str(config_dir / "tv1.safetensors")), load(str(config_dir / "tv2.safetensors"))
    merged = load(str(written))
    for name in t1:
        expected = (0.5 * (t1[name].double() + t2[name].double())).float()
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7)


def test_the_o_flag_may_write_anywhere(cli, config_dir, tmp_path):
    config = _config(config_dir, "../nope.safetensors")  # ignored: -o wins
    target = tmp_path / "anywhere" / "m.safetensors"
    target.parent.mkdir()
    result = cli(["merge", "--config", str(config), "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    assert target.is_file() and not (tmp_path / "nope.safetensors").exists()


def test_existing_config_output_needs_force(cli, config_dir):
    existing = config_dir / "merged.safetensors"
    existing.write_bytes(b"an earlier result")
    config = _config(config_dir, "merged.safetensors")
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 2, result.stderr
    assert "--force" in _one_error_line(result.stderr)
    assert existing.read_bytes() == b"an earlier result"
    # A config cannot grant itself the right to overwrite: only the command line can.
    config = _config(config_dir, "merged.safetensors", overwrite=True)
    result = cli(["merge", "--config", str(config)])
    assert result.exit_code == 2 and "unknown key" in result.stderr
    assert existing.read_bytes() == b"an earlier result"
    config = _config(config_dir, "merged.safetensors")
    result = cli(["merge", "--config", str(config), "--force"])
    assert result.exit_code == 0, result.stderr
    assert sorted(load(str(existing))) == sorted(load(str(config_dir / "tv1.safetensors")))


def test_force_goes_with_a_config_only(cli, files, tmp_path):
    result = cli(["merge", files["tv1"], "-o", str(tmp_path / "m.safetensors"), "--force"])
    assert result.exit_code == 2 and "--force" in _one_error_line(result.stderr)


@pytest.mark.parametrize("via", ["config", "flag"])
def test_output_naming_the_config_itself_is_refused(cli, config_dir, via):
    config = _config(config_dir, "merge.yaml" if via == "config" else "x.safetensors")
    before = config.read_bytes()
    args = ["merge", "--config", str(config)]
    args += ["--force"] if via == "config" else ["-o", str(config)]
    result = cli(args)
    assert result.exit_code == 2, result.stderr
    assert "is also an input" in _one_error_line(result.stderr)
    assert config.read_bytes() == before


def test_saved_config_names_its_output_relative_to_itself(cli, config_dir, tmp_path):
    saved = config_dir / "saved.yaml"
    out = config_dir / "m1.safetensors"
    result = cli(["merge", str(config_dir / "tv1.safetensors"),
                  str(config_dir / "tv2.safetensors"), "-o", str(out),
                  "--save-config", str(saved)])
    assert result.exit_code == 0, result.stderr
    document = yaml.safe_load(saved.read_text())
    assert document["output"] == "m1.safetensors"
    assert document["vectors"] == ["tv1.safetensors", "tv2.safetensors"]
    out.unlink()
    rerun = cli(["merge", "--config", str(saved)])
    assert rerun.exit_code == 0, rerun.stderr
    assert out.is_file()


# ------------------------------------------------------------------ special files as -o


def _special_files(tmp_path: Path) -> dict[str, Path]:
    nodes = {}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    nodes["fifo"] = fifo
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    sock.close()
    nodes["socket"] = sock_path
    device = tmp_path / "null-device"
    try:  # the null device's numbers; needs CAP_MKNOD (root in a container)
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        nodes["device"] = device
    except (PermissionError, OSError):
        pass
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    nodes["symlink to a fifo"] = link
    return nodes


def test_special_files_as_outputs_are_refused_untouched(cli, files, tmp_path):
    for kind, node in _special_files(tmp_path).items():
        before = os.lstat(node)
        result = cli(["negate", files["tv1"], "-o", str(node)])
        assert result.exit_code == 2, (kind, result.stderr)
        assert "not a regular file" in _one_error_line(result.stderr), kind
        after = os.lstat(node)
        assert (stat.S_IFMT(after.st_mode), after.st_ino) == \
            (stat.S_IFMT(before.st_mode), before.st_ino), kind
    assert _leftovers(tmp_path) == []


def test_a_fifo_is_refused_for_json_reports_too(cli, files, tmp_path):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    result = cli(["eval", "--base", files["base"], "-d", "synthetic:nope", "--out", str(fifo)])
    assert result.exit_code == 2 and "not a regular file" in result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ------------------------------------------------------------------ output directories


def test_apply_hf_dir_dash_is_refused(cli, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(["apply", files["tv1"], "-b", files["base"], "--hf-dir", "-"])
    assert result.exit_code == 2, result.stderr
    assert "not stdout" in _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def _directory_targets(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link-to-empty").symlink_to(empty, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    return {"symlink to an empty dir": str(tmp_path / "link-to-empty"),
            "dangling symlink": str(tmp_path / "dangling"), "empty path": ""}


def _lora_vector(path: Path) -> str:
    from tvtool.finetune.lora import lora_targets, target_shapes
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind, Mode
    from tvtool.models import load_clip

    visual = load_clip(TINY).model.visual
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for name, (rows, cols) in target_shapes(visual, lora_targets(visual, ("q", "v"))).items():
        factors[f"visual.{name}.lora_A"] = torch.randn(2, cols, generator=gen) / cols ** 0.5
        factors[f"visual.{name}.lora_B"] = 0.05 * torch.randn(rows, 2, generator=gen)
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, base_ref=TINY, mode=Mode.LORA,
                    dataset="shape", extra={"lora_alpha": "4.0", "lora_rank": "2",
                                            "lora_targets": "q,v"})
    write_tensors(str(path), factors, meta.to_header())
    return str(path)


@pytest.mark.parametrize("command", ["apply", "export-peft"])
def test_directory_outputs_refuse_symlinks_and_empty_paths_first(cli, files, tmp_path,
                                                                  monkeypatch, command):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    vector = _lora_vector(tmp_path / "lora.safetensors") if command == "export-peft" \
        else files["tv1"]
    for kind, target in _directory_targets(work).items():
        before = sorted(p.name for p in work.iterdir())
        args = ["apply", vector, "-b", files["base"], "--hf-dir", target] \
            if command == "apply" else ["export-peft", vector, "-o", target]
        result = cli(args)
        assert result.exit_code == 2, (kind, result.stderr)
        _one_error_line(result.stderr)
        assert sorted(p.name for p in work.iterdir()) == before, kind
        assert list((work / "empty").iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
@pytest.mark.parametrize("command", ["apply", "export-peft"])
def test_written_directories_follow_the_umask(cli, files, tmp_path, mask, command):
    target = tmp_path / "out"
    vector = _lora_vector(tmp_path / "lora.safetensors") if command == "export-peft" \
        else files["tv1"]
    args = ["apply", vector, "-b", files["base"], "--hf-dir", str(target)] \
        if command == "apply" else ["export-peft", vector, "-o", str(target)]
    previous = os.umask(mask)
    try:
        result = cli(args)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~mask
    for path in target.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path.name


# ------------------------------------------------------------------ numbers past every bound


HUGE = "9" * 5000


def _assert_convert_refuses(cli, path: Path, tmp_path: Path, *extra: str) -> None:
    """``convert PATH`` exits 2 with one short error line, no internal error and no output."""
    out = tmp_path / "out.safetensors"
    result = cli(["convert", str(path), *extra, "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "internal error" not in line and len(line) < 600
    assert not out.exists()


def test_huge_layer_index_in_a_hugging_face_checkpoint_is_invalid_input(cli, tmp_path):
    from tests.test_hf_clip import hf_state

    sd = hf_state(seed=1)
    key = next(k for k in sd if ".encoder.layers.0." in k)
    sd[key.replace(".layers.0.", f".layers.{HUGE}.")] = sd.pop(key)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _assert_convert_refuses(cli, path, tmp_path)


def test_huge_block_index_in_an_open_clip_checkpoint_is_invalid_input(cli, tiny_state,
                                                                      tmp_path):
    state = dict(tiny_state)
    key = next(k for k in state if k.startswith("visual.transformer.resblocks.0."))
    state[key.replace(".resblocks.0.", f".resblocks.{HUGE}.")] = state.pop(key)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _assert_convert_refuses(cli, path, tmp_path)


def test_huge_parameter_index_in_a_tangent_checkpoint_is_invalid_input(cli, files, tmp_path):
    # LinearizedImageEncoder.save's layout (model.params.I / model.params0.I, model_name).
    path = tmp_path / "linear_finetuned.pt"
    torch.save({"model_name": TINY, f"model.params.{HUGE}": torch.zeros(2),
                "model.params0.0": torch.zeros(2)}, path)
    _assert_convert_refuses(cli, path, tmp_path, "--base", files["base"])


@pytest.fixture()
def adapter(cli, tmp_path) -> Path:
    """A valid peft adapter directory written by tvtool export-peft."""
    out = tmp_path / "adapter"
    result = cli(["export-peft", _lora_vector(tmp_path / "v.safetensors"), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    document = json.loads(path.read_text())
    document.update(changes)
    # json.dumps writes a 400-digit integer as it is, as a hostile file would hold it.
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("changes", [
    {"r": int("4" * 400)},
    {"rank_pattern": {"resblocks.0.attn": int("4" * 400)}},
    {"lora_alpha": 1e308},
    {"alpha_pattern": {"resblocks.0.attn": 1e308}},
    {"lora_alpha": 1e300, "use_rslora": True},
])
def test_adapter_numbers_past_float32_are_refused_at_convert(cli, adapter, tmp_path, changes):
    _edit_config(adapter, **changes)
    out = tmp_path / "vector.safetensors"
    result = cli(["convert", str(adapter), "--base", TINY, "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "internal error" not in line and len(line) < 600
    assert not out.exists()


def _idx(path: Path, type_code: int, shape: tuple[int, ...], payload: bytes) -> None:
    magic = (type_code << 8) + len(shape)
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in shape)
                     + payload)


@pytest.mark.parametrize("labels", [
    (0x0D, (4,), struct.pack(">4f", 0, 1, 2, 3)),  # float32 labels
    (0x07, (4,), bytes(4)),  # a type code the format does not have
    (0x08, (2, 2), bytes(4)),  # two-dimensional labels
])
def test_damaged_mnist_label_file_is_invalid_input(tmp_path, labels):
    from tvtool.data import load_split
    from tvtool.errors import InvalidInputError

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", 0x08, (4, 28, 28), bytes(4 * 28 * 28))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", *labels)
    with pytest.raises(InvalidInputError, match="MNIST"):
        load_split("MNIST", "test", data_root=tmp_path)


# ------------------------------------------------------------------ signals and stdout


def _run_module(code_before: str, args: list[str], cwd: Path
                ) -> subprocess.CompletedProcess:
    """Run ``python -m tvtool ARGS`` after ``code_before`` (a deterministic fault injection)."""
    code = (f"import os, signal, sys, runpy\n{code_before}\n"
            f"sys.argv = ['tvtool', *{args!r}]\n"
            "runpy.run_module('tvtool', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env(),
                          stdin=subprocess.DEVNULL, cwd=cwd, timeout=300)


def test_sigterm_mid_write_exits_143_and_leaves_nothing(files, tmp_path):
    # SIGTERM arrives after part of the file is written (CI runners stop jobs this way).
    inject = ("import tvtool.io.safetensors_io as s\n"
              "original = s._stream_to\n"
              "def stream(handle, *args, **kwargs):\n"
              "    handle.write(b'partial')\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return original(handle, *args, **kwargs)\n"
              "s._stream_to = stream\n")
    out = tmp_path / "negated.safetensors"
    result = _run_module(inject, ["negate", files["tv1"], "-o", str(out)], tmp_path)
    assert result.returncode == 143, result.stderr.decode()
    assert result.stderr.decode().splitlines() == ["tvtool: error: terminated (SIGTERM)"]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_filling_a_directory_leaves_no_staging_dir(files, tmp_path):
    inject = ("import tvtool.io.hf_dirs as h\n"
              "original = h.write_json\n"
              "def write_json(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return original(*args, **kwargs)\n"
              "h.write_json = write_json\n")
    target = tmp_path / "edited"
    result = _run_module(inject, ["apply", files["tv1"], "-b", files["base"], "--hf-dir",
                                  str(target)], tmp_path)
    assert result.returncode == 143, result.stderr.decode()
    assert result.stderr.decode().splitlines()[-1] == "tvtool: error: terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


def test_reports_and_data_that_cannot_reach_stdout(files, tmp_path):
    """--json with stdout closed or full, and -o - into a pipe nobody reads (one bash run)."""
    tv = f"{shlex.quote(sys.executable)} -m tvtool"
    vector = shlex.quote(files["tv1"])
    script = "\n".join([
        # Closed before the work: refused at once, nothing written.
        f"{tv} negate {vector} -o closed.safetensors --json >&- 2>closed.err; echo $? > closed.rc",
        # Full: the report fails after the file was written, which is then removed.
        f"{tv} negate {vector} -o full.safetensors --json >/dev/full 2>full.err; echo $? > full.rc",
        # The reader of the data is gone: the data is lost, so the command failed.
        "set -o pipefail",
        f"{tv} negate {vector} -o - 2>pipe.err | true; echo $? > pipe.rc",
    ])
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()

    def outcome(name: str) -> tuple[int, str]:
        rc = int((tmp_path / f"{name}.rc").read_text())
        return rc, _one_error_line((tmp_path / f"{name}.err").read_text())

    rc, line = outcome("closed")
    assert rc == 2 and "stdout is closed" in line
    rc, line = outcome("full")
    assert rc == 1 and "no space left" in line and "removed" in line
    rc, line = outcome("pipe")
    assert rc == 1 and "broken pipe" in line
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".rc", ".err"))
                  ) == []


def test_a_report_that_cannot_be_written_removes_the_output_directory(cli, files, tmp_path,
                                                                       monkeypatch):
    from tvtool.cli import common

    def refuse(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    target = tmp_path / "edited"
    monkeypatch.setattr(common, "_write_stdout", refuse)
    result = cli(["apply", files["tv1"], "-b", files["base"], "--hf-dir", str(target),
                  "--json"])
    assert result.exit_code == 1
    assert "broken pipe" in _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_os_error_without_strerror_prints_its_message(capsys):
    import typer

    from tvtool.cli.common import handles_errors

    @handles_errors
    def command() -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    with pytest.raises(typer.Exit) as caught:
        command()
    assert caught.value.exit_code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "We couldn't connect to 'https://huggingface.co'" in line
    assert "(hint: " in line


def test_library_warnings_are_printed_once():
    code = ("from tvtool.cli.common import wire_logging\n"
            "wire_logging()\n"
            "import logging\n"
            "from huggingface_hub.utils import logging as hub_logging\n"
            "hub_logging.get_logger('huggingface_hub.utils._http').warning('hub probe')\n"
            "logging.warning('root probe')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env(),
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stderr.decode().splitlines()
    assert sum("hub probe" in line for line in lines) == 1, lines
    assert sum("root probe" in line for line in lines) == 1, lines


# ------------------------------------------------------------------ pretrained tags offline


def test_offline_pretrained_tag_is_one_line_exit_2(files, tmp_path):
    out = tmp_path / "tv.safetensors"
    env = _env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    result = subprocess.run([sys.executable, "-m", "tvtool", "extract", files["ft1"], "--base",
                             "ViT-B-32:openai", "-o", str(out)], capture_output=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 2, result.stderr.decode()
    stderr = result.stderr.decode()
    assert len(stderr.splitlines()) == 1, stderr
    line = _one_error_line(stderr)
    assert "ViT-B-32:openai" in line and "HF_HUB_OFFLINE" in line
    # The hint names the cache to fill and the two offline alternatives.
    assert str(tmp_path / "empty-cache") in line and ":PATH" in line and "hf-hub:" in line
    assert not out.exists()


@pytest.fixture()
def hub_offline_world(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and a record of every name lookup (none may happen)."""
    import huggingface_hub

    from tvtool.models import hub_access

    monkeypatch.setattr(hub_access, "_probes", {})  # no probe result from an earlier test
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    lookups: list[object] = []

    def no_network(*args, **kwargs):
        lookups.append(args[0] if args else kwargs)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return {"cache": cache, "lookups": lookups}


def test_unreachable_hub_fails_fast_with_one_probe(cli, files, tmp_path, hub_offline_world):
    out = tmp_path / "tv.safetensors"
    result = cli(["extract", files["ft1"], "--base", "ViT-B-32:openai", "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "unreachable" in line and str(hub_offline_world["cache"]) in line
    # One probe of the endpoint, no retries.
    assert len(hub_offline_world["lookups"]) == 1, hub_offline_world["lookups"]
    assert not out.exists()


def test_a_cached_tag_loads_without_the_network(tmp_path, monkeypatch, hub_offline_world):
    """A tag whose weights are in the cache is read from it, with no request at all."""
    from open_clip import pretrained

    from tvtool.io import write_tensors
    from tvtool.models import load_clip

    monkeypatch.setitem(pretrained._PRETRAINED, TINY, {"fake": {"hf_hub": "tvtool/fake-tiny/"}})
    random = load_clip(f"{TINY}:random").model.state_dict()
    weights = {k: v + 0.5 for k, v in random.items()}
    # The layout huggingface_hub's cache has after a download of tvtool/fake-tiny.
    repo = hub_offline_world["cache"] / "models--tvtool--fake-tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    write_tensors(str(snapshot / "open_clip_model.safetensors"), weights)
    loaded = load_clip(f"{TINY}:fake").model.state_dict()
    assert hub_offline_world["lookups"] == []
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name


def test_eval_with_head_files_needs_no_tokenizer(cli, files, tmp_path, monkeypatch):
    import open_clip

    from tvtool.data import task_spec
    from tvtool.evaluate import head_key, head_metadata, open_eval_model, zero_shot_head
    from tvtool.io import write_tensors

    dataset = "synthetic:shape"
    spec = task_spec(dataset)
    with open_eval_model(files["base"]) as model:
        key = head_key(model.base_fingerprint, dataset, list(spec.classnames),
                       list(spec.templates))
        head = zero_shot_head(model.bundle, key, list(spec.templates), disk_cache=False)
    path = tmp_path / "head.safetensors"
    write_tensors(str(path), {"head": head}, head_metadata(key))

    def no_tokenizer(*args, **kwargs):
        raise OSError("the tokenizer is not in the offline cache")

    monkeypatch.setattr(open_clip, "get_tokenizer", no_tokenizer)
    result = cli(["eval", "--base", files["base"], "-d", dataset, "--head", str(path),
                  "--limit", "8", "--json"])
    assert result.exit_code == 0, result.stderr
