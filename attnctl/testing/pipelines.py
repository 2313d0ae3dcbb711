"""Tiny offline pipelines built from configs with random weights: the test fixtures and the embedded
default models of the examples (`tiny-sd`, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`, `tiny-pixart`).

Each is deterministic from its seed and generates a 2-step 32x32 image in well under a second on a CPU.
Their tokenizers hold the words of `attnctl.testing.WORDS` as single tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from .components import _clip_text_encoder, _t5_encoder, _vae
from .tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

TINY_MODELS: tuple[str, ...] = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart")

#: Keyword arguments every call of a tiny pipeline needs (PixArt's resolution binning expects real sizes).
CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-sd": {"height": 32, "width": 32},
    "tiny-sdxl": {"height": 32, "width": 32},
    "tiny-sd3": {"height": 32, "width": 32},
    "tiny-flux": {"height": 32, "width": 32, "max_sequence_length": 32},
    "tiny-pixart": {"height": 32, "width": 32, "use_resolution_binning": False, "max_sequence_length": 32, "clean_caption": False},
}


def tiny_sd(seed: int = 0):
    """SD 1.x-like: UNet with cross-attention at levels 0 and 1 (4 self + 4 cross layers), DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=_vae(seed=seed + 1), text_encoder=_clip_text_encoder(seed=seed + 2), tokenizer=tiny_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0):
    """SDXL-like: two CLIP encoders (channels concatenated), text-time conditioning, attention from level 1 on."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=8 * 6 + 32, cross_attention_dim=64,
        norm_num_groups=4,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_vae(seed=seed + 1), text_encoder=_clip_text_encoder(seed=seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(projection=32, seed=seed + 3), tokenizer_2=tiny_clip_tokenizer(pad_token="!"),
        unet=unet, scheduler=scheduler, image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
    )


def tiny_sd3(seed: int = 0, *, t5: bool = True, qk_norm: str | None = None, dual_attention_layers: tuple[int, ...] = ()):
    """SD3-like: 2 joint blocks ([image; text], CLIP 77 + T5 tokens); `qk_norm="rms_norm"` and dual layers as SD3.5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4, qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed=seed + 1, flow=True),
        text_encoder=_clip_text_encoder(hidden=16, projection=16, seed=seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(hidden=16, projection=16, seed=seed + 3), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed=seed + 4) if t5 else None, tokenizer_3=tiny_t5_tokenizer() if t5 else None,
    )


def tiny_flux(seed: int = 0):
    """Flux-like: 1 double block ([text; image]) and 2 single blocks, RoPE, T5 text tokens, 2x2 packed latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(latent_channels=1, seed=seed + 1, flow=True),
        text_encoder=_clip_text_encoder(seed=seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed=seed + 3), tokenizer_2=tiny_t5_tokenizer(), transformer=transformer,
    )


def tiny_pixart(seed: int = 0):
    """PixArt-Sigma-like: 2 blocks of self-attention and cross-attention to T5 tokens (with padding mask)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tiny_t5_tokenizer(), text_encoder=_t5_encoder(seed=seed + 2), vae=_vae(seed=seed + 1),
        transformer=transformer, scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_sd_controlnet(base: Any, seed: int = 0):
    """A `StableDiffusionControlNetPipeline` on the components of `base` (a tiny-sd pipeline) with a ControlNet made
    from its UNet (`ControlNetModel.from_unet`), whose zero-initialised convolutions get random weights from `seed` so
    that its residuals are not zero. Call it with `image=` a (1, 3, 32, 32) tensor in [0, 1]."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without moving the caller's global generator
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet.eval(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_BUILDERS = {"tiny-sd": tiny_sd, "tiny-sdxl": tiny_sdxl, "tiny-sd3": tiny_sd3, "tiny-flux": tiny_flux, "tiny-pixart": tiny_pixart}


def make_tiny_pipeline(name: str, seed: int = 0, **options: Any):
    """Build one of `TINY_MODELS` or `NEW_TINY_MODELS` (random weights from `seed`; offline)."""
    builders = {**_BUILDERS, **NEW_BUILDERS}
    if name not in builders:
        from ..errors import ConfigError

        raise ConfigError(f"unknown tiny model {name!r}; available: {', '.join(TINY_MODELS + NEW_TINY_MODELS)}")
    pipe = builders[name](seed, **options)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(_name_or_path=name)  # `pipe.name_or_path`: its call defaults are found by it (CALL_DEFAULTS)
    return pipe


# The newer families (issue #19) live in their own module; their call defaults join CALL_DEFAULTS.
from .new_families import NEW_BUILDERS, NEW_CALL_DEFAULTS, NEW_TINY_MODELS  # noqa: E402

CALL_DEFAULTS.update(NEW_CALL_DEFAULTS)
