"""The controlled processor for Wan's attention (`WanAttnProcessor`, and its deprecated alias `WanAttnProcessor2_0`).

`attn1` is self-attention over the video's (frames x height x width) tokens with 3-D RoPE; `attn2` is
cross-attention to the umT5 tokens (plus, in image-to-video models, a separate attention to CLIP image tokens
whose output is added). qk-norm runs on the projected q and k before the heads are split, as stock. Without an
edit the op is diffusers' `dispatch_attention_fn` with the processor's backend, exactly as stock; with an edit
the text / self attention goes to attnctl's backends (the I2V image-token attention stays stock).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import ControlledProcessor

#: Text positions of Wan's I2V cross-attention context: the stock processor takes the last 512 as text.
WAN_TEXT_CONTEXT = 512


def _rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanProcessor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly.
    reproduces: ClassVar[tuple[str, ...]] = ("WanAttnProcessor", "WanAttnProcessor2_0")

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

        edit, call, reused, hidden_states = self.begin(attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = self.query_hooks(call, edit, query)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotary(query, *rotary_emb)
            key = _rotary(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        if edit is None and self.stock_sdpa():
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                parallel_config=(self._parallel_config if encoder_hidden_states is None else None),
            )
        else:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            hidden_states = self.attention(call, edit, q, k, v, attention_mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return self.finish(call, edit, hidden_states)

    def project_queries(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, _, _ = _get_qkv_projections(attn, hidden, None)
        return attn.norm_q(query).unflatten(2, (attn.heads, -1)).transpose(1, 2)

    def project_context(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.add_k_proj is not None:
            context = context[:, context.shape[1] - WAN_TEXT_CONTEXT :]
        if getattr(attn, "fused_projections", False):
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        key = attn.norm_k(key)
        return key.unflatten(2, (attn.heads, -1)).transpose(1, 2), value.unflatten(2, (attn.heads, -1)).transpose(1, 2)
