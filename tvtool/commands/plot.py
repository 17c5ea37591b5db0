"""``tvtool plot``: draw the curves of a metrics log (``finetune``, ``learn-coeffs``).

One panel per numeric metric (loss, learning rate, held-out score, accuracy, images/s),
against the step. The log is read with bounds (:func:`tvtool.metrics.iter_records`): a
malformed line is refused with its line number. Drawn with matplotlib's Agg canvas (no
display needed) and written atomically (:func:`tvtool.io.write_bytes`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import check_output, write_bytes
from tvtool.metrics import iter_records

_LABELS = {"loss": "training loss", "lr": "learning rate", "score": "held-out score",
           "train_accuracy": "training accuracy", "images_per_s": "images/s"}
"""Axis labels of the metrics tvtool writes; other keys are shown by name."""

MAX_PANELS = 8
"""Most metrics drawn (one panel each)."""


@dataclass(frozen=True)
class PlotConfig:
    """What ``tvtool plot`` draws.

    Attributes:
        metrics: The metrics log (JSON lines with a ``step``).
        output: The PNG to write, or ``-`` for stdout.
        keys: Metrics to draw (empty: every numeric one, up to :data:`MAX_PANELS`).
        title: Figure title (default: the log's file name).
        log_y: Draw the loss on a log scale.
    """

    metrics: str
    output: str
    keys: tuple[str, ...] = ()
    title: str | None = None
    log_y: bool = False


@dataclass(frozen=True)
class PlotResult:
    """What was drawn (the ``--json`` document)."""

    output: str
    metrics: str
    records: int
    steps: list[int]
    series: list[str]
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"output": self.output, "metrics": self.metrics, "records": self.records,
                "steps": self.steps, "series": self.series, "notes": self.notes}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def collect_series(path: str) -> tuple[int, dict[str, list[tuple[int, float]]]]:
    """The ``(step, value)`` points of every numeric metric of a log, in file order.

    Returns:
        The number of records and the series by metric name.

    Raises:
        InvalidInputError: an unreadable or malformed log, or one with no record.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    count = 0
    for _line, record in iter_records(path):
        count += 1
        step = int(record["step"])
        for key, value in record.items():
            number = _number(value)
            if key != "step" and number is not None:
                series.setdefault(key, []).append((step, number))
    if count == 0:
        raise InvalidInputError(f"metrics log {path!r} has no records")
    return count, series


def plot(config: PlotConfig) -> PlotResult:
    """Draw the curves of ``config.metrics`` into ``config.output`` (PNG).

    Raises:
        UsageError: a requested metric that the log does not have.
        InvalidInputError: an unreadable, malformed or empty log; a bad output path.
    """
    check_output(config.output, [config.metrics])
    count, series = collect_series(config.metrics)
    notes: list[str] = []
    if config.keys:
        missing = [k for k in config.keys if k not in series]
        if missing:
            raise UsageError(f"the metrics log has no {', '.join(missing)}",
                             hint=f"it has {', '.join(series) or 'no numeric metric'}")
        names = list(dict.fromkeys(config.keys))
    else:
        names = list(series)
    if not names:
        raise InvalidInputError(f"metrics log {config.metrics!r} has no numeric metric "
                                "besides step")
    if len(names) > MAX_PANELS:
        notes.append(f"drawing the first {MAX_PANELS} of {len(names)} metrics (--metric "
                     "chooses)")
        names = names[:MAX_PANELS]
    png = _draw(series, names, config)
    write_bytes(config.output, png, inputs=[config.metrics])
    steps = sorted({step for name in names for step, _ in series[name]})
    return PlotResult(output=config.output, metrics=config.metrics, records=count,
                      steps=[steps[0], steps[-1]] if steps else [], series=names, notes=notes)


def _draw(series: dict[str, list[tuple[int, float]]], names: list[str],
          config: PlotConfig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.2 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        points = series[name]
        axes.plot([s for s, _ in points], [v for _, v in points], marker="." if
                  len(points) < 50 else None, linewidth=1.2)
        axes.set_xlabel("step")
        axes.set_ylabel(_LABELS.get(name, name))
        if name == "loss" and config.log_y and all(v > 0 for _, v in points):
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
    title = config.title if config.title is not None else config.metrics.rsplit("/", 1)[-1]
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
