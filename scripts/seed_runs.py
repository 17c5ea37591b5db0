"""Runs of one results script that differ only in their seed: loading and mean ± s.e."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN where undefined: no value, or one)."""
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def load_seed_runs(paths: list[Path], recipe_keys: Sequence[str], needed: Sequence[str],
                   script: str, producer: str) -> list[dict[str, Any]]:
    """Read JSON runs, sorted by seed, and check that they differ only in the seed.

    Args:
        paths: the runs' files.
        recipe_keys: what must be equal across runs.
        needed: keys every run must hold (besides the recipe and the seed).
        script: the calling script's name, for its error messages.
        producer: what the files must be, e.g. ``a results_labelfree.py run``.

    Raises:
        SystemExit: an unreadable file, a file that is not ``producer``, runs of different
            recipes, or two runs of the same seed.
    """
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"{script}: cannot read {path}: {error}") from None
        if not isinstance(run, dict) or not all(
                key in run for key in (*recipe_keys, "seed", *needed)):
            raise SystemExit(f"{script}: {path} is not {producer}")
        runs.append(run)
    for path, run in zip(paths, runs, strict=True):
        differing = [key for key in recipe_keys if run[key] != runs[0][key]]
        if differing:
            raise SystemExit(f"{script}: {path} differs from {paths[0]} in "
                             f"{', '.join(differing)}, not only in the seed")
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"{script}: a seed appears twice ({sorted(seeds)})")
    return sorted(runs, key=lambda run: run["seed"])
