"""Regular expressions from an untrusted ``adapter_config.json``, matched in bounded time.

peft selects modules with Python regular expressions (``target_modules``,
``exclude_modules``, the keys of ``rank_pattern`` / ``alpha_pattern``). Python's ``re``
backtracks: a pattern such as ``(.*)*z`` takes time exponential in the length of the module
name, and ``.*.*.*.*.*z`` polynomial of high degree, so a hostile adapter could stall
``tvtool convert`` for years. Here a pattern is parsed with Python's own regex parser (so it
means exactly what peft's ``re`` makes of it) and matched by simulating its automaton
(Thompson's construction): every character advances a set of states, so one match costs at
most ``len(text) × program size`` steps, whatever the pattern.

Bounds (exit 2 beyond them, see docs/cli.md "Untrusted input"): a pattern is at most
:data:`MAX_PATTERN_CHARS` characters and compiles to at most :data:`MAX_PROGRAM` states (a
counted repeat ``x{1000}`` expands), and the matching done for one adapter takes at most
:data:`MAX_STEPS` state visits. Constructs whose result cannot be decided by an automaton
(backreferences, lookarounds, conditionals, possessive quantifiers and atomic groups) and
case-insensitive matching are refused; module names never need them.

Whether a pattern matches does not depend on greedy or lazy quantifiers, so for the
constructs accepted the answer is the one ``re`` gives (``tests/test_peft_patterns.py``
checks this against ``re`` on generated patterns).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

try:  # Python >= 3.11
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from tvtool.errors import InvalidInputError
from tvtool.limits import short_repr

MAX_PATTERN_CHARS = 1000
"""Longest regular expression accepted (peft patterns name modules: a few dozen characters)."""

MAX_PROGRAM = 2000
"""Most automaton states one pattern may compile to."""

MAX_STEPS = 20_000_000
"""Most state visits all the matching for one adapter may take (~5 s of CPU: see
benchmarks/bounds_bench.py)."""

_REFUSED_OPS = {
    _sre.GROUPREF: "a backreference",
    _sre.GROUPREF_EXISTS: "a conditional group",
    _sre.ASSERT: "a lookahead or lookbehind",
    _sre.ASSERT_NOT: "a negative lookahead or lookbehind",
}
for _name, _what in (("POSSESSIVE_REPEAT", "a possessive quantifier"),
                     ("ATOMIC_GROUP", "an atomic group"),
                     ("GROUPREF_IGNORE", "a backreference"),
                     ("GROUPREF_UNI_IGNORE", "a backreference"),
                     ("GROUPREF_LOC_IGNORE", "a backreference")):
    if hasattr(_sre, _name):
        _REFUSED_OPS[getattr(_sre, _name)] = _what

_CHAR, _SPLIT, _JMP, _ASSERT, _MATCH = range(5)
_END = ""  # "no character": the position after the last one


@dataclass
class MatchBudget:
    """State visits left for the matching of one adapter (shared by all its patterns).

    Attributes:
        steps: Visits left.
        label: The adapter, for the error.
    """

    steps: int = MAX_STEPS
    label: str = "adapter_config.json"

    def spend(self, count: int) -> None:
        """Use ``count`` visits.

        Raises:
            InvalidInputError: the budget is exhausted.
        """
        self.steps -= count
        if self.steps < 0:
            raise InvalidInputError(
                f"{self.label}: matching its regular expressions against the module names "
                f"takes more than {MAX_STEPS:,} steps; tvtool stops there",
                hint="use plain module names or simpler patterns in adapter_config.json")


def _word(flags: int) -> Callable[[str], bool]:
    pattern = re.compile(r"\w", re.ASCII if flags & _sre.SRE_FLAG_ASCII else 0)
    return lambda ch: ch != _END and pattern.fullmatch(ch) is not None


def _category(code: Any, flags: int) -> Callable[[str], bool]:
    r"""One ``\d \D \w \W \s \S`` class, decided by ``re`` itself on one character."""
    text = {
        _sre.CATEGORY_DIGIT: r"\d", _sre.CATEGORY_NOT_DIGIT: r"\D",
        _sre.CATEGORY_WORD: r"\w", _sre.CATEGORY_NOT_WORD: r"\W",
        _sre.CATEGORY_SPACE: r"\s", _sre.CATEGORY_NOT_SPACE: r"\S",
    }.get(code)
    if text is None:
        raise _Unsupported(f"the character class {code}")
    pattern = re.compile(text, re.ASCII if flags & _sre.SRE_FLAG_ASCII else 0)
    return lambda ch: pattern.fullmatch(ch) is not None


class _Unsupported(Exception):
    """A construct outside what the automaton decides."""


@dataclass
class BoundedPattern:
    """A regular expression compiled to an automaton (see the module docstring).

    Build it with :func:`compile_pattern`.
    """

    pattern: str
    program: list[tuple[Any, ...]] = field(default_factory=list)
    literal: str | None = None

    def fullmatch(self, text: str, budget: MatchBudget) -> bool:
        """Whether ``re.fullmatch(pattern, text)`` would match."""
        if self.literal is not None:
            return text == self.literal
        return self._run(text, budget, anchored_end=True)

    def match(self, text: str, budget: MatchBudget) -> bool:
        """Whether ``re.match(pattern, text)`` would match (at the start, any length)."""
        return self._run(text, budget, anchored_end=False)

    def _closure(self, pcs: list[int], prev: str, nxt: str, last: bool,
                 budget: MatchBudget) -> tuple[set[int], bool]:
        """States reachable without consuming, and whether the match state is among them."""
        program = self.program
        seen: set[int] = set()
        stack = list(pcs)
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op = program[pc]
            kind = op[0]
            if kind == _JMP:
                stack.append(op[1])
            elif kind == _SPLIT:
                stack.append(op[2])
                stack.append(op[1])
            elif kind == _ASSERT:
                if _holds(op[1], prev, nxt, last, op[2], op[3]):
                    stack.append(pc + 1)
            elif kind == _MATCH:
                matched = True
        budget.spend(len(seen) + 1)
        return seen, matched

    def _run(self, text: str, budget: MatchBudget, *, anchored_end: bool) -> bool:
        program = self.program
        count = len(text)
        states, matched = self._closure([0], _END, text[0] if text else _END, count == 1,
                                        budget)
        for index, ch in enumerate(text):
            if matched and not anchored_end:
                return True
            moved = [pc + 1 for pc in states if program[pc][0] == _CHAR and program[pc][1](ch)]
            if not moved:
                return False
            nxt = text[index + 1] if index + 1 < count else _END
            states, matched = self._closure(moved, ch, nxt, index + 2 == count, budget)
        return matched


def _holds(kind: Any, prev: str, nxt: str, last: bool, multiline: bool,
           word: Callable[[str], bool]) -> bool:
    """Whether a zero-width assertion holds between ``prev`` and ``nxt``.

    ``last``: ``nxt`` is the final character of the text (``$`` also matches before a final
    newline, as in ``re``).
    """
    if kind == _sre.AT_BEGINNING_STRING:
        return prev == _END
    if kind == _sre.AT_BEGINNING:
        return prev == _END or (multiline and prev == "\n")
    if kind == _sre.AT_END_STRING:
        return nxt == _END
    if kind == _sre.AT_END:
        return nxt == _END or (nxt == "\n" and (last or multiline))
    if kind == _sre.AT_BOUNDARY:
        return word(prev) != word(nxt)
    if kind == _sre.AT_NON_BOUNDARY:
        # re: \B never matches in an empty string; elsewhere it is "not \b".
        return not (prev == _END and nxt == _END) and word(prev) == word(nxt)
    raise _Unsupported(f"the anchor {kind}")


class _Compiler:
    """Parse tree (Python's ``re`` parser) -> automaton program."""

    def __init__(self, flags: int) -> None:
        self.program: list[tuple[Any, ...]] = []
        self.flags = flags

    def emit(self, *op: Any) -> int:
        if len(self.program) >= MAX_PROGRAM:
            raise _TooLarge
        self.program.append(op)
        return len(self.program) - 1

    def sequence(self, items: Any, flags: int) -> None:
        for op, av in items:
            self.item(op, av, flags)

    def item(self, op: Any, av: Any, flags: int) -> None:
        if op in _REFUSED_OPS:
            raise _Unsupported(_REFUSED_OPS[op])
        if op == _sre.LITERAL:
            self.emit(_CHAR, _literal(av))
        elif op == _sre.NOT_LITERAL:
            self.emit(_CHAR, _not_literal(av))
        elif op == _sre.ANY:
            self.emit(_CHAR, _any(bool(flags & _sre.SRE_FLAG_DOTALL)))
        elif op == _sre.IN:
            self.emit(_CHAR, _char_set(av, flags))
        elif op == _sre.AT:
            self.emit(_ASSERT, av, bool(flags & _sre.SRE_FLAG_MULTILINE), _word(flags))
        elif op == _sre.SUBPATTERN:
            _group, add, remove, body = av
            inner = (flags | add) & ~remove
            _check_flags(inner)
            self.sequence(body, inner)
        elif op == _sre.BRANCH:
            self.branch(av[1], flags)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            low, high, body = av
            self.repeat(low, high, body, flags)
        else:
            raise _Unsupported(f"the construct {op}")

    def branch(self, alternatives: list[Any], flags: int) -> None:
        jumps = []
        for index, alternative in enumerate(alternatives):
            if index < len(alternatives) - 1:
                split = self.emit(_SPLIT, None, None)
                self.sequence(alternative, flags)
                jumps.append(self.emit(_JMP, None))
                self.program[split] = (_SPLIT, split + 1, len(self.program))
            else:
                self.sequence(alternative, flags)
        for jump in jumps:
            self.program[jump] = (_JMP, len(self.program))

    def repeat(self, low: int, high: Any, body: Any, flags: int) -> None:
        for _ in range(low):
            self.sequence(body, flags)
        if high == _sre.MAXREPEAT:
            loop = self.emit(_SPLIT, None, None)
            self.sequence(body, flags)
            self.emit(_JMP, loop)
            self.program[loop] = (_SPLIT, loop + 1, len(self.program))
            return
        splits = []
        for _ in range(int(high) - low):
            splits.append(self.emit(_SPLIT, None, None))
            self.sequence(body, flags)
        for split in splits:
            self.program[split] = (_SPLIT, split + 1, len(self.program))


class _TooLarge(Exception):
    """The program passed MAX_PROGRAM states."""


def _literal(code: int) -> Callable[[str], bool]:
    char = chr(code)
    return lambda ch: ch == char


def _not_literal(code: int) -> Callable[[str], bool]:
    char = chr(code)
    return lambda ch: ch != char


def _in_range(low: int, high: int) -> Callable[[str], bool]:
    return lambda ch: low <= ord(ch) <= high


def _any(dotall: bool) -> Callable[[str], bool]:
    return (lambda ch: True) if dotall else (lambda ch: ch != "\n")


def _char_set(items: list[tuple[Any, Any]], flags: int) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op == _sre.NEGATE:
            negate = True
        elif op == _sre.LITERAL:
            tests.append(_literal(av))
        elif op == _sre.RANGE:
            low, high = av
            tests.append(_in_range(low, high))
        elif op == _sre.CATEGORY:
            tests.append(_category(av, flags))
        else:
            raise _Unsupported(f"the character-set item {op}")

    def member(ch: str) -> bool:
        return any(test(ch) for test in tests) != negate

    return member


def _check_flags(flags: int) -> None:
    if flags & _sre.SRE_FLAG_IGNORECASE:
        raise _Unsupported("case-insensitive matching ((?i))")
    if flags & _sre.SRE_FLAG_LOCALE:
        raise _Unsupported("locale-dependent matching ((?L))")


def compile_pattern(pattern: str, what: str) -> BoundedPattern:
    """Check and compile one regular expression of an adapter config.

    Args:
        pattern: The expression, as peft would pass it to ``re``.
        what: How to name it in errors (e.g. ``"'a/': target_modules"``).

    Raises:
        InvalidInputError: too long, not a valid expression, a construct the automaton cannot
            decide, or a program larger than :data:`MAX_PROGRAM`.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidInputError(f"{what} is a regular expression of {len(pattern):,} "
                                f"characters; tvtool accepts at most {MAX_PATTERN_CHARS}")
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:80]
        raise InvalidInputError(f"{what} {short_repr(pattern, 60)} is not a valid regular "
                                f"expression ({reason})") from None
    flags = parsed.state.flags if hasattr(parsed, "state") else parsed.pattern.flags
    items = list(parsed)
    if all(op == _sre.LITERAL for op, _ in items) and not flags & _sre.SRE_FLAG_IGNORECASE:
        literal = "".join(chr(av) for _, av in items)
    else:
        literal = None
    compiler = _Compiler(flags)
    try:
        _check_flags(flags)
        compiler.sequence(items, flags)
        compiler.emit(_MATCH)
    except _Unsupported as exc:
        raise InvalidInputError(f"{what} {short_repr(pattern, 60)} uses {exc}, which tvtool "
                                "does not match",
                                hint="module names need only literals, ., classes, "
                                     "alternation and repetition") from None
    except _TooLarge:
        raise InvalidInputError(f"{what} {short_repr(pattern, 60)} expands to more than "
                                f"{MAX_PROGRAM} automaton states",
                                hint="write the repetition counts smaller") from None
    except RecursionError:
        raise InvalidInputError(f"{what} {short_repr(pattern, 60)} is nested too deeply"
                                ) from None
    return BoundedPattern(pattern, compiler.program, literal)
