"""Call protocols: rows per denoiser call, step counting, per-call state."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import CallLayoutError
from attnctl.testing import make_tiny_pipeline

from .helpers import Probe, generate, tiny_sdxl_conditioned

pytestmark = pytest.mark.parity


def _frames(log):
    """(step, count, rows) per denoiser call, in order."""
    seen = {}
    for entry in log:
        if entry[0] != "bind":
            seen.setdefault(entry[-1], entry[1:-1])
    return list(seen.values())


def test_batched_cfg_rows_and_prompts():
    pipe = make_tiny_pipeline("tiny-sd")
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", prompt=["a cat", "a dog"], steps=2, num_images_per_prompt=2)
    step, count, rows = _frames(probe.log)[0]
    assert (step, count) == (0, 2)
    assert rows == tuple(("uncond", p, None) for p in range(4)) + tuple(("cond", p, None) for p in range(4))
    assert probe.log[0] == ("bind", 2, True, 4)


def test_no_cfg_is_cond_only():
    pipe = make_tiny_pipeline("tiny-sd")
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", prompt="a cat", guidance=1.0)
    assert _frames(probe.log)[0][2] == (("cond", 0, None),)


def test_flux_true_cfg_separate_calls():
    pipe = make_tiny_pipeline("tiny-flux")
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-flux", prompt="a cat", negative_prompt="a dog", true_cfg_scale=4.0, steps=2)
    frames = _frames(probe.log)
    assert [f[2] for f in frames] == [(("cond", 0, None),), (("uncond", 0, None),)] * 2
    assert [f[0] for f in frames] == [0, 0, 1, 1]


def test_flux_pipelines_without_cache_context_label_their_true_cfg_calls_by_order():
    """FluxImg2ImgPipeline (as Flux's inpaint, Kontext and ControlNet pipelines) makes its true-CFG negative call
    outside `cache_context`: it was labelled a cond call, so Reweight edited the negative prompt's tokens and PAG
    guided the negative prediction with a term of its own."""
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**make_tiny_pipeline("tiny-flux").components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        pipe("a cat", image=image, strength=1.0, negative_prompt="a dog", true_cfg_scale=4.0, num_inference_steps=2,
             height=32, width=32, max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert [f[2] for f in _frames(probe.log)] == [(("cond", 0, None),), (("uncond", 0, None),)] * 2


def test_flux_kontext_reference_image_is_refused_and_its_text_to_image_calls_run():
    """FluxKontextPipeline appends its `image`'s tokens after the generated image's (img_ids with first coordinate 1),
    which FLUX.1's processors do not place: refused naming them (it was a bare grid mismatch). Without an image it is
    a text-to-image call whose true-CFG negative call runs outside cache_context (labelled by order)."""
    from diffusers import FluxKontextPipeline

    from attnctl.errors import UnsupportedError

    pipe = FluxKontextPipeline(**make_tiny_pipeline("tiny-flux").components)
    pipe.set_progress_bar_config(disable=True)
    options = dict(height=32, width=32, max_area=32 * 32, _auto_resize=False, max_sequence_length=32, num_inference_steps=2,
                   output_type="latent")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        with pytest.raises(UnsupportedError, match="64 tokens of a reference image .*FluxKontextPipeline"):
            pipe(prompt="a cat", image=image, generator=torch.Generator().manual_seed(0), **options)
        pipe(prompt="a cat", negative_prompt="a dog", true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0), **options)
    assert [f[2] for f in _frames(probe.log)] == [(("cond", 0, None),), (("uncond", 0, None),)] * 2


def test_sd3_skip_layer_pass_is_cond_only():
    pipe = make_tiny_pipeline("tiny-sd3")
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd3", prompt="a cat", steps=4, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                 skip_layer_guidance_stop=1.0)
    frames = _frames(probe.log)
    assert (0, 4, (("uncond", 0, None), ("cond", 0, None))) in frames
    assert any(f[2] == (("cond", 0, None),) for f in frames)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # KDPM2 on numpy 2
@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_second_order_scheduler_counts_steps_once(scheduler):
    import diffusers

    pipe = make_tiny_pipeline("tiny-sd")
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", prompt="a cat", steps=3)
    frames = _frames(probe.log)
    assert len(frames) == 5  # 2 model calls per step except the last
    assert [f[0] for f in frames] == [0, 0, 1, 1, 2]  # both calls of a step share its index
    assert {f[1] for f in frames} == {3}


def test_pndm_runge_kutta_calls_count_four_per_step():
    """PNDM without `skip_prk_steps` (`PNDMScheduler.from_config(<another scheduler's config>)`) starts with 3
    Runge-Kutta steps of 4 model calls each: 4 steps make 13 calls. They were counted one step per call (n = 13),
    so `steps=(0, 0.5)` covered 7 calls, not the first 2 of the 4 steps. With `skip_prk_steps=True` (SD 1.x's
    config) each call is a step (4 steps: 5 calls, n = 5, as the pipeline's num_timesteps)."""
    from diffusers import PNDMScheduler

    pipe = make_tiny_pipeline("tiny-sd")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    assert not pipe.scheduler.config.skip_prk_steps
    whole, half = Probe(), Probe(steps=(0.0, 0.5))
    with attnctl.apply(pipe, [whole, half]):
        generate(pipe, "tiny-sd", prompt="a cat", steps=4)
    assert [f[:2] for f in _frames(whole.log)] == [(0, 4)] * 4 + [(1, 4)] * 4 + [(2, 4)] * 4 + [(3, 4)]
    assert [f[:2] for f in _frames(half.log)] == [(0, 4)] * 4 + [(1, 4)] * 4
    assert whole.log[0][1] == half.log[0][1] == 4  # the count the controls bind with
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", prompt="a cat", steps=4)
    assert [f[:2] for f in _frames(probe.log)] == [(i, 5) for i in range(5)]


def test_img2img_strength_counts_steps_run():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pipe(make_tiny_pipeline("tiny-sd"))
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        pipe("a cat", image=torch.rand(1, 3, 32, 32), strength=0.5, num_inference_steps=8, output_type="latent")
    frames = _frames(probe.log)
    assert [f[0] for f in frames] == [0, 1, 2, 3]
    assert {f[1] for f in frames} == {4}


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_sdxl_denoising_end_counts_the_steps_run_on_conditioned_pipelines(tiny_cache, kind):
    """SDXL's `denoising_end` (the base of an "ensemble of experts") runs the steps before the cut. The ControlNet SDXL
    pipeline sets `_num_timesteps` before the cut and the T2I-Adapter one never sets it: attnctl counted all 10 steps
    (frames (0..7, 10)), as diffusers' own SDXL pipeline does not (count 8), so step windows and gates differed."""
    from diffusers import StableDiffusionXLPipeline

    base = tiny_cache("tiny-sdxl")
    options = dict(prompt="a cat", num_inference_steps=10, denoising_end=0.8, height=32, width=32, output_type="latent")
    seen = []
    for pipe, extra in ((StableDiffusionXLPipeline(**base.components), {}),
                        (tiny_sdxl_conditioned(base, kind), {"image": torch.rand(1, 3, 32, 32)})):
        pipe.set_progress_bar_config(disable=True)
        calls = []
        counter = pipe.unet.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        probe = Probe()
        try:
            with attnctl.apply(pipe, [probe]):
                pipe(**options, generator=torch.Generator().manual_seed(0), **extra)
        finally:
            counter.remove()
        assert len(calls) == 8  # diffusers: the timesteps at or above 200 of 1000
        assert [frame[:2] for frame in _frames(probe.log)] == [(i, 8) for i in range(8)]
        seen.append(probe.log[0])
    assert seen[0] == seen[1] == ("bind", 8, True, 1)


@pytest.mark.filterwarnings("ignore:attnctl. BoxGuidance moves the latent")
def test_extra_forwards_get_the_t2i_adapter_residuals(tiny_cache):
    """The UNet pops T2I-Adapter residuals off the list it is given: SAG's degraded pass, a separate perturbation's pass
    and every loss pass after the first ran without the adapter (PAG(separate=True) 16.3 off PAG() on tiny-sdxl)."""
    pipe = tiny_sdxl_conditioned(tiny_cache("tiny-sdxl"), "adapter")
    levels = []
    counter = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: levels.append(len(kwargs["down_intrablock_additional_residuals"])), with_kwargs=True
    )
    options = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="latent", image=torch.rand(1, 3, 32, 32))
    outputs = []
    try:
        for controls in ([attnctl.PAG(scale=3.0)], [attnctl.PAG(scale=3.0, separate=True), attnctl.SAG(scale=0.5)],
                         [attnctl.BoxGuidance({"cat": (0, 0, 0.5, 1)}, iterations=2, steps=(0.0, 1.0))]):
            with attnctl.apply(pipe, controls):
                outputs.append(pipe(**options, generator=torch.Generator().manual_seed(0)).images)
    finally:
        counter.remove()
    assert len(levels) > 8 and set(levels) == {2}
    with attnctl.apply(pipe, [attnctl.SAG(scale=0.5)]):
        sag = pipe(**options, generator=torch.Generator().manual_seed(0)).images
    with attnctl.apply(pipe, [attnctl.PAG(scale=3.0, separate=True)]):
        pag_separate = pipe(**options, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(pag_separate, outputs[0], rtol=1e-4, atol=1e-4)
    assert not torch.equal(sag, pag_separate)


def test_state_does_not_leak_between_calls():
    pipe = make_tiny_pipeline("tiny-sd")
    fresh = Probe()
    with attnctl.apply(pipe, [fresh]):
        generate(pipe, "tiny-sd", prompt="a red car", steps=2)
    reused = Probe()
    with attnctl.apply(pipe, [reused]):
        generate(pipe, "tiny-sd", prompt=["a cat", "a dog"], steps=4)
        reused.log.clear()
        generate(pipe, "tiny-sd", prompt="a red car", steps=2)
    assert reused.log == fresh.log


def test_unknown_batch_layout_raises():
    from attnctl.pipelines.protocol import PromptRecord, base_rows, protocol_for

    record = PromptRecord([{"prompt": ["a cat"], "num_images_per_prompt": 1, "do_classifier_free_guidance": True}])
    assert len(base_rows(protocol_for("unet"), record, 2, None, {})) == 2
    with pytest.raises(CallLayoutError, match="batch of 3 rows"):
        base_rows(protocol_for("unet"), record, 3, None, {})


def test_pipeline_without_encode_prompt_is_refused():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    base = make_tiny_pipeline("tiny-sd")
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with pytest.raises(attnctl.UnsupportedError, match="encode_prompt"):
        attnctl.apply(pipe, [])
