"""The one rule for wrapper prefixes on tensor names written by other tools.

DistributedDataParallel saves ``module.``-prefixed names, wrapper modules (the published
``ImageEncoder``, Lightning modules) ``model.``; nested wrappers stack them. A prefix counts
only when *every* name carries it (and something is left after it).
"""

from __future__ import annotations

from collections.abc import Sequence

WRAPPER_PREFIXES = ("module.", "model.")


def shared_wrapper_prefixes(names: Sequence[str]) -> list[str]:
    """The wrapper prefixes every name shares, shortest first (``module.``, ``module.model.``).

    Each entry extends the previous one by one of :data:`WRAPPER_PREFIXES`; empty when the
    names share none (or there are no names).
    """
    found: list[str] = []
    removed = ""
    current = list(names)
    changed = True
    while changed and current:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(n.startswith(prefix) and len(n) > len(prefix) for n in current):
                current = [n[len(prefix):] for n in current]
                removed += prefix
                found.append(removed)
                changed = True
    return found


def strip_wrapper_prefixes(names: Sequence[str]) -> tuple[dict[str, str], str]:
    """Remove every wrapper prefix that all names share.

    Returns:
        The mapping stored name -> normalised name, and the removed prefix (``""`` if none).
    """
    shared = shared_wrapper_prefixes(names)
    prefix = shared[-1] if shared else ""
    return {name: name[len(prefix):] for name in names}, prefix
