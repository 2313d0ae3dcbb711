"""The SDPA backend: `torch.nn.functional.scaled_dot_product_attention`, with an additive mask where a
control needs one. A plain spec makes exactly the call the stock diffusers processors make, so outputs
are bitwise identical to stock.

Per-key edits (bias, value scale) never need an N x N mask: a (B, H, 1, Nk) mask broadcasts, and a query
range splits the call into row groups. Label masks and windows are made dense here, up to
`DENSE_MASK_LIMIT` mask elements (B * Nq * Nk); past that the fused backends (flex, triton) are needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendError
from .reference import _per_key
from .spec import AttentionSpec

DENSE_MASK_LIMIT = 1 << 26  # 64M elements: 256 MB as float32


def dense_mask_elements(spec: AttentionSpec, batch: int, nq: int, nk: int) -> int:
    """How many mask elements this backend would materialise for `spec` (0 when none)."""
    if spec.labels is None and spec.window is None:
        return 0
    return batch * nq * nk


def _call(q, k, v, mask, scale):
    if scale is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.return_lse or spec.sparse is not None:
        raise BackendError("the sdpa backend cannot return log-sum-exp or apply sparse (PLADIS) attention")
    if spec.is_plain:
        return _call(q, k, v, spec.attn_mask, spec.scale), None
    batch, _, nq, _ = q.shape
    nk = k.shape[2]
    elements = dense_mask_elements(spec, batch, nq, nk)
    if elements > DENSE_MASK_LIMIT:
        raise BackendError(
            f"the sdpa backend would materialise a {batch}x{nq}x{nk} mask ({elements} elements, limit "
            f"{DENSE_MASK_LIMIT}); use backend='flex' or 'triton' for label masks and windows at this size"
        )
    shared = _shared_mask(spec, nq, nk, q)
    start, stop = spec.query_range if spec.query_range is not None else (0, nq)
    pieces = []
    if start > 0:
        pieces.append(_call(q[:, :, :start], k, v, _rows(shared, 0, start), spec.scale))
    edited_mask = _rows(shared, start, stop)
    if spec.key_bias is not None:
        key_bias = _per_key(spec.key_bias).to(q.dtype)
        edited_mask = key_bias if edited_mask is None else edited_mask + key_bias
    edited_v = v if spec.value_scale is None else v * _per_key(spec.value_scale).to(v.dtype).transpose(-1, -2)
    pieces.append(_call(q[:, :, start:stop], k, edited_v, edited_mask, spec.scale))
    if stop < nq:
        pieces.append(_call(q[:, :, stop:], k, v, _rows(shared, stop, nq), spec.scale))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    if spec.labels is not None:
        dead = spec.labels.fully_masked_queries()  # (B, Nq)
        out = out.masked_fill(dead[:, None, :, None], 0.0)
    return out, None


def _shared_mask(spec: AttentionSpec, nq: int, nk: int, q: torch.Tensor) -> torch.Tensor | None:
    """The model's own mask plus label and window masks, broadcastable to (B, H, Nq, Nk)."""
    mask = spec.attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if spec.labels is not None:
        dense = spec.labels.dense().to(q.dtype)
        mask = dense if mask is None else mask + dense
    if spec.window is not None:
        allowed = spec.window.allowed(q.device)
        window = torch.zeros(nq, nk, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        mask = window if mask is None else mask + window
    return mask


def _rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]
