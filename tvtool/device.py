"""The device and precision policy: one rule for every command (train, evaluate, learn, search).

* ``--device``: ``auto`` is ``cuda`` when a CUDA device is available, else ``cpu``; ``cpu``,
  ``cuda`` and ``cuda:N`` are taken as given (CUDA without a device is a usage error). Under
  torchrun (``local_rank`` given) CUDA means the local rank's GPU.
* ``--precision``: ``auto`` is bf16 autocast on CUDA devices that support bf16 and fp32
  everywhere else; ``fp32`` runs without autocast; ``bf16`` and ``fp16`` autocast the forward
  pass on whatever device was chosen.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from tvtool.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Every accepted ``--precision`` value."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validate the rest.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: Under torchrun with more than one process: the GPU of this process.

    Raises:
        UsageError: unknown device, or CUDA asked for without one.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA device is available",
                             hint="use --device cpu or auto")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
        try:
            return torch.device(name)
        except RuntimeError:
            raise UsageError(f"unknown device {name!r}") from None
    raise UsageError(f"unknown device {name!r}", hint="use auto, cpu, cuda or cuda:N")


def check_precision(name: str, choices: tuple[str, ...] = PRECISIONS) -> None:
    """Validate a precision name early (before any work).

    Raises:
        UsageError: unknown precision.
    """
    if name not in choices:
        raise UsageError(f"unknown precision {name!r}", hint=f"use {_listing(choices)}")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``fp32``; others unchanged.

    Raises:
        UsageError: unknown precision.
    """
    check_precision(name)
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` on ``device`` (``auto`` resolved first).

    Raises:
        UsageError: unknown precision.
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def _listing(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
