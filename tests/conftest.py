"""Shared fixtures: the tiny open_clip config (tvtool.models.backend), files, CLI runner."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Tests build tvtool-tiny with open_clip directly: its config is registered on import.
import tvtool.models.backend  # noqa: F401

# Tests never read or write the user's cache: one throw-away cache dir per session.
os.environ["TVTOOL_CACHE_DIR"] = tempfile.mkdtemp(prefix="tvtool-test-cache-")
atexit.register(shutil.rmtree, os.environ["TVTOOL_CACHE_DIR"], ignore_errors=True)
# Tiny models: one intra-op thread is faster than two here and keeps timings stable.
torch.set_num_threads(1)

TINY = "tvtool-tiny"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` as a module, as ``python scripts/NAME.py`` would see it.

    The scripts directory is on ``sys.path`` while it loads, so a script's imports of its
    sibling scripts resolve as they do when the script runs.
    """
    spec = importlib.util.spec_from_file_location(f"_tvtool_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
        sys.modules.pop(spec.name, None)
    return module


@dataclass
class CliResult:
    """What a tvtool invocation produced."""

    exit_code: int
    stdout: str
    stdout_bytes: bytes
    stderr: str


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> dict[str, int]:
    """Replace ``owner.name`` by a wrapper that counts its calls in the returned ``{"n": ...}``."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def run_tvtool(args: Sequence[str], input: bytes | None = None) -> CliResult:
    """Run the CLI in-process with separate stdout/stderr."""
    from typer.testing import CliRunner

    from tvtool.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, list(args), input=input, catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stdout_bytes, result.stderr)


@pytest.fixture(scope="session")
def cli():
    """The in-process CLI runner."""
    return run_tvtool


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    """State dict of the tiny open_clip model, random init (seeded)."""
    from tvtool.models import load_clip

    return {k: v.clone() for k, v in load_clip(f"{TINY}:random").model.state_dict().items()}


def perturbed(state: dict[str, torch.Tensor], seed: int, prefix: str = "visual.",
              scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A fake fine-tuned model: the tensors under ``prefix`` moved by seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=gen) if k.startswith(prefix)
                and v.is_floating_point() else v.clone()) for k, v in state.items()}


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_state):
    """A base checkpoint, two fine-tuned checkpoints and their task vectors on disk."""
    from tvtool.commands.extract import ExtractConfig
    from tvtool.commands.extract import extract as run_extract
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind

    root = tmp_path_factory.mktemp("files")
    header = FileMeta(kind=Kind.CHECKPOINT, architecture=TINY).to_header()
    paths = {"root": root, "base": root / "base.safetensors"}
    write_tensors(str(paths["base"]), tiny_state, header)
    for index in (1, 2):
        ft = root / f"ft{index}.safetensors"
        write_tensors(str(ft), perturbed(tiny_state, index), header)
        tv = root / f"tv{index}.safetensors"
        run_extract(ExtractConfig(base=str(paths["base"]), finetuned=str(ft),
                                                    output=str(tv), dataset=f"task{index}",
                                                    keep="changed"))
        paths[f"ft{index}"], paths[f"tv{index}"] = ft, tv
    return {k: (str(v) if k != "root" else v) for k, v in paths.items()}


def load(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(path)


def reference_lora_dense(factors: dict[str, torch.Tensor], alpha: float,
                         width: int) -> dict[str, torch.Tensor]:
    """Reference ΔW in float64, written independently of tvtool: (alpha/r)·B·A per target,
    q/k/v row blocks of a fused ``in_proj_weight`` stacked with zeros."""
    out: dict[str, torch.Tensor] = {}
    for key, a in factors.items():
        if not key.endswith(".lora_A"):
            continue
        stem = key[: -len(".lora_A")]
        delta = (alpha / a.shape[0]) * factors[stem + ".lora_B"].double() @ a.double()
        weight, _, last = stem.rpartition(".")
        if last in ("q", "k", "v") and weight.endswith("in_proj_weight"):
            full = out.setdefault(weight, torch.zeros(3 * width, width, dtype=torch.float64))
            index = "qkv".index(last)
            full[index * width:(index + 1) * width] += delta
        else:
            out[stem] = delta
    return out
