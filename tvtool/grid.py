"""The coefficient-grid syntax shared by every search and map (one meaning of ``A:B:C``).

``START:STOP:STEP`` is ``START, START+STEP, ...`` up to and including ``STOP`` (as
``merge --coef-grid 0:1:0.05``); ``a,b,c`` lists the values. Used by ``merge --search-coef``,
``negate --search`` and ``eval disentanglement --grid``.
"""

from __future__ import annotations

import math

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
