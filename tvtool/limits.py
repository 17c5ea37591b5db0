"""Resource bounds for untrusted input, and bounded text for error messages.

Every document tvtool parses from a file (YAML configs, JSON metadata in safetensors headers,
training-state headers) may come from someone else. These helpers keep parsing and reporting
bounded: nesting deeper than :data:`MAX_NESTING` is refused before anything recurses over
it, and values quoted in error messages are cut to a few dozen characters (the repr is
computed with :mod:`reprlib` limits, so even a huge value costs little to describe).
docs/cli.md, section "Untrusted input", lists the bounds.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

from tvtool.errors import InvalidInputError

MAX_NESTING = 64
"""Deepest nesting of lists/mappings accepted in a parsed document (configs need ~4)."""

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
"""Largest JSON document read from a file, stdin or a file header (reports are ~50 KiB).

Python's json module parses 4 MiB in well under a second; the objects it builds take at
most ~200 MB (a document of nested empty lists, the worst case measured)."""

MAX_YAML_BYTES = 128 * 1024
"""Largest YAML document (merge configs and coefficient files are a few KiB).

YAML costs far more per byte than JSON: the worst document measured (nested empty flow
lists) takes ~4 s of CPU with PyYAML's pure-Python loader at this size, ~1 s with libyaml's."""

MAX_INT_DIGITS = 4300
"""Longest integer (in characters) a YAML document may hold: Python's own limit for decimal
strings, applied also to YAML 1.1's base-60 integers, which it does not cover."""

MAX_TEXT_LIST_BYTES = 1024 * 1024
"""Largest ``classnames.txt`` / ``templates.txt`` beside an image folder."""

MAX_TEMPLATES = 1000
"""Most prompt templates one dataset may have (OpenAI's ImageNet ensemble has 80): the
zero-shot head costs classes × templates passes of the text encoder."""

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Most pixels one image may have (8192 × 8192). Decoding costs 4-7 bytes per pixel (RGB
kept 4 bytes wide by PIL; 16-bit greyscale narrowed in slices), so at most ~0.5 GB per image
per data-loader worker; PIL's own bound is 89 million pixels, with a warning only."""

MAX_DATA_PICKLE_BYTES = 256 * 1024 * 1024
"""Largest pickled dataset file (a CIFAR batch) read; CIFAR-100's ``train``, the largest,
is 155 MB."""

MAX_DATA_PICKLE_OPS = 1_000_000
"""Most pickle operations in one pickled dataset file. Each builds at most one object, so
this bounds the memory of everything but the bytes and strings, which are in the file;
CIFAR-100's ``train`` has about 250,000."""

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 40


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` of ``value`` for an error message (at most ``limit`` characters).

    Args:
        value: Anything, possibly huge or deeply nested.
        limit: Longest result.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ must not turn a clean error into a crash
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cut_text(text: str, limit: int = 80) -> str:
    """``text`` itself if at most ``limit`` characters, else its start and end joined by ``…``.

    Only the kept part is ever copied, so cutting a huge value costs little.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit - 25]}…{text[-20:]}"


def short_name(text: str, limit: int = 80) -> str:
    """``repr`` of a name (tensor, file, module) cut to about ``limit`` characters.

    Unlike :func:`short_repr`, names up to ``limit`` stay whole; a longer one keeps its start
    and its end (where a path names its file), see :func:`cut_text`.
    """
    return repr(cut_text(text, limit))


def short_list(values: Any, count: int = 3, each: int = 80) -> str:
    """The first ``count`` names of ``values`` as a bounded list, e.g. ``['a', 'b', 'c']``.

    Args:
        values: Names (strings; anything else is shown with :func:`short_repr`).
        count: How many to show.
        each: Longest shown name (see :func:`short_name`).
    """
    shown = [short_name(v, each) if isinstance(v, str) else short_repr(v, each)
             for v in list(values[:count])]
    return "[" + ", ".join(shown) + "]"


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """Depth of nested lists/tuples/dicts in ``value``, counted without recursion.

    Counting stops as soon as ``limit`` is exceeded, so the cost is bounded by the size of
    the part of the document within the limit.

    Returns:
        The depth (0 for a scalar), or ``limit + 1`` when it exceeds ``limit``.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return limit + 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def check_nesting(value: Any, what: str, limit: int = MAX_NESTING) -> Any:
    """Refuse a parsed document nested deeper than ``limit``; return it unchanged otherwise.

    Raises:
        InvalidInputError: the document is nested too deeply.
    """
    if nesting_depth(value, limit) > limit:
        raise InvalidInputError(f"{what} is nested more than {limit} levels deep",
                                hint="this is not a document tvtool writes; was it tampered "
                                     "with?")
    return value


def loads_json(text: str | bytes, what: str, limit: int = MAX_NESTING) -> Any:
    """Parse JSON from an untrusted source, with nesting and number limits.

    Args:
        text: The JSON text.
        what: How to name the document in errors (e.g. ``"'v.safetensors': tvtool.provenance"``).
        limit: Deepest nesting accepted.

    Raises:
        InvalidInputError: malformed JSON, larger than :data:`MAX_DOCUMENT_BYTES`, nesting too
            deep, or an integer too long to parse.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InvalidInputError(f"{what} is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} "
                                "MiB; tvtool reads only small JSON documents")
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidInputError(f"{what} is nested more than {limit} levels deep") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}"
                                ) from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise InvalidInputError(f"{what} is not valid JSON: "
                                f"{' '.join(str(exc).split())[:120]}") from None
    return check_nesting(value, what, limit)
