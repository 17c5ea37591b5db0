"""Reading YAML documents (merge configs and other human-written files).

Only ``yaml.safe_load`` is used: a YAML file can never construct Python objects or run code.
Writing uses ``yaml.safe_dump`` through the same atomic writer as every other output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import STDIO
from tvtool.io.safetensors_io import write_bytes


def read_yaml(path: str) -> Any:
    """Read a YAML (or JSON, which is a subset of YAML) document from a file or ``-``.

    Args:
        path: File path, or ``-`` for stdin.

    Returns:
        The parsed document (plain dicts, lists, strings, numbers, booleans, None).

    Raises:
        InvalidInputError: if the file is missing, unreadable or not valid YAML.

    """
    try:
        if path == STDIO:
            text = sys.stdin.read()
        else:
            text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"input file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read {path!r}: {' '.join(str(exc).split())[:200]}"
                                ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise InvalidInputError(f"{path!r} is not valid YAML: {problem}{where}") from None


def write_yaml(output: str, document: Any, *, inputs: tuple[str, ...] = ()) -> None:
    """Write a document as YAML atomically (``-`` means stdout).

    Args:
        output: Destination path or ``-``.
        document: Plain data (dicts, lists, scalars).
        inputs: Paths the command read; an output equal to one of them is refused.

    """
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    write_bytes(output, text.encode("utf-8"), inputs=inputs)
