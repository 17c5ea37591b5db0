"""Reading YAML documents (merge configs and other human-written files).

Only the safe loader is used: a YAML file can never construct Python objects or run code.
libyaml's C parser (PyYAML's ``CSafeLoader``) does the parsing where PyYAML was built with it,
about five times faster than the pure-Python one; both build the same nodes, which are checked
before any Python object is constructed. Documents are bounded (see :mod:`tvtool.limits`): at
most :data:`~tvtool.limits.MAX_YAML_BYTES` (what the pure-Python loader parses in a few
seconds, whatever the content), nested at most :data:`~tvtool.limits.MAX_NESTING` levels,
aliases (``*name``) refused, so a "billion laughs" file of a few hundred bytes cannot expand
into gigabytes, and integers at most :data:`~tvtool.limits.MAX_INT_DIGITS` characters long (a
YAML 1.1 base-60 integer ``1:2:3:...`` costs quadratic time to build). Writing uses
``yaml.safe_dump`` through the same atomic writer as every other output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import STDIO
from tvtool.io.documents import write_bytes
from tvtool.limits import MAX_INT_DIGITS, MAX_NESTING, MAX_YAML_BYTES

_ALIAS = "YAML aliases (*name) are not supported; write the value out"


def _construct_int(loader: Any, node: Any) -> Any:
    """SafeConstructor's integers, refused past :data:`MAX_INT_DIGITS` characters.

    Python refuses decimal integers of more than 4,300 digits itself; a base-60 integer
    (``1:2:3...``) is built by repeated multiplication instead, quadratic in its length.
    """
    if len(node.value) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(node.value):,} characters (at most "
            f"{MAX_INT_DIGITS:,})", node.start_mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


class _PythonLoader(yaml.SafeLoader):
    """The pure-Python safe loader; refuses aliases and deep nesting while composing.

    Checking during composition keeps the recursion of PyYAML's composer within
    MAX_NESTING levels.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            # An alias repeats a node by reference; nested aliases expand exponentially
            # ("billion laughs"). Configs never need them.
            raise yaml.composer.ComposerError(None, None, _ALIAS, self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_NESTING} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_PythonLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_CLoader: Any = None
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(yaml.CSafeLoader):  # type: ignore[no-redef]
        """libyaml's parser and composer with the safe constructor (see :func:`_check_nodes`).

        libyaml itself refuses nesting deeper than 1,000 levels, so its (recursive) composer
        stays shallow; aliases and MAX_NESTING are checked on the composed nodes.
        """

    _CLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _check_nodes(root: Any) -> None:
    """Refuse aliases and nesting deeper than MAX_NESTING in a composed node graph.

    An alias makes one node a child of several parents, so it is found as a node met twice;
    the walk stops there, before any shared part could be walked again (no expansion).
    """
    seen: set[int] = set()
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            raise yaml.composer.ComposerError(None, None, _ALIAS, node.start_mark)
        seen.add(id(node))
        if depth > MAX_NESTING:  # every node counts, as in _PythonLoader.compose_node
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_NESTING} levels deep", node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            continue
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        else:
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))


def _load(text: str) -> Any:
    """Parse with the C loader where available, else the pure-Python one."""
    if _CLoader is None:
        return yaml.load(text, Loader=_PythonLoader)
    loader = _CLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_text(path: str) -> str:
    limit = MAX_YAML_BYTES
    if path == STDIO:
        text = sys.stdin.read(limit + 1)
    else:
        with open(Path(path).expanduser(), encoding="utf-8") as handle:
            text = handle.read(limit + 1)
    if len(text) > limit:
        raise InvalidInputError(f"{path!r} is larger than {limit // 1024} KiB; tvtool reads "
                                "only small YAML documents (configs are a few KiB)")
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
    if len(text) > MAX_YAML_BYTES:
        raise InvalidInputError(f"{label} is larger than {MAX_YAML_BYTES // 1024} KiB; tvtool "
                                "reads only small YAML documents")
    try:
        return _load(text)
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
