"""The controlled processors for Flux.2 attention: `Flux2AttnProcessor` (double-stream blocks) and
`Flux2ParallelSelfAttnProcessor` (single-stream blocks, attention and MLP from one fused projection).

Double-stream: image and text projections, per-stream RMS qk-norm, `[text; image]`, RoPE on the joint q and
k. Single-stream: `[text; image]` already concatenated; the fused `to_qkv_mlp_proj` output is split into q, k,
v and the MLP half, and `to_out` projects `[attention; MLP]`. Without an edit the op is diffusers'
`dispatch_attention_fn` with the processor's backend, exactly as stock (the split outputs are projected
without `.contiguous()`, as Flux.2's processor does); with an edit it goes to attnctl's backends.
The KV-cache processors (`Flux2KV*`, reference-image KV caching of Flux.2 klein-kv) are not reproduced.

Reference-image tokens (`Flux2KleinPipeline(image=...)`: `Geometry.reference_len` tokens after the generated
image's) are keys for every query, as stock, but never edited: with an edit, the controls see the text and generated
image queries (their per-key edits extended over the reference keys with no bias and a value scale of 1), and the
reference queries attend as stock.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import CallLayoutError
from .base import ControlledProcessor
from .edit import Edit
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

        edit, call, reused, hidden_states = self._begin(attn, hidden_states, encoder_hidden_states)
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
        edit, call, reused, hidden_states = self._begin(attn, hidden_states, None)
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
            references = call.geometry.reference_len if call is not None else 0
            if references:
                own = self.attention(call, _over_references(edit, references, k.shape[2]), q[:, :, :-references], k, v, attention_mask)
                rest = self.plain_attention(q[:, :, -references:], k, v, _query_rows(attention_mask, -references))
                hidden_states = torch.cat([own, rest.to(own.dtype)], dim=2).transpose(1, 2)
            else:
                hidden_states = self.attention(call, edit, q, k, v, attention_mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        return hidden_states.to(query.dtype)

    def _begin(self, attn: Any, hidden_states: torch.Tensor, context: Any) -> tuple[Any, Any, Any, torch.Tensor]:
        """`begin` on the tokens controls see: without the reference-image tokens at the end of `hidden_states`."""
        frame = getattr(self.runtime, "frame", None)
        references = frame.canvas.reference_len if frame is not None else 0
        if not references:
            return self.begin(attn, hidden_states, context)
        own = hidden_states[:, : hidden_states.shape[1] - references]
        edit, call, reused, seen = self.begin(attn, own, context)
        if seen is not own:
            hidden_states = torch.cat([seen, hidden_states[:, own.shape[1] :]], dim=1)
        return edit, call, reused, hidden_states


def _over_references(edit: Any, references: int, keys: int) -> Any:
    """`edit` for queries that also see `references` reference keys after the layer's own: per-key edits extended with
    no bias and a value scale of 1; label masks and windows are defined over the layer's own tokens only."""
    spec = edit.kernel
    if spec.labels is not None or spec.window is not None:
        raise CallLayoutError(
            "attnctl: label masks (Regions) and windows (FastAttn) are not defined over reference-image tokens "
            "(Flux2KleinPipeline(image=...)); run those controls without reference images"
        )
    changes = {}
    for name, fill in (("key_bias", 0.0), ("value_scale", 1.0)):
        value = getattr(spec, name)
        if value is not None and value.shape[-1] == keys - references:  # over the layer's own keys: extended
            changes[name] = F.pad(value, (0, references), value=fill)
    if not changes:
        return edit
    return Edit(kernel=dataclasses.replace(spec, **changes), hooks=edit.hooks)


def _query_rows(mask: torch.Tensor | None, start: int) -> torch.Tensor | None:
    """A model mask restricted to the query rows from `start` (a mask over keys only is kept as it is)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:, :]
