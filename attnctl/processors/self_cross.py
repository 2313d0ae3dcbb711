"""The controlled processor for diffusers' `Attention` with SDPA processors: UNet (SD, SDXL) and PixArt.

It reproduces `AttnProcessor2_0`, `FusedAttnProcessor2_0` (fused projections) and
`IPAdapterAttnProcessor2_0` (the IP-Adapter branch is computed from the original processor's own
weights) operation for operation, and sends the attention op through attnctl's backends.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import ControlledProcessor


class SelfCrossAttnProcessor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly.
    reproduces: ClassVar[tuple[str, ...]] = ("AttnProcessor2_0", "FusedAttnProcessor2_0", "IPAdapterAttnProcessor2_0")

    def _fused(self) -> bool:
        """Whether the stock processor projects with the fused weights: FusedAttnProcessor2_0 does, whatever the
        module's flag (`unfuse_qkv_projections` on a pipeline leaves `fused_projections` set and puts back
        AttnProcessor2_0, which reads to_q / to_k / to_v)."""
        return type(self.original).__name__ == "FusedAttnProcessor2_0"

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        ip_adapter_masks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.inert:
            extra = {} if ip_adapter_masks is None else {"ip_adapter_masks": ip_adapter_masks}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **extra, **kwargs)
        ip_hidden_states = None
        if type(self.original).__name__ == "IPAdapterAttnProcessor2_0" and encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, tuple):
                encoder_hidden_states, ip_hidden_states = encoder_hidden_states
            else:
                end = encoder_hidden_states.shape[1] - self.original.num_tokens[0]
                encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end, :], [encoder_hidden_states[:, end:, :]]

        edit, call, reused, hidden_states = self.begin(attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self._fused() and encoder_hidden_states is None:
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
            query = self.query_hooks(call, edit, query)
        else:
            query = self.query_hooks(call, edit, attn.to_q(hidden_states))
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if self._fused():
                kv = attn.to_kv(encoder_hidden_states)
                key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if ip_hidden_states is None:  # IPAdapterAttnProcessor2_0 applies no qk-norm; mirror it
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

        hidden_states = self.attention(call, edit, query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if ip_hidden_states is not None:
            hidden_states = self._ip_adapter(attn, query, hidden_states, ip_hidden_states, ip_adapter_masks, batch_size, head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return self.finish(call, edit, hidden_states)

    def project_queries(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        if self._fused():
            q = attn.to_qkv(hidden)[..., : attn.to_qkv.out_features // 3]
        else:
            q = attn.to_q(hidden)
        q = q.view(hidden.shape[0], -1, attn.heads, q.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None and not self._ip_adapter_layer():
            q = attn.norm_q(q)
        return q

    def project_context(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if self._fused():
            kv = attn.to_kv(context)
            key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(context.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(context.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None and not self._ip_adapter_layer():
            key = attn.norm_k(key)
        return key, value

    def _ip_adapter_layer(self) -> bool:
        """IP-Adapter's stock processor applies no qk-norm; mirrored."""
        return type(self.original).__name__ == "IPAdapterAttnProcessor2_0"

    def _ip_adapter(self, attn, query, hidden_states, ip_hidden_states, ip_adapter_masks, batch_size, head_dim):
        """The IP-Adapter branch of `IPAdapterAttnProcessor2_0`, with the original processor's weights."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        ip = self.original  # its weights are this processor's children (`make_processor`): they follow `.to()`
        if ip_adapter_masks is not None:
            if not isinstance(ip_adapter_masks, list):
                ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
            if not (len(ip_adapter_masks) == len(ip.scale) == len(ip_hidden_states)):
                raise ValueError(
                    f"Length of ip_adapter_masks array ({len(ip_adapter_masks)}) must match length of self.scale array "
                    f"({len(ip.scale)}) and number of ip_hidden_states ({len(ip_hidden_states)})"
                )
        else:
            ip_adapter_masks = [None] * len(ip.scale)
        for states, scale, to_k_ip, to_v_ip, mask in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip, ip_adapter_masks):
            if (all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0):
                continue
            if mask is not None:
                scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
                for i in range(mask.shape[1]):
                    ip_out = self._ip_attend(attn, query, to_k_ip(states[:, i, :, :]), to_v_ip(states[:, i, :, :]), batch_size, head_dim)
                    down = IPAdapterMaskProcessor.downsample(mask[:, i, :, :], batch_size, ip_out.shape[1], ip_out.shape[2])
                    hidden_states = hidden_states + scales[i] * (ip_out * down.to(dtype=query.dtype, device=query.device))
            else:
                ip_out = self._ip_attend(attn, query, to_k_ip(states), to_v_ip(states), batch_size, head_dim)
                hidden_states = hidden_states + scale * ip_out
        return hidden_states

    @staticmethod
    def _ip_attend(attn, query, ip_key, ip_value, batch_size, head_dim):
        ip_key = ip_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = ip_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
