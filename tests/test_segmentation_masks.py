"""Segmentation masks from attention (RefAM): the mask rule, masks as Region masks, magnets and sinks, the
img2img readout, families, and the IoU on the toy model (8 images)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnctl
from attnctl import AttentionMaps, ConfigError, Region, Regions, UnsupportedError
from attnctl.controls.maps.magnets import (
    MAGNET_WORDS,
    SINK_FLATNESS,
    SINK_MASS,
    global_sinks,
    magnet_prompt,
    renormalised,
    sink_columns,
    without_sinks,
)
from attnctl.testing import make_tiny_pipeline

from .helpers import generate

PROMPT = "a red cat and a blue car"
CALL_DEFAULTS_SD = {"height": 32, "width": 32}


def _result(pipe, name="tiny-sd", words=("red", "cat")):
    with attnctl.apply(pipe, AttentionMaps(list(words))) as handle:
        generate(pipe, name, [PROMPT, PROMPT], seed=1)
        return handle.outputs["attention_maps"]


def test_mask_rule_against_its_definition(tiny_cache):
    result = _result(tiny_cache("tiny-sd"))
    maps = result["red"]
    hard, soft = result.masks("red"), result.masks("red", soft=True)
    assert hard.dtype == torch.bool and soft.dtype == torch.float32 and hard.shape == soft.shape == maps.shape == (2, 32, 32)
    for i in range(2):  # min-max normalised per image, then >= 0.5
        m = maps[i].double()
        expected = (m - m.min()) / (m.max() - m.min())
        torch.testing.assert_close(soft[i].double(), expected, atol=1e-6, rtol=0)
        assert torch.equal(hard[i], soft[i] >= 0.5)
    assert torch.equal(result.masks("red", threshold=0.8), soft >= 0.8)
    assert 0 < hard.sum() < hard.numel()
    with pytest.raises(ConfigError, match="threshold"):
        result.masks("red", threshold=0)
    with pytest.raises(KeyError, match="dog"):
        result.masks("dog")


def test_a_constant_map_gives_an_empty_mask():
    from attnctl.controls.maps.masks import masks_from_maps

    flat = torch.full((1, 4, 4), 3.0)
    assert not masks_from_maps(flat).any() and masks_from_maps(flat, soft=True).eq(0).all()


def _area_average(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Exact area averaging (docs/methods.md "Regions"): each of the h x w cells covers 1/h x 1/w of the image and takes
    the mean of the mask there. Every pixel split into h x w sub-pixels, a cell is an H x W block of sub-pixels."""
    (h, w), (height, width) = grid, mask.shape
    fine = mask.double().repeat_interleave(h, 0).repeat_interleave(w, 1)
    return torch.nn.functional.avg_pool2d(fine[None, None], (height, width))[0, 0]


def test_masks_are_region_masks_for_a_second_pass(tiny_cache):
    """A bool mask of `masks()` is a Region mask: the 0 / 1 mask it holds, so its second pass is bitwise that of the
    same mask as floats, and on each layer grid the region's weights `m_r` are the mask area-averaged onto the grid
    (docs/methods.md "Regions"; one region, so no overlap normalisation). The mask is asymmetric: a mask read
    mirrored or transposed gives other weights."""
    pipe = tiny_cache("tiny-sd")
    mask = _result(pipe).masks("cat")[0]
    assert mask.dtype == torch.bool and not torch.equal(mask, mask.flip(-1)) and not torch.equal(mask, mask.T)
    stock = generate(pipe, "tiny-sd", ["a photo"])
    steered, weights = [], []
    for given in (mask, mask.float()):
        with attnctl.apply(pipe, Regions([Region("a cat", mask=given)], base_ratio=0.0)) as handle:
            steered.append(generate(pipe, "tiny-sd", ["a photo"]))
            layouts = handle.runtime.last_call.bound[0]._layouts  # per token grid its layers asked for
            weights.append({grid: layout.weights[0].reshape(grid) for grid, layout in layouts.items()})
    assert torch.isfinite(steered[0]).all() and not torch.equal(steered[0], stock)
    assert torch.equal(steered[0], steered[1])
    for found in weights:
        assert set(found) == {(16, 16), (8, 8)}  # tiny-sd at 32 px: the 16x16 level and the mid block
        for grid, cells in found.items():
            expected = _area_average(mask, grid)
            torch.testing.assert_close(cells.double(), expected, atol=1e-6, rtol=0)
            assert not torch.allclose(expected, _area_average(mask.flip(-1), grid))  # the check can see a mirror
    soft = _result(pipe).masks("cat", soft=True)
    Region("a cat", mask=soft[1])  # soft masks are accepted too


# -- magnets and sinks ---------------------------------------------------------------------------------------------
def test_sink_suppression_is_the_softmax_without_the_sink_keys():
    """Eager reference: detect sinks by the rule of docs/methods.md on the head-averaged attention, then take each
    head's softmax again over the keys without them (the sinks' logits at -inf) and average the heads. The heads give
    the sink different shares, and one phrase holds the sink token and another token (it keeps the other's share)."""
    torch.manual_seed(0)
    logits = 0.3 * torch.randn(2, 2, 50, 9)
    logits[0, 0, :, 0] += 5.0  # token 0 of image 0: a flat, heavy sink, much heavier in head 0 than in head 1
    logits[0, 1, :, 0] += 2.5
    logits[1, :, :25, 3] += 6.0  # token 3 of image 1: heavy in half the image only, not global
    probs = logits.softmax(-1)
    selector = torch.zeros(2, 4, 9)
    selector[:, 0, 2] = selector[:, 1, 5] = selector[:, 2, 0] = 1.0  # words at tokens 2, 5, and 0 (the sink)
    selector[:, 3, 0] = selector[:, 3, 6] = 1.0  # a phrase of tokens 0 (the sink) and 6
    averaged = probs.mean(1)
    mean, low = averaged.mean(1), averaged.amin(1)
    sinks = (mean >= SINK_MASS) & (low >= SINK_FLATNESS * mean)
    assert sinks[0, 0] and not sinks[1].any() and sinks.sum() == 1
    masked = logits.masked_fill(sinks[:, None, None, :], float("-inf")).softmax(-1)
    expected = (masked @ selector[:, None].transpose(-1, -2)).mean(1)
    found = without_sinks(probs, selector, global_sinks(probs))
    torch.testing.assert_close(found, expected, atol=1e-6, rtol=1e-5)
    assert found[0, :, 2].abs().max() == 0 and found[0, :, 3].min() > 0  # the sink alone: 0; the phrase: its other token
    # the capture's form: each head's attention to the words' kept columns and one column of the sinks
    sink_keys = global_sinks(probs)
    columns = sink_columns(selector, sink_keys)[:, None].transpose(-1, -2)  # (B, 1, keys, words + 1)
    torch.testing.assert_close(renormalised(probs @ columns), expected, atol=1e-6, rtol=1e-5)
    # per-head selectors (a value scale per head) weight each head's words
    per_head = selector[:, None].repeat(1, 2, 1, 1) * torch.tensor([1.0, 0.5])[None, :, None, None]
    expected = (masked @ per_head.transpose(-1, -2)).mean(1)
    torch.testing.assert_close(without_sinks(probs, per_head, global_sinks(probs)), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(renormalised(probs @ sink_columns(per_head, sink_keys).transpose(-1, -2)), expected, atol=1e-6, rtol=1e-5)


def test_magnet_config():
    assert AttentionMaps(["cat"], magnets=True).magnets == MAGNET_WORDS
    assert AttentionMaps(["cat"], magnets=["the", "of"]).magnets == ("the", "of")
    assert AttentionMaps(["cat"]).magnets == ()
    with pytest.raises(ConfigError, match="magnets"):
        AttentionMaps(["cat"], magnets=[""])
    assert magnet_prompt("a cat", ("the", "of")) == "a cat the of"
    control = AttentionMaps(["cat"], magnets=True)
    assert attnctl.Control.from_dict(control.to_dict()) == control
    control = AttentionMaps(["cat"], magnets=True, readout_strength=0.75)
    assert control.readout_strength == 0.75 and attnctl.Control.from_dict(control.to_dict()) == control
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ConfigError, match="readout_strength"):
            AttentionMaps(["cat"], readout_strength=bad)


def test_magnets_in_a_text_to_image_call_need_its_images(tiny_cache):
    """The readout after a text-to-image call reads its images: output_type="latent" has none, refused at the call
    (before the generation), naming output_type and read_maps; a strength that runs no readout step likewise."""
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)):
        with pytest.raises(ConfigError, match=r"output_type='latent'.*read_maps"):
            generate(pipe, "tiny-sd", [PROMPT])
    with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True, readout_strength=0.2)):
        with pytest.raises(ConfigError, match="readout_strength=0.2 of num_inference_steps=2"):
            pipe(PROMPT, num_inference_steps=2, **CALL_DEFAULTS_SD)


def test_magnets_never_run_in_a_controlnet_generation(tiny_cache):
    """A ControlNet text-to-image call takes an `image` (its condition) but no `strength`: it generates, so magnets
    are refused there too (they changed its images without a word)."""
    from attnctl.testing import tiny_sd_controlnet

    pipe = tiny_sd_controlnet(tiny_cache("tiny-sd"), seed=1)
    condition = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)):
        with pytest.raises(ConfigError, match="readout pass.*control_image= .*StableDiffusionControlNetImg2ImgPipeline"):
            generate(pipe, "tiny-sd", [PROMPT], image=condition)


def test_magnets_on_a_pipeline_none_of_whose_calls_is_a_readout_are_refused_at_apply(tiny_cache):
    """Magnets change the prompt and so the image, so they run only in a readout pass. An inpainting call (Inpaint,
    Fill: a `mask_image`) generates the masked area: it was taken for the readout, and the inpainted image changed
    without a word. Flux Kontext and T2I-Adapter calls take their `image` as a condition and diffusers has no img2img
    pipeline for them: every call raised, naming read_maps(pipe, ...), which raised too. All are refused at apply,
    naming the img2img pipeline to read with, and leave the pipeline stock; img2img and ControlNet stay accepted."""
    from diffusers import (
        FluxFillPipeline,
        FluxKontextPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
    )

    from attnctl.testing import tiny_sd_controlnet

    from .helpers import tiny_sdxl_conditioned

    sd, flux = tiny_cache("tiny-sd"), tiny_cache("tiny-flux")
    flux_parts = {k: v for k, v in flux.components.items() if k not in ("image_encoder", "feature_extractor")}
    refused = {
        StableDiffusionInpaintPipeline(**sd.components): r"StableDiffusionInpaintPipeline's call inpaints .*StableDiffusionImg2ImgPipeline",
        FluxFillPipeline(**flux_parts): r"FluxFillPipeline's call inpaints .*FluxImg2ImgPipeline",
        FluxKontextPipeline(**flux.components): r"no FluxKontextImg2ImgPipeline .*FluxImg2ImgPipeline",
        tiny_sdxl_conditioned(tiny_cache("tiny-sdxl"), "adapter"): r"no StableDiffusionXLAdapterImg2ImgPipeline .*StableDiffusionXLImg2ImgPipeline",
    }
    for pipe, reason in refused.items():
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        before = dict(denoiser.attn_processors)
        with pytest.raises(UnsupportedError, match=r"runs only in a readout pass over an image .*" + reason):
            attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True))
        assert denoiser.attn_processors == before
        attnctl.apply(pipe, AttentionMaps(["cat"])).remove()  # the plain maps capture the call itself
    for pipe in (StableDiffusionImg2ImgPipeline(**sd.components), tiny_sd_controlnet(sd, seed=1)):
        attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)).remove()
    # read_maps on an inpainting pipeline read with the inpainting call itself and failed inside diffusers
    inpaint = StableDiffusionInpaintPipeline(**sd.components)
    for magnets in (False, True):
        with pytest.raises(UnsupportedError, match=r"read_maps .*inpaints .*StableDiffusionImg2ImgPipeline\(\*\*pipe.components\)"):
            attnctl.read_maps(inpaint, [torch.rand(3, 32, 32)], PROMPT, ["cat"], magnets=magnets, num_inference_steps=2)


@pytest.mark.parametrize("name", ["tiny-pixart"])
def test_magnets_are_refused_at_apply_outside_their_families(name, tiny_cache):
    with pytest.raises(UnsupportedError, match="magnets"):
        attnctl.apply(tiny_cache(name), AttentionMaps(["cat"], magnets=True))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_readout_pass_over_a_given_image(name, tiny_cache):
    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache(name)
    options = {k: v for k, v in CALL_DEFAULTS[name].items() if k not in ("height", "width")}
    images = pipe([PROMPT], num_inference_steps=2, generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS[name]).images
    before = [image.copy() for image in images]
    plain = attnctl.read_maps(pipe, images, PROMPT, ["red", "car"], strength=0.5, magnets=False, num_inference_steps=4, **options)
    magnets = attnctl.read_maps(pipe, images, PROMPT, ["red", "car"], strength=0.5, num_inference_steps=4, **options)
    assert [i.tobytes() for i in images] == [i.tobytes() for i in before]  # the images are not changed
    assert magnets.words == ("red", "car")  # the magnets' own maps are never captured
    height, width = images[0].height, images[0].width
    assert magnets.maps.shape == plain.maps.shape == (1, 2, height, width) and magnets.images[0].size == images[0].size
    assert magnets.contributions == plain.contributions and magnets.contributions[0] > 0  # strength 0.5 of 4 steps
    assert not torch.allclose(magnets.maps, plain.maps)  # the readout read the magnet prompt
    assert magnets.masks("car").shape == (1, height, width)
    for _ in range(2):  # deterministic: the same seed re-noises the same way
        again = attnctl.read_maps(pipe, images, PROMPT, ["red", "car"], strength=0.5, num_inference_steps=4, **options)
        assert torch.equal(again.maps, magnets.maps)
    with pytest.raises(ConfigError, match="strength"):
        attnctl.read_maps(pipe, images, PROMPT, ["red"], strength=0)
    with pytest.raises(ConfigError, match="different sizes"):
        attnctl.read_maps(pipe, [images[0], images[0].resize((images[0].width * 2, images[0].height))], PROMPT, ["red"])


#: Each tiny family's img2img pipeline in diffusers, for the readout's definition below.
IMG2IMG = {
    "tiny-sd": "StableDiffusionImg2ImgPipeline",
    "tiny-sdxl": "StableDiffusionXLImg2ImgPipeline",
    "tiny-sd3": "StableDiffusion3Img2ImgPipeline",
    "tiny-flux": "FluxImg2ImgPipeline",
}


@pytest.mark.parametrize("name", list(IMG2IMG))
def test_read_maps_are_the_maps_of_a_direct_img2img_call(name, tiny_cache):
    """The readout's definition (docs/methods.md): read_maps without magnets is an img2img call of the pipeline's
    components at the given image's size, with the prompt, strength and the noise of `seed`, and its maps are those
    `AttentionMaps` captures on that call. Bitwise the same maps and grid maps (a non-square image: a mirrored or
    transposed readout differs)."""
    import inspect

    import diffusers
    import numpy as np
    from PIL import Image

    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache(name)
    options = {k: v for k, v in CALL_DEFAULTS[name].items() if k not in ("height", "width")}
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 48, 3), dtype=np.uint8))
    call = {"num_inference_steps": 4, "guidance_scale": 5.0, **options}
    read = attnctl.read_maps(pipe, image, PROMPT, ["red", "car"], strength=0.5, magnets=False, seed=3, **call)
    cls = getattr(diffusers, IMG2IMG[name])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its own: the constructor may edit the config
    reader = cls(**{**pipe.components, "scheduler": scheduler})
    reader.set_progress_bar_config(disable=True)
    if "height" in inspect.signature(cls.__call__).parameters:  # SD3 / Flux: else the model's default square size
        call.update(height=32, width=48)
    with attnctl.apply(reader, AttentionMaps(["red", "car"])) as handle:
        reader(PROMPT, image=image, strength=0.5, generator=torch.Generator().manual_seed(3), output_type="latent", **call)
        direct = handle.outputs["attention_maps"]
    assert read.maps.shape == direct.maps.shape == (1, 2, 32, 48)
    assert torch.equal(read.maps, direct.maps) and torch.equal(read.grid_maps, direct.grid_maps)
    assert read.contributions == direct.contributions


def _attend_to_word_in(pipe, position: int, region, scale: float = 20.0) -> list:
    """Forward hooks on every cross-attention layer of tiny-sd's UNet: each head's key of text token `position` is
    `scale * u` and the queries of the image tokens in `region(h, w)` ((h, w) bool, the token grid, row-major as
    diffusers flattens it: token y * w + x) are `scale * u` too, the other queries lose their `u` component (u: a unit
    vector per head). The image tokens in the region attend to that token (softmax weight ~1), the others hardly
    (logit 0 against their ordinary ones)."""
    import math

    hooks = []
    for name, module in pipe.unet.named_modules():
        if not name.endswith("attn2"):
            continue
        dim = module.to_q.out_features // module.heads
        u = torch.ones(module.heads, dim) / math.sqrt(dim)

        def queries(_module, _args, out, u=u):
            batch, n, channels = out.shape
            h = math.isqrt(n // 2)  # the image is twice as wide as high
            inside = region(h, n // h).reshape(n)
            q = out.reshape(batch, n, *u.shape)
            q = q - (q * u).sum(-1, keepdim=True) * u
            q[:, inside] = scale * u
            return q.reshape(batch, n, channels)

        def keys(_module, _args, out, u=u):
            out = out.clone()
            out[:, position] = scale * u.reshape(-1)
            return out

        hooks += [module.to_q.register_forward_hook(queries), module.to_k.register_forward_hook(keys)]
    return hooks


def test_maps_and_masks_keep_the_images_orientation(tiny_cache):
    """Orientation: where the image's top-left quadrant attends to "cat" (forced in the UNet's attention, above), the
    mask of "cat" is that quadrant of the image, pixel for pixel: captured during a generation, read by read_maps
    with and without magnets. A 32x64 image: a mirrored, flipped or transposed map is another mask."""
    from PIL import Image

    pipe = tiny_cache("tiny-sd")
    tokens = pipe.tokenizer(PROMPT)["input_ids"]
    position = tokens.index(pipe.tokenizer("cat", add_special_tokens=False)["input_ids"][0])

    def top_left(h: int, w: int) -> torch.Tensor:
        region = torch.zeros(h, w, dtype=torch.bool)
        region[: h // 2, : w // 2] = True
        return region

    image = Image.fromarray((torch.rand(32, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    hooks = _attend_to_word_in(pipe, position, top_left)
    try:
        with attnctl.apply(pipe, AttentionMaps(["cat"])) as handle:
            pipe(PROMPT, num_inference_steps=2, height=32, width=64, output_type="latent", generator=torch.Generator().manual_seed(0))
            results = [handle.outputs["attention_maps"]]
        for magnets in (False, True):
            results.append(attnctl.read_maps(pipe, image, PROMPT, ["cat"], magnets=magnets, num_inference_steps=4))
    finally:
        for hook in hooks:
            hook.remove()
    for result in results:
        assert torch.equal(result.masks("cat")[0], top_left(32, 64))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_readout_runs_at_the_given_images_size(name, tiny_cache):
    """SD3's and Flux's img2img calls default to the model's square size whatever the image: the readout stretched a
    48x32 image to a square (tiny-flux: a 64x64 token grid for 8x12 image tokens; mask IoU against the image-size
    readout 0.12). It runs at the image's size, as an explicit height / width does."""
    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache(name)
    options = {k: v for k, v in CALL_DEFAULTS[name].items() if k not in ("height", "width")}
    image = pipe([PROMPT], num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=32, width=48, **options).images[0]
    default = attnctl.read_maps(pipe, image, PROMPT, ["car"], magnets=False, num_inference_steps=4, **options)
    sized = attnctl.read_maps(pipe, image, PROMPT, ["car"], magnets=False, num_inference_steps=4, height=32, width=48, **options)
    scale = pipe.vae_scale_factor * (2 if name == "tiny-flux" else pipe.transformer.config.patch_size)
    assert sized.grid_maps.shape[-2:] == (32 // scale, 48 // scale)
    assert torch.equal(default.grid_maps, sized.grid_maps) and torch.equal(default.maps, sized.maps)
    # a size the pipeline does not take (SD3 refuses sizes off its multiple) is read at the nearest size below it,
    # and the masks are the image's size
    odd = image.resize((29, 21))
    assert attnctl.read_maps(pipe, odd, PROMPT, ["car"], magnets=False, num_inference_steps=4, **options).masks("car").shape == (1, 21, 29)


def test_readout_of_a_video_pipeline_is_refused_naming_video(tiny_cache):
    """Wan was told to "pass an img2img pipeline of the model instead", which no Wan pipeline is."""
    from PIL import Image

    with pytest.raises(UnsupportedError, match="makes videos"):
        attnctl.read_maps(tiny_cache("tiny-wan"), Image.new("RGB", (48, 64)), PROMPT, ["car"])


def test_readout_takes_sinks_out_of_each_heads_softmax_and_phrases_keep_their_other_tokens(tiny_cache, monkeypatch):
    """End to end: with token 1 ("a") taken for a sink (maps of the mid block: the deepest level), the readout's maps of "red" and "cat" are
    each divided by the rest of each head's softmax, and the phrase "a red cat" loses only the sink's share: its map
    is the sum of the other two (the maps are linear in the words' columns), not zero."""
    from attnctl.controls.maps import capture
    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache("tiny-sd")
    options = {k: v for k, v in CALL_DEFAULTS["tiny-sd"].items() if k not in ("height", "width")}
    images = pipe([PROMPT], num_inference_steps=2, generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS["tiny-sd"]).images
    words = ["red", "cat", "a red cat"]

    def read():
        return attnctl.read_maps(pipe, images, PROMPT, words, strength=0.5, num_inference_steps=4, layers=("mid_block",), **options)

    default = read()
    calls = []

    def token_1_is_a_sink(mass):
        calls.append(mass.shape)
        sinks = torch.zeros(mass.shape[0], mass.shape[-1], dtype=mass.dtype, device=mass.device)
        sinks[:, 1] = 1.0
        return sinks

    monkeypatch.setattr(capture, "global_sinks", token_1_is_a_sink)
    sunk = read()
    assert calls and all(len(shape) == 3 for shape in calls)  # head-averaged (rows, image tokens, text): no per-head copy
    assert torch.isfinite(sunk.maps).all()
    assert (sunk.maps[0, :2] > default.maps[0, :2]).any()  # red and cat gain the sink's share at the deepest level
    torch.testing.assert_close(sunk.maps[0, 2], sunk.maps[0, 0] + sunk.maps[0, 1], rtol=1e-4, atol=1e-6)
    assert (default.maps[0, 2] > default.maps[0, 0] + default.maps[0, 1]).all()  # without sinks the phrase has token 1 too


# -- the effect on the toy model -----------------------------------------------------------------------------------
def test_segmentation_benchmark_runs_on_the_toy_model_8_images():
    """A smoke test of benchmarks/segmentation.py at 8 images in the toy model's map layers (`attnctl.toy.MAP_LAYERS`,
    the down path): every readout runs and gives IoUs in [0, 1] (the 96-image numbers: docs/methods.md). It asserts
    no effect: at 8 images the IoU cannot tell right maps from wrong ones (read_maps returning mirrored maps raised
    the readout's IoU from 0.087 to 0.115). The maps' content is checked above: the readout against a direct
    img2img call, and the orientation of maps and masks."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from segmentation import segmentation

    from attnctl.toy import MAP_LAYERS, load_toy_shapes

    pipe = load_toy_shapes()
    result = segmentation(pipe, 8, layers=MAP_LAYERS)
    assert result["pairs"] >= 16
    for name in ("generation", "readout", "magnets", "ceiling"):
        assert 0.0 <= result[f"iou_{name}"] <= 1.0
    assert result["grid"] == (4, 4)  # MAP_LAYERS: the 4x4 level
    with attnctl.apply(pipe, attnctl.AttentionMaps(["red"], layers=MAP_LAYERS)) as handle:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=1, height=32, width=32)
        layers = handle.outputs["attention_maps"].layers
    assert layers and all(name.startswith("down_blocks.") and name.endswith("attn2") for name in layers)


def test_masks_find_the_objects_on_the_grounded_toy_model_8_images():
    """The CI version of `benchmarks/segmentation.py --model toy-shapes-grounded` (96 images: IoU 0.529 / 0.513 /
    0.519): on the model whose word maps locate their objects, every readout's masks overlap the objects the pixels
    give, at the method's defaults (every cross-attention layer, threshold 0.5). Measured on these 8 images: 0.551
    (generation), 0.525 (readout), 0.527 (magnets), against 0.82 for a perfect map at the 8x8 grid; the same masks
    mirrored left-right give 0.056 / 0.065 / 0.059, and the shipped model's maps 0.08 (96 images), far below the bound."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from segmentation import segmentation

    from attnctl.toy import load_toy_shapes

    result = segmentation(load_toy_shapes(model="toy-shapes-grounded"), 8)
    assert result["pairs"] >= 24 and result["grid"] == (8, 8)
    for name in ("generation", "readout", "magnets"):
        assert result[f"iou_{name}"] >= 0.4, (name, result[f"iou_{name}"])


def test_perfect_map_ceiling():
    """The ceiling's perfect map: at the image's own size it is the object itself (IoU 1); at a coarse grid a blob
    that still covers the object's centre."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from segmentation import iou, perfect_map_mask

    truth = np.zeros((32, 32), dtype=bool)
    truth[4:14, 18:28] = True
    assert iou(perfect_map_mask(truth, (32, 32), 0.5), truth) == 1.0
    coarse = perfect_map_mask(truth, (4, 4), 0.5)
    assert coarse.shape == truth.shape and coarse[9, 23] and not coarse[28, 4]
    assert 0.3 < iou(coarse, truth) < 1.0


def test_readout_of_arrays_and_tensors_is_at_their_own_size(tiny_cache):
    """numpy arrays and tensors are images as the pipeline takes them: their maps and masks came back at the size the
    pass ran at (tiny-flux, a 21x29 image: 16x24), as PIL images' never did; and images of different sizes among
    them were not refused."""
    import numpy as np

    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache("tiny-flux")
    options = {k: v for k, v in CALL_DEFAULTS["tiny-flux"].items() if k not in ("height", "width")}
    pixels = np.random.RandomState(0).rand(21, 29, 3).astype(np.float32)
    for image in (pixels[None], torch.from_numpy(pixels).permute(2, 0, 1)[None]):
        result = attnctl.read_maps(pipe, image, PROMPT, ["car"], magnets=False, num_inference_steps=2, **options)
        assert result.maps.shape[-2:] == (21, 29) and result.masks("car").shape == (1, 21, 29)
    with pytest.raises(ConfigError, match=r"different sizes \(height x width: 21x29, 21x30\)"):
        attnctl.read_maps(pipe, [pixels[None], np.zeros((1, 21, 30, 3), np.float32)], PROMPT, ["car"], **options)


def _readout_text(pipe, denoiser, images, prompt, **call):
    """The text-sequence embeddings the denoiser receives at the readout's first call (a forward pre-hook)."""
    import inspect

    seen = []
    signature = inspect.signature(type(denoiser).forward)

    def record(module, args, kwargs):
        seen.append(signature.bind(module, *args, **kwargs).arguments["encoder_hidden_states"].detach().clone())

    hook = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        if "num_images_per_prompt" in call:  # read_maps sets it itself: the control on the img2img call
            from attnctl.render.readout import img2img_of

            reader = img2img_of(pipe)
            with attnctl.apply(reader, AttentionMaps(["cat"], magnets=True)):
                reader(prompt, image=images, strength=1.0, num_inference_steps=1, guidance_scale=5.0, **call)
        else:
            attnctl.read_maps(pipe, images, prompt, ["cat"], num_inference_steps=2, guidance_scale=5.0, height=32, width=32, **call)
    finally:
        hook.remove()
    return seen[0]


def _encoded(pipe, prompt, **others):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, **others, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


def test_magnets_follow_each_encoders_own_prompt(tiny_cache):
    """RefAM appends the magnets to the prompt; on SDXL CLIP-G reads `prompt_2` (SD3's T5 `prompt_3`), so its magnet
    text is `prompt_2 + magnets`. The readout encoded `prompt + magnets` for every encoder (prompt_2 dropped from
    the sequence while the pooled embeddings still followed it): CLIP-G's half was off by 0.75 on tiny-sdxl."""
    from PIL import Image

    def m(texts):
        return [magnet_prompt(t, MAGNET_WORDS) for t in texts]

    images = [Image.new("RGB", (32, 32), (120, 60, 200)), Image.new("RGB", (32, 32), (20, 160, 90))]
    first, second = ["a photo of a cat", "a red cat in the park"], ["a sketch of a cat", "a blue cat on the street"]
    pipe = tiny_cache("tiny-sdxl")
    text = _readout_text(pipe, pipe.unet, images, first, prompt_2=second)  # [uncond x 2, cond x 2]
    assert torch.equal(text[2:], _encoded(pipe, m(first), prompt_2=m(second)))
    # one prompt_2 for every prompt, and num_images_per_prompt
    text = _readout_text(pipe, pipe.unet, images[0], first[0], prompt_2=second[0], num_images_per_prompt=2)
    assert torch.equal(text[2:], _encoded(pipe, m(first[:1]) * 2, prompt_2=m(second[:1]) * 2))
    # without prompt_2 every encoder reads prompt + magnets, as before
    text = _readout_text(pipe, pipe.unet, images, first)
    assert torch.equal(text[2:], _encoded(pipe, m(first), prompt_2=None))

    pipe = tiny_cache("tiny-sd3")  # CLIP-L, CLIP-G and T5 each read their own prompt
    third = ["a drawing of a cat", "a green cat near the river"]
    text = _readout_text(pipe, pipe.transformer, images, first, prompt_2=second, prompt_3=third)
    assert torch.equal(text[2:], _encoded(pipe, m(first), prompt_2=m(second), prompt_3=m(third)))
    text = _readout_text(pipe, pipe.transformer, images, first, prompt_3=third)  # prompt_2 left None: CLIP-G reads prompt
    assert torch.equal(text[2:], _encoded(pipe, m(first), prompt_2=None, prompt_3=m(third)))


def test_magnet_prompt_is_the_prompt_as_given_with_textual_inversion():
    """The magnet prompt is the call's own prompt: it was taken as the tokenizer sees it (textual inversion's `<x>`
    already expanded to `<x> <x>_1`), which `encode_prompt` expanded again (`<x> <x>_1 <x> <x>_1_1`)."""
    from PIL import Image

    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline("tiny-sd")  # its own: the embedding is loaded into it
    pipe.load_textual_inversion({"<thing>": torch.randn(2, pipe.text_encoder.config.hidden_size)}, token="<thing>")
    text = _readout_text(pipe, pipe.unet, Image.new("RGB", (32, 32)), "a <thing> cat")
    assert torch.equal(text[1:], _encoded(pipe, [magnet_prompt("a <thing> cat", MAGNET_WORDS)]))


# -- the readout after a text-to-image call (AttentionMaps(magnets=...) on a text-to-image pipeline) --------------
def _pictures(pipe, name, prompts, per_prompt=1, seed=0, **call):
    from attnctl.testing import CALL_DEFAULTS

    return pipe(prompts, num_inference_steps=4, guidance_scale=5.0, num_images_per_prompt=per_prompt,
                generator=torch.Generator().manual_seed(seed), **CALL_DEFAULTS[name], **call).images


def _same_pictures(a, b):
    return len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-flux"])
def test_magnets_read_the_images_a_text_to_image_call_generated(name, tiny_cache):
    """Issue #21's form: the generation is the stock one, bitwise, and `handle.outputs` holds the readout of its
    images: the maps of `read_maps` over them with the call's prompts (per image: num_images_per_prompt), negative
    prompt, steps, guidance and text length (Flux's max_sequence_length), at the control's strength. A second call
    reads its own images the same way; after remove() the pipeline is stock."""
    from attnctl.testing import CALL_DEFAULTS

    pipe = tiny_cache(name)
    denoiser = pipe.transformer if name == "tiny-flux" else pipe.unet
    options = {k: v for k, v in CALL_DEFAULTS[name].items() if k not in ("height", "width")}
    negative = {} if name == "tiny-flux" else {"negative_prompt": ["a green dog", "a grey bird"]}
    per_image = {key: [p for p in texts for _ in range(2)] for key, texts in negative.items()}
    prompts, other = [PROMPT, "a blue cat and a red car"], "a red cat"
    stock = _pictures(pipe, name, prompts, per_prompt=2, **negative)
    hooks = (dict(denoiser._forward_pre_hooks), dict(denoiser._forward_hooks))
    with attnctl.apply(pipe, AttentionMaps(["red", "cat"], magnets=True, readout_strength=0.5)) as handle:
        images = _pictures(pipe, name, prompts, per_prompt=2, **negative)
        result = handle.outputs["attention_maps"]
        again = _pictures(pipe, name, [other], seed=3)
        second = handle.outputs["attention_maps"]
    assert _same_pictures(images, stock)
    expected = attnctl.read_maps(pipe, images, [p for p in prompts for _ in range(2)], ["red", "cat"], strength=0.5,
                                 num_inference_steps=4, guidance_scale=5.0, **options, **per_image)
    assert result.maps.shape == (4, 2, 32, 32) and torch.equal(result.maps, expected.maps)
    assert torch.equal(result.grid_maps, expected.grid_maps) and result.contributions == expected.contributions
    assert _same_pictures(result.images, images) and result.masks("cat").shape == (4, 32, 32)
    plain = attnctl.read_maps(pipe, again, other, ["red", "cat"], num_inference_steps=4, guidance_scale=5.0, **options)
    assert torch.equal(second.maps, plain.maps)
    assert _same_pictures(_pictures(pipe, name, prompts, per_prompt=2, **negative), stock)  # removed: stock again
    assert (dict(denoiser._forward_pre_hooks), dict(denoiser._forward_hooks)) == hooks
    assert not any("attnctl" in type(p).__module__ for p in denoiser.attn_processors.values())
    assert "maybe_free_model_hooks" not in pipe.__dict__ and "step" not in pipe.scheduler.__dict__


def test_a_readout_that_raises_leaves_the_handle_installed(tiny_cache, monkeypatch):
    """The readout runs with the handle stepped aside; when it raises, the error reaches the caller and the handle is
    back in place and live: the next call is controlled (a second AttentionMaps captures during the generation)."""
    import attnctl.pipelines.readout as readout
    from attnctl.handle import _live_handle
    from attnctl.processors.base import ControlledProcessor

    pipe = tiny_cache("tiny-sd")
    stock = _pictures(pipe, "tiny-sd", [PROMPT])
    real = readout.read_pass

    def failing(*args, **kwargs):
        raise RuntimeError("readout failed")

    with attnctl.apply(pipe, [AttentionMaps(["cat"], magnets=True), AttentionMaps(["car"], key="plain")]) as handle:
        monkeypatch.setattr(readout, "read_pass", failing)
        with pytest.raises(RuntimeError, match="readout failed"):
            _pictures(pipe, "tiny-sd", [PROMPT])
        assert handle.live and _live_handle(pipe.unet) is handle
        assert all(isinstance(p, ControlledProcessor) for p in pipe.unet.attn_processors.values())
        monkeypatch.setattr(readout, "read_pass", real)
        images = _pictures(pipe, "tiny-sd", [PROMPT])
        assert _same_pictures(images, stock)
        assert handle.outputs["plain"].contributions[0] > 0 and handle.outputs["attention_maps"].maps.shape == (1, 1, 32, 32)
        with pytest.raises(attnctl.HandleError, match="live attnctl handle"):  # still the denoiser's live handle
            attnctl.apply(pipe, AttentionMaps(["cat"]))
    assert _same_pictures(_pictures(pipe, "tiny-sd", [PROMPT]), stock)


def test_magnets_on_a_compiled_text_to_image_denoiser_are_refused(tiny_cache):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_cache("tiny-sd")
    compiled = StableDiffusionPipeline(**{**pipe.components, "unet": torch.compile(pipe.unet)})
    with pytest.raises(UnsupportedError, match="compiled denoiser recompile"):
        attnctl.apply(compiled, AttentionMaps(["cat"], magnets=True))


def test_the_readout_runs_before_the_pipelines_model_offload(tiny_cache):
    """`maybe_free_model_hooks` (enable_model_cpu_offload's end of call) runs after the readout, as last as without
    attnctl: run before it, the readout loaded the denoiser and the VAE back, and they stayed on the accelerator."""
    pipe = tiny_cache("tiny-sd")
    seen = []
    pipe.maybe_free_model_hooks = lambda: seen.append(handle.runtime.outputs.get("attention_maps") is not None)
    try:
        with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)) as handle:
            _pictures(pipe, "tiny-sd", [PROMPT])
    finally:
        del pipe.maybe_free_model_hooks
    assert seen == [True]


def test_a_readout_that_raises_still_lets_the_pipeline_offload(tiny_cache, monkeypatch):
    from attnctl.pipelines import readout

    pipe = tiny_cache("tiny-sd")
    seen = []
    pipe.maybe_free_model_hooks = lambda: seen.append("offload")
    monkeypatch.setattr(readout, "read_pass", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("readout failed")))
    try:
        with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)):
            with pytest.raises(RuntimeError, match="readout failed"):
                _pictures(pipe, "tiny-sd", [PROMPT])
    finally:
        del pipe.maybe_free_model_hooks
    assert seen == ["offload"]


def test_readouts_that_could_not_read_the_call_are_refused_before_the_generation(tiny_cache, monkeypatch):
    """What the img2img readout would not get (an IP-Adapter's image, a control image), the call's prompt as text,
    and a method another library stacked on attnctl's: refused at apply or at the call, before any denoising step
    (they failed after the generation, losing its images)."""
    from diffusers import StableDiffusionPipeline

    from .test_ip_adapter_calls import _ip_adapter

    with pytest.raises(UnsupportedError, match="IP-Adapter of pipe.unet"):
        attnctl.apply(_ip_adapter(make_tiny_pipeline("tiny-sd"), "tiny-sd"), AttentionMaps(["cat"], magnets=True))

    class ControlImagePipeline(StableDiffusionPipeline):
        def __call__(self, prompt=None, control_image=None, **kwargs):
            return super().__call__(prompt, **kwargs)

    pipe = tiny_cache("tiny-sd")
    with pytest.raises(UnsupportedError, match="control_image"):
        attnctl.apply(ControlImagePipeline(**pipe.components), AttentionMaps(["cat"], magnets=True))

    steps = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: steps.append(1))
    try:
        with attnctl.apply(pipe, AttentionMaps([2], magnets=True)):
            embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True)
            with pytest.raises(ConfigError, match="gave no prompt text"):
                pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=2, height=32, width=32)
        with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)):
            encode = pipe.encode_prompt
            pipe.encode_prompt = lambda *args, **kwargs: encode(*args, **kwargs)  # another library's wrapper on attnctl's
            with pytest.raises(attnctl.PipelineChangedError, match="stacked on"):
                _pictures(pipe, "tiny-sd", [PROMPT])
            del pipe.encode_prompt
            pipe.encode_prompt = encode
    finally:
        hook.remove()
    assert steps == []


def test_the_readout_leaves_the_pipelines_scheduler_config_alone(tiny_cache):
    """The img2img constructor applies diffusers' deprecation fix-ups to the scheduler it is given (SD's clip_sample,
    steps_offset): the readout gives it a copy, so the user's scheduler, and every later generation, stay as they were."""
    from diffusers import DDIMScheduler

    pipe = make_tiny_pipeline("tiny-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True, steps_offset=0)
    with attnctl.apply(pipe, AttentionMaps(["cat"], magnets=True)):
        _pictures(pipe, "tiny-sd", [PROMPT])
    assert pipe.scheduler.config.clip_sample is True and pipe.scheduler.config.steps_offset == 0


def test_a_readout_strength_without_magnets_is_refused():
    with pytest.raises(ConfigError, match="readout_strength=0.3 does nothing without magnets"):
        AttentionMaps(["cat"], readout_strength=0.3)
    assert AttentionMaps(["cat"], magnets=True, readout_strength=0.3).readout_strength == 0.3


def test_a_guidance_scale_given_as_a_numpy_or_tensor_scalar_reaches_the_readout():
    """Settings the readout takes over from the call, given as numpy or 0-d tensor scalars, are kept as numbers."""
    import numpy as np

    from attnctl.pipelines.runtime import _plain, _setting

    for given in (3.0, np.float32(3.0), torch.tensor(3.0)):
        value = _setting(given)
        assert _plain(value) and value == 3.0 and type(value) is float
    assert not _plain(_setting(torch.ones(2)))  # a tensor stays data, left out
