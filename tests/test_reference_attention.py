"""Reference attention (reference-only, PrimeComposer's attention steering): identities, an independent eager
reference written from docs/methods.md ("Reference attention") on SD (DDIM) and Flux (flow matching), every family
runs or is refused, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl import ConfigError
from attnctl.control import Bound, Control
from attnctl.controls.cross_image.reference import ReferenceAttention
from attnctl.processors.edit import Edit, LayerHook
from attnctl.testing import CALL_DEFAULTS, NEW_TINY_MODELS, TINY_MODELS, make_tiny_pipeline
from attnctl.testing.new_families import PROMPT_KEYWORD, available

from .helpers import tiny_inpainting

PROMPTS = ["a red cat on the street", "a blue dog in a field", "a green car"]
TOL = {"rtol": 1e-4, "atol": 1e-4}
LOOSE = {"rtol": 1e-3, "atol": 1e-3}
REFUSED = {"tiny-qwenimage": "image vae", "tiny-wan": "video", "tiny-zimage": "row inputs"}


def picture(size=32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def run(pipe, name, prompts=PROMPTS, steps=2, guidance=5.0, **kwargs):
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    options.setdefault("guidance_scale", guidance)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    if name in PROMPT_KEYWORD:
        out = pipe(prompt=prompts, num_inference_steps=steps, output_type="latent", generator=generators, **options)
    else:
        out = pipe(prompts, num_inference_steps=steps, output_type="latent", generator=generators, **options)
    return out.frames if hasattr(out, "frames") and not hasattr(out, "images") else out.images


def soft_mask() -> torch.Tensor:
    """A (12, 20) soft mask in [0, 1] whose pixels do not divide the attention grids (fractional overlaps)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 12), torch.linspace(0, 1, 20), indexing="ij")
    return (0.2 + 0.8 * xs * (1 - ys)).clamp(0, 1).float()


def area_average(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h * w,) row-major: docs/methods.md's weight of a mask on an h x w grid, the mean of the mask (stretched over the
    image) over each cell's area, from exact rational overlaps."""
    rows, cols = mask.shape
    m = mask.double()

    def overlap(cell: int, cells: int, pixel: int, pixels: int) -> float:
        low = max(Fraction(cell, cells), Fraction(pixel, pixels))
        high = min(Fraction(cell + 1, cells), Fraction(pixel + 1, pixels))
        return float(max(high - low, Fraction(0)) * cells)

    ay = torch.tensor([[overlap(i, h, p, rows) for p in range(rows)] for i in range(h)], dtype=torch.float64)
    ax = torch.tensor([[overlap(j, w, q, cols) for q in range(cols)] for j in range(w)], dtype=torch.float64)
    return (ay @ m @ ax.T).flatten()


class _EagerHook(LayerHook):
    def __init__(self, control):
        self.control = control

    def attend(self, call, q, k, v, spec, compute):
        out, _ = compute(q, k, v, spec)
        out = out.clone()
        rows = call.rows.rows
        d = q.shape[-1]
        scale = spec.scale if spec.scale is not None else d**-0.5
        g = call.geometry
        image = slice(0, q.shape[2]) if call.layer.text == "none" else g.image_slice
        h, w = g.image_hw
        box = self.control.region
        if isinstance(box, torch.Tensor):  # a soft mask: each query's share of the attention with the reference
            inside = area_average(box, h, w)[:, None]
        else:
            inside = torch.tensor([box is None or (box[0] <= ((i % w) + 0.5) / w <= box[2] and box[1] <= ((i // w) + 0.5) / h <= box[3])
                                   for i in range(h * w)], dtype=torch.float64)[:, None]
        for i, row in enumerate(rows):
            if row.prompt == 0 or (self.control.branch == "cond" and row.branch != "cond"):
                continue
            j = next(n for n, r in enumerate(rows) if (r.branch, r.tag, r.prompt) == (row.branch, row.tag, 0))
            keys = torch.cat([k[i].double(), k[j][:, image].double()], 1)
            values = torch.cat([v[i].double(), v[j][:, image].double()], 1)
            bias = torch.cat([torch.zeros(k.shape[2], dtype=torch.float64),
                              torch.full((image.stop - image.start,), math.log(self.control.strength) if self.control.strength else -math.inf,
                                         dtype=torch.float64)])
            logits = q[i][:, image].double() @ keys.transpose(-1, -2) * scale + bias
            if spec.attn_mask is not None:  # the layer's own mask (Chroma's text padding) over its own keys
                mask = spec.attn_mask[i if spec.attn_mask.shape[0] > 1 else 0]
                mask = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
                own = mask.double()[..., image, :] if mask.shape[-2] > 1 else mask.double()
                logits = logits + torch.cat([own.expand(*logits.shape[:-1], -1), logits.new_zeros(*logits.shape[:-1], image.stop - image.start)], -1)
            read = torch.softmax(logits, -1) @ values
            stock = out[i, :, image].double()
            mixed = inside * read + (1 - inside) * stock
            if row.branch == "uncond":  # reference-only's style fidelity: sf * own attention + (1 - sf) * with the reference
                mixed = self.control.style_fidelity * stock + (1 - self.control.style_fidelity) * mixed
            out[i, :, image] = mixed.to(out.dtype)
        return out, None


@dataclass(frozen=True)
class EagerReference(Control, type_name="test-eager-reference"):
    image: Any = None
    strength: float = 1.0
    region: Any = None  # a box or an (H, W) soft mask tensor
    branch: str = "both"
    style_fidelity: float = 0.0

    def select(self, adapter):
        return tuple(layer for layer in adapter.layers if layer.kind in ("self", "joint"))

    def bind(self, context):
        return _EagerBound(self, context)


class _EagerBound(Bound):
    def __init__(self, control, context):
        super().__init__(control, context.layers, (0.0, 1.0))
        pipe = context.pipeline
        self.pipe = pipe
        pixels = torch.tensor(np.asarray(control.image.convert("RGB").resize((32, 32)), dtype=np.float32)) / 127.5 - 1
        with torch.no_grad():
            mean = pipe.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mean
        shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
        self.x0 = (mean - shift) * pipe.vae.config.scaling_factor
        self.eps = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(0))
        self.flux = hasattr(pipe, "_pack_latents")

    def transform_inputs(self, frame, inputs):
        name = "sample" if "sample" in inputs else "hidden_states"
        scheduler = self.pipe.scheduler
        if "FlowMatch" in type(scheduler).__name__:
            sigma = scheduler.sigmas[scheduler.step_index or 0]
            noised = (1 - sigma) * self.x0 + sigma * self.eps
        else:
            a = scheduler.alphas_cumprod[int(inputs["timestep"].flatten()[0])]
            noised = a.sqrt() * self.x0 + (1 - a).sqrt() * self.eps
        if self.flux:
            b, c, hh, ww = noised.shape
            noised = noised.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // 2) * (ww // 2), c * 4)
        sample = inputs[name].clone()
        for i, row in enumerate(frame.rows.rows):
            if row.prompt == 0:  # an inpainting UNet's input: latent 4, mask 1, masked image 4; the latent replaced
                sample[i, : noised.shape[1]] = noised[0].to(sample.dtype)
        return {**inputs, name: sample}

    def edit(self, layer, frame):
        return Edit(hooks=(_EagerHook(self.control),))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_idle_is_bitwise_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    for control in (ReferenceAttention(picture(), strength=0.0), ReferenceAttention(picture(), steps=(0.99, 1.0))):
        with attnctl.apply(pipe, [control]):
            assert torch.equal(run(pipe, name), stock)


@pytest.mark.parametrize(
    "options", [{}, {"strength": 3.0, "region": (0.0, 0.0, 0.5, 1.0)}, {"branch": "cond"}, {"style_fidelity": 0.5},
                {"style_fidelity": 0.3, "region": (0.0, 0.0, 0.5, 1.0)}, {"strength": 3.0, "region": soft_mask()}],
    ids=["everywhere", "region", "cond", "style-fidelity", "style-fidelity-region", "soft-mask"],
)
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_matches_eager_reference(name, options, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    with attnctl.apply(pipe, [ReferenceAttention(picture(), **options)]):
        ours = run(pipe, name)
    with attnctl.apply(pipe, [EagerReference(picture(), options.get("strength", 1.0), options.get("region"), options.get("branch", "both"),
                                             options.get("style_fidelity", 0.0))]):
        expected = run(pipe, name)
    assert not torch.allclose(expected[1:], stock[1:], **TOL)
    torch.testing.assert_close(ours[1:], expected[1:], **TOL)


def test_inpainting_denoisers_get_the_reference_in_their_latent_channels(tiny_cache):
    """An inpainting UNet reads 9 channels (latent 4, mask 1, masked image 4): the reference row's latent channels
    are the noised reference and its mask and masked image the pipeline's (the call failed at the first step)."""
    pipe, image, mask = tiny_inpainting(tiny_cache("tiny-sd"))

    def call():
        return run(pipe, "tiny-sd", prompts=PROMPTS[:2], image=image, mask_image=mask)

    stock = call()
    with attnctl.apply(pipe, [ReferenceAttention(picture())]):
        ours = call()
    with attnctl.apply(pipe, [EagerReference(picture())]):
        expected = call()
    assert not torch.allclose(expected[1:], stock[1:], **TOL)
    torch.testing.assert_close(ours[1:], expected[1:], **TOL)


@pytest.mark.parametrize("options", [{}, {"strength": 3.0, "region": (0.0, 0.0, 0.5, 1.0)}], ids=["everywhere", "region"])
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-pixart", "tiny-chroma"])
def test_matches_eager_reference_on_other_families(name, options, tiny_cache):
    """SD3 and Chroma (joint attention; Chroma's text padding mask on the own keys) and PixArt (self-attention)."""
    if name in NEW_TINY_MODELS and not available(name):
        pytest.skip(f"diffusers lacks {name}")
    pipe = tiny_cache(name)
    stock = run(pipe, name, guidance=3.0)
    with attnctl.apply(pipe, [ReferenceAttention(picture(), **options)]):
        ours = run(pipe, name, guidance=3.0)
    with attnctl.apply(pipe, [EagerReference(picture(), options.get("strength", 1.0), options.get("region"))]):
        expected = run(pipe, name, guidance=3.0)
    assert not torch.allclose(expected[1:], stock[1:], **TOL)
    torch.testing.assert_close(ours[1:], expected[1:], **LOOSE)


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n not in ("tiny-sd", "tiny-flux")] + list(NEW_TINY_MODELS))
def test_other_families_run_or_refuse(name, tiny_cache):
    if name in NEW_TINY_MODELS and not available(name):
        pytest.skip(f"diffusers lacks {name}")
    pipe = tiny_cache(name)
    if name in REFUSED:
        with pytest.raises(attnctl.UnsupportedError, match=REFUSED[name]):
            attnctl.apply(pipe, [ReferenceAttention(picture())])
        return
    stock = run(pipe, name, guidance=3.0)
    with attnctl.apply(pipe, [ReferenceAttention(picture(), strength=3.0)]):
        ours = run(pipe, name, guidance=3.0)
    assert torch.isfinite(ours).all()
    assert not torch.allclose(ours[1:], stock[1:], **TOL)


def test_edm_schedulers_are_refused_when_the_call_binds(tiny_cache):
    """The reference is noised to each call's level, which an EDM scheduler (preconditioned model) does not define:
    refused before the first denoiser call runs, naming the scheduler; SAG, which degrades its input at that level,
    likewise. Idle (strength 0 / scale 0) is not refused."""
    from diffusers import EDMEulerScheduler

    pipe = tiny_cache("tiny-sd")
    saved = pipe.scheduler
    pipe.scheduler = EDMEulerScheduler()
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for control in (ReferenceAttention(picture()), attnctl.SAG(scale=0.75)):
            with attnctl.apply(pipe, [control]):
                with pytest.raises(attnctl.UnsupportedError, match="EDMEulerScheduler"):
                    run(pipe, "tiny-sd")
            assert not calls, type(control).__name__
        for control in (ReferenceAttention(picture(), strength=0.0), attnctl.SAG(scale=0.0)):
            with attnctl.apply(pipe, [control]):
                run(pipe, "tiny-sd")
    finally:
        hook.remove()
        pipe.scheduler = saved


def test_bad_options(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="image"):
        ReferenceAttention(3)
    with pytest.raises(ConfigError, match="strength"):
        ReferenceAttention("x.png", strength=-1)
    with pytest.raises(ConfigError, match="region"):
        ReferenceAttention("x.png", region=(0.5, 0, 0.1, 1))
    with pytest.raises(ConfigError, match="x.png' does not exist"):  # a path is checked when the control is made
        ReferenceAttention("x.png")
    with pytest.raises(ConfigError, match="style_fidelity"):
        ReferenceAttention(picture(), style_fidelity=1.5)
    with pytest.raises(ConfigError, match="branch='both'"):
        ReferenceAttention(picture(), branch="cond", style_fidelity=0.5)
    path = str(tmp_path / "x.png")
    picture().save(path)
    control = ReferenceAttention(path, strength=2.0, region=(0, 0, 0.5, 1))
    assert Control.from_dict(control.to_dict()) == control
    with pytest.raises(ConfigError, match="PIL"):
        ReferenceAttention(picture()).to_dict()
    assert len({ReferenceAttention(picture()), ReferenceAttention(picture()), control}) == 2  # hashable, as every control
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [ReferenceAttention(picture(), reference_row=5)]):
        with pytest.raises(ConfigError, match="prompt row 5"):
            run(pipe, "tiny-sd")


def test_a_mask_region_of_a_boxs_cells_is_bitwise_the_box(tiny_cache):
    """A mask that covers exactly the box's cells on every grid (tiny SD: 16x16 and 8x8) weighs them 1 and the others 0,
    as the box does; given as a bool tensor, a uint8 numpy array or a PIL image."""
    pipe = tiny_cache("tiny-sd")
    stock = run(pipe, "tiny-sd")
    with attnctl.apply(pipe, [ReferenceAttention(picture(), strength=3.0, region=(0.0, 0.0, 0.5, 1.0))]):
        boxed = run(pipe, "tiny-sd")
    assert not torch.equal(boxed, stock)
    left = torch.zeros(32, 32, dtype=torch.bool)
    left[:, :16] = True
    for mask in (left, left.numpy().astype(np.uint8) * 255, Image.fromarray(left.numpy().astype(np.uint8) * 255)):
        with attnctl.apply(pipe, [ReferenceAttention(picture(), strength=3.0, region=mask)]):
            assert torch.equal(run(pipe, "tiny-sd"), boxed)


def test_mask_regions_are_read_validated_and_serialised_as_regions_masks(tmp_path):
    with pytest.raises(ConfigError, match=r"ReferenceAttention.region: a mask must be 2-D .*got shape \(2, 8, 8\)"):
        ReferenceAttention(picture(), region=torch.ones(2, 8, 8))
    with pytest.raises(ConfigError, match=r"ReferenceAttention.region: mask values must lie in \[0, 1\]; got values from -0.5 to 1.5"):
        ReferenceAttention(picture(), region=torch.tensor([[-0.5, 1.5], [0.0, 1.0]]))
    with pytest.raises(ConfigError, match=r"ReferenceAttention.region: the mask is empty"):
        ReferenceAttention(picture(), region=np.zeros((4, 4)))
    with pytest.raises(ConfigError, match=r"ReferenceAttention.region: mask file 'nope.png' does not exist"):
        ReferenceAttention(picture(), region="nope.png")
    with pytest.raises(ConfigError, match="ReferenceAttention.region must be None, a box .* or a mask"):
        ReferenceAttention(picture(), region=3)
    with pytest.raises(ConfigError, match="ReferenceAttention.region: a box is"):  # boxes as before
        ReferenceAttention(picture(), region=(0.0, 0.5))
    image, mask_file = str(tmp_path / "ref.png"), str(tmp_path / "mask.png")
    picture().save(image)
    Image.fromarray((soft_mask().numpy() * 255).astype(np.uint8)).save(mask_file)
    from_file = ReferenceAttention(image, region=mask_file)
    assert from_file.region == mask_file and Control.from_dict(from_file.to_dict()) == from_file
    in_memory = ReferenceAttention(image, region=soft_mask())
    with pytest.raises(ConfigError, match="in-memory mask"):
        in_memory.to_dict()
    assert in_memory.to_record()["region"] == "<a 12x20 mask, not saved>"
    copy = soft_mask()
    again = ReferenceAttention(image, region=copy)
    copy.fill_(1.0)  # a private copy: the caller's later changes do not leak in
    assert again == in_memory and hash(again) == hash(in_memory) and in_memory != from_file
    assert ReferenceAttention(image, region=soft_mask() * 0.5) != in_memory
    assert len({in_memory, again, from_file, ReferenceAttention(image, region=(0, 0, 0.5, 1))}) == 3


def test_the_image_may_be_a_tensor_or_array_as_diffusers_pipelines_take_it():
    """Floats in [0, 1], torch (3, H, W) / (1, 3, H, W) or numpy (H, W, 3), read as the 8-bit image they hold."""
    pixels = np.asarray(picture())
    expected = picture().tobytes()
    as_float = torch.from_numpy(pixels.copy()).permute(2, 0, 1).double() / 255.0
    for image in (as_float, as_float[None].float(), pixels.astype(np.float32) / 255.0, pixels):
        assert ReferenceAttention(image).image.tobytes() == expected
    assert ReferenceAttention(as_float) == ReferenceAttention(picture())
    with pytest.raises(ConfigError, match=r"ReferenceAttention.image: a float image holds values in \[0, 1\].*from -1 to 0.99"):
        ReferenceAttention(as_float * 2 - 1)
    with pytest.raises(ConfigError, match=r"ReferenceAttention.image: an RGB image tensor has shape .*got shape \(32, 32\)"):
        ReferenceAttention(as_float[0])


# -- reference-only's AdaIN ---------------------------------------------------------------------------------------


def community_adain_modules(unet, weight):
    """The community StableDiffusionReferencePipeline's choice, transcribed: block weights (mid 0, down block w of D
    1 - w / D, up block w of U w / U) doubled, AdaIN where `gn_auto_machine_weight >= weight`; inside a block after each
    (resnet, transformer) stage, or each resnet of a block without attentions."""
    chosen = [unet.mid_block]
    for blocks, weights in ((unet.down_blocks, [1.0 - w / len(unet.down_blocks) for w in range(len(unet.down_blocks))]),
                            (unet.up_blocks, [w / len(unet.up_blocks) for w in range(len(unet.up_blocks))])):
        for block, block_weight in zip(blocks, weights):
            if weight >= 2 * block_weight:
                chosen.extend(block.attentions if hasattr(block, "attentions") else block.resnets)
    return chosen


def adain_hook(branch="both", style_fidelity=0.0):
    """The community pipeline's AdaIN read step on the in-batch rows: each row of prompt > 0 takes the mean and the
    variance (no correction, clamped at 1e-6) of the prompt-0 row of its CFG half; uncond rows blend by style fidelity."""

    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        half = x.shape[0] // 2
        out = x.clone()
        for i in range(x.shape[0]):
            source = 0 if i < half else half
            uncond = i < half
            if i == source or (branch == "cond" and uncond):
                continue
            var, mean = torch.var_mean(x[i].double(), dim=(1, 2), keepdim=True, correction=0)
            ref_var, ref_mean = torch.var_mean(x[source].double(), dim=(1, 2), keepdim=True, correction=0)
            moved = (x[i].double() - mean) / torch.clamp(var, min=1e-6) ** 0.5 * torch.clamp(ref_var, min=1e-6) ** 0.5 + ref_mean
            if uncond:
                moved = style_fidelity * x[i].double() + (1 - style_fidelity) * moved
            out[i] = moved.to(x.dtype)
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    return hook


@pytest.mark.parametrize(
    "options",
    [{"strength": 0.0}, {}, {"strength": 0.0, "adain_weight": 2.0}, {"strength": 0.0, "adain_weight": 0.0},
     {"style_fidelity": 0.5}, {"branch": "cond"}],
    ids=["adain-only", "attention+adain", "every-block", "mid-only", "style-fidelity", "cond"],
)
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_adain_matches_community_rule(name, options, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    with attnctl.apply(pipe, [ReferenceAttention(picture(), adain=True, **options)]):
        ours = run(pipe, name)
    branch, fidelity = options.get("branch", "both"), options.get("style_fidelity", 0.0)
    hooks = [module.register_forward_hook(adain_hook(branch, fidelity))
             for module in community_adain_modules(pipe.unet, options.get("adain_weight", 1.0))]
    try:
        with attnctl.apply(pipe, [EagerReference(picture(), options.get("strength", 1.0), None, branch, fidelity)]):
            expected = run(pipe, name)
    finally:
        for hook in hooks:
            hook.remove()
    assert not torch.allclose(expected[1:], stock[1:], **TOL)
    torch.testing.assert_close(ours[1:], expected[1:], **TOL)
    assert torch.equal(run(pipe, name), stock)  # the block wraps are gone after the call's handle


def test_adain_idle_and_refusals(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stock = run(pipe, "tiny-sd")
    with attnctl.apply(pipe, [ReferenceAttention(picture(), adain=True, steps=(0.99, 1.0))]):
        assert torch.equal(run(pipe, "tiny-sd"), stock)  # outside its steps every wrapped block returns its own output
    with pytest.raises(ConfigError, match="adain_weight"):
        ReferenceAttention(picture(), adain=True, adain_weight=2.5)
    with pytest.raises(ConfigError, match="adain must be True or False"):
        ReferenceAttention(picture(), adain="yes")
    with pytest.raises(ConfigError, match="region"):
        ReferenceAttention(picture(), adain=True, region=(0, 0, 0.5, 1))
    assert "adain=False" in ReferenceAttention(picture(), adain=True).compile_refusal(None)
    assert ReferenceAttention(picture()).compile_refusal(None) is None
    flux = tiny_cache("tiny-flux")
    with pytest.raises(attnctl.UnsupportedError, match="UNet"):
        attnctl.apply(flux, [ReferenceAttention(picture(), adain=True)])
    assert all(proc is not None for proc in flux.transformer.attn_processors.values())  # nothing left installed


def test_a_float16_vae_that_asks_for_upcasting_encodes_the_reference_in_float32(tiny_cache):
    """SDXL's VAE config sets force_upcast (its float16 encoder overflows): the reference is encoded in float32, as
    diffusers' img2img pipelines do, and the VAE is back in float16 afterwards, also when encoding fails."""
    import copy
    from types import SimpleNamespace

    from attnctl.controls.cross_image.reference import encode_reference
    from attnctl.handle import adapter_for

    vae = copy.deepcopy(tiny_cache("tiny-sdxl").vae).to(torch.float16)
    vae.register_to_config(force_upcast=True)
    seen = []
    encode = vae.encode
    vae.encode = lambda pixels: (seen.append((pixels.dtype, next(vae.parameters()).dtype)), encode(pixels))[1]
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    latents = encode_reference(SimpleNamespace(vae=vae), adapter_for(tiny_cache("tiny-sdxl").unet), image, (32, 32), "cpu", torch.float16)
    assert seen == [(torch.float32, torch.float32)] and vae.dtype == torch.float16
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()

    def broken(pixels):
        raise RuntimeError("encoder failed")

    vae.encode = broken
    with pytest.raises(RuntimeError, match="encoder failed"):
        encode_reference(SimpleNamespace(vae=vae), adapter_for(tiny_cache("tiny-sdxl").unet), image, (32, 32), "cpu", torch.float16)
    assert vae.dtype == torch.float16


def test_flux2_reference_is_in_the_latent_space_of_the_pipelines_own_image_encoding():
    """Flux.2's pipelines normalise a VAE encoding by the VAE's batch-norm statistics per patch channel
    (`Flux2KleinPipeline._encode_vae_image`): the reference row carries the reference in that space. The tiny VAE's
    statistics are fresh (mean 0, var 1), so the test gives it a trained VAE's kind (the shift and scale alone, as
    before, were 0.79 off on a latent of magnitude 1)."""

    if not available("tiny-flux2"):
        pytest.skip("needs diffusers with Flux2KleinPipeline")
    pipe = make_tiny_pipeline("tiny-flux2")
    bn = pipe.vae.bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, bn.running_mean.numel()))
        bn.running_var.copy_(torch.linspace(0.5, 4.0, bn.running_var.numel()))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    with attnctl.apply(pipe, [ReferenceAttention(image, strength=1.0)]) as handle:
        pipe(prompt=["a cat", "a cat on the street"], num_inference_steps=1, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS["tiny-flux2"])
        bound = handle.runtime.last_call.bound[0]
        ours = bound.adapter.packed_latents(bound.x0.float())
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        theirs = pipe._encode_vae_image(pixels, generator=None).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_3d_region_mask_is_refused_in_reference_attention_own_words():
    """ReferenceAttention takes one 2-D mask: a (frames, H, W) stack is refused without Region's per-frame wording."""
    for value in (torch.ones(3, 8, 8), np.ones((2, 8, 8)), np.ones((8, 8, 3))):
        with pytest.raises(ConfigError, match=r"ReferenceAttention.region: .*ReferenceAttention takes one 2-D mask for the "
                                              r"whole image, no per-frame masks; got shape") as info:
            ReferenceAttention(picture(), region=value)
        assert "Region also takes" not in str(info.value) and "token frame" not in str(info.value)
