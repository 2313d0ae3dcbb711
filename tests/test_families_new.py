"""The newer families of issue #19 (Chroma, ...) on their tiny offline models: bitwise identities (apply with
no controls, after remove, img2img / inpaint), the call protocol, every control whose definition applies
against an independent reference, and the refusals of the others.

diffusers releases before these families (the oldest supported, 0.35) skip them with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.processors.base import ControlledProcessor
from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline
from attnctl.testing.new_families import NEW_TINY_MODELS, REQUIRES, available

from .helpers import PROMPTS, Probe
from .reference_attention import PipelineMask, RefQwenIsolation, RefQwenPAG, Spy

PROMPT = "a red cat on the street"


def generate(pipe, name: str, prompt=PROMPTS, steps: int = 2, guidance: float = 5.0, seed: int = 0, **kwargs):
    """tests.helpers.generate with the prompt as a keyword (Flux2KleinPipeline's first argument is `image`)."""
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    generator = torch.Generator().manual_seed(seed)
    prompt = list(prompt) if isinstance(prompt, list) else prompt  # ZImagePipeline rewrites a prompt list in place
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", generator=generator,
               **options)
    return out.frames if hasattr(out, "frames") else out.images  # video pipelines return frames


def record(pipe, name, controls=(), **kwargs):
    """(predictions handed to scheduler.step, denoiser calls) of one generation (tests.test_guidance.record)."""
    from .test_guidance import StepRecorder

    recorder = StepRecorder(pipe)
    try:
        if controls:
            with attnctl.apply(pipe, list(controls)):
                generate(pipe, name, **kwargs)
        else:
            generate(pipe, name, **kwargs)
    finally:
        recorder.close()
    return recorder.predictions, recorder.calls


def _needs(name: str):
    return pytest.mark.skipif(
        not available(name), reason=f"{name} needs diffusers >= 0.42 with {', '.join(REQUIRES[name])} (attnctl reproduces its processors)"
    )


MODELS = [pytest.param(name, marks=_needs(name)) for name in NEW_TINY_MODELS]


@pytest.fixture(scope="module")
def tiny():
    from attnctl.testing import make_tiny_pipeline

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_tiny_pipeline(name)
        return cache[name]

    return get


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _processors(denoiser) -> dict:
    """Every attention module's processor (Z-Image's denoiser has no `attn_processors`)."""
    return {name: m.processor for name, m in denoiser.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


# -- identities ----------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", MODELS)
def test_empty_apply_and_remove_are_bitwise_stock(name, guidance, tiny):
    pipe = tiny(name)
    stock = generate(pipe, name, guidance=guidance)
    with attnctl.apply(pipe, []) as handle:
        controlled = {layer.name for layer in handle.adapter.layers}
        processors = {name: p for name, p in _processors(_denoiser(pipe)).items() if name in controlled}
        assert processors and all(isinstance(p, ControlledProcessor) for p in processors.values())
        controlled = generate(pipe, name, guidance=guidance)
    after = generate(pipe, name, guidance=guidance)
    assert torch.equal(stock, controlled)
    assert torch.equal(stock, after)
    assert not any(isinstance(p, ControlledProcessor) for p in _processors(_denoiser(pipe)).values())
    assert "forward" not in _denoiser(pipe).__dict__ and not handle.live


@pytest.mark.parity
@pytest.mark.parametrize("name", MODELS)
def test_identity_edit_sees_every_layer_every_step_and_the_rows(name, tiny):
    pipe = tiny(name)
    stock = generate(pipe, name, steps=3)
    probe = Probe()
    with attnctl.apply(pipe, [probe]) as handle:
        controlled = generate(pipe, name, steps=3)
    assert torch.equal(stock, controlled)
    calls = [entry for entry in probe.log if entry[0] != "bind"]
    assert {entry[0] for entry in calls} == {layer.name for layer in handle.adapter.layers}
    assert sorted({entry[1] for entry in calls}) == [0, 1, 2]
    first = handle.adapter.layers[0].name
    rows = [entry[3] for entry in calls if entry[0] == first]
    assert rows == EXPECTED_ROWS[name] * 3


@pytest.mark.parametrize("name", MODELS)
def test_several_images_per_prompt_are_bitwise_stock_and_read_their_prompt_rows(name, tiny):
    """Two outputs per prompt: Z-Image's encode_prompt does not take the count (the pipeline repeats the embeddings
    after it), so it is read from the call; every control was refused there with a batch-size error."""
    if name == "tiny-qwenimage":
        pytest.skip("QwenImagePipeline with num_images_per_prompt=2 fails in the transformer's modulation before attnctl is involved (diffusers 0.42)")
    pipe = tiny(name)
    per_prompt = {"num_videos_per_prompt" if name == "tiny-wan" else "num_images_per_prompt": 2}
    stock = generate(pipe, name, **per_prompt)
    probe = Probe()
    with attnctl.apply(pipe, [probe]) as handle:
        controlled = generate(pipe, name, **per_prompt)
    assert torch.equal(stock, controlled)
    first = handle.adapter.layers[0].name
    cond = sorted({row[1] for entry in probe.log if entry[0] == first for row in entry[3] if row[0] == "cond"})
    assert cond == [0, 1, 2, 3]


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_extra_prompts_are_encoded_once_with_several_videos_per_prompt(name, tiny):
    """Region prompts and noun phrases are encoded one row each: Wan's encode_prompt names its count
    num_videos_per_prompt, which was passed through, and the extra prompts came back twice (CallLayoutError)."""
    pipe = tiny(name)
    stock = generate(pipe, name, prompt="a cat and a dog", num_videos_per_prompt=2)
    regions = attnctl.Regions([attnctl.Region("a red cat", box=(0, 0, 0.5, 1)), attnctl.Region("a dog", box=(0.5, 0, 1, 1))])
    for control in (regions, attnctl.StructuredGuidance(phrases=["a cat", "a dog"])):
        with attnctl.apply(pipe, [control]):
            controlled = generate(pipe, name, prompt="a cat and a dog", num_videos_per_prompt=2)
        assert controlled.shape == stock.shape and not torch.equal(controlled, stock)


@pytest.mark.skipif(not available("tiny-zimage"), reason="needs diffusers with ZImagePipeline")
def test_zimage_call_after_a_call_that_failed_before_denoising_starts_clean():
    """ZImagePipeline starts a call in encode_prompt (it has no check_inputs): a call that failed before its first
    denoiser call (a word not in the prompt) left its prompts in place, and the next call was refused."""
    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline("tiny-zimage")
    with attnctl.apply(pipe, [attnctl.Reweight({"red": 2.0})]):
        expected = generate(pipe, "tiny-zimage", prompt="a red cat")
        with pytest.raises(attnctl.TokenError):
            generate(pipe, "tiny-zimage", prompt="a dog")
        assert torch.equal(generate(pipe, "tiny-zimage", prompt="a red cat"), expected)


# rows of the denoiser calls of one step with CALL_DEFAULTS, two prompts, guidance 5
EXPECTED_ROWS = {
    "tiny-chroma": [(("cond", 0, None), ("cond", 1, None)), (("uncond", 0, None), ("uncond", 1, None))],
    "tiny-qwenimage": [(("cond", 0, None), ("cond", 1, None)), (("uncond", 0, None), ("uncond", 1, None))],
    "tiny-flux2": [(("cond", 0, None), ("cond", 1, None)), (("uncond", 0, None), ("uncond", 1, None))],
    "tiny-wan": [(("cond", 0, None), ("cond", 1, None)), (("uncond", 0, None), ("uncond", 1, None))],
    # one batched call, cond rows first
    "tiny-zimage": [(("cond", 0, None), ("cond", 1, None), ("uncond", 0, None), ("uncond", 1, None))],
}


VARIANTS = {
    ("tiny-chroma", "img2img"): "ChromaImg2ImgPipeline", ("tiny-chroma", "inpaint"): "ChromaInpaintPipeline",
    ("tiny-qwenimage", "img2img"): "QwenImageImg2ImgPipeline", ("tiny-qwenimage", "inpaint"): "QwenImageInpaintPipeline",
    ("tiny-zimage", "img2img"): "ZImageImg2ImgPipeline", ("tiny-zimage", "inpaint"): "ZImageInpaintPipeline",
}


@pytest.mark.parity
@pytest.mark.parametrize("name, variant", [pytest.param(*key, marks=_needs(key[0])) for key in VARIANTS])
def test_img2img_and_inpaint_identity(name, variant, tiny):
    import diffusers

    pipe = getattr(diffusers, VARIANTS[(name, variant)]).from_pipe(tiny(name))
    if name == "tiny-chroma" and variant == "inpaint" and "guidance_embeds" not in pipe.transformer.config:
        pytest.skip("ChromaInpaintPipeline reads transformer.config.guidance_embeds, which ChromaTransformer2DModel's "
                    "config does not have: the stock pipeline fails before attnctl is involved (diffusers bug)")
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    extra = dict(CALL_DEFAULTS[name])
    if variant == "inpaint":
        extra["mask_image"] = torch.ones(1, 1, 32, 32)

    def run():
        return pipe(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra).images

    stock = run()
    with attnctl.apply(pipe, [Probe()]):
        controlled = run()
    assert torch.equal(stock, controlled)
    assert torch.equal(stock, run())


# -- controls against references -----------------------------------------------------------------------------


def _t5_positions(tokenizer, prompt: str, word: str) -> list[int]:
    ids = tokenizer(prompt).input_ids
    pattern = tokenizer(" " + word, add_special_tokens=False).input_ids
    return [i + j for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern for j in range(len(pattern))]


#: Per tiny model: the tokenizer of the text the joint sequence holds, and where that text sits in the queries.
TEXT = {
    "tiny-chroma": ("tokenizer", "first"), "tiny-qwenimage": ("tokenizer", "first"), "tiny-flux2": ("tokenizer", "first"),
    "tiny-wan": ("tokenizer", "keys"),  # cross-attention: every key is a text token, every query an image token
    "tiny-zimage": ("tokenizer", "last"),  # [image; text], the text padded to 32 tokens with a learned pad token
}


def _as_encoded(pipe, name: str, prompt: str) -> str:
    """The text the pipeline hands its tokenizer: klein wraps the prompt in Qwen3's chat template, whose tokens
    stay in the embeddings (Qwen-Image drops its template prefix, Chroma has none)."""
    if name in ("tiny-flux2", "tiny-zimage"):
        messages = [{"role": "user", "content": prompt}]
        return pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=name == "tiny-zimage")
    return prompt
#: Image tokens of every new tiny model at CALL_DEFAULTS' 32x32: a 16x16 latent in 2x2 patches.
IMAGE_TOKENS = 64


def _masked_logits(q, k, mask):
    """float64 logits `q kᵀ / sqrt(d)` plus the call's mask (bool: -inf where False; float: added)."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is None:
        return logits
    return logits + (torch.zeros_like(mask, dtype=torch.float64).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask.double())


@pytest.mark.parametrize("normalize", [False, True], ids=["p2p", "normalize"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in TEXT])
def test_reweight_matches_the_formula_call_by_call(name, normalize, tiny):
    """docs/methods.md "Reweight": the cond rows' image queries see A * w (or softmax(logits + log w)) over the
    text keys of the weighted words; uncond rows and text queries keep plain attention. The model's mask is the
    pipeline's own padding mask (`PipelineMask`), not the one attnctl hands the edited op: two prompts of different
    lengths, so that Qwen-Image pads (and masks) the shorter one too."""
    pipe = tiny(name)
    table = {"red": 3.0, "street": 0.0}
    prompts = [PROMPT, "a red street"]
    cross = TEXT[name][1] == "keys"
    with PipelineMask(pipe, name) as padding:
        spy = Spy(layers="cross" if cross else "joint", padding=padding)
        with attnctl.apply(pipe, [attnctl.Reweight(table, normalize=normalize), spy]) as handle:
            generate(pipe, name, prompt=prompts)
    assert (padding.calls > 0) == (name in ("tiny-chroma", "tiny-qwenimage"))
    tokenizer = getattr(pipe, TEXT[name][0])
    weights = [{p: f for word, f in table.items() for p in _t5_positions(tokenizer, _as_encoded(pipe, name, prompt), word)}
               for prompt in prompts]
    assert all(weights) and weights[0] != weights[1]
    kind = "cross" if cross else "joint"
    assert {record["layer"].name for record in spy.log} == {layer.name for layer in handle.adapter.layers if layer.kind == kind}
    for record in spy.log:
        q, k, v = (record[x].double() for x in ("q", "k", "v"))
        n_q, n_k = q.shape[2], k.shape[2]
        if cross:
            image_rows, text_keys = slice(0, n_q), slice(0, n_k)
        elif TEXT[name][1] == "last":
            image_rows, text_keys = slice(0, IMAGE_TOKENS), slice(IMAGE_TOKENS, n_k)
        else:
            text_len = n_q - IMAGE_TOKENS
            image_rows, text_keys = slice(text_len, n_q), slice(0, text_len)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if record["model_mask"] is not None:
            logits = logits + record["model_mask"]
        w = torch.ones(q.shape[0], n_k, dtype=torch.float64)
        for b, row in enumerate(record["rows"].rows):
            if row.branch == "cond":
                for position, factor in weights[row.prompt].items():
                    w[b, text_keys.start + position] *= factor
        if normalize:
            bias = torch.zeros(q.shape[0], 1, n_q, n_k, dtype=torch.float64)
            bias[:, :, image_rows] = torch.log(w)[:, None, None, :]
            expected = torch.softmax(logits + bias, -1) @ v
        else:
            probs = torch.softmax(logits, -1)
            probs[:, :, image_rows] = probs[:, :, image_rows] * w[:, None, None, :]
            expected = probs @ v
        torch.testing.assert_close(record["out"].double(), expected, rtol=1e-5, atol=1e-6)


class RefFluxLayoutPAG:
    """Flux-layout double-block attention (qk-norm, RoPE, `[text; image]`, the model's own mask) with the joint
    PAG mask of docs/methods.md "PAG" (an image query sees itself and the text), dense."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        def split(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        text, n = eq.shape[1], q.shape[1]
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        mask = torch.zeros(text + n, text + n)
        mask[text:, text:] = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        if attention_mask is not None:  # Chroma's 0/1 float mask is additive in the stock SDPA call, as here
            mask = mask + attention_mask if attention_mask.dtype != torch.bool else mask.masked_fill(~attention_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3)
        context, image = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(context)


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in ("tiny-chroma", "tiny-flux2")])
def test_pag_against_a_dense_mask_reference(name, guidance):
    """D = scale (cond - perturbed) is added to the cond and (true CFG) the uncond prediction: stock + D."""
    from attnctl.testing import make_tiny_pipeline

    from .test_guidance import run_denoiser

    pipe = make_tiny_pipeline(name)
    stock, calls = record(pipe, name, prompt="a cat", steps=1, guidance=guidance)
    got, _ = record(pipe, name, [attnctl.PAG(scale=1.5)], prompt="a cat", steps=1, guidance=guidance)
    call = calls[0]  # the cond call comes first
    cond = run_denoiser(pipe, call, [0], 1)
    layer = pipe.transformer.transformer_blocks[0].attn
    original = layer.processor
    layer.set_processor(RefFluxLayoutPAG())
    try:
        perturbed = run_denoiser(pipe, call, [0], 1)
    finally:
        layer.set_processor(original)
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + 1.5 * (cond - perturbed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, blocks, path",
    [pytest.param("tiny-chroma", (0,), "transformer_blocks.0", marks=_needs("tiny-chroma")),
     pytest.param("tiny-chroma", ("single_transformer_blocks.1",), "single_transformer_blocks.1", marks=_needs("tiny-chroma")),
     pytest.param("tiny-qwenimage", (1,), "transformer_blocks.1", marks=_needs("tiny-qwenimage")),
     pytest.param("tiny-flux2", (0,), "transformer_blocks.0", marks=_needs("tiny-flux2")),
     pytest.param("tiny-flux2", ("single_transformer_blocks.0",), "single_transformer_blocks.0", marks=_needs("tiny-flux2")),
     pytest.param("tiny-wan", ("blocks.1",), "blocks.1", marks=_needs("tiny-wan"))],
)
def test_skip_layer_against_a_hand_skipped_block(name, blocks, path):
    from attnctl.testing import make_tiny_pipeline

    from .test_guidance import run_denoiser

    pipe = make_tiny_pipeline(name)
    off = {"guidance": 1.0, "true_cfg_scale": 1.0} if name == "tiny-qwenimage" else {"guidance": 1.0}
    # SkipLayer's window is strict at both ends, as SD3's (step 0 never guided): step 1 of 2 is the one compared
    stock, calls = record(pipe, name, prompt="a cat", steps=2, **off)
    got, _ = record(pipe, name, [attnctl.SkipLayer(scale=2.0, blocks=blocks, steps=(0.0, 1.0))], prompt="a cat", steps=2, **off)
    torch.testing.assert_close(got[0], stock[0], rtol=0, atol=0)
    cond = run_denoiser(pipe, calls[1], [0], 1)
    block = pipe.transformer.get_submodule(path)
    two_streams = type(block).__name__ in attnctl.handle.adapter_for(pipe.transformer).text_stream_blocks

    def skipped(hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return (encoder_hidden_states, hidden_states) if two_streams else hidden_states

    block.forward = skipped
    try:
        perturbed = run_denoiser(pipe, calls[1], [0], 1)
    finally:
        del block.forward
    term = 2.0 * (cond - perturbed)
    assert term.abs().max() > 1e-4
    torch.testing.assert_close(got[1], stock[1] + term, rtol=1e-4, atol=1e-4)


# -- the support matrix: refusals at apply, and every supported control runs ----------------------------------


#: Controls that link the rows of a call: the matrix run gives them three prompts
CROSS_IMAGE = ("AttentionInterpolation", "ConsistentSubjects", "ReferenceAttention")


def _family_of(name: str) -> str:
    from attnctl.render.matrix import FAMILIES

    return {tiny: family for family, tiny in FAMILIES}[name]


@pytest.mark.parametrize("name", MODELS)
def test_refused_controls_are_refused_at_apply_and_leave_the_pipeline_untouched(name, tiny):
    from attnctl.render.matrix import CONTROLS, support

    pipe = tiny(name)
    adapter = attnctl.handle.adapter_for(_denoiser(pipe))
    refused = [(label, make) for label, make in CONTROLS if support(make(), adapter)[0] == "refused"]
    before = _processors(_denoiser(pipe))
    for label, make in refused:
        with pytest.raises(attnctl.UnsupportedError, match=adapter.family):
            attnctl.apply(pipe, [make()])
        assert _processors(_denoiser(pipe)) == before, label


@pytest.mark.parametrize("name", MODELS)
def test_every_supported_control_runs_and_changes_the_output(name, tiny):
    """Each control the matrix says yes to, at a strength that changes something: applies, runs a true-CFG
    call, gives finite latents different from stock, and leaves the pipeline bitwise stock after remove."""
    from attnctl.render.matrix import CONTROLS, support

    pipe = tiny(name)
    adapter = attnctl.handle.adapter_for(_denoiser(pipe))
    stock = generate(pipe, name, prompt=PROMPT)
    strong = {
        "Reweight": lambda: attnctl.Reweight({"cat": 4.0, "street": 0.0}),
        "Regions": lambda: attnctl.Regions([attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0))], base_ratio=0.0),
        "PLADIS": lambda: attnctl.PLADIS(scale=4.0),
        "FastAttn": lambda: attnctl.FastAttn(threshold=10.0, window=1),
        "SkipLayer": lambda: attnctl.SkipLayer(blocks=(0,), steps=(0.0, 1.0)),
        "TGate": lambda: attnctl.TGate(gate_step=1),
    }
    ran = []
    for label, make in CONTROLS:
        if support(make(), adapter)[0] != "yes":
            continue
        control = strong.get(label, make)()
        # a cross-image control needs rows to link (AttentionInterpolation interpolates the middle of three prompts;
        # PromptToPrompt edits a base prompt)
        prompts = ([PROMPT, PROMPT.replace("red", "blue")] if label == "PromptToPrompt"
                   else [PROMPT, "a blue dog", PROMPT] if label in CROSS_IMAGE else PROMPT)
        with attnctl.apply(pipe, [control]) as handle:
            out = generate(pipe, name, prompt=prompts)
        assert torch.isfinite(out).all(), label
        if label == "AttentionMaps":
            result = handle.outputs["attention_maps"]
            assert result is not None, label
        else:
            assert not torch.equal(out, stock if prompts is PROMPT else generate(pipe, name, prompt=prompts)), label
        ran.append(label)
    assert torch.equal(generate(pipe, name, prompt=PROMPT), stock)
    assert "Reweight" in ran and ("PAG" in ran or "extra_rows" in adapter.lacks)


@pytest.mark.parametrize("name", [pytest.param("tiny-qwenimage", marks=_needs("tiny-qwenimage"))])
def test_qwenimage_isolation_in_a_negative_call_with_its_own_text_length(name, tiny):
    """Qwen-Image's true CFG runs the negative prompt as a denoiser call of its own, with its own text length (the empty
    negative prompt is shorter than the prompt): isolation acts in both calls (docs/methods.md "Regions": every row),
    as the dense reference with each call's text gives. It used to raise CallLayoutError in the negative call."""
    pipe = tiny(name)
    regions = [attnctl.Region("a cat", (0.0, 0.0, 0.5, 1.0)), attnctl.Region("a dog", (0.5, 0.0, 1.0, 1.0))]
    _, calls = record(pipe, name, prompt=PROMPT, steps=1)
    lengths = {call["kwargs"]["encoder_hidden_states"].shape[1] for call in calls}
    assert len(lengths) == 2, lengths  # the prompt's call and the negative prompt's differ in text length
    with attnctl.apply(pipe, [attnctl.Regions(regions, base_ratio=1.0, isolate=True)]):
        got = generate(pipe, name, prompt=PROMPT)
    stock = generate(pipe, name, prompt=PROMPT)
    blocks = pipe.transformer.transformer_blocks
    originals = [block.attn.processor for block in blocks]
    for block in blocks:
        block.attn.set_processor(RefQwenIsolation(torch.tensor(([1] * 4 + [2] * 4) * 8)))  # 8 x 8 image tokens
    try:
        expected = generate(pipe, name, prompt=PROMPT)
    finally:
        for block, processor in zip(blocks, originals):
            block.attn.set_processor(processor)
    assert (expected - stock).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


#: Qwen-Image negative prompts shorter and longer than the prompts (each call is padded to its own longest prompt);
#: the longer one holds "red" past the prompts' text length
QWEN_NEGATIVES = {"shorter": "a red street", "longer": "a blurry photo of a car on a wet street at night with a dog and a red sign"}
QWEN_PROMPTS = ["a red cat on the street", "a photo of a red car on the street"]


def _qwen_reweighted(record, texts, table, branch, tokenizer, normalize=False):
    """The output of one recorded Qwen-Image joint attention call by the definition (docs/methods.md "Reweight"): the
    image-query rows' probabilities over the weighted words' text keys times the factor (or softmax(logits + log w)),
    on the rows of `branch`, the words looked up in each row's own text (`texts[branch][prompt]`); the text length is
    the call's own (its queries less the 64 image tokens)."""
    q, k, v = (record[x].double() for x in ("q", "k", "v"))
    n_q, n_k = q.shape[2], k.shape[2]
    text_len = n_q - IMAGE_TOKENS
    logits = _masked_logits(q, k, record["mask"])
    w = torch.ones(q.shape[0], n_k, dtype=torch.float64)
    for b, row in enumerate(record["rows"].rows):
        if branch not in (row.branch, "both"):
            continue
        for word, factor in table.items():
            positions = _t5_positions(tokenizer, texts[row.branch][row.prompt], word)
            assert positions and max(positions) < text_len, (word, positions, text_len)
            w[b, positions] *= factor
    image_rows = slice(text_len, n_q)
    if normalize:
        bias = torch.zeros(q.shape[0], 1, n_q, n_k, dtype=torch.float64)
        bias[:, :, image_rows] = torch.log(w)[:, None, None, :]
        return torch.softmax(logits + bias, -1) @ v
    probs = torch.softmax(logits, -1)
    probs[:, :, image_rows] = probs[:, :, image_rows] * w[:, None, None, :]
    return probs @ v


@pytest.mark.parametrize("negative", list(QWEN_NEGATIVES))
@pytest.mark.parametrize("name", [pytest.param("tiny-qwenimage", marks=_needs("tiny-qwenimage"))])
def test_qwenimage_reweight_each_branch_on_a_negative_prompt_of_its_own_length(name, negative, tiny):
    """Qwen-Image encodes the negative prompt by a call of its own, padded to its own longest prompt (README: "the cond
    and uncond texts may have different lengths"): Reweight with branch "cond", "uncond" and "both" matches the
    definition call by call, the negative prompt's words placed in its own text. It raised CallLayoutError ("bound to
    16 text tokens, layer ... has 13") for a shorter negative prompt, and for a word of a longer one past the prompts'
    length a TokenError that said the pipeline truncates it."""
    pipe = tiny(name)
    neg = QWEN_NEGATIVES[negative]
    table = {"red": 3.0, "street": 0.5}
    texts = {"cond": QWEN_PROMPTS, "uncond": [neg, neg]}
    for branch in ("cond", "uncond", "both"):
        spy = Spy(layers="joint")
        with attnctl.apply(pipe, [attnctl.Reweight(table, branch=branch), spy]) as handle:
            generate(pipe, name, prompt=QWEN_PROMPTS, steps=2, negative_prompt=neg)
        assert {record["layer"].name for record in spy.log} == {layer.name for layer in handle.adapter.layers}
        lengths = {record["rows"].rows[0].branch: record["q"].shape[2] - IMAGE_TOKENS for record in spy.log}
        assert set(lengths) == {"cond", "uncond"}
        assert (lengths["uncond"] < lengths["cond"]) if negative == "shorter" else (lengths["uncond"] > lengths["cond"])
        if negative == "longer":  # the case of the false truncation: a weighted word past the prompts' text length
            assert max(_t5_positions(pipe.tokenizer, neg, "red")) >= lengths["cond"]
        changed = set()
        for record in spy.log:
            expected = _qwen_reweighted(record, texts, table, branch, pipe.tokenizer)
            torch.testing.assert_close(record["out"].double(), expected, rtol=1e-5, atol=1e-6)
            plain = _qwen_reweighted(record, texts, {}, branch, pipe.tokenizer)
            if (expected - plain).abs().max() > 1e-4:
                changed.add(record["rows"].rows[0].branch)
        assert changed == ({"cond", "uncond"} if branch == "both" else {branch}), (branch, changed)


@pytest.mark.parametrize("name", [pytest.param("tiny-qwenimage", marks=_needs("tiny-qwenimage"))])
def test_qwenimage_reweight_refuses_what_is_not_in_the_negative_prompts_own_text(name, tiny):
    """Token limits per branch as the pipeline encoded it: a word not in the negative prompt, and a token position past
    the negative prompt's own (shorter) text, are TokenErrors that say so (the position was checked against the prompt's
    length and then failed inside the denoiser with an internal layout error); a position inside the negative prompt's
    longer text is controlled."""
    pipe = tiny(name)
    short, long = QWEN_NEGATIVES["shorter"], QWEN_NEGATIVES["longer"]
    for branch in ("uncond", "both"):
        with attnctl.apply(pipe, [attnctl.Reweight({"on": 2.0}, branch=branch)]):
            with pytest.raises(attnctl.TokenError, match="'on' is not in the uncond prompt"):
                generate(pipe, name, prompt=QWEN_PROMPTS, steps=1, negative_prompt=short)
    _, calls = record(pipe, name, prompt=QWEN_PROMPTS, steps=1, negative_prompt=short)
    cond_len, uncond_len = (call["kwargs"]["encoder_hidden_states"].shape[1] for call in calls)
    assert uncond_len < cond_len
    with attnctl.apply(pipe, [attnctl.Reweight({uncond_len: 2.0}, branch="uncond")]):
        with pytest.raises(attnctl.TokenError, match=f"token position {uncond_len} is outside the text sequence of {uncond_len} tokens"):
            generate(pipe, name, prompt=QWEN_PROMPTS, steps=1, negative_prompt=short)
    # a position past the prompts' length, inside the longer negative prompt's text: reweighted there
    _, calls = record(pipe, name, prompt=QWEN_PROMPTS, steps=1, negative_prompt=long)
    cond_len, uncond_len = (call["kwargs"]["encoder_hidden_states"].shape[1] for call in calls)
    assert uncond_len > cond_len
    spy = Spy(layers="joint")
    with attnctl.apply(pipe, [attnctl.Reweight({cond_len: 0.0}, branch="uncond"), spy]):
        generate(pipe, name, prompt=QWEN_PROMPTS, steps=1, negative_prompt=long)
    for each in spy.log:
        if each["rows"].rows[0].branch == "uncond":
            probs = torch.softmax(each["q"].double() @ each["k"].double().transpose(-1, -2) / each["q"].shape[-1] ** 0.5, -1)
            probs[:, :, uncond_len:, cond_len] = 0.0
            torch.testing.assert_close(each["out"].double(), probs @ each["v"].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [pytest.param("tiny-qwenimage", marks=_needs("tiny-qwenimage"))])
def test_qwenimage_pag_against_a_dense_mask_reference(name):
    """Without true CFG (the pipeline rescales a true-CFG combination by the cond norm): cond + D exactly."""
    from attnctl.testing import make_tiny_pipeline

    from .test_guidance import run_denoiser

    pipe = make_tiny_pipeline(name)
    prompts = ["a cat", "a red car on the street"]  # different lengths: the text padding mask is in play
    stock, calls = record(pipe, name, prompt=prompts, steps=1, true_cfg_scale=1.0)
    got, _ = record(pipe, name, [attnctl.PAG(scale=1.5)], prompt=prompts, steps=1, true_cfg_scale=1.0)
    assert calls[0]["kwargs"]["encoder_hidden_states_mask"] is not None
    cond = run_denoiser(pipe, calls[0], [0, 1], 2)
    layer = pipe.transformer.transformer_blocks[1].attn  # the middle block of 2
    original = layer.processor
    layer.set_processor(RefQwenPAG())
    try:
        perturbed = run_denoiser(pipe, calls[0], [0, 1], 2)
    finally:
        layer.set_processor(original)
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + 1.5 * (cond - perturbed), rtol=1e-4, atol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("name", [pytest.param("tiny-flux2", marks=_needs("tiny-flux2"))])
def test_flux2_inpaint_with_reference_tokens_is_bitwise_stock(name, tiny):
    """Flux2KleinInpaintPipeline puts the encoded image's tokens into the sequence as reference tokens: attnctl reads
    them as such (`Canvas.reference_len`; tests/test_reference_tokens.py covers klein's `image=` and controls), and
    the output is bitwise stock under apply and after remove."""
    import diffusers
    from PIL import Image

    pipe = tiny(name)
    reference = Image.new("RGB", (64, 64), (200, 30, 30))  # the Flux.2 image processor wants >= 64 px
    inpaint = diffusers.Flux2KleinInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)

    def run():
        return inpaint(prompt=PROMPT, image=reference, mask_image=Image.new("L", (64, 64), 255), strength=0.6, num_inference_steps=2,
                       output_type="latent", generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS[name]).images

    stock = run()
    seen = []

    class Canvas(Probe):
        def bind(self, context):
            seen.append(context.canvas)
            return super().bind(context)

    with attnctl.apply(inpaint, [Canvas()]):
        assert torch.equal(run(), stock)
    assert torch.equal(run(), stock)
    assert seen and seen[0].reference_len == 256 and seen[0].token_hw == (16, 16)  # 64 px: the generated grid, references apart


class RefIdentitySelfAttention:
    """docs/methods.md "PAG" in self-attention: the perturbed attention is the identity, out = V (Wan's attn1:
    no qk-norm or RoPE reaches V), then the output projection."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_pag_is_identity_self_attention_on_the_video_tokens(name, guidance):
    from attnctl.testing import make_tiny_pipeline

    from .test_guidance import run_denoiser

    pipe = make_tiny_pipeline(name)
    stock, calls = record(pipe, name, prompt="a cat", steps=1, guidance=guidance)
    got, _ = record(pipe, name, [attnctl.PAG(scale=1.5)], prompt="a cat", steps=1, guidance=guidance)
    cond = run_denoiser(pipe, calls[0], [0], 1)
    layer = pipe.transformer.blocks[1].attn1  # the middle block of 2
    original = layer.processor
    layer.set_processor(RefIdentitySelfAttention())
    try:
        perturbed = run_denoiser(pipe, calls[0], [0], 1)
    finally:
        layer.set_processor(original)
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + 1.5 * (cond - perturbed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma", [2.0, float("inf")], ids=["finite", "infinite"])
@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_seg_blurs_the_queries_within_each_token_frame(name, sigma):
    """docs/methods.md "SEG" on video: the perturbed rows' image queries are blurred over each token frame's (h, w)
    grid, never across frames (sigma = inf: each frame's mean query); D = scale (cond - perturbed) from the stock
    denoiser with an independently blurred query projection (3 frames of 4x3 tokens, frame-major)."""
    from attnctl.testing import make_tiny_pipeline

    from .test_guidance import _blur_hook, run_denoiser

    pipe = make_tiny_pipeline(name)
    stock, calls = record(pipe, name, prompt="a cat", steps=1)
    got, _ = record(pipe, name, [attnctl.SEG(scale=2.0, sigma=sigma)], prompt="a cat", steps=1)
    cond = run_denoiser(pipe, calls[0], [0], 1)
    blur = _blur_hook(sigma, (4, 3))

    def per_frame(module, inputs, output):
        batch, tokens, channels = output.shape
        frames = output.reshape(batch * 3, tokens // 3, channels)
        return blur(module, inputs, frames).reshape(batch, tokens, channels)

    hook = pipe.transformer.blocks[1].attn1.to_q.register_forward_hook(per_frame)  # the middle block of 2
    try:
        perturbed = run_denoiser(pipe, calls[0], [0], 1)
    finally:
        hook.remove()
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + 2.0 * (cond - perturbed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_geometry_is_a_3d_token_grid(name, tiny):
    """The canvas of a Wan call: frames x height x width tokens, frame-major, never assumed square."""
    pipe = tiny(name)
    seen = []

    class Grid(Probe):
        def bind(self, context):
            seen.append((context.canvas, context.geometry(context.adapter.layers[0])))
            return super().bind(context)

    with attnctl.apply(pipe, [Grid()]):
        generate(pipe, name)
    canvas, geometry = seen[0]
    assert (canvas.frames, canvas.token_hw, canvas.latent_hw) == (3, (4, 3), (8, 6))
    assert geometry.image_len == 36 and geometry.frames == 3 and geometry.image_slice == slice(0, 36)


def test_readme_support_matrix_is_the_generated_one():
    """The README's control x family table is `attnctl.render.matrix.markdown()` (it cannot drift from the code)."""
    import pathlib

    from attnctl.render.matrix import FAMILIES, markdown
    from attnctl.testing.new_families import NEW_TINY_MODELS

    missing = [tiny for _, tiny in FAMILIES if tiny in NEW_TINY_MODELS and not available(tiny)]
    if missing:
        pytest.skip(f"the installed diffusers lacks {', '.join(missing)}; the README's matrix covers every family")
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- support-matrix:start -->\n", "\n<!-- support-matrix:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == markdown(), "regenerate the README's matrix: python -m attnctl.render.matrix"


@pytest.mark.parity
@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_video_to_video_identity(name, tiny, monkeypatch):
    import importlib
    import types

    import diffusers

    module = importlib.import_module("diffusers.pipelines.wan.pipeline_wan_video2video")
    if not hasattr(module, "ftfy"):  # the V2V pipeline calls ftfy unguarded (WanPipeline guards it): a no-op stand-in
        monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
    pipe = diffusers.WanVideoToVideoPipeline.from_pipe(tiny(name))
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    video = [Image.new("RGB", (48, 64), (20 * i, 100, 200 - 20 * i)) for i in range(9)]

    def run():
        return pipe(prompt=PROMPT, video=video, strength=0.7, num_inference_steps=3, guidance_scale=4.0, height=64, width=48,
                    output_type="latent", max_sequence_length=32, generator=torch.Generator().manual_seed(0)).frames

    stock = run()
    with attnctl.apply(pipe, [Probe()]):
        controlled = run()
    assert torch.equal(stock, controlled)
    assert torch.equal(stock, run())


MAP_PROMPTS = ["a red cat on the street", "a photo of a red car"]
MAP_WORDS = ["red", "cat", "street"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in TEXT if n != "tiny-wan"])
def test_attention_maps_match_an_eager_reference(name, tiny):
    """docs/methods.md "AttentionMaps": explicit softmax over every key of the row (the model's mask included),
    mean over heads, sum over the word's tokens, layers and steps, on the family's 8x8 image grid; cond rows only."""
    pipe = tiny(name)
    spy = Spy(layers="joint")
    with attnctl.apply(pipe, [attnctl.AttentionMaps(MAP_WORDS), spy]) as handle:
        generate(pipe, name, prompt=MAP_PROMPTS)
        result = handle.outputs["attention_maps"]
    tokenizer = getattr(pipe, TEXT[name][0])
    expected = torch.zeros(len(MAP_PROMPTS), len(MAP_WORDS), 8, 8, dtype=torch.float64)
    for record in spy.log:
        q, k = record["q"].double(), record["k"].double()
        n_q = q.shape[2]
        if TEXT[name][1] == "last":
            image_rows, text_start = slice(0, IMAGE_TOKENS), IMAGE_TOKENS
        else:
            image_rows, text_start = slice(n_q - IMAGE_TOKENS, n_q), 0
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = record["mask"]
        if mask is not None:
            logits = logits + (torch.zeros_like(mask, dtype=torch.float64).masked_fill(~mask, float("-inf"))
                               if mask.dtype == torch.bool else mask.double())
        probs = torch.softmax(logits, dim=-1)[:, :, image_rows].sum(1)
        for i, row in enumerate(record["rows"].rows):
            if row.branch != "cond":
                continue
            text = _as_encoded(pipe, name, MAP_PROMPTS[row.prompt])
            for w, word in enumerate(MAP_WORDS):
                keys = [text_start + p for p in _t5_positions(tokenizer, text, word)]
                if keys:
                    expected[row.prompt, w] += probs[i][:, keys].sum(-1).reshape(8, 8)
    assert expected[0].abs().sum() > 0 and expected[1, 1].abs().sum() == 0  # "cat" is not in the second prompt
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-5, atol=1e-6)


SEG_CASES = [  # name, query projection of the default (middle) layer, its grid at 32x48 pixels, extra call options
    pytest.param("tiny-chroma", "transformer_blocks.0.attn.to_q", (8, 12), {}, marks=_needs("tiny-chroma")),
    pytest.param("tiny-qwenimage", "transformer_blocks.1.attn.to_q", (8, 12), {"true_cfg_scale": 1.0}, marks=_needs("tiny-qwenimage")),
    pytest.param("tiny-flux2", "transformer_blocks.0.attn.to_q", (8, 12), {}, marks=_needs("tiny-flux2")),
]


@pytest.mark.parametrize("name, projection, grid, extra", SEG_CASES)
def test_seg_matches_a_query_blur_reference_on_a_non_square_grid(name, projection, grid, extra):
    """docs/methods.md "SEG": the perturbed rows' image queries (before qk-norm / RoPE) are blurred over the 2-D
    grid; D = scale (cond - perturbed) from the stock denoiser with an independently blurred query projection."""
    from attnctl.testing import make_tiny_pipeline

    from .test_guidance import _blur_hook, run_denoiser

    pipe = make_tiny_pipeline(name)
    size = {"height": 32, "width": 48, **extra}
    stock, calls = record(pipe, name, prompt="a cat", steps=1, **size)
    got, _ = record(pipe, name, [attnctl.SEG(scale=2.0, sigma=2.0)], prompt="a cat", steps=1, **size)
    cond = run_denoiser(pipe, calls[0], [0], 1)
    blur = _blur_hook(2.0, grid)

    def contiguous_blur(module, inputs, output):  # Qwen's complex RoPE views the queries as complex numbers
        return blur(module, inputs, output).contiguous()

    hook = pipe.transformer.get_submodule(projection).register_forward_hook(contiguous_blur)
    try:
        perturbed = run_denoiser(pipe, calls[0], [0], 1)
    finally:
        hook.remove()
    term = 2.0 * (cond - perturbed)
    assert term.abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + term, rtol=1e-4, atol=1e-4)


def test_modular_pipelines_are_refused_with_what_is_missing():
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "ModularPipeline"):
        pytest.skip("this diffusers has no modular pipelines")
    cls = getattr(diffusers, "Flux2KleinModularPipeline", diffusers.ModularPipeline)
    pipe = object.__new__(cls)  # no components needed: apply refuses before reading any
    with pytest.raises(attnctl.UnsupportedError, match="modular pipeline.*encode_prompt"):
        attnctl.apply(pipe, [])


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_vace_and_animate_are_refused_with_a_reason_of_their_own(name, tiny):
    """WanVACEPipeline and WanAnimatePipeline were refused as an unknown denoiser class ("not supported; supported:
    UNet2DConditionModel, ..."): the reason names what attnctl does not control and the Wan pipelines it does."""
    from diffusers import WanAnimateTransformer3DModel, WanVACEPipeline, WanVACETransformer3DModel

    base = tiny(name)
    vace = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32, freq_dim=16,
        ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0], vace_in_channels=12,
    ).eval()
    pipe = WanVACEPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler, transformer=vace)
    before = _processors(vace)
    with pytest.raises(attnctl.UnsupportedError, match=r"WanVACEPipeline\) is not supported: its VACE blocks \(vace_blocks\.\*\).*"
                                                       r"WanPipeline, WanImageToVideoPipeline and WanVideoToVideoPipeline are supported"):
        attnctl.apply(pipe, [attnctl.Reweight({"cat": 2.0})])
    assert _processors(vace) == before
    animate = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=32,
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8,
        face_encoder_num_heads=2, inject_face_latents_blocks=1,
        motion_encoder_channel_sizes={str(2**i): 8 for i in range(2, 11)},
    ).eval()
    with pytest.raises(attnctl.UnsupportedError, match=r"WanAnimatePipeline\) is not supported: its face-adapter cross-attention"):
        attnctl.handle.adapter_for(animate)


@pytest.mark.parity
@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in ("tiny-chroma", "tiny-flux2", "tiny-wan")])
def test_fused_projections_before_apply(name):
    """`fuse_qkv_projections()` made before apply: the controlled processors take the fused path as stock does."""
    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline(name)
    pipe.transformer.fuse_qkv_projections()
    stock = generate(pipe, name)
    with attnctl.apply(pipe, [Probe()]):
        controlled = generate(pipe, name)
    assert torch.equal(stock, controlled)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in TEXT])
def test_pladis_matches_the_formula_call_by_call(name, tiny):
    """docs/methods.md "PLADIS": on every row, the image queries' attention is dense + scale (entmax_1.5 - dense)
    of the same logits (normalised over the full row in joint attention); text queries stay dense."""
    from .test_guidance_math import ref_entmax

    pipe = tiny(name)
    cross = TEXT[name][1] == "keys"
    spy = Spy(layers="cross" if cross else "joint")
    with attnctl.apply(pipe, [attnctl.PLADIS(scale=2.0, alpha=1.5), spy]):
        generate(pipe, name, prompt=PROMPT)
    assert spy.log
    for record in spy.log:
        q, k, v = (record[x].double() for x in ("q", "k", "v"))
        n_q = q.shape[2]
        if cross:
            image_rows = slice(0, n_q)
        elif TEXT[name][1] == "last":
            image_rows = slice(0, IMAGE_TOKENS)
        else:
            image_rows = slice(n_q - IMAGE_TOKENS, n_q)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if record["mask"] is not None:
            assert record["mask"].dtype != torch.bool  # one prompt: Qwen-Image passes no mask; Chroma's is additive
            logits = logits + record["mask"].double()
        probs = torch.softmax(logits, -1)
        image = probs[:, :, image_rows]
        probs[:, :, image_rows] = image + 2.0 * (ref_entmax(logits[:, :, image_rows], 1.5) - image)
        torch.testing.assert_close(record["out"].double(), probs @ v, rtol=1e-4, atol=2e-5)  # entmax in float32


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in ("tiny-qwenimage", "tiny-flux2")])
def test_latent_image_is_the_pipelines_own_unpacking(name, tiny):
    """SAG blurs the latent as an image: the adapter's unpacking of the denoiser's tokens is the pipeline's own."""
    from attnctl.families import Canvas

    pipe = tiny(name)
    adapter = attnctl.handle.adapter_for(pipe.transformer)
    rows, cols, batch = 4, 6, 2
    tokens = torch.randn(batch, rows * cols, 16, generator=torch.Generator().manual_seed(0))
    canvas = Canvas(latent_hw=(2 * rows, 2 * cols), token_hw=(rows, cols), text_len=8)
    image = adapter.latent_image(tokens, canvas)
    if name == "tiny-qwenimage":  # the pipeline's helper takes pixel sizes
        factor = pipe.vae_scale_factor
        expected = pipe._unpack_latents(tokens, 2 * rows * factor, 2 * cols * factor, factor)[:, :, 0]
    else:
        ids = pipe._prepare_latent_ids(torch.zeros(batch, 16, rows, cols))
        unpacked = pipe._unpack_latents_with_ids(tokens, ids)
        expected = pipe._unpatchify_latents(unpacked if isinstance(unpacked, torch.Tensor) else torch.stack(unpacked))
    assert torch.equal(image, expected)
    assert torch.equal(adapter.packed_latents(image), tokens)


def _wan_image_to_video(base, monkeypatch, expand_timesteps=False, first_last=False):
    """A tiny WanImageToVideoPipeline from tiny-wan's parts, and its 2-step call. Wan 2.1 I2V: a transformer taking
    the image condition as 8 more input channels and CLIP image tokens; `expand_timesteps` (Wan 2.2 TI2V): tiny-wan's
    own transformer, the clean first latent frame the image, per-token timesteps; `first_last` (FLF2V): the Wan 2.1
    transformer with an image `pos_embed` over two images' CLIP tokens, called with a `last_image`."""
    import importlib
    import types

    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    module = importlib.import_module("diffusers.pipelines.wan.pipeline_wan_i2v")
    if not hasattr(module, "ftfy"):  # called unguarded by the I2V pipeline: a no-op stand-in
        monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
    parts = dict(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler)
    if expand_timesteps:
        pipe = WanImageToVideoPipeline(**parts, transformer=base.transformer, expand_timesteps=True)
    else:
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4, text_dim=32,
            freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
            image_dim=16, added_kv_proj_dim=24, pos_embed_seq_len=2 * 17 if first_last else None,  # 17 CLIP tokens per image
        ).eval()
        encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                   image_size=32, patch_size=8, projection_dim=16)).eval()
        pipe = WanImageToVideoPipeline(**parts, image_processor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
                                       image_encoder=encoder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (48, 64), (200, 30, 30))
    last = {"last_image": Image.new("RGB", (48, 64), (30, 30, 200))} if first_last else {}

    def run(prompt="a red cat"):
        return pipe(image=image, prompt=prompt, num_inference_steps=2, guidance_scale=4.0, height=64, width=48, num_frames=9,
                    max_sequence_length=512 if not expand_timesteps else 32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **last).frames

    return pipe, run


@pytest.mark.parity
@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_image_to_video_identity(name, tiny, monkeypatch):
    """Wan I2V: attn2 also attends to CLIP image tokens (the stock processor takes the last 512 context tokens as
    text); bitwise stock through attnctl's processor, and Reweight acts on the text part only."""
    pipe, run = _wan_image_to_video(tiny(name), monkeypatch)
    stock = run()
    with attnctl.apply(pipe, [Probe()]):
        controlled = run()
    assert torch.equal(stock, controlled) and torch.equal(stock, run())
    with attnctl.apply(pipe, [attnctl.Reweight({"red": 3.0})]):
        assert not torch.equal(run(), stock)


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_pag_on_wan_first_last_frame_perturbs_each_video_with_its_two_image_rows(name, tiny, monkeypatch):
    """Wan first-last-frame (FLF2V): the pipeline hands the transformer two CLIP rows per video (first and last frame),
    which it views as one row. PAG's perturbed rows take their video's two rows (they failed at the first denoiser call:
    "encoder_hidden_states_image has 4 rows, expected 2"): per step, the stock CFG combination plus
    scale * (cond - perturbed), the perturbed pass being the cond call with identity self-attention in block 1."""
    pipe, run = _wan_image_to_video(tiny(name), monkeypatch, first_last=True)
    scale, guidance = 1.5, 4.0
    calls, predictions = [], []
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale)]):
        # prepended after apply: sees the pipeline's own rows, before attnctl adds the perturbed ones
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True, prepend=True)
        step = pipe.scheduler.step
        pipe.scheduler.step = lambda output, *a, **k: (predictions.append(output.clone()), step(output, *a, **k))[1]
        try:
            run(prompt=["a red cat", "a blue dog"])
        finally:
            del pipe.scheduler.step
            hook.remove()
    assert len(calls) == 4 and len(predictions) == 2
    assert calls[0]["encoder_hidden_states_image"].shape[0] == 4  # 2 videos x (first, last)

    def forward(inputs):
        with torch.no_grad():
            return pipe.transformer(**{**inputs, "return_dict": False})[0]

    layer = pipe.transformer.blocks[1].attn1
    for index, prediction in enumerate(predictions):
        cond, uncond = forward(calls[2 * index]), forward(calls[2 * index + 1])
        original = layer.processor
        layer.set_processor(RefIdentitySelfAttention())
        try:
            perturbed = forward(calls[2 * index])
        finally:
            layer.set_processor(original)
        assert (cond - perturbed).abs().max() > 1e-4
        torch.testing.assert_close(prediction, uncond + guidance * (cond - uncond) + scale * (cond - perturbed), rtol=1e-5, atol=1e-5)
    stock = run(prompt=["a red cat", "a blue dog"])
    for control in (attnctl.SEG(scale=2.0), attnctl.SAG(scale=1.0), attnctl.SkipLayer(blocks=("blocks.1",), scale=2.0, steps=(0.0, 1.0))):
        with attnctl.apply(pipe, [control]):
            out = run(prompt=["a red cat", "a blue dog"])
        assert torch.isfinite(out).all() and not torch.equal(out, stock), type(control).__name__


def test_rebatch_moves_row_groups_whole_and_names_the_expected_rows():
    from attnctl.errors import CallLayoutError
    from attnctl.families.base import RowGroups
    from attnctl.pipelines.denoiser import rebatch

    images = torch.arange(4.0)  # two batch rows of (first, last)
    out = rebatch({"x": torch.arange(2.0), "images": images}, ("x", RowGroups("images", 2)), (), 2, (1, 0, 1))
    assert out["x"].tolist() == [1.0, 0.0, 1.0] and out["images"].tolist() == [2.0, 3.0, 0.0, 1.0, 2.0, 3.0]
    with pytest.raises(CallLayoutError, match=r"input images has 3 rows, expected 2 per batch row: 4"):
        rebatch({"images": torch.zeros(3)}, (RowGroups("images", 2),), (), 2, (0,))
    with pytest.raises(CallLayoutError, match=r"input x has 2 rows, expected 1$"):  # not "expected 1 (or 1)"
        rebatch({"x": torch.zeros(2)}, ("x",), (), 1, (0,))
    with pytest.raises(CallLayoutError, match=r"input x has 3 rows, expected 2 \(or 1\)$"):
        rebatch({"x": torch.zeros(3)}, ("x",), (), 2, (0,))


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
@pytest.mark.parametrize("expand_timesteps", [False, True], ids=["wan21-i2v", "wan22-ti2v"])
def test_sag_degrades_only_the_noisy_part_of_image_conditioned_wan(name, expand_timesteps, tiny, monkeypatch):
    """SAG's degraded pass re-noises what the denoiser is told is noisy, and nothing else: Wan 2.1 I2V's condition
    channels (the input's channels after the noisy latent; SAG failed on the channel count) and Wan 2.2 TI2V's clean
    first latent frame (its tokens at timestep 0; SAG blurred and re-noised it) reach the degraded pass as the step's
    own calls have them."""
    pipe, run = _wan_image_to_video(tiny(name), monkeypatch, expand_timesteps)
    stock = run()
    inputs = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: inputs.append(k.get("hidden_states", a[0] if a else None).clone()), with_kwargs=True)
    try:
        with attnctl.apply(pipe, [attnctl.SAG(scale=1.0)]):
            out = run()
    finally:
        hook.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert len(inputs) == 6  # per step: cond, uncond (Wan's CFG calls) and SAG's degraded pass
    kept = (lambda x: x[:, 4:]) if not expand_timesteps else (lambda x: x[:, :, 0])
    noisy = (lambda x: x[:, :4]) if not expand_timesteps else (lambda x: x[:, :, 1:])
    for step in (0, 3):
        assert all(torch.equal(kept(x), kept(inputs[step])) for x in inputs[step + 1 : step + 3])
    # the degraded pass of the second step (at the first, sigma 1, the input is all noise and re-noising keeps it)
    assert any(not torch.equal(noisy(x), noisy(inputs[3])) for x in inputs[4:6])


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_pag_adaptive_scale_reads_the_noisy_tokens_timestep_on_wan22_ti2v(name, tiny, monkeypatch):
    """diffusers' `pag_adaptive_scale`: at the scheduler's timestep T the scale is `max(scale - a (1000 - T), 0)`. Wan 2.2
    TI2V's denoiser gets a per-token timestep, 0 on the clean first frame and T elsewhere; PAG read token 0's and ran at
    `scale - 1000 a` at every step. Expected: per step, PAG at that step's scale (two step windows)."""
    pipe, run = _wan_image_to_video(tiny(name), monkeypatch, expand_timesteps=True)
    scale, adaptive = 3.0, 0.002
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale, adaptive_scale=adaptive)]):
        got = run()
    first, second = pipe.scheduler.timesteps.tolist()
    assert first == 1000.0 and 0 < second < 1000.0
    per_step = [attnctl.PAG(scale=max(scale - adaptive * (1000.0 - t), 0.0), steps=window)
                for t, window in ((first, (0.0, 0.5)), (second, (0.5, 1.0)))]
    with attnctl.apply(pipe, per_step):
        expected = run()
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale - 1000.0 * adaptive)]):  # the scale at token 0's t = 0
        wrong = run()
    assert (wrong - expected).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- video semantics on Wan (issue #19, branch video) ----------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_attention_maps_are_per_token_frame_against_an_eager_reference(name, tiny):
    """docs/methods.md "AttentionMaps" on video: per token frame, the explicit softmax of each image query over
    the umT5 keys, mean over heads, summed over the word's tokens, the cross-attention layers and the steps; cond
    rows only. The 36 video tokens are frame-major (3 frames of 4x3), so a frame's map is a slice, not a blur."""
    pipe = tiny(name)
    stock = generate(pipe, name, prompt=MAP_PROMPTS)
    spy = Spy(layers="cross")
    with attnctl.apply(pipe, [attnctl.AttentionMaps(MAP_WORDS), spy]) as handle:
        out = generate(pipe, name, prompt=MAP_PROMPTS)
        result = handle.outputs["attention_maps"]
    assert torch.equal(out, stock)  # capture never changes the output
    expected = torch.zeros(len(MAP_PROMPTS), len(MAP_WORDS), 3, 4, 3, dtype=torch.float64)
    for record in spy.log:
        q, k = record["q"].double(), record["k"].double()
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).sum(1)  # (b, 36, keys)
        for i, row in enumerate(record["rows"].rows):
            if row.branch != "cond":
                continue
            for w, word in enumerate(MAP_WORDS):
                keys = _t5_positions(pipe.tokenizer, MAP_PROMPTS[row.prompt], word)
                if keys:
                    expected[row.prompt, w] += probs[i][:, keys].sum(-1).reshape(3, 4, 3)
    assert expected[0].abs().sum() > 0 and expected[1, 1].abs().sum() == 0  # "cat" is not in the second prompt
    assert result.frames == 3
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-5, atol=1e-6)
    # resized per frame to the video's 64x48 pixels (Wan's spatial VAE factor 8)
    assert tuple(result.maps.shape) == (2, 3, 3, 64, 48)
    assert tuple(result["cat"].shape) == (2, 3, 64, 48) and tuple(result[0]["red"].shape) == (3, 64, 48)
    frame = F.interpolate(expected[:, :, 1].float(), size=(64, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(result.maps[:, :, 1], frame, rtol=1e-5, atol=1e-6)
    peak = result.normalized().amax(dim=(-3, -2, -1))
    assert torch.equal(peak[0], torch.ones(3))  # normalised over the whole video, not per frame


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_attention_map_pictures_are_a_strip_and_an_animated_gif(name, tiny, tmp_path):
    """The decoded frames (postprocess_video) come with the result; save writes per word a strip of the token
    frames and a GIF with one picture per decoded frame; the output is the stock video."""
    from PIL import Image

    from attnctl.controls.maps.heatmap import token_frame

    pipe = tiny(name)
    options = dict(CALL_DEFAULTS[name], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    stock = pipe(prompt=PROMPT, output_type="pil", **options).frames
    options["generator"] = torch.Generator().manual_seed(0)
    with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
        out = pipe(prompt=PROMPT, output_type="pil", **options).frames
        result = handle.outputs["attention_maps"]
    assert [[f.tobytes() for f in v] for v in out] == [[f.tobytes() for f in v] for v in stock]
    assert len(result.images) == 1 and len(result.images[0]) == 9  # 9 decoded frames of the one video
    paths = result.save(str(tmp_path), fps=10)
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["video0_cat.gif", "video0_cat_strip.png"]
    gif = Image.open(tmp_path / "video0_cat.gif")
    assert gif.n_frames == 9 and gif.size == (48, 64) and gif.info["duration"] == 100  # GIF stores centiseconds
    strip = Image.open(tmp_path / "video0_cat_strip.png")
    assert strip.width == 3 * round(48 * 128 / 64)  # three token frames side by side, tiles at least 128 px tall
    # Wan's causal VAE: frame 0 alone, then 4 frames per latent frame
    assert [token_frame(i, 9, 3) for i in range(9)] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [token_frame(i, 4, 3) for i in range(4)] == [0, 0, 1, 2]  # not 1 + 4k frames: spread evenly
    with pytest.raises(attnctl.ConfigError, match="fps must be a positive int"):
        result.save(str(tmp_path), fps=0)


class RefWanRegionCross:
    """Wan's cross-attention (`attn2`, text only) with docs/methods.md "Regions" in cross-attention, written out:
    out(x) = (1 - (1 - b) M(x)) A(x; base text) + (1 - b) sum_r m_r(x) A(x; region r's text), M = sum_r m_r, per
    video token x of the frame-major (frames x h x w) grid."""

    def __init__(self, region_text, weights, base_ratio):
        self.region_text, self.weights, self.b = region_text, weights, base_ratio  # (R, T, C), (R, N)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        def heads(t):
            return t.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        q = heads(attn.norm_q(attn.to_q(hidden_states)))

        def attend(context):
            k, v = heads(attn.norm_k(attn.to_k(context))), heads(attn.to_v(context))
            return F.scaled_dot_product_attention(q, k, v)

        base = attend(encoder_hidden_states)
        weights = self.weights.to(q.dtype)
        total = weights.sum(0)
        out = (1 - (1 - self.b) * total)[None, None, :, None] * base
        for r, text in enumerate(self.region_text):
            context = text[None].expand(q.shape[0], -1, -1)
            out = out + (1 - self.b) * weights[r][None, None, :, None] * attend(context)
        out = out.transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_tubes():
    """Two regions on tiny-wan's 3 x 4 x 3 token grid: a tube (a box on token frames 1-2) and per-frame boxes on
    frames 0-1, with their weights m_r written out cell by cell (box area per cell; no overlap above 1)."""
    regions = [
        attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0), frames=(1, 3)),
        attnctl.Region("a green tree", box=[(0.5, 0.0, 1.0, 0.5), (0.5, 0.5, 1.0, 1.0)], frames=(0, 2)),
    ]
    dog = torch.zeros(3, 4, 3)
    dog[1:, :, 0], dog[1:, :, 1] = 1.0, 0.5  # x in [0, 0.5] over 3 columns: all of column 0, half of column 1
    tree = torch.zeros(3, 4, 3)
    tree[0, :2, 1], tree[0, :2, 2] = 0.5, 1.0  # frame 0: rows 0-1 (y in [0, 0.5]), x in [0.5, 1]
    tree[1, 2:, 1], tree[1, 2:, 2] = 0.5, 1.0  # frame 1: rows 2-3
    return regions, torch.stack([dog.reshape(-1), tree.reshape(-1)])


@pytest.mark.parametrize("base_ratio", [0.0, 0.3])
@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_regions_are_tubes_in_cross_attention_against_a_reference(name, base_ratio, tiny):
    """Regions on video: a region's box on a frame range, and per-frame boxes, give per-token weights over
    (frames x h x w); the cross-attention blend of docs/methods.md, against the stock denoiser with a reference
    processor on every attn2 (no CFG: every call is a cond call)."""
    pipe = tiny(name)
    regions, weights = _wan_tubes()
    stock = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    with attnctl.apply(pipe, [attnctl.Regions(regions, base_ratio=base_ratio)]):
        got = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt([r.prompt for r in regions], do_classifier_free_guidance=False,
                                       max_sequence_length=CALL_DEFAULTS[name]["max_sequence_length"])
        region_text = pipe.transformer.condition_embedder.text_embedder(embeds)
    originals = {i: block.attn2.processor for i, block in enumerate(pipe.transformer.blocks)}
    for block in pipe.transformer.blocks:
        block.attn2.set_processor(RefWanRegionCross(region_text, weights, base_ratio))
    try:
        expected = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    finally:
        for i, block in enumerate(pipe.transformer.blocks):
            block.attn2.set_processor(originals[i])
    assert (expected - stock).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(pipe, name, prompt=PROMPT, guidance=1.0), stock)


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_region_layout_weights_and_bad_tubes(name, tiny):
    """The layout on a 3-D grid is frame-major; a mask per frame equals the same boxes rasterised; a frame range
    or a per-frame count that does not fit the video raises at the call, naming the value and what is allowed."""
    import numpy as np

    from attnctl.controls.regions.masks import Tube, grid_layout

    regions, weights = _wan_tubes()
    tubes = tuple(Tube(r.per_frame or (r.shape,), r.frames) for r in regions)
    layout = grid_layout(tubes, (3, 4, 3))
    torch.testing.assert_close(layout.weights, weights)
    masks = np.zeros((2, 40, 30), dtype=np.float32)  # the tree's two per-frame boxes as per-frame masks
    masks[0, :20, 15:], masks[1, 20:, 15:] = 1.0, 1.0
    tree = attnctl.Region("a green tree", mask=[masks[0], masks[1]], frames=(0, 2))
    assert len(tree.per_frame) == 2
    torch.testing.assert_close(grid_layout((Tube(tree.per_frame, tree.frames),), (3, 4, 3)).weights[0], weights[1])
    # serialisation keeps the frames and the per-frame boxes
    assert attnctl.Region.from_dict(regions[1].to_dict()) == regions[1]
    assert regions[1].to_dict()["frames"] == [0, 2]
    pipe = tiny(name)
    for bad, match in [
        (attnctl.Region("a dog", box=(0, 0, 1, 1), frames=(2, 5)), r"frames=\(2, 5\) lies outside this video's 3 token frames"),
        (attnctl.Region("a dog", box=[(0, 0, 1, 1)] * 2), r"2 per-frame shapes for token frames 0\.\.2"),
    ]:
        with attnctl.apply(pipe, [attnctl.Regions([bad])]), pytest.raises(attnctl.ConfigError, match=match):
            generate(pipe, name, prompt=PROMPT)
    with pytest.raises(attnctl.ConfigError, match=r"frames must be \(start, stop\)"):
        attnctl.Region("a dog", box=(0, 0, 1, 1), frames=(2, 2))
    with pytest.raises(attnctl.ConfigError, match="per-frame masks must share one size"):
        attnctl.Region("a dog", mask=[masks[0], masks[0][:10]])


def test_video_regions_are_refused_on_image_models():
    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline("tiny-sd")
    region = attnctl.Region("a dog", box=(0, 0, 0.5, 1), frames=(0, 1))
    with pytest.raises(attnctl.ConfigError, match="need a video denoiser"):
        attnctl.apply(pipe, [attnctl.Regions([region])])


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_fastattn_band_over_the_video_tokens_against_the_reference(name, tiny):
    """docs/methods.md "FastAttn" on video: window_residual with the 1-D band |i - j| <= w over the 36 frame-major
    video tokens (3 frames of 4x3, so a band of 8 reaches into the neighbouring frame), plus the residual cached at
    the full step; the FLOPs counted are the band's pairs. No CFG: one call per step."""
    from .cache_helpers import Capture, band_allowed, explicit_attention, make_plan

    pipe = tiny(name)
    layer = "blocks.0.attn1"
    plan = make_plan(pipe, 3, {layer: ["full", "window_residual", "window_residual"]}, window=8, resolution=(64, 48), frames=3)
    capture = Capture(layers=layer)
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(plan=plan)]) as handle:
        generate(pipe, name, prompt=PROMPT, steps=3, guidance=1.0)
        report = handle.outputs["fastattn"]
    calls = {entry[1]: entry for entry in capture.log}
    q0, k0, v0 = calls[0][3:6]
    n = q0.shape[2]
    assert n == 36
    band = band_allowed(n, 8)
    residual = explicit_attention(q0, k0, v0) - explicit_attention(q0, k0, v0, band)
    for step in (1, 2):
        q, k, v, out, window = calls[step][3:8]
        assert window.band == 8 and window.frames == 3 and window.n_img == 36
        torch.testing.assert_close(out, explicit_attention(q, k, v, band) + residual, rtol=1e-4, atol=1e-5)
    batch, heads, _, head_dim = q0.shape
    assert report.entries[(1, layer)].flops == 4.0 * batch * int(band.sum()) * heads * head_dim
    assert report.entries[(1, layer)].full_flops == 4.0 * batch * n * n * heads * head_dim
    with pytest.raises(attnctl.ConfigError, match=r"FastAttn.window=\(1, 2\) is a 2-D .* 3-D neighbourhood \(rf, rh, rw\)"):
        attnctl.apply(pipe, [attnctl.FastAttn(window=(1, 2))])


# -- render and loading of the new tiny models --------------------------------------------------------------------


def test_load_pipeline_lists_the_new_tiny_models():
    from attnctl.render.loading import check_model_name, embedded_models

    names = embedded_models()
    for name in NEW_TINY_MODELS:
        assert (name in names) == available(name), name
    if available("tiny-wan"):
        with pytest.raises(attnctl.ConfigError, match="did you mean 'tiny-wan'"):
            check_model_name("tiny_wan")


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_render_writes_a_video_with_its_parameters(name, tmp_path, capsys, monkeypatch):
    """`attnctl render` on a video pipeline: the first frame as the PNG (with the parameters, as for images), the
    frames as an animated GIF with the parameters in its comment (the format without imageio-ffmpeg; the MP4 is
    tests/test_video_render.py's), and one PNG per frame; the frames are the pipeline's own (same seed, same call)."""
    monkeypatch.setattr("attnctl.render.outputs.video_format", lambda: "gif")
    import json

    from PIL import Image

    from attnctl.render import cli
    from attnctl.render.outputs import read_gif_params, read_png_params

    jobs = tmp_path / "jobs.jsonl"
    control = {"type": "reweight", "weights": {"cat": 2.0}}
    jobs.write_text(json.dumps({"id": "cat", "prompt": PROMPT, "seeds": [3], "steps": 2, "controls": [control]}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["render", str(jobs), "--out", str(out), "--model", name, "--device", "cpu", "--progress", "none", "-q"]) == 0
    png, gif, frames = out / "cat" / "3.png", out / "cat" / "3.gif", out / "cat" / "3.frames"
    params = read_png_params(png)
    assert params["frames"] == 9 and params["fps"] == 16 and params["pipeline"] == "WanPipeline"
    assert read_gif_params(gif) == params
    with Image.open(gif) as animated:
        assert animated.n_frames == 9 and animated.size == (48, 64)
    written = sorted(p.name for p in frames.iterdir())
    assert written == [f"{i:04d}.png" for i in range(9)]
    assert read_png_params(frames / "0004.png") == {**params, "frame": 4}
    # the same call on the pipeline itself gives these frames
    pipe = attnctl.load_pipeline(name)
    options = dict(CALL_DEFAULTS[name], num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3))
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 2.0})]):
        video = pipe(PROMPT, output_type="pil", **options).frames[0]
    for i in (0, 8):
        with Image.open(frames / f"{i:04d}.png") as frame:
            assert frame.convert("RGB").tobytes() == video[i].convert("RGB").tobytes()
    with Image.open(png) as poster:
        assert poster.convert("RGB").tobytes() == video[0].convert("RGB").tobytes()
    from attnctl.render.runner import MANIFEST

    record = next(r for r in map(json.loads, (out / MANIFEST).read_text().splitlines()) if r.get("job") == "cat")
    assert record["status"] == "ok" and {"cat/3.gif", "cat/3.frames"} <= set(record["outputs"])


@pytest.mark.parametrize("name", [pytest.param("tiny-wan", marks=_needs("tiny-wan"))])
def test_wan_region_isolation_over_the_video_tokens_against_a_masked_self_attention(name, tiny):
    """docs/methods.md "Regions", isolation on video: image tokens of two different subject tubes do not see each
    other in self-attention (attn1, over all 36 video tokens, across frames); labels per token from the definition
    (the largest coverage if >= 1/2, ties to the later region). base_ratio=1: the region prompts change nothing."""
    pipe = tiny(name)
    regions, coverage = _wan_tubes()
    best = coverage.max(0).values
    label = torch.where(coverage[1] >= best, 2, 1)
    label = torch.where(best >= 0.5, label, 0)
    assert set(label.tolist()) == {0, 1, 2}
    apart = (label[:, None] > 0) & (label[None, :] > 0) & (label[:, None] != label[None, :])
    with attnctl.apply(pipe, [attnctl.Regions(regions, base_ratio=1.0, isolate=True)]):
        got = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    stock = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    originals = {i: block.attn1.processor for i, block in enumerate(pipe.transformer.blocks)}

    def masked(stock_processor):
        def call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return stock_processor(attn, hidden_states, encoder_hidden_states, ~apart[None, None], rotary_emb)
        return call

    for i, block in enumerate(pipe.transformer.blocks):
        block.attn1.set_processor(masked(originals[i]))
    try:
        expected = generate(pipe, name, prompt=PROMPT, guidance=1.0)
    finally:
        for i, block in enumerate(pipe.transformer.blocks):
            block.attn1.set_processor(originals[i])
    assert (expected - stock).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_reweight_tables_per_prompt_count_the_videos_per_prompt():
    """On a video pipeline the rows are prompts x num_videos_per_prompt: two tables for one prompt and two videos
    are refused as they are for images (they were applied per video row)."""
    if not available("tiny-wan"):
        pytest.skip("tiny-wan needs a newer diffusers")
    pipe = make_tiny_pipeline("tiny-wan")
    with attnctl.apply(pipe, [attnctl.Reweight([{"cat": 2.0}, {"cat": 0.5}])]):
        with pytest.raises(attnctl.ConfigError, match="1 prompt\\(s\\) x 2"):
            generate(pipe, "tiny-wan", prompt="a cat", steps=1, num_videos_per_prompt=2)


# -- Z-Image: captions of different padded lengths, image tokens padded to a multiple of 32 ----------------------

ZIMAGE = "tiny-zimage"
#: Its chat-templated caption has 46 tokens and pads to 64; the empty negative prompt's has 15 and pads to 32.
ZIMAGE_LONG = "a red cat " + "on the street " * 8 + "under a blue sky"
#: Per layout, the call's options: captions padding to different lengths per CFG row (64 and 32), a 32x40 image whose
#: 8x10 = 80 tokens the transformer pads to 96 (16 padding tokens between the image and the text), and both.
ZIMAGE_LAYOUTS = {
    "mixed-captions": dict(prompt=ZIMAGE_LONG, max_sequence_length=128),
    "padded-image": dict(prompt="a red cat", height=32, width=40),
    "both": dict(prompt=ZIMAGE_LONG, max_sequence_length=128, height=32, width=40),
}


@pytest.fixture(scope="module")
def wide_zimage():
    """tiny-zimage with a RoPE table long enough for a 64-token caption (axes_lens 256), so that stock runs it."""
    if not available(ZIMAGE):
        pytest.skip("needs diffusers with ZImagePipeline")
    from diffusers import ZImageTransformer2DModel

    pipe = make_tiny_pipeline(ZIMAGE)
    config = {key: value for key, value in dict(pipe.transformer.config).items() if not key.startswith("_")}
    config["axes_lens"] = [256, 32, 32]
    torch.manual_seed(0)
    pipe.transformer = ZImageTransformer2DModel(**config).eval()
    return pipe


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:.*is idle in this call")
@pytest.mark.parametrize(
    "layout, guidance",
    [("mixed-captions", 4.0), ("padded-image", 4.0), ("padded-image", 0.0), ("both", 4.0), ("both", 0.0)],
    ids=["mixed-captions-cfg", "padded-image-cfg", "padded-image-no-cfg", "both-cfg", "both-no-cfg"],  # one row: one caption
)
def test_zimage_padded_layouts_are_bitwise_stock_without_controls_and_with_idle_ones(wide_zimage, layout, guidance):
    """The first rule on Z-Image's padded layouts: apply with no controls, and controls that are idle (scale 0, factor 1,
    a step window the call does not reach), give stock's output bitwise. Both layouts used to raise CallLayoutError."""
    pipe, options = wide_zimage, ZIMAGE_LAYOUTS[layout]
    stock = generate(pipe, ZIMAGE, guidance=guidance, **options)
    idle = ([], [attnctl.PAG(scale=0.0)], [attnctl.SEG(scale=0.0)], [attnctl.Reweight({"cat": 1.0})],
            [attnctl.Reweight({"cat": 2.0}, steps=(0.9, 1.0))])
    for controls in idle:
        with attnctl.apply(pipe, controls):
            assert torch.equal(generate(pipe, ZIMAGE, guidance=guidance, **options), stock), controls
    assert torch.equal(generate(pipe, ZIMAGE, guidance=guidance, **options), stock)


class RefZImageReweight:
    """docs/methods.md "Reweight" in Z-Image's single-stream attention, in the transformer's own token order (image,
    image padding, caption, batch padding) and with its mask: the image queries of the rows in `weights` ({row:
    {caption position: factor}}) see their probabilities over those caption keys times the factor (normalize:
    softmax(logits + log w) instead); qk-norm and RoPE as the stock processor."""

    def __init__(self, image_tokens: int, text_start: int, weights: dict, normalize: bool):
        self.n, self.text_start, self.weights, self.normalize = image_tokens, text_start, weights, normalize

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from .test_zimage_guidance import zimage_qkv

        q, k, v = (t.transpose(1, 2).double() for t in zimage_qkv(attn, hidden_states, freqs_cis))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
        w = torch.ones(q.shape[0], k.shape[2], dtype=torch.float64)
        for row, positions in self.weights.items():
            for position, factor in positions.items():
                w[row, self.text_start + position] *= factor
        if self.normalize:
            bias = torch.zeros_like(logits)
            bias[:, :, : self.n] = torch.log(w)[:, None, None, :]
            probs = torch.softmax(logits + bias, -1)
        else:
            probs = torch.softmax(logits, -1)
            probs[:, :, : self.n] = probs[:, :, : self.n] * w[:, None, None, :]
        out = (probs @ v).to(hidden_states.dtype)
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


@pytest.mark.parametrize("normalize", [False, True], ids=["p2p", "normalize"])
@pytest.mark.parametrize("layout", ["mixed-captions", "both"])
def test_zimage_reweight_is_exact_on_mixed_caption_lengths_and_padded_images(wide_zimage, layout, normalize):
    """CFG rows [cond: 64-token caption, uncond: 32] (and a padded 32x40 image): Reweight scales the cond row's image
    queries' probabilities over the word's caption keys (the uncond row's extra positions are masked batch padding,
    the image padding is keys and queries as stock), against a dense reference in the transformer's own order."""
    pipe, options = wide_zimage, ZIMAGE_LAYOUTS[layout]
    table = {"cat": 3.0, "sky": 0.25}
    with attnctl.apply(pipe, [attnctl.Reweight(table, normalize=normalize)]) as handle:
        assert {layer.name for layer in handle.runtime.resolved[0]} == {f"layers.{i}.attention" for i in range(2)}
        got = generate(pipe, ZIMAGE, guidance=4.0, **options)
    stock = generate(pipe, ZIMAGE, guidance=4.0, **options)
    encoded = _as_encoded(pipe, ZIMAGE, options["prompt"])
    weights = {p: f for word, f in table.items() for p in _t5_positions(pipe.tokenizer, encoded, word)}
    assert len(weights) == 2
    height, width = options.get("height", 32), options.get("width", 32)
    image = (height // 4) * (width // 4)  # the tiny VAE's factor 2, then 2x2 patches
    padded = -(-image // 32) * 32
    layers = [layer.attention for layer in pipe.transformer.layers]
    originals = [layer.processor for layer in layers]
    for layer in layers:
        layer.set_processor(RefZImageReweight(image, padded, {0: weights}, normalize))  # row 0: the cond row
    try:
        expected = generate(pipe, ZIMAGE, guidance=4.0, **options)
    finally:
        for layer, processor in zip(layers, originals):
            layer.set_processor(processor)
    assert (expected - stock).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_zimage_padding_reorders_the_shared_rope_table_once_per_forward(wide_zimage, monkeypatch):
    """The RoPE table (and mask) every layer of a forward shares is re-ordered for the image padding once per forward,
    not at every controlled layer (constant work of an attention call)."""
    from attnctl.processors import zimage

    pipe, options = wide_zimage, ZIMAGE_LAYOUTS["padded-image"]
    tables, forwards = [], []
    reorder = zimage._padding_last
    monkeypatch.setattr(zimage, "_padding_last", lambda t, *a: (tables.append(t) if t.is_complex() else None, reorder(t, *a))[1])
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with attnctl.apply(pipe, [attnctl.Reweight({"cat": 3.0})]) as handle:
            generate(pipe, ZIMAGE, guidance=4.0, **options)
            assert len(handle.runtime.resolved[0]) == 2  # two controlled layers per forward
    finally:
        hook.remove()
    assert len(forwards) >= 2 and len(tables) == len(forwards)


def test_zimage_controls_undefined_over_image_padding_are_refused_at_the_call_with_the_sizes(wide_zimage):
    """A control whose effects are not defined over the padding tokens between the image and the text (here the
    cross-image links of ConsistentSubjects) is refused at a size whose token count is not a multiple of 32, naming
    the sizes and the sizes that work; it runs at such a size, and the stock call at the padded size is not refused."""
    from attnctl.errors import UnsupportedError

    pipe = wide_zimage
    prompts = ["a red cat", "a red cat"]
    control = attnctl.ConsistentSubjects(subject=(0.0, 0.0, 0.5, 1.0))
    with attnctl.apply(pipe, [control]):
        with pytest.raises(UnsupportedError, match=r"ConsistentSubjects \(linked_keys at .*16 padding tokens.* 8x10 = 80 "
                                                   r"image tokens are not a multiple of 32.*a multiple of 8 and the other of 4"):
            generate(pipe, ZIMAGE, prompt=prompts, height=32, width=40)
        assert torch.isfinite(generate(pipe, ZIMAGE, prompt=prompts, height=32, width=64)).all()  # 8x16 = 128 tokens
    stock = generate(pipe, ZIMAGE, prompt=prompts, height=32, width=40)
    with attnctl.apply(pipe, []):
        assert torch.equal(generate(pipe, ZIMAGE, prompt=prompts, height=32, width=40), stock)
    # idle in the call (a window holding none of its steps; two rows for interpolation): stock, with the idle warning
    for idle in (attnctl.ConsistentSubjects(subject=(0.0, 0.0, 0.5, 1.0), steps=(0.6, 0.9)), attnctl.AttentionInterpolation()):
        with attnctl.apply(pipe, [idle]), pytest.warns(attnctl.IdleControlWarning):
            assert torch.equal(generate(pipe, ZIMAGE, prompt=prompts, height=32, width=40), stock)


def test_zimage_separate_perturbed_rows_with_a_negative_prompt_longer_than_the_prompt(wide_zimage):
    """PAG(separate=True) runs the cond rows by themselves; with a negative prompt whose caption pads longer (64) than
    the prompt's (32), that forward's sequence is shorter than the call's. The processor pads it as the call does (masked
    positions), so the term is the batched one's. It used to raise CallLayoutError (a token-count mismatch)."""
    pipe = wide_zimage
    options = dict(prompt="a red cat", negative_prompt=ZIMAGE_LONG, max_sequence_length=128)
    with attnctl.apply(pipe, [attnctl.PAG(scale=1.5)]):
        batched = generate(pipe, ZIMAGE, **options)
    with attnctl.apply(pipe, [attnctl.PAG(scale=1.5, separate=True)]):
        separate = generate(pipe, ZIMAGE, **options)
    assert (batched - generate(pipe, ZIMAGE, **options)).abs().max() > 1e-4
    torch.testing.assert_close(separate, batched, rtol=1e-4, atol=1e-4)
