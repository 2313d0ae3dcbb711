"""What an `AttentionSpec` means, in one place: restrict a spec, evaluate it on a block.

The backends carry a spec out; hooks that compute part of a layer call themselves (a sub-attention over some
rows, some queries or other tokens; the attention probabilities of some queries; a merged token space) use
these functions, so that a spec means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .spec import AttentionSpec, LabelMask


def spec_rows(spec: AttentionSpec, index: torch.Tensor, batch: int) -> AttentionSpec:
    """`spec` for the batch rows `index` (of `batch` rows) only: per-row tensors are re-indexed, tensors with one
    row (broadcast) and 0-d tensors are kept."""

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.ndim == 0 or tensor.shape[0] != batch or batch == 1:
            return tensor
        return tensor.index_select(0, index if index.device == tensor.device else index.to(tensor.device))

    labels = spec.labels
    if labels is not None:
        labels = LabelMask(take(labels.q_labels), take(labels.k_labels), take(labels.table))
    return dataclasses.replace(
        spec, attn_mask=take(spec.attn_mask), key_bias=take(spec.key_bias), value_scale=take(spec.value_scale), labels=labels
    )


def spec_queries(spec: AttentionSpec, start: int, stop: int) -> AttentionSpec:
    """`spec` for the query rows `start:stop` only (the keys unchanged).

    The model's per-query mask and the query labels are sliced; the per-key edits (and `sparse`) keep acting on
    the rows of `query_range` that are among them, or are dropped when none is. A window addresses the whole
    sequence and cannot be restricted: callers drop it first where it cannot matter (text queries).
    """
    if spec.window is not None:
        raise ConfigError("attnctl: a windowed attention spec cannot be restricted to some query rows")
    attn_mask = spec.attn_mask
    if attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] > 1:
        attn_mask = attn_mask[..., start:stop, :]
    labels = spec.labels
    if labels is not None:
        labels = LabelMask(labels.q_labels[:, start:stop], labels.k_labels, labels.table)
    key_bias, value_scale, sparse, query_range = spec.key_bias, spec.value_scale, spec.sparse, spec.query_range
    if query_range is not None:
        lo, hi = max(query_range[0], start), min(query_range[1], stop)
        if lo >= hi:
            key_bias = value_scale = sparse = query_range = None
        else:
            query_range = (lo - start, hi - start)
    return dataclasses.replace(
        spec, attn_mask=attn_mask, labels=labels, key_bias=key_bias, value_scale=value_scale, sparse=sparse,
        query_range=query_range,
    )
