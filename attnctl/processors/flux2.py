"""The controlled processors for Flux.2 attention: `Flux2AttnProcessor` (double-stream blocks) and
`Flux2ParallelSelfAttnProcessor` (single-stream blocks, attention and MLP from one fused projection).

Double-stream: image and text projections, per-stream RMS qk-norm, `[text; image]`, RoPE on the joint q and
k. Single-stream: `[text; image]` already concatenated; the fused `to_qkv_mlp_proj` output is split into q, k,
v and the MLP half, and `to_out` projects `[attention; MLP]`. Without an edit the op is diffusers'
`dispatch_attention_fn` with the processor's backend, exactly as stock (the split outputs are projected
without `.contiguous()`, as Flux.2's processor does); with an edit it goes to attnctl's backends.
The KV-cache processors (`Flux2KV*`, reference-image KV caching of Flux.2 klein-kv) are not reproduced.

Reference-image tokens (`Flux2KleinPipeline(image=...)`: `Geometry.reference_len` tokens after the generated
image's) are keys for every query, as stock, but never edited (`references.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from . import references
from .base import ControlledProcessor
from .flux import text_first


class Flux2Processor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly (one class per Flux.2 attention module type).
    reproduces: ClassVar[tuple[str, ...]] = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if type(self.original).__name__ == "Flux2ParallelSelfAttnProcessor":
            return self._parallel(attn, hidden_states, *args, **kwargs)
        return self._double(attn, hidden_states, *args, **kwargs)

    def _double(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        edit, call, reused, hidden_states = references.begin(self, attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        if edit is not None:  # query hooks see the generated image's tokens only
            image = call.geometry.image_len
            head = query[:, :image]
            hooked = self.query_hooks(call, edit, head)
            query = query if hooked is head else torch.cat([hooked, query[:, image:]], dim=1)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            query, key, value = text_first(attn, (query, key, value), (encoder_query, encoder_key, encoder_value))
        hidden_states = self._attend(call, edit, query, key, value, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        result = (hidden_states, encoder_hidden_states) if encoder_hidden_states is not None else hidden_states
        return self.finish(call, edit, result)

    def _parallel(
        self, attn: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
    ) -> Any:
        edit, call, reused, hidden_states = references.begin(self, attn, hidden_states, None)
        if reused is not None:
            return reused
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        if edit is not None:  # query hooks see the generated image's tokens only; the text comes first
            text, end = call.geometry.text_len, call.geometry.query_len
            tail = query[:, text:end]
            image = self.query_hooks(call, edit, tail)
            query = query if image is tail else torch.cat([query[:, :text], image, query[:, end:]], dim=1)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        hidden_states = self._attend(call, edit, query, key, value, attention_mask, image_rotary_emb)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        hidden_states = attn.to_out(hidden_states)
        return self.finish(call, edit, hidden_states)

    def _attend(self, call, edit, query, key, value, attention_mask, image_rotary_emb) -> torch.Tensor:
        """RoPE, then the attention op: (B, S, H, D) in, (B, S, H * D) out in the query's dtype."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if edit is None and self.stock_sdpa():
            options: dict[str, Any] = {"backend": self._attention_backend, "parallel_config": self._parallel_config}
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, **options)
        else:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            hidden_states = references.attend(self, call, edit, q, k, v, attention_mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        return hidden_states.to(query.dtype)
