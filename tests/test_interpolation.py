"""Attention interpolation (AID, He et al. 2024): Beta points, identities, an independent eager reference written
from docs/methods.md ("Attention interpolation"), every family, call protocols, interpolate(), the toy effect."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

import pytest
import torch

import attnctl
from attnctl import ConfigError
from attnctl.control import Bound, Control
from attnctl.controls.cross_image.interpolation import AttentionInterpolation, beta_points
from attnctl.processors.edit import Edit, LayerHook
from attnctl.testing import CALL_DEFAULTS, NEW_TINY_MODELS, TINY_MODELS
from attnctl.testing.new_families import PROMPT_KEYWORD, available

from .helpers import load_benchmark

PROMPTS = ["a red cat on the street", "a red car on the street", "a blue car in a field", "a blue dog in a field"]
POINTS = (0.0, 0.3, 0.7, 1.0)
TOL = {"rtol": 1e-4, "atol": 1e-4}
LOOSE = {"rtol": 1e-3, "atol": 1e-3}


def run(pipe, name, prompts=PROMPTS, steps=2, guidance=5.0, seed=0, **kwargs):
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    generators = [torch.Generator().manual_seed(seed) for _ in prompts]
    prompt_arg = {"prompt": prompts} if name in PROMPT_KEYWORD else {}
    args = () if prompt_arg else (prompts,)
    if "guidance_scale" not in options:
        options["guidance_scale"] = guidance
    out = pipe(*args, num_inference_steps=steps, output_type="latent", generator=generators, **prompt_arg, **options)
    return out.frames if hasattr(out, "frames") and not hasattr(out, "images") else out.images


# -- the Beta points ---------------------------------------------------------------------------------------------
def test_beta_points_are_the_inverse_cdf():
    points = beta_points(7, 2.0, 2.0)
    assert points[0] == 0.0 and points[-1] == 1.0
    cdf = lambda x: 3 * x**2 - 2 * x**3  # noqa: E731 - Beta(2, 2)
    for i, t in enumerate(points):
        assert abs(cdf(t) - i / 6) < 1e-6
    uniform = beta_points(5, 1.0, 1.0)
    assert all(abs(a - b) < 1e-6 for a, b in zip(uniform, (0, 0.25, 0.5, 0.75, 1)))
    skewed = beta_points(5, 3.0, 1.0)  # CDF x^3
    assert all(abs(t**3 - i / 4) < 1e-6 for i, t in enumerate(skewed))
    assert beta_points(2) == (0.0, 1.0)
    # parameters below 1: the density is infinite at an end, the quantiles are still exact (closed forms)
    quantiles = {(0.2, 1.0): lambda p: p**5, (1.0, 0.3): lambda p: 1 - (1 - p) ** (1 / 0.3),
                 (0.5, 0.5): lambda p: math.sin(math.pi * p / 2) ** 2}  # arcsine law
    for (alpha, beta), quantile in quantiles.items():
        for t, i in zip(beta_points(5, alpha, beta), range(5)):
            assert abs(t - quantile(i / 4)) < 1e-8, (alpha, beta, i, t)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "middle"}, "mode"),
        ({"points": (0.0, 0.5)}, "end at 1"),
        ({"points": (0.0, 0.7, 0.3, 1.0)}, "never decrease"),
        ({"points": (0.0,)}, "at least 2"),
        ({"alpha": 0}, "alpha"),
        ({"self_attention": "yes"}, "self_attention"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttentionInterpolation(**kwargs)
    with pytest.raises(ConfigError, match="n must"):
        beta_points(1)


def test_to_dict_round_trip():
    control = AttentionInterpolation(points=POINTS, mode="inner", self_attention=False, steps=(0.0, 0.5))
    assert Control.from_dict(control.to_dict()) == control


# -- identities ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_idle_is_bitwise_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    for control in (AttentionInterpolation(points=POINTS, steps=(0.99, 1.0)),):
        with attnctl.apply(pipe, [control]):
            assert torch.equal(run(pipe, name), stock)
    two = run(pipe, name, prompts=PROMPTS[:2])
    with attnctl.apply(pipe, [AttentionInterpolation()]):  # two rows: both are endpoints, nothing is interpolated
        assert torch.equal(run(pipe, name, prompts=PROMPTS[:2]), two)


# -- the eager reference ---------------------------------------------------------------------------------------------
def _attend(q, k, v, mask, scale):
    """softmax(q k^T scale + mask) v in float64; q (H, Nq, D), k v (H, Nk, D), mask (H|1, Nq|1, Nk) or None."""
    logits = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits + mask
    return torch.softmax(logits, dim=-1) @ v


class _EagerHook(LayerHook):
    def __init__(self, control: EagerInterpolation):
        self.control = control

    def attend(self, call, q, k, v, spec, compute):
        out, lse = compute(q, k, v, spec)
        points, mode, fuse = self.control.points, self.control.mode, self.control.fuse
        n = len(points)
        rows = call.rows.rows
        batch, heads, nq, d = q.shape
        scale = spec.scale if spec.scale is not None else d**-0.5
        mask = spec.attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
            mask = mask.double().expand(batch, heads, nq if mask.shape[-2] > 1 else 1, k.shape[2])
        out = out.clone()
        text = call.layer.text
        for i, row in enumerate(rows):
            if not 0 < row.prompt < n - 1:
                continue
            a, b = _find(rows, row, 0), _find(rows, row, n - 1)
            t = points[row.prompt]
            Q, K, V = q[i].double(), k.double(), v.double()
            if text == "keys":
                queries, own_keys, ends = slice(0, nq), None, (slice(0, k.shape[2]),)
            elif text == "none":
                queries, own_keys, ends = slice(0, nq), slice(0, k.shape[2]), (slice(0, k.shape[2]),)
            else:
                g = call.geometry
                queries, own_keys = g.image_slice, g.image_slice
                ends = (g.image_slice, g.text_slice) if fuse else (g.text_slice,)
            own = _pick(K, V, mask, i, (own_keys,), queries) if own_keys is not None else None
            ka, va, ma = _pick(K, V, mask, a, ends, queries)
            kb, vb, mb = _pick(K, V, mask, b, ends, queries)
            Qi = Q[:, queries]
            if mode == "inner":
                mixed_mask = None if ma is None else torch.maximum(ma, mb)
                result = _attend(Qi, *_with_own(own, (1 - t) * ka + t * kb, (1 - t) * va + t * vb, mixed_mask), scale)
            else:
                result = (1 - t) * _attend(Qi, *_with_own(own, ka, va, ma), scale) + t * _attend(Qi, *_with_own(own, kb, vb, mb), scale)
            out[i, :, queries] = result.to(out.dtype)
        return out, None


def _find(rows, row, prompt):
    """The row of the same branch and tag as `row` whose prompt row is `prompt`."""
    return next(j for j, r in enumerate(rows) if (r.branch, r.tag, r.prompt) == (row.branch, row.tag, prompt))


def _pick(K, V, mask, j, spans, queries):
    """Row j's keys, values and (additive) mask over the key spans `spans`, for the query span `queries`."""
    keys = torch.cat([K[j][:, s] for s in spans], dim=1)
    values = torch.cat([V[j][:, s] for s in spans], dim=1)
    if mask is None:
        return keys, values, None
    m = mask[j]
    rows = queries if m.shape[-2] > 1 else slice(None)
    return keys, values, torch.cat([m[..., rows, s] for s in spans], dim=-1)


def _with_own(own, keys, values, masks):
    """The row's own keys (if any) before the endpoint keys."""
    if own is None:
        return keys, values, masks
    joined = None if masks is None else torch.cat([own[2], masks], dim=-1)
    return torch.cat([own[0], keys], 1), torch.cat([own[1], values], 1), joined


@dataclass(frozen=True)
class EagerInterpolation(Control, type_name="test-eager-interpolation"):
    points: tuple = POINTS
    mode: str = "outer"
    fuse: bool = True
    log: list = field(default_factory=list, compare=False, hash=False)

    def select(self, adapter):
        kinds = ("cross", "joint", "self") if self.fuse else ("cross", "joint")
        return tuple(layer for layer in adapter.layers if layer.kind in kinds)

    def bind(self, context):
        return _EagerBound(self, context.layers, (0.0, 1.0))


class _EagerBound(Bound):
    def edit(self, layer, frame):
        return Edit(hooks=(_EagerHook(self.control),))


@pytest.mark.parametrize("mode", ["outer", "inner"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_matches_eager_reference(name, mode, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    with attnctl.apply(pipe, [AttentionInterpolation(points=POINTS, mode=mode)]):
        ours = run(pipe, name)
    with attnctl.apply(pipe, [EagerInterpolation(POINTS, mode)]):
        expected = run(pipe, name)
    assert not torch.allclose(expected[1:3], stock[1:3], **TOL)
    torch.testing.assert_close(ours, expected, **(LOOSE if name == "tiny-pixart" else TOL))
    # the endpoint rows are the stock rows
    torch.testing.assert_close(ours[[0, 3]], stock[[0, 3]], **TOL)


def test_without_self_attention_fusion(tiny_cache):
    for name in ("tiny-sd", "tiny-sd3"):
        pipe = tiny_cache(name)
        with attnctl.apply(pipe, [AttentionInterpolation(points=POINTS, self_attention=False)]):
            ours = run(pipe, name)
        with attnctl.apply(pipe, [EagerInterpolation(POINTS, "outer", fuse=False)]):
            expected = run(pipe, name)
        torch.testing.assert_close(ours, expected, **TOL)


def test_flux_true_cfg_links_inside_each_call(tiny_cache):
    """Flux's true CFG runs cond and uncond as separate denoiser calls: each links within itself."""
    name = "tiny-flux"
    pipe = tiny_cache(name)
    extra = {"negative_prompt": "a blurry dog", "true_cfg_scale": 3.0}
    with attnctl.apply(pipe, [AttentionInterpolation(points=POINTS)]):
        ours = run(pipe, name, **extra)
    with attnctl.apply(pipe, [EagerInterpolation(POINTS)]):
        expected = run(pipe, name, **extra)
    torch.testing.assert_close(ours, expected, **TOL)


def test_sd_without_cfg(tiny_cache):
    name = "tiny-sd"
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, [AttentionInterpolation(points=POINTS)]):
        ours = run(pipe, name, guidance=1.0)
    with attnctl.apply(pipe, [EagerInterpolation(POINTS)]):
        expected = run(pipe, name, guidance=1.0)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("name", [n for n in NEW_TINY_MODELS])
def test_new_families_run_or_refuse(name, tiny_cache):
    if not available(name):
        pytest.skip(f"diffusers lacks {name}")
    pipe = tiny_cache(name)
    stock = run(pipe, name, prompts=PROMPTS[:3], guidance=3.0)
    with attnctl.apply(pipe, [AttentionInterpolation(points=(0.0, 0.5, 1.0))]):
        ours = run(pipe, name, prompts=PROMPTS[:3], guidance=3.0)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[[0, 2]], stock[[0, 2]], **LOOSE)
    assert not torch.allclose(ours[1], stock[1], **TOL)


def test_wrong_number_of_points_raises(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [AttentionInterpolation(points=(0.0, 0.5, 1.0))]):
        with pytest.raises(ConfigError, match="3 points"):
            run(pipe, "tiny-sd")


def test_conflicts_are_refused_at_apply(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(ConfigError):
        attnctl.apply(pipe, [AttentionInterpolation(), attnctl.Reweight({"red": 2.0})])


@pytest.mark.parametrize("order", ["aid-first", "sdg-first"])
def test_structured_guidance_on_the_interpolated_layers_is_refused_in_both_orders(tiny_cache, order):
    """The interpolated rows' attention is computed from the raw keys and values of the end rows, outside the rest
    of the layer's hooks: Structured Diffusion Guidance's replaced text values never reach them (listed after
    AttentionInterpolation, its middle row was bitwise AttentionInterpolation alone). Refused as Reweight's value
    scale is, naming both controls and the layer; on disjoint layers they compose."""
    pipe = tiny_cache("tiny-sd")
    controls = [AttentionInterpolation(layers="cross"), attnctl.StructuredGuidance()]
    if order == "sdg-first":
        controls.reverse()
    with pytest.raises(ConfigError) as caught:
        attnctl.apply(pipe, controls)
    message = str(caught.value)
    assert "AttentionInterpolation (linked_keys)" in message and "StructuredGuidance (value_edit)" in message
    assert "cross" in message or "attn2" in message
    attnctl.apply(pipe, [AttentionInterpolation(layers="self"), attnctl.StructuredGuidance()]).remove()


def test_model_generate_renders_a_sequence(tiny_cache, tmp_path):
    """A render job's AttentionInterpolation(to=...): one call of n rows, frames = the images, image = their strip."""
    import numpy as np

    from attnctl.render.outputs import read_gif_params

    pipe = tiny_cache("tiny-sd")
    model = attnctl.Model(pipe, "tiny-sd")
    control = AttentionInterpolation(to="a blue dog in a field", n=4)
    result = model.generate("a red cat on the street", seed=3, steps=2, controls=[control])
    model.release()
    assert len(result.frames) == 4 and result.image.size == (4 * 32, 32)
    assert result.params["frames"] == 4
    stock = pipe("a red cat on the street", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                 **CALL_DEFAULTS["tiny-sd"]).images[0]
    assert np.abs(np.asarray(result.frames[0], dtype=float) - np.asarray(stock, dtype=float)).max() <= 1
    result.save_video(str(tmp_path / "s.gif"))
    assert read_gif_params(str(tmp_path / "s.gif"))["frames"] == 4


def test_render_job_writes_strip_gif_and_frames(tiny_cache, tmp_path):
    import json as _json

    from attnctl.render.outputs import read_gif_params
    from attnctl.render.runner import RenderOptions, render

    job = {"id": "aid", "prompt": "a red cat on the street", "seeds": [2], "steps": 2,
           "controls": [{"type": "attention-interpolation", "to": "a blue dog in a field", "n": 3}]}
    path = tmp_path / "jobs.jsonl"
    path.write_text(_json.dumps(job) + "\n")
    model = attnctl.Model(tiny_cache("tiny-sd"), "tiny-sd")
    try:
        assert render(str(path), RenderOptions(out=str(tmp_path / "out"), progress="none"), model=model).exit_code == 0
    finally:
        model.release()
    folder = tmp_path / "out" / "aid"
    from PIL import Image

    with Image.open(folder / "2.png") as strip_image:
        assert strip_image.size == (3 * 32, 32)
    assert read_gif_params(str(folder / "2.gif"))["fps"] == 2
    assert sorted(p.name for p in (folder / "2.frames").iterdir()) == ["0000.png", "0001.png", "0002.png"]


# -- interpolate() and the toy effect --------------------------------------------------------------------------------
toy_missing = importlib.util.find_spec("attnctl.toy") is None


@pytest.mark.skipif(toy_missing, reason="no toy model in this build")
def test_interpolate_on_the_toy_model():
    from benchmarks_cross_image import PROMPT_A, PROMPT_B, aid_rates, centroid_xs  # noqa: F401

    from attnctl.toy import load_toy_shapes

    pipe = load_toy_shapes()
    images = attnctl.interpolate(pipe, PROMPT_A, PROMPT_B, n=5, generator=torch.Generator().manual_seed(0))
    assert len(images) == 5 and images[0].size == (32, 32)
    stock = pipe(PROMPT_A, generator=torch.Generator().manual_seed(_seed(0)), **attnctl.toy.CALL_DEFAULTS).images[0]
    assert images[0].tobytes() == stock.tobytes() or _close(images[0], stock)
    stock_b = pipe(PROMPT_B, generator=torch.Generator().manual_seed(_seed(0)), **attnctl.toy.CALL_DEFAULTS).images[0]
    assert images[-1].tobytes() == stock_b.tobytes() or _close(images[-1], stock_b)
    # no generator: the seed is a draw of torch's global generator, so torch.manual_seed makes the call repeat
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append([image.tobytes() for image in attnctl.interpolate(pipe, PROMPT_A, PROMPT_B, n=3)])
    assert runs[0] == runs[1]
    rates = aid_rates(pipe, range(8), 5, [("outer", 2.0)], baseline=False)
    assert rates["outer Beta(2,2)"] >= 0.9, rates


def test_interpolate_on_a_pipeline_whose_first_argument_is_not_the_prompt():
    """Flux2KleinPipeline takes `image` first: interpolate() names the prompt (the prompt list went to `image`, and
    diffusers failed with "Provide either prompt or prompt_embeds"). The endpoints are the stock images of that noise."""
    from attnctl.testing import make_tiny_pipeline
    from attnctl.testing.new_families import available

    if not available("tiny-flux2"):
        pytest.skip("needs diffusers with Flux2KleinPipeline")
    pipe = make_tiny_pipeline("tiny-flux2")
    options = dict(CALL_DEFAULTS["tiny-flux2"], num_inference_steps=2, guidance_scale=3.0)
    images = attnctl.interpolate(pipe, "a red cat", "a blue dog", n=3, generator=torch.Generator().manual_seed(0), **options)
    assert len(images) == 3
    seed = _seed(0)
    for image, prompt in ((images[0], "a red cat"), (images[-1], "a blue dog")):
        stock = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options).images[0]
        assert _close(image, stock)


def _seed(seed):
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)).item())


def _close(a, b):
    import numpy as np

    return np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).max() <= 2


@pytest.fixture(autouse=True, scope="module")
def _benchmark_module():
    import sys

    load_benchmark("cross_image.py", "benchmarks_cross_image", register=True)
    yield
    sys.modules.pop("benchmarks_cross_image", None)



def test_several_images_per_prompt_are_refused(tiny_cache):
    """Rows 0 and n-1 are the endpoints: with two images per prompt the first prompt's second image and the last
    prompt's first were interpolated (t 0.387 / 0.613 for [A, B] x 2), silently."""
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [AttentionInterpolation()]):
        with pytest.raises(attnctl.ConfigError, match="num_images_per_prompt=2"):
            pipe(["a red cat", "a blue dog"], num_images_per_prompt=2, num_inference_steps=1, height=32, width=32,
                 output_type="latent")


# -- interpolate(): per-row prompt arguments (negative prompts, a second / third encoder's prompt) ------------------
def _processors(pipe):
    from attnctl.handle import denoiser_of

    return dict(denoiser_of(pipe)[1].attn_processors)


def test_interpolate_gives_a_negative_prompt_string_to_every_image(tiny_cache):
    """SD 1.x / 2.x refuse a negative prompt string beside interpolate's list of prompts (TypeError), and a list was
    refused by interpolate itself: one string is now every row's, a list of n is taken as it is."""
    pipe = tiny_cache("tiny-sd")
    options = dict(CALL_DEFAULTS["tiny-sd"], num_inference_steps=1, self_attention=False)
    one = attnctl.interpolate(pipe, "a red cat", "a blue dog", n=3, negative_prompt="blurry",
                              generator=torch.Generator().manual_seed(0), **options)
    listed = attnctl.interpolate(pipe, "a red cat", "a blue dog", n=3, negative_prompt=["blurry"] * 3,
                                 generator=torch.Generator().manual_seed(0), **options)
    assert [image.tobytes() for image in one] == [image.tobytes() for image in listed]
    with pytest.raises(ConfigError, match=r"negative_prompt must be one string \(every row's\) or a list of 3 strings"):
        attnctl.interpolate(pipe, "a red cat", "a blue dog", n=3, negative_prompt=["blurry"] * 2, **options)


@pytest.mark.parametrize("name, key", [("tiny-sdxl", "prompt_2"), ("tiny-sd3", "prompt_3"), ("tiny-flux", "prompt_2")])
def test_interpolate_refuses_one_second_prompt_for_rows_of_different_prompts(tiny_cache, name, key):
    """One prompt_2 / prompt_3 string beside the sequence's prompts: SDXL / SD3 failed deep in diffusers
    (RuntimeError), Flux ran with the same T5 text (the only text its transformer attends to) in every row. Refused,
    before anything runs; a list of one string per image reaches its row (the endpoints are the stock images)."""
    pipe = tiny_cache(name)
    options = dict(CALL_DEFAULTS[name], num_inference_steps=1)
    before = _processors(pipe)
    with pytest.raises(ConfigError, match=rf"{key}='a photo' is one string, .*a list of 3 strings, one per row"):
        attnctl.interpolate(pipe, "a red cat", "a blue dog", n=3, **{key: "a photo"}, **options)
    assert _processors(pipe) == before
    if name != "tiny-flux":
        return
    texts = ["a green bird", "a green bird", "a yellow fish"]
    images = attnctl.interpolate(pipe, "a red cat", "a blue dog", n=3, generator=torch.Generator().manual_seed(0),
                                 **{key: texts}, **options)
    seed = _seed(0)
    for image, prompt, text in ((images[0], "a red cat", texts[0]), (images[-1], "a blue dog", texts[-1])):
        stock = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{key: text}, **options).images[0]
        assert _close(image, stock)
