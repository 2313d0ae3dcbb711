"""The SDPA backend: `torch.nn.functional.scaled_dot_product_attention`, with an additive mask where a
control needs one. A plain spec makes exactly the call the stock diffusers processors make, so outputs
are bitwise identical to stock.

Per-key edits (bias, value scale) never need an N x N mask: a (B, H, 1, Nk) mask broadcasts, and a query
range splits the call into row groups. Label masks and windows are made dense here, up to
`DENSE_MASK_LIMIT` mask elements (B * Nq * Nk, or 1 * Nq * Nk for labels every row shares: SDPA broadcasts them);
past that the fused backends (flex, triton) are needed. A window
alone on a large grid runs tiled instead (`window_tiles`: each tile of image queries against its neighbourhood),
with no mask and no size limit (`mask_elements`), except inside torch.compile.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..errors import BackendError
from . import spec as spec_module
from . import window_tiles
from .spec import (
    AttentionSpec,
    IdentityCache,
    LabelMask,
    Window,
    additive_in,
    as_additive,
    bounded_value_scale,
    kept_tensors,
    per_key,
    times_peak,
    version,
)

DENSE_MASK_LIMIT = 1 << 26  # 64M elements: 256 MB as float32


# Dense masks, built once and reused by every layer and step that shares them: label masks per LabelMask object
# (controls build one per layout and pipeline call; the entry dies with the object), windows per Window value.
# Keyed by device, dtype and the label tensors' versions (an in-place change of a label tensor rebuilds).
_LABEL_DENSE: weakref.WeakKeyDictionary[LabelMask, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = weakref.WeakKeyDictionary()
_WINDOW_DENSE: dict[tuple, torch.Tensor] = {}
_WINDOW_CACHE_SIZE = 32


#: CUDA's memory-efficient SDPA kernel copies a mask whose strides (all but the last) are not multiples of 8 elements,
#: at every call (ATen's `preprocess_mask`): SD3 at 1024 px has 4096 image + 333 text tokens, a 99 MiB copy per layer
#: for a label mask. A cached mask is laid out once with its rows padded to a multiple of 8 (`_aligned`).
MASK_ALIGNMENT = 8
#: Device types whose cached masks are laid out so.
ALIGNED_DEVICES = frozenset({"cuda"})


def _aligned(mask: torch.Tensor) -> torch.Tensor:
    """`mask` with the same values as a slice of a tensor whose rows are a multiple of `MASK_ALIGNMENT` wide (on
    `ALIGNED_DEVICES`; elsewhere, or already aligned, `mask` itself)."""
    width = mask.shape[-1]
    if mask.device.type not in ALIGNED_DEVICES or mask.stride(-1) != 1 or width % MASK_ALIGNMENT == 0:
        return mask
    padded = -(-width // MASK_ALIGNMENT) * MASK_ALIGNMENT
    out = mask.new_empty((*mask.shape[:-1], padded))[..., :width]
    return out.copy_(mask)


def _labels_dense(labels: LabelMask, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the (B, 1, Nq, Nk) additive mask in `dtype`, the (B, Nq) fully masked queries), cached per LabelMask.

    While torch.compile traces, the cache's version check cannot be traced: the graph reads the form made before the
    forward (`prepare_labels`), or builds the mask itself when there is none for this device and dtype."""
    if torch.compiler.is_compiling():
        prepared = labels.prepared.get((device, dtype))
        if prepared is not None:
            return prepared
        return _dense_in(labels, dtype, device)
    key = (str(device), dtype, labels.versions())
    per_object = _LABEL_DENSE.get(labels)
    if per_object is None:
        per_object = _LABEL_DENSE[labels] = {}
    cached = per_object.get(key)
    if cached is None:
        per_object.clear()  # a stale version, another dtype: keep one entry per object
        with kept_tensors():
            dense, fully_masked = _dense_in(labels, dtype, device)
            cached = per_object[key] = (_aligned(dense), fully_masked)
    return cached


def _dense_in(labels: LabelMask, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_labels_dense` made: the mask gathered from the table in `dtype` (`_in_dtype` of each entry, as of the float32
    mask, without making the float32 mask first) and the fully masked queries, on `device`."""
    table = _in_dtype(labels.table, dtype)
    dense = (labels if table is labels.table else LabelMask(labels.q_labels, labels.k_labels, table)).dense()
    return dense.to(device), labels.fully_masked_queries().to(device)


def prepare_labels(labels: LabelMask, dtype: torch.dtype, device: torch.device) -> None:
    """Make the dense mask of `labels` in `dtype` on `device` now (outside a graph), for compiled forwards to read: the
    mask is then made once per LabelMask (once per call or handle), not in the graph at every attention call."""
    key = (torch.device(device), dtype)
    if key not in labels.prepared:
        with kept_tensors():
            labels.prepared[key] = _dense_in(labels, dtype, key[0])


def _window_dense(window: Window, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (N, N) additive mask of a window in `dtype`, cached per window value, device and dtype.

    While torch.compile traces, the cache is not read (dynamo would guard on its contents and compile again once the
    call filled it): the graph reads the form made before the forward (`prepare_window`), or builds the mask itself
    when there is none for this device and dtype (then for this image size only: the grid's sizes are constants)."""
    if torch.compiler.is_compiling():
        prepared = window.prepared.get((device, dtype))
        if prepared is not None:
            return prepared
        return as_additive(window.allowed(device), dtype)
    key = (window, str(device), dtype)
    cached = _WINDOW_DENSE.get(key)
    if cached is None:
        with kept_tensors():
            cached = _aligned(as_additive(window.allowed(device), dtype))
        if len(_WINDOW_DENSE) >= _WINDOW_CACHE_SIZE:
            _WINDOW_DENSE.pop(next(iter(_WINDOW_DENSE)))
        _WINDOW_DENSE[key] = cached
    return cached


def prepare_window(window: Window, dtype: torch.dtype, device: torch.device) -> None:
    """Give `window` its dense mask in `dtype` on `device` now (outside a graph; the cached one, `_window_dense`), for
    compiled forwards to read as a tensor whose size is dynamic, as the layer's inputs' are."""
    key = (torch.device(device), dtype)
    if key not in window.prepared:
        window.prepared[key] = _window_dense(window, dtype, key[0])


#: The model's float masks in the queries' dtype, by mask tensor (every layer of a denoiser call passes the same one).
_MASK_IN_DTYPE: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
_MASK_CACHE_SIZE = 4


def _in_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask in `dtype`: -inf kept, other values clamped to the dtype's range (float32's most negative
    value, or a penalty of -1e5, would become -inf in float16 and a row penalised on every key would be empty instead
    of the average the other backends give; +7e4 would become +inf and the row NaN)."""
    if mask.dtype == dtype:
        return mask
    info = torch.finfo(dtype)
    if not mask.is_floating_point() or torch.finfo(mask.dtype).max <= info.max:  # every value fits
        return mask.to(dtype)
    return mask.clamp(info.min, info.max).masked_fill(mask == float("-inf"), float("-inf")).to(dtype)


def _mask_in_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float mask or per-key bias in `dtype` (CUDA's memory-efficient SDPA refuses a bias of another dtype than the
    queries'; the CPU promotes silently), clamped as `_in_dtype` says. Made once per tensor, not at every attention
    call."""
    if mask.dtype == dtype or torch.compiler.is_compiling():
        return _in_dtype(mask, dtype)
    key = (id(mask), version(mask), dtype)
    found = _MASK_IN_DTYPE.get(key)
    if found is not None and found[0]() is mask:
        return found[1]
    if len(_MASK_IN_DTYPE) >= _MASK_CACHE_SIZE:
        _MASK_IN_DTYPE.pop(next(iter(_MASK_IN_DTYPE)))
    with kept_tensors():
        converted = _in_dtype(mask, dtype)
    _MASK_IN_DTYPE[key] = (weakref.ref(mask), converted)
    return converted


def clear_caches() -> None:
    """Forget every cached dense mask."""
    _LABEL_DENSE.clear()
    _WINDOW_DENSE.clear()
    _MASK_IN_DTYPE.clear()
    _SHARED_MASKS.clear()
    _BIASED_MASKS.clear()
    spec_module._ADDITIVE.clear()


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
    if tiled(spec):
        n = spec.window.n_img + spec.window.text_len
        if (nq, nk) != (n, n):
            raise BackendError(f"window covers {(n, n)} tokens but the call has ({nq}, {nk})")
        return window_tiles.attention(q, k, v, spec.window, spec.scale), None
    elements = mask_elements(spec, batch, nq, nk)
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
        edited_mask = _biased(shared, edited_mask, spec, start, stop, q, nk)
    edited_v, peak = v, None
    if spec.value_scale is not None:
        value_scale = per_key(spec.value_scale, "value_scale", keys=nk)
        if v.dtype == torch.float16:  # w * v past float16's range: V times w / peak, the output times peak
            value_scale, peak = bounded_value_scale(spec.value_scale)
        edited_v = v * value_scale[..., None].to(v.dtype)  # (B|1, H|1, Nk, 1)
    edited = _call(q[:, :, start:stop], k, edited_v, edited_mask, spec.scale)
    pieces.append(edited if peak is None else times_peak(edited, peak))
    if stop < nq:
        pieces.append(_call(q[:, :, stop:], k, v, _rows(shared, stop, nq), spec.scale))
    out = pieces[0] if len(pieces) == 1 else _join_queries(pieces)
    if spec.labels is not None:
        _, dead = _labels_dense(spec.labels, q.dtype, q.device)  # (B, Nq)
        out = out.masked_fill(dead[:, None, :, None], 0.0)
    return out, None


def tiled(spec: AttentionSpec) -> bool:
    """Whether `attention` computes `spec` in tiles (`window_tiles`), without a dense mask: a window alone, on a grid
    where the tiles pay off (`window_tiles.tileable`), outside torch.compile (the tiles' plan lookups break a graph;
    in one the window is a dense mask)."""
    return _window_only(spec) and not torch.compiler.is_compiling() and window_tiles.tileable(spec.window)


def mask_elements(spec: AttentionSpec, batch: int, nq: int, nk: int) -> int:
    """Elements of the dense mask `attention` would build for `spec`'s label masks and windows: B x Nq x Nk, or 0
    when there are none or when it computes the window in tiles (`tiled`). What `DENSE_MASK_LIMIT` bounds, and what
    callers pass to `choose_backend` as `dense_elements`."""
    return 0 if tiled(spec) else spec.dense_elements(batch, nq, nk)


def _window_only(spec: AttentionSpec) -> bool:
    """A window and nothing else to apply: the tiled path (`window_tiles`) computes it without an N x N mask."""
    return spec.window is not None and spec.attn_mask is None and spec.labels is None and spec.key_bias is None \
        and spec.value_scale is None and spec.query_range is None


def _join_queries(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The row groups' outputs as one (B, H, N, D) tensor, stored (B, N, H, D): the processors' next step is
    `transpose(1, 2).flatten(2, 3)`, which is then a view instead of a copy, so the concatenation costs no more
    than the copy a single call's output takes there."""
    return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1).transpose(1, 2)


#: The model's mask plus a label mask or window (`_shared_mask`), by the mask tensor and the LabelMask object: the
#: layers of a denoiser call pass one mask tensor (`ControlledProcessor.layer_mask` where a family gives each layer an
#: equal one of its own) and one LabelMask, so the (B, 1, Nq, Nk) sum is made once per call, not at every layer. An
#: entry goes with its mask tensor.
_SHARED_MASKS = IdentityCache(4)


def _shared_mask(spec: AttentionSpec, nq: int, nk: int, q: torch.Tensor) -> torch.Tensor | None:
    """The model's own mask plus label and window masks, broadcastable to (B, H, Nq, Nk); a sum of the model's mask and
    another is cached per mask tensor, LabelMask and window."""
    mask, labels = spec.attn_mask, spec.labels
    if mask is None or (labels is None and spec.window is None) or torch.compiler.is_compiling():
        return _sum_masks(spec, nq, nk, q)
    tensors = (mask, labels.q_labels, labels.k_labels, labels.table) if labels is not None else (mask,)
    extra = (version(mask), labels.versions() if labels is not None else None, spec.window, q.dtype, str(q.device), nq, nk)
    found = _SHARED_MASKS.get(tensors, extra)
    if found is None:
        with kept_tensors():
            found = _SHARED_MASKS.put(tensors, extra, _aligned(_sum_masks(spec, nq, nk, q)))
    return found


#: The edited rows' mask plus the per-key bias (`_biased`), by the shared mask and key bias tensors: every layer of a
#: denoiser call passes the same two, so the (B, H|1, rows, Nk) sum is made once per call, not at every layer. An entry
#: goes with either tensor.
_BIASED_MASKS = IdentityCache(4)


def _biased(shared: torch.Tensor | None, rows: torch.Tensor | None, spec: AttentionSpec, start: int, stop: int,
            q: torch.Tensor, nk: int) -> torch.Tensor:
    """`rows` (the shared mask's rows start:stop, or None) plus the key bias, broadcastable to (B, H, stop - start, Nk).
    A sum with a dense label or window mask is cached (`_BIASED_MASKS`)."""
    key_bias = per_key(_mask_in_dtype(spec.key_bias, q.dtype), "key_bias", keys=nk)[:, :, None, :]  # (B|1, H|1, 1, Nk)
    if rows is None:
        return key_bias
    if (spec.labels is None and spec.window is None) or torch.compiler.is_compiling() or key_bias.requires_grad \
            or shared.requires_grad:
        return rows + key_bias
    tensors = (shared, spec.key_bias)
    extra = (version(shared), version(spec.key_bias), start, stop, q.dtype, str(q.device))
    found = _BIASED_MASKS.get(tensors, extra)
    if found is None:
        with kept_tensors():
            found = _BIASED_MASKS.put(tensors, extra, _aligned(rows + key_bias))
    return found


def _sum_masks(spec: AttentionSpec, nq: int, nk: int, q: torch.Tensor) -> torch.Tensor | None:
    mask = spec.attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = additive_in(mask, q.dtype)  # once per mask tensor, not at every layer
    elif mask is not None and mask.dtype != q.dtype:
        mask = _mask_in_dtype(mask, q.dtype)
    if spec.labels is not None:
        dense, _ = _labels_dense(spec.labels, q.dtype, q.device)
        mask = dense if mask is None else mask + dense
    if spec.window is not None:
        window = _window_dense(spec.window, q.dtype, q.device)
        if window.shape != (nq, nk):
            raise BackendError(f"window covers {tuple(window.shape)} tokens but the call has ({nq}, {nk})")
        mask = window if mask is None else mask + window
    return mask


def _rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]
