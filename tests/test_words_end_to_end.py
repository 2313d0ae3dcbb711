"""Word resolution inside real pipeline calls: per row, per encoder, errors at the first denoiser call."""

from __future__ import annotations

import pytest

import attnctl
from attnctl.errors import TokenError
from attnctl.testing import MULTI_TOKEN_WORD, make_tiny_pipeline

from .helpers import WordProbe, generate


def test_sd_rows_and_num_images_per_prompt():
    pipe = make_tiny_pipeline("tiny-sd")
    probe = WordProbe(words=("cat",))
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", prompt=["a cat", "a big cat and a cat"], num_images_per_prompt=2)
    assert probe.log[:4] == [("cond", 0, {"cat": (2,)}), ("cond", 1, {"cat": (2,)}), ("cond", 2, {"cat": (3, 6)}), ("cond", 3, {"cat": (3, 6)})]
    assert probe.log[-1] == ("text_len", 77)


def test_sdxl_prompt_2_positions_are_shared_union():
    pipe = make_tiny_pipeline("tiny-sdxl")
    probe = WordProbe(words=("cat", "dog"))
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sdxl", prompt="a cat", prompt_2="a big dog")
    assert probe.log[0] == ("cond", 0, {"cat": (2,), "dog": (3,)})


def test_sd3_t5_span_follows_clip_span():
    pipe = make_tiny_pipeline("tiny-sd3")
    probe = WordProbe(words=("cat",))
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd3", prompt="a red cat", max_sequence_length=16)
    assert probe.log[0] == ("cond", 0, {"cat": (3, 77 + 2)})
    assert probe.log[-1] == ("text_len", 77 + 16)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-pixart"])
def test_t5_only_families(name):
    pipe = make_tiny_pipeline(name)
    probe = WordProbe(words=(MULTI_TOKEN_WORD, "cat"), uncond=name == "tiny-pixart")
    with attnctl.apply(pipe, [probe]):
        generate(pipe, name, prompt=f"a {MULTI_TOKEN_WORD} cat", negative_prompt=f"{MULTI_TOKEN_WORD} cat")
    positions = probe.log[0][2]
    assert len(positions[MULTI_TOKEN_WORD]) > 1 and positions["cat"] == (positions[MULTI_TOKEN_WORD][-1] + 1,)
    if name == "tiny-pixart":
        assert probe.log[1][0] == "uncond" and probe.log[1][2]["cat"] == (positions["cat"][0] - 1,)


def test_flux_true_cfg_negative_words():
    pipe = make_tiny_pipeline("tiny-flux")
    probe = WordProbe(words=("dog",), uncond=True)
    with attnctl.apply(pipe, [probe]):
        with pytest.raises(TokenError, match="'dog' is not in the cond prompt"):
            generate(pipe, "tiny-flux", prompt="a cat", negative_prompt="a dog", true_cfg_scale=2.0)


def test_prompt_embeds_and_long_prompts_raise_clearly():
    pipe = make_tiny_pipeline("tiny-sd")
    embeds, negative = pipe.encode_prompt("a cat", "cpu", 1, True)
    with attnctl.apply(pipe, [WordProbe(words=("cat",))]):
        with pytest.raises(TokenError, match="prompt_embeds"):
            generate(pipe, "tiny-sd", prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
        generate(pipe, "tiny-sd", prompt=" ".join(["cat"] * 90))  # truncated by the pipeline; "cat" is inside
        with pytest.raises(TokenError, match="the limit is 77"):  # only past the limit: cannot be controlled
            generate(pipe, "tiny-sd", prompt=" ".join(["dog"] * 90) + " cat")



def test_missing_word_fails_before_the_first_step_runs():
    pipe = make_tiny_pipeline("tiny-sd")
    calls = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda *a: calls.append(1))  # the denoiser's first layer
    with attnctl.apply(pipe, [WordProbe(words=("dog",))]):
        with pytest.raises(TokenError, match="'dog' is not in the cond prompt of row 1"):
            generate(pipe, "tiny-sd", prompt=["a dog", "a cat"])
    assert calls == []  # attnctl's entry into the denoiser failed before any layer ran


def _positions(tokenizer, text, word):
    """Positions of `word` (one token here) in `text` as `tokenizer` encodes it, by token ids."""
    ids = tokenizer(text)["input_ids"]
    target = tokenizer(word, add_special_tokens=False)["input_ids"]
    return tuple(i for i in range(len(ids)) if ids[i : i + len(target)] == target)


def test_words_are_found_in_the_text_the_pipeline_encodes_textual_inversion():
    """A multi-vector textual-inversion token expands to several tokens in the prompt the text encoder sees;
    the positions of the words after it (and of its own vectors) follow that expansion."""
    import torch

    pipe = make_tiny_pipeline("tiny-sd")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion({"<toy>": torch.randn(3, width)}, token="<toy>")
    prompt = "a <toy> next to a red cat"
    encoded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert encoded == "a <toy> <toy>_1 <toy>_2 next to a red cat"
    probe = WordProbe(words=("cat", "<toy>"), uncond=True)
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", prompt=prompt, negative_prompt="a <toy> cat")
    cond = probe.log[0][2]
    assert cond["cat"] == _positions(pipe.tokenizer, encoded, "cat") != _positions(pipe.tokenizer, prompt, "cat")
    assert cond["<toy>"] == (2, 3, 4)  # every vector of the token
    assert probe.log[1] == ("uncond", 0, {"cat": (5,), "<toy>": (2, 3, 4)})


def test_words_are_found_in_the_text_the_pipeline_encodes_pixart_preprocessing():
    """PixArt lower-cases (or, with clean_caption and its packages, cleans) the prompt before T5 sees it."""
    pipe = make_tiny_pipeline("tiny-pixart")
    seen = []
    original = pipe._text_preprocessing
    pipe._text_preprocessing = lambda text, clean_caption=False: seen.append(clean_caption) or original(text, clean_caption)
    prompt = "  A Photo of a CAT"
    probe = WordProbe(words=("cat", "photo"))
    try:
        with attnctl.apply(pipe, [probe]):
            generate(pipe, "tiny-pixart", prompt=prompt, clean_caption=True)
    finally:
        del pipe._text_preprocessing
    encoded = original(prompt, clean_caption=True)[0]
    assert encoded.startswith("a photo of a cat")  # lower-cased at least (cleaned when bs4 and ftfy are installed)
    assert probe.log[0][2]["cat"] == _positions(pipe.tokenizer, encoded, "cat") != _positions(pipe.tokenizer, prompt, "cat")
    assert probe.log[0][2]["photo"] == _positions(pipe.tokenizer, encoded, "photo")
    assert seen.count(True) >= 1  # attnctl asked the pipeline's own preprocessing, with the call's clean_caption


def test_a_word_truncated_onto_the_end_token_is_refused_end_to_end():
    """75 words and "cat" on CLIP: the pipeline's encoder gets the start token, the 75 words and its end token at 76,
    so "cat" is not in the prompt the model sees (Reweight({"cat": 0}) scaled the end token). On SD3 its T5 span
    (max_sequence_length 256) still holds it: only that position is "cat"."""
    pipe = make_tiny_pipeline("tiny-sd")
    prompt = " ".join(["red"] * 75) + " cat"
    encoded = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]  # as the pipeline
    assert pipe.tokenizer.convert_tokens_to_ids("cat</w>") not in encoded
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 0.0})]):
        with pytest.raises(TokenError, match="limit is 77"):
            generate(pipe, "tiny-sd", prompt=prompt)
    sd3 = make_tiny_pipeline("tiny-sd3")
    probe = WordProbe(words=("cat",))
    with attnctl.apply(sd3, [probe]):
        generate(sd3, "tiny-sd3", prompt=prompt, max_sequence_length=256)
    t5 = sd3.tokenizer_3(prompt, padding="max_length", max_length=256, truncation=True)["input_ids"]
    cat = sd3.tokenizer_3("cat", add_special_tokens=False)["input_ids"]
    assert probe.log[0] == ("cond", 0, {"cat": tuple(77 + i for i in range(len(t5)) if t5[i : i + len(cat)] == cat)})
