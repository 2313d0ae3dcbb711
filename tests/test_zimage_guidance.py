"""Guidance controls on Z-Image (issue #19): its denoiser takes lists of per-row tensors (`x`, `cap_feats`) and
returns a list, so attnctl re-batches the lists themselves (`families.base.RowList`) to add perturbed rows.
PAG and SkipLayer against references written from docs/methods.md; SEG / SAG run; latent optimisation stays
refused with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.errors import UnsupportedError
from attnctl.testing import CALL_DEFAULTS
from attnctl.testing.new_families import available

pytestmark = pytest.mark.skipif(not available("tiny-zimage"), reason="tiny-zimage needs diffusers >= 0.42 with ZImagePipeline")

NAME = "tiny-zimage"
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def pipe():
    from attnctl.testing import make_tiny_pipeline

    return make_tiny_pipeline(NAME)


def generate(pipe, guidance: float = 4.0, steps: int = 1, seed: int = 0, **options):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=list(PROMPTS), num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=generator, **{**CALL_DEFAULTS[NAME], **options}).images


class Recorder:
    """The pipeline's inputs of each denoiser call (a prepended pre-hook, made after apply: before attnctl's) and the
    prediction handed to `scheduler.step`."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.predictions = pipe, [], []
        self._hook = pipe.transformer.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        original = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.predictions.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        pipe.scheduler.step = step

    def _pre(self, module, args, kwargs):
        self.calls.append((tuple(list(a) if isinstance(a, list) else a for a in args), dict(kwargs)))

    def close(self):
        del self.pipe.scheduler.step
        self._hook.remove()


def _rotary(x_in, freqs_cis):
    x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
    return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)


def zimage_qkv(attn, hidden_states, freqs_cis):
    """q, k, v (B, S, heads, d) of a Z-Image attention module as its stock processor makes them: qk-norm and RoPE."""
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1))

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    q, k = attn.norm_q(q), attn.norm_k(k)
    return _rotary(q, freqs_cis), _rotary(k, freqs_cis), v


class RefZImagePAG:
    """docs/methods.md "PAG" in Z-Image's single-stream `[image; text]` attention, written out with a dense mask: an
    image query attends to itself and to every text key (the caption's visible pad tokens included), text queries
    attend to everything; qk-norm and RoPE as the stock processor. The `pad` image padding tokens after the image
    tokens (a size whose token count is not a multiple of 32) belong to the image stream: a perturbed image query does
    not see them (as it does not see the other image tokens); their own queries attend to everything, as stock."""

    def __init__(self, image_tokens: int, pad: int = 0):
        self.n, self.pad = image_tokens, pad

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        q, k, v = zimage_qkv(attn, hidden_states, freqs_cis)
        length = q.shape[1]
        mask = torch.zeros(q.shape[0], 1, length, length)
        mask[:, :, : self.n, : self.n] = torch.full((self.n, self.n), float("-inf")).fill_diagonal_(0.0)
        mask[:, :, : self.n, self.n : self.n + self.pad] = float("-inf")
        if attention_mask is not None:
            mask = mask.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


def _run(pipe, call, rows):
    """The stock denoiser on the rows `rows` of a recorded call (lists indexed, the timestep tensor too)."""
    x, t, captions = call[0][:3]
    with torch.no_grad():
        out = pipe.transformer([x[i] for i in rows], t[list(rows)], [captions[i] for i in rows], return_dict=False)[0]
    return torch.stack(out)


@pytest.mark.parametrize("guidance", [4.0, 0.0], ids=["cfg", "no-cfg"])
def test_pag_adds_its_term_to_both_cfg_rows_against_a_reference(pipe, guidance):
    """ZImagePipeline hands the scheduler -(cond + g (cond - uncond)); with PAG it is -(cond + g (cond - uncond) + D),
    D = s (cond - perturbed), perturbed = the cond rows with the reference PAG attention in the middle main layer."""
    scale = 1.5
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale)]) as handle:
        assert [layer.name for layer in handle.runtime.resolved[0]] == ["layers.1.attention"]
        recorder = Recorder(pipe)
        try:
            generate(pipe, guidance=guidance)
        finally:
            recorder.close()
    (call,), (got,) = recorder.calls, recorder.predictions
    rows = len(PROMPTS)
    cfg = guidance > 0  # ZImagePipeline runs CFG for any guidance_scale > 0
    assert len(call[0][0]) == (2 * rows if cfg else rows)  # the pipeline's rows: [cond, uncond] with CFG
    cond = _run(pipe, call, range(rows))
    layer = pipe.transformer.layers[1].attention
    original = layer.processor
    height, width = call[0][0][0].shape[-2:]
    layer.set_processor(RefZImagePAG(image_tokens=(height // 2) * (width // 2)))  # patch 2: the image tokens come first
    try:
        perturbed = _run(pipe, call, range(rows))
    finally:
        layer.set_processor(original)
    combined = cond
    if cfg:
        uncond = _run(pipe, call, range(rows, 2 * rows))
        combined = cond + guidance * (cond - uncond)
    expected = -(combined + scale * (cond - perturbed)).squeeze(2)
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-4)


def test_pag_adaptive_scale_follows_diffusers_timestep(pipe):
    """diffusers' `pag_adaptive_scale`: at the scheduler's timestep T the scale is `max(scale - a (1000 - T), 0)`.
    ZImagePipeline calls its denoiser with `t = (1000 - T) / 1000` (it used to fail: no `timestep` input); over 2 steps
    (T = 1000, 500) the prediction is -(cond + g (cond - uncond) + s_T (cond - perturbed)) at each step."""
    scale, adaptive, guidance = 3.0, 0.003, 4.0
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale, adaptive_scale=adaptive)]):
        recorder = Recorder(pipe)
        try:
            generate(pipe, guidance=guidance, steps=2)
        finally:
            recorder.close()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert timesteps == [1000.0, 500.0] and len(recorder.calls) == len(recorder.predictions) == 2
    rows = len(PROMPTS)
    layer = pipe.transformer.layers[1].attention
    for call, got, timestep in zip(recorder.calls, recorder.predictions, timesteps):
        cond, uncond = _run(pipe, call, range(rows)), _run(pipe, call, range(rows, 2 * rows))
        original = layer.processor
        height, width = call[0][0][0].shape[-2:]
        layer.set_processor(RefZImagePAG(image_tokens=(height // 2) * (width // 2)))
        try:
            perturbed = _run(pipe, call, range(rows))
        finally:
            layer.set_processor(original)
        step_scale = max(scale - adaptive * (1000.0 - timestep), 0.0)
        expected = -(cond + guidance * (cond - uncond) + step_scale * (cond - perturbed)).squeeze(2)
        assert (cond - perturbed).abs().max() > 1e-4
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-4)


def test_pag_on_a_size_whose_image_tokens_are_padded_against_a_reference(pipe):
    """32x40: 8x10 = 80 image tokens, padded to 96 by the transformer between the image and the text (it used to be
    refused with CallLayoutError): PAG's D is the docs' definition with the padding handled as the reference says."""
    scale, guidance = 1.5, 4.0
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale)]):
        recorder = Recorder(pipe)
        try:
            generate(pipe, guidance=guidance, height=32, width=40)
        finally:
            recorder.close()
    (call,), (got,) = recorder.calls, recorder.predictions
    rows = len(PROMPTS)
    cond, uncond = _run(pipe, call, range(rows)), _run(pipe, call, range(rows, 2 * rows))
    layer = pipe.transformer.layers[1].attention
    original = layer.processor
    layer.set_processor(RefZImagePAG(image_tokens=80, pad=16))
    try:
        perturbed = _run(pipe, call, range(rows))
    finally:
        layer.set_processor(original)
    expected = -(cond + guidance * (cond - uncond) + scale * (cond - perturbed)).squeeze(2)
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-4)


def test_seg_and_sag_run_and_the_output_is_stock_after_remove(pipe):
    stock = generate(pipe, steps=2)
    for control in (attnctl.SEG(scale=1.0), attnctl.SAG(scale=0.75)):
        with attnctl.apply(pipe, [control]):
            got = generate(pipe, steps=2)
        assert torch.isfinite(got).all() and (got - stock).abs().max() > 1e-4
    with attnctl.apply(pipe, [attnctl.PAG(scale=0.0)]):  # idle: bitwise stock
        assert torch.equal(generate(pipe, steps=2), stock)
    assert torch.equal(generate(pipe, steps=2), stock)


def test_skip_layer_adds_its_term_against_a_hand_skipped_block(pipe):
    """docs/methods.md "Skip-layer guidance": D = s (cond - skipped), skipped = the cond rows with the named block's
    output replaced by its token input `x` (Z-Image's blocks take their tokens as `x`); ZImagePipeline hands the
    scheduler -(cond + g (cond - uncond) + D)."""
    scale, guidance = 2.0, 4.0
    with attnctl.apply(pipe, [attnctl.SkipLayer(blocks=("layers.1",), scale=scale, steps=(0.0, 1.0))]):
        recorder = Recorder(pipe)
        try:
            generate(pipe, guidance=guidance, steps=2)  # step 0 is never guided (SkipLayer's window is SD3's, strict)
        finally:
            recorder.close()
    (_, call), (_, got) = recorder.calls, recorder.predictions
    rows = len(PROMPTS)
    cond, uncond = _run(pipe, call, range(rows)), _run(pipe, call, range(rows, 2 * rows))
    block = pipe.transformer.layers[1]
    block.forward = lambda x, *args, **kwargs: x  # an instance attribute: removed below
    try:
        skipped = _run(pipe, call, range(rows))
    finally:
        del block.forward
    expected = -(cond + guidance * (cond - uncond) + scale * (cond - skipped)).squeeze(2)
    assert (cond - skipped).abs().max() > 1e-4
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-4)
    with pytest.raises(attnctl.ConfigError, match="layers.1"):  # blocks are named by path (refiners share the class)
        attnctl.apply(pipe, [attnctl.SkipLayer(blocks=(1,))])


def test_latent_optimisation_is_refused_with_the_reason(pipe):
    with pytest.raises(UnsupportedError, match="list of per-row latents"):
        attnctl.apply(pipe, [attnctl.AttendExcite(("cat",))])


def test_sag_reads_x0_with_the_schedulers_sign(pipe, monkeypatch):
    """ZImagePipeline hands the scheduler the negated output (velocity v = -out), so SAG's x0 of the uncond rows is
    x + sigma * out (flow matching: x0 = x - sigma v), as FlowMatchEulerDiscreteScheduler would step it."""
    from attnctl.controls.guidance import sag as sag_module

    blurred = []
    original = sag_module.gaussian_blur

    def spy(images, *args, **kwargs):
        blurred.append(images.clone())
        return original(images, *args, **kwargs)

    monkeypatch.setattr(sag_module, "gaussian_blur", spy)
    with attnctl.apply(pipe, [attnctl.SAG(scale=0.75)]):
        recorder = Recorder(pipe)
        try:
            generate(pipe, steps=1)
        finally:
            recorder.close()
    call = recorder.calls[0]  # the pipeline's call (SAG's degraded pass follows it)
    rows = len(PROMPTS)
    uncond = _run(pipe, call, range(rows, 2 * rows))  # ZImagePipeline's rows: [cond, uncond]
    sample = torch.stack(call[0][0][rows:])
    sigma = float(pipe.scheduler.sigmas[0])
    expected = (sample.float() + sigma * uncond.float()).squeeze(2)
    torch.testing.assert_close(blurred[0], expected, rtol=1e-5, atol=1e-5)


def test_seg_blurs_the_image_queries_of_the_joint_stream_against_a_reference(pipe):
    """docs/methods.md "SEG" on Z-Image's `[image; text]` stream, on a non-square 8x16 grid: the perturbed rows' image
    queries (the query projection's output, before qk-norm and RoPE) are blurred, the text queries are not; against
    the stock denoiser with an independently blurred projection; the pipeline's sign and CFG as for PAG."""
    from .test_guidance import ref_blur

    scale, sigma, guidance, grid = 2.0, 2.0, 4.0, (8, 16)
    options = {**CALL_DEFAULTS[NAME], "height": 32, "width": 64}
    with attnctl.apply(pipe, [attnctl.SEG(scale=scale, sigma=sigma)]):
        recorder = Recorder(pipe)
        try:
            pipe(prompt=list(PROMPTS), num_inference_steps=1, guidance_scale=guidance, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **options)
        finally:
            recorder.close()
    (call,), (got,) = recorder.calls, recorder.predictions
    rows = len(PROMPTS)
    cond, uncond = _run(pipe, call, range(rows)), _run(pipe, call, range(rows, 2 * rows))
    image = grid[0] * grid[1]

    def blur(module, inputs, output):
        head = output[:, :image]
        blurred = torch.stack([ref_blur(g, sigma) for g in head.transpose(1, 2).reshape(output.shape[0], -1, *grid)]).float()
        return torch.cat([blurred.reshape(output.shape[0], -1, image).transpose(1, 2).to(output.dtype), output[:, image:]], 1)

    hook = pipe.transformer.layers[1].attention.to_q.register_forward_hook(blur)
    try:
        perturbed = _run(pipe, call, range(rows))
    finally:
        hook.remove()
    expected = -(cond + guidance * (cond - uncond) + scale * (cond - perturbed)).squeeze(2)
    assert (cond - perturbed).abs().max() > 1e-4
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-4)
