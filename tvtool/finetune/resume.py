"""The resume state of a fine-tuning run: its key, saving, checking and loading.

A run writes its trainable tensors, optimizer moments, RNG states and gradient-scaler state
every ``checkpoint_every`` steps; ``--resume auto`` (the default) and ``--resume yes``
restore them only after checking that the state belongs to the same run (:func:`_run_key`)
and is intact (:func:`_check_state`), and refuse it otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tvtool.errors import InvalidInputError
from tvtool.finetune.base import Adapter
from tvtool.finetune.config import STATE_FORMAT, FinetuneConfig
from tvtool.finetune.registry import get_mode
from tvtool.io.train_state import (
    check_run_key,
    check_training_tensors,
    checked_step,
    damaged_state,
    optimizer_tensors,
    read_train_state,
    restore_optimizer,
    write_train_state,
)
from tvtool.limits import short_repr
from tvtool.types import StateDict


def _run_key(config: FinetuneConfig, fingerprint: str, total: int, warmup: int,
             size: int) -> dict[str, Any]:
    key = {**config.resume_fields(), **get_mode(config.mode).run_marks}
    key.update(base_fingerprint=fingerprint, total_steps=total, warmup_steps=warmup,
               dataset_size=size)
    return key


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_random_state(state: Sequence[Any], rng: Any = random) -> None:
    rng.setstate((int(state[0]), tuple(int(v) for v in state[1]), state[2]))


def _save_state(path: str, adapter: Adapter, names: list[str], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, step: int, run_key: dict[str, Any]) -> None:
    params = dict(adapter.trainable())
    tensors: StateDict = optimizer_tensors({name: params[name] for name in names}, optimizer)
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = rng
    state = {"format": STATE_FORMAT, "step": step, "run": run_key,
             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "python_random": _python_random_state()}
    write_train_state(path, tensors, state)


def _check_state(path: str, tensors: Mapping[str, Tensor], state: Mapping[str, Any],
                 params: Mapping[str, Tensor], total: int) -> None:
    """Validate everything :func:`_load_state` reads, before any of it is applied.

    A state file is written by tvtool, but a damaged or edited one must end in a one-line
    InvalidInputError (exit 2), never in a KeyError deep inside torch.
    """
    checked_step(path, state, total)
    if not isinstance(state.get("run"), dict):
        raise damaged_state(path, "no 'run' record")
    check_training_tensors(path, tensors, params)
    python_random = state.get("python_random")
    if python_random:
        try:
            _set_python_random_state(python_random, random.Random())
        except (TypeError, ValueError, IndexError, OverflowError, KeyError):
            raise damaged_state(path, "malformed Python RNG state") from None
    if state.get("scaler") is not None and not isinstance(state.get("scaler"), dict):
        raise damaged_state(path, "malformed gradient-scaler state")


def _load_state(path: str, adapter: Adapter, names: list[str],
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                run_key: dict[str, Any]) -> int:
    tensors, state = read_train_state(path)
    if state.get("format") != STATE_FORMAT:
        raise InvalidInputError(f"{path!r} has training-state format "
                                f"{short_repr(state.get('format'), 40)}, "
                                f"this tvtool reads {STATE_FORMAT}",
                                hint="use a new --workdir, or pass --resume no to replace it")
    run = state.get("run")
    check_run_key(run if isinstance(run, dict) else {}, run_key, path)
    _check_state(path, tensors, state, dict(adapter.trainable()), int(run_key["total_steps"]))
    adapter.load_trainable_state({n: tensors[f"param/{n}"] for n in names
                                  if f"param/{n}" in tensors})
    restore_optimizer(optimizer, names, tensors)
    if scaler.is_enabled() and state.get("scaler"):
        try:
            scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise damaged_state(path, "malformed gradient-scaler state") from exc
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    if state.get("python_random"):
        _set_python_random_state(state["python_random"])
    return int(state["step"])
