"""Reference-image tokens in the sequence (issue #19): Flux.2 klein's `image=` appends the encoded reference images'
tokens after the generated image's. They are keys for every query, as stock; controls edit the generated image's
grid only (their per-key edits leave the reference keys unchanged, the reference queries attend as stock), and a
control whose effects are not defined over them is refused at the call with the reason.
"""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.testing import CALL_DEFAULTS
from attnctl.testing.new_families import available

from .helpers import Probe
from .reference_attention import RefQwenPAG, Spy
from .test_families_new import IMAGE_TOKENS, _as_encoded, _t5_positions

pytestmark = pytest.mark.skipif(not available("tiny-flux2"), reason="tiny-flux2 needs diffusers >= 0.42 with Flux2KleinPipeline")

NAME = "tiny-flux2"
PROMPT = "a red cat on the street"


@pytest.fixture(scope="module")
def pipe():
    from attnctl.testing import make_tiny_pipeline

    return make_tiny_pipeline(NAME)


@pytest.fixture(scope="module")
def reference():
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))  # the Flux.2 image processor wants >= 64 px
    image.paste((20, 40, 220), (0, 32, 64, 64))
    return image


def generate(pipe, image, prompt=PROMPT, guidance: float = 4.0, steps: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, image=image, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=generator, **CALL_DEFAULTS[NAME]).images


class RefFlux2Double:
    """Flux.2's double-stream attention written out densely over `[text; image; references]` (qk-norms, RoPE on the
    joint sequence), with `change(logits, text)` giving the probabilities: the reference for a control on this layer."""

    def __init__(self, change):
        self.change = change

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        def split(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        text = eq.shape[1]
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
        probs = self.change(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, text)
        out = (probs @ v).to(hidden_states.dtype).transpose(1, 2).flatten(2, 3)
        context, image = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(context)


def _with_processor(pipe, processor, run):
    layer = pipe.transformer.transformer_blocks[0].attn
    original = layer.processor
    layer.set_processor(processor)
    try:
        return run()
    finally:
        layer.set_processor(original)


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_reference_images_keep_apply_and_remove_bitwise_stock(pipe, reference, guidance):
    stock = generate(pipe, reference, guidance=guidance)
    seen = []

    class Grid(Probe):
        def bind(self, context):
            seen.append((context.canvas, context.geometry(context.adapter.layers[0])))
            return super().bind(context)

    probe = Grid()
    with attnctl.apply(pipe, [probe]):
        controlled = generate(pipe, reference, guidance=guidance)
    assert torch.equal(stock, controlled)
    assert torch.equal(generate(pipe, reference, guidance=guidance), stock)
    canvas, geometry = seen[0]
    references = canvas.reference_len
    assert references > 0 and canvas.token_hw == (8, 8)  # the generated image's grid, not the references'
    assert geometry.image_len == IMAGE_TOKENS and geometry.key_len == geometry.query_len + references
    with attnctl.apply(pipe, []):  # and without a control: the processors' stock path
        assert torch.equal(generate(pipe, reference, guidance=guidance), stock)


def test_reference_images_read_the_ids_on_the_host_once_per_call_not_per_denoiser_call(pipe, reference):
    """The generated grid comes from the call's size; the img_ids are read (to check the layout) at the first
    denoiser call only, so the host reads attnctl adds do not grow with the steps."""
    from attnctl.testing.counters import CostCounter

    def added_syncs(steps):
        counts = []
        for controlled in (False, True):
            handle = attnctl.apply(pipe, []) if controlled else None
            generate(pipe, reference, steps=steps)  # warm
            with CostCounter() as counter:
                generate(pipe, reference, steps=steps)
            if handle is not None:
                handle.remove()
            counts.append(counter.syncs)
        return counts[1] - counts[0]

    assert added_syncs(1) == added_syncs(4) <= 4


def test_reference_tokens_from_the_call_size_agree_with_the_ids_and_interleaving_is_refused(pipe):
    """The size-derived canvas (every denoiser call) is the ids-derived one (read once per call to check it); ids
    that interleave reference tokens with the generated image's are refused."""
    from attnctl.errors import CallLayoutError
    from attnctl.families.adapters_new import Flux2Adapter

    adapter = Flux2Adapter.discover(pipe.transformer)
    rows, cols, references = 2, 2, 3
    grid = torch.tensor([[0, y, x, 0] for y in range(rows) for x in range(cols)])
    refs = torch.tensor([[10, 0, x, 0] for x in range(references)])
    inputs = {"hidden_states": torch.zeros(1, rows * cols + references, 8), "encoder_hidden_states": torch.zeros(1, 5, 8)}
    pixels = (rows * 2 * pipe.vae_scale_factor, cols * 2 * pipe.vae_scale_factor)
    laid_out = {**inputs, "img_ids": torch.cat([grid, refs])}
    from_size = adapter.canvas_for_call(laid_out, pixels, pipe.vae_scale_factor)
    assert from_size == adapter.canvas(laid_out)
    assert from_size.token_hw == (rows, cols) and from_size.reference_len == references
    with pytest.raises(CallLayoutError, match="interleave"):
        adapter.canvas({**inputs, "img_ids": torch.cat([grid[:2], refs, grid[2:]])})


def test_reweight_edits_the_generated_queries_over_the_text_only(pipe, reference):
    """docs/methods.md "Reweight" (p2p): the generated image's queries see A * w over the weighted words' text keys; the
    reference keys are keys as stock (weight 1), text and reference queries keep plain attention. Against the stock
    pipeline with that attention written out densely in the double block (no CFG: every row is a cond row)."""
    table = {"red": 3.0, "street": 0.2}
    tokens = [p for word in table for p in _t5_positions(pipe.tokenizer, _as_encoded(pipe, NAME, PROMPT), word)]
    weights = {p: f for word, f in table.items() for p in _t5_positions(pipe.tokenizer, _as_encoded(pipe, NAME, PROMPT), word)}
    assert tokens
    stock = generate(pipe, reference, guidance=1.0)
    with attnctl.apply(pipe, [attnctl.Reweight(table, layers="double")]):
        got = generate(pipe, reference, guidance=1.0)

    def reweighted(logits, text):
        probs = torch.softmax(logits, -1)
        w = torch.ones(probs.shape[-1], dtype=probs.dtype)
        for position, factor in weights.items():
            w[position] = factor
        rows = slice(text, text + IMAGE_TOKENS)
        probs[:, :, rows] = probs[:, :, rows] * w
        return probs

    expected = _with_processor(pipe, RefFlux2Double(reweighted), lambda: generate(pipe, reference, guidance=1.0))
    assert (expected - stock).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
def test_pag_perturbs_the_generated_image_only(pipe, reference, guidance):
    """docs/methods.md "PAG" with reference tokens: in the perturbed rows a generated image query attends to itself and
    the text (not to the other image tokens, the references included); text and reference queries attend as stock.
    The prediction is stock + scale (cond - perturbed) at the first step."""
    from .test_families_new import record
    from .test_guidance import run_denoiser

    def perturbed_probs(logits, text):
        total = logits.shape[-1]
        mask = torch.zeros(total, total, dtype=torch.float64)
        image = torch.full((IMAGE_TOKENS, total - text), float("-inf"), dtype=torch.float64)
        image[:, :IMAGE_TOKENS].fill_diagonal_(0.0)
        mask[text : text + IMAGE_TOKENS, text:] = image
        return torch.softmax(logits + mask, -1)

    options = {"prompt": "a cat", "steps": 1, "guidance": guidance, "image": reference}
    stock, calls = record(pipe, NAME, **options)
    got, _ = record(pipe, NAME, [attnctl.PAG(scale=1.5)], **options)
    cond = run_denoiser(pipe, calls[0], [0], 1)
    perturbed = _with_processor(pipe, RefFlux2Double(perturbed_probs), lambda: run_denoiser(pipe, calls[0], [0], 1))
    assert (cond - perturbed).abs().max() > 1e-4
    tokens = got[0].shape[1]  # the pipeline keeps the generated image's tokens of the prediction
    torch.testing.assert_close(got[0], stock[0] + 1.5 * (cond - perturbed)[:, :tokens], rtol=1e-4, atol=1e-4)


def test_attention_maps_are_over_the_generated_grid_against_an_eager_reference(pipe, reference):
    """docs/methods.md "AttentionMaps": softmax over every key (the reference keys included), the generated image's
    queries only, mean over heads, summed over the word's tokens, layers and steps, on its 8x8 grid."""
    words = ("red", "cat", "street")
    spy = Spy(layers="joint")
    with attnctl.apply(pipe, [attnctl.AttentionMaps(words), spy]) as handle:
        generate(pipe, reference)
        result = handle.outputs["attention_maps"]
    expected = torch.zeros(1, len(words), 8, 8, dtype=torch.float64)
    text = _as_encoded(pipe, NAME, PROMPT)
    for entry in spy.log:
        q, k = entry["q"].double(), entry["k"].double()
        n_q = q.shape[2]
        assert k.shape[2] > n_q  # the reference keys
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)[:, :, n_q - IMAGE_TOKENS : n_q].sum(1)
        for i, row in enumerate(entry["rows"].rows):
            if row.branch != "cond":
                continue
            for w, word in enumerate(words):
                expected[row.prompt, w] += probs[i][:, _t5_positions(pipe.tokenizer, text, word)].sum(-1).reshape(8, 8)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: attnctl.Regions([attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0))]), "appended to the joint text"),
        (lambda: attnctl.FastAttn(threshold=10.0, window=1), "cache, window at transformer_blocks.0.attn"),
        (lambda: attnctl.SAG(scale=0.75), "second pass"),
    ],
    ids=["Regions", "FastAttn", "SAG"],
)
def test_controls_not_defined_over_reference_tokens_are_refused_at_the_call(pipe, reference, make, reason):
    stock = generate(pipe, reference)
    with attnctl.apply(pipe, [make()]):
        with pytest.raises(attnctl.UnsupportedError, match=reason):
            generate(pipe, reference)
        generate(pipe, None, steps=1)  # without reference images the control runs
    assert torch.equal(generate(pipe, reference), stock)


def test_a_control_idle_in_the_call_is_not_refused_over_reference_tokens(pipe, reference):
    """Regions idle at 2 steps (its window starts at 0.9) was warned idle and then refused for its needs, which it
    never uses in that call; an idle control with an undefined effect ran. Both run now, as stock."""
    stock = generate(pipe, reference)
    idle = attnctl.Regions([attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0))], steps=(0.9, 1.0))
    with attnctl.apply(pipe, [idle]), pytest.warns(attnctl.IdleControlWarning):
        assert torch.equal(generate(pipe, reference), stock)


# -- Qwen-Image Edit ----------------------------------------------------------------------------------------------

EDIT_OPTIONS = {"height": 256, "width": 192, "negative_prompt": " "}  # 8x6 latents at the fixture's factor 32: 4x3 tokens
EDIT_TOKENS = 12


@pytest.fixture(scope="module")
def edit_pipe():
    from attnctl.testing.new_families import tiny_qwenimage_edit

    pipe = tiny_qwenimage_edit()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit(pipe, image, cfg: float = 4.0, prompt=PROMPT, steps: int = 2):
    return pipe(image=image, prompt=prompt, true_cfg_scale=cfg, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **EDIT_OPTIONS).images


def _kept_positions(pipe, image, prompt: str, word: str) -> list[int]:
    """Where `word` sits in the embeddings QwenImageEditPipeline keeps: its own processor on its template and image,
    the prefix dropped (independent of attnctl's word placement)."""
    resized = pipe.image_processor.resize(image, 1024, 1024)  # the pipeline's ~1024^2 area for a square image
    ids = pipe.processor(text=[pipe.prompt_template_encode.format(prompt)], images=resized, padding=True,
                         return_tensors="pt")["input_ids"][0][pipe.prompt_template_encode_start_idx :]
    target = pipe.tokenizer.convert_tokens_to_ids("Ġ" + word)
    return [i for i, token in enumerate(ids.tolist()) if token == target]


@pytest.mark.parity
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
def test_qwen_edit_apply_and_remove_are_bitwise_stock(edit_pipe, reference, cfg):
    stock = edit(edit_pipe, reference, cfg)
    seen = []

    class Grid(Probe):
        def bind(self, context):
            seen.append(context.canvas)
            return super().bind(context)

    with attnctl.apply(edit_pipe, [Grid()]):
        assert torch.equal(edit(edit_pipe, reference, cfg), stock)
    with attnctl.apply(edit_pipe, []):
        assert torch.equal(edit(edit_pipe, reference, cfg), stock)
    assert torch.equal(edit(edit_pipe, reference, cfg), stock)
    assert seen[0].token_hw == (4, 3) and seen[0].reference_len == 16 * 16  # the 1024^2 reference at factor 32, 2x2 patches


def test_qwen_edit_reweight_against_the_formula_with_vision_tokens_first(edit_pipe, reference):
    """docs/methods.md "Reweight" on the edit pipeline: the weighted words sit after the reference image's vision
    tokens in the kept embeddings; the generated image's queries of the cond rows see A * w over every key (the
    reference keys at weight 1); the reference queries are not the controls' (stock attention)."""
    table = {"red": 3.0, "street": 0.0}
    weights = {p: f for word, f in table.items() for p in _kept_positions(edit_pipe, reference, PROMPT, word)}
    assert weights and min(weights) > 256  # after the 256 vision tokens
    spy = Spy(layers="joint")
    with attnctl.apply(edit_pipe, [attnctl.Reweight(table), spy]):
        edit(edit_pipe, reference)
    assert spy.log
    for entry in spy.log:
        q, k, v = (entry[x].double() for x in ("q", "k", "v"))
        n_q = q.shape[2]
        assert k.shape[2] == n_q + 256  # the reference keys after the layer's own
        text = n_q - EDIT_TOKENS
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = entry["mask"]
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
        probs = torch.softmax(logits, -1)
        w = torch.ones(q.shape[0], k.shape[2], dtype=torch.float64)
        for b, row in enumerate(entry["rows"].rows):
            if row.branch == "cond":
                for position, factor in weights.items():
                    w[b, position] = factor
        probs[:, :, text:] = probs[:, :, text:] * w[:, None, None, :]
        torch.testing.assert_close(entry["out"].double(), probs @ v, rtol=1e-5, atol=1e-6)


def test_qwen_edit_attention_maps_and_refused_regions(edit_pipe, reference):
    """AttentionMaps: softmax over every key (the reference keys included), the generated image's queries, head mean,
    the word's tokens after the vision tokens, summed over layers and steps, on the 4x3 grid. Regions: refused at the
    call (label masks are not defined over reference tokens)."""
    spy = Spy(layers="joint")
    with attnctl.apply(edit_pipe, [attnctl.AttentionMaps(("cat",)), spy]) as handle:
        edit(edit_pipe, reference)
        result = handle.outputs["attention_maps"]
    positions = _kept_positions(edit_pipe, reference, PROMPT, "cat")
    expected = torch.zeros(1, 1, 4, 3, dtype=torch.float64)
    for entry in spy.log:
        q, k = entry["q"].double(), entry["k"].double()
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = entry["mask"]
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
        probs = torch.softmax(logits, -1)[:, :, q.shape[2] - EDIT_TOKENS :].sum(1)
        for i, row in enumerate(entry["rows"].rows):
            if row.branch == "cond":
                expected[row.prompt, 0] += probs[i][:, positions].sum(-1).reshape(4, 3)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(attnctl.UnsupportedError, match="every QwenImageEditPipeline call holds its image's tokens"):
        attnctl.apply(edit_pipe, [attnctl.Regions([attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0))])])


def test_qwen_edit_plus_places_words_after_every_images_vision_tokens(edit_pipe, reference):
    """QwenImageEditPlusPipeline ("Picture i: <vision tokens>" per input image before the prompt): bitwise under apply,
    PAG runs over its reference tokens, and AttentionMaps reads the word where the text encoder got it (the input ids
    it was called with, recorded by a hook, the pipeline's drop index applied)."""
    from diffusers import QwenImageEditPlusPipeline

    plus = QwenImageEditPlusPipeline(**edit_pipe.components)
    plus.set_progress_bar_config(disable=True)
    images = [reference, reference.transpose(0)]  # two input images
    stock = edit(plus, images)
    with attnctl.apply(plus, []):
        assert torch.equal(edit(plus, images), stock)
    with attnctl.apply(plus, [attnctl.PAG(scale=1.5)]):
        guided = edit(plus, images)
    assert torch.isfinite(guided).all() and not torch.equal(guided, stock)
    seen = []
    hook = plus.text_encoder.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"][0].clone()), with_kwargs=True)
    spy = Spy(layers="joint")
    try:
        with attnctl.apply(plus, [attnctl.AttentionMaps(("cat",)), spy]) as handle:
            edit(plus, images)
            result = handle.outputs["attention_maps"]
    finally:
        hook.remove()
    kept = seen[0][plus.prompt_template_encode_start_idx :].tolist()  # the cond prompt's encoding comes first
    positions = [i for i, token in enumerate(kept) if token == plus.tokenizer.convert_tokens_to_ids("Ġcat")]
    assert positions and positions[0] > 2 * 256  # after both images' vision tokens
    expected = torch.zeros(1, 1, 4, 3, dtype=torch.float64)
    for entry in spy.log:
        q, k = entry["q"].double(), entry["k"].double()
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = entry["mask"]
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
        probs = torch.softmax(logits, -1)[:, :, q.shape[2] - EDIT_TOKENS :].sum(1)
        for i, row in enumerate(entry["rows"].rows):
            if row.branch == "cond":
                expected[row.prompt, 0] += probs[i][:, positions].sum(-1).reshape(4, 3)
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-5, atol=1e-6)


def test_an_edit_pipeline_whose_template_is_not_modelled_says_words_cannot_be_placed(edit_pipe, reference):
    """A Qwen-Image edit pipeline attnctl does not know the template of (here a subclass: its template could differ):
    word-free controls run, a word-based control raises TokenError saying why (not "called with embeddings")."""
    from diffusers import QwenImageEditPipeline

    class QwenImageEditCustomPipeline(QwenImageEditPipeline):
        pass

    custom = QwenImageEditCustomPipeline(**edit_pipe.components)
    custom.set_progress_bar_config(disable=True)
    with attnctl.apply(custom, [attnctl.Reweight({"cat": 2.0})]):
        with pytest.raises(attnctl.TokenError, match="does not know where QwenImageEditCustomPipeline's text encoding puts them"):
            edit(custom, reference, steps=1)


@pytest.fixture(scope="module")
def edit_2511():
    from attnctl.testing.new_families import tiny_qwenimage_edit

    pipe = tiny_qwenimage_edit(zero_cond_t=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_qwen_edit_2511_zero_cond_t_identity_and_maps(edit_2511, reference):
    """Qwen-Image-Edit-2511 (`zero_cond_t`: the reference tokens modulated with t = 0): bitwise under apply and after
    remove, AttentionMaps over its generated grid, Reweight acts."""
    pipe = edit_2511
    stock = edit(pipe, reference)
    with attnctl.apply(pipe, [attnctl.AttentionMaps(("cat",))]) as handle:
        assert torch.equal(edit(pipe, reference), stock)
        maps = handle.outputs["attention_maps"]
    assert maps.grid_maps.shape[-2:] == (4, 3) and maps.grid_maps.abs().sum() > 0
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 3.0})]):
        assert not torch.equal(edit(pipe, reference), stock)
    assert torch.equal(edit(pipe, reference), stock)


def test_qwen_edit_2511_pag_with_two_prompts_against_a_reference(edit_2511, reference):
    """PAG's perturbed rows join the cond call; `img_shapes` is re-batched with them (the 2511 transformer builds its
    per-row modulation index from it). Two prompts, no CFG: the prediction is cond + s (cond - perturbed), perturbed =
    the stock transformer with the reference PAG attention in its middle block."""
    pipe, scale = edit_2511, 1.5
    prompts = [PROMPT, "a blue dog"]
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale)]):
        calls, predictions = [], []
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True, prepend=True)
        original = pipe.scheduler.step
        pipe.scheduler.step = lambda output, *a, **k: (predictions.append(output.clone()), original(output, *a, **k))[1]
        try:
            edit(pipe, [reference, reference], cfg=1.0, prompt=prompts, steps=1)
        finally:
            hook.remove()
            del pipe.scheduler.step
    (call,), (got,) = calls, predictions
    assert call["hidden_states"].shape[0] == 2 and len(call["img_shapes"]) == 2

    def run():
        with torch.no_grad():
            return pipe.transformer(**{**call, "return_dict": False})[0]

    cond = run()
    layer = pipe.transformer.transformer_blocks[1].attn
    original_processor = layer.processor
    layer.set_processor(RefQwenPAG(EDIT_TOKENS))
    try:
        perturbed = run()
    finally:
        layer.set_processor(original_processor)
    expected = (cond + scale * (cond - perturbed))[:, :EDIT_TOKENS]
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_qwen_edit_2511_skip_layer_against_a_hand_skipped_block(edit_2511, reference):
    """SkipLayer on the 2511 transformer (its blocks get the timestep rows doubled): against the stock transformer with
    block 1 replaced by the identity, no CFG, at the second of two steps."""
    pipe = edit_2511
    with attnctl.apply(pipe, [attnctl.SkipLayer(blocks=(1,), scale=2.0, steps=(0.0, 1.0))]):
        calls, predictions = [], []
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True, prepend=True)
        original = pipe.scheduler.step
        pipe.scheduler.step = lambda output, *a, **k: (predictions.append(output.clone()), original(output, *a, **k))[1]
        try:
            edit(pipe, reference, cfg=1.0, steps=2)  # step 0 is never guided (SkipLayer's window is SD3's, strict)
        finally:
            hook.remove()
            del pipe.scheduler.step
    (_, call), (_, got) = calls, predictions

    def run():
        with torch.no_grad():
            return pipe.transformer(**{**call, "return_dict": False})[0]

    cond = run()
    block = pipe.transformer.transformer_blocks[1]
    block.forward = lambda hidden_states, encoder_hidden_states=None, *args, **kwargs: (encoder_hidden_states, hidden_states)
    try:
        skipped = run()
    finally:
        del block.forward
    expected = (cond + 2.0 * (cond - skipped))[:, :EDIT_TOKENS]
    assert (cond - skipped).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: attnctl.SAG(scale=0.75),
    lambda: attnctl.FastAttn(threshold=10.0, window=1),
    lambda: attnctl.AttendExcite(["cat"]),
], ids=["SAG", "FastAttn", "AttendExcite"])
def test_edit_pipelines_refuse_at_apply_what_their_reference_tokens_rule_out(edit_pipe, reference, make):
    """Every Qwen-Image Edit call holds the image's tokens: these were accepted at apply and failed at each call (SAG
    only when its first second pass was planned, half the steps in)."""
    stock = edit(edit_pipe, reference)
    with pytest.raises(attnctl.UnsupportedError, match="QwenImageEditPipeline call holds"):
        attnctl.apply(edit_pipe, [make()])
    assert torch.equal(edit(edit_pipe, reference), stock)


def test_pipelines_attnctl_cannot_follow_are_refused_at_apply(edit_pipe):
    """FluxKontextInpaintPipeline appends its image's tokens to every call (stock fails without an image), and
    QwenImageLayeredPipeline lists its extra layer images as if they were references: both were accepted at apply,
    then every Kontext-inpaint call failed, and the layered pipeline's controls acted on its first layer only."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FluxKontextInpaintPipeline,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )

    from attnctl.testing import make_tiny_pipeline

    kontext = FluxKontextInpaintPipeline(**make_tiny_pipeline("tiny-flux").components)
    with pytest.raises(attnctl.UnsupportedError, match="FluxKontextInpaintPipeline is not supported: it appends its image's tokens"):
        attnctl.apply(kontext, [])
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=2, z_dim=8, dim_mult=[1] * 6, num_res_blocks=0, temperal_downsample=[False] * 5,
                                 latents_mean=[0.0] * 8, latents_std=[1.0] * 8, input_channels=4)
    layered_transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=32, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), use_additional_t_cond=True, use_layer3d_rope=True)
    layered = QwenImageLayeredPipeline(**{**edit_pipe.components, "transformer": layered_transformer, "vae": vae})
    with pytest.raises(attnctl.UnsupportedError, match="QwenImageLayeredPipeline is not supported: it generates several layer images"):
        attnctl.apply(layered, [attnctl.PAG()])
    assert all(type(p).__module__.startswith("diffusers") for p in layered_transformer.attn_processors.values())

    class MyKontextInpaint(FluxKontextInpaintPipeline):  # what the class does, a subclass does
        pass

    with pytest.raises(attnctl.UnsupportedError, match="MyKontextInpaint is not supported"):
        attnctl.apply(MyKontextInpaint(**make_tiny_pipeline("tiny-flux").components), [])


def test_qwen_edit_inpaint_refuses_at_apply_what_its_reference_tokens_rule_out(edit_pipe):
    from diffusers import QwenImageEditInpaintPipeline

    inpaint = QwenImageEditInpaintPipeline(**edit_pipe.components)
    with pytest.raises(attnctl.UnsupportedError, match="every QwenImageEditInpaintPipeline call holds"):
        attnctl.apply(inpaint, [attnctl.Regions([attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0))])])
