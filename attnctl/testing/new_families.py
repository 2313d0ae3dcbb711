"""Tiny offline pipelines of the newer families (issue #19): `tiny-chroma`, `tiny-qwenimage`, `tiny-zimage`,
`tiny-flux2`, `tiny-wan`.

Built from configs with random weights, deterministic from their seed, generating a 2-step 32x32 image in
well under a second on a CPU. Their classes appeared after diffusers 0.35, the oldest supported diffusers:
`available(name)` says whether the installed diffusers has a fixture's classes.
"""

from __future__ import annotations

from typing import Any

import torch

from .components import _t5_encoder, _vae
from .tokenizers import tiny_t5_tokenizer

#: The diffusers classes each fixture needs (absent from older diffusers releases).
REQUIRES: dict[str, tuple[str, ...]] = {
    "tiny-chroma": ("ChromaPipeline", "ChromaTransformer2DModel"),
    "tiny-qwenimage": ("QwenImagePipeline", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
}
NEW_TINY_MODELS: tuple[str, ...] = tuple(REQUIRES)

NEW_CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-chroma": {"height": 32, "width": 32, "max_sequence_length": 32},
    # true CFG needs a negative prompt (QwenImagePipeline runs it when true_cfg_scale > 1 and one is given)
    "tiny-qwenimage": {"height": 32, "width": 32, "negative_prompt": "", "true_cfg_scale": 4.0},
}


def available(name: str) -> bool:
    """Whether the installed diffusers has the classes of the tiny model `name`."""
    import diffusers

    return all(hasattr(diffusers, cls) for cls in REQUIRES[name])


def tiny_chroma(seed: int = 0):
    """Chroma-like: 1 double block ([text; image]) and 2 single blocks, RoPE, T5 only (with its padding mask),
    2x2 packed latents, true CFG as two calls."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(latent_channels=1, seed=seed + 1, flow=True),
        text_encoder=_t5_encoder(seed=seed + 3), tokenizer=tiny_t5_tokenizer(), transformer=transformer,
    )


def _qwen_vl_encoder(seed: int = 0):
    """A tiny Qwen2.5-VL (2 text layers, M-RoPE; a 1-layer vision tower the pipeline never calls for text)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .qwen_tokenizer import qwen_vocab_size

    torch.manual_seed(seed)
    vocab = qwen_vocab_size()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32, "patch_size": 2,
            "spatial_merge_size": 1, "temporal_patch_size": 1, "window_size": 8, "fullatt_block_indexes": [0],
        },
        vocab_size=vocab, hidden_size=32,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage(seed: int = 0):
    """Qwen-Image-like: 2 double-stream blocks (joint `[text; image]`, text padding mask, separate RoPE), 2x2 packed
    latents of a 1-level Qwen-Image VAE, true CFG as cond / uncond calls.

    Text encoder: a tiny random Qwen2.5-VL with an offline byte-level BPE `Qwen2Tokenizer`
    (`qwen_tokenizer.py`) whose words are single tokens. The pipeline drops the chat template's prefix from the
    embeddings by a token count (`prompt_template_encode_start_idx`, 34 with the real tokenizer); it is set here to
    the prefix's length under the tiny tokenizer, so the prompt's tokens come first as with the real model.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from .qwen_tokenizer import tiny_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False], latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_qwen_vl_encoder(seed + 2),
        tokenizer=tiny_qwen_tokenizer(), transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix).input_ids)
    return pipe


NEW_BUILDERS = {"tiny-chroma": tiny_chroma, "tiny-qwenimage": tiny_qwenimage}
