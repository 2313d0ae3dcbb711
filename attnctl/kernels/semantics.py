"""What an `AttentionSpec` means, in one place: restrict a spec, evaluate it on a block.

The backends carry a spec out; the eager reference backend (`kernels.reference`) and every hook that computes
part of a layer call itself (a sub-attention over some rows, some queries or other tokens; the attention
probabilities of some queries; a merged token space) use these functions, so that a spec means the same thing
everywhere.

Restrict (a spec for part of a call): `spec_rows` (batch rows), `spec_queries` (query rows), `spec_tokens`
(query spans and a subset of the keys: a sub-attention), `spec_merged` (a merged token space).

Evaluate on a block of queries x keys (contiguous `slice`s of the call's positions; views and gathers of tensors
already on the device, no host sync, nothing larger than the block): `edited_rows` / `query_rows` /
`query_segments` (the query rows the per-key edits and `sparse` apply to), `block_bias` (the additive logits:
model mask, key bias, labels, window), `pair_bias` (the same for pairs (query i, key i): a token and its own
key), `window_block`, `block_logits`, `softmax` (fully masked rows zero), `probabilities` (PLADIS's sparse
combination applied, ignored or refused, as the caller says), `entmax`, `log_sum_exp`.

Combine (the kernel edits of several controls on one layer): `EDIT_FIELDS`, `edits_keys`, `merge_specs`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError, UnsupportedError
from .spec import AttentionSpec, IdentityCache, LabelMask, Window, as_additive, kept_tensors, per_key, version

KEEP = object()  # `spec_tokens(labels=KEEP)`: restrict the spec's own label mask


#: At most this many derived label masks are kept per label mask (an index tensor made afresh at every attention
#: call would otherwise grow the store).
_DERIVED_LIMIT = 64


def _derived(labels: LabelMask, key: tuple[int | str, ...], make: Callable[[], LabelMask], anchor: torch.Tensor | None = None) -> LabelMask:
    """`make()`, kept on `labels` under `key`, the identity of `anchor` (a row index tensor: the callers' indices
    are cached tensors) and the label tensors' versions, so that every attention call of a call that restricts the
    same mask the same way gets the same object, and the backends' caches for it. The entry holds the anchor weakly
    and goes with it (an index made afresh at each call keeps nothing alive)."""
    if torch.compiler.is_compiling():
        return make()
    key = (*key, id(anchor), labels.versions())
    found = labels.derived.get(key)
    if found is not None and found[0]() is anchor:
        return found[1]
    if len(labels.derived) >= _DERIVED_LIMIT:
        for entry in labels.derived.values():
            if entry[2] is not None:
                entry[2].detach()
        labels.derived.clear()
    derived = make()
    if anchor is None:
        labels.derived[key] = (lambda: None, derived, None)
    else:  # the finalizer holds the mask weakly too: a mask that dies first takes its derived ones with it
        labels.derived[key] = (weakref.ref(anchor), derived, weakref.finalize(anchor, _drop_derived, weakref.ref(labels), key))
    return derived


def _drop_derived(labels: weakref.ref, key: tuple[object, ...]) -> None:
    alive = labels()
    if alive is not None:
        alive.derived.pop(key, None)


def labels_for_batch(labels: LabelMask, batch: int) -> LabelMask:
    """`labels` with `batch` rows in each tensor: a one-row tensor (labels every row shares) repeated, for the fused
    backends, which read the labels per batch row. The same object for every call with that batch (their caches are
    per LabelMask object); `labels` itself when it has them already."""
    if all(t.shape[0] == batch for t in (labels.q_labels, labels.k_labels)) and labels.table.shape[0] in (1, batch):
        return labels

    def make() -> LabelMask:
        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if tensor.shape[0] == batch else tensor.expand(batch, *tensor.shape[1:]).contiguous()

        q_labels = rows(labels.q_labels)
        k_labels = q_labels if labels.k_labels is labels.q_labels else rows(labels.k_labels)  # one vector: one sort
        return LabelMask(q_labels, k_labels, labels.table)

    return _derived(labels, ("batch", batch), make)


def spec_rows(spec: AttentionSpec, index: torch.Tensor, batch: int) -> AttentionSpec:
    """`spec` for the batch rows `index` (of `batch` rows) only: per-row tensors are re-indexed, tensors with one
    row (broadcast) and 0-d tensors are kept."""

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.ndim == 0 or tensor.shape[0] != batch or batch == 1:
            return tensor
        return tensor.index_select(0, index if index.device == tensor.device else index.to(tensor.device))

    labels = spec.labels
    if labels is not None and labels.rows != 1:  # labels every row shares (one row) stay the same object
        source = labels
        labels = _derived(source, ("rows", batch), anchor=index, make=lambda: LabelMask(take(source.q_labels), take(source.k_labels), take(source.table)))
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
        source = labels
        labels = _derived(source, ("queries", start, stop), lambda: LabelMask(source.q_labels[:, start:stop], source.k_labels, source.table))
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


# -- restrict: a sub-attention over some queries and keys --------------------------------------------------------


def spans_range(spans: Sequence[tuple[int, int]], query_range: tuple[int, int]) -> tuple[int, int] | None:
    """Where the positions inside `query_range` fall among the positions `spans` (concatenated, in order):
    a (start, stop) range of the new positions, None when none falls inside; ConfigError when they are not
    contiguous there. Pure Python: no tensor, no device sync."""
    found: list[tuple[int, int]] = []
    offset = 0
    for begin, end in spans:
        lo, hi = max(begin, query_range[0]), min(end, query_range[1])
        if lo < hi:
            found.append((offset + lo - begin, offset + hi - begin))
        offset += end - begin
    if not found:
        return None
    for (_, previous_stop), (next_start, _) in zip(found, found[1:]):
        if previous_stop != next_start:
            raise ConfigError(f"attnctl: the query range {query_range} is not contiguous among the positions {tuple(spans)}")
    return found[0][0], found[-1][1]


def _take_spans(tensor: torch.Tensor, dim: int, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """`tensor` at the positions of `spans` along `dim` (slices, concatenated): no index tensor, no copy for one span."""
    parts = [tensor.narrow(dim, start, stop - start) for start, stop in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def spec_tokens(
    spec: AttentionSpec, queries: Sequence[tuple[int, int]], keys: Sequence[tuple[int, int]], key_index: torch.Tensor,
    *, rows: torch.Tensor | None = None, labels: LabelMask | None | object = KEEP, where: str = "this layer",
) -> AttentionSpec:
    """`spec` for a sub-attention: the query positions of the spans `queries` and the key positions of the spans
    `keys` (in order; `key_index` holds the same key positions as an index tensor on the device, made once by the
    caller), optionally for the batch rows `rows` only (an index tensor; per-row tensors of one row are kept).

    Per-key tensors (key bias, value scale, a per-key model mask) and key labels are gathered at `key_index`;
    a per-query model mask and query labels are sliced at the query spans. The query range is mapped among the
    query spans in Python (`spans_range`); the per-key edits and `sparse` are dropped when none of their rows is
    among them (and an inert query range is dropped). `labels`: a label mask of the sub-attention replacing the
    spec's own (None: no label mask); by default the spec's own is restricted. A window is restricted when the
    sub-attention is square (the same spans for queries and keys) and keeps the image grid whole, with the text
    tokens all before or all after it; otherwise ConfigError.
    """

    def take_rows(tensor: torch.Tensor) -> torch.Tensor:
        if rows is None or tensor.ndim == 0 or tensor.shape[0] == 1:
            return tensor
        return tensor.index_select(0, rows if rows.device == tensor.device else rows.to(tensor.device))

    def take_keys(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        tensor = take_rows(tensor)
        index = key_index if key_index.device == tensor.device else key_index.to(tensor.device)
        return tensor.index_select(tensor.ndim - 1, index)

    def restrict_mask(mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim >= 2 and mask.shape[-2] != 1:
            mask = _take_spans(mask, mask.ndim - 2, queries)
        return take_keys(mask)

    attn_mask = spec.attn_mask
    if attn_mask is not None:
        attn_mask = _token_mask(attn_mask, queries, key_index, rows, restrict_mask)
    if labels is KEEP:
        labels = spec.labels
        if labels is not None:
            labels = LabelMask(_take_spans(take_rows(labels.q_labels), 1, queries), take_keys(labels.k_labels), take_rows(labels.table))
    key_bias, value_scale, sparse, query_range = take_keys(spec.key_bias), take_keys(spec.value_scale), spec.sparse, None
    if spec.query_range is not None and (key_bias is not None or value_scale is not None or sparse is not None):
        try:
            query_range = spans_range(queries, spec.query_range)
        except ConfigError:
            raise ConfigError(f"attnctl: cannot map another control's query range {spec.query_range} onto a sub-attention at {where}") from None
        if query_range is None:
            key_bias = value_scale = sparse = None
    return dataclasses.replace(
        spec, attn_mask=attn_mask, key_bias=key_bias, value_scale=value_scale, query_range=query_range, labels=labels,
        sparse=sparse, window=_window_tokens(spec.window, queries, keys, where),
    )


#: The model's mask of a sub-attention (`spec_tokens`), by the mask tensor, the query spans and the key and row index
#: tensors (the callers' cached ones): every layer of a denoiser call restricts the one mask the same way, so the
#: (B, 1, nq, nk) gather is made once per call, not at every layer. An entry goes with its mask tensor.
_TOKEN_MASKS = IdentityCache(4)


def _token_mask(
    mask: torch.Tensor, queries: Sequence[tuple[int, int]], key_index: torch.Tensor, rows: torch.Tensor | None,
    make: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return make(mask)
    tensors, extra = (mask, key_index, rows), (version(mask), tuple(tuple(span) for span in queries))
    found = _TOKEN_MASKS.get(tensors, extra)
    if found is None:
        with kept_tensors():
            found = _TOKEN_MASKS.put(tensors, extra, make(mask))
    return found


def _window_tokens(window: Window | None, queries: Sequence[tuple[int, int]], keys: Sequence[tuple[int, int]], where: str) -> Window | None:
    if window is None:
        return None
    n_img = window.n_img
    start = window.text_len if window.text_first else 0
    image = (start, start + n_img)
    spans = tuple(tuple(span) for span in queries)
    placed = [i for i, span in enumerate(spans) if span == image]
    outside = all(stop <= image[0] or begin >= image[1] for i, (begin, stop) in enumerate(spans) if i not in placed)
    if spans != tuple(tuple(span) for span in keys) or len(placed) != 1 or placed[0] not in (0, len(spans) - 1) or not outside:
        raise ConfigError(
            f"attnctl: a window cannot be restricted to this sub-attention at {where} (it needs the same query and key "
            "tokens, the image grid whole and the text tokens on one side of it); give the controls different layers"
        )
    text_len = sum(stop - begin for begin, stop in spans) - n_img
    return dataclasses.replace(window, text_len=text_len, text_first=placed[0] > 0 and text_len > 0)


# -- restrict: a merged token space ------------------------------------------------------------------------------


def spec_merged(
    spec: AttentionSpec, merge_keys: Callable[[torch.Tensor], torch.Tensor], image: slice, tokens: int, merged: int, where: str
) -> AttentionSpec:
    """`spec` for a token space where `merged` of the image tokens `image` were merged into groups (token merging).

    `merge_keys` maps a per-token tensor over the first `tokens` keys ((B, N) or (B, H, N)) to its groups (their
    mean); keys after them (the text keys of joint layers) are kept. Per-key bias and value scale of image keys
    become their group's mean; a query range over the image rows or over the rows after them moves with them
    (`sparse` follows it). Label masks, windows, the model's own mask and log-sum-exp capture address image tokens
    pairwise or per token and cannot be merged: UnsupportedError.
    """
    blocked = [name for name, value in (("labels", spec.labels), ("window", spec.window), ("attn_mask", spec.attn_mask)) if value is not None]
    if spec.return_lse:
        blocked.append("lse (attention-map capture)")
    if blocked:
        raise UnsupportedError(
            f"attnctl: token reduction at {where} merges image tokens, so it cannot carry out {', '.join(blocked)} "
            "on the same layer (they address image tokens pairwise); give the controls disjoint layers"
        )
    if spec.key_bias is None and spec.value_scale is None and spec.query_range is None:
        return spec

    def per_key(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        body = merge_keys(tensor[..., :tokens])
        tail = tensor[..., tokens:]
        if not tail.shape[-1]:
            return body
        return torch.cat([body, tail.expand(*body.shape[:-1], -1)], dim=-1)

    query_range = spec.query_range
    if query_range is not None:
        start, stop = query_range
        if (start, stop) == (image.start, image.stop):
            query_range = (image.start, image.stop - merged)
        elif start >= image.stop:
            query_range = (start - merged, stop - merged)
        elif stop > image.start:
            raise UnsupportedError(
                f"attnctl: token reduction at {where} cannot map the query range {query_range} (image rows "
                f"{image.start}..{image.stop}) onto merged tokens"
            )
    return dataclasses.replace(spec, key_bias=per_key(spec.key_bias), value_scale=per_key(spec.value_scale), query_range=query_range)


# -- evaluate: which query rows the per-key edits apply to ------------------------------------------------------
# Positions are contiguous `slice`s of the call's queries and keys (image tokens, text tokens, a chunk of queries).


def edited_rows(spec: AttentionSpec, queries: slice) -> tuple[int, int] | None:
    """The positions (lo, hi) among `queries` where the per-key edits (key bias, value scale, sparse) apply,
    None when they apply to none of them. Pure Python."""
    if spec.query_range is None:
        return queries.start, queries.stop
    lo, hi = max(spec.query_range[0], queries.start), min(spec.query_range[1], queries.stop)
    return (lo, hi) if lo < hi else None


def query_rows(spec: AttentionSpec, queries: slice, device: torch.device) -> torch.Tensor | None:
    """(n,) float: 1 where the per-key edits apply to these query positions, 0 elsewhere; None when they apply
    to all of them."""
    edited = edited_rows(spec, queries)
    if edited == (queries.start, queries.stop):
        return None
    rows = torch.zeros(queries.stop - queries.start, device=device)
    if edited is not None:
        rows[edited[0] - queries.start : edited[1] - queries.start] = 1.0
    return rows


def query_segments(spec: AttentionSpec, queries: slice) -> list[tuple[int, int, bool]]:
    """`queries` split into (start, stop, edited) pieces, relative to `queries.start`, by whether the per-key
    edits apply to them; empty pieces are left out."""
    n = queries.stop - queries.start
    edited = edited_rows(spec, queries)
    if edited is None:
        return [(0, n, False)] if n else []
    lo, hi = edited[0] - queries.start, edited[1] - queries.start
    return [piece for piece in ((0, lo, False), (lo, hi, True), (hi, n, False)) if piece[1] > piece[0]]


def _rows_term(term: torch.Tensor, spec: AttentionSpec, queries: slice, query_dim: int) -> torch.Tensor | None:
    """`term` on the query rows the per-key edits apply to, 0 on the others (`torch.where`, not a product:
    -inf * 0 is NaN); None when they apply to none of these rows."""
    edited = edited_rows(spec, queries)
    if edited is None:
        return None
    if edited == (queries.start, queries.stop):
        return term
    rows = query_rows(spec, queries, term.device)
    shape = [1] * term.ndim
    shape[query_dim] = -1
    return torch.where(rows.view(shape) > 0, term, 0.0)


def _sum(terms: list[torch.Tensor]) -> torch.Tensor | None:
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total


# -- evaluate: additive logits -----------------------------------------------------------------------------------


def window_block(window: Window, queries: slice, keys: slice, device: torch.device | str | None = None) -> torch.Tensor | None:
    """(nq, nk) bool: which (query, key) pairs of the block `window` allows; None when it allows them all (text
    queries or text keys only). The block of `Window.allowed`, without the N x N tensor."""
    n_img = window.n_img
    start = window.text_len if window.text_first else 0
    stop = start + n_img
    if min(queries.stop, stop) <= max(queries.start, start) or min(keys.stop, stop) <= max(keys.start, start):
        return None
    qi = torch.arange(queries.start, queries.stop, device=device)[:, None]
    ki = torch.arange(keys.start, keys.stop, device=device)[None, :]
    image = (qi >= start) & (qi < stop) & (ki >= start) & (ki < stop)
    return ~image | window_near(window, qi - start, ki - start)


def window_near(window: Window, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
    """Whether image tokens `qi` and `ki` (broadcastable positions among the image tokens) are within `window` of each
    other: the window's definition, which every backend follows."""
    if window.band is not None:
        return (qi - ki).abs() <= window.band
    h, w = window.grid_hw
    rf, rh, rw = window.reach
    hw = h * w  # frame-major tokens: frame i // hw, row (i % hw) // w, column i % w
    near = ((qi % hw) // w - (ki % hw) // w).abs() <= rh
    near = near & ((qi % w - ki % w).abs() <= rw)
    return near & ((qi // hw - ki // hw).abs() <= rf) if rf < window.frames - 1 else near


def block_bias(spec: AttentionSpec, queries: slice, keys: slice, device: torch.device | None = None) -> torch.Tensor | None:
    """The additive logits of `spec` for every (query in `queries`, key in `keys`): (B|1, H|1, nq, nk) float32,
    or None when nothing adds to them.

    The terms, in this order: the model's mask (bool: True attends), the per-key bias on the rows of
    `query_range`, the label mask (`LabelMask` table lookup) and the window (-inf outside it; made on `device`,
    default the device of the spec's tensors).
    """
    terms = []
    if spec.attn_mask is not None:
        mask = spec.attn_mask
        if mask.ndim >= 2 and mask.shape[-2] != 1:
            mask = mask[..., queries, :]
        terms.append(as_additive(mask[..., keys], torch.float32))
    if spec.key_bias is not None:
        bias = _rows_term(per_key(spec.key_bias, "key_bias")[..., keys][:, :, None, :].float(), spec, queries, 2)
        if bias is not None:
            terms.append(bias)
    if spec.labels is not None:
        labels = spec.labels
        q_labels, k_labels = labels.q_labels[:, queries], labels.k_labels[:, keys]  # (B, n), (B, m)
        table = labels.table.float().expand(q_labels.shape[0], -1, -1)
        by_query = torch.gather(table, 1, q_labels[:, :, None].expand(-1, -1, table.shape[-1]))  # (B, n, Lk)
        terms.append(torch.gather(by_query, 2, k_labels[:, None, :].expand(-1, q_labels.shape[1], -1))[:, None])
    if spec.window is not None:
        allowed = window_block(spec.window, queries, keys, device or _device(spec))
        if allowed is not None:
            terms.append(as_additive(allowed))
    return _sum(terms)


def pair_bias(spec: AttentionSpec, queries: slice, keys: slice, device: torch.device | None = None) -> torch.Tensor | None:
    """The additive logits of `spec` for the pairs (queries[i], keys[i]) of two equally long spans (a token and
    its own key): (B|1, H|1, n, 1) float32, or None. The same terms as `block_bias`."""
    terms = []
    if spec.attn_mask is not None:
        mask = spec.attn_mask
        if mask.ndim < 2 or mask.shape[-2] == 1:
            own = mask[..., 0, keys] if mask.ndim >= 2 else mask[keys]
        else:
            own = torch.diagonal(mask[..., queries, keys], dim1=-2, dim2=-1)
        own = as_additive(own, torch.float32)
        while own.ndim < 3:
            own = own[None]
        terms.append(own[..., None])
    if spec.key_bias is not None:
        bias = _rows_term(per_key(spec.key_bias, "key_bias")[..., keys].float(), spec, queries, 2)
        if bias is not None:
            terms.append(bias[..., None])
    if spec.labels is not None:
        labels = spec.labels
        q_labels, k_labels = labels.q_labels[:, queries], labels.k_labels[:, keys]  # (B, n)
        table = labels.table.float().expand(q_labels.shape[0], -1, -1)
        by_query = torch.gather(table, 1, q_labels[:, :, None].expand(-1, -1, table.shape[-1]))  # (B, n, Lk)
        terms.append(torch.gather(by_query, 2, k_labels[:, :, None])[:, None])  # (B, 1, n, 1)
    if spec.window is not None and (queries.start, queries.stop) != (keys.start, keys.stop):  # a token's own key is always allowed
        allowed = _window_pairs(spec.window, queries, keys, device or _device(spec))
        if allowed is not None:
            terms.append(as_additive(allowed)[:, None])
    return _sum(terms)


def _window_pairs(window: Window, queries: slice, keys: slice, device) -> torch.Tensor | None:
    n_img = window.n_img
    start = window.text_len if window.text_first else 0
    qi = torch.arange(queries.start, queries.stop, device=device)
    ki = torch.arange(keys.start, keys.stop, device=device)
    image = (qi >= start) & (qi < start + n_img) & (ki >= start) & (ki < start + n_img)
    return ~image | window_near(window, qi - start, ki - start)


def _device(spec: AttentionSpec) -> torch.device | None:
    for tensor in (spec.attn_mask, spec.key_bias, spec.value_scale):
        if tensor is not None:
            return tensor.device
    return spec.labels.q_labels.device if spec.labels is not None else None


def block_logits(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, queries: slice, keys: slice) -> torch.Tensor:
    """The logits of the block `queries` x `keys` of q (B, H, Nq, D) and k (B, H, Nk, D) with every additive term
    of `spec`: (B, H, nq, nk) in float32."""
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    logits = (q[:, :, queries].float() @ k[:, :, keys].float().transpose(-1, -2)) * scale
    bias = block_bias(spec, queries, keys, q.device)
    return logits if bias is None else logits + bias


# -- evaluate: probabilities and log-sum-exp ---------------------------------------------------------------------


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; a row whose every logit is -inf (every key masked) is zeros."""
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    return torch.softmax(logits, dim=-1).masked_fill(dead, 0.0)


def probabilities(logits: torch.Tensor, spec: AttentionSpec, queries: slice, *, sparse: str = "apply") -> torch.Tensor:
    """The attention weights of the query rows `queries` from their logits over *every* key of the call
    (`block_logits`): the softmax (fully masked rows zero), and on the rows `sparse` applies to PLADIS's
    `P + scale (entmax(logits) - P)`, the weights the output `weights @ (value-scaled) V` is made of.

    `sparse="refuse"`: UnsupportedError when `sparse` applies to any of these rows instead; "ignore": the plain
    softmax. The value scale is not part of the weights (it scales values; see `AttentionSpec`).
    """
    probs = softmax(logits)
    if spec.sparse is None or sparse == "ignore" or edited_rows(spec, queries) is None:
        return probs
    if sparse == "refuse":
        raise UnsupportedError("attnctl: this computation cannot carry out a sparse (PLADIS) attention on the same layer")
    return probs + _rows_term(spec.sparse.scale * (entmax(logits, spec.sparse.alpha) - probs), spec, queries, -2)


def log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """The per-query log-sum-exp of the logits (what `return_lse` returns): (..., nq)."""
    return torch.logsumexp(logits, dim=-1)


def entmax(logits: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """alpha-entmax (Peters, Niculae and Martins 2019, "Sparse Sequence-to-Sequence Models"): PLADIS's sparse
    transform (`Sparse`).

    `p_i = [(alpha - 1) z_i - tau]_+ ^ (1 / (alpha - 1))` with tau chosen so that p sums to 1. alpha = 2 is
    sparsemax (Martins and Astudillo 2016) and alpha = 1.5 have exact sort-based solutions; other alpha use
    bisection on tau, in float64 (the result in float32). Entries at -inf get probability 0; a row that is all -inf
    gives zeros.
    """
    if alpha <= 1.0:
        raise ValueError(f"entmax needs alpha > 1 (alpha -> 1 is softmax), got {alpha}")
    z = logits.float().movedim(dim, -1)
    masked = torch.isneginf(z)
    dead = masked.all(-1, keepdim=True)
    finite = torch.where(masked, -1e4, z)
    finite = torch.where(masked, -1e4, finite - finite.max(-1, keepdim=True).values)
    finite = finite.masked_fill(dead, 0.0)  # all -inf: solve a uniform row instead (zeroed below)
    if alpha == 2.0:
        probs = _sparsemax(finite)
    elif alpha == 1.5:
        probs = _entmax15(finite)
    else:
        # float64: p = (x - tau)^(1 / (alpha - 1)) is steep near the support's edge for alpha > 2, so a float32 tau
        # (off by ~1e-7) moves a small probability by ~1e-7^(1 / (alpha - 1)) (3e-3 at alpha = 4)
        probs = _entmax_bisect(finite.double(), alpha).to(finite.dtype)
    probs = probs.masked_fill(dead, 0.0)
    return probs.movedim(-1, dim)


def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    srt, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cumsum = srt.cumsum(-1)
    support = (1 + k * srt) > cumsum
    size = support.sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return (z - tau).clamp(min=0)


def _entmax15(z: torch.Tensor) -> torch.Tensor:
    x = z / 2  # (alpha - 1) z with alpha = 1.5
    srt, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = srt.cumsum(-1) / k
    mean_sq = (srt * srt).cumsum(-1) / k
    delta = (1 - k * (mean_sq - mean * mean)) / k
    tau = mean - delta.clamp(min=0).sqrt()
    size = (tau <= srt).sum(-1, keepdim=True)
    tau_star = tau.gather(-1, size - 1)
    return (x - tau_star).clamp(min=0) ** 2


def _entmax_bisect(z: torch.Tensor, alpha: float, iterations: int = 60) -> torch.Tensor:
    x = z * (alpha - 1)
    power = 1.0 / (alpha - 1)
    top = x.max(-1, keepdim=True).values
    lo, hi = top - 1.0, top - (1.0 / x.shape[-1]) ** (alpha - 1)
    for _ in range(iterations):
        tau = (lo + hi) / 2
        total = (x - tau).clamp(min=0).pow(power).sum(-1, keepdim=True)
        lo = torch.where(total >= 1, tau, lo)
        hi = torch.where(total >= 1, hi, tau)
    probs = (x - (lo + hi) / 2).clamp(min=0).pow(power)
    return probs / probs.sum(-1, keepdim=True)


# -- combine: the kernel edits of several controls on one layer ---------------------------------------------------

#: The fields of a spec that controls edit (`processors.edit.Edit`); `scale` and `attn_mask` are the call's.
EDIT_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(AttentionSpec)) - {"scale", "attn_mask"}


def edits_keys(spec: AttentionSpec) -> bool:
    """Whether `spec` has edits that act per key on the rows of its `query_range` (key bias, value scale, sparse)."""
    return spec.key_bias is not None or spec.value_scale is not None or spec.sparse is not None


def merge_specs(specs: Sequence[AttentionSpec], where: str) -> AttentionSpec:
    """The kernel edits of several controls on one layer as one spec: key biases add, value scales multiply, the
    per-key edits must act on the same query rows, label masks, windows and sparse transforms must not collide
    (ConfigError), log-sum-exp is returned if any asks for it."""
    key_bias = value_scale = labels = window = sparse = None
    query_range = None
    return_lse = False
    for spec in specs:
        if edits_keys(spec):
            if query_range is not None and spec.query_range != query_range and (key_bias is not None or value_scale is not None or sparse is not None):
                raise ConfigError(f"{where}: two controls edit keys for different query rows ({query_range} and {spec.query_range})")
            query_range = spec.query_range if spec.query_range is not None else query_range
        if spec.key_bias is not None:
            key_bias = spec.key_bias if key_bias is None else key_bias + spec.key_bias
        if spec.value_scale is not None:
            value_scale = spec.value_scale if value_scale is None else value_scale * spec.value_scale
        for name in ("labels", "window", "sparse"):
            value = getattr(spec, name)
            if value is None:
                continue
            if {"labels": labels, "window": window, "sparse": sparse}[name] is not None:
                raise ConfigError(f"{where}: two controls both set {name}; they cannot share this layer")
            if name == "labels":
                labels = value
            elif name == "window":
                window = value
            else:
                sparse = value
        return_lse = return_lse or spec.return_lse
    return AttentionSpec(
        key_bias=key_bias, value_scale=value_scale, query_range=query_range, labels=labels, window=window, sparse=sparse,
        return_lse=return_lse,
    )
