"""Training metrics logs: JSON lines of step, loss, learning rate, held-out score, images/s.

``finetune`` and ``learn-coeffs`` write one next to their output (:func:`metrics_log_path`)
so that a curve can be plotted (``tvtool plot``); with ``--workdir`` a fine-tuning run also
keeps a live copy there, which a resumed run continues (records past the resumed step, which
the run does again, are dropped). ``--tensorboard DIR`` writes the same scalars through
``torch.utils.tensorboard`` (the optional ``tensorboard`` extra).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tvtool.errors import InvalidInputError, UsageError
from tvtool.limits import loads_json, short_repr

METRICS_FILE = "metrics.jsonl"
"""Name of the live metrics log in a fine-tuning ``--workdir``."""

MAX_METRICS_BYTES = 64 * 1024 * 1024
"""Largest metrics log read (a record is ~150 bytes: 400,000 records)."""

MAX_METRICS_LINE = 64 * 1024
"""Longest line of a metrics log."""

TENSORBOARD_HINT = "pip install 'tvtool[tensorboard]' (or pip install tensorboard)"


def metrics_log_path(output: str) -> str | None:
    """Where the metrics log of ``output`` goes: ``NAME.metrics.jsonl`` beside it.

    ``vectors/digits.tv.safetensors`` -> ``vectors/digits.tv.metrics.jsonl``; None for
    stdout (``-``).
    """
    if output == "-":
        return None
    path = Path(output).expanduser()
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") \
        else path.name
    return str(path.with_name(stem + ".metrics.jsonl"))


def _clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and Inf become None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def iter_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read a metrics log, bounded: ``(line number, record)`` for every non-empty line.

    Raises:
        InvalidInputError: a missing or unreadable file, one larger than
            :data:`MAX_METRICS_BYTES`, a line longer than :data:`MAX_METRICS_LINE`, or a
            line that is not a JSON object with an integer ``step`` (the line number is
            named).
    """
    try:
        handle = open(Path(path).expanduser(), "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InvalidInputError(f"metrics log {path!r} does not exist") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    with handle:
        try:
            size = os.fstat(handle.fileno()).st_size
        except OSError:
            size = 0
        if size > MAX_METRICS_BYTES:
            raise InvalidInputError(f"{path!r} is larger than "
                                    f"{MAX_METRICS_BYTES // (1024 * 1024)} MiB; a metrics log "
                                    "is a few MiB")
        read = 0
        number = 0
        while True:
            raw = handle.readline(MAX_METRICS_LINE + 1)
            if not raw:
                return
            number += 1
            read += len(raw)
            if read > MAX_METRICS_BYTES:
                raise InvalidInputError(f"{path!r} is larger than "
                                        f"{MAX_METRICS_BYTES // (1024 * 1024)} MiB")
            if len(raw) > MAX_METRICS_LINE:
                raise InvalidInputError(f"{path!r} line {number}: longer than "
                                        f"{MAX_METRICS_LINE // 1024} KiB")
            if not raw.strip():
                continue
            where = f"{path!r} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInputError(f"{where}: not UTF-8 text") from None
            record = loads_json(text, where)
            if not isinstance(record, dict):
                raise InvalidInputError(f"{where}: not a JSON object but "
                                        f"{short_repr(record, 40)}")
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise InvalidInputError(f"{where}: no integer \"step\"",
                                        hint="a metrics log line is {\"step\": N, "
                                             "\"loss\": ..., ...}")
            yield number, record


def read_records(path: str) -> list[dict[str, Any]]:
    """All records of a metrics log (see :func:`iter_records`)."""
    return [record for _, record in iter_records(path)]


def tensorboard_writer(directory: str) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``directory``.

    Raises:
        UsageError: tensorboard is not installed (the optional extra).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the optional tensorboard extra, which is not "
                         "installed", hint=TENSORBOARD_HINT) from None
    return SummaryWriter(log_dir=directory)


def check_tensorboard() -> None:
    """Refuse ``--tensorboard`` before any work when tensorboard is not installed.

    Raises:
        UsageError: the optional extra is missing.
    """
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the optional tensorboard extra, which is not "
                         "installed", hint=TENSORBOARD_HINT) from None


class MetricsLog:
    """The records of one run, kept in memory and optionally in a live file and TensorBoard.

    Args:
        live: A JSON-lines file appended to as records arrive (a fine-tuning workdir's
            :data:`METRICS_FILE`), continued by a resumed run; None keeps records in memory.
        tensorboard: A directory for TensorBoard event files (None: none).
        prefix: Tag prefix of the TensorBoard scalars (``train/loss``).
    """

    def __init__(self, live: str | None = None, tensorboard: str | None = None,
                 prefix: str = "train") -> None:
        self.live = live
        self.records: list[dict[str, Any]] = []
        self.prefix = prefix
        self._writer = tensorboard_writer(tensorboard) if tensorboard else None

    def start(self, step: int) -> None:
        """The run starts (or resumes) after ``step``: keep the live file's earlier records.

        Records past ``step`` were written by an interrupted run after its last saved state;
        the resumed run does those steps again, so they are dropped (no duplicate steps).
        """
        kept: list[dict[str, Any]] = []
        if self.live is not None and step > 0 and os.path.exists(self.live):
            try:
                kept = [r for r in read_records(self.live) if r["step"] <= step]
            except InvalidInputError:
                kept = []  # a damaged live log is started afresh; training is unaffected
        self.records = kept
        if self.live is not None:
            self._rewrite()

    def _rewrite(self) -> None:
        assert self.live is not None
        tmp = self.live + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in self.records:
                handle.write(json.dumps(record, sort_keys=False) + "\n")
        os.replace(tmp, self.live)

    def add(self, record: Mapping[str, Any]) -> None:
        """Append one record (``step`` first); NaN becomes null."""
        clean = {key: _clean(value) for key, value in record.items()}
        self.records.append(clean)
        if self.live is not None:
            with open(self.live, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(clean, sort_keys=False) + "\n")
        if self._writer is not None:
            step = int(clean["step"])
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and \
                        not isinstance(value, bool):
                    self._writer.add_scalar(f"{self.prefix}/{key}", value, step)
            self._writer.flush()

    def text(self) -> str:
        """The log as JSON lines."""
        return "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.records)

    def write(self, path: str, inputs: tuple[str, ...] = ()) -> None:
        """Write all records to ``path`` atomically."""
        from tvtool.io import write_bytes

        write_bytes(path, self.text().encode("utf-8"), inputs=inputs)

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["METRICS_FILE", "MetricsLog", "check_tensorboard",
           "iter_records", "metrics_log_path", "read_records", "tensorboard_writer"]
