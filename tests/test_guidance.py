"""Guidance controls on the tiny pipelines: parity with diffusers' own implementations, identities, and
independent references built from the stock models (forward hooks, reference processors)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.controls.guidance import sag as sag_module
from attnctl.families import adapter_for
from attnctl.processors.chain import own_rows
from attnctl.processors.edit import Edit, LayerHook
from attnctl.testing import CALL_DEFAULTS, TINY_MODELS, make_tiny_pipeline

from .helpers import PROMPTS, Probe, generate
from .test_guidance_math import ref_blur, ref_entmax

pytestmark = pytest.mark.parity


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _components(pipe, drop=()):
    return {k: v for k, v in pipe.components.items() if k not in drop}


class StepRecorder:
    """Records the prediction the pipeline hands to `scheduler.step` and the denoiser's first call's inputs."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.predictions: list[torch.Tensor] = []
        self.calls: list[dict] = []
        original = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.predictions.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        pipe.scheduler.step = step
        self._hook = _denoiser(pipe).register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.calls.append({"args": args, "kwargs": dict(kwargs)})

    def close(self):
        del self.pipe.scheduler.step
        self._hook.remove()


def record(pipe, name, controls=(), **kwargs):
    """(predictions handed to scheduler.step, denoiser calls) of one generation, with `controls` applied."""
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


def rows_of(call: dict, rows: list[int], batch: int) -> tuple[tuple, dict]:
    """A denoiser call's inputs restricted to `rows` (every tensor whose first dimension is the batch)."""

    def take(value):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            return value[rows]
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        return value

    return tuple(take(a) for a in call["args"]), {k: take(v) for k, v in call["kwargs"].items()}


def run_denoiser(pipe, call, rows, batch):
    args, kwargs = rows_of(call, rows, batch)
    kwargs = dict(kwargs)
    kwargs["return_dict"] = False
    with torch.no_grad():
        return _denoiser(pipe)(*args, **kwargs)[0]


# -- parity with diffusers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance, adaptive", [(5.0, 0.0), (1.0, 0.0), (5.0, 0.002)], ids=["cfg", "no-cfg", "adaptive"])
def test_pag_matches_diffusers_sd(guidance, adaptive):
    from diffusers import StableDiffusionPAGPipeline

    pipe = make_tiny_pipeline("tiny-sd")
    reference_pipe = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    reference_pipe.set_progress_bar_config(disable=True)
    expected = generate(reference_pipe, "tiny-sd", steps=3, guidance=guidance, pag_scale=3.0, pag_adaptive_scale=adaptive)
    stock = generate(pipe, "tiny-sd", steps=3, guidance=guidance)
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0, layers="mid", adaptive_scale=adaptive)]):
        got = generate(pipe, "tiny-sd", steps=3, guidance=guidance)
    assert (expected - stock).abs().max() > 1e-2  # PAG changes the result
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, pipeline", [("tiny-sd", "StableDiffusionPAGPipeline"), ("tiny-sdxl", "StableDiffusionXLPAGPipeline")])
def test_pag_with_guidance_rescale_matches_diffusers(name, pipeline):
    """With `guidance_rescale` the pipeline rescales toward the cond prediction's spread, as diffusers' PAG pipelines
    do: D goes to the uncond rows as D / (1 - s) (`rescale_shares`), the cond rows stay the plain prediction."""
    import diffusers

    pipe = make_tiny_pipeline(name)
    reference_pipe = getattr(diffusers, pipeline)(**pipe.components, pag_applied_layers=["mid"])
    reference_pipe.set_progress_bar_config(disable=True)
    options = dict(steps=3, guidance=5.0, guidance_rescale=0.7)
    expected = generate(reference_pipe, name, pag_scale=3.0, **options)
    unrescaled = generate(reference_pipe, name, pag_scale=3.0, steps=3, guidance=5.0)
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0, layers="mid")]):
        got = generate(pipe, name, **options)
    assert (expected - unrescaled).abs().max() > 1e-2  # the rescale changes the result
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, pipeline, layers, leave_out", [
    ("tiny-sdxl", "StableDiffusionXLPAGPipeline", "mid", ()),
    ("tiny-sd3", "StableDiffusion3PAGPipeline", "blocks.1", ("image_encoder", "feature_extractor")),  # no qk-norm
    ("tiny-pixart", "PixArtSigmaPAGPipeline", "blocks.1", ()),
])
def test_pag_matches_diffusers_pipelines(name, pipeline, layers, leave_out):
    """PAG with its default layers against diffusers' PAG pipeline of the family (diffusers' PAG processors skip
    qk-norm: the tiny models have none)."""
    import diffusers

    pipe = make_tiny_pipeline(name)
    reference_pipe = getattr(diffusers, pipeline)(**_components(pipe, leave_out), pag_applied_layers=[layers])
    reference_pipe.set_progress_bar_config(disable=True)
    expected = generate(reference_pipe, name, steps=3, pag_scale=3.0)
    stock = generate(pipe, name, steps=3)
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0)]):
        got = generate(pipe, name, steps=3)
    assert (expected - stock).abs().max() > 1e-2  # PAG changes the result
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, variant, reference, adaptive", [
    ("tiny-sd", "StableDiffusionImg2ImgPipeline", "StableDiffusionPAGImg2ImgPipeline", 0.0),
    ("tiny-sd", "StableDiffusionControlNetPipeline", "StableDiffusionControlNetPAGPipeline", 0.002),
    ("tiny-sdxl", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLPAGInpaintPipeline", 0.0),
    ("tiny-sd3", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3PAGImg2ImgPipeline", 0.002),
], ids=["sd-img2img", "sd-controlnet", "sdxl-inpaint", "sd3-img2img"])
def test_pag_matches_diffusers_pag_variants(name, variant, reference, adaptive):
    """The img2img / inpaint / ControlNet pipelines against diffusers' PAG pipeline of the same variant, sharing the
    components, at the pipelines' default (CFG) guidance scale; every PAG variant of SD / SDXL / SD3 / PixArt agreed
    within 1e-5 when checked (sd / sdxl inpaint, ControlNet img2img / inpaint too): four are held here."""
    import diffusers

    from attnctl.testing import tiny_sd_controlnet

    base = make_tiny_pipeline(name)
    plain = tiny_sd_controlnet(base, seed=1) if "ControlNet" in variant else getattr(diffusers, variant).from_pipe(base)
    pag = getattr(diffusers, reference).from_pipe(plain, pag_applied_layers=["blocks.1" if name == "tiny-sd3" else "mid"])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # one per prompt
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    inputs = {"image": pixels} if "ControlNet" in variant else {"image": pixels, "strength": 0.75}
    if "Inpaint" in variant:
        inputs["mask_image"] = mask
    denoiser = base.unet if hasattr(base, "unet") else base.transformer
    stock_processors = dict(denoiser.attn_processors)
    pag.set_progress_bar_config(disable=True)

    def run(pipe, **extra):  # CALL_DEFAULTS less what the variant does not take (img2img: no height / width)
        taken = inspect.signature(type(pipe).__call__).parameters
        options = {k: v for k, v in CALL_DEFAULTS[name].items() if k in taken}
        generator = torch.Generator().manual_seed(0)
        return pipe(PROMPTS, num_inference_steps=3, output_type="latent", generator=generator, **options, **inputs, **extra).images

    expected = run(pag, pag_scale=3.0, pag_adaptive_scale=adaptive)
    denoiser.set_attn_processor(dict(stock_processors))  # SDXL's PAG inpaint returns latents before restoring them
    stock = run(plain)
    with attnctl.apply(plain, [attnctl.PAG(scale=3.0, adaptive_scale=adaptive, layers="transformer_blocks.1" if name == "tiny-sd3" else "mid")]):
        got = run(plain)
    assert (expected - stock).abs().max() > 1e-2  # PAG changes the result
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_sag_matches_diffusers_sag_pipeline_ddim(guidance):
    from diffusers import StableDiffusionSAGPipeline

    pipe = make_tiny_pipeline("tiny-sd")
    reference_pipe = StableDiffusionSAGPipeline(**pipe.components)
    reference_pipe.set_progress_bar_config(disable=True)
    expected = generate(reference_pipe, "tiny-sd", steps=3, guidance=guidance, sag_scale=0.75)
    stock = generate(pipe, "tiny-sd", steps=3, guidance=guidance)
    with attnctl.apply(pipe, [attnctl.SAG(scale=0.75)]):
        got = generate(pipe, "tiny-sd", steps=3, guidance=guidance)
    assert (expected - stock).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocks, window", [((0,), (0.2, 0.6)), ((1,), (0.0, 0.8)), ((0, 1), (0.4, 1.0)), ((0,), (0.19, 0.81))])
def test_skip_layer_matches_sd3_skip_guidance_layers(blocks, window):
    """The same window numbers as SD3's `skip_layer_guidance_start` / `_stop` (strict at both ends: `n start < i <
    n stop`) guide the same steps and give the pipeline's own result."""
    pipe = make_tiny_pipeline("tiny-sd3")
    start, stop = window
    expected = generate(pipe, "tiny-sd3", steps=5, skip_guidance_layers=list(blocks), skip_layer_guidance_scale=2.8,
                        skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    stock = generate(pipe, "tiny-sd3", steps=5)
    with attnctl.apply(pipe, [attnctl.SkipLayer(scale=2.8, blocks=blocks, steps=window)]):
        got = generate(pipe, "tiny-sd3", steps=5)
    assert (expected - stock).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all("forward" not in block.__dict__ for block in pipe.transformer.transformer_blocks)


# -- identities -----------------------------------------------------------------------------------------------


def _zero_scale_controls(name):
    controls = [attnctl.PAG(scale=0.0), attnctl.SEG(scale=0.0, sigma=2.0), attnctl.SAG(scale=0.0), attnctl.PLADIS(scale=0.0)]
    blocks = {"tiny-sd": ("mid_block.attentions.0.transformer_blocks.0",), "tiny-sdxl": ("down_blocks.1.attentions.0.transformer_blocks.0",)}
    controls.append(attnctl.SkipLayer(scale=0.0, blocks=blocks.get(name, (0,)), steps=(0.0, 1.0)))
    return controls


@pytest.mark.parametrize("name", TINY_MODELS)
def test_scale_zero_and_empty_window_are_bitwise_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=2)
    probe = Probe()
    outside = [attnctl.PAG(steps=(0.9, 1.0)), attnctl.PLADIS(steps=(0.75, 1.0)), attnctl.SAG(steps=(0.6, 0.9))]
    for controls in (_zero_scale_controls(name), outside):
        with attnctl.apply(pipe, [probe, *controls]):
            got = generate(pipe, name, steps=2)
        assert torch.equal(got, stock)
    rows = [entry[3] for entry in probe.log if entry[0] != "bind"]
    assert rows and all(tag is None for layout in rows for (_, _, tag) in layout)  # no rows were added


# -- SEG against a forward hook on the stock UNet ------------------------------------------------------------


def _blur_hook(sigma, grid_hw):
    def hook(module, args, output):
        batch, n, channels = output.shape
        if sigma >= 9999:
            return output.mean(1, keepdim=True).expand_as(output)
        grids = output.transpose(1, 2).reshape(batch, channels, *grid_hw)
        blurred = torch.stack([ref_blur(g, sigma) for g in grids]).float()
        return blurred.reshape(batch, channels, n).transpose(1, 2)

    return hook


SEG_CASES = [
    # name, size, query projection of the default layer, its grid, cond rows of the CFG batch
    ("tiny-sd", {"height": 16, "width": 64}, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", (4, 16)),
    ("tiny-sd3", {"height": 32, "width": 48}, "transformer_blocks.1.attn.to_q", (16, 24)),
    ("tiny-flux", {"height": 32, "width": 48}, "transformer_blocks.0.attn.to_q", (8, 12)),
    ("tiny-pixart", {"height": 32, "width": 48}, "transformer_blocks.1.attn1.to_q", (8, 12)),
]


@pytest.mark.parametrize("sigma", [2.0, float("inf")], ids=["finite", "infinite"])
@pytest.mark.parametrize("name, size, projection, grid", SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_seg_matches_a_query_blur_reference_on_a_non_square_latent(name, size, projection, grid, sigma):
    """SEG's D at step 0 equals scale (cond - perturbed), with `perturbed` from the stock denoiser whose query
    projection (image tokens, before qk-norm / RoPE) is blurred by an independent reference, on non-square
    latents (the tiny-sd case also replicates along the 4-token axis)."""
    pipe = make_tiny_pipeline(name)
    stock, calls = record(pipe, name, prompt="a cat", steps=1, **size)
    got, _ = record(pipe, name, [attnctl.SEG(scale=2.0, sigma=sigma)], prompt="a cat", steps=1, **size)
    call = calls[0]
    batch = 1 if name == "tiny-flux" else 2
    cond = run_denoiser(pipe, call, [batch - 1], batch)
    handle = _denoiser(pipe).get_submodule(projection).register_forward_hook(_blur_hook(sigma, grid))
    try:
        perturbed = run_denoiser(pipe, call, [batch - 1], batch)
    finally:
        handle.remove()
    term = 2.0 * (cond - perturbed)
    if name == "tiny-pixart":  # learned sigma: the pipeline keeps the first half of the channels
        term = term[:, : stock[0].shape[1]]
    assert term.abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + term, rtol=1e-4, atol=1e-4)


# -- PLADIS against eager reference processors --------------------------------------------------------------


class RefCrossPLADIS:
    """AttnProcessor2_0 for cross-attention with `dense + scale (entmax - dense)` written out (sort-based entmax)."""

    def __init__(self, scale, alpha):
        self.scale, self.alpha = scale, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        q, k, v = (t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        dense = torch.softmax(logits, -1)
        probs = dense + self.scale * (ref_entmax(logits, self.alpha) - dense)
        out = (probs @ v.double()).float().transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


class RefJointPLADIS:
    """SD3's JointAttnProcessor2_0 with PLADIS on the image-query rows (normalised over the full row)."""

    def __init__(self, scale, alpha):
        self.scale, self.alpha = scale, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, n = hidden_states.shape[:2]

        def heads(t):
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        k = heads(attn.to_k(hidden_states))
        v = heads(attn.to_v(hidden_states))
        q = torch.cat([q, heads(attn.add_q_proj(encoder_hidden_states))], 2)
        k = torch.cat([k, heads(attn.add_k_proj(encoder_hidden_states))], 2)
        v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states))], 2)
        logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        dense = torch.softmax(logits, -1)
        probs = dense.clone()
        probs[:, :, :n] = dense[:, :, :n] + self.scale * (ref_entmax(logits[:, :, :n], self.alpha) - dense[:, :, :n])
        out = (probs @ v.double()).float().transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1])
        image, text = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


@pytest.mark.parametrize("name, alpha", [("tiny-sd", 1.5), ("tiny-sd", 2.0), ("tiny-sd3", 1.5)])
def test_pladis_matches_an_eager_reference(name, alpha):
    pipe = make_tiny_pipeline(name)
    denoiser = _denoiser(pipe)
    originals = dict(denoiser.attn_processors)
    reference = RefCrossPLADIS if name == "tiny-sd" else RefJointPLADIS
    kind = "attn2" if name == "tiny-sd" else "attn"
    processors = {key: (reference(2.0, alpha) if key.endswith(f"{kind}.processor") else proc) for key, proc in originals.items()}
    options = {"steps": 2} if name == "tiny-sd" else {"steps": 1, "max_sequence_length": 8}  # entmax sorts: keep it small
    stock = generate(pipe, name, **options)
    denoiser.set_attn_processor(dict(processors))
    try:
        expected = generate(pipe, name, **options)
    finally:
        denoiser.set_attn_processor(dict(originals))
    with attnctl.apply(pipe, [attnctl.PLADIS(scale=2.0, alpha=alpha)]) as handle:
        got = generate(pipe, name, **options)
        assert "reference" in handle.describe()  # sdpa cannot do sparse: auto routed the layers
    assert (expected - stock).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- Flux: PAG without CFG and with true CFG, against a dense-mask reference processor ----------------------


class RefFluxPAG:
    """Flux double-block attention (qk-norm, RoPE) with diffusers' joint PAG mask, dense (N x N)."""

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
        block = torch.full((n, n), float("-inf"))
        block.fill_diagonal_(0.0)
        mask[text:, text:] = block
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3)
        context, image = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(context)


@pytest.mark.parametrize("extra", [{}, {"negative_prompt": "a dog", "true_cfg_scale": 3.0}], ids=["no-cfg", "true-cfg"])
def test_flux_pag_against_a_dense_mask_reference(extra):
    pipe = make_tiny_pipeline("tiny-flux")
    stock, calls = record(pipe, "tiny-flux", prompt="a cat", steps=1, **extra)
    got, _ = record(pipe, "tiny-flux", [attnctl.PAG(scale=1.5)], prompt="a cat", steps=1, **extra)
    call = calls[0]  # the cond call comes first
    cond = run_denoiser(pipe, call, [0], 1)
    layer = pipe.transformer.transformer_blocks[0].attn
    original = layer.processor
    layer.set_processor(RefFluxPAG())
    try:
        perturbed = run_denoiser(pipe, call, [0], 1)
    finally:
        layer.set_processor(original)
    assert (cond - perturbed).abs().max() > 1e-4
    # D is added to the cond and (true CFG) the uncond prediction: neg + D + s (cond - neg) = stock + D
    torch.testing.assert_close(got[0], stock[0] + 1.5 * (cond - perturbed), rtol=1e-4, atol=1e-4)


class RefSD3PAG:
    """SD3's JointAttnProcessor2_0 (qk-norm included) with diffusers' joint PAG mask, dense; identity attention
    for the image-only `attn2` of SD3.5 dual blocks."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, n = hidden_states.shape[:2]

        def heads(t):
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is None:
            out = v.transpose(1, 2).reshape(batch, n, -1)
            return attn.to_out[1](attn.to_out[0](out))
        q, k = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        total = q.shape[2]
        mask = torch.zeros(total, total)
        block = torch.full((n, n), float("-inf"))
        block.fill_diagonal_(0.0)
        mask[:n, :n] = block
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, total, -1)
        image, text = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


def test_sd35_pag_applies_qk_norm_and_perturbs_dual_attention():
    pipe = make_tiny_pipeline("tiny-sd3", qk_norm="rms_norm", dual_attention_layers=(1,))
    stock, calls = record(pipe, "tiny-sd3", prompt="a cat", steps=1)
    got, _ = record(pipe, "tiny-sd3", [attnctl.PAG(scale=2.0)], prompt="a cat", steps=1)
    call = calls[0]
    cond = run_denoiser(pipe, call, [1], 2)
    block = pipe.transformer.transformer_blocks[1]
    originals = (block.attn.processor, block.attn2.processor)
    block.attn.set_processor(RefSD3PAG())
    block.attn2.set_processor(RefSD3PAG())
    try:
        perturbed = run_denoiser(pipe, call, [1], 2)
    finally:
        block.attn.set_processor(originals[0])
        block.attn2.set_processor(originals[1])
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got[0], stock[0] + 2.0 * (cond - perturbed), rtol=1e-4, atol=1e-4)


# -- composition, separate forwards, SD3's own skip-layer pass ----------------------------------------------


def test_pag_and_seg_compose_and_separate_equals_batched():
    pipe = make_tiny_pipeline("tiny-sd")
    kw = {"prompt": ["a cat", "a dog"], "steps": 1}
    stock, _ = record(pipe, "tiny-sd", **kw)
    pag, _ = record(pipe, "tiny-sd", [attnctl.PAG(scale=2.0)], **kw)
    seg, _ = record(pipe, "tiny-sd", [attnctl.SEG(scale=1.5, sigma=1.0)], **kw)
    both, _ = record(pipe, "tiny-sd", [attnctl.PAG(scale=2.0), attnctl.SEG(scale=1.5, sigma=1.0)], **kw)
    apart, _ = record(pipe, "tiny-sd", [attnctl.PAG(scale=2.0, separate=True), attnctl.SEG(scale=1.5, sigma=1.0, separate=True)], **kw)
    assert (pag[0] - stock[0]).abs().max() > 1e-3 and (seg[0] - stock[0]).abs().max() > 1e-3
    torch.testing.assert_close(both[0] - stock[0], (pag[0] - stock[0]) + (seg[0] - stock[0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(apart[0], both[0], rtol=1e-4, atol=1e-4)


def test_separate_perturbation_pass_keeps_sags_map():
    """PAG / SEG with `separate=True` beside SAG: their extra forward of the same step must not drop the map SAG read
    in the main forward (every call failed: "layer ... did not run"); the result is the batched form's."""
    pipe = make_tiny_pipeline("tiny-sd")
    kw = {"prompt": ["a cat", "a dog"], "steps": 2}
    for make in (attnctl.PAG, lambda **k: attnctl.SEG(sigma=1.0, **k)):
        batched, _ = record(pipe, "tiny-sd", [make(scale=2.0), attnctl.SAG()], **kw)
        for controls in ([make(scale=2.0, separate=True), attnctl.SAG()], [attnctl.SAG(), make(scale=2.0, separate=True)]):
            apart, _ = record(pipe, "tiny-sd", controls, **kw)
            torch.testing.assert_close(apart[0], batched[0], rtol=1e-4, atol=1e-4)


def test_two_pag_controls_on_different_layers_compose():
    pipe = make_tiny_pipeline("tiny-sd")
    stock, _ = record(pipe, "tiny-sd", steps=1)
    first, _ = record(pipe, "tiny-sd", [attnctl.PAG(scale=1.0, layers="mid")], steps=1)
    second, _ = record(pipe, "tiny-sd", [attnctl.PAG(scale=1.0, layers="self & up")], steps=1)
    both, _ = record(pipe, "tiny-sd", [attnctl.PAG(scale=1.0, layers="mid"), attnctl.PAG(scale=1.0, layers="self & up")], steps=1)
    torch.testing.assert_close(both[0] - stock[0], (first[0] - stock[0]) + (second[0] - stock[0]), rtol=1e-4, atol=1e-4)


def test_sd3_own_skip_layer_pass_gets_the_same_guidance_term():
    """With the pipeline's SLG on, its skip pass gets D too, so `text - skip` is unchanged: the result moves by D."""
    pipe = make_tiny_pipeline("tiny-sd3")
    slg = {"skip_guidance_layers": [0], "skip_layer_guidance_start": -0.5, "skip_layer_guidance_stop": 1.0}
    stock, _ = record(pipe, "tiny-sd3", steps=1)
    pag, _ = record(pipe, "tiny-sd3", [attnctl.PAG(scale=2.0)], steps=1)
    stock_slg, calls = record(pipe, "tiny-sd3", steps=1, **slg)
    both, _ = record(pipe, "tiny-sd3", [attnctl.PAG(scale=2.0)], steps=1, **slg)
    assert len(calls) == 2 and (stock_slg[0] - stock[0]).abs().max() > 1e-4
    torch.testing.assert_close(both[0] - stock_slg[0], pag[0] - stock[0], rtol=1e-4, atol=1e-4)


# -- skip-layer guidance on the other families, against the block skipped by hand ---------------------------


@pytest.mark.parametrize(
    "name, blocks, path",
    [("tiny-pixart", (0,), "transformer_blocks.0"), ("tiny-flux", (0,), "transformer_blocks.0"),
     ("tiny-flux", ("single_transformer_blocks.1",), "single_transformer_blocks.1"),
     ("tiny-sd", ("mid_block.attentions.0.transformer_blocks.0",), "mid_block.attentions.0.transformer_blocks.0")],
)
def test_skip_layer_against_a_hand_skipped_block(name, blocks, path):
    pipe = make_tiny_pipeline(name)
    # SkipLayer's window is strict at both ends, as SD3's (step 0 never guided): step 1 of 2 is the one compared
    stock, calls = record(pipe, name, prompt="a cat", steps=2)
    got, _ = record(pipe, name, [attnctl.SkipLayer(scale=2.0, blocks=blocks, steps=(0.0, 1.0))], prompt="a cat", steps=2)
    torch.testing.assert_close(got[0], stock[0], rtol=0, atol=0)
    call = calls[1]
    batch = 2 if name != "tiny-flux" else 1
    rows = [batch - 1]
    cond = run_denoiser(pipe, call, rows, batch)
    block = _denoiser(pipe).get_submodule(path)

    def skipped(hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return hidden_states if type(block).__name__ == "BasicTransformerBlock" else (encoder_hidden_states, hidden_states)

    block.forward = skipped
    try:
        perturbed = run_denoiser(pipe, call, rows, batch)
    finally:
        del block.forward
    term = 2.0 * (cond - perturbed)
    if name == "tiny-pixart":  # learned sigma: the pipeline keeps the first half of the channels
        term = term[:, : stock[1].shape[1]]
    assert term.abs().max() > 1e-4
    torch.testing.assert_close(got[1], stock[1] + term, rtol=1e-4, atol=1e-4)
    assert "forward" not in block.__dict__


@pytest.mark.parametrize("name, block, siblings", [
    ("tiny-sd", "typo", None),  # no parent path: no sibling count (it said ";  has 0 block(s)")
    ("tiny-sd3", 99, "transformer_blocks has 2 block(s)"),
])
def test_skip_layer_names_a_missing_block_and_its_siblings_only_where_it_has_some(tiny_cache, name, block, siblings):
    with pytest.raises(attnctl.errors.SelectionError, match=r"does not exist in \w+; (\w+ has \d+ block\(s\); )?blocks: ") as info:
        attnctl.apply(tiny_cache(name), [attnctl.SkipLayer(blocks=(block,))])
    message = str(info.value)
    assert " has 0 block(s)" not in message and ";  " not in message
    assert (siblings in message) if siblings else ("block(s)" not in message)


def test_skip_layer_wrappers_are_removed_after_an_error():
    pipe = make_tiny_pipeline("tiny-sd3")
    block = pipe.transformer.transformer_blocks[0]
    handle = attnctl.apply(pipe, [attnctl.SkipLayer(blocks=(0,), steps=(0.0, 1.0))])
    with pytest.raises(RuntimeError, match="boom"):

        def fail(*args, **kwargs):
            raise RuntimeError("boom")

        pipe.vae.decode = fail
        pipe("a cat", num_inference_steps=1, **CALL_DEFAULTS["tiny-sd3"])
    del pipe.vae.decode
    handle.remove()
    assert "forward" not in block.__dict__


@dataclass(frozen=True)
class FailingBind(attnctl.Control, type_name="test-failing-bind"):
    def bind(self, context):
        raise RuntimeError("bind failed")


def test_skip_layer_wrappers_are_removed_when_a_later_bind_fails():
    pipe = make_tiny_pipeline("tiny-sd3")
    block = pipe.transformer.transformer_blocks[0]
    with attnctl.apply(pipe, [attnctl.SkipLayer(blocks=(0,), steps=(0.0, 1.0)), FailingBind()]):
        with pytest.raises(RuntimeError, match="bind failed"):
            generate(pipe, "tiny-sd3", steps=1)
        assert "forward" not in block.__dict__


# -- SAG on other schedulers and families ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-sd-v"])
def test_sag_without_a_mask_degrades_nothing(name, monkeypatch):
    """An empty mask leaves x0 as it is: re-noising must give back the exact input (epsilon / v / flow, Euler
    input scaling, Flux packing, learned sigma), so the second forward equals the first and D is 0."""
    pipe = _sag_pipeline(name)
    base = "tiny-sd" if name == "tiny-sd-v" else name
    stock = generate(pipe, base, steps=2)
    with attnctl.apply(pipe, [attnctl.SAG(scale=1.0)]):
        guided = generate(pipe, base, steps=2)
    monkeypatch.setattr(sag_module, "MASK_THRESHOLD", float("inf"))
    with attnctl.apply(pipe, [attnctl.SAG(scale=1.0)]):
        unmasked = generate(pipe, base, steps=2)
    torch.testing.assert_close(unmasked, stock, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(guided).all() and (guided - stock).abs().max() > 1e-4


def _sag_pipeline(name):
    if name == "tiny-sd-v":
        from diffusers import DDIMScheduler

        pipe = make_tiny_pipeline("tiny-sd")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        return pipe
    return make_tiny_pipeline(name)


@dataclass(frozen=True)
class FrameLog(attnctl.Control, type_name="test-frame-log"):
    """Records (rows, extra_pass) of every denoiser call a layer sees."""

    log: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        control = self

        class _Bound(attnctl.Bound):
            def edit(self, layer, frame):
                entry = (tuple((r.branch, r.tag) for r in frame.rows.rows), frame.extra_pass, frame.number)
                if entry not in control.log:
                    control.log.append(entry)
                return None

        return _Bound(self, context.layers, (0.0, 1.0))


def test_second_pass_frames_are_marked():
    pipe = make_tiny_pipeline("tiny-sd")
    log = FrameLog()
    with attnctl.apply(pipe, [log, attnctl.SAG()]):
        generate(pipe, "tiny-sd", prompt="a cat", steps=1)
    assert [entry[:2] for entry in log.log] == [((("uncond", None), ("cond", None)), None), ((("uncond", None),), log.log[1][1])]
    assert log.log[1][1] is not None and log.log[1][1].startswith("sag")


@dataclass(frozen=True)
class QKLog(attnctl.Control, type_name="test-qk-log"):
    """Records q and k of its layers' own rows as the attention op receives them, in the pipeline's own denoiser calls.
    Prompt-to-Prompt's link sits outside the other hooks (`LayerHook.links_rows`) and runs them on the call's rows plus
    copies of its edited rows, each row's own first (`processors.chain.own_rows`): the log keeps the call's rows."""

    layers: object = None
    log: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        control = self

        class _Hook(LayerHook):
            def attend(self, call, q, k, v, spec, compute):
                rows = list(own_rows(call, range(len(call.frame.rows.rows))))
                control.log.append((q[rows].detach().clone(), k[rows].detach().clone(), call.geometry.image_slice))
                return compute(q, k, v, spec)

        class _Bound(attnctl.Bound):
            def edit(self, layer, frame):
                return None if frame.extra_pass is not None else Edit(hooks=(_Hook(),))

        return _Bound(self, context.layers, (0.0, 1.0))


@pytest.mark.parametrize("p2p_first", [True, False])
def test_sag_reads_the_pipelines_own_rows_next_to_prompt_to_prompt_on_joint_layers(tiny_cache, monkeypatch, p2p_first):
    """On a joint layer Prompt-to-Prompt runs the rest of the chain on the call's rows plus copies of its edited rows;
    SAG's map counted the copies as rows (5 maps for 3 images: a raw size mismatch mid-call). SAG's map (Hong et al.
    2023; joint attention: each image query's image-key row renormalised) is the mean over heads of the attention
    each image token receives, from the queries and keys of the pipeline's own rows."""
    pipe = tiny_cache("tiny-flux")
    received = []
    original = sag_module.degrade

    def degrade(sample, prediction, mask_source, *args, **kwargs):
        received.append(mask_source.detach().clone())
        return original(sample, prediction, mask_source, *args, **kwargs)

    monkeypatch.setattr(sag_module, "degrade", degrade)
    sag = attnctl.SAG(scale=0.75)
    log = QKLog(layers=sag.select(adapter_for(pipe.transformer))[0].name)  # SAG's layer
    p2p = attnctl.PromptToPrompt("replace", cross_steps=0.8, self_steps=0.4)
    prompts = ["a red cat and a blue dog", "a green cat and a blue dog", "a yellow cat and a blue dog"]
    with attnctl.apply(pipe, [log, p2p, sag] if p2p_first else [log, sag, p2p]):
        generate(pipe, "tiny-flux", prompt=prompts, steps=2)
    assert len(received) == len(log.log) == 2
    for got, (q, k, image) in zip(received, log.log):
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        block = probs[:, :, image, image]
        block = block / block.sum(-1, keepdim=True)
        torch.testing.assert_close(got, block.sum(dim=2).mean(dim=1), rtol=1e-4, atol=1e-5)
