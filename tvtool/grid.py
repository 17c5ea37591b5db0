"""The coefficient-grid syntax shared by every search and map (one meaning of ``A:B:C``).

``START:STOP:STEP`` is ``START, START+STEP, ...`` up to and including ``STOP`` (as
``merge --coef-grid 0:1:0.05``); ``a,b,c`` lists the values. Used by ``merge --search-coef``,
``negate --search`` and ``eval disentanglement --grid``.

The searches share what happens at a grid's ends: :func:`grid_edge` says whether the chosen
coefficient sits at one (reports mark it ``at_grid_edge``), and :class:`AutoGrid` with
:func:`extend_search` is ``--coef-grid auto``: the grid grows past that end by its own width, at
most :data:`MAX_EXTENSIONS` times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tvtool.errors import UsageError

MAX_POINTS = 10_000


def parse_grid(text: str, *, min_points: int = 1, max_points: int = MAX_POINTS,
               distinct: bool = False) -> tuple[float, ...]:
    """Parse a coefficient grid: ``START:STOP:STEP`` (both ends included) or ``a,b,c``.

    Args:
        text: The grid.
        min_points: Fewest values accepted.
        max_points: Most values accepted.
        distinct: Refuse a list that repeats a value.

    Raises:
        UsageError: malformed text, a non-positive step, STOP < START, a grid that is not
            finite or has too few or too many values.
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not all(math.isfinite(p) for p in parts):
                raise UsageError(f"coefficient grid {text!r} is not finite")
            if step <= 0 or stop < start:
                raise UsageError(f"malformed grid {text!r}: need STEP > 0 and STOP >= START",
                                 hint="A:B:C means START:STOP:STEP, e.g. -3:3:0.5")
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > max_points:
                raise UsageError(f"coefficient grid {text!r} has {count} points "
                                 f"(max {max_points})")
            # Round so that 0.05 * 3 prints (and is stored) as 0.15, not 0.15000000000000002.
            values = [round(start + i * step, 10) + 0.0 for i in range(count)]
        else:
            values = [float(p) + 0.0 for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"cannot parse coefficient grid {text!r}",
                         hint="use START:STOP:STEP (e.g. 0:1:0.05) or a,b,c") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"coefficient grid {text!r} is empty or not finite")
    if not min_points <= len(values) <= max_points:
        raise UsageError(f"coefficient grid {text!r} has {len(values)} values; use "
                         f"{min_points} to {max_points}",
                         hint="A:B:C means START:STOP:STEP (e.g. -3:3:0.5 for 13 values)")
    if distinct and len(set(values)) != len(values):
        raise UsageError(f"coefficient grid {text!r} repeats a value")
    return tuple(values)


# ---------------------------------------------------------------- searches over a grid

AUTO = "auto"
"""``--coef-grid auto``: the default grid, extended past an end where the optimum sits."""

MAX_EXTENSIONS = 3
"""Most times an :class:`AutoGrid` search extends its grid (by the grid's own width each time)."""

T = TypeVar("T")


def grid_edge(best: float | None, grid: Sequence[float]) -> str | None:
    """Which end of ``grid`` the chosen coefficient sits at.

    Returns:
        ``"low"`` (the smallest value), ``"high"`` (the largest) or None: interior, no
        coefficient chosen, or a grid of fewer than two values (nothing was searched).
    """
    values = set(grid)
    if best is None or len(values) < 2:
        return None
    if best == min(values):
        return "low"
    return "high" if best == max(values) else None


@dataclass(frozen=True)
class AutoGrid:
    """A grid that a search extends past the end where its optimum sits (``--coef-grid auto``).

    Each extension adds, beyond that end, as many points as the start grid spans steps, spaced
    like the start grid at that end: the grid grows by its own width. A search stops when the
    optimum is interior, after :attr:`max_extensions` extensions, or when the end cannot move
    (a ``floor``).

    Attributes:
        start: The grid searched first (at least two distinct values).
        floor: No extension goes below this value (None: unbounded).
        strict_floor: Extensions stay strictly above ``floor`` (coefficients that must be
            positive).
        max_extensions: Most extensions, both ends together.
    """

    start: tuple[float, ...]
    floor: float | None = None
    strict_floor: bool = False
    max_extensions: int = MAX_EXTENSIONS

    def __post_init__(self) -> None:
        if len(set(self.start)) < 2:
            raise UsageError("--coef-grid auto needs a start grid of at least two values")
        if self.max_extensions < 0:
            raise UsageError("max_extensions must be >= 0")

    def extension(self, values: Sequence[float], side: str) -> tuple[float, ...]:
        """The points one extension adds beyond ``side`` (``low``/``high``) of ``values``.

        Returns:
            The new values, nearest first; empty when the floor leaves no room.
        """
        start = sorted(set(self.start))
        steps = len(start) - 1
        step = start[1] - start[0] if side == "low" else start[-1] - start[-2]
        edge = min(values) if side == "low" else max(values)
        sign = -1.0 if side == "low" else 1.0
        added = []
        for k in range(1, steps + 1):
            value = round(edge + sign * k * step, 10) + 0.0
            if self.floor is not None and side == "low" and (
                    value < self.floor or (self.strict_floor and value <= self.floor)):
                break
            added.append(value)
        return tuple(added)


def extend_search(grid: Sequence[float] | AutoGrid, search: Callable[[tuple[float, ...]], T],
                  best_of: Callable[[T], float | None]) -> tuple[T, int]:
    """Run ``search`` on a fixed grid, or on an :class:`AutoGrid` until its optimum is interior.

    ``search(values)`` is called again on the grown grid after each extension; the caller
    memoizes its evaluations, so each coefficient is evaluated once.

    Args:
        grid: Fixed values (searched once, in the given order) or an :class:`AutoGrid`
            (searched in increasing order).
        search: Runs the search over a grid.
        best_of: The coefficient a search result chose (None: none).

    Returns:
        The last result and the number of extensions made.
    """
    if not isinstance(grid, AutoGrid):
        return search(tuple(grid)), 0
    values = tuple(sorted(set(grid.start)))
    result = search(values)
    extensions = 0
    while extensions < grid.max_extensions:
        side = grid_edge(best_of(result), values)
        if side is None:
            break
        added = grid.extension(values, side)
        if not added:
            break
        values = tuple(sorted({*values, *added}))
        result = search(values)
        extensions += 1
    return result, extensions


def edge_warning(what: str, best: float, edge: str, values: Sequence[float], *,
                 extensions: int = 0, auto: AutoGrid | None = None) -> str:
    """The stderr line that says a searched coefficient sits at an end of its grid.

    Args:
        what: The coefficient's name in the message (``α``).
        best: The chosen coefficient.
        edge: ``low`` or ``high`` (:func:`grid_edge`).
        values: The grid searched (after any extension).
        extensions: Extensions made (``--coef-grid auto``).
        auto: The :class:`AutoGrid` searched, if any.
    """
    end = "lowest" if edge == "low" else "highest"
    text = (f"warning: the chosen {what} = {best:g} is the {end} value of the searched grid "
            f"({min(values):g} to {max(values):g}, {len(set(values))} values)")
    if auto is not None and not auto.extension(values, edge):
        return text + f"; the grid cannot extend below {auto.floor:g}"
    if auto is not None:
        return text + (f" after {extensions} extension(s), the most --coef-grid auto makes: "
                       "the optimum may lie beyond it")
    return text + ": the optimum may lie beyond it; widen --coef-grid or use --coef-grid auto"
