"""Progress of a coefficient search: ``α k/N`` and the running best, around each evaluation.

The merge and negation searches evaluate one model per α, each over several datasets. The
search is one outer task of the progress factory (a bar that stays, or the first part of a
plain progress line); the per-dataset evaluations are inner tasks beneath it, so they no
longer look like a progress that restarts for every α.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tvtool.types import no_progress

Accuracies = Mapping[str, float]
Evaluate = Callable[[float], Accuracies]


@contextlib.contextmanager
def search_progress(progress: Any, description: str, count: int,
                    score: Callable[[Accuracies], float | None], *,
                    lower_is_better: bool = False,
                    what: str = "") -> Iterator[Callable[[Evaluate], Evaluate]]:
    """Report a search over ``count`` coefficients (more if an ``auto`` grid extends).

    Args:
        progress: A progress factory (None: nothing is shown).
        description: What is searched (``merge search (ties)``).
        count: Coefficients of the grid (the total grows when the search extends it).
        score: The score of one α's accuracies (None: the α does not count, e.g. infeasible).
        lower_is_better: Whether the best α has the lowest score (negation's target).
        what: What the score is, shown after it (``normalized``, ``target``).

    Yields:
        ``wrap(evaluate)``: the evaluation of one α, reporting ``α k/N`` before and the running
        best after it.
    """
    factory = progress if progress is not None else no_progress
    with factory(description, count) as advance:
        state: dict[str, Any] = {"k": 0, "best": None}

        def wrap(evaluate: Evaluate) -> Evaluate:
            def run(alpha: float) -> Accuracies:
                state["k"] += 1
                k = state["k"]
                advance(0, unit="α", current=k, total=max(count, k), **{"=": f"{alpha:g}"})
                accuracies = evaluate(alpha)
                value = score(accuracies)
                best = state["best"]
                if value is not None and math.isfinite(value) and (
                        best is None or (value < best[0] if lower_is_better
                                         else value > best[0])):
                    state["best"] = best = (value, alpha)
                shown = (f"α {best[1]:g} ({100 * best[0]:.1f}%{' ' + what if what else ''})"
                         if best is not None else "none yet")
                advance(1, best=shown)
                return accuracies

            return run

        yield wrap
