"""Parity with the peers' own code on configurations the family tests do not hold: diffusers' PAG pipelines on other
layer selections, adaptive scale without CFG, several images per prompt and the README's `transformer_blocks.1[0-9]`
recipe; diffusers' SAG pipeline on an SD 2-style v-prediction UNet; tomesd at `max_downsample=2` and stride 3; the
tgate package at gate step 1 and beyond the step count. Each test also checks that the control changes the output
by much more than the tolerance, so that a control doing nothing cannot pass."""

from __future__ import annotations

import importlib

import pytest
import torch

import attnctl
from attnctl.testing import make_tiny_pipeline

from .helpers import generate
from .test_guidance import _components, _denoiser

SD3_LEAVE_OUT = ("image_encoder", "feature_extractor")


def _pag_reference(pipe, name, layers, leave_out=(), **kwargs):
    """Latents of diffusers' PAG pipeline of the family on `pipe`'s components (3 steps, pag_scale 3)."""
    import diffusers

    pipeline = {"tiny-sd": "StableDiffusionPAGPipeline", "tiny-sdxl": "StableDiffusionXLPAGPipeline",
                "tiny-sd3": "StableDiffusion3PAGPipeline", "tiny-pixart": "PixArtSigmaPAGPipeline"}[name]
    reference_pipe = getattr(diffusers, pipeline)(**_components(pipe, leave_out), pag_applied_layers=layers)
    reference_pipe.set_progress_bar_config(disable=True)
    return generate(reference_pipe, name, steps=3, pag_scale=3.0, **kwargs)


def _pag_against_diffusers(pipe, name, reference_layers, layers, leave_out=(), adaptive=0.0, guidance=5.0, **kwargs):
    processors = dict(_denoiser(pipe).attn_processors)
    expected = _pag_reference(pipe, name, reference_layers, leave_out, pag_adaptive_scale=adaptive, guidance=guidance,
                              **kwargs)
    assert dict(_denoiser(pipe).attn_processors) == processors  # diffusers put the stock processors back
    stock = generate(pipe, name, steps=3, guidance=guidance, **kwargs)
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0, layers=layers, adaptive_scale=adaptive)]):
        got = generate(pipe, name, steps=3, guidance=guidance, **kwargs)
    assert (expected - stock).abs().max() > 1e-2  # PAG changes the result
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- PAG against diffusers' PAG pipelines -----------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("name, reference_layers, layers, options", [
    ("tiny-sd", ["down_blocks.0"], "down_blocks.0", {}),
    ("tiny-sdxl", ["down_blocks.1"], "down_blocks.1", {}),
    ("tiny-sdxl", ["up_blocks.0.attentions.0"], "up_blocks.0.attentions.0", {}),
    ("tiny-sd", ["down", "mid", "up"], ["down", "mid", "up"], {}),
    ("tiny-sd", ["mid"], "mid", {"adaptive": 0.002, "guidance": 1.0}),
    ("tiny-sdxl", ["mid"], "mid", {"adaptive": 0.002, "guidance": 1.0}),
    ("tiny-sdxl", ["mid"], "mid", {"num_images_per_prompt": 2}),
    ("tiny-sd3", ["blocks.1"], "transformer_blocks.1", {"leave_out": SD3_LEAVE_OUT}),
], ids=["sd-down0", "sdxl-down1", "sdxl-up0-attn0", "sd-down-mid-up", "sd-adaptive-nocfg", "sdxl-adaptive-nocfg",
        "sdxl-2-per-prompt", "sd3-transformer-blocks-1"])
def test_pag_matches_diffusers_on_other_layers_and_calls(name, reference_layers, layers, options, tiny_cache):
    """diffusers' module names as `pag_applied_layers` (`down_blocks.1`, `up_blocks.0.attentions.0`, the `down` /
    `mid` / `up` prefixes) select the same layers in attnctl; the adaptive scale without CFG and two images per prompt
    with CFG; on SD3, diffusers' `blocks.1` is attnctl's `transformer_blocks.1` (2 blocks: no 10-19 to pick)."""
    _pag_against_diffusers(tiny_cache(name), name, reference_layers, layers, **options)


def _pixart_12_blocks():
    """tiny-pixart with 12 blocks (random weights from seed 0): diffusers' `blocks.1` regex also picks blocks 10, 11."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    base = make_tiny_pipeline("tiny-pixart")
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=12, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    pipe = PixArtSigmaPipeline(**{**base.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parity
def test_pag_readme_recipe_for_diffusers_blocks_1_on_12_blocks():
    """The README's `PAG(layers=["transformer_blocks.1", "transformer_blocks.1[0-9]"])` reproduces diffusers'
    `pag_applied_layers="blocks.1"` on a model with more than 10 blocks; `transformer_blocks.1` alone is block 1
    only, which diffusers' regex is not."""
    pipe = _pixart_12_blocks()
    expected = _pag_reference(pipe, "tiny-pixart", "blocks.1")
    stock = generate(pipe, "tiny-pixart", steps=3)
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0, layers=["transformer_blocks.1", "transformer_blocks.1[0-9]"])]):
        got = generate(pipe, "tiny-pixart", steps=3)
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0, layers="transformer_blocks.1")]):
        block_1_only = generate(pipe, "tiny-pixart", steps=3)
    assert (expected - stock).abs().max() > 1e-2  # PAG changes the result
    assert (block_1_only - expected).abs().max() > 1e-2  # blocks 10 and 11 matter: the recipe is needed
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- SAG against diffusers' SAG pipeline ------------------------------------------------------------------------
def _sd2_v_prediction():
    """tiny-sd with an SD 2-style UNet (linear projections, per-level head dims) and a v-prediction DDIM scheduler
    (random weights from seed 0)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    base = make_tiny_pipeline("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=4,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction", timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_sag_matches_diffusers_on_an_sd2_v_prediction_unet_non_square(guidance):
    from diffusers import StableDiffusionSAGPipeline

    pipe = _sd2_v_prediction()
    reference_pipe = StableDiffusionSAGPipeline(**pipe.components)
    reference_pipe.set_progress_bar_config(disable=True)
    size = {"height": 32, "width": 48}
    expected = generate(reference_pipe, "tiny-sd", steps=3, guidance=guidance, sag_scale=0.75, **size)
    stock = generate(pipe, "tiny-sd", steps=3, guidance=guidance, **size)
    with attnctl.apply(pipe, [attnctl.SAG(scale=0.75)]):
        got = generate(pipe, "tiny-sd", steps=3, guidance=guidance, **size)
    assert (expected - stock).abs().max() > 1e-2  # SAG changes the result
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- ToMe against tomesd (not installed with the oldest supported diffusers) ---------------------------------------
def _tome_against_tomesd(pipe, control, size, **tomesd_options):
    tomesd = pytest.importorskip("tomesd")
    height, width = size
    stock = generate(pipe, "tiny-sd", steps=3, height=height, width=width)
    with attnctl.apply(pipe, [control]):
        ours = generate(pipe, "tiny-sd", steps=3, height=height, width=width)
    tomesd.apply_patch(pipe, use_rand=False, **tomesd_options)
    try:
        theirs = generate(pipe, "tiny-sd", steps=3, height=height, width=width)
    finally:
        tomesd.remove_patch(pipe)
    assert (theirs - stock).abs().max() > 0.1  # tomesd merged something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=5e-4)  # test_tome_matches_the_tomesd_package's tolerance


def _sd1_layout():
    """tiny-sd with SD 1.x's block layout (four levels, attention in the first three; random weights from seed 0)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base = make_tiny_pipeline("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tome_readme_layer_list_is_tomesd_max_downsample_2_on_the_sd1_layout():
    """The README's `max_downsample=2` recipe: the self-attention of `down_blocks.0`, `down_blocks.1`, `up_blocks.2`,
    `up_blocks.3` by name, on a non-square latent."""
    layers = [f"{block} & self" for block in ("down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3")]
    control = attnctl.ToMe(ratio=0.5, random=False, layers=layers)
    _tome_against_tomesd(_sd1_layout(), control, (64, 96), ratio=0.5, max_downsample=2)


def test_tome_stride_3_is_tomesd_sx_sy_3():
    """stride 3 on a 24 x 16 grid (cells cut at the edge) against tomesd's `sx=3, sy=3`."""
    control = attnctl.ToMe(ratio=0.6, stride=3, random=False)
    _tome_against_tomesd(make_tiny_pipeline("tiny-sd"), control, (48, 32), ratio=0.6, sx=3, sy=3)


# -- TGate against the tgate package ------------------------------------------------------------------------------
def _tgate_package(name, steps, gate, **options):
    """Latents of the tgate package's pipeline for `name` on a fresh tiny pipeline (it leaves forwards installed)."""
    from attnctl.testing import CALL_DEFAULTS

    pytest.importorskip("tgate")
    module = importlib.import_module("tgate." + {"tiny-sd": "SD", "tiny-sdxl": "SDXL"}[name])
    return module.tgate(make_tiny_pipeline(name), "a photo of a cat", num_inference_steps=steps, guidance_scale=4.5,
                        output_type="latent", generator=torch.Generator().manual_seed(0), gate_step=gate,
                        **options, **CALL_DEFAULTS[name]).images


@pytest.mark.parity
@pytest.mark.parametrize("name, v2", [("tiny-sd", False), ("tiny-sd", True), ("tiny-sdxl", True)],
                         ids=["sd-v1", "sd-v2", "sdxl-v2"])
def test_tgate_gate_step_1_matches_the_tgate_package(name, v2, tiny_cache):
    """Cross-attention cached from the first step's output and CFG dropped from step 1 on (v1: the package with its
    self-attention reuse pushed past the call, warm_up=10**6; v2: warm_up=2, sp_interval=5, fi_interval=2), bitwise."""
    steps = 4
    if v2:
        peer_options = dict(warm_up=2, sp_interval=5, fi_interval=2)
    else:
        peer_options = dict(warm_up=10**6, sp_interval=5, fi_interval=1)
    theirs = _tgate_package(name, steps, 1, **peer_options)
    pipe = tiny_cache(name)
    control = attnctl.TGate(gate_step=1, **peer_options) if v2 else attnctl.TGate(gate_step=1)
    with attnctl.apply(pipe, [control]) as handle:
        ours = generate(pipe, name, prompt="a photo of a cat", steps=steps, guidance=4.5)
        assert handle.outputs["tgate"].hits > 0
    stock = generate(pipe, name, prompt="a photo of a cat", steps=steps, guidance=4.5)
    assert (theirs - stock).abs().max() > 1e-2  # the package changed the result
    assert torch.equal(ours, theirs)


@pytest.mark.parity
def test_tgate_gate_beyond_the_steps_is_idle_like_the_tgate_package(tiny_cache):
    """A gate beyond the step count, no self-attention reuse: the package changes nothing, and attnctl warns that the
    control is idle and gives the stock latents bit for bit."""
    steps = 3
    theirs = _tgate_package("tiny-sd", steps, 5, warm_up=10**6, sp_interval=5, fi_interval=1)
    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=steps, guidance=4.5)
    with pytest.warns(attnctl.IdleControlWarning, match="TGate is idle.*gate_step=5 is not less than the 3 steps"):
        with attnctl.apply(pipe, [attnctl.TGate(gate_step=5)]):
            ours = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=steps, guidance=4.5)
    assert torch.equal(theirs, stock)
    assert torch.equal(ours, stock)
