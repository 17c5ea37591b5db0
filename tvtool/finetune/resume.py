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
from tvtool.io.train_state import read_train_state, write_train_state
from tvtool.limits import short_repr
from tvtool.types import StateDict


def _run_key(config: FinetuneConfig, fingerprint: str, total: int, warmup: int,
             size: int) -> dict[str, Any]:
    key = {**config.resume_fields(), **get_mode(config.mode).run_marks}
    key.update(base_fingerprint=fingerprint, total_steps=total, warmup_steps=warmup,
               dataset_size=size)
    return key


def _check_run_key(saved: Mapping[str, Any], current: Mapping[str, Any], path: str) -> None:
    different = [k for k in current if saved.get(k) != current[k]]
    if different:
        detail = ", ".join(f"{k}: {short_repr(saved.get(k), 40)} -> {short_repr(current[k], 40)}"
                           for k in different[:3])
        raise InvalidInputError(
            f"the training state in {path!r} belongs to a different run ({detail})",
            hint="resume with the original settings, use a new --workdir, or pass --resume no "
                 "to start over (the state is replaced)")


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_random_state(state: Sequence[Any], rng: Any = random) -> None:
    rng.setstate((int(state[0]), tuple(int(v) for v in state[1]), state[2]))


def _save_state(path: str, adapter: Adapter, names: list[str], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, step: int, run_key: dict[str, Any]) -> None:
    tensors: StateDict = {}
    params = dict(adapter.trainable())
    for name in names:
        param = params[name]
        tensors[f"param/{name}"] = param.detach()
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor):
                tensors[f"optim/{name}/{key}"] = value
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = rng
    state = {"format": STATE_FORMAT, "step": step, "run": run_key,
             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "python_random": _python_random_state()}
    write_train_state(path, tensors, state)


_REQUIRED_MOMENTS = frozenset({"step", "exp_avg", "exp_avg_sq"})
_KNOWN_MOMENTS = _REQUIRED_MOMENTS | {"max_exp_avg_sq"}


def _damaged(path: str, what: str) -> InvalidInputError:
    return InvalidInputError(f"the training state {path!r} is damaged: {what}",
                             hint="start a new --workdir, or pass --resume no to replace it")


def _check_state(path: str, tensors: Mapping[str, Tensor], state: Mapping[str, Any],
                 params: Mapping[str, Tensor], total: int) -> None:
    """Validate everything :func:`_load_state` reads, before any of it is applied.

    A state file is written by tvtool, but a damaged or edited one must end in a one-line
    InvalidInputError (exit 2), never in a KeyError deep inside torch.
    """
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise _damaged(path, f"'step' must be an integer in [0, {total}], got "
                             f"{short_repr(step, 40)}")
    if not isinstance(state.get("run"), dict):
        raise _damaged(path, "no 'run' record")
    rng = tensors.get("rng/torch_cpu")
    expected = torch.get_rng_state()
    if rng is None or rng.dtype != torch.uint8 or rng.shape != expected.shape:
        found = "missing" if rng is None else f"{rng.dtype} {tuple(rng.shape)}"
        raise _damaged(path, f"RNG state 'rng/torch_cpu' is {found}, expected uint8 "
                             f"{tuple(expected.shape)}")
    moments: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        if key == "rng/torch_cpu":
            continue
        if key.startswith("rng/cuda/"):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise _damaged(path, f"malformed CUDA RNG state {key[:80]!r}")
            continue
        if key.startswith("param/") and key[len("param/"):] in params:
            name = key[len("param/"):]
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise _damaged(path, f"tensor {key[:80]!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
            continue
        name, _, moment = key[len("optim/"):].rpartition("/")
        if not key.startswith("optim/") or name not in params or moment not in _KNOWN_MOMENTS:
            raise _damaged(path, f"unexpected tensor {key[:80]!r}")
        shape = (1,) if moment == "step" else tuple(params[name].shape)
        if (tensor.numel() != 1 if moment == "step" else tuple(tensor.shape) != shape) \
                or not tensor.is_floating_point():
            raise _damaged(path, f"optimizer tensor {key[:80]!r} is {tensor.dtype} "
                                 f"{tuple(tensor.shape)}, expected floating {shape}")
        moments.setdefault(name, set()).add(moment)
    missing = sorted(f"param/{n}" for n in params if f"param/{n}" not in tensors)
    missing += sorted(f"optim/{n}/{m}" for n, have in moments.items()
                      for m in _REQUIRED_MOMENTS - have)
    if missing:
        raise _damaged(path, f"missing tensor(s) {short_repr(missing)}")
    python_random = state.get("python_random")
    if python_random:
        try:
            _set_python_random_state(python_random, random.Random())
        except (TypeError, ValueError, IndexError, OverflowError, KeyError):
            raise _damaged(path, "malformed Python RNG state") from None
    if state.get("scaler") is not None and not isinstance(state.get("scaler"), dict):
        raise _damaged(path, "malformed gradient-scaler state")


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
    _check_run_key(run if isinstance(run, dict) else {}, run_key, path)
    _check_state(path, tensors, state, dict(adapter.trainable()), int(run_key["total_steps"]))
    adapter.load_trainable_state({n: tensors[f"param/{n}"] for n in names
                                  if f"param/{n}" in tensors})
    # Rebuild the optimizer's own state_dict so torch applies its device/dtype rules ("step"
    # lives on the device for fused AdamW, on the CPU otherwise).
    current = optimizer.state_dict()
    order = [i for group in current["param_groups"] for i in group["params"]]
    restored: dict[int, dict[str, Tensor]] = {}
    for index, name in zip(order, names, strict=True):
        moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                   if k.startswith(f"optim/{name}/")}
        if moments:
            restored[index] = moments
    optimizer.load_state_dict({"state": restored, "param_groups": current["param_groups"]})
    if scaler.is_enabled() and state.get("scaler"):
        try:
            scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise _damaged(path, "malformed gradient-scaler state") from exc
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    if state.get("python_random"):
        _set_python_random_state(state["python_random"])
    return int(state["step"])
