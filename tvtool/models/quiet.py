"""Silencing open_clip's root-logger warnings while tvtool builds models it fills itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_open_clip(level: int = logging.ERROR) -> Iterator[None]:
    """Raise the root logger to ``level`` (default ERROR) for the block.

    open_clip logs a root-level warning for every model built without pretrained weights,
    which tvtool does whenever it loads its own weights or builds a skeleton on the meta device.
    Loading a pretrained tag raises it to CRITICAL: open_clip logs a failed download as an
    error before raising it, and tvtool reports that failure itself, on one line.
    """
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)
