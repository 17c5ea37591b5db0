"""Real shell pipes through ``python -m tvtool`` (separate processes, OS pipes), in the default run.

The in-process runner hands stdin over as bytes; only separate processes show whether a
command really streams to a pipe, reads a pipe that is not seekable, and keeps logs off stdout.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import torch

from tests.conftest import load


def test_extract_negate_apply_through_shell_pipes(files, tmp_path):
    out = tmp_path / "edited.safetensors"
    tv = f"{shlex.quote(sys.executable)} -m tvtool"
    base, ft1 = shlex.quote(files["base"]), shlex.quote(files["ft1"])
    script = (f"set -euo pipefail\n"
              f"{tv} extract {ft1} --base {base} -o - "
              f"| {tv} negate - --coef 0.5 -o - "
              f"| {tv} apply - --base {base} -o {shlex.quote(str(out))}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout of the last command is the output path only; logs went to stderr.
    assert done.stdout == f"{out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.safetensors"]
    base_t, ft_t, edited = load(files["base"]), load(files["ft1"]), load(str(out))
    assert edited.keys() == base_t.keys()
    for name, tensor in base_t.items():
        if not tensor.is_floating_point():
            assert torch.equal(edited[name], tensor), name
            continue
        # θ0 − 0.5·(θ_ft − θ0), computed here in float64.
        expected = (tensor.double() - 0.5 * (ft_t[name].double() - tensor.double())).float()
        torch.testing.assert_close(edited[name], expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(edited[n], base_t[n]) for n in base_t)


def test_a_failing_stage_fails_the_pipe_with_one_error_line(files, tmp_path):
    tv = f"{shlex.quote(sys.executable)} -m tvtool"
    # A checkpoint is not a task vector: negate must refuse what extract never produced.
    script = (f"set -o pipefail\ncat {shlex.quote(files['base'])} | {tv} negate - -o - "
              f"| cat > out.safetensors\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("tvtool: error:")]
    assert len(errors) == 1, done.stderr
    assert "is a tvtool checkpoint, not a task vector" in errors[0]
    assert "Traceback" not in done.stderr
    # Nothing reached the pipe: the reader got an empty stream, not half a file.
    assert (tmp_path / "out.safetensors").read_bytes() == b""
