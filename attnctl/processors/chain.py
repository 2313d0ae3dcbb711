"""The hook chain of one attention call: what a hook may do with the rest of the chain.

- `restricted_rows`: run the rest of a layer's hook chain on some batch rows only (the hooks inside see a
  layer call whose `rows` are those rows, and `row_source(call)` says where they came from);
- `restricted_tokens` / `token_layout`: the same for a sub-attention over other tokens (where the image and
  text tokens are among its queries and keys);
- `backend_op`: the layer's attention op on the handle's backend without the other controls' hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import kernels
from ..denoiser_call import RowLayout
from ..families.base import Geometry
from ..kernels.spec import AttentionSpec
from .edit import AttentionCall


@contextlib.contextmanager
def restricted_rows(call: AttentionCall, positions: Sequence[int]) -> Iterator[AttentionCall]:
    """While inside, `call.rows` holds only the batch rows `positions` of the layer call (in that order).

    For a hook that runs the rest of the chain (`compute`) on some rows only: the hooks inside then read a
    layout that matches the tensors they get. `row_source(call)` gives, for each row they see, its position
    in the batch the layer call started with (token reducers use it to pick their per-row plans). A hook that
    runs a row more than once puts the row's own computation first (`own_rows`).
    """
    layout = call.row_layout
    before = row_source(call)
    rows = call.rows.rows
    call.row_layout = RowLayout(tuple(rows[i] for i in positions))
    call.row_source = tuple(positions) if before is None else tuple(before[i] for i in positions)
    try:
        yield call
    finally:
        call.row_layout = layout
        call.row_source = before


def row_source(call: AttentionCall) -> tuple[int, ...] | None:
    """The original batch positions of the rows of a restricted layer call (None: not restricted)."""
    return call.row_source


def own_rows(call: AttentionCall, rows: Sequence[int]) -> tuple[int, ...]:
    """The positions, among the rows the call's tensors hold, of the layer call's batch rows `rows` (rows an outer
    hook left out are dropped). An outer hook may hold a row more than once (Prompt-to-Prompt's link on a joint layer
    appends copies of the edited rows, which attend with the base row's queries and keys): a row's own attention is
    its first position, as `restricted_rows` asks of a hook that appends copies. For a hook that reads the layer's
    attention (a captured map) rather than changing it."""
    source = call.row_source
    if source is None:
        return tuple(rows)
    return tuple(source.index(row) for row in rows if row in source)


@dataclass(frozen=True)
class TokenLayout:
    """Where the image and text tokens are in the queries and the keys of one attention op of a layer.

    The layer's own op: from its geometry (`token_layout(call)`). A sub-attention an outer hook runs with other
    queries or keys (Regions' base attention over image and base-text tokens) says so with `restricted_tokens`,
    so that the hooks inside can still find the image tokens (PAG's identity, map capture). `text_q` is None
    when no text token is a query.
    """

    nq: int
    nk: int
    image_q: slice
    image_k: slice
    text_q: slice | None = None
    text_k: slice | None = None
    sub: bool = False  # a sub-attention of the layer call, not the layer's own op

    @staticmethod
    def of(geometry: Geometry) -> TokenLayout:
        image, text = geometry.image_slice, geometry.text_slice
        if geometry.layer.text == "keys":  # cross-attention: text keys only
            return TokenLayout(geometry.image_len, geometry.text_len, image, slice(0, 0), None, slice(0, geometry.text_len))
        return TokenLayout(geometry.query_len, geometry.key_len, image, image, text, text)  # reference keys last

    @staticmethod
    def joint(image_len: int, text_len: int, text_first: bool, queries: str = "all") -> TokenLayout:
        """A sub-attention over a joint sequence of `image_len` image and `text_len` text tokens (text first or
        last); `queries="image"`: the image tokens are the only queries."""
        n = image_len + text_len
        image = slice(text_len, n) if text_first else slice(0, image_len)
        text = slice(0, text_len) if text_first else slice(image_len, n)
        if queries == "image":
            return TokenLayout(image_len, n, slice(0, image_len), image, None, text, sub=True)
        return TokenLayout(n, n, image, image, text, text, sub=True)


def has_span(span: slice | None) -> bool:
    """Whether a token span that may be None (`TokenLayout.text_q`) is given. Not `span is not None`: dynamo makes the
    symbolic bounds of a slice it compares by identity constants of the graph (a new graph per image size)."""
    return isinstance(span, slice)


def token_layout(call: AttentionCall) -> TokenLayout:
    """The token layout of the op a hook is asked to run: the layer's own, or the one an outer hook declared."""
    return call.token_layout or TokenLayout.of(call.geometry)


@contextlib.contextmanager
def restricted_tokens(call: AttentionCall, layout: TokenLayout) -> Iterator[AttentionCall]:
    """While inside, `token_layout(call)` is `layout`: for a hook that runs the rest of the chain on other tokens."""
    before = call.token_layout
    call.token_layout = layout
    try:
        yield call
    finally:
        call.token_layout = before


def backend_op(call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec):
    """The attention op on the handle's backend, without the hooks of other controls: for a hook that computes
    part of a layer call itself (PAG's text queries of the perturbed rows). Returns (out, lse or None).

    While torch.compile traces, the backend is chosen as a pure function of constants and called directly (as
    `Runtime.backend_for` does there): `kernels.attention` notes the request in a context variable, which dynamo
    cannot trace."""
    if torch.compiler.is_compiling():
        dense = kernels.sdpa.mask_elements(spec, q.shape[0], q.shape[2], k.shape[2])
        name = kernels.choose_traced_backend(call.backend, q.device, spec.features(), dense, shape=(q.shape[2], q.shape[3]))
        return kernels.BACKENDS[name].fn(q, k, v, spec)
    return kernels.attention(q, k, v, spec, call.backend)


# -- layers -------------------------------------------------------------------------------------------------------
