"""The controlled processor for SD3's joint attention (`JointAttnProcessor2_0`, `FusedJointAttnProcessor2_0`).

Token order is `[image; text]`. qk-norm is applied per stream as the stock processor does (SD3.5). The
fused stock processor applies no qk-norm at all; it is mirrored as it is, so outputs stay bitwise equal
to stock. SD3.5-M's image-only `attn2` uses the same processor without text.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import ControlledProcessor


def _heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


class JointAttnProcessor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly.
    reproduces: ClassVar[tuple[str, ...]] = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if self.inert:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        edit, call, reused, hidden_states = self.begin(attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        fused = type(self.original).__name__ == "FusedJointAttnProcessor2_0"

        if fused:
            query, key, value = torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = self.query_hooks(call, edit, query)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim) for t in (query, key, value))
        if not fused:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            if fused:
                ctx_q, ctx_k, ctx_v = torch.split(attn.to_added_qkv(encoder_hidden_states), attn.to_added_qkv.out_features // 3, dim=-1)
            else:
                ctx_q = attn.add_q_proj(encoder_hidden_states)
                ctx_k = attn.add_k_proj(encoder_hidden_states)
                ctx_v = attn.add_v_proj(encoder_hidden_states)
            ctx_q, ctx_k, ctx_v = (_heads(t, batch_size, attn.heads, head_dim) for t in (ctx_q, ctx_k, ctx_v))
            if not fused:
                if attn.norm_added_q is not None:
                    ctx_q = attn.norm_added_q(ctx_q)
                if attn.norm_added_k is not None:
                    ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        hidden_states = self.attention(call, edit, query, key, value, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        result = (hidden_states, encoder_hidden_states) if encoder_hidden_states is not None else hidden_states
        return self.finish(call, edit, result)

    def project_queries(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        fused = type(self.original).__name__ == "FusedJointAttnProcessor2_0"
        q = attn.to_qkv(hidden)[..., : attn.to_qkv.out_features // 3] if fused else attn.to_q(hidden)
        q = _heads(q, hidden.shape[0], attn.heads, q.shape[-1] // attn.heads)
        if not fused and attn.norm_q is not None:
            q = attn.norm_q(q)
        return q
