"""The walkthrough in docs/demo.md runs as written (slow: several fine-tunes and searches)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "demo.md"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_the_walkthrough_has_the_individual_steps_and_a_pipeline():
    blocks = _bash_blocks(DOC.read_text(encoding="utf-8"))
    steps, pipeline = blocks[1], blocks[2]
    for command in ("finetune", "extract", "eval", "merge", "learn-coeffs", "negate",
                    "inspect", "eval disentanglement"):
        assert f"tvtool {command} " in steps, command
    assert pipeline.count("| tvtool") == 2


@pytest.mark.slow
def test_walkthrough_commands_run_as_written(tmp_path):
    blocks = _bash_blocks(DOC.read_text(encoding="utf-8"))[1:]  # the first one is `make demo`
    script = "set -euo pipefail\n" + "\n".join(blocks)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "TVTOOL_CACHE_DIR": str(tmp_path / "cache"), "TVTOOL_DEVICE": "cpu"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("shape.safetensors", "shape-extracted.safetensors", "shape-lin.safetensors",
                 "multitask.safetensors", "atlas.safetensors", "tta.safetensors",
                 "forget.safetensors", "dis.png", "edited.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
