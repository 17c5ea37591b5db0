"""Reading YAML documents (merge configs and other human-written files).

Only the safe loader is used: a YAML file can never construct Python objects or run code.
Documents are bounded too (see :mod:`tvtool.limits`): at most
:data:`~tvtool.limits.MAX_DOCUMENT_BYTES`, nested at most :data:`~tvtool.limits.MAX_NESTING`
levels, and aliases (``*name``) are refused, so a "billion laughs" file of a few hundred bytes
cannot expand into gigabytes. Writing uses ``yaml.safe_dump`` through the same atomic writer
as every other output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import STDIO
from tvtool.io.documents import write_bytes
from tvtool.limits import MAX_DOCUMENT_BYTES, MAX_NESTING


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and nesting deeper than MAX_NESTING."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            # An alias repeats a node by reference; nested aliases expand exponentially
            # ("billion laughs"). Configs never need them.
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported; write the value out",
                self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_NESTING} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_text(path: str) -> str:
    limit = MAX_DOCUMENT_BYTES
    if path == STDIO:
        text = sys.stdin.read(limit + 1)
    else:
        with open(Path(path).expanduser(), encoding="utf-8") as handle:
            text = handle.read(limit + 1)
    if len(text) > limit:
        raise InvalidInputError(f"{path!r} is larger than {limit // (1024 * 1024)} MiB; "
                                "tvtool reads only small YAML/JSON documents")
    return text


def parse_yaml(text: str, label: str) -> Any:
    """Parse a bounded YAML (or JSON) document.

    Args:
        text: The document.
        label: How to name it in errors.

    Raises:
        InvalidInputError: invalid YAML, an alias, nesting deeper than MAX_NESTING, or a
            scalar Python cannot represent (e.g. an integer over 4300 digits).
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InvalidInputError(f"{label} is not valid YAML: {problem}{where}") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise InvalidInputError(f"{label} is not valid YAML: {text}") from None


def read_yaml(path: str) -> Any:
    """Read a YAML (or JSON, which is a subset of YAML) document from a file or ``-``.

    Args:
        path: File path, or ``-`` for stdin.

    Returns:
        The parsed document (plain dicts, lists, strings, numbers, booleans, None).

    Raises:
        InvalidInputError: if the file is missing, unreadable, not valid YAML, or outside
            the bounds above.

    """
    try:
        text = _read_text(path)
    except FileNotFoundError:
        raise InvalidInputError(f"input file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read {path!r}: {' '.join(str(exc).split())[:200]}"
                                ) from exc
    return parse_yaml(text, repr(path))


def write_yaml(output: str, document: Any, *, inputs: tuple[str, ...] = ()) -> None:
    """Write a document as YAML atomically (``-`` means stdout).

    Args:
        output: Destination path or ``-``.
        document: Plain data (dicts, lists, scalars).
        inputs: Paths the command read; an output equal to one of them is refused.

    """
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    write_bytes(output, text.encode("utf-8"), inputs=inputs)
