"""What attnctl controls cost end to end on real-size denoisers (issue 16): time, FLOPs, memory, fidelity.

Denoisers are built from their published configs with random weights (no download): SD 1.5 (UNet, 512),
SDXL (UNet, 1024), SD3.5-medium (MMDiT, 1024) and Flux-dev (19 double + 38 single blocks, 1024). Text
encoders and VAE are tiny but as wide as the denoiser expects (their cost is outside the denoising loop);
the output is latents. Per model, stock and every variant run interleaved in one process: each round applies
the variant's controls, makes one untimed call (the handle's per-handle caches are built there, as in any
session that generates more than one image) and one timed call, then removes the handle. Medians over the
rounds after a warm-up round.

Printed per variant: median ms, ratio to stock, the ratio of total FLOPs to stock (counted here by a
`FlopCounterMode` run: matmuls, convolutions and attention, linear layers included), PSNR of the latents
against stock, whether they are bitwise stock, peak memory (CUDA). On CUDA the issue's targets follow as
PASS / FAIL lines: the TGate bound B = T_cfg / ((g/n) T_cfg + (1 - g/n) T_nocfg) from stock with and
without CFG in the same run, the ToMe FLOP bound, and "control for free" on SDXL.

"Control for free" with a block cache (issue 17): where the denoiser has diffusers' `enable_cache` (Flux-dev;
diffusers 0.42's UNet2DConditionModel and SD3Transformer2DModel have none, and their pipelines open no
`cache_context`), four more variants: stock+fbc (FirstBlockCache alone), cff (Reweight + Regions +
PAG(steps=(0, 0.4))), cff+fbc (the same with FirstBlockCache: applied after attnctl, disabled after the
round). On CUDA: PASS when cff+fbc is no slower than stock. The "spread" column is (max - min) / median of
the timed rounds; "cached" is how many denoiser calls the last block ran (FirstBlockCache skips the others).

    python benchmarks/gpu_e2e.py --models sd15,flux [--variants stock,apply[],reweight] [--steps 20]
        [--flux-steps 10] [--repeats 3] [--device cuda] [--backend auto] [--json out.json]
    python benchmarks/gpu_e2e.py --tiny      # CPU-size configs in seconds: a smoke test, not a timing
    python benchmarks/gpu_e2e.py --tiny --models sd15,flux --variants stock+fbc,cff,cff+fbc --repeats 7  # CPU
    python benchmarks/gpu_e2e.py --models wan,flux2   # Wan 2.1 1.3B at 480x832 x 33 frames, FLUX.2 klein 4B at 1024;
                                                      # 10 steps each (--flux-steps); FastAttn's band with its FLOP bound
    OMP_NUM_THREADS=1 python benchmarks/gpu_e2e.py --models wan-cpu --device cpu --clock process \
        --variants 'fastattn(band=448),fastattn(window=1x4x4)' --repeats 3
        # Wan's layout at a CPU size (9 x 16 x 28 = 4032 tokens; attention ~70% of stock's CPU time on one thread):
        # the windows' speed-up beside their FLOP bound (one thread and CPU time: steady on a shared machine);
        # `auto` runs them as sdpa tiles (kernels/window_tiles.py), `--backend flex` as flex block masks

    OMP_NUM_THREADS=1 python benchmarks/gpu_e2e.py --models flux-cpu --device cpu --clock process --repeats 3 \
        --variants 'reweight,regions,regions(trim),pag(0..0.4),stock+fbc,cff,cff+fbc,cff(trim)+fbc' [--fbc-extra-thresholds 0.5,1]
        # "control for free" with FirstBlockCache on CPU (issue 17, no GPU): Flux-dev's layout at a size where compute,
        # not per-op host overhead, sets the time (4 double + 8 single blocks of width 256, 1024 image + 64 T5 tokens;
        # about 0.5 s a denoiser call on one thread); the controls' costs one by one beside the cache's saving.
        # Random weights: the first block's residual moves 0.42-0.52 (relative) from step to step, so the default
        # threshold 0.12 skips no call here (FBC relies on a trained model moving less between steps; not measurable offline); other thresholds only as extra rows (@T)

One run of one model fits a 10-minute window on an H100 / H200 (`--variants` to cut it further).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# benchmarks/kernels.py would shadow the `kernels` package transformers imports: put the repo root first
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import torch  # noqa: E402

PROMPT = "a photo of a red cat and a blue dog"
MODELS = ("sd15", "sdxl", "sd35m", "flux", "flux-cpu", "flux2", "wan", "wan-cpu")
TINY = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl", "sd35m": "tiny-sd3", "flux": "tiny-flux", "flux-cpu": "tiny-flux", "flux2": "tiny-flux2",
        "wan": "tiny-wan", "wan-cpu": "tiny-wan"}
FAMILY = {"sd15": "unet", "sdxl": "unet", "sd35m": "mmdit", "flux": "flux", "flux-cpu": "flux", "flux2": "flux", "wan": "wan",
          "wan-cpu": "wan"}
#: Models whose steps are `--flux-steps` (10 by default: the issue's Flux.2 klein and Wan runs).
FEW_STEPS = ("flux", "flux-cpu", "flux2", "wan", "wan-cpu")
#: FastAttn's 1-D band per model (tokens each side): one frame of Wan 2.1 at 480x832 (30 x 52 tokens), an eighth of
#: klein's 4096 tokens at 1024x1024, one frame of the CPU-size Wan (16 x 28 tokens); the tiny configs use the band of
#: the tiny tests.
FAST_BAND = {"flux2": 512, "wan": 1560, "wan-cpu": 448}
TINY_FAST_BAND = {"flux2": 8, "wan": 8, "wan-cpu": 8}
#: FastAttn's 3-D neighbourhood (rf, rh, rw) on video: the neighbouring frames, and 8 (Wan 480x832: 30 x 52 tokens a
#: frame) or 4 (CPU size: 16 x 28) tokens each way within them.
FAST_WINDOW_3D = {"wan": (1, 8, 8), "wan-cpu": (1, 4, 4)}
TINY_FAST_WINDOW_3D = {"wan": (1, 1, 1), "wan-cpu": (1, 1, 1)}


# -- models -----------------------------------------------------------------------------------------------------
def _clip(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from attnctl.testing.tokenizers import clip_vocab_size

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=64,
                            num_attention_heads=4, num_hidden_layers=1, vocab_size=clip_vocab_size(),
                            max_position_embeddings=77, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(width: int):
    from transformers import T5Config, T5EncoderModel

    from attnctl.testing.tokenizers import t5_vocab_size

    config = T5Config(vocab_size=t5_vocab_size(), d_model=width, d_kv=64, d_ff=128, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, flow: bool = False):
    """Four levels of 8 channels: vae_scale_factor 8, as the real VAEs (only its config matters: latents out)."""
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5035} if flow else {}
    return AutoencoderKL(block_out_channels=[8] * 4, in_channels=3, out_channels=3, latent_channels=latent_channels,
                         norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, **extra).eval()


def build_sd15():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from attnctl.testing.tokenizers import tiny_clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8)  # runwayml SD 1.5 unet/config.json
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=_clip(768), tokenizer=tiny_clip_tokenizer(), unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    return pipe, {"height": 512, "width": 512, "guidance_scale": 7.5}


def build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from attnctl.testing.tokenizers import tiny_clip_tokenizer

    unet = UNet2DConditionModel(  # stabilityai SDXL base unet/config.json
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(4), text_encoder=_clip(768), tokenizer=tiny_clip_tokenizer(),
                                     text_encoder_2=_clip(1280, projection=1280),
                                     tokenizer_2=tiny_clip_tokenizer(pad_token="!"), unet=unet.eval(), scheduler=scheduler,
                                     image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True)
    return pipe, {"height": 1024, "width": 1024, "guidance_scale": 6.0}


def build_sd35m():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from attnctl.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    transformer = SD3Transformer2DModel(  # stabilityai SD3.5-medium transformer/config.json
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(16, flow=True), text_encoder=_clip(768, projection=768),
                                    tokenizer=tiny_clip_tokenizer(), text_encoder_2=_clip(1280, projection=1280),
                                    tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=_t5(4096),
                                    tokenizer_3=tiny_t5_tokenizer())
    return pipe, {"height": 1024, "width": 1024, "guidance_scale": 4.5, "max_sequence_length": 256}


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from attnctl.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    transformer = FluxTransformer2DModel(  # black-forest-labs FLUX.1-dev transformer/config.json
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(16, flow=True), text_encoder=_clip(768, projection=None),
                        tokenizer=tiny_clip_tokenizer(), text_encoder_2=_t5(4096), tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer.eval())
    return pipe, {"height": 1024, "width": 1024, "guidance_scale": 3.5, "max_sequence_length": 512}


def build_flux_cpu():
    """Flux-dev's layout (double then single blocks, RoPE, 2x2-packed 16-channel latents, T5 tokens joined to the image
    tokens, guidance embedding, no CFG) at a CPU size where compute, not per-op host overhead, sets the time: 4 double +
    8 single blocks of 4 heads of 64 (width 256), 512x512 pixels = 32 x 32 = 1024 image tokens + 64 T5 tokens. The first
    block, which FirstBlockCache always runs, is 2 / 16 of the blocks' work (Flux-dev: 2 / 76)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from attnctl.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=256, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(16, flow=True), text_encoder=_clip(768, projection=None),
                        tokenizer=tiny_clip_tokenizer(), text_encoder_2=_t5(256), tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer.eval())
    return pipe, {"height": 512, "width": 512, "guidance_scale": 3.5, "max_sequence_length": 64}


def build_flux2():
    """FLUX.2 klein 4B (black-forest-labs/FLUX.2-klein-4B transformer/config.json: 5 double + 20 single blocks,
    24 heads of 128, 128 latent channels, Qwen3-4B hidden states of 3 layers stacked: 3 x 2560 = 7680), 1024x1024."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from attnctl.testing.new_families import QWEN3_CHAT_TEMPLATE
    from attnctl.testing.qwen_tokenizer import qwen_vocab_size, tiny_qwen_tokenizer

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=32, norm_num_groups=4, layers_per_block=1)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(  # as wide as Qwen3-4B, 3 layers (klein stacks layers 9, 18, 27)
        vocab_size=qwen_vocab_size(), hidden_size=2560, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
    )).eval()
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer.eval())
    return pipe, {"height": 1024, "width": 1024, "guidance_scale": 4.0, "max_sequence_length": 512,
                  "text_encoder_out_layers": (1, 2, 3)}


def build_wan():
    """Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json: 30 blocks, 12 heads of 128, ffn
    8960, umT5-XXL text width 4096), 480x832, 33 frames: 9 x 30 x 52 = 14040 video tokens."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from attnctl.testing.tokenizers import t5_vocab_size, tiny_t5_tokenizer

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024,
    )
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 16, latents_std=[1.0] * 16)  # 8x spatial, 4x temporal: only its config is used
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=t5_vocab_size(), d_model=4096, d_kv=64, d_ff=128, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    pipe = WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae.eval(), transformer=transformer.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe, {"height": 480, "width": 832, "num_frames": 33, "guidance_scale": 5.0, "max_sequence_length": 512}


def build_wan_cpu():
    """Wan 2.1's layout (patch (1, 2, 2), a causal VAE of 4x temporal and 8x spatial compression, 33 frames) at a
    CPU size where self-attention dominates: 2 blocks, 2 heads of 64, ffn 512, text width 64, 256x448 pixels:
    9 x 16 x 28 = 4032 video tokens (the issue's CPU-size config; not the 1.3B model)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from attnctl.testing.tokenizers import t5_vocab_size, tiny_t5_tokenizer

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=64,
        freq_dim=32, ffn_dim=512, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024,
    )
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=t5_vocab_size(), d_model=64, d_kv=16, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    pipe = WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae.eval(), transformer=transformer.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe, {"height": 256, "width": 448, "num_frames": 33, "guidance_scale": 5.0, "max_sequence_length": 32}


BUILDERS: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "sd15": build_sd15, "sdxl": build_sdxl, "sd35m": build_sd35m, "flux": build_flux, "flux-cpu": build_flux_cpu, "flux2": build_flux2, "wan": build_wan,
    "wan-cpu": build_wan_cpu,
}


def build(model: str, tiny: bool, device: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(0)
    if tiny:
        from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline

        name = TINY[model]
        call = dict(CALL_DEFAULTS[name])
        call["guidance_scale"] = 3.5 if model in ("flux", "flux-cpu") else (4.0 if model == "flux2" else 5.0)
        pipe = make_tiny_pipeline(name)
    else:  # built where it runs, in bf16 already for the big transformers (Flux-dev: 12B parameters)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        try:
            with torch.device(device):
                pipe, call = BUILDERS[model]()
        finally:
            torch.set_default_dtype(old)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), call


# -- variants ---------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    controls: Callable[[], list[Any]] | None  # None: stock (no handle)
    call: dict[str, Any] = field(default_factory=dict)  # overrides of the call's arguments
    cache: Callable[[], Any] | None = None  # a diffusers cache config, enabled on the denoiser after apply


def has_enable_cache(denoiser: Any) -> bool:
    """diffusers' CacheMixin (`enable_cache`): Flux, Chroma, Qwen-Image, Wan in 0.42; not the UNet, SD3, PixArt."""
    return callable(getattr(denoiser, "enable_cache", None))


def denoiser_of(pipe: Any) -> Any:
    return getattr(pipe, "unet", None) or pipe.transformer


def _last_block(denoiser: Any) -> Any:
    for name in ("single_transformer_blocks", "transformer_blocks"):
        blocks = getattr(denoiser, name, None)
        if blocks is not None and len(blocks):
            return blocks[-1]
    return None


def fast_plan(pipe: Any, steps: int, band: Any, call: dict[str, Any]) -> Any:
    """A fixed DiTFastAttn plan: window_residual (the 1-D band, or a 3-D (rf, rh, rw) window on video) on every self /
    joint attention layer after a full first step (which caches the residual), so the FLOP bound does not depend on a
    calibration."""
    from attnctl.controls.fastattn import FastAttnPlan, model_identity
    from attnctl.families import adapter_for

    denoiser = pipe.transformer
    model, source, fingerprint = model_identity(denoiser)
    layers = [layer.name for layer in adapter_for(denoiser).layers if layer.kind != "cross"]
    per_step = ("full",) + ("window_residual",) * (steps - 1)
    return FastAttnPlan(model=model, fingerprint=fingerprint, steps=steps, resolution=(call["height"], call["width"]),
                        window=band, threshold=0.0, methods=tuple((name, per_step) for name in layers), source=source,
                        frames=token_frames(pipe, call))


def token_frames(pipe: Any, call: dict[str, Any]) -> int:
    """Token frames of a video call (Wan: latent frames (n - 1) // 4 + 1 over the temporal patch); 1 for images."""
    frames = call.get("num_frames")
    if frames is None:
        return 1
    temporal = getattr(pipe, "vae_scale_factor_temporal", 1) or 1
    patch = getattr(pipe.transformer.config, "patch_size", (1,))[0]
    return ((frames - 1) // temporal + 1) // patch


def fast_variants(model: str, tiny: bool = False) -> dict[str, Any]:
    """FastAttn's variants of `model` (issue 19): name -> its plan's band (tokens each side) or 3-D radius."""
    found: dict[str, Any] = {}
    if model in FAST_BAND:
        band = (TINY_FAST_BAND if tiny else FAST_BAND)[model]
        found[f"fastattn(band={band})"] = band
        if model in FAST_WINDOW_3D:
            radius = (TINY_FAST_WINDOW_3D if tiny else FAST_WINDOW_3D)[model]
            found[f"fastattn(window={'x'.join(map(str, radius))})"] = radius
    return found


def variant_names(model: str, args: argparse.Namespace) -> list[str]:
    """Every variant name `model` can have under these options (block-cache variants included: whether the denoiser
    has enable_cache is known once it is built), without building anything."""
    steps = args.flux_steps if model in FEW_STEPS else args.steps
    extra = tuple(float(t) for t in args.fbc_extra_thresholds.split(",") if t)
    names = variants(model, steps, tiny=args.tiny, cacheable=True, fbc_threshold=args.fbc_threshold, fbc_extra=extra)
    return [*names, *fast_variants(model, args.tiny)]


def check_variants(models: list[str], args: argparse.Namespace) -> None:
    """SystemExit listing the known names when `--variants` names one that no model has (a misspelt or shortened
    name, `tgate` for `tgate(g=8/20)`, would otherwise be skipped silently and waste a GPU window). A name of another
    model is accepted (gpu_session.sh passes one list to each model's run); run_model says it skips it."""
    wanted = [name for name in args.variants.split(",") if name]
    known = {model: variant_names(model, args) for model in MODELS}
    unknown = [name for name in wanted if not any(name in names for names in known.values())]
    if unknown:
        listed = "; ".join(f"{model}: {', '.join(known[model])}" for model in models)
        raise SystemExit(f"unknown variant(s) {', '.join(map(repr, unknown))} (--steps {args.steps}, --flux-steps "
                         f"{args.flux_steps}); known names (the *fbc ones only where the denoiser has enable_cache): {listed}")


def variants(
    model: str, steps: int, pipe: Any = None, call: dict[str, Any] | None = None, tiny: bool = False, cacheable: bool = False,
    fbc_threshold: float = 0.12, fbc_extra: tuple[float, ...] = (),
) -> dict[str, Variant]:
    import attnctl as a

    def regions(isolate: bool, trim: bool = False):
        return a.Regions([a.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)), a.Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))],
                         base_ratio=0.2, isolate=isolate, trim_prompts=trim)

    trims = model in ("flux", "flux-cpu")  # Regions(trim_prompts=True): region prompts cut after their last T5 token

    gate = max(1, round(0.4 * steps))  # TGate at 40% of the steps
    family = FAMILY[model]
    found = {
        "stock": Variant(None),
        "apply[]": Variant(lambda: []),
        "reweight": Variant(lambda: [a.Reweight({"red": 2.0})]),
        "regions": Variant(lambda: [regions(False)]),
        "regions+isolate": Variant(lambda: [regions(True)]),
        "pag": Variant(lambda: [a.PAG(scale=3.0)]),
        "maps": Variant(lambda: [a.AttentionMaps(["cat", "dog"])]),
        "rw+regions(iso)+pag": Variant(lambda: [a.Reweight({"red": 2.0}), regions(True), a.PAG(scale=3.0)]),
    }
    if trims:
        found["regions(trim)"] = Variant(lambda: [regions(False, trim=True)])
    if pipe is not None:  # the families of issue 19: FastAttn's band (video: over frames x h x w) and 3-D window
        for name, extent in fast_variants(model, tiny).items():
            plan = fast_plan(pipe, steps, extent, call)
            found[name] = Variant(lambda plan=plan: [a.FastAttn(plan=plan)])
    if family == "wan":  # a cross-attention family: no joint region tokens; the tube variant is Regions on frames
        found["regions"] = Variant(lambda: [a.Regions([a.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0), frames=(0, None)),
                                                       a.Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))], base_ratio=0.2)])
        for name in ("regions+isolate", "rw+regions(iso)+pag"):
            found.pop(name)  # isolation would label the self-attention of 14040 tokens densely: measured elsewhere
        found["stock-nocfg"] = Variant(None, {"guidance_scale": 1.0})  # T_nocfg of the TGate bound
        found[f"tgate(g={gate}/{steps})"] = Variant(lambda: [a.TGate(gate_step=gate)])  # after the gate one call a step
    if family == "unet":
        found.update({
            "stock-nocfg": Variant(None, {"guidance_scale": 1.0}),  # T_nocfg of the TGate bound
            "seg": Variant(lambda: [a.SEG(scale=3.0)]),
            f"tgate(g={gate}/{steps})": Variant(lambda: [a.TGate(gate_step=gate)]),
            "tome0.5": Variant(lambda: [a.ToMe(ratio=0.5)]),
            "agent": Variant(lambda: [a.AgentAttention()]),
            "rw+regions+pag+tgate": Variant(lambda: [a.Reweight({"red": 2.0}), regions(False), a.PAG(scale=3.0),
                                                     a.TGate(gate_step=gate)]),
            "rw+regions+pag+tgate+tome": Variant(lambda: [a.Reweight({"red": 2.0}), regions(False), a.PAG(scale=3.0),
                                                          a.TGate(gate_step=gate), a.ToMe(ratio=0.5)]),
            "control-for-free": Variant(lambda: [a.Reweight({"red": 2.0}), regions(False), a.PAG(scale=3.0, steps=(0.0, 0.4)),
                                                 a.TGate(gate_step=gate)]),
        })
    if cacheable:  # "control for free" with a block cache (issue 17)
        def fbc(threshold: float = fbc_threshold):
            from diffusers import FirstBlockCacheConfig

            return FirstBlockCacheConfig(threshold=threshold)

        def cff(trim: bool = False):
            return [a.Reweight({"red": 2.0}), regions(False, trim=trim), a.PAG(scale=3.0, steps=(0.0, 0.4))]

        found.update({
            "pag(0..0.4)": Variant(lambda: [a.PAG(scale=3.0, steps=(0.0, 0.4))]),  # cff's PAG alone: its share of the cost
            "stock+fbc": Variant(None, cache=fbc),
            "cff": Variant(cff),
            "cff+fbc": Variant(cff, cache=fbc),
        })
        if trims:
            found["cff(trim)+fbc"] = Variant(lambda: cff(trim=True), cache=fbc)
        for threshold in fbc_extra:  # extra rows at other thresholds (the claim is judged at --fbc-threshold)
            cache = functools.partial(fbc, threshold)
            found[f"stock+fbc@{threshold:g}"] = Variant(None, cache=cache)
            found[f"cff+fbc@{threshold:g}"] = Variant(cff, cache=cache)
            if trims:
                found[f"cff(trim)+fbc@{threshold:g}"] = Variant(lambda: cff(trim=True), cache=cache)
    return found


# -- measuring --------------------------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of an SDPA call: 2 * 2 * B * H * Nq * Nk * D (the CPU kernel is not in torch's table)."""
    batch, heads, nq, dim = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * nq * nk * dim + 2 * batch * heads * nq * nk * dv


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return int(counter.get_total_flops())


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    x, reference = x.float(), reference.float()
    mse = float(((x - reference) ** 2).mean())
    if mse == 0:
        return math.inf
    span = float(reference.max() - reference.min()) or 1.0
    return 10 * math.log10(span**2 / mse)


@dataclass
class Row:
    model: str
    variant: str
    ms: float | None = None
    ratio: float | None = None
    first_ratio: float | None = None  # the first call of a fresh handle (per-handle caches built there)
    flops: int | None = None
    flop_ratio: float | None = None
    psnr: float | None = None
    bitwise: bool | None = None
    peak_gib: float | None = None
    spread: float | None = None  # (max - min) / median of the timed rounds
    last_block_runs: int | None = None  # denoiser calls in which the last block ran (a cache skips the others)
    denoiser_calls: int | None = None
    error: str | None = None
    times_ms: list[float] = field(default_factory=list)
    attention_saved: float | None = None  # FastAttn: attention FLOPs its report says it did not compute
    flop_bound: float | None = None  # FastAttn: stock FLOPs / (stock FLOPs - attention_saved), the speed-up bound
    backends: list[str] | None = None  # FastAttn: the attention backends its layers used in the last call


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_model(model: str, args: argparse.Namespace) -> list[Row]:
    import attnctl

    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.float32 if not cuda else (torch.bfloat16 if FAMILY[model] in ("flux", "mmdit") else torch.float16)
    steps = args.flux_steps if model in FEW_STEPS else args.steps
    started = time.perf_counter()
    pipe, call = build(model, args.tiny, device, dtype)
    print(f"=== {model}{' (tiny)' if args.tiny else ''}: built in {time.perf_counter() - started:.1f}s, {dtype}, {steps} steps, "
          f"backend {args.backend}, clock {args.clock if not cuda else 'wall'}", flush=True)
    cacheable = has_enable_cache(denoiser_of(pipe))
    extra = tuple(float(t) for t in args.fbc_extra_thresholds.split(",") if t)
    table = variants(model, steps, pipe, call, args.tiny, cacheable, args.fbc_threshold, extra)
    if not cacheable:
        print(f"{model}: {type(denoiser_of(pipe)).__name__} has no enable_cache in this diffusers: no block-cache variants")
    if args.variants:
        wanted = [name for name in args.variants.split(",") if name]
        absent = [name for name in wanted if name not in table]  # names of other models (check_variants)
        if absent:
            print(f"{model}: no variant {', '.join(absent)} on this model")
        table = {name: v for name, v in table.items() if name in wanted or name in ("stock", "stock-nocfg")}

    def generate(variant: Variant, pipe: Any = pipe) -> torch.Tensor:
        options = dict(call)
        options.update(variant.call)
        with torch.inference_mode():  # prompt= (Flux2KleinPipeline's first argument is `image`); video: .frames
            out = pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                       output_type="latent", **options)
            return out.frames if hasattr(out, "frames") else out.images

    # process time (CPU seconds of every thread) is steadier than wall time on a shared CPU; CUDA always uses wall time
    clock = time.process_time if (args.clock == "process" and not cuda) else time.perf_counter
    rows = {name: Row(model, name) for name in table}
    first: dict[str, list[float]] = {name: [] for name in table}
    latents: dict[str, torch.Tensor] = {}
    for round_index in range(args.repeats + 1):  # round 0: warm-up (latents, FLOPs)
        for name, variant in table.items():
            row = rows[name]
            if row.error:
                continue
            handle = None
            cached = False
            counter = None
            try:
                if variant.controls is not None:
                    handle = attnctl.apply(pipe, variant.controls(), backend=args.backend)
                if variant.cache is not None:
                    denoiser_of(pipe).enable_cache(variant.cache())  # attnctl first, the cache second
                    cached = True
                    counter = _count_runs(pipe, row) if round_index == 0 else None
                _sync(device)
                start = clock()
                generate(variant)  # a fresh handle's first call
                _sync(device)
                first[name].append(clock() - start)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = clock()
                out = generate(variant)
                _sync(device)
                elapsed = clock() - start
                if cuda:
                    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                if counter is not None:
                    counter.remove()
                    counter = None
                if round_index == 0:
                    latents[name] = out.detach().float().cpu()
                    report = handle.outputs.get("fastattn") if handle is not None else None
                    if report is not None:
                        row.attention_saved = float(report.full_flops() - report.flops())
                        row.backends = sorted({used for used, _ in handle.runtime.backend_log.values()})
                    # compiled flex cannot run under FlopCounterMode (a dispatch mode): with --backend flex only
                    # stock's FLOPs are counted (the FLOP bound needs only those)
                    if not args.no_flops and (variant.controls is None or args.backend != "flex"):
                        row.flops = count_flops(functools.partial(generate, variant))
                else:
                    row.times_ms.append(elapsed * 1000)
            except Exception as error:  # noqa: BLE001 - report and go on with the other variants
                row.error = f"{type(error).__name__}: {str(error)[:300]}"
                if args.verbose:
                    traceback.print_exc()
            finally:
                if counter is not None:
                    counter.remove()
                if cached:
                    denoiser_of(pipe).disable_cache()
                if handle is not None:
                    handle.remove()
    stock = rows["stock"]
    stock_ms = statistics.median(stock.times_ms) if stock.times_ms else None
    stock_first = statistics.median(first["stock"][1:] or first["stock"]) if first["stock"] else None  # after warm-up
    for name, row in rows.items():
        if row.error or not row.times_ms:
            continue
        row.ms = statistics.median(row.times_ms)
        row.spread = (max(row.times_ms) - min(row.times_ms)) / row.ms if row.ms else None
        row.ratio = row.ms / stock_ms if stock_ms else None
        row.first_ratio = statistics.median(first[name][1:] or first[name]) / stock_first if stock_first else None
        if row.flops and stock.flops:
            row.flop_ratio = row.flops / stock.flops
        if row.attention_saved is not None and stock.flops:
            # what a block-sparse window kernel can save at best: FlopCounterMode counts a masked dense op in full
            row.flop_bound = stock.flops / max(1.0, stock.flops - row.attention_saved)
        if name in latents and "stock" in latents:
            row.bitwise = bool(torch.equal(latents[name], latents["stock"]))
            row.psnr = psnr(latents[name], latents["stock"])
    _print(model, steps, args, list(rows.values()))
    if cuda:
        _targets(model, steps, rows)
    elif model == "flux-cpu" and not args.tiny:
        _cpu_claim(rows, args.fbc_threshold)
    del generate, pipe  # free the denoiser before the next model is built
    if cuda:
        torch.cuda.empty_cache()
    return list(rows.values())


def _count_runs(pipe: Any, row: Row) -> Any:
    """Hooks counting the denoiser's calls and the last block's runs over both calls of the warm-up round."""
    denoiser, block = denoiser_of(pipe), _last_block(denoiser_of(pipe))
    row.denoiser_calls, row.last_block_runs = 0, 0

    def on_denoiser(*_):
        row.denoiser_calls += 1

    def on_block(*_):
        row.last_block_runs += 1

    handles = [denoiser.register_forward_pre_hook(on_denoiser)]
    attention = getattr(block, "attn", None) or getattr(block, "attn1", None)
    if attention is not None:  # the inner attention: a cached block returns without running it
        handles.append(attention.register_forward_pre_hook(on_block))

    class _Remove:
        def remove(self) -> None:
            for handle in handles:
                handle.remove()

    return _Remove()


def _print(model: str, steps: int, args: argparse.Namespace, rows: list[Row]) -> None:
    print(f"--- {model}: medians of {args.repeats} after a warm-up round; ratio = variant / stock (warm handle: second call); "
          "first = a fresh handle's first call")
    print(f"{'variant':28s} {'ms':>9s} {'spread':>7s} {'ratio':>7s} {'first':>7s} {'FLOPs':>7s} {'PSNR dB':>8s} {'bitwise':>7s} "
          f"{'peak GiB':>8s} {'cached':>9s}")
    for row in rows:
        if row.error:
            print(f"{row.variant:28s} FAILED {row.error}")
            continue
        def f(value, spec):
            return format(value, spec) if value is not None else "-"
        runs = f"{row.last_block_runs}/{row.denoiser_calls}" if row.denoiser_calls else "-"
        print(f"{row.variant:28s} {f(row.ms, '9.1f')} {f(row.spread, '7.3f')} {f(row.ratio, '7.3f')} {f(row.first_ratio, '7.3f')} "
              f"{f(row.flop_ratio, '7.3f')} {f(row.psnr, '8.1f')} {str(row.bitwise):>7s} {f(row.peak_gib, '8.2f')} {runs:>9s}")
        if row.flop_bound is not None:
            speedup = 1 / row.ratio if row.ratio else None
            share = f", {speedup / row.flop_bound:.2f} of it" if speedup else ""
            print(f"{'':28s} speed-up {f(speedup, '.3f')} beside its FLOP bound {row.flop_bound:.3f}{share} (stock FLOPs / "
                  f"(stock - {row.attention_saved:.3e} attention FLOPs the window skips)); backends {', '.join(row.backends or [])}")
    sys.stdout.flush()


def _cpu_claim(rows: dict[str, Row], threshold: float) -> None:
    """Issue 17's "control for free" with a block cache, judged on the CPU config where no GPU is available: cff+fbc
    (and cff(trim)+fbc) no slower than stock, at the benchmark's FirstBlockCache threshold; the rows at other
    thresholds (@T) are printed beside it, not judged."""
    for name in ("cff+fbc", "cff(trim)+fbc"):
        row = rows.get(name)
        if row is None or row.ratio is None:
            continue
        alone = rows.get("stock+fbc")
        skipped = (f"FirstBlockCache alone x{alone.ratio:.3f}, last block ran in {alone.last_block_runs}/{alone.denoiser_calls} calls"
                   if alone is not None and alone.ratio is not None and alone.denoiser_calls else "FirstBlockCache alone not run")
        print(f"CPU {'PASS' if row.ratio <= 1.0 else 'FAIL'} flux-cpu {name} at threshold {threshold:g}: x{row.ratio:.3f} <= 1.0 "
              f"(FLOP ratio {row.flop_ratio if row.flop_ratio is not None else float('nan'):.3f}; {skipped})")


def _targets(model: str, steps: int, rows: dict[str, Row]) -> None:
    """The issue's targets (judged on an H100 / H200 with backend auto) as PASS / FAIL lines."""
    family = FAMILY[model]

    def check(name: str, ok: bool | None, detail: str) -> None:
        print(f"{'PASS' if ok else ('FAIL' if ok is not None else 'N/A ')} {model} {name}: {detail}")

    def ratio(name: str) -> float | None:
        row = rows.get(name)
        return row.ratio if row is not None and row.ratio is not None else None

    for name, limit in (("apply[]", 1.01), ("reweight", 1.02), ("maps", 1.08)):
        r = ratio(name)
        if r is not None:
            check(name, r <= limit, f"x{r:.3f} <= {limit}")
    for name, limit in (("regions", 1.08), ("regions+isolate", 1.12)):
        r = ratio(name)
        if r is None:
            continue
        if family == "unet":
            check(name, r <= limit, f"x{r:.3f} <= {limit}")
        elif rows[name].flop_ratio is not None:
            bound = 1.05 * rows[name].flop_ratio
            check(name, r <= bound, f"x{r:.3f} <= 1.05 x FLOP ratio {rows[name].flop_ratio:.3f} = {bound:.3f}")
    r = ratio("pag")
    if r is not None and rows["pag"].flop_ratio is not None:
        bound = 1.05 * rows["pag"].flop_ratio
        check("pag", r <= bound, f"x{r:.3f} <= 1.05 x FLOP ratio {rows['pag'].flop_ratio:.3f} = {bound:.3f}")
    tgate = next((n for n in rows if n.startswith("tgate(")), None)
    if tgate and ratio(tgate) is not None and rows.get("stock-nocfg") and rows["stock-nocfg"].ms:
        gate = int(tgate.split("g=")[1].split("/")[0])
        t_cfg, t_nocfg = rows["stock"].ms, rows["stock-nocfg"].ms
        bound = t_cfg / ((gate / steps) * t_cfg + (1 - gate / steps) * t_nocfg)
        speedup = 1 / ratio(tgate)
        check(tgate, speedup >= 0.95 * bound, f"speed-up {speedup:.3f} >= 0.95 x B {bound:.3f} = {0.95 * bound:.3f} "
              f"(T_cfg {t_cfg:.1f} ms, T_nocfg {t_nocfg:.1f} ms)")
    r = ratio("tome0.5")
    if r is not None and rows["tome0.5"].flops and rows["stock"].flops:
        bound = rows["stock"].flops / rows["tome0.5"].flops
        check("tome0.5", 1 / r >= 0.8 * bound and r <= 1.0, f"speed-up {1 / r:.3f} >= 0.8 x FLOP bound {bound:.3f} and x{r:.3f} <= 1")
    for name, row in rows.items():
        if row.flop_bound is not None and row.ratio:
            check(name, 1 / row.ratio >= 0.8 * row.flop_bound,
                  f"speed-up {1 / row.ratio:.3f} >= 0.8 x FLOP bound {row.flop_bound:.3f} = {0.8 * row.flop_bound:.3f}")
    r = ratio("control-for-free")
    if r is not None and model == "sdxl":
        check("control-for-free", r <= 1.0, f"x{r:.3f} <= 1.0 (Reweight + Regions + PAG(steps=(0, 0.4)) + TGate(40%))")
    r = ratio("cff+fbc")
    if r is not None:
        alone = ratio("stock+fbc")
        check("cff+fbc", r <= 1.0, f"x{r:.3f} <= 1.0 (Reweight + Regions + PAG(steps=(0, 0.4)) + FirstBlockCache; "
              f"FirstBlockCache alone x{alone:.3f})" if alone is not None else f"x{r:.3f} <= 1.0")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl,flux", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--variants", default="", help="comma-separated variant names (stock always runs; a name no model has stops the run, listing the "
                             "known names, before any model is built)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the UNet and SD3.5 models")
    parser.add_argument("--flux-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tiny", "--quick", dest="tiny", action="store_true",
                        help="CPU-size configs (attnctl.testing): a smoke test, not timed (--quick: the same)")
    parser.add_argument("--fbc-threshold", type=float, default=0.12, help="FirstBlockCache threshold of the *fbc variants")
    parser.add_argument("--fbc-extra-thresholds", default="",
                        help="comma-separated: also stock+fbc@T, cff+fbc@T (and cff(trim)+fbc@T) at these thresholds, as extra rows")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="what is timed on CPU: wall time, or the process's CPU time (steadier on a shared machine)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    import diffusers

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "no GPU"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {args.device} ({gpu})")
    if not args.device.startswith("cuda"):
        print("not CUDA: no target is judged (the targets are GPU figures)")
    models = args.models.split(",")
    for model in models:
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    check_variants(models, args)  # before any model is built
    results: list[Row] = []
    for model in models:
        results.extend(run_model(model, args))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump([asdict(row) for row in results], handle, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
