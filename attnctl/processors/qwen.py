"""The controlled processor for Qwen-Image's double-stream joint attention (`QwenDoubleStreamAttnProcessor2_0`).

Image and text streams have their own projections and RMS qk-norms, get their own RoPE (`img_freqs`,
`txt_freqs`), and attend jointly as `[text; image]` with the text padding mask (`encoder_hidden_states_mask`).
The processor returns `(image, text)`. Without an edit the op is diffusers' `dispatch_attention_fn` with the
processor's backend, exactly as stock; with an edit it goes to attnctl's backends in the (B, H, S, D) layout.
The edit pipelines' reference-image tokens follow the generated image's and are never edited (`references.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from . import references
from .base import ControlledProcessor


class QwenDoubleStreamProcessor(ControlledProcessor):
    #: The stock processor classes this one reproduces exactly.
    reproduces: ClassVar[tuple[str, ...]] = ("QwenDoubleStreamAttnProcessor2_0",)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )
        edit, call, reused, hidden_states = references.begin(self, attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)
        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)
        if edit is not None:  # query hooks see the generated image's tokens only (reference tokens follow them)
            image = call.geometry.image_len
            head = img_query[:, :image]
            hooked = self.query_hooks(call, edit, head)
            img_query = img_query if hooked is head else torch.cat([hooked, img_query[:, image:]], dim=1)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))
        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        if edit is None and self.stock_sdpa():
            joint_hidden_states = dispatch_attention_fn(
                joint_query, joint_key, joint_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                **self._dispatch_options(),
            )
        else:
            q, k, v = (t.transpose(1, 2) for t in (joint_query, joint_key, joint_value))
            joint_hidden_states = references.attend(self, call, edit, q, k, v, attention_mask).transpose(1, 2)
        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return self.finish(call, edit, (img_attn_output, txt_attn_output))

    def _dispatch_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"backend": self._attention_backend}
        if hasattr(type(self.original), "_parallel_config"):
            options["parallel_config"] = self._parallel_config
        return options
