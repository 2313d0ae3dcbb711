"""The controlled processor for Z-Image's single-stream attention (`ZSingleStreamAttnProcessor`).

One module type serves the image refiner (image tokens only), the caption refiner (text tokens only, not
controlled: no image queries) and the main layers, whose sequence is `[image; text]` per row. q and k get RMS
qk-norm per head and complex RoPE (`freqs_cis`); a 2-D (B, S) padding mask becomes (B, 1, 1, S). Without an
edit the op is diffusers' `dispatch_attention_fn` with the processor's backend, exactly as stock.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import ControlledProcessor


def _rotary(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(2)
        x_out = torch.view_as_real(x * freqs_cis).flatten(3)
        return x_out.type_as(x_in)


class ZImageProcessor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly.
    reproduces: ClassVar[tuple[str, ...]] = ("ZSingleStreamAttnProcessor",)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        edit, call, reused, hidden_states = self.begin(attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if edit is not None:  # query hooks see the image tokens only; in the main layers they come first
            image = call.geometry.image_len
            head = query[:, :image]
            hooked = self.query_hooks(call, edit, head)
            query = query if hooked is head else torch.cat([hooked, query[:, image:]], dim=1)
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = _rotary(query, freqs_cis)
            key = _rotary(key, freqs_cis)
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        if edit is None and self.stock_sdpa():
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        else:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            hidden_states = self.attention(call, edit, q, k, v, attention_mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return self.finish(call, edit, output)
