"""The controlled processor for Z-Image's single-stream attention (`ZSingleStreamAttnProcessor`).

One module type serves the image refiner (image tokens only), the caption refiner (text tokens only, not
controlled: no image queries) and the main layers, whose sequence is `[image; text]` per row. q and k get RMS
qk-norm per head and complex RoPE (`freqs_cis`); a 2-D (B, S) padding mask becomes (B, 1, 1, S). Without an
edit the op is diffusers' `dispatch_attention_fn` with the processor's backend, exactly as stock.

An image whose token count is not a multiple of 32 is followed by `Canvas.image_pad` padding tokens (a learned
token attention sees) in the image refiner and in the main layers, where they sit between the image and the text.
With an edit they are moved behind the layer's own tokens, `[image; text; padding]`: the controls see `[image; text]`
as in an unpadded call, and the padding is handled as reference-image tokens are (`references.py`): keys for every
query with no per-key change, queries attending as stock. The order is put back on the output.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch

from ..kernels.spec import kept_tensors, version
from . import references
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

        edit = self.lookup_edit()
        image, pad, short = _image_padding(self, hidden_states) if edit is not None else (0, 0, 0)
        if short:  # rows of the call run by themselves, whose captions pad shorter than the call's longest: as in the call
            hidden_states, freqs_cis, attention_mask = _batch_padding(hidden_states, freqs_cis, attention_mask, short)
        if pad:  # [image; padding; text] -> [image; text; padding]: the controls see the first two
            hidden_states = _padding_last(hidden_states, 1, image, pad)
            own = hidden_states[:, :-pad]
            edit, call, reused, seen = self.begin_edit(edit, attn, own, encoder_hidden_states)
            if seen is not own:
                hidden_states = torch.cat([seen, hidden_states[:, -pad:]], dim=1)
            if freqs_cis is not None:
                freqs_cis = _shared_padding_last(freqs_cis, 1, image, pad)
            if attention_mask is not None:
                attention_mask = _shared_padding_last(attention_mask, attention_mask.ndim - 1, image, pad)
        else:
            edit, call, reused, hidden_states = self.begin_edit(edit, attn, hidden_states, encoder_hidden_states)
        if reused is not None:
            return reused
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if edit is not None:  # query hooks see the image tokens only; in the main layers they come first
            length = call.geometry.image_len
            head = query[:, :length]
            hooked = self.query_hooks(call, edit, head)
            query = query if hooked is head else torch.cat([hooked, query[:, length:]], dim=1)
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
            hidden_states = references.attend(self, call, edit, q, k, v, attention_mask, pad).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        output = self.finish(call, edit, output)
        if pad:  # the stock order back: [image; padding; text]
            output = torch.cat([output[:, :image], output[:, -pad:], output[:, image:-pad]], dim=1)
        if short:
            output = output[:, : output.shape[1] - short]
        return output


def _image_padding(processor: ControlledProcessor, hidden: torch.Tensor) -> tuple[int, int, int]:
    """(image tokens, padding tokens after them, tokens `hidden` lacks) of the Z-Image call in progress ((0, 0, 0)
    outside a call). A call of some of the rows by themselves (PAG / SEG `separate=True`: the cond rows) is padded to
    its own longest caption; when that is shorter than the pipeline call's (a negative prompt longer than every
    prompt), the missing positions are the ones the call's attention mask hides for those rows."""
    frame = getattr(processor.runtime, "frame", None)
    if frame is None:
        return 0, 0, 0
    canvas = frame.layer_canvas()
    image = canvas.token_hw[0] * canvas.token_hw[1]
    expected = image + canvas.image_pad + (canvas.text_len if processor.layer.concatenated else 0)
    return image, canvas.image_pad, max(expected - int(hidden.shape[1]), 0)


def _batch_padding(
    hidden: torch.Tensor, freqs_cis: torch.Tensor | None, mask: torch.Tensor | None, short: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`short` positions appended as the transformer pads a shorter row in a batch: zero tokens, zero rotations, and
    masked as keys (their queries' outputs are dropped), so the other tokens' attention is unchanged."""
    found = hidden.shape[1]
    hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], short, hidden.shape[2])], dim=1)
    if freqs_cis is not None:
        freqs_cis = torch.cat([freqs_cis, freqs_cis.new_zeros(freqs_cis.shape[0], short, *freqs_cis.shape[2:])], dim=1)
    if mask is None:
        mask = torch.ones(hidden.shape[0], found, dtype=torch.bool, device=hidden.device)
    extra = mask.new_zeros(*mask.shape[:-1], short)
    return hidden, freqs_cis, torch.cat([mask, extra], dim=-1)


def _padding_last(tensor: torch.Tensor, dim: int, image: int, pad: int) -> torch.Tensor:
    """`tensor` with the `pad` positions after the first `image` along `dim` moved to the end."""
    rest = tensor.shape[dim] - image - pad
    return torch.cat([tensor.narrow(dim, 0, image), tensor.narrow(dim, image + pad, rest), tensor.narrow(dim, image, pad)], dim=dim)


#: RoPE tables and masks re-ordered, by tensor: every layer of a forward gets the same ones (made once, not per layer).
_SHARED: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
_SHARED_SIZE = 4


def _shared_padding_last(tensor: torch.Tensor, dim: int, image: int, pad: int) -> torch.Tensor:
    """`_padding_last` of a tensor every layer of a forward shares (the RoPE table, the attention mask), made once per
    tensor (and in-place version); in a traced graph, made there."""
    if torch.compiler.is_compiling():
        return _padding_last(tensor, dim, image, pad)
    key = (id(tensor), version(tensor), dim, image, pad)
    found = _SHARED.get(key)
    if found is not None and found[0]() is tensor:
        return found[1]
    if len(_SHARED) >= _SHARED_SIZE:
        _SHARED.pop(next(iter(_SHARED)))
    with kept_tensors():
        reordered = _padding_last(tensor, dim, image, pad)
    _SHARED[key] = (weakref.ref(tensor), reordered)
    return reordered
