"""Reweight (Prompt-to-Prompt reweighting): identities, the eager reference, words, rows, schedules, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import attnctl
from attnctl import ConfigError, Reweight, SelectionError, TokenError
from attnctl.control import Control
from attnctl.testing import MULTI_TOKEN_WORD, TINY_MODELS, make_tiny_pipeline

from .helpers import generate
from .reference_attention import PipelineMask, Spy, eager_call, layout, reference_for, text_positions, word_weights

PROMPT = "a red cat on the street"
TOL = {"rtol": 1e-4, "atol": 1e-4}
# The random tiny PixArt's latents grow to |x| ~ 160 through its learned-sigma DPM-Solver steps, which amplify
# float32-vs-float64 rounding to ~3e-4 absolute; the reweighting moves them by ~5 on average (max ~23). A tolerance
# relative to |x| would allow 0.02 (TOL) or 0.16 (the former 1e-3) there: an absolute one instead, ~4e-3 at |x| = 160,
# 6x the rounding and >1000x below the effect.
PIXART_TOL = {"rtol": 1e-5, "atol": 2e-3}


def _bound(handle):
    return handle.runtime.last_call.bound[0]


# -- identities -----------------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("name", TINY_MODELS)
def test_weight_one_is_bitwise_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, prompt=PROMPT)
    controls = [
        Reweight({"red": 1.0, "cat": 1}),
        Reweight({"red": (1.0, 1.0)}, normalize=True),
        Reweight({"red": lambda f: 1.0}),
        Reweight({"red": 3.0}, steps=(0.99, 1.0)),  # 2 steps: no step inside the window
    ]
    for control in controls:
        with attnctl.apply(pipe, [control]):
            assert torch.equal(generate(pipe, name, prompt=PROMPT), stock), control


# -- against the eager reference ----------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("normalize", [False, True], ids=["p2p", "normalize"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_matches_eager_reference(name, normalize, tiny_cache):
    pipe = tiny_cache(name)
    table = {"red": 2.5, "street": 0.0, "cat": 0.5}
    stock = generate(pipe, name, prompt=PROMPT)
    with attnctl.apply(pipe, [Reweight(table, normalize=normalize)]):
        ours = generate(pipe, name, prompt=PROMPT)
    with PipelineMask(pipe, name) as padding:  # the model's mask from the pipeline, not from attnctl's spec
        with attnctl.apply(pipe, [reference_for(name, word_weights(pipe, name, [PROMPT], table), normalize, padding=padding)]):
            expected = generate(pipe, name, prompt=PROMPT)
    assert padding.calls == (2 if name == "tiny-pixart" else 0)  # PixArt pads its text and passes the mask
    assert not torch.allclose(expected, stock, **TOL)  # the reference does change the output
    if name == "tiny-pixart":
        assert (expected - stock).abs().mean() > 1000 * PIXART_TOL["atol"]  # measured: 5.1
    torch.testing.assert_close(ours, expected, **(PIXART_TOL if name == "tiny-pixart" else TOL))


@pytest.mark.parametrize("normalize", [False, True], ids=["p2p", "normalize"])
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_each_attention_call_matches_the_formula(name, normalize, tiny_cache):
    """Layer by layer: cond rows' image queries reweighted, uncond rows and text queries exactly plain attention."""
    pipe = tiny_cache(name)
    table = {"red": 3.0, "street": 0.0}
    with PipelineMask(pipe, name) as padding:
        spy = Spy(padding=padding)
        with attnctl.apply(pipe, [Reweight(table, normalize=normalize), spy]):
            generate(pipe, name, prompt=PROMPT)
    weights = word_weights(pipe, name, [PROMPT], table)
    layers = {record["layer"].name for record in spy.log}
    assert len(spy.log) == 2 * len(layers) and layers
    assert all((record["model_mask"] is not None) == (name == "tiny-pixart") for record in spy.log)
    for record in spy.log:
        expected = eager_call(name, record, weights, normalize)
        torch.testing.assert_close(record["out"].double(), expected, rtol=1e-5, atol=1e-6)
        plain = eager_call(name, record, lambda *a: {}, normalize)
        _, image_rows, text_rows = layout(name, record["q"].shape[2], record["k"].shape[2])
        uncond = [i for i, row in enumerate(record["rows"].rows) if row.branch == "uncond"]
        cond = [i for i, row in enumerate(record["rows"].rows) if row.branch == "cond"]
        torch.testing.assert_close(record["out"][uncond].double(), plain[uncond], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(record["out"][:, :, text_rows].double(), plain[:, :, text_rows], rtol=1e-5, atol=1e-6)
        assert (record["out"][cond][:, :, image_rows].double() - plain[cond][:, :, image_rows]).abs().max() > 1e-3


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_reference_backend_matches_eager_reference(name, tiny_cache):
    """The eager backend carries out the same edit (value scale / -inf key bias with a query range)."""
    pipe = tiny_cache(name)
    for normalize in (False, True):
        table = {"red": 0.0, "cat": 2.0}
        with attnctl.apply(pipe, [Reweight(table, normalize=normalize)], backend="reference"):
            ours = generate(pipe, name, prompt=PROMPT)
        with attnctl.apply(pipe, [reference_for(name, word_weights(pipe, name, [PROMPT], table), normalize)], backend="reference"):
            expected = generate(pipe, name, prompt=PROMPT)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_word_split_into_several_tokens_weights_all_of_them(name, tiny_cache):
    pipe = tiny_cache(name)
    prompt = f"a {MULTI_TOKEN_WORD} cat"
    expected_positions = text_positions(pipe, name, prompt, MULTI_TOKEN_WORD)
    clip_positions = [p for p in expected_positions if p < 77] if name != "tiny-flux" else expected_positions
    assert len(clip_positions) > 1
    with attnctl.apply(pipe, [Reweight({MULTI_TOKEN_WORD: 3.0})]) as handle:
        ours = generate(pipe, name, prompt=prompt)
        weights = _bound(handle).weights_at(0)[0]
    assert (weights == 3.0).nonzero().flatten().tolist() == expected_positions
    assert int((weights != 1.0).sum()) == len(expected_positions)
    with attnctl.apply(pipe, [reference_for(name, word_weights(pipe, name, [prompt], {MULTI_TOKEN_WORD: 3.0}))]):
        expected = generate(pipe, name, prompt=prompt)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_per_row_prompts_and_images_per_prompt(name, tiny_cache):
    """Positions are resolved per prompt row: "red" sits at different positions in the two prompts."""
    pipe = tiny_cache(name)
    prompts = ["a red cat", "a photo of a red car"]
    with attnctl.apply(pipe, [Reweight({"red": 3.0, "a": 0.5})]) as handle:
        ours = generate(pipe, name, prompt=prompts, num_images_per_prompt=2)
        rows = _bound(handle).weights_at(0)
    assert rows.shape[0] == 4 and torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
    reference = reference_for(name, word_weights(pipe, name, prompts, {"red": 3.0, "a": 0.5}, per_prompt=2))
    with attnctl.apply(pipe, [reference]):
        expected = generate(pipe, name, prompt=prompts, num_images_per_prompt=2)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parity
def test_one_table_per_prompt(tiny_cache):
    name = "tiny-sd"
    pipe = tiny_cache(name)
    prompts = ["a red cat", "a photo of a blue car"]
    per_prompt = [{"cat": 0.0}, {"blue": 2.0, "car": 1.5}]
    with attnctl.apply(pipe, [Reweight(per_prompt)]):
        ours = generate(pipe, name, prompt=prompts, num_images_per_prompt=2)
    first = word_weights(pipe, name, prompts[:1], per_prompt[0], per_prompt=2)
    second = word_weights(pipe, name, prompts[1:], per_prompt[1], per_prompt=2)

    def weights(branch, row, step):
        return (first(branch, row, step) if row < 2 else second(branch, row - 2, step)) if branch == "cond" else {}

    with attnctl.apply(pipe, [reference_for(name, weights)]):
        expected = generate(pipe, name, prompt=prompts, num_images_per_prompt=2)
    torch.testing.assert_close(ours, expected, **TOL)
    with attnctl.apply(pipe, [Reweight(per_prompt)]):
        with pytest.raises(ConfigError, match="weights for 2 prompts"):
            generate(pipe, name, prompt=["a red cat", "a blue car", "a cat"])
        # a count that divides the rows but is not the number of prompts: one prompt x 2 images, 2 prompts x 2 images
        with pytest.raises(ConfigError, match="weights for 2 prompts, but the call has 1 prompt\\(s\\) x 2 image"):
            generate(pipe, name, prompt="a red cat", num_images_per_prompt=2)
    with attnctl.apply(pipe, [Reweight([{"red": 2.0}, {"cat": 0.5}, {"red": 0.5}, {"cat": 2.0}])]):
        with pytest.raises(ConfigError, match="weights for 4 prompts, but the call has 2 prompt\\(s\\) x 2 image"):
            generate(pipe, name, prompt=["a red cat", "a red cat"], num_images_per_prompt=2)


@pytest.mark.parity
@pytest.mark.parametrize(
    "branch, negative",
    [("uncond", "a blurry dark street"), ("both", "a red blurry street")],
)
def test_negative_prompt_branches(branch, negative, tiny_cache):
    name = "tiny-sd"
    pipe = tiny_cache(name)
    table = {"street": 0.2, "red": 2.0} if branch == "both" else {"blurry": 3.0, "dark": 0.0}
    with attnctl.apply(pipe, [Reweight(table, branch=branch)]):
        ours = generate(pipe, name, prompt=PROMPT, negative_prompt=negative)
    cond = word_weights(pipe, name, [PROMPT], table) if branch == "both" else (lambda *a: {})
    uncond = word_weights(pipe, name, [negative], table)

    def weights(row_branch, row, step):
        return cond(row_branch, row, step) if row_branch == "cond" else uncond("cond", row, step)

    with attnctl.apply(pipe, [reference_for(name, weights)]):
        expected = generate(pipe, name, prompt=PROMPT, negative_prompt=negative)
    torch.testing.assert_close(ours, expected, **TOL)
    with attnctl.apply(pipe, [Reweight({"cat": 2.0}, branch="uncond")]):
        with pytest.raises(TokenError, match="uncond prompt of row 0"):
            generate(pipe, name, prompt=PROMPT, negative_prompt=negative)


@pytest.mark.parity
def test_flux_true_cfg_reweights_the_cond_call_only(tiny_cache):
    name = "tiny-flux"
    pipe = tiny_cache(name)
    extra = {"negative_prompt": "a blurry dog", "true_cfg_scale": 3.0}
    with attnctl.apply(pipe, [Reweight({"red": 3.0})]):
        ours = generate(pipe, name, prompt=PROMPT, **extra)
    with attnctl.apply(pipe, [reference_for(name, word_weights(pipe, name, [PROMPT], {"red": 3.0}))]):
        expected = generate(pipe, name, prompt=PROMPT, **extra)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parity
def test_flux_true_cfg_uncond_branch_reweights_the_negative_call(tiny_cache):
    name = "tiny-flux"
    pipe = tiny_cache(name)
    negative = "a blurry dog"
    extra = {"negative_prompt": negative, "true_cfg_scale": 3.0}
    with attnctl.apply(pipe, [Reweight({"blurry": 0.0, "dog": 2.0}, branch="uncond")]):
        ours = generate(pipe, name, prompt=PROMPT, **extra)
    uncond = word_weights(pipe, name, [negative], {"blurry": 0.0, "dog": 2.0})

    def weights(branch, row, step):
        return uncond("cond", row, step) if branch == "uncond" else {}

    with attnctl.apply(pipe, [reference_for(name, weights)]):
        expected = generate(pipe, name, prompt=PROMPT, **extra)
    torch.testing.assert_close(ours, expected, **TOL)
    # without true CFG there is no negative call: nothing to reweight, bitwise stock
    stock = generate(pipe, name, prompt=PROMPT)
    with attnctl.apply(pipe, [Reweight({"blurry": 0.0}, branch="uncond")]):
        assert torch.equal(generate(pipe, name, prompt=PROMPT), stock)


def test_uncond_branch_without_cfg_is_idle_even_for_a_word_of_no_prompt(tiny_cache):
    """Without CFG there are no uncond rows: the words are not looked up in a negative prompt the call does not use
    (a TokenError named the empty uncond prompt); the control is idle, warned, bitwise stock."""
    name = "tiny-sd"
    pipe = tiny_cache(name)
    stock = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    with attnctl.apply(pipe, [Reweight({"red": 2.0}, branch="uncond")]):
        with pytest.warns(attnctl.IdleControlWarning, match="branch='uncond'"):
            assert torch.equal(generate(pipe, name, prompt=PROMPT, guidance=1.0), stock)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-qwenimage"])
def test_true_cfg_with_negative_prompt_embeds_has_uncond_rows(name, tiny_cache):
    """Flux / Qwen-Image with true CFG and `negative_prompt_embeds` (no negative text) run an uncond call (diffusers'
    do_true_cfg): an uncond Reweight by position acts on it, exactly as with the negative prompt as text; by word it is
    refused, naming the embeddings. It was idle, warned "this call has none (no classifier-free guidance)"."""
    from attnctl.testing.new_families import available

    if name != "tiny-flux" and not available(name):
        pytest.skip(f"{name} needs a newer diffusers")
    pipe = tiny_cache(name)
    negative = "a blurry dark street"
    encoded = pipe.encode_prompt(negative, device="cpu", max_sequence_length=32) if name == "tiny-flux" else pipe.encode_prompt(negative, device="cpu")
    if name == "tiny-flux":
        as_embeds = {"negative_prompt_embeds": encoded[0], "negative_pooled_prompt_embeds": encoded[1], "true_cfg_scale": 3.0}
    else:
        as_embeds = {"negative_prompt": None, "negative_prompt_embeds": encoded[0], "negative_prompt_embeds_mask": encoded[1], "true_cfg_scale": 3.0}
    as_text = {"negative_prompt": negative, "true_cfg_scale": 3.0}
    stock = generate(pipe, name, prompt=PROMPT, **as_embeds)
    weights = Reweight({1: 0.0, 2: 4.0}, branch="uncond")
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        with attnctl.apply(pipe, [weights]):
            by_embeds = generate(pipe, name, prompt=PROMPT, **as_embeds)
            by_text = generate(pipe, name, prompt=PROMPT, **as_text)
    assert not torch.equal(by_embeds, stock)
    torch.testing.assert_close(by_embeds, by_text, rtol=1e-5, atol=1e-5)
    for branch in ("uncond", "both"):
        with attnctl.apply(pipe, [Reweight({"street": 0.0}, branch=branch)]):
            with pytest.raises(TokenError, match="negative prompt came as embeddings \\(negative_prompt_embeds\\)"):
                generate(pipe, name, prompt=PROMPT, **as_embeds)


def test_batched_cfg_negative_prompt_embeds_are_named_not_an_empty_prompt(tiny_cache):
    """A text prompt with `negative_prompt_embeds`: an uncond word is refused naming the embeddings (it named a
    prompt '' the user never passed); positions act on the uncond rows."""
    pipe = tiny_cache("tiny-sd")
    _, negative = pipe.encode_prompt("a blurry street", "cpu", 1, True, negative_prompt="a blurry street")
    with attnctl.apply(pipe, [Reweight({"blurry": 0.0}, branch="uncond")]):
        with pytest.raises(TokenError, match="negative prompt came as embeddings \\(negative_prompt_embeds\\)") as info:
            generate(pipe, "tiny-sd", prompt=PROMPT, negative_prompt_embeds=negative)
    assert "''" not in str(info.value)
    with attnctl.apply(pipe, [Reweight({2: 0.0}, branch="uncond")]):
        by_embeds = generate(pipe, "tiny-sd", prompt=PROMPT, negative_prompt_embeds=negative)
    with attnctl.apply(pipe, [Reweight({"blurry": 0.0}, branch="uncond")]):
        by_word = generate(pipe, "tiny-sd", prompt=PROMPT, negative_prompt="a blurry street")
    torch.testing.assert_close(by_embeds, by_word, rtol=1e-5, atol=1e-5)  # "blurry" is token 2


def test_prompt_embeds_with_a_negative_prompt_as_text_keep_its_words(tiny_cache):
    """`prompt_embeds` with `negative_prompt` as text: diffusers encodes the negative text, so its words are found (they
    were refused: the cond rows' embeddings hid the negative prompt's text)."""
    pipe = tiny_cache("tiny-sd")
    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds, "negative_prompt": "a blurry street"}
    with attnctl.apply(pipe, [Reweight({"blurry": 0.0}, branch="uncond")]):
        by_word = generate(pipe, "tiny-sd", prompt=None, **kwargs)
    with attnctl.apply(pipe, [Reweight({2: 0.0}, branch="uncond")]):  # "blurry" is token 2
        by_position = generate(pipe, "tiny-sd", prompt=None, **kwargs)
    assert torch.equal(by_word, by_position) and not torch.equal(by_word, generate(pipe, "tiny-sd", prompt=None, **kwargs))


def test_sdxl_zeroed_negative_prompt_has_no_words(tiny_cache):
    """SDXL with `negative_prompt_2` and no `negative_prompt`, `force_zeros_for_empty_prompt=True` (SDXL base): diffusers
    zeroes the negative embeddings (`zero_out_negative_prompt`), so the uncond rows have no text. An uncond word was
    looked up in negative_prompt_2 and the Reweight was silently a no-op; now it is refused naming the cause."""
    pipe = tiny_cache("tiny-sdxl")
    assert pipe.config.force_zeros_for_empty_prompt
    _, negative, _, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt_2="a blurry dark street")
    assert not negative.any()  # diffusers' own truth: no negative text reaches the denoiser
    with attnctl.apply(pipe, [Reweight({"blurry": 0.0}, branch="uncond")]):
        with pytest.raises(TokenError, match="force_zeros_for_empty_prompt"):
            generate(pipe, "tiny-sdxl", prompt=PROMPT, negative_prompt_2="a blurry dark street")
        generate(pipe, "tiny-sdxl", prompt=PROMPT, negative_prompt="a blurry street")  # with negative_prompt: text


@pytest.mark.parity
def test_perturbed_rows_count_as_cond_rows(tiny_cache):
    from .test_guidance_wrapper import ConstantGuidance

    name = "tiny-sd"
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, [Reweight({"red": 3.0}), ConstantGuidance(value=0.0)]):
        ours = generate(pipe, name, prompt=PROMPT)
    reference = reference_for(name, word_weights(pipe, name, [PROMPT], {"red": 3.0}))
    with attnctl.apply(pipe, [reference, ConstantGuidance(value=0.0)]):
        expected = generate(pipe, name, prompt=PROMPT)
    torch.testing.assert_close(ours, expected, **TOL)


# -- schedules ----------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_schedules_ramp_callable_and_window(tiny_cache):
    name = "tiny-sd"
    pipe = tiny_cache(name)
    control = Reweight({"red": (0.0, 3.0), "cat": lambda f: 2.0 if f < 0.5 else 1.0, "street": (1.0, 3.0)}, steps=(0.0, 1.0))
    with attnctl.apply(pipe, [control]) as handle:
        ours = generate(pipe, name, prompt=PROMPT, steps=4)
        bound = _bound(handle)
    red, cat, street = (text_positions(pipe, name, PROMPT, w)[0] for w in ("red", "cat", "street"))
    assert [float(bound.weights_at(i)[0, red]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert [float(bound.weights_at(i)[0, cat]) for i in range(4)] == [2.0, 2.0, 1.0, 1.0]

    def weights(branch, row, step):
        if branch != "cond":
            return {}
        return {red: step * 1.0, cat: 2.0 if step < 2 else 1.0, street: 1.0 + 2.0 * step / 3}

    with attnctl.apply(pipe, [reference_for(name, weights)]):
        expected = generate(pipe, name, prompt=PROMPT, steps=4)
    torch.testing.assert_close(ours, expected, **TOL)

    # a ramp spans the steps the control acts on; outside the window nothing changes
    with attnctl.apply(pipe, [Reweight({"red": (1.0, 3.0)}, steps=(0.5, 1.0))]) as handle:
        ours = generate(pipe, name, prompt=PROMPT, steps=4)
        bound = _bound(handle)
    assert bound.weights_at(0) is None and bound.weights_at(1) is None
    assert [float(bound.weights_at(i)[0, red]) for i in (2, 3)] == [1.0, 3.0]

    def windowed(branch, row, step):
        return {red: 1.0 + (step - 2) * 2.0} if branch == "cond" and step >= 2 else {}

    with attnctl.apply(pipe, [reference_for(name, windowed)]):
        expected = generate(pipe, name, prompt=PROMPT, steps=4)
    torch.testing.assert_close(ours, expected, **TOL)


def test_bad_schedule_values_raise_at_the_first_denoiser_call(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    for factor, match in ((lambda f: -1.0, ">= 0"), (lambda f: float("nan"), "finite"), (lambda f: "x", "number"),
                          (lambda f: 1 / 0, "ZeroDivisionError")):
        with attnctl.apply(pipe, [Reweight({"red": factor})]):
            with pytest.raises(ConfigError, match=match):
                generate(pipe, "tiny-sd", prompt=PROMPT)


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_missing_word_raises_before_anything_is_computed(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, prompt=PROMPT)
    calls = []
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    hook = denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        with attnctl.apply(pipe, [Reweight({"dog": 2.0})]):
            with pytest.raises(TokenError, match="'dog' is not in the cond prompt of row 0"):
                generate(pipe, name, prompt=PROMPT)
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(generate(pipe, name, prompt=PROMPT), stock)


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"red": -1.0}, ">= 0"),
        ({"red": float("nan")}, "finite"),
        ({"red": float("inf")}, "finite"),
        ({"red": True}, "number"),
        ({"red": "2"}, "number"),
        ({"red": (1.0, -2.0)}, ">= 0"),
        ({"red": (1.0, 2.0, 3.0)}, "start, end"),
        ({"": 2.0}, "empty word"),
        ({-3: 2.0}, "position must be >= 0"),
        ([("red", 1.0), ("red", 2.0)], "given twice"),
        ("red", "must be a mapping"),
        ([{"word": "red", "position": 3, "weight": 1.0}], "exactly one of"),
    ],
)
def test_bad_weights_raise_config_error(weights, match):
    with pytest.raises(ConfigError, match=match):
        Reweight(weights)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"word": "cat", "weigth": 2.0}, r"weights\[0\]: unknown key 'weigth' in a weight entry .*; keys: word, occurrence, position, weight"),
        ({"word": "cat", "occurence": 1, "weight": 2.0}, "unknown key 'occurence' in a weight entry"),
        ({"position": [3], "wieght": 2.0}, "unknown key 'wieght' in a weight entry"),
        ({"word": "cat"}, "weight entry .* has no 'weight'"),
    ],
)
def test_a_misspelt_entry_key_is_named(entry, match):
    """A JSON entry with a misspelt key was taken for a per-prompt table of the words 'word' and 'weigth', and the
    error blamed the word: "weights[0]['word'] must be a number ..., got 'cat'"."""
    with pytest.raises(ConfigError, match=match):
        Control.from_dict({"type": "reweight", "weights": [entry]})
    with pytest.raises(ConfigError, match=match.replace(r"weights\[0\]", r"weights\[1\]\[0\]")):
        Reweight([[{"word": "red", "weight": 2.0}], [entry]])


def test_a_table_that_weights_the_words_word_and_position_stays_a_table():
    _, control = Reweight.from_prompt("a (word:1.5) in (position:2) and a (cat:1.2)")
    assert [(w.query, w.factor) for w in control.weights] == [("word", 1.5), ("position", 2.0), ("cat", 1.2)]
    assert [(w.query, w.factor) for w in Reweight({"word": 0.5, "weigth": 2.0}).weights] == [("word", 0.5), ("weigth", 2.0)]
    # factors as numpy scalars or 0-d tensors, accepted everywhere else, keep such a table a table
    numpy = pytest.importorskip("numpy")
    for factor in (numpy.float32(1.5), torch.tensor(1.5)):
        assert [(w.query, w.factor) for w in Reweight({"position": factor, "sky": (factor, 1.0)}).weights] == [
            ("position", 1.5), ("sky", (1.5, 1.0))]


def test_other_bad_options():
    with pytest.raises(ConfigError, match="branch must be one of"):
        Reweight({"red": 2.0}, branch="perturbed")
    with pytest.raises(ConfigError, match="normalize"):
        Reweight({"red": 2.0}, normalize=1)
    with pytest.raises(ConfigError, match="steps"):
        Reweight({"red": 2.0}, steps=(0.5, 0.2))
    pipe = make_tiny_pipeline("tiny-sd")
    with pytest.raises(SelectionError, match="no cross- or joint-attention layer"):
        attnctl.apply(pipe, [Reweight({"red": 2.0}, layers="self")])
    assert not any("forward" in vars(m) for m in (pipe.unet,))


def test_layer_selection_keeps_text_layers(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [Reweight({"red": 2.0}, layers="down")]) as handle:
        layers = handle.runtime.resolved[0]
    assert [layer.name for layer in layers] == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]


def test_prompt_embeds_need_positions(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    with attnctl.apply(pipe, [Reweight({"red": 2.0})]):
        with pytest.raises(TokenError, match="prompt_embeds"):
            generate(pipe, "tiny-sd", prompt=None, **kwargs)
    with attnctl.apply(pipe, [Reweight({2: 2.0})]):
        by_position = generate(pipe, "tiny-sd", prompt=None, **kwargs)
    with attnctl.apply(pipe, [Reweight({"red": 2.0})]):
        by_word = generate(pipe, "tiny-sd", prompt=PROMPT)
    torch.testing.assert_close(by_position, by_word, rtol=1e-5, atol=1e-5)  # "red" is token 2


def test_normalize_refuses_to_mute_every_text_key(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [Reweight({p: 0.0 for p in range(77)}, normalize=True)]):
        with pytest.raises(ConfigError, match="no key left"):
            generate(pipe, "tiny-sd", prompt=PROMPT)


# -- serialisation -------------------------------------------------------------------------------------------
def test_to_dict_round_trip():
    controls = [
        Reweight({"red": 1.5, ("cat", 1): (0.5, 2.0), 5: 0, "blue car": 2}, normalize=True, layers=("down", "up"), steps=(0.1, 0.9)),
        Reweight([{"red": 2.0}, {}, {("dog", 0): 0.0}], branch="both"),
    ]
    for control in controls:
        data = json.loads(json.dumps(control.to_dict()))
        assert data["type"] == "reweight"
        again = Control.from_dict(data)
        assert again == control and again.to_dict() == control.to_dict()
    assert controls[0].to_dict()["weights"][1] == {"word": "cat", "occurrence": 1, "weight": [0.5, 2.0]}
    assert controls[0].to_dict()["weights"][2] == {"position": 5, "weight": 0.0}
    with pytest.raises(ConfigError, match="cannot be serialised"):
        Reweight({"red": lambda f: 2.0}).to_dict()
    # the readable hand-written forms are accepted too
    assert Control.from_dict({"type": "reweight", "weights": {"red": 2}}) == Reweight({"red": 2.0})
    assert Reweight([["red", 2], [["cat", 1], [1, 3]]]) == Reweight({"red": 2.0, ("cat", 1): (1.0, 3.0)})


@pytest.mark.parametrize("weights", [{}, [], [{}], [{}, {}]])
def test_empty_weights_are_refused(weights):
    with pytest.raises(ConfigError, match="empty"):
        Reweight(weights)
    with pytest.raises(ConfigError, match="empty"):
        Control.from_dict({"type": "reweight", "weights": weights})


def test_from_prompt_without_syntax_is_refused():
    with pytest.raises(ConfigError, match="no weighting syntax"):
        Reweight.from_prompt("a red car")
    with pytest.raises(ConfigError, match="no weighting syntax"):
        Reweight.from_prompt(["a red car", "a dog"])


def test_from_prompt():
    clean, control = Reweight.from_prompt("a (red:1.6) car, (blurry:0)", normalize=True)
    assert clean == "a red car, blurry"
    assert control == Reweight({"red": 1.6, "blurry": 0.0}, normalize=True)
    clean, control = Reweight.from_prompt(["a (red) car", "a [dog]"])
    assert clean == ["a red car", "a dog"] and control.per_prompt
