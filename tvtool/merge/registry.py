"""The merge-method registry: name -> :class:`~tvtool.merge.method.MergeMethod`."""

from __future__ import annotations

from tvtool.errors import UsageError
from tvtool.limits import short_repr
from tvtool.merge import (
    breadcrumbs,
    consensus,
    dare,
    iso_c,
    iso_cts,
    magnitude,
    mean,
    task_arithmetic,
    ties,
    tsv,
)
from tvtool.merge.method import MergeMethod

METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (task_arithmetic.METHOD, mean.METHOD, ties.METHOD, dare.METHOD,
                        magnitude.METHOD, tsv.METHOD, iso_c.METHOD, iso_cts.METHOD,
                        consensus.METHOD, breadcrumbs.METHOD)
}


def get_method(name: str) -> MergeMethod:
    """Return the registered method called ``name``.

    Raises:
        UsageError: for an unknown name (the message lists the known ones).

    """
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {short_repr(name, 60)}",
                         hint=f"choose one of {', '.join(METHODS)}") from None
