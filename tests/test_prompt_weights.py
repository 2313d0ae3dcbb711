"""Prompt weighting syntax: (word:1.5), (word), [word], nesting, escapes, errors, keys for repeated words."""

from __future__ import annotations

import pytest

import attnctl
from attnctl import ConfigError
from attnctl.prompt_weights import parse_prompt, parse_prompts, parse_segments
from attnctl.testing import tiny_clip_tokenizer
from attnctl.tokens import EncoderPrompts, PromptTokens


@pytest.mark.parametrize(
    "text, clean, weights",
    [
        ("a (red:1.6) car, (blurry:0)", "a red car, blurry", {"red": 1.6, "blurry": 0.0}),
        ("a photo of a cat", "a photo of a cat", {}),
        ("(cat)", "cat", {"cat": 1.1}),
        ("((cat))", "cat", {"cat": 1.21}),
        ("[dog]", "dog", {"dog": 0.909090909091}),
        ("[[dog]]", "dog", {"dog": 0.826446280992}),
        ("(a (red:1.5) car:1.2)", "a red car", {"a": 1.2, "red": 1.8, "car": 1.2}),
        ("([cat])", "cat", {}),  # 1.1 / 1.1: weight 1, nothing to do
        ("(red car:1.3) and a dog", "red car and a dog", {"red car": 1.3}),
        ("(cat: 0.5 ) and (dog:.25)", "cat and dog", {"cat": 0.5, "dog": 0.25}),
        (r"a \(red\) car \[big\] \\ x\:y", r"a (red) car [big] \ x:y", {}),
        ("style: oil painting", "style: oil painting", {}),
        ("(style: oil painting)", "style: oil painting", {"style: oil painting": 1.1}),
    ],
)
def test_parse_prompt(text, clean, weights):
    got_clean, got = attnctl.parse_prompt(text)
    assert got_clean == clean
    assert got.keys() == weights.keys()
    for key, value in weights.items():
        assert got[key] == pytest.approx(value, rel=1e-9)


def test_repeated_words_get_occurrence_keys():
    assert attnctl.parse_prompt("a cat and a (cat:2)")[1] == {("cat", 1): 2.0}
    assert attnctl.parse_prompt("(cat:2) and (cat:3)")[1] == {("cat", 0): 2.0, ("cat", 1): 3.0}
    assert attnctl.parse_prompt("(cat:2) and (Cat:2)")[1] == {"cat": 2.0}  # every occurrence, same weight
    # "red" also occurs inside the phrase "red car": the weighted one is occurrence 0
    assert attnctl.parse_prompt("(red:1.2) and a red car")[1] == {("red", 0): 1.2}


def test_occurrence_keys_resolve_to_the_weighted_tokens():
    clean, weights = attnctl.parse_prompt("a cat and a (cat:2) and a cat")
    tokens = PromptTokens([EncoderPrompts("clip", (tiny_clip_tokenizer(),), ((clean,),), 0, 77)], 1, 77)
    (key,) = weights
    assert tokens.positions(key, 0) == (5,)  # bos a cat and a [cat]


def test_nesting_multiplies_across_segments():
    assert parse_segments("a ((b) c:2)") == [("a ", 1.0), ("b", 2.2), (" c", 2.0)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("a (red car", r"'\(' at position 2 is never closed"),
        ("a red) car", r"'\)' at position 5 closes no bracket"),
        ("(red]", r"closed by '\]'"),
        ("[red)", r"closed by '\)'"),
        ("(red:-1)", ">= 0"),
        ("(red:1.2.3)", "malformed weight"),
        ("[red:blue:0.5]", "prompt editing"),
        ("[red:1.5]", "square brackets"),
        ("photo(real)istic", "word boundaries"),
        (3, "prompt string"),
    ],
)
def test_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        attnctl.parse_prompt(text)


def test_several_prompts():
    clean, weights = parse_prompts(["a (red) car", "a cat"])
    assert clean == ["a red car", "a cat"] and weights == [{"red": 1.1}, {}]


def test_readme_examples():
    assert attnctl.parse_prompt("a ((cat)) on a [sofa]") == ("a cat on a sofa", {"cat": 1.21, "sofa": 0.909090909091})
    assert attnctl.parse_prompt(r"a cat and a (cat:2) in a \(small\) box") == ("a cat and a cat in a (small) box", {("cat", 1): 2.0})


def test_a_colon_without_a_number_is_plain_text_and_a_weight_is_what_float_reads():
    """`(smile: e)` and `(x: -)` hold no number: plain text weighted 1.1 (they raised "malformed weight"); a weight is
    what Python's float reads, exponents included; text that tries to be a number and is not still raises."""
    assert parse_prompt("a (smile: e)") == ("a smile: e", {"smile: e": 1.1})
    assert parse_prompt("(x: -) dog") == ("x: - dog", {"x: -": 1.1})
    assert parse_prompt("(cat:1.5e1)") == ("cat", {"cat": 15.0})
    for bad in ("(ratio: 16-9)", "(cat:1..5)"):
        with pytest.raises(ConfigError, match="malformed weight"):
            parse_prompt(bad)
