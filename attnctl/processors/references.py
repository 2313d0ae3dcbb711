"""Reference-image tokens in a joint sequence (Flux.2 klein `image=`, Qwen-Image Edit): `[text; image; references]`.

The references are keys for every query and their queries attend as stock; no control edits them. With an edit, a
processor hands the controls the text and generated-image tokens only (`begin`), and attends with the controls'
edit for those queries over every key (per-key edits extended over the reference keys with no bias and a value
scale of 1) and plainly for the reference queries (`attend`). `Geometry.reference_len` says how many there are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CallLayoutError
from .edit import Edit


def count(processor: Any) -> int:
    """The reference-image tokens of the denoiser call in progress (0 outside a call)."""
    frame = getattr(processor.runtime, "frame", None)
    return frame.layer_canvas().reference_len if frame is not None else 0


def begin(processor: Any, attn: Any, hidden_states: torch.Tensor, context: Any) -> tuple[Any, Any, Any, torch.Tensor]:
    """`processor.begin` on the tokens controls see: `hidden_states` without its trailing reference tokens; returns
    the hidden states with them put back."""
    references = count(processor)
    if not references:
        return processor.begin(attn, hidden_states, context)
    own = hidden_states[:, : hidden_states.shape[1] - references]
    edit, call, reused, seen = processor.begin(attn, own, context)
    if seen is not own:
        hidden_states = torch.cat([seen, hidden_states[:, own.shape[1] :]], dim=1)
    return edit, call, reused, hidden_states


def attend(
    processor: Any, call: Any, edit: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    references: int | None = None,
) -> torch.Tensor:
    """The layer's attention, (B, H, S, D): the edited op for the text and image queries, the plain op for the
    reference queries (the last `references`, by default `Geometry.reference_len`; Z-Image's processor moves its image
    padding there), every key for both."""
    if references is None:
        references = call.geometry.reference_len if call is not None else 0
    if not references:
        return processor.attention(call, edit, q, k, v, mask)
    if torch.compiler.is_compiling():  # made in the graph: a lookup by the edit's identity would guard on it per call
        over = _over_references(edit, references, k.shape[2])
    else:
        key = (id(edit), references, k.shape[2])
        cached = getattr(processor, "_references_edit", None)
        if cached is None or cached[0] != key or cached[1] is not edit:  # an edit is often the same object across steps
            cached = (key, edit, _over_references(edit, references, k.shape[2]))
            processor._references_edit = cached
        over = cached[2]
    own = processor.attention(call, over, q[:, :, :-references], k, v, _rows(mask, 0, -references))
    rest = processor.plain_attention(q[:, :, -references:], k, v, _rows(mask, -references, None))
    return torch.cat([own, rest.to(own.dtype)], dim=2)


def _over_references(edit: Any, references: int, keys: int) -> Any:
    """`edit` for queries that also see `references` reference keys after the layer's own: per-key edits over the
    layer's own keys extended with no bias and a value scale of 1; label masks and windows are defined over the
    layer's own tokens only."""
    if edit is None:
        return None
    spec = edit.kernel
    if spec.labels is not None or spec.window is not None:
        raise CallLayoutError(
            "attnctl: label masks (Regions) and windows (FastAttn) are not defined over reference-image tokens; run those "
            "controls without reference images"
        )
    changes = {}
    for name, fill in (("key_bias", 0.0), ("value_scale", 1.0)):
        value = getattr(spec, name)
        if value is not None and value.shape[-1] == keys - references:
            changes[name] = F.pad(value, (0, references), value=fill)
    if not changes:
        return edit
    return Edit(kernel=dataclasses.replace(spec, **changes), hooks=edit.hooks)


def _rows(mask: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    """A model mask restricted to the query rows `start:stop` (a mask over keys only is kept as it is)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]
