"""Reading pickled PyTorch checkpoints without executing pickle code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from tvtool.errors import InvalidInputError
from tvtool.types import StateDict


def load_legacy(path: str) -> StateDict:
    """Load tensors from a pickled ``.pt``/``.bin`` checkpoint with a restricted unpickler.

    Only plain state dicts (optionally nested under ``state_dict``) are accepted here; torch's
    ``weights_only`` unpickler refuses every global that is not a tensor building block, so no
    code from the file runs.

    Args:
        path: Checkpoint path.

    Returns:
        The flat state dict.

    Raises:
        InvalidInputError: if the file is missing, holds anything but tensors, or is corrupt.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidInputError(f"input file {path!r} does not exist")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise InvalidInputError(
            f"{path!r} is not a tensors-only checkpoint: {' '.join(str(exc).split())[:160]}",
            hint="tvtool never executes pickled code",
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InvalidInputError(f"{path!r} does not hold a flat mapping of names to tensors")
    return dict(obj)
