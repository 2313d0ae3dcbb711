"""FastAttn's 3-D neighbourhood window on video (issue 19): `Window(radius=(rf, rh, rw), frames=F)` over the
frame-major frames x height x width tokens, in every backend that runs windows, against a reference written here
from the definition (docs/methods.md "DiTFastAttn", video): image tokens a = (fa, ra, ca) and b = (fb, rb, cb)
interact iff |fa - fb| <= rf and |ra - rb| <= rh and |ca - cb| <= rw; text tokens see and are seen by all. Also:
a FastAttn plan records its token frames and is refused for another number of frames.
"""

from __future__ import annotations

import json

import pytest
import torch

import attnctl
from attnctl.controls.caching import window_pairs
from attnctl.controls.fastattn import FastAttnPlan
from attnctl.kernels import AttentionSpec, Window, reference, semantics
from attnctl.testing import CALL_DEFAULTS
from attnctl.testing.new_families import REQUIRES, available

from .cache_helpers import Capture, explicit_attention, make_plan
from .helpers import load_benchmark

WAN = "tiny-wan"
needs_wan = pytest.mark.skipif(not available(WAN), reason=f"{WAN} needs diffusers >= 0.42 with {', '.join(REQUIRES[WAN])}")
PROMPT = "a red cat on the street"


def video_allowed(frames: int, h: int, w: int, rf: int, rh: int, rw: int, text: int = 0, text_first: bool = False) -> torch.Tensor:
    """The definition, coordinate by coordinate: token a = (f, r, c) at a = f*h*w + r*w + c (frame-major)."""
    coords = [(f, r, c) for f in range(frames) for r in range(h) for c in range(w)]
    n = len(coords)
    total = n + text
    allowed = torch.ones(total, total, dtype=torch.bool)
    offset = text if text_first else 0
    for a, (fa, ra, ca) in enumerate(coords):
        for b, (fb, rb, cb) in enumerate(coords):
            allowed[offset + a, offset + b] = abs(fa - fb) <= rf and abs(ra - rb) <= rh and abs(ca - cb) <= rw
    return allowed


WINDOWS = [
    # (frames, h, w, (rf, rh, rw), text, text_first)
    (3, 4, 5, (1, 1, 2), 0, False),
    (3, 4, 5, (0, 2, 1), 6, True),
    (4, 3, 3, (2, 0, 0), 5, False),
    (2, 5, 4, (1, 4, 3), 0, False),  # reaches the whole grid: every pair allowed
    (1, 6, 7, (0, 1, 2), 4, True),  # one frame: the 2-D window
]


def _window(frames, h, w, radius, text, text_first) -> Window:
    return Window((h, w), radius=radius, frames=frames, text_len=text, text_first=text_first)


@pytest.mark.parametrize("case", WINDOWS)
def test_3d_window_mask_and_pair_count_follow_the_definition(case):
    frames, h, w, radius, text, text_first = case
    window = _window(*case)
    expected = video_allowed(frames, h, w, *radius, text=text, text_first=text_first)
    assert torch.equal(window.allowed(), expected)
    n = expected.shape[0]
    assert torch.equal(semantics.window_block(window, slice(0, n), slice(0, n)), expected)
    # the FLOP accounting counts exactly the allowed pairs
    assert window_pairs(window) == int(expected.sum())


def test_a_2d_radius_on_several_frames_is_refused_and_one_frame_3d_equals_2d():
    with pytest.raises(ValueError, match=r"2-D window radius .* 3 token frames .*\(rf, rh, rw\)"):
        Window((4, 5), radius=(1, 1), frames=3)
    with pytest.raises(ValueError, match=r"\(rh, rw\) or \(rf, rh, rw\)"):
        Window((4, 5), radius=(1, 1, 1, 1))
    assert torch.equal(Window((6, 7), radius=(3, 1, 2)).allowed(), Window((6, 7), radius=(1, 2)).allowed())


def _qkv(n: int, seed: int = 0, batch: int = 2, heads: int = 2, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=g) for _ in range(3))


@pytest.mark.parametrize("case", WINDOWS[:3])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_3d_window_in_every_eager_backend_against_the_explicit_softmax(case, backend):
    from attnctl.kernels import BACKENDS, attention

    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} is not available here")
    frames, h, w, radius, text, text_first = case
    window = _window(*case)
    q, k, v = _qkv(window.n_img + text)
    expected = explicit_attention(q, k, v, video_allowed(frames, h, w, *radius, text=text, text_first=text_first))
    out, _ = attention(q, k, v, AttentionSpec(window=window), backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [WINDOWS[0], WINDOWS[1]])
def test_3d_window_in_the_triton_kernels_against_the_explicit_softmax(case):
    """The dense and PLADIS (sparse) Triton kernels with the frame coordinate (interpreter on CPU), and their tile
    lists cover every allowed pair while skipping some."""
    triton = pytest.importorskip("triton")
    from attnctl.kernels import Sparse
    from attnctl.kernels import triton_attention as ta
    from attnctl.kernels import triton_sparse as ts

    if not ta.interpreted() and not torch.cuda.is_available():
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    device = torch.device("cpu" if ta.interpreted() else "cuda")
    frames, h, w, radius, text, text_first = case
    window = _window(*case)
    n = window.n_img + text
    allowed = video_allowed(frames, h, w, *radius, text=text, text_first=text_first)
    q, k, v = (t.to(device) for t in _qkv(n, seed=1, batch=1))
    out, _ = ta.attention(q, k, v, AttentionSpec(window=window), config=ta.Config(16, 16))
    torch.testing.assert_close(out.cpu(), explicit_attention(q.cpu(), k.cpu(), v.cpu(), allowed), rtol=2e-5, atol=2e-5)
    spec = AttentionSpec(window=window, sparse=Sparse(1.5, 2.0))
    sparse_out, _ = ts.attention(q, k, v, spec)
    torch.testing.assert_close(sparse_out.cpu(), reference.attention(q.cpu(), k.cpu(), v.cpu(), spec)[0], rtol=2e-5, atol=2e-5)
    tiles = ta._window_tiles(window, n, 16, 16, torch.device("cpu"))
    padded = torch.zeros(triton.cdiv(n, 16) * 16, triton.cdiv(n, 16) * 16, dtype=torch.bool)
    padded[:n, :n] = allowed
    pooled = padded.unflatten(-1, (-1, 16)).unflatten(-3, (-1, 16)).any(-1).any(-2)
    assert (tiles | ~pooled).all(), "a tile holding an allowed pair would be skipped"
    if text == 0:
        assert tiles.sum() < tiles.numel()


# -- FastAttn on tiny-wan -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan():
    from attnctl.testing import make_tiny_pipeline

    return make_tiny_pipeline(WAN)


def _generate(pipe, steps: int, **kwargs):
    options = dict(CALL_DEFAULTS[WAN])
    options.update(kwargs)
    out = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
               generator=torch.Generator().manual_seed(0), **options)
    return out.frames


@needs_wan
def test_wan_fastattn_3d_window_residual_against_the_reference(wan):
    """window_residual with radius (1, 1, 1) over tiny-wan's 3 x 4 x 3 video tokens: the explicit 3-D-masked
    softmax plus the residual (full - window) cached at the full step; the FLOPs counted are the window's pairs; the
    plan made by calibration records the 3 token frames."""
    layer = "blocks.0.attn1"
    plan = make_plan(wan, 3, {layer: ["full", "window_residual", "window_residual"]}, window=(1, 1, 1),
                     resolution=(64, 48), frames=3)
    capture = Capture(layers=layer)
    with attnctl.apply(wan, [capture, attnctl.FastAttn(plan=plan)]) as handle:
        _generate(wan, 3)
        report = handle.outputs["fastattn"]
    calls = {entry[1]: entry for entry in capture.log}
    q0, k0, v0 = calls[0][3:6]
    n = q0.shape[2]
    assert n == 36
    allowed = video_allowed(3, 4, 3, 1, 1, 1)
    assert not allowed.all()
    residual = explicit_attention(q0, k0, v0) - explicit_attention(q0, k0, v0, allowed)
    for step in (1, 2):
        q, k, v, out, window = calls[step][3:8]
        assert window.radius == (1, 1, 1) and window.frames == 3 and window.grid_hw == (4, 3)
        torch.testing.assert_close(out, explicit_attention(q, k, v, allowed) + residual, rtol=1e-4, atol=1e-5)
    batch, heads, _, head_dim = q0.shape
    assert report.entries[(1, layer)].flops == 4.0 * batch * int(allowed.sum()) * heads * head_dim
    assert report.entries[(1, layer)].full_flops == 4.0 * batch * n * n * heads * head_dim
    # calibration on video records the frames; its plan replays only on the same number of frames
    with attnctl.apply(wan, [attnctl.FastAttn(threshold=0.5, window=(1, 1, 1))]) as handle:
        _generate(wan, 2)
        made = handle.outputs["fastattn"].plan
    assert made.frames == 3 and made.window == (1, 1, 1)
    assert FastAttnPlan.from_json(made.to_json()) == made
    with attnctl.apply(wan, [attnctl.FastAttn(plan=made)]):
        _generate(wan, 2)


@needs_wan
def test_wan_plan_for_other_frames_and_wrong_window_dims_are_refused(wan):
    layer = "blocks.0.attn1"
    plan = make_plan(wan, 2, {layer: ["full", "window_residual"]}, window=(0, 1, 1), resolution=(64, 48), frames=3)
    with attnctl.apply(wan, [attnctl.FastAttn(plan=plan)]):  # 5 video frames -> 2 token frames
        with pytest.raises(attnctl.ConfigError, match=r"calibrated for 3 token frame\(s\), but the call has 2 token frame"):
            _generate(wan, 2, num_frames=5)
    image_plan = make_plan(wan, 2, {layer: ["full", "window_residual"]}, window=8, resolution=(64, 48))
    with attnctl.apply(wan, [attnctl.FastAttn(plan=image_plan)]):
        with pytest.raises(attnctl.ConfigError, match=r"calibrated for 1 token frame\(s\), but the call has 3"):
            _generate(wan, 2)
    with pytest.raises(attnctl.ConfigError, match=r"\(1, 2\) is a 2-D .*\(e\.g\. \(0, 1, 2\)"):
        attnctl.apply(wan, [attnctl.FastAttn(window=(1, 2))])
    with pytest.raises(attnctl.ConfigError, match=r"must be an int w >= 0 .* or a triple \(rf, rh, rw\)"):
        attnctl.FastAttn(window=(1, 2, -1))


def test_a_3d_window_is_refused_on_image_models_and_plans_serialise_their_frames():
    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline("tiny-pixart")
    with pytest.raises(attnctl.ConfigError, match=r"\(1, 2, 3\) is a 3-D .* use \(rh, rw\) = \(2, 3\)"):
        attnctl.apply(pipe, [attnctl.FastAttn(window=(1, 2, 3))])
    plan = FastAttnPlan(model="M", fingerprint="f", steps=1, resolution=(8, 8), window=(1, 2, 3), threshold=0.1,
                        methods=(("a", ("full",)),), frames=9)
    data = json.loads(plan.to_json())
    assert data["frames"] == 9 and data["window"] == [1, 2, 3]
    assert FastAttnPlan.from_dict(data) == plan
    del data["frames"]  # a plan saved before frames were recorded: an image plan
    assert FastAttnPlan.from_dict(data).frames == 1
    for bad in (0, 2.0, True):
        with pytest.raises(attnctl.ConfigError, match="FastAttnPlan.frames must be an int >= 1"):
            FastAttnPlan(model="M", fingerprint="f", steps=1, resolution=(8, 8), window=4, threshold=0.1, methods=(), frames=bad)
    with pytest.raises(attnctl.ConfigError, match="calibrated for 9 token frame"):
        plan.check(frames=1)


def test_tile_skipping_is_exact_enough_on_a_larger_video_grid():
    """The block lists of a 3-D window on a bigger grid keep every allowed tile and skip most tiles (the saving
    Triton gets); checked against the dense definition via `Window.allowed` (tested above)."""
    pytest.importorskip("triton")
    from attnctl.kernels import triton_attention as ta

    window = Window((6, 8), radius=(1, 1, 1), frames=8)
    n = window.n_img
    tiles = ta._window_tiles(window, n, 32, 32, torch.device("cpu"))
    allowed = window.allowed()
    pooled = allowed.unflatten(-1, (-1, 32)).unflatten(-3, (-1, 32)).any(-1).any(-2)
    assert (tiles | ~pooled).all()
    assert tiles.float().mean() < 0.6


# -- SAG on video (tiny-wan) --------------------------------------------------------------------------------------


def _gaussian_blur_reference(image: torch.Tensor, size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Hong et al.'s blur (the SAG pipeline's): a separable Gaussian, kernel 9, sigma 1, reflect padding; (N, C, H, W)
    -> float64. Axes shorter than the padding replicate (as the pipeline's `gaussian_blur_2d` must)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = size // 2
    out = image.double()
    for axis in (-1, -2):
        padding = (pad, pad, 0, 0) if axis == -1 else (0, 0, pad, pad)
        mode = "reflect" if pad < out.shape[axis] else "replicate"
        out = torch.nn.functional.pad(out, padding, mode=mode)
        windows = out.unfold(axis if axis == -1 else out.ndim - 2, size, 1)  # (..., n, size)
        out = (windows * kernel).sum(-1)
    return out


@needs_wan
def test_wan_sag_degrades_per_frame_against_a_reference(wan):
    """docs/methods.md "SAG" on video, one step without CFG (the cond row is degraded): the mask is the attention
    each video token receives in the middle block's attn1 (head mean, summed over all 36 queries of the video) > 1,
    per token frame, upsampled nearest x2 to the 64x48 latent's 8x6; x0 = x - sigma v (flow matching); x0 blurred
    within each latent frame inside the mask, re-noised with eps = x + (1 - sigma) v; the stock denoiser runs on it,
    and the step takes v + s (v - v_degraded)."""
    scale = 0.8
    layer = "blocks.1.attn1"  # the middle block's self-attention: SAG's default on Wan
    assert attnctl.SAG().select(attnctl.handle.adapter_for(wan.transformer))[0].name == layer
    seen: list[dict] = []
    steps: list[torch.Tensor] = []
    hook = wan.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append({"hidden_states": a[0], **kw} if a else dict(kw)), with_kwargs=True)
    original = wan.scheduler.step

    def step(output, *args, **kwargs):
        steps.append(output.clone())
        return original(output, *args, **kwargs)

    wan.scheduler.step = step
    try:
        capture = Capture(layers=layer)
        with attnctl.apply(wan, [capture]):
            _generate(wan, 1)
        stock_calls, stock = seen[:], steps[:]
        seen.clear()
        steps.clear()
        with attnctl.apply(wan, [attnctl.SAG(scale=scale)]):
            _generate(wan, 1)
        sag_calls, sag = seen[:], steps[:]
    finally:
        del wan.scheduler.step
        hook.remove()
    assert len(stock_calls) == 1 and len(sag_calls) == 2  # SAG's second forward on the degraded input
    call = stock_calls[0]
    x, v = call["hidden_states"], stock[0]
    q, k = capture.log[0][3], capture.log[0][4]
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    received = probs.mean(1).sum(1)  # (B, N): what each key receives
    frames, h, w = 3, 4, 3
    mask = (received > 1).double().reshape(1, 1, frames, h, w)
    assert 0 < int(mask.sum()) < mask.numel()
    mask = mask.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # nearest, patch 2x2 -> latent 8x6
    wan.scheduler.set_timesteps(1)
    sigma = float(wan.scheduler.sigmas[0])
    x0, eps = x.double() - sigma * v.double(), x.double() + (1 - sigma) * v.double()
    batch, channels, latent_frames, lh, lw = x0.shape
    blurred = torch.stack([_gaussian_blur_reference(x0[:, :, f]) for f in range(latent_frames)], dim=2)
    degraded = (1 - sigma) * (blurred * mask + x0 * (1 - mask)) + sigma * eps
    with torch.no_grad():
        again = wan.transformer(**{**call, "hidden_states": degraded.float(), "return_dict": False})[0]
    expected = v.double() + scale * (v.double() - again.double())
    assert torch.equal(sag_calls[0]["hidden_states"], x)
    torch.testing.assert_close(sag_calls[1]["hidden_states"].double(), degraded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sag[0].double(), expected, rtol=1e-4, atol=1e-5)


# -- ToMe / AgentAttention on video ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, grid, stride", [(3, (4, 6), 2), (2, (5, 7), 2), (4, (8, 8), 4), (1, (6, 4), 2)])
def test_video_cells_are_per_frame_with_one_destination_each(frames, grid, stride):
    """docs/methods.md "ToMe" on video: cells of 1 x s x s tokens within each frame, one destination per cell, every
    other token (incomplete cells included) a source; frame f's tokens are f*h*w + r*w + c."""
    from attnctl.controls.token_reduction.merging import cell_destinations, video_cell_destinations

    h, w = grid
    dst, src = video_cell_destinations(frames, grid, stride, torch.Generator().manual_seed(3))
    assert sorted(dst.tolist() + src.tolist()) == list(range(frames * h * w))
    chosen = set(dst.tolist())
    for f in range(frames):
        for cr in range(h // stride):
            for cc in range(w // stride):
                cell = {f * h * w + (cr * stride + i) * w + cc * stride + j for i in range(stride) for j in range(stride)}
                assert len(cell & chosen) == 1, (f, cr, cc)
    assert len(chosen) == frames * (h // stride) * (w // stride)
    if frames == 1:  # one frame: exactly the image partition
        image_dst, _ = cell_destinations(grid, stride, torch.Generator().manual_seed(3))
        assert torch.equal(dst, image_dst)


@needs_wan
@pytest.mark.parametrize("control", [attnctl.ToMe(ratio=0.5), attnctl.AgentAttention()], ids=["tome", "agent"])
def test_token_reduction_on_wan_is_refused_for_its_rotary_video_positions(wan, control):
    name = type(control).__name__
    with pytest.raises(attnctl.UnsupportedError, match=rf"{name} does not support the wan family: .*rotary .*3-D RoPE"):
        attnctl.apply(wan, [control])


@needs_wan
def test_wan_3d_window_plan_gives_the_same_video_on_every_backend(wan):
    """The same 3-D window plan through the whole pipeline (CFG, both self-attention layers) on the reference, sdpa
    and (interpreted on CPU) Triton backends: the same latents up to float rounding; each backend is the one used."""
    from attnctl.kernels import BACKENDS

    layers = {f"blocks.{i}.attn1": ["full", "window_residual", "window_residual"] for i in (0, 1)}
    plan = make_plan(wan, 3, layers, window=(1, 1, 1), resolution=(64, 48), frames=3)
    backends = ["reference", "sdpa"] + (["triton"] if "triton" in BACKENDS and "cpu" in BACKENDS["triton"].devices else [])
    out = {}
    for backend in backends:
        with attnctl.apply(wan, [attnctl.FastAttn(plan=plan)], backend=backend) as handle:
            out[backend] = wan(prompt=PROMPT, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                               generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS[WAN]).frames
            assert {used for used, _ in handle.runtime.backend_log.values()} == {backend}
    for backend in backends[1:]:
        torch.testing.assert_close(out[backend], out["reference"], rtol=1e-4, atol=1e-5)


def test_window_attention_benchmark_smoke(capsys):
    """benchmarks/video_window_attention.py on a tiny grid: every case runs and the bound is all pairs / allowed pairs."""
    bench = load_benchmark("video_window_attention.py", "video_window_attention")
    result = bench.main(["--grid", "2,4,4", "--repeats", "1", "--backends", "sdpa", "--windows", "band=8,3d=1x1x1"])
    n = 32
    assert result["band=8 (sdpa)"]["bound"] == n * n / window_pairs(Window((4, 4), band=8, frames=2))
    assert result["3d=1x1x1 (sdpa)"]["bound"] == n * n / int(video_allowed(2, 4, 4, 1, 1, 1).sum())
    assert "flex block mask of 3d=1x1x1" in capsys.readouterr().out
