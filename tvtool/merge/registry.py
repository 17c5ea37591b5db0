"""The merge-method registry: name -> :class:`~tvtool.merge.method.MergeMethod`."""

from __future__ import annotations

from tvtool.errors import UsageError
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
)
from tvtool.merge.method import MergeMethod

METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (task_arithmetic.METHOD, mean.METHOD, ties.METHOD, dare.METHOD,
                        magnitude.METHOD, iso_c.METHOD, iso_cts.METHOD, consensus.METHOD,
                        breadcrumbs.METHOD)
}


def get_method(name: str) -> MergeMethod:
    """Return the registered method called ``name``.

    Raises:
        UsageError: for an unknown name (the message lists the known ones).

    """
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}",
                         hint=f"choose one of {', '.join(METHODS)}") from None
