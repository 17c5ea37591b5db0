"""Progress on stderr: a rich bar on a terminal, plain rate-limited lines everywhere else.

In CI and batch queues (slurm) stderr is a file or a pipe: a bar would be invisible there, so
a :class:`Reporter` writes one plain line per :attr:`Reporter.every` seconds instead (30 s by
default, ``--log-every``), carrying position/total, the task's fields (loss, learning rate),
throughput and ETA. Nested tasks (a search's α, then a dataset's batches) share one line,
outermost first. ``--quiet`` silences both forms. Under ``torchrun`` only rank 0 reports.

A reporter is a :data:`tvtool.types.ProgressFactory`: ``reporter(description, total)`` is a
context manager yielding an ``advance(n, **fields)`` callable (a :class:`Task`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_EVERY_S = 30.0
"""Seconds between plain progress lines (``--log-every``)."""


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``12s``: a short duration for a progress line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_field(name: str, value: Any) -> str:
    """One ``name value`` pair of a progress line (``512 img/s`` for a rate)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            text = str(value)
        elif name == "lr":
            text = f"{value:.2e}"
        elif name.endswith("/s"):
            text = f"{value:.0f}" if value >= 10 else f"{value:.2f}"
        else:
            text = f"{value:.4g}"
    else:
        text = str(value)
    return f"{text} {name}" if name.endswith("/s") else f"{name} {text}"


class Task:
    """One unit of work being reported: ``task(n, **fields)`` advances it by ``n``.

    Attributes:
        description: What is being done (``fine-tuning``, ``MNIST (test)``).
        total: Units of work in all (None: unknown).
        unit: Name of a unit, shown before the position (``step 12/100``).
        completed: Units done.
        current: Position to show instead of ``completed`` (a search shows the α it is on).
        fields: Named values shown on the line (loss, lr, ...), in insertion order.
    """

    def __init__(self, reporter: Reporter, description: str, total: int | None,
                 unit: str = "") -> None:
        self.reporter = reporter
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0
        self.current: int | None = None
        self.fields: dict[str, Any] = {}
        self.started = reporter.clock()
        self.start_completed = 0
        self.reported = False
        self.dirty = False
        self.rich_id: Any = None

    def __call__(self, n: int = 1, /, **fields: Any) -> None:
        """Advance by ``n`` units and set ``fields``."""
        self.update(advance=n, **fields)

    def update(self, *, advance: int = 0, completed: int | None = None,
               total: int | None = None, current: int | None = None,
               description: str | None = None, unit: str | None = None,
               **fields: Any) -> None:
        """Move the task and set its fields; prints a line when one is due.

        Args:
            advance: Units just done.
            completed: Units done in all (instead of ``advance``).
            total: A new total.
            current: The position shown (None keeps showing ``completed``).
            description: A new description.
            unit: A new unit name (``α``: the line reads ``α 3/11``).
            **fields: Values shown on the line (a None value removes the field).
        """
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if total is not None:
            self.total = total
        if current is not None:
            self.current = current
        if description is not None:
            self.description = description
        if unit is not None:
            self.unit = unit
        for name, value in fields.items():
            if value is None:
                self.fields.pop(name, None)
            else:
                self.fields[name] = value
        self.reporter.changed(self)

    def resumed_at(self, completed: int) -> None:
        """Start counting throughput and ETA from ``completed`` (a resumed run)."""
        self.completed = self.start_completed = completed
        self.started = self.reporter.clock()

    def rate(self, now: float) -> float | None:
        """Units per second since the task started (None before a unit is done)."""
        done = self.completed - self.start_completed
        elapsed = now - self.started
        return done / elapsed if done > 0 and elapsed > 0 else None

    def text(self, now: float) -> str:
        """The task's part of a progress line."""
        parts = [self.description + ":"] if self.description else []
        shown = self.current if self.current is not None else self.completed
        position = f"{shown}/{self.total}" if self.total is not None else str(shown)
        if self.total and self.current is None:
            position += f" ({100 * min(self.completed, self.total) / self.total:.0f}%)"
        parts.append(f"{self.unit} {position}" if self.unit else position)
        parts += [format_field(k, v) for k, v in self.fields.items()]
        rate = self.rate(now)
        if rate is not None and not any(k.endswith("/s") for k in self.fields):
            parts.append(format_field(f"{self.unit or 'it'}/s", rate))
        parts.append(f"elapsed {duration(now - self.started)}")
        if rate is not None and self.total is not None:
            parts.append(f"ETA {duration(max(0, self.total - self.completed) / rate)}")
        return " ".join(parts)


class Reporter:
    """Reports progress on stderr: rich bars on a terminal, plain lines otherwise.

    Args:
        write: Where a plain line goes (stderr in the CLI); called with the line, no newline.
        terminal: Whether stderr is a terminal (then ``console`` draws rich bars).
        console: A rich console for the bars (needed when ``terminal``).
        quiet: Report nothing.
        every: Least seconds between two plain lines.
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, write: Callable[[str], None], *, terminal: bool = False,
                 console: Any = None, quiet: bool = False, every: float = DEFAULT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write = write
        self.terminal = terminal and console is not None
        self.console = console
        self.quiet = quiet or os.environ.get("RANK", "0") != "0"
        self.every = every
        self.clock = clock
        self.stack: list[Task] = []
        self.last_line = clock()
        self._rich: Any = None

    def __call__(self, description: str, total: int | None) -> Any:
        """A :data:`tvtool.types.ProgressFactory`: :meth:`task` without a unit."""
        return self.task(description, total)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, *, unit: str = "") -> Iterator[Task]:
        """Report one task while the body runs.

        Args:
            description: What is being done.
            total: Units of work (None: unknown).
            unit: Name of a unit (``step``, ``α``).

        Yields:
            The :class:`Task`; call it to advance.
        """
        task = Task(self, description, total, unit)
        if self.quiet:
            yield task
            return
        self.stack.append(task)
        if self.terminal:
            self._rich_add(task)
        try:
            yield task
        finally:
            self.stack.remove(task)
            if self.terminal:
                self._rich_remove(task)
            elif task.reported and task.dirty:
                # A task that printed lines says when it ends (at most one line per line).
                self._emit(self.clock(), finished=task)

    def changed(self, task: Task) -> None:
        """Called by a task that moved: redraw the bar, or print a line when one is due."""
        if self.quiet or task not in self.stack:
            return
        task.dirty = True
        if self.terminal:
            self._rich_update(task)
            return
        now = self.clock()
        if now - self.last_line >= self.every:
            self._emit(now)

    def _emit(self, now: float, finished: Task | None = None) -> None:
        tasks = [*self.stack, finished] if finished is not None else list(self.stack)
        if not tasks:
            return
        line = " · ".join(t.text(now) for t in tasks)
        if finished is not None:
            line += " (done)"
        for task in tasks:
            task.reported = True
            task.dirty = False
        self.last_line = now
        self.write(line)

    # Rich bars (terminal only).
    def _rich_add(self, task: Task) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self._rich is None:
            self._rich = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=24),
                MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True)
            self._rich.start()
        task.rich_id = self._rich.add_task(task.description, total=task.total,
                                           info=self._info(task))

    def _info(self, task: Task) -> str:
        return " ".join(format_field(k, v) for k, v in task.fields.items())

    def _rich_update(self, task: Task) -> None:
        if self._rich is None or task.rich_id is None:
            return
        description = task.description
        if task.current is not None:  # a search: the α it is on, the bar counts those done
            total = "?" if task.total is None else task.total
            description = f"{description} {task.unit} {task.current}/{total}".replace("  ", " ")
        self._rich.update(task.rich_id, completed=task.completed, total=task.total,
                          description=description, info=self._info(task))

    def _rich_remove(self, task: Task) -> None:
        if self._rich is None:
            return
        self._rich.remove_task(task.rich_id)
        if not self.stack:
            self._rich.stop()
            self._rich = None


def silent() -> Reporter:
    """A reporter that shows nothing (the library's default)."""
    return Reporter(lambda _line: None, quiet=True)
