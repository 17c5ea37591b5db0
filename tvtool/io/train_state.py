"""Resumable training state: tensors plus a JSON document in one atomic safetensors file.

Used by ``tvtool finetune --workdir/--resume``. Nothing is pickled: tensors (weights,
optimizer moments, RNG states as uint8) are safetensors, scalars are JSON stored in the
header under :data:`STATE_KEY`. One file means one atomic rename, so a crash leaves either the
previous complete state or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.io.safetensors_io import open_tensors, write_tensors
from tvtool.limits import loads_json, short_repr

RESUME_CHOICES = ("auto", "yes", "no")
"""``--resume``: continue a compatible state of ``--workdir`` or start (``auto``, the
default), continue and refuse when there is no state (``yes``, a bare ``--resume``), or start
over, replacing any state (``no``). Shared by ``finetune`` and ``pretrain``."""

STATE_KEY = "tvtool_resume.state"
"""Header key holding the JSON document (deliberately not a ``tvtool.*`` file kind)."""


def write_train_state(path: str, tensors: Mapping[str, torch.Tensor],
                      state: Mapping[str, Any]) -> None:
    """Write training state atomically (non-finite floats are allowed in optimizer moments).

    Args:
        path: Destination file.
        tensors: Named CPU tensors.
        state: JSON-serialisable document.
    """
    document = json.dumps(state, sort_keys=True, allow_nan=False)
    write_tensors(path, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  {STATE_KEY: document}, check_finite=False)


def read_train_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_train_state`.

    Returns:
        ``(tensors, state)``.

    The caller checks the contents against its run (see ``tvtool.finetune.resume``).

    Raises:
        InvalidInputError: missing, damaged, or not a tvtool training state.
    """
    source = open_tensors(path)
    try:
        text = source.metadata.get(STATE_KEY)
        if text is None:
            raise InvalidInputError(f"{path!r} is not a tvtool training state",
                                    hint="point --workdir at the directory of the interrupted run")
        state = loads_json(text, f"{path!r}: the training-state header")
        tensors = {name: source.get(name).clone() for name in list(source.keys())}
    finally:
        source.close()
    if not isinstance(state, dict):
        raise InvalidInputError(f"{path!r} holds a training-state document that is a "
                                f"{type(state).__name__}, not a mapping",
                                hint="start a new --workdir, or pass --resume no to replace it")
    return tensors, state


_REQUIRED_MOMENTS = frozenset({"step", "exp_avg", "exp_avg_sq"})
_KNOWN_MOMENTS = _REQUIRED_MOMENTS | {"max_exp_avg_sq"}


def damaged_state(path: str, what: str) -> InvalidInputError:
    """The one-line error of a training state that cannot be used (exit 2)."""
    return InvalidInputError(f"the training state {path!r} is damaged: {what}",
                             hint="start a new --workdir, or pass --resume no to replace it")


def checked_step(path: str, state: Mapping[str, Any], total: int) -> int:
    """The ``step`` a training state records, an integer in [0, ``total``].

    Raises:
        InvalidInputError: anything else (a damaged state, exit 2).
    """
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise damaged_state(path, f"'step' must be an integer in [0, {total}], got "
                                  f"{short_repr(step, 40)}")
    return step


def optimizer_tensors(params: Mapping[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The trained tensors and their Adam(W) moments, named as training states store them.

    Args:
        params: The trained parameters by name.
        optimizer: The optimizer stepping them.

    Returns:
        ``param/NAME`` for every parameter and ``optim/NAME/MOMENT`` for every tensor of its
        optimizer state.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        tensors[f"param/{name}"] = param.detach()
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value
    return tensors


def check_training_tensors(path: str, tensors: Mapping[str, torch.Tensor],
                           params: Mapping[str, torch.Tensor]) -> None:
    """Check a state's tensors against the run's parameters before any of it is applied.

    A state file is written by tvtool, but a damaged or edited one must end in a one-line
    InvalidInputError (exit 2), never in a KeyError deep inside torch.

    Args:
        path: The state file (for messages).
        tensors: The tensors read from it.
        params: The parameters the run trains, by name.

    Raises:
        InvalidInputError: a missing, unexpected or misshapen tensor.
    """
    rng = tensors.get("rng/torch_cpu")
    expected = torch.get_rng_state()
    if rng is None or rng.dtype != torch.uint8 or rng.shape != expected.shape:
        found = "missing" if rng is None else f"{rng.dtype} {tuple(rng.shape)}"
        raise damaged_state(path, f"RNG state 'rng/torch_cpu' is {found}, expected uint8 "
                                  f"{tuple(expected.shape)}")
    with torch.random.fork_rng(devices=[]):
        try:
            torch.set_rng_state(rng)  # its bytes must be a valid generator state too
        except RuntimeError:
            raise damaged_state(path, "malformed RNG state 'rng/torch_cpu'") from None
    moments: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        if key == "rng/torch_cpu":
            continue
        if key.startswith("rng/cuda/"):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise damaged_state(path, f"malformed CUDA RNG state {key[:80]!r}")
            continue
        if key.startswith("param/") and key[len("param/"):] in params:
            name = key[len("param/"):]
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise damaged_state(path, f"tensor {key[:80]!r} has shape "
                                          f"{tuple(tensor.shape)}, expected "
                                          f"{tuple(params[name].shape)}")
            continue
        name, _, moment = key[len("optim/"):].rpartition("/")
        if not key.startswith("optim/") or name not in params or moment not in _KNOWN_MOMENTS:
            raise damaged_state(path, f"unexpected tensor {key[:80]!r}")
        shape = (1,) if moment == "step" else tuple(params[name].shape)
        if (tensor.numel() != 1 if moment == "step" else tuple(tensor.shape) != shape) \
                or not tensor.is_floating_point():
            raise damaged_state(path, f"optimizer tensor {key[:80]!r} is {tensor.dtype} "
                                      f"{tuple(tensor.shape)}, expected floating {shape}")
        moments.setdefault(name, set()).add(moment)
    missing = sorted(f"param/{n}" for n in params if f"param/{n}" not in tensors)
    missing += sorted(f"optim/{n}/{m}" for n, have in moments.items()
                      for m in _REQUIRED_MOMENTS - have)
    if missing:
        raise damaged_state(path, f"missing tensor(s) {short_repr(missing)}")


def restore_optimizer(optimizer: torch.optim.Optimizer, names: Sequence[str],
                      tensors: Mapping[str, torch.Tensor]) -> None:
    """Load the ``optim/NAME/MOMENT`` tensors of a checked state into ``optimizer``.

    Args:
        optimizer: The run's optimizer, built over the parameters ``names`` in this order.
        names: The parameter names, in the order of the optimizer's parameter groups.
        tensors: The state's tensors (checked by :func:`check_training_tensors`).
    """
    # Rebuild the optimizer's own state_dict so torch applies its device/dtype rules ("step"
    # lives on the device for fused AdamW, on the CPU otherwise).
    current = optimizer.state_dict()
    order = [i for group in current["param_groups"] for i in group["params"]]
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in zip(order, names, strict=True):
        moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                   if k.startswith(f"optim/{name}/")}
        if moments:
            restored[index] = moments
    optimizer.load_state_dict({"state": restored, "param_groups": current["param_groups"]})


def check_run_key(saved: Mapping[str, Any], current: Mapping[str, Any], path: str,
                  what: str = "run") -> None:
    """Refuse a training state whose run settings differ from the current run's.

    Args:
        saved: The settings recorded in the state (``{}`` when it has none).
        current: The current run's settings; every key must match.
        path: The state file (for messages).
        what: How to name the run in the message (``run``, ``pre-training run``).

    Raises:
        InvalidInputError: a setting differs (the first three are named).
    """
    different = [k for k in current if saved.get(k) != current[k]]
    if different:
        detail = ", ".join(f"{k}: {short_repr(saved.get(k), 40)} -> {short_repr(current[k], 40)}"
                           for k in different[:3])
        raise InvalidInputError(
            f"the training state in {path!r} belongs to a different {what} ({detail})",
            hint="resume with the original settings, use a new --workdir, or pass --resume no "
                 "to start over (the state is replaced)")


def continue_how(resume: str) -> str:
    """How to continue from a saved state, given the run's ``--resume``."""
    return ("run the same command again to continue from it" if resume != "no"
            else "run it again with --resume auto instead of --resume no to continue from it")


def interruption_text(done: int, total: int, state_path: str | None = None, *, every: int = 0,
                      workdir: str | None = None, resume: str = "auto",
                      saved: int | None = None) -> str:
    """What a user needs after Ctrl-C: where the training state is and how to continue.

    Args:
        done: Optimizer steps completed.
        total: Steps of the run.
        state_path: The training-state file (None without ``--workdir``: the other
            arguments are then not used).
        every: Steps between saves (``--checkpoint-every``).
        workdir: The work directory.
        resume: The run's ``--resume``.
        saved: Step of the state on disk that this run wrote or resumed from (None if none).
    """
    where = f"stopped after step {done} of {total}"
    if state_path is None:
        return f"{where}; nothing was saved (--workdir DIR makes a run resumable)"
    if saved is None:
        return (f"{where}; no training state was saved yet (every {every} steps, "
                f"--checkpoint-every, into {workdir})")
    return f"{where}; the training state of step {saved} is in {state_path}: {continue_how(resume)}"
