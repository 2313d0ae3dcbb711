"""The controlled processor for Flux attention (`FluxAttnProcessor`, `FluxIPAdapterAttnProcessor`).

Double-stream blocks: text and image projections, per-stream RMS qk-norm, `[text; image]` concatenation,
RoPE on the joint q and k. Single-stream blocks receive `[text; image]` already concatenated. Without an
edit the op is diffusers' `dispatch_attention_fn` with the processor's `_attention_backend`, exactly as
stock; with an edit it goes to attnctl's backends in the (B, H, S, D) layout.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import ControlledProcessor


def _projections(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            return (query, key, value, *attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
        return query, key, value, None, None, None
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        return query, key, value, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states)
    return query, key, value, None, None, None


class FluxAttnProcessor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly.
    reproduces: ClassVar[tuple[str, ...]] = ("FluxAttnProcessor", "FluxIPAdapterAttnProcessor")

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> Any:
        if self.inert:
            extra = {k: v for k, v in (("ip_hidden_states", ip_hidden_states), ("ip_adapter_masks", ip_adapter_masks)) if v is not None}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        edit, call, reused, hidden_states = self.begin(attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        query, key, value, encoder_query, encoder_key, encoder_value = _projections(attn, hidden_states, encoder_hidden_states)
        projected = query
        if edit is not None:
            query = self._query_hooks_joint(call, edit, query)
        hooked = query is not projected
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        # the IP-Adapter's cross-attention to the image prompt reads the stock queries: a query transform (SEG's blur)
        # acts on the joint self-attention only, as on SD, where the IP branch is in the cross-attention layer
        ip_mode = type(self.original).__name__ == "FluxIPAdapterAttnProcessor"
        ip_query = attn.norm_q(projected.unflatten(-1, (-1, attn.head_dim))) if hooked and ip_mode else query

        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            query, key, value = text_first(attn, (query, key, value), (encoder_query, encoder_key, encoder_value))

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if edit is None and self.stock_sdpa():
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, **self._dispatch_options())
        else:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            hidden_states = self.attention(call, edit, q, k, v, attention_mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states if ip_mode else hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states if ip_mode else encoder_hidden_states.contiguous())
            if ip_mode:
                ip_out = self._ip_adapter(attn, ip_query, hidden_states, ip_hidden_states, dispatch_attention_fn)
                return self.finish(call, edit, (hidden_states, encoder_hidden_states, ip_out))
            return self.finish(call, edit, (hidden_states, encoder_hidden_states))
        return self.finish(call, edit, hidden_states)

    def _dispatch_options(self) -> dict[str, Any]:
        """backend= and, on diffusers versions whose processors have it, parallel_config=."""
        options: dict[str, Any] = {"backend": self._attention_backend}
        if hasattr(type(self.original), "_parallel_config"):
            options["parallel_config"] = self._parallel_config
        return options

    def _query_hooks_joint(self, call, edit, query: torch.Tensor) -> torch.Tensor:
        """Query hooks see image tokens only; in single blocks the text comes first and is left as it is."""
        if not self.layer.concatenated:
            return self.query_hooks(call, edit, query)
        text = call.geometry.text_len
        tail = query[:, text:]
        image = self.query_hooks(call, edit, tail)
        return query if image is tail else torch.cat([query[:, :text], image], dim=1)

    def _ip_adapter(self, attn, ip_query, hidden_states, ip_hidden_states, dispatch):
        ip = self.original  # its weights are this processor's children (`make_processor`): they follow `.to()`
        batch_size = hidden_states.shape[0]
        ip_out = torch.zeros_like(hidden_states)
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip):
            ip_key = to_k_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            current = dispatch(ip_query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False, **self._dispatch_options())
            ip_out += scale * current.reshape(batch_size, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
        return ip_out


def text_first(attn: Any, image: tuple[torch.Tensor, ...], text: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """q, k, v of a Flux-style double-stream block as (B, N, H, D): the text stream's projections split into heads
    and qk-normed with the added norms, then put before the image stream's (`[text; image]`), as the stock
    processors of Flux and Flux.2 do."""
    encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in text)
    encoder_query = attn.norm_added_q(encoder_query)
    encoder_key = attn.norm_added_k(encoder_key)
    return tuple(torch.cat([encoded, own], dim=1) for encoded, own in zip((encoder_query, encoder_key, encoder_value), image))
