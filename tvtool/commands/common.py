"""What the file-level commands share: input checks and provenance.

Their result record, :class:`tvtool.types.WriteResult`, is shared with ``merge``.

One module per command (:mod:`~tvtool.commands.extract`, :mod:`~tvtool.commands.negate`,
:mod:`~tvtool.commands.apply`, :mod:`~tvtool.commands.inspect`,
:mod:`~tvtool.commands.convert`); each takes one frozen config and returns a small result
record, checks its output path before reading anything, and streams tensor by tensor through
:mod:`tvtool.vectors` plans.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

from tvtool.errors import UsageError
from tvtool.io import STDIO, TensorSource
from tvtool.models.refs import ModelRef


@contextlib.contextmanager
def opened(sources: list[TensorSource]) -> Iterator[list[TensorSource]]:
    """Close every source in ``sources`` on exit, including those appended inside the block."""
    try:
        yield sources
    finally:
        for source in sources:
            source.close()


def check_stdin_once(paths: Sequence[str]) -> None:
    """Refuse stdin (``-``) given as more than one input.

    Raises:
        UsageError: ``-`` appears twice or more.
    """
    if list(paths).count(STDIO) > 1:
        raise UsageError("stdin ('-') can be given only once")


def config_args(config: Any) -> dict[str, Any]:
    """A command's config as the plain values its provenance records (enums by value)."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}


def file_inputs(ref: ModelRef) -> list[str]:
    """The file a model reference reads, if it is a file (an output must not overwrite it)."""
    return [ref.location] if ref.is_file and ref.location else []


def dumps_sorted(value: Any) -> str:
    """JSON with sorted keys, as stored in metadata."""
    return json.dumps(value, sort_keys=True)
