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
    prompt = " ".join(["cat"] * 80) + " dog"
    tokens = _clip_tokens(clip, [prompt])
    tokens.check_lengths()  # not an error by itself
    encoded = clip(prompt, truncation=True, max_length=77)["input_ids"]  # what the pipeline hands the encoder
    cat = clip("cat", add_special_tokens=False)["input_ids"][0]
    assert tokens.positions("cat", 0) == tuple(i for i, token in enumerate(encoded) if token == cat) == tuple(range(1, 76))
    with pytest.raises(TokenError, match="limit is 77"):
        tokens.positions("dog", 0)


@pytest.mark.parametrize("encoder", ["clip", "t5"])
def test_a_word_at_the_last_position_of_a_truncated_prompt_is_past_the_limit(encoder, clip, t5):
    """Truncation keeps `limit - 1` positions of the prompt and puts the end token last (CLIP: start token, 75 words,
    end token in 77; T5 at max_sequence_length L: L - 1 pieces and </s>): a word at position `limit - 1` of the
    untruncated prompt is not in what the encoder gets. It was placed on the end token there."""
    tokenizer, limit, words = (clip, 77, 75) if encoder == "clip" else (t5, 32, 31)
    prompt = " ".join(["red"] * words) + " cat"
    tokens = PromptTokens([EncoderPrompts(encoder, (tokenizer,), ((prompt, "a red cat"),), 0, limit)], 2, limit)
    encoded = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
    cat = tokenizer("cat", add_special_tokens=False)["input_ids"][0]
    assert len(tokenizer(prompt)["input_ids"]) == limit + 1 and cat not in encoded  # the tokenizer's own truth
    with pytest.raises(TokenError, match=f"position\\(s\\) \\[{limit - 1}\\].*limit is {limit}"):
        tokens.positions("cat", 0)
    red = tokenizer("red", add_special_tokens=False)["input_ids"][0]
    assert tokens.positions("red", 0) == tuple(i for i, token in enumerate(encoded) if token == red)
    assert [tuple(ids) for _, _, ids in tokens.token_ids(0)] == [tuple(encoded)]  # the aligners' ids: the encoder's
    assert tokens.token_words(0)[0][-1] == -1  # the end token is no word


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


# --- Words in prompts: tokenizers without character offsets, truncation, whitespace, prompt_2 ---------------------


class _NoOffsets:
    """A tokenizer as transformers 4.x's slow CLIPTokenizer / T5Tokenizer: `return_offsets_mapping` raises."""

    def __init__(self, tokenizer):
        self.__dict__["_tokenizer"] = tokenizer

    def __call__(self, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


_NO_OFFSETS_TABLE = [
    ("a catfish and a fish", "fish", None),
    ("a catfish and a fish", "fish", 0),
    ("a catfish", "fish", None),
    ("a catfish", "cat", None),
    ("a catfish and a cat", "cat", 0),
    ("a Cat", "Cat", None),
    ("a cat", "Cat", None),
    ("a red,dog", "dog", None),
    ("a dog, a cat.", "dog", None),
    ("A Red Car and a red car", "red car", 1),
    (f"a {MULTI_TOKEN_WORD} cat", MULTI_TOKEN_WORD, None),
    ("a héllo cat", "cat", None),
    ("a héllo cat", "héllo", None),
    ("a héllo  wörld, no", "wörld", None),
    ("a cat-dog", "dog", None),
    ("a red  cat", "cat", None),  # byte-level BPE's lone whitespace tokens belong to no word
    ("a red cat\n\nblue dog", "blue", None),
    ("a cat \U0001f431 dog", "dog", None),  # the word after a character split into bytes
    ("emoji \U0001f431 cat", "cat", None),  # T5: the `▁` before an unknown character is not the next word's
    ("four, <|endoftext|> table", "table", None),  # a special token typed in the prompt is stepped over
]


@pytest.mark.parametrize("name, encoder", [("tiny-sd", "tokenizer"), ("tiny-pixart", "tokenizer"), ("tiny-qwenimage", "tokenizer")])
def test_words_without_character_offsets_match_as_with_them(name, encoder, tiny_cache):
    """Without offsets, words were matched as raw token ids: "fish" bound the end of "catfish", T5's "cat" the start
    of it, case mattered and a word after punctuation was missed. Both paths now give the same positions."""
    from attnctl.tokens import _Tokenized

    tokenizer = getattr(tiny_cache(name), encoder)
    for text, phrase, occurrence in _NO_OFFSETS_TABLE:
        with_offsets = _Tokenized(tokenizer, text, 77, "x")
        without = _Tokenized(_NoOffsets(tokenizer), text, 77, "x")
        expected = with_offsets.find(phrase, occurrence)
        assert without.find(phrase, occurrence) == expected, (text, phrase, occurrence, with_offsets.show())
        assert without.word_ids() == with_offsets.word_ids(), (text, with_offsets.show())
    clip = _Tokenized(_NoOffsets(tokenizer), "a catfish and a fish", 77, "x")
    assert clip.find("fish", None) == (clip.find("fish", 0)) and len(clip.find("fish", None)) == 1
    assert _Tokenized(_NoOffsets(tokenizer), "a catfish", 77, "x").find("fish", None) == []


_LONG = "a red cat and " + "red " * 80 + "dog"  # "dog" is past CLIP's 77 tokens: the pipeline truncates it away


@pytest.mark.parametrize("kind", ["p2p-reweight", "p2p-local-blend", "structured"])
def test_a_word_truncated_away_raises_in_controls_that_skip_missing_words(kind, tiny_cache):
    """P2P's reweight / local_blend and StructuredGuidance skip a word missing from a row; they caught every
    TokenError, so a word truncated away silently got no weight (or "in none of the edited prompts")."""
    import attnctl
    from tests.helpers import generate

    control = {
        "p2p-reweight": attnctl.PromptToPrompt("refine", reweight={"dog": 2.0}),
        "p2p-local-blend": attnctl.PromptToPrompt("refine", local_blend=("cat", "dog")),
        "structured": attnctl.StructuredGuidance(phrases=["a red cat", "dog"]),
    }[kind]
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, control):
        with pytest.raises(TokenError, match="'dog'.* is at clip token position.*limit is 77"):
            generate(pipe, "tiny-sd", ["a red cat and a dog", _LONG], steps=1)


def test_chunked_phrases_past_the_limit_are_left_out(tiny_cache):
    """StructuredGuidance without `phrases`: a noun phrase the chunker finds past the limit is not an error."""
    import attnctl
    from tests.helpers import generate

    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, attnctl.StructuredGuidance()):
        generate(pipe, "tiny-sd", ["a red cat and a dog", _LONG + " and a blue car"], steps=1)


def test_a_phrase_matches_whatever_whitespace_separates_its_words(clip, t5):
    """"red car" was not found in "a red  car" or "a red\\ncar" (the same tokens as "a red car")."""
    from attnctl.prompt_weights import parse_prompt
    from attnctl.tokens import has_duplicates

    for name, tokenizer in (("clip", clip), ("t5", t5)):
        prompts = ("a red car", "a red  car", "a red\ncar", "a red\t car and a red car")
        tokens = PromptTokens([EncoderPrompts(name, (tokenizer,), (prompts,), 0, 77)], len(prompts), 77)
        expected = tokens.positions("red car", 0)
        assert [tokens.positions("red car", row) for row in range(3)] == [expected] * 3
        assert tokens.positions(("red  car", 1), 3) == tokens.positions("red car", 3)[len(expected) :]
    # parse_prompt counts occurrences as the tokens are found: the weighted one is the first of two
    assert parse_prompt("a (red car:1.5) and a red  car")[1] == {("red car", 0): 1.5}
    assert has_duplicates(["red car", "RED  car"])


def test_sd3_without_its_t5_encoder_places_words_in_clip_only(tiny_cache):
    """SD3 loaded with `text_encoder_3=None` (tokenizer_3 kept) fills the T5 span with zeros: "cat" was also placed
    there, at 77 + its T5 position."""
    import attnctl
    from tests.helpers import WordProbe, generate

    pipe = tiny_cache("tiny-sd3")
    t5 = pipe.text_encoder_3
    probe = WordProbe(words=("cat",))
    pipe.text_encoder_3 = None
    try:
        with attnctl.apply(pipe, probe):
            generate(pipe, "tiny-sd3", "a photo of a cat", steps=1)
    finally:
        pipe.text_encoder_3 = t5
    assert probe.log[0] == ("cond", 0, {"cat": (5,)})


def test_sdxl_prompt_2_worded_differently(tiny_cache):
    """CLIP-L and CLIP-G share positions. (a) Prompt-to-Prompt aligned the tokens of `prompt` only, and applied that
    alignment to `prompt_2`'s tokens too: an edit that aligns differently there is refused, naming both. (b) A word
    at different positions in the two texts is placed at the union (on the other text's token there too): warned."""
    import warnings

    import attnctl
    from attnctl.errors import UnsupportedError
    from tests.helpers import WordProbe, generate

    pipe = tiny_cache("tiny-sdxl")
    prompts = ["a cat on a table", "a dog on a table"]
    with attnctl.apply(pipe, attnctl.PromptToPrompt("refine")):
        generate(pipe, "tiny-sdxl", prompts, steps=1, prompt_2=["a cat on a bed", "a dog on a bed"])  # aligned alike
        with pytest.raises(UnsupportedError, match=r"prompt \('a cat on a table' -> 'a dog on a table'\) and in prompt_2"):
            generate(pipe, "tiny-sdxl", prompts, steps=1, prompt_2=["a cat on a table", "a big red dog on a table"])
    probe = WordProbe(words=("dog", "cat"))
    with warnings.catch_warnings(record=True) as caught, attnctl.apply(pipe, probe):
        warnings.simplefilter("always")
        generate(pipe, "tiny-sdxl", "a photo of a cat", steps=1, prompt_2="a dog and cat")
    assert probe.log[0] == ("cond", 0, {"dog": (2,), "cat": (4, 5)})  # the union, as before
    messages = [str(w.message) for w in caught if str(w.message).startswith("attnctl: ")]
    assert len(messages) == 2 and all("tokenizer 2's text 'a dog and cat'" in m for m in messages)
    assert "'dog' is at different clip positions" in messages[0] and "at [] in tokenizer 1's text 'a photo of a cat'" in messages[0]
