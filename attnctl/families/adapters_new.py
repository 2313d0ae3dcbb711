"""Model adapters for the newer DiT families (issue #19): Chroma, Qwen-Image, Z-Image, Flux.2, Wan.

As in `adapters.py`, layers are discovered through the public `attn_processors` surface and classified by
their module path; a call's geometry comes from the call's own inputs (`img_ids`, `img_shapes`, the latent
shape), never from guessing on tensor shapes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .adapters import FluxAdapter


class ChromaAdapter(FluxAdapter):
    """`ChromaTransformer2DModel`: Flux's layout (double blocks `[text; image]`, single blocks with the text
    concatenated first, RoPE, 2x2 packed latents), T5 only, a text padding mask, true CFG as two calls."""

    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {
        "ChromaTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb", "attention_mask"),
        "ChromaSingleTransformerBlock": ("hidden_states", "temb", "attention_mask"),
    }
    text_stream_blocks: ClassVar[tuple[str, ...]] = ("ChromaTransformerBlock",)

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> ChromaAdapter:
        adapter = super().discover(denoiser)
        adapter.family = "chroma"
        adapter.batched_inputs = (
            "hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
            "controlnet_block_samples", "controlnet_single_block_samples",
        )
        return adapter

    def append_text(self, inputs: dict[str, Any], block: torch.Tensor, segments: int = 1) -> dict[str, Any]:
        """As Flux, and the `[text; image]` attention mask gets ones for the appended tokens."""
        changed = super().append_text(inputs, block, segments)
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            text = inputs["encoder_hidden_states"].shape[1]
            ones = torch.ones(mask.shape[0], block.shape[1], dtype=mask.dtype, device=mask.device)
            changed["attention_mask"] = torch.cat([mask[:, :text], ones, mask[:, text:]], dim=1)
        return changed
