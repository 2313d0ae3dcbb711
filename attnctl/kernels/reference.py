"""The eager reference backend: explicit softmax over materialised logits. It is the specification every
other backend is tested against, so it favours readability over speed and computes in float32. What each field
of the spec means (the logits, the softmax, entmax) comes from `kernels.semantics`, as for every hook that
evaluates a spec itself; this file combines the outputs (value scale, PLADIS) by the formulas.
"""

from __future__ import annotations

import torch

from .chunks import row_chunks
from .semantics import block_bias, block_logits, entmax, log_sum_exp, query_rows, softmax
from .spec import AttentionSpec, per_key

__all__ = ["additive_bias", "attention", "entmax", "query_indicator"]


def additive_bias(spec: AttentionSpec, batch: int, nq: int, nk: int, device: torch.device) -> torch.Tensor | None:
    """Everything in `spec` that adds to the logits, as one tensor broadcastable to (B, H, Nq, Nk), or None
    (`semantics.block_bias` over the whole call)."""
    _check(spec, nq, nk)
    return block_bias(spec, slice(0, nq), slice(0, nk), device)


def _check(spec: AttentionSpec, nq: int, nk: int) -> None:
    """The sizes of the spec's per-key tensors and of its window against the call's."""
    if spec.key_bias is not None:
        per_key(spec.key_bias, "key_bias", keys=nk)
    if spec.window is not None:
        n = spec.window.n_img + spec.window.text_len
        if (n, n) != (nq, nk):
            raise ValueError(f"window covers {(n, n)} tokens but the call has ({nq}, {nk})")


def query_indicator(spec: AttentionSpec, nq: int, device: torch.device) -> torch.Tensor:
    """(Nq, 1) float: 1 for query rows the per-key edits apply to."""
    return _indicator(spec, slice(0, nq), device)


def _indicator(spec: AttentionSpec, queries: slice, device: torch.device) -> torch.Tensor:
    rows = query_rows(spec, queries, device)
    return torch.ones(queries.stop - queries.start, 1, device=device) if rows is None else rows[:, None]


#: Elements of one block of logits (batch x heads x query rows x keys) the reference materialises at once: 32M, 128 MiB
#: in float32. A larger call goes in blocks of query rows (each row's output is its own; `chunks.row_chunks`: a
#: power-of-two count of them): the sparse transform's sort-based solution makes about ten such tensors (PLADIS on
#: Flux at 1024: 25 GiB in one block).
CHUNK_ELEMENTS = 1 << 25


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with every control of `spec`, by the formulas. Returns (out in v's dtype, lse or None)."""
    nq, nk = q.shape[2], k.shape[2]
    _check(spec, nq, nk)
    values = v.float()
    scaled = values
    if spec.value_scale is not None:
        scaled = values * per_key(spec.value_scale, "value_scale", keys=nk)[..., None].float()  # (B|1, H|1, Nk, 1)
    per_row = max(q.shape[0], k.shape[0]) * max(q.shape[1], k.shape[1]) * nk
    chunks = row_chunks(0, nq, max(1, CHUNK_ELEMENTS // max(1, per_row)))
    if len(chunks) == 1:
        out, lse = _attention_rows(q, k, values, scaled, spec, chunks[0])
        return out.to(v.dtype), lse
    outs, lses = [], []
    for queries in chunks:  # a power-of-two count (`row_chunks`); an empty trailing chunk adds nothing
        out, lse = _attention_rows(q, k, values, scaled, spec, queries)
        outs.append(out.to(v.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), None if lses[0] is None else torch.cat(lses, dim=-1)


def _attention_rows(
    q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, scaled: torch.Tensor, spec: AttentionSpec, queries: slice
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output (float32) and lse of the query rows `queries`; `values` float32, `scaled` times the value scale."""
    logits = block_logits(q, k, spec, queries, slice(0, k.shape[2]))
    probs = softmax(logits)  # rows whose every key is masked -> zeros
    rows = _indicator(spec, queries, q.device)  # (n, 1)
    if spec.value_scale is not None:
        out = probs @ values * (1 - rows) + probs @ scaled * rows
    else:
        out = probs @ values
    if spec.sparse is not None:
        sparse = entmax(logits, spec.sparse.alpha)
        sparse_out = sparse @ scaled
        out = out + rows * spec.sparse.scale * (sparse_out - out)
    lse = None
    if spec.return_lse:
        lse = log_sum_exp(logits)
    return out, lse
