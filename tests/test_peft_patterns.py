"""Regular expressions from adapter_config.json are matched in bounded time, with re's answers.

The expected answers come from Python's ``re`` (what peft uses) on generated patterns; the
hostile patterns are those that make ``re`` backtrack for years.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvtool.errors import InvalidInputError
from tvtool.formats.peft_adapters import check_peft_config
from tvtool.formats.peft_adapters import patterns as pat
from tvtool.formats.peft_adapters.patterns import MatchBudget, compile_pattern

_ATOMS = st.sampled_from(["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", r"\W", "1",
                          r"\b", r"\B", "^", "$", r"\A", r"\Z", "[a-c.]", "(?s:.)"])


def _patterns() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        quantifier = st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "*?", "+?", "{2,}"])
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}|{t[1]}"),
            st.tuples(inner, quantifier).map(lambda t: f"({t[0]}){t[1]}"),
            inner.map(lambda s: f"(?:{s})"),
        )

    return st.recursive(_ATOMS, extend, max_leaves=8)


_TEXTS = st.text(alphabet="ab.1_\n", max_size=8)


@settings(max_examples=400, deadline=None)
@given(pattern=_patterns(), text=_TEXTS)
def test_answers_equal_re(pattern, text):
    compiled = compile_pattern(pattern, "p")
    budget = MatchBudget()
    assert compiled.fullmatch(text, budget) == (re.fullmatch(pattern, text) is not None)
    assert compiled.match(text, budget) == (re.match(pattern, text) is not None)
    wrapped = compile_pattern(rf"(.*\.)?({pattern})$", "p")
    assert wrapped.match(text, budget) == (re.match(rf"(.*\.)?({pattern})$", text) is not None)


@pytest.mark.parametrize("pattern", ["(.*)*z", "(a|a)*z", "(a+)+z", "(.*.*)*z",
                                     ".*.*.*.*.*.*.*.*.*.*z", "(x+x+)+y"])
def test_catastrophic_patterns_match_in_linear_time(pattern):
    compiled = compile_pattern(pattern, "p")
    text = "a" * 60 + "." + "x" * 60
    start = time.process_time()
    assert not compiled.fullmatch(text, MatchBudget())
    assert not compiled.match(text, MatchBudget())
    assert time.process_time() - start < 2.0


@pytest.mark.parametrize(("pattern", "message"), [
    (r"(a)\1", "backreference"), (r"a(?=b)", "lookahead"), (r"(?<!a)b", "lookahead"),
    (r"(?i)attn", "case-insensitive"), (r"(a)?(?(1)a|b)", "conditional"),
    ("a{1000}b{1000}c{1000}", "automaton states"), ("x" * 1001, "at most 1000"),
    ("(unclosed", "not a valid regular expression"),
])
def test_undecidable_or_oversized_patterns_are_refused(pattern, message):
    with pytest.raises(InvalidInputError, match=message):
        compile_pattern(pattern, "target_modules")


def test_the_step_budget_bounds_all_matching(monkeypatch):
    compiled = compile_pattern("(.*)*z", "p")
    budget = MatchBudget(steps=500, label="'adapter'")
    with pytest.raises(InvalidInputError, match=r"more than .* steps"):
        for _ in range(100):
            compiled.fullmatch("a" * 50, budget)


def _config(**extra):
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["out_proj"],
            **extra}


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_hostile_config_regexes_do_not_stall(field):
    from tvtool.formats.peft_adapters.config import _matches

    settings_ = check_peft_config(_config(**{field: "(.*)*z"}), "'a'")
    selector = getattr(settings_, field)
    start = time.process_time()
    assert not _matches(selector, "transformer.resblocks.0.attn.out_proj" + "a" * 40,
                        settings_.budget)
    assert time.process_time() - start < 2.0


def test_hostile_pattern_keys_do_not_stall():
    settings_ = check_peft_config(_config(rank_pattern={"(.*)*z": 4},
                                          alpha_pattern={"(a|a)*z": 8}), "'a'")
    start = time.process_time()
    module = "transformer.resblocks.0.attn" + "a" * 60
    assert settings_.rank_of(module) == 2 and settings_.alpha_of(module) == 4.0
    assert time.process_time() - start < 2.0


def test_pattern_keys_follow_peft_rule():
    # peft: the first key K with re.match(rf"(.*\.)?({K})$", module) decides.
    keys = {"resblocks.1.attn": 3, r"resblocks\.\d+\.mlp\.c_fc": 5, "attn": 7}
    settings_ = check_peft_config(_config(rank_pattern=keys), "'a'")
    for module in ["transformer.resblocks.1.attn", "transformer.resblocks.11.attn",
                   "transformer.resblocks.2.mlp.c_fc", "transformer.resblocks.2.mlp.c_proj",
                   "xattn"]:
        expected = next((v for k, v in keys.items()
                         if re.match(rf"(.*\.)?({k})$", module)), 2)
        assert settings_.rank_of(module) == expected, module


def test_budget_constant_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert f"{pat.MAX_PATTERN_CHARS:,}" in text or str(pat.MAX_PATTERN_CHARS) in text
    assert f"{pat.MAX_STEPS:,}" in text
