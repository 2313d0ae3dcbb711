"""What the controls share (guidance, caches, regions, maps, reweighting, token reduction).

- `RowIndex`: batch-row positions as index tensors, made once per (positions, device) and kept by a bound
  control, so that no attention call pays a host-to-device copy (or a sync) to pick its rows.
- `spec_rows` / `spec_queries`: an `AttentionSpec` restricted to some batch rows or to a contiguous range of
  query rows (per-row tensors sliced, broadcast ones kept, the query range moved).
- `restricted_rows`: run the rest of a layer's hook chain on some batch rows only (the hooks inside see a
  layer call whose `rows` are those rows, and `row_source(call)` says where they came from);
  `restricted_tokens` / `token_layout`: the same for a sub-attention over other tokens (where the image and
  text tokens are among its queries and keys).
- `backend_op`: the layer's attention op on the handle's backend without the other controls' hooks.
- `select_kinds`, `text_layers`: layer selections filtered by kind, and the default text layers
  (cross-attention on UNet / PixArt, joint attention on SD3 / Flux).
- `image_size`, `output_key`: the generated image's size, and the validation of `handle.outputs` keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, SelectionError
from ..kernels.spec import AttentionSpec, LabelMask
from ..selection import describe_layers

if TYPE_CHECKING:
    from ..control import BindContext, Control
    from ..families.base import Geometry, LayerInfo, ModelAdapter
    from .edit import LayerCall

TEXT_KINDS: tuple[str, ...] = ("cross", "joint")
JOINT_FAMILIES: tuple[str, ...] = ("sd3", "flux")


# -- rows ---------------------------------------------------------------------------------------------------------
class RowIndex:
    """Index tensors of batch-row positions, cached per (positions, device).

    `index(positions, device)` returns the same int64 tensor for the same positions and device, so picking
    rows in an attention layer costs no host-to-device copy after the first call. A bound control keeps one
    and clears it at `finish()` (nothing survives the pipeline call).
    """

    def __init__(self) -> None:
        self._tensors: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __call__(self, positions: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (tuple(positions), device)
        found = self._tensors.get(key)
        if found is None:
            found = self._tensors[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return found

    def clear(self) -> None:
        self._tensors.clear()


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


@contextlib.contextmanager
def restricted_rows(call: LayerCall, positions: Sequence[int]) -> Iterator[LayerCall]:
    """While inside, `call.rows` holds only the batch rows `positions` of the layer call (in that order).

    For a hook that runs the rest of the chain (`compute`) on some rows only: the hooks inside then read a
    layout that matches the tensors they get. `row_source(call)` gives, for each row they see, its position
    in the batch the layer call started with (token reducers use it to pick their per-row plans).
    """
    from ..pipelines.rows import RowLayout

    frame = call.frame
    before = row_source(call)
    rows = frame.rows.rows
    call.frame = dataclasses.replace(frame, rows=RowLayout(tuple(rows[i] for i in positions)))
    call.row_source = tuple(positions) if before is None else tuple(before[i] for i in positions)
    try:
        yield call
    finally:
        call.frame = frame
        call.row_source = before


def row_source(call: LayerCall) -> tuple[int, ...] | None:
    """The original batch positions of the rows of a restricted layer call (None: not restricted)."""
    return call.row_source


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
        n = geometry.query_len
        return TokenLayout(n, n, image, image, text, text)

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


def token_layout(call: LayerCall) -> TokenLayout:
    """The token layout of the op a hook is asked to run: the layer's own, or the one an outer hook declared."""
    return call.token_layout or TokenLayout.of(call.geometry)


@contextlib.contextmanager
def restricted_tokens(call: LayerCall, layout: TokenLayout) -> Iterator[LayerCall]:
    """While inside, `token_layout(call)` is `layout`: for a hook that runs the rest of the chain on other tokens."""
    before = call.token_layout
    call.token_layout = layout
    try:
        yield call
    finally:
        call.token_layout = before


def backend_op(call: LayerCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec):
    """The attention op on the handle's backend, without the hooks of other controls: for a hook that computes
    part of a layer call itself (PAG's text queries of the perturbed rows). Returns (out, lse or None)."""
    from .. import kernels

    return kernels.attention(q, k, v, spec, call.backend)


# -- layers -------------------------------------------------------------------------------------------------------
def text_layers(adapter: ModelAdapter) -> str:
    """The default layers of controls that act on text attention: joint on SD3 / Flux, cross elsewhere."""
    return "joint" if adapter.family in JOINT_FAMILIES else "cross"


def keep_kinds(layers: tuple[LayerInfo, ...], kinds: tuple[str, ...], owner: str, what: str, selection: Any) -> tuple[LayerInfo, ...]:
    """The layers of `kinds` among `layers`; raises SelectionError when none is left."""
    kept = tuple(layer for layer in layers if layer.kind in kinds)
    if not kept:
        raise SelectionError(
            f"{owner}: the layer selection {selection!r} holds no {what} layer ({owner} acts on {', '.join(kinds)} "
            f"attention); it selected {describe_layers(layers)}"
        )
    return kept


def select_kinds(control: Control, adapter: ModelAdapter, kinds: tuple[str, ...], what: str) -> tuple[LayerInfo, ...]:
    """`control`'s selection (its `layers`, or its default) restricted to the layers of `kinds`."""
    from ..control import Control

    layers = Control.select(control, adapter)
    selection = getattr(control, "layers", None) or control.default_layers(adapter)
    return keep_kinds(layers, kinds, type(control).__name__, what, selection)


# -- outputs ------------------------------------------------------------------------------------------------------
def image_size(context: BindContext) -> tuple[int, int]:
    """The generated image's (height, width): the latent grid times the pipeline's VAE scale factor (8 when the
    pipeline does not say)."""
    factor = getattr(context.pipeline, "vae_scale_factor", None)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
        factor = 8
    h, w = context.canvas.latent_hw
    return (h * factor, w * factor)


def output_key(value: Any, owner: str) -> str:
    """Validate the `key` field of a control that publishes into `handle.outputs`."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{owner}.key must be a non-empty string (where the result goes in handle.outputs), got {value!r}")
    return value


def publish(context: BindContext, key: str, value: Any, owner: str) -> None:
    """Put `value` at `handle.outputs[key]` for this call; two controls publishing to one key is an error
    (`apply` refuses it first; this is the backstop)."""
    if key in context.outputs:
        raise ConfigError(f"attnctl: two controls publish to handle.outputs[{key!r}] ({owner} is the second); give them different keys")
    context.outputs[key] = value
