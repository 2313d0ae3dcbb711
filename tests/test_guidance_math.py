"""Guidance controls at the level of tensors: each fast path against an independent reference written from
docs/methods.md (never from the implementation), plus validation and serialisation."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import attnctl
from attnctl.controls.guidance.pag import joint_identity, self_identity
from attnctl.controls.guidance.seg import blur_tokens, kernel_size
from attnctl.errors import ConfigError, SelectionError
from attnctl.kernels.spec import AttentionSpec, LabelMask, Sparse
from attnctl.noise import NoiseLevel, noise_level

# -- references ---------------------------------------------------------------------------------------------


def ref_sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax (Martins and Astudillo 2016, Algorithm 1): sort, find the support size, threshold."""
    z = z.double()
    srt = z.sort(-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cssv = srt.cumsum(-1)
    in_support = 1 + k * srt > cssv
    k_z = in_support.sum(-1, keepdim=True)
    tau = (cssv.gather(-1, k_z - 1) - 1) / k_z
    return (z - tau).clamp(min=0)


def ref_entmax15(z: torch.Tensor) -> torch.Tensor:
    """1.5-entmax (Peters et al. 2019, Algorithm 2): p = [z/2 - tau]_+^2; for each candidate support size k the
    threshold solving sum_{i<=k} (x_i - tau)^2 = 1 over the k largest x = z/2, the largest consistent k wins."""
    x = z.double() / 2
    srt = x.sort(-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    first, second = srt.cumsum(-1), (srt * srt).cumsum(-1)
    # k tau^2 - 2 tau first + second - 1 = 0, the smaller root
    tau = (first - torch.sqrt((first * first - k * (second - 1)).clamp(min=0))) / k
    consistent = tau <= srt
    size = consistent.cumprod(-1).sum(-1, keepdim=True)  # supports are prefixes of the sorted order
    return (x - tau.gather(-1, size - 1)).clamp(min=0) ** 2


def ref_entmax(z: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 2.0:
        return ref_sparsemax(z)
    assert alpha == 1.5
    return ref_entmax15(z)


def dense_reference(q, k, v, bias, value_scale=None, rows=None, sparse=None):
    """softmax(q k^T / sqrt(d) + bias) v in float64 with per-key value scale / sparse on the rows `rows`."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.double()
    probs = torch.softmax(logits, -1)
    values = v.double()
    scaled = values if value_scale is None else values * value_scale.double()[..., :, None]
    nq = q.shape[2]
    r = torch.ones(nq, 1, dtype=torch.float64) if rows is None else rows.double()[:, None]
    out = probs @ values * (1 - r) + probs @ scaled * r
    if sparse is not None:
        sparse_out = ref_entmax(logits, sparse.alpha) @ scaled
        out = out + r * sparse.scale * (sparse_out - out)
    return out, torch.logsumexp(logits, -1)


def pag_joint_mask(total: int, image: slice) -> torch.Tensor:
    """diffusers' PAGCFGJointAttnProcessor2_0 mask: image x image block -inf except the diagonal."""
    mask = torch.zeros(total, total, dtype=torch.float64)
    block = torch.full((image.stop - image.start,) * 2, float("-inf"), dtype=torch.float64)
    block.fill_diagonal_(0.0)
    mask[image, image] = block
    return mask


# -- PAG ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["image-first", "text-first"])
@pytest.mark.parametrize("extras", ["plain", "bias+scale", "sparse", "labels+mask"])
def test_joint_identity_matches_dense_diagonal_mask(layout, extras):
    torch.manual_seed(0)
    batch, heads, n_img, n_txt, dim = 2, 2, 6, 3, 4
    total = n_img + n_txt
    image = slice(0, n_img) if layout == "image-first" else slice(n_txt, total)
    text = slice(n_img, total) if layout == "image-first" else slice(0, n_txt)
    q, k, v = (torch.randn(batch, heads, total, dim) for _ in range(3))
    bias = pag_joint_mask(total, image).expand(batch, heads, total, total).clone()
    spec = AttentionSpec(query_range=(image.start, image.stop))
    rows = torch.zeros(total)
    rows[image] = 1
    value_scale = None
    if extras == "bias+scale":
        key_bias = torch.zeros(batch, total)
        key_bias[:, text] = torch.randn(batch, n_txt)
        value_scale = torch.ones(batch, total)
        value_scale[:, text] = torch.rand(batch, n_txt) + 0.5
        value_scale[:, image] = torch.rand(batch, n_img) + 0.5
        spec = AttentionSpec(key_bias=key_bias, value_scale=value_scale, query_range=(image.start, image.stop))
        bias = bias + key_bias.double()[:, None, None, :] * rows.double()[:, None]
        value_scale = value_scale[:, None]
    elif extras == "sparse":
        spec = AttentionSpec(sparse=Sparse(alpha=1.5, scale=2.0), query_range=(image.start, image.stop))
    elif extras == "labels+mask":
        q_labels = torch.randint(0, 2, (batch, total))
        k_labels = torch.randint(0, 2, (batch, total))
        table = torch.tensor([[[0.0, -1.5], [-0.5, 0.0]]])
        attn_mask = torch.randn(batch, 1, total, total)
        spec = AttentionSpec(attn_mask=attn_mask, labels=LabelMask(q_labels, k_labels, table))
        rows = torch.ones(total)
        bias = bias + attn_mask.double() + LabelMask(q_labels, k_labels, table).dense().double()
    expected, expected_lse = dense_reference(q, k, v, bias, value_scale, rows, spec.sparse)
    out, lse = joint_identity(q, k, v, spec, image)
    torch.testing.assert_close(out.double(), expected[:, :, image], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse[:, :, image], rtol=1e-5, atol=1e-5)


def test_self_identity_is_value():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    out, lse = self_identity(q, k, v, AttentionSpec())
    assert torch.equal(out, v)
    torch.testing.assert_close(lse, (q * k).sum(-1) / 2.0)
    scale = torch.rand(2, 5) + 0.5
    out, _ = self_identity(q, k, v, AttentionSpec(value_scale=scale))
    torch.testing.assert_close(out, v * scale[:, None, :, None])


# -- SEG ------------------------------------------------------------------------------------------------------


def ref_seg_kernel_size(sigma: float, hw: tuple[int, int]) -> int:
    size = math.ceil(6 * sigma) + 1
    if size % 2 == 0:  # made odd as SEG-SDXL does: ceil(6 sigma) + 1 - ceil(6 sigma) % 2
        size -= 1
    longest = max(hw)
    limit = longest if longest % 2 == 1 else longest + 1  # SEG-SDXL's `L - (L % 2 - 1)`: one past an even side
    return min(size, limit)


def ref_blur(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Explicit-index 2-D Gaussian blur of (C, H, W): reflect index arithmetic, replicate where reflect can't."""
    channels, height, width = grid.shape
    size = ref_seg_kernel_size(sigma, (height, width))
    half = size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()

    def source(index: int, n: int, pad: int) -> int:
        if pad >= n:  # replicate
            return min(max(index, 0), n - 1)
        if index < 0:
            return -index
        if index > n - 1:
            return 2 * (n - 1) - index
        return index

    out = torch.zeros(channels, height, width, dtype=torch.float64)
    g = grid.double()
    for y in range(height):
        for x in range(width):
            acc = torch.zeros(channels, dtype=torch.float64)
            for a in range(size):
                for b in range(size):
                    sy = source(y + a - half, height, half)
                    sx = source(x + b - half, width, half)
                    acc += weights[a] * weights[b] * g[:, sy, sx]
            out[:, y, x] = acc
    return out


def test_seg_kernel_size_rule():
    assert kernel_size(1.0, (64, 64)) == 7  # ceil(6) + 1 = 7
    assert kernel_size(0.75, (64, 64)) == 5  # ceil(4.5) = 5, odd: 5
    assert kernel_size(10.0, (16, 16)) == 17  # SEG-SDXL's clamp: L - (L % 2 - 1), one tap past an even side
    assert kernel_size(10.0, (15, 9)) == 15
    assert kernel_size(10.0, (4, 12)) == 13  # the longer side clamps
    assert kernel_size(2.0, (16, 16)) == 13  # ceil(12) + 1, already odd, within the grid
    assert kernel_size(10.0, (1, 1)) == 1
    assert kernel_size(10.0, (1, 2)) == 3


@pytest.mark.parametrize("sigma, hw", [(1.0, (5, 8)), (0.6, (7, 4)), (3.0, (3, 10)), (2.0, (6, 6)), (10.0, (4, 16)), (100.0, (8, 8)),
                                       (9998.0, (6, 6))])
def test_seg_blur_matches_explicit_reference(sigma, hw):
    torch.manual_seed(2)
    channels = 3
    tokens = torch.randn(2, hw[0] * hw[1], channels)
    got = blur_tokens(tokens, hw, sigma)
    for b in range(2):
        grid = tokens[b].T.reshape(channels, *hw)
        expected = ref_blur(grid, sigma).reshape(channels, -1).T
        torch.testing.assert_close(got[b].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [9999.0, float("inf"), 1e6])
def test_seg_infinite_sigma_is_mean_query(sigma):
    torch.manual_seed(3)
    tokens = torch.randn(2, 12, 5)
    got = blur_tokens(tokens, (3, 4), sigma)
    torch.testing.assert_close(got, tokens.mean(1, keepdim=True).expand_as(tokens))


# -- SAG noise levels against the schedulers' own x0 -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, prediction",
    [("DDIMScheduler", "epsilon"), ("DDIMScheduler", "v_prediction"), ("EulerDiscreteScheduler", "epsilon"),
     ("EulerDiscreteScheduler", "v_prediction"), ("DPMSolverMultistepScheduler", "epsilon"),
     ("FlowMatchEulerDiscreteScheduler", None)],
)
def test_sag_x0_matches_the_scheduler(name, prediction):
    """x0 from the denoiser's (scaled) input equals what the scheduler itself predicts."""
    import diffusers

    cls = getattr(diffusers, name)
    config = {} if prediction is None else {"prediction_type": prediction, "beta_schedule": "scaled_linear",
                                            "beta_start": 0.00085, "beta_end": 0.012}
    if name == "DDIMScheduler":
        config["clip_sample"] = False  # its x0 would be clipped to [-1, 1]
    scheduler = cls(**config)
    scheduler.set_timesteps(10)
    torch.manual_seed(4)
    x = torch.randn(1, 4, 8, 8) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    output = torch.randn(1, 4, 8, 8)
    for step in range(3):
        t = scheduler.timesteps[step]
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        level = noise_level(scheduler, t, "test")
        x0, eps = level.split(model_input, output)
        torch.testing.assert_close(level.noise(x0, eps), model_input.float(), rtol=1e-4, atol=1e-4)
        if name == "FlowMatchEulerDiscreteScheduler":
            sigma = scheduler.sigmas[step]
            expected_x0 = x - sigma * output  # velocity = noise - x0
        elif name == "DPMSolverMultistepScheduler":
            if scheduler.step_index is None:
                scheduler._init_step_index(t)
            expected_x0 = scheduler.convert_model_output(output, sample=x)
        else:
            expected_x0 = scheduler.step(output, t, x).pred_original_sample
            if hasattr(scheduler, "_step_index") and scheduler._step_index is not None:
                scheduler._step_index -= 1  # undo: the real step below advances it
        torch.testing.assert_close(x0, expected_x0.float(), rtol=1e-4, atol=1e-4)
        x = scheduler.step(output, t, x).prev_sample


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # KDPM2 on numpy 2
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_noise_level_is_the_one_the_scheduler_scales_its_input_by(name):
    """At every model call of a run (both calls of a second-order step), sqrt(alpha_bar) is the factor the scheduler's
    own `scale_model_input` applies, 1 / sqrt(sigma^2 + 1). KDPM2Ancestral's second call reads `sigmas_interpol` one
    index back (its step_index has moved on); attnctl read KDPM2's index there (1.6156 against 0.0292 at call 1)."""
    import diffusers

    scheduler = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=generator) * float(scheduler.init_noise_sigma)
    noise = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        scale = scheduler.scale_model_input(torch.ones(()), t)
        level = noise_level(scheduler, t, "test")
        torch.testing.assert_close(level.value.sqrt().float(), scale.float(), rtol=1e-5, atol=1e-7)
        x = scheduler.step(torch.randn(x.shape, generator=generator), t, x, **noise).prev_sample


def test_noise_level_split_sample_prediction():
    level = NoiseLevel("vp", torch.tensor(0.3, dtype=torch.float64), "sample")
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    s = level.noise(x0, eps)
    got_x0, got_eps = level.split(s, x0)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps, rtol=1e-5, atol=1e-5)


# -- configs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "control",
    [attnctl.PAG(scale=2.0, layers="self & mid", steps=(0.1, 0.9), adaptive_scale=0.01, separate=True),
     attnctl.SEG(scale=1.0, sigma=float("inf"), layers=("transformer_blocks.1",)), attnctl.SAG(scale=0.5, layer="mid_block"),
     attnctl.PLADIS(scale=1.5, alpha=2.0, layers="cross"), attnctl.SkipLayer(blocks=(7, "single_transformer_blocks.2"))],
)
def test_round_trip(control):
    assert attnctl.Control.from_dict(control.to_dict()) == control


@pytest.mark.parametrize(
    "make, message",
    [(lambda: attnctl.PAG(scale=-1), "PAG.scale"), (lambda: attnctl.PAG(adaptive_scale=-0.1), "adaptive_scale"),
     (lambda: attnctl.PAG(steps=(0.5, 0.2)), "PAG.steps"), (lambda: attnctl.SEG(sigma=0), "SEG.sigma"),
     (lambda: attnctl.SEG(sigma="wide"), "SEG.sigma"), (lambda: attnctl.PLADIS(alpha=1.0), "PLADIS.alpha"),
     (lambda: attnctl.PLADIS(scale=float("nan")), "PLADIS.scale"), (lambda: attnctl.SAG(layer=""), "SAG.layer"),
     (lambda: attnctl.SkipLayer(blocks=()), "SkipLayer.blocks"), (lambda: attnctl.SkipLayer(blocks=(1, 1)), "duplicates"),
     (lambda: attnctl.SkipLayer(blocks=(-1,)), "-1"), (lambda: attnctl.PAG(separate="yes"), "separate"),
     (lambda: attnctl.PAG(layers=3), "PAG.layers")],
)
def test_bad_configs_raise_naming_the_value(make, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make()


def test_selection_errors(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(SelectionError, match="self- or joint"):
        attnctl.apply(pipe, [attnctl.PAG(layers="cross")])
    with pytest.raises(SelectionError, match="exactly one"):
        attnctl.apply(pipe, [attnctl.SAG(layer="self")])
    with pytest.raises(SelectionError, match="by path"):
        attnctl.apply(pipe, [attnctl.SkipLayer()])
    with pytest.raises(SelectionError, match="cross- or joint"):
        attnctl.apply(pipe, [attnctl.PLADIS(layers="self")])
    sd3 = tiny_cache("tiny-sd3")
    with pytest.raises(SelectionError, match="transformer_blocks has 2 block"):
        attnctl.apply(sd3, [attnctl.SkipLayer()])  # SD3.5-M's blocks 7-9 do not exist in a 2-block model
    assert "forward" not in pipe.unet.__dict__ and "encode_prompt" not in pipe.__dict__  # nothing was installed


def test_default_layers_are_exact(tiny_cache):
    """Defaults per docs/methods.md, and `transformer_blocks.1` never selects block 10 or 11."""
    from attnctl.families import adapter_for

    unet = adapter_for(tiny_cache("tiny-sd").unet)
    assert [l.name for l in attnctl.PAG().select(unet)] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert [l.name for l in attnctl.SAG().select(unet)] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert all(l.kind == "cross" for l in attnctl.PLADIS().select(unet))
    pixart = adapter_for(tiny_cache("tiny-pixart").transformer)
    assert [l.name for l in attnctl.SEG().select(pixart)] == ["transformer_blocks.1.attn1"]
    flux = adapter_for(tiny_cache("tiny-flux").transformer)
    assert [l.name for l in attnctl.PAG().select(flux)] == ["transformer_blocks.0.attn"]

    from attnctl.testing import make_tiny_pipeline

    big = make_tiny_pipeline("tiny-sd3")
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    big.transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=12, attention_head_dim=4, num_attention_heads=2,
        caption_projection_dim=8, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    )
    sd3 = adapter_for(big.transformer)
    assert [l.name for l in attnctl.PAG().select(sd3)] == ["transformer_blocks.1.attn"]
    assert [l.name for l in attnctl.SkipLayer().select(sd3)] == [f"transformer_blocks.{i}.attn" for i in (7, 8, 9)]
