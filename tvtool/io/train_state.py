"""Resumable training state: tensors plus a JSON document in one atomic safetensors file.

Used by ``tvtool finetune --workdir/--resume``. Nothing is pickled: tensors (weights,
optimizer moments, RNG states as uint8) are safetensors, scalars are JSON stored in the
header under :data:`STATE_KEY`. One file means one atomic rename, so a crash leaves either the
previous complete state or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.io.safetensors_io import open_tensors, write_tensors
from tvtool.limits import loads_json

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
