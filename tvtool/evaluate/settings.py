"""How a model is evaluated: the settings every evaluation shares, declared once.

``tvtool eval``, ``tvtool eval disentanglement`` and the coefficient searches of ``tvtool
merge`` and ``tvtool negate`` take the same evaluation flags (``--base``, ``--data-root``,
``--batch-size``, ``--device``, ``--precision``, ``--limit``, ``--seed``, ``--workers``,
``--allow-base-mismatch``, ``--no-head-cache``). :class:`EvalSettings` holds them; the
configurations of those commands (:class:`~tvtool.evaluate.EvalConfig`,
:class:`~tvtool.evaluate.DisentanglementConfig`) and the search evaluator
(:class:`tvtool.workflows.evaluator.Evaluator`) hold one instead of repeating the fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tvtool.device import check_precision
from tvtool.errors import UsageError


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation settings shared by every command that measures accuracy.

    Validated on construction: a positive batch size, a non-negative worker count and a known
    precision. The device (whether CUDA is there) is checked when it is resolved
    (:func:`tvtool.device.resolve_device`) and ``limit`` when a split is opened
    (:func:`tvtool.evaluate.open_eval_data`), the homes of those rules.

    Attributes:
        base: Model reference of the pre-trained base.
        data_root: Root of the standard datasets.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 autocast on a CUDA device that supports bf16, fp32
            elsewhere; see :mod:`tvtool.device`), ``fp32``, ``bf16``, ``fp16``.
        limit: Evaluate a seeded random subset of this many examples per split.
        seed: Seed of the splits and of the ``limit`` subsets.
        workers: DataLoader worker processes.
        allow_base_mismatch: Accept vectors (and head files) recorded against another base.
        cache_heads: Read and write zero-shot heads in the on-disk cache.

    Raises:
        UsageError: a non-positive batch size, a negative worker count, an unknown precision.
    """

    base: str
    data_root: str | None = None
    batch_size: int = 128
    device: str = "auto"
    precision: str = "auto"
    limit: int | None = None
    seed: int = 0
    workers: int = 0
    allow_base_mismatch: bool = False
    cache_heads: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {self.batch_size}")
        # A negative count would only fail inside the DataLoader, after the model is loaded.
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        check_precision(self.precision)

    def arguments(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping (field name -> value)."""
        return dataclasses.asdict(self)


def report_arguments(settings: EvalSettings, own: Mapping[str, Any],
                     order: Sequence[str]) -> dict[str, Any]:
    """A command's ``settings`` record: its shared settings plus its own fields, in ``order``.

    The reports keep the key order they had when every configuration declared the shared
    fields itself, so that ``--json`` output and provenance stay byte-identical.

    Args:
        settings: The shared settings.
        own: The command's own fields (tuples become lists).
        order: Every key, in report order.

    Returns:
        ``{key: value}``: the keys of ``order`` first, then any other key (a field added
        without a place in ``order`` still reaches the report).
    """
    merged = {**settings.arguments(),
              **{k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}}
    first = {key: merged[key] for key in order if key in merged}
    return {**first, **{k: v for k, v in merged.items() if k not in first}}
