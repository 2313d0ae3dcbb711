"""Words to token positions for CLIP and T5 tokenizers (docs/methods.md)."""

from __future__ import annotations

import pytest

from attnctl.errors import ConfigError, TokenError
from attnctl.testing import MULTI_TOKEN_WORD, WORDS, tiny_clip_tokenizer, tiny_t5_tokenizer
from attnctl.tokens import EncoderPrompts, PromptTokens, validate_word_query


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def t5():
    return tiny_t5_tokenizer()


def test_vocabulary_words_are_single_tokens(clip, t5):
    for word in WORDS:
        assert len(clip(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(t5(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(clip(MULTI_TOKEN_WORD, add_special_tokens=False)["input_ids"]) > 1
    assert len(t5(MULTI_TOKEN_WORD, add_special_tokens=False)["input_ids"]) > 1


def _clip_tokens(clip, prompts):
    return PromptTokens([EncoderPrompts("clip", (clip,), (tuple(prompts),), 0, 77)], len(prompts), 77)


def test_clip_positions_per_row_every_occurrence(clip):
    tokens = _clip_tokens(clip, ["a red cat and a red dog", "a blue car"])
    assert tokens.positions("red", 0) == (2, 6)
    assert tokens.positions(("red", 1), 0) == (6,)
    assert tokens.positions("red dog", 0) == (6, 7)
    assert tokens.positions("car", 1) == (3,)
    assert tokens.positions("Red", 0) == (2, 6)  # CLIP lower-cases
    assert tokens.positions(4, 1) == (4,)


def test_word_split_into_several_tokens(clip):
    tokens = _clip_tokens(clip, [f"a {MULTI_TOKEN_WORD} cat"])
    positions = tokens.positions(MULTI_TOKEN_WORD, 0)
    assert len(positions) > 1 and positions == tuple(range(2, 2 + len(positions)))
    assert tokens.positions("cat", 0) == (2 + len(positions),)


def test_missing_word_shows_tokenization(clip):
    tokens = _clip_tokens(clip, ["a red cat", "a dog"])
    with pytest.raises(TokenError) as info:
        tokens.positions("cat", 1)
    message = str(info.value)
    assert "'cat' is not in the cond prompt of row 1" in message and "1:a</w>" in message and "2:dog</w>" in message


def test_prompt_over_limit(clip):
    """The pipeline truncates a long prompt (with a warning): a word inside the limit is controlled, a word only
    past it raises (issue #18: any word control used to raise on any prompt over the limit)."""
    tokens = _clip_tokens(clip, [" ".join(["cat"] * 80) + " dog"])
    tokens.check_lengths()  # not an error by itself
    assert tokens.positions("cat", 0) == tuple(range(1, 77))
    with pytest.raises(TokenError, match="limit is 77"):
        tokens.positions("dog", 0)


def test_t5_span_after_clip_and_shared_clip_positions(clip, t5):
    prompts = ("a red cat on the left",)
    tokens = PromptTokens(
        [EncoderPrompts("clip", (clip, clip), (prompts, ("a red cat",)), 0, 77), EncoderPrompts("t5", (t5,), (prompts,), 77, 32)],
        1,
        77 + 32,
    )
    # CLIP-L sees "red" at 2, CLIP-G (prompt_2) too; T5 has no start token: "red" is its second piece
    assert tokens.positions("red", 0) == (2, 77 + 1)
    assert tokens.positions("left", 0) == (6, 77 + 5)
    with pytest.raises(TokenError, match="outside the text sequence"):
        tokens.positions(200, 0)


def test_query_validation():
    assert validate_word_query(" cat ", owner="x") == "cat"
    assert validate_word_query(("cat", 2), owner="x") == ("cat", 2)
    for bad in ("", -1, ("cat", -1), True, 1.5, ("", 0)):
        with pytest.raises(ConfigError):
            validate_word_query(bad, owner="x")
