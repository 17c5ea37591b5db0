"""The demo's histogram check: the collapse guard's view of a ``learn-coeffs`` run.

Pure functions of ``learn-coeffs``' JSON result (``--json``'s ``candidates``), for the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tvtool.atlas.objectives import TaskScore, collapse_reasons
from tvtool.atlas.protocols import PROTOCOL_SPECS

HISTOGRAM_FIELDS = ("class_entropy", "prior_entropy", "class_entropy_ratio", "top_share")


def histogram_check(result: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """The collapse guard's view of every candidate of a ``learn-coeffs`` run.

    Per candidate (``learn-coeffs --json``'s ``candidates``): its step, whether it was kept,
    per dataset the entropy of its histogram of predicted classes against the class prior's
    (ratio, and the share of the most predicted class), and why the guard rejects it. Where
    the protocol's selection does not apply the guard (``atlas`` selects on the labelled val
    split, ``adamerging`` keeps the last iterate), the reasons are the guard's verdict all the
    same (:func:`tvtool.atlas.objectives.collapse_reasons`, against the zero-shot model's
    histogram), so the report shows whether the kept model collapsed.

    Args:
        result: ``learn-coeffs``' JSON result.
        tasks: The datasets, in the order of each candidate's statistics.

    Returns:
        ``{"selection", "guard_applied", "kept_step", "tasks", "candidates": [{step, kept,
        rejected, datasets}]}`` (``selection``: the protocol's rule, ``held-out``,
        ``val-split`` or ``last``).
    """
    rule = PROTOCOL_SPECS[result["protocol"]].selection
    applied = rule == "held-out"
    zero = [_task_score(s) for s in result.get("zero_shot") or []]
    kept_step = result["best_step"]
    rows = []
    for record in result["candidates"]:
        stats = record.get("datasets") or []
        if not stats:
            continue
        if applied:
            rejected = list(record.get("rejected") or [])
        else:
            scores = [_task_score(s) for s in stats]
            rejected = collapse_reasons(scores, zero if len(zero) == len(scores) else None,
                                        [s["dataset"] for s in stats])
        rows.append({
            "step": record["step"], "note": record.get("note"),
            "candidate": record.get("candidate", True),
            "kept": record["step"] == kept_step and record.get("candidate", True),
            "rejected": rejected,
            "datasets": {s["dataset"]: {k: s.get(k) for k in HISTOGRAM_FIELDS}
                         for s in stats}})
    return {"selection": rule, "guard_applied": applied, "kept_step": kept_step,
            "tasks": list(tasks),
            "candidates": rows}


def _task_score(record: dict[str, Any]) -> Any:
    """A :class:`~tvtool.atlas.objectives.TaskScore` back from its JSON record."""
    values: dict[str, Any] = {f.name: record.get(f.name) for f in dataclasses.fields(TaskScore)}
    for name in ("entropy", "marginal_entropy", "class_entropy", "prior_entropy", "top_share"):
        if values[name] is None:
            values[name] = math.nan
    return TaskScore(**values)
