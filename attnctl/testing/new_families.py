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
}
NEW_TINY_MODELS: tuple[str, ...] = tuple(REQUIRES)

NEW_CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-chroma": {"height": 32, "width": 32, "max_sequence_length": 32},
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


NEW_BUILDERS = {"tiny-chroma": tiny_chroma}
