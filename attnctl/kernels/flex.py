"""The flex backend: `torch.nn.attention.flex_attention`, compiled once, with tiny score / mask functions.

FlexAttention (Dong, Feng, He, Huang, Lin and Zhang 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels") turns a `score_mod(score, b, h, q_idx, kv_idx)` and a
`mask_mod(b, h, q_idx, kv_idx)` into one fused kernel; a `BlockMask` made from the mask_mod lets it skip
fully masked tiles. In the style of attention-gym, each control is a factory returning a small pure
closure with a readable `__name__`:

- score mods: `key_bias` (per-key additive logits), `label_bias` (the finite part of a label table),
  `additive_mask` (the model's own mask);
- mask mods: `label_mask` (label pairs whose table entry is -inf are cut), `window_mask` (a 2-D radius, a 3-D
  radius over a video's frames x rows x cols or a 1-D band over the image grid; text tokens unrestricted), combined with `and_masks`.

Per-key edits (bias, value scale) act on the `query_range` rows only: the call is split into row groups
as the sdpa backend does, and the value scale multiplies V for the edited group (`A (w V)`). Block masks
are cached per layout (window, group, resolution) and, for labels, per `LabelMask` object (controls build
it once per pipeline call); past `MASK_CHUNK_ELEMENTS` mask elements one is built over chunks of query blocks,
so making it never holds the N x N mask (video sizes). The closures capture tensors, which torch.compile treats
as inputs: new bias values, new labels, new steps never recompile; a new shape or a new combination of controls
compiles once.
Row groups have their own shapes, so a joint layer with a query range compiles up to three times.

Two things flex does not do here, listed in the capability table that `auto` reads:
- PLADIS's sparse attention (`spec.sparse`): entmax needs a per-row threshold, which an element-wise
  score_mod cannot compute; this backend refuses it (use `triton` or `reference`).
- log-sum-exp on CPU: compiled flex on CPU does not return it (torch raises "return_lse is not supported
  yet"); it does on CUDA.

Plain calls (no control, or only the model's own mask) go to torch SDPA: that is what flex would compute,
without a compilation. Rows whose every key is masked give zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, flex_attention

from ..errors import BackendError, ConfigError, KernelCompileError, UnsupportedInputError
from . import sdpa
from .semantics import labels_for_batch
from .spec import (
    AttentionSpec,
    LabelMask,
    Window,
    additive_in,
    bounded_value_scale,
    check_kernel_dtypes,
    per_key,
    times_peak,
)

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Compiled graphs the flex function may hold (torch's default recompile limit, 8, is too few for a UNet's
#: shapes times control combinations; past the limit torch silently falls back to an unfused, N x N path).
RECOMPILE_LIMIT = 256
#: Features flex cannot do on a device type even though the backend has them elsewhere.
DEVICE_LIMITS: dict[str, tuple[str, ...]] = {"cpu": ("lse",)}


# ---------------------------------------------------------------------------------------------------------
# score_mod / mask_mod factories
# ---------------------------------------------------------------------------------------------------------


def key_bias(bias: torch.Tensor) -> ScoreMod:
    """`score + bias[b, h, kv]`; bias (B, H, Nk) float32."""

    def key_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]

    return key_bias


def label_bias(q_labels: torch.Tensor, k_labels: torch.Tensor, table: torch.Tensor, offset: int = 0) -> ScoreMod:
    """`score + table[b, q_label, k_label]` for the finite entries of a label table (-inf entries are the
    mask_mod's job); `offset` is the first query row of the group the call covers."""

    def label_bias(score, b, h, q_idx, kv_idx):
        return score + table[b, q_labels[b, q_idx + offset], k_labels[b, kv_idx]]

    return label_bias


def additive_mask(mask: torch.Tensor, offset: int = 0) -> ScoreMod:
    """`score + mask[b, h, q, kv]` for a 4-D additive mask whose size-1 dims broadcast."""
    sb, sh, sq = (int(mask.shape[i] > 1) for i in range(3))

    def additive_mask(score, b, h, q_idx, kv_idx):
        return score + mask[b * sb, h * sh, (q_idx + offset) * sq, kv_idx]

    return additive_mask


def compose(mods: tuple[ScoreMod, ...]) -> ScoreMod | None:
    """One score_mod applying `mods` in order (None when there are none)."""
    if not mods:
        return None
    if len(mods) == 1:
        return mods[0]

    def composed(score, b, h, q_idx, kv_idx):
        for mod in mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    composed.__name__ = "+".join(mod.__name__ for mod in mods)
    return composed


def label_mask(q_labels: torch.Tensor, k_labels: torch.Tensor, allowed: torch.Tensor, offset: int = 0) -> MaskMod:
    """Keep pairs whose labels may interact: `allowed[b, q_label, k_label]` (bool, (B, Lq, Lk))."""

    def label_mask(b, h, q_idx, kv_idx):
        return allowed[b, q_labels[b, q_idx + offset], k_labels[b, kv_idx]]

    return label_mask


def window_mask(window: Window, offset: int = 0, device: torch.device | str | None = None) -> MaskMod:
    """Local attention over the image grid (index arithmetic over the declared canvas); text is unrestricted.
    A 3-D window reads each token's frame, row and column from small tables on `device` (on CPU this halves the
    mask's cost against integer division per pair, which dominates there: no tile is wholly inside a 3-D window)."""
    rows, cols = window.grid_hw
    n_img = window.n_img
    start = window.text_len if window.text_first else 0

    def image_index(idx):
        i = idx - start
        return i, (i >= 0) & (i < n_img)

    if window.radius is not None and len(window.radius) == 2:
        rh, rw = window.radius

        def window_2d(b, h, q_idx, kv_idx):
            qi, q_img = image_index(q_idx + offset)
            ki, k_img = image_index(kv_idx)
            near = ((qi // cols - ki // cols).abs() <= rh) & ((qi % cols - ki % cols).abs() <= rw)
            return near | ~q_img | ~k_img

        return window_2d
    if window.radius is not None:  # (rf, rh, rw) over frame-major frames x rows x cols
        rf, rh, rw = window.radius
        token = torch.arange(n_img, device=device)
        frame_of = token.div(rows * cols, rounding_mode="floor").int()
        row_of = token.remainder(rows * cols).div(cols, rounding_mode="floor").int()
        col_of = token.remainder(cols).int()
        last = max(n_img - 1, 0)

        def window_3d(b, h, q_idx, kv_idx):
            qi, q_img = image_index(q_idx + offset)
            ki, k_img = image_index(kv_idx)
            qi, ki = qi.clamp(0, last), ki.clamp(0, last)  # text tokens: any entry (they are let through below)
            near = ((frame_of[qi] - frame_of[ki]).abs() <= rf) & ((row_of[qi] - row_of[ki]).abs() <= rh)
            near = near & ((col_of[qi] - col_of[ki]).abs() <= rw)
            return near | ~q_img | ~k_img

        return window_3d
    band = window.band

    def window_band(b, h, q_idx, kv_idx):
        qi, q_img = image_index(q_idx + offset)
        ki, k_img = image_index(kv_idx)
        return ((qi - ki).abs() <= band) | ~q_img | ~k_img

    return window_band


# ---------------------------------------------------------------------------------------------------------
# Block masks, cached per layout / per LabelMask
# ---------------------------------------------------------------------------------------------------------

#: Mask elements (batch x query rows x keys) a BlockMask is evaluated over at once. `create_block_mask` evaluates the
#: mask_mod over its whole grid (bool results, int64 / int32 index intermediates: about 2 bytes an element for labels,
#: 9 to 17 for windows), which at video sizes is gigabytes; larger masks are built over chunks of query blocks
#: (a chunk of 16M elements peaks near 32 MiB for labels, 270 MiB for a 2-D window).
MASK_CHUNK_ELEMENTS = 1 << 24
#: The BlockMask's tile (query rows x keys), torch's default.
MASK_BLOCK = 128


def _shifted(mod: MaskMod, first: int) -> MaskMod:
    def shifted(b, h, q_idx, kv_idx):
        return mod(b, h, q_idx + first, kv_idx)

    return shifted


def _create_block_mask(mod: MaskMod, batch: int | None, nq: int, nk: int, device: torch.device) -> BlockMask:
    """`create_block_mask(mod, batch, None, nq, nk)`, evaluating `mod` over at most `MASK_CHUNK_ELEMENTS` elements at
    a time (but at least one block of query rows): chunks of whole query blocks, each a BlockMask of its rows, whose
    per-block kv lists (one row of blocks each, independent of the others) are joined into one BlockMask with `mod`."""
    rows = MASK_CHUNK_ELEMENTS // max((batch or 1) * nk, 1)
    if rows >= nq:
        return create_block_mask(mod, batch, None, nq, nk, device=device, BLOCK_SIZE=MASK_BLOCK)
    rows = max(rows // MASK_BLOCK, 1) * MASK_BLOCK
    parts = []
    for first in range(0, nq, rows):
        part = create_block_mask(_shifted(mod, first), batch, None, min(rows, nq - first), nk, device=device, BLOCK_SIZE=MASK_BLOCK)
        parts.append((part.kv_num_blocks, part.kv_indices, part.full_kv_num_blocks, part.full_kv_indices))
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = (torch.cat(t, dim=2) for t in zip(*parts))
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, BLOCK_SIZE=MASK_BLOCK, mask_mod=mod, seq_lengths=(nq, nk)
    )


_WINDOW_MASKS: dict[tuple, BlockMask] = {}
_LABEL_MASKS: dict[int, dict[tuple, BlockMask]] = {}
_LABEL_PARTS: dict[int, tuple] = {}
_WINDOW_CACHE_SIZE = 64


def _label_parts(labels: LabelMask, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(q_labels, k_labels, allowed, finite table, has soft penalties), once per LabelMask object."""
    key = (batch, labels.versions())
    cached = _LABEL_PARTS.get(id(labels))  # no reference to `labels` itself: the entry dies with it
    if cached is None or cached[0] != key:
        table = labels.table.float().expand(batch, -1, -1).contiguous()
        allowed = table > float("-inf")
        finite = torch.where(allowed, table, 0.0)
        soft = bool((finite != 0).any())  # one host sync per LabelMask, not per step
        if cached is None:
            weakref.finalize(labels, _LABEL_PARTS.pop, id(labels), None)
        cached = _LABEL_PARTS[id(labels)] = (key, (labels.q_labels.long(), labels.k_labels.long(), allowed, finite, soft))
    return cached[1]


def block_mask(spec: AttentionSpec, batch: int, group: tuple[int, int], nk: int, device: torch.device) -> BlockMask | None:
    """The BlockMask of the labels and window of `spec` for query rows `group`, or None."""
    if spec.labels is None and spec.window is None:
        return None
    start, stop = group
    window_key = (spec.window, group, nk, str(device)) if spec.window is not None else None
    if spec.labels is None:
        cached = _WINDOW_MASKS.get(window_key)
        if cached is None:
            cached = _create_block_mask(window_mask(spec.window, start, device), None, stop - start, nk, device)
            if len(_WINDOW_MASKS) >= _WINDOW_CACHE_SIZE:
                _WINDOW_MASKS.pop(next(iter(_WINDOW_MASKS)))
            _WINDOW_MASKS[window_key] = cached
        return cached
    labels = spec.labels
    key = (window_key, group, nk, batch, str(device), labels.versions())
    per_object = _LABEL_MASKS.get(id(labels))
    if per_object is None:
        per_object = _LABEL_MASKS[id(labels)] = {}
        weakref.finalize(labels, _LABEL_MASKS.pop, id(labels), None)
    cached = per_object.get(key)
    if cached is None:
        q_labels, k_labels, allowed, _, _ = _label_parts(labels, batch)
        mod = label_mask(q_labels, k_labels, allowed, start)
        if spec.window is not None:
            mod = and_masks(mod, window_mask(spec.window, start, device))
            mod.__name__ = "label_mask&window"
        cached = per_object[key] = _create_block_mask(mod, batch, stop - start, nk, device)
    return cached


_GROUPED: dict[int, dict[tuple, tuple]] = {}


def grouped_layout(labels: LabelMask, batch: int, nq: int, nk: int, device: torch.device) -> tuple:
    """(q_perm, k_perm, BlockMask over the label-sorted order), once per LabelMask object, versions and size.

    Sorting the tokens by label (stable) makes most blocks of a region layout fully masked or fully open, which
    flex then skips or runs without its mask_mod (the same grouping as `triton_labels`); the entry dies with
    the LabelMask."""
    key = (batch, nq, nk, str(device), labels.versions())
    per_object = _GROUPED.get(id(labels))
    if per_object is None:
        per_object = _GROUPED[id(labels)] = {}
        weakref.finalize(labels, _GROUPED.pop, id(labels), None)
    cached = per_object.get(key)
    if cached is None:
        q_labels, k_labels, allowed, _, _ = _label_parts(labels, batch)
        q_sorted, q_perm = torch.sort(q_labels, dim=-1, stable=True)
        k_sorted, k_perm = (q_sorted, q_perm) if labels.k_labels is labels.q_labels else torch.sort(k_labels, dim=-1, stable=True)
        mask = _create_block_mask(label_mask(q_sorted, k_sorted, allowed), batch, nq, nk, device)
        cached = per_object[key] = (q_perm, k_perm, q_sorted, k_sorted, mask)
    return cached


def grouped(spec: AttentionSpec) -> bool:
    """Whether `attention` runs `spec` on the label-sorted order: labels without a window, the model's mask or
    a query range for per-key edits (those index the token order)."""
    edited = spec.key_bias is not None or spec.value_scale is not None
    return spec.labels is not None and spec.window is None and spec.attn_mask is None and not (edited and spec.query_range is not None)


def clear_caches() -> None:
    """Forget every cached block mask."""
    _WINDOW_MASKS.clear()
    _LABEL_MASKS.clear()
    _LABEL_PARTS.clear()
    _GROUPED.clear()


# ---------------------------------------------------------------------------------------------------------
# The compiled call
# ---------------------------------------------------------------------------------------------------------


#: The name compile failures of this backend are recorded under (`attnctl.kernels.KERNEL_FAILURES`).
FLEX_KERNEL = "flex_attention"


@functools.lru_cache(maxsize=1)
def compiled_flex() -> Callable:
    """`flex_attention` compiled once per process (dynamic=False: one graph per shape, reused every step)."""
    return torch.compile(flex_attention, dynamic=False)


def _recompile_limit():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), RECOMPILE_LIMIT)})


#: Exceptions (by type name, anywhere in the cause chain) that mean compiled flex attention could not be built for
#: the device: Inductor / Dynamo compile failures, a Triton kernel that does not fit (shared memory on 99 KB cards).
COMPILE_FAILURES = frozenset({"BackendCompilerFailed", "InductorError", "OutOfResources", "CompilationError", "PTXASError"})


def _is_compile_failure(error: BaseException) -> bool:
    seen, inner = set(), error
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if type(inner).__name__ in COMPILE_FAILURES or "out of resource" in str(inner).lower():
            return True
        inner = inner.__cause__ or inner.__context__
    return False


def _flex_call(q, k, v, score_mod, mask, scale, return_lse):
    """The compiled call; a compile failure becomes `KernelCompileError` ("flex_attention"), which `auto` falls back on."""
    try:
        return _compiled_call(q, k, v, score_mod, mask, scale, return_lse)
    except Exception as error:
        if isinstance(error, BackendError) or not _is_compile_failure(error):
            raise
        raise KernelCompileError(FLEX_KERNEL, str(q.device), error, what="compiled") from error


def _compiled_call(q, k, v, score_mod, mask, scale, return_lse):
    fn = compiled_flex()
    with _recompile_limit():
        if not return_lse:
            return fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale), None
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:  # torch < 2.9
            return fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, return_lse=True)
        out, aux = fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse


def _mask4(mask: torch.Tensor, nq: int, nk: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's mask as `additive_mask` reads it: 4-D, additive, a bool mask in `dtype` (`additive_in`: made once
    per mask), a float mask as it is (the score_mod adds it to the float32 score, which promotes it exactly: no float32
    copy of a dense (B, 1, N, N) mask at every call)."""
    mask = additive_in(mask, dtype)
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[-1] != nk or mask.shape[-2] not in (1, nq):
        raise ConfigError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, H, {nq}, {nk})")
    return mask


def check_spec(spec: AttentionSpec, device: torch.device) -> None:
    if spec.sparse is not None:
        raise BackendError(
            "the flex backend cannot apply sparse (PLADIS) attention: entmax needs a per-row threshold that an "
            "element-wise score_mod cannot express; use backend='triton' (CUDA) or 'reference'"
        )
    if spec.return_lse and "lse" in DEVICE_LIMITS.get(device.type, ()):
        raise BackendError("the flex backend cannot return log-sum-exp on CPU (compiled flex does not support it there)")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise UnsupportedInputError for tensors compiled flex does not compile for (another dtype than fp16 / bf16 /
    fp32, no queries or no keys): a failure of these tensors, not of flex on the device (`auto` moves the call on)."""
    check_kernel_dtypes(q, k, v, "flex")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise UnsupportedInputError(f"the flex backend needs at least one query and one key, got {q.shape[2]} and {k.shape[2]}")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over (B, H, N, D) with the changes of `spec`: (out, log-sum-exp or None)."""
    check_spec(spec, q.device)
    if spec.is_plain and not spec.return_lse:
        return sdpa.attention(q, k, v, spec)
    check_inputs(q, k, v)
    batch, heads, nq, _ = q.shape
    nk = k.shape[2]
    if spec.labels is not None:  # labels every row shares (one row): per batch row, as the mods read them
        spec = dataclasses.replace(spec, labels=labels_for_batch(spec.labels, batch))
    if spec.window is not None:
        n = spec.window.n_img + spec.window.text_len
        if nq != n or nk != n:
            raise ConfigError(f"window covers {n} tokens (grid {spec.window.grid_hw} + {spec.window.text_len} text) but the call has ({nq}, {nk})")
    if spec.labels is not None and (tuple(spec.labels.q_labels.shape) != (batch, nq) or tuple(spec.labels.k_labels.shape) != (batch, nk)):
        raise ConfigError(
            f"label vectors must be ({batch}, {nq}) and ({batch}, {nk}), got {tuple(spec.labels.q_labels.shape)} and "
            f"{tuple(spec.labels.k_labels.shape)}"
        )
    if grouped(spec):
        return _grouped_attention(q, k, v, spec)
    mask = _mask4(spec.attn_mask, nq, nk, q.dtype) if spec.attn_mask is not None else None
    bias = None
    if spec.key_bias is not None:
        bias = per_key(spec.key_bias, "key_bias", batch=batch, heads=heads, keys=nk).float().expand(batch, heads, nk).contiguous()
    scaled_v, peak = v, None
    if spec.value_scale is not None:
        w, peak = _value_scale(spec.value_scale, v.dtype, batch, heads, nk)
        scaled_v = v * w[..., None]
    edited = spec.key_bias is not None or spec.value_scale is not None
    start, stop = spec.query_range if (spec.query_range is not None and edited) else (0, nq)
    groups = [(a, b, (a, b) == (start, stop)) for a, b in ((0, start), (start, stop), (stop, nq)) if b > a]
    outs, lses = [], []
    for a, b, in_range in groups:
        mods: list[ScoreMod] = []
        if mask is not None:
            mods.append(additive_mask(mask, a))
        if in_range and bias is not None:
            mods.append(key_bias(bias))
        if spec.labels is not None:
            q_labels, k_labels, _, finite, soft = _label_parts(spec.labels, batch)
            if soft:
                mods.append(label_bias(q_labels, k_labels, finite, a))
        out, lse = _flex_call(
            q[:, :, a:b], k, scaled_v if in_range else v, compose(tuple(mods)), block_mask(spec, batch, (a, b), nk, q.device),
            spec.scale, spec.return_lse,
        )
        outs.append(out if not (in_range and peak is not None) else times_peak(out, peak))
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = None
    if spec.return_lse:
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return out, lse


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec):
    """Label masks on the label-sorted order: gather q / k / v rows by the cached permutations, run flex with the
    grouped BlockMask, scatter the output rows (and log-sum-exp) back."""
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    q_perm, k_perm, q_sorted, k_sorted, mask = grouped_layout(spec.labels, batch, nq, nk, q.device)

    def rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return t.gather(2, perm[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))

    vv, peak = v, None
    if spec.value_scale is not None:
        w, peak = _value_scale(spec.value_scale, v.dtype, batch, heads, nk)
        vv = v * w[..., None]
    mods: list[ScoreMod] = []
    if spec.key_bias is not None:
        bias = per_key(spec.key_bias, "key_bias", batch=batch, heads=heads, keys=nk).float().expand(batch, heads, nk)
        mods.append(key_bias(bias.gather(2, k_perm[:, None, :].expand(-1, heads, -1)).contiguous()))
    _, _, _, finite, soft = _label_parts(spec.labels, batch)
    if soft:
        mods.append(label_bias(q_sorted, k_sorted, finite))
    out_g, lse_g = _flex_call(rows(q, q_perm), rows(k, k_perm), rows(vv, k_perm), compose(tuple(mods)), mask, spec.scale, spec.return_lse)
    if peak is not None:
        out_g = times_peak(out_g, peak)
    out = torch.empty_like(out_g).scatter_(2, q_perm[:, None, :, None].expand(-1, heads, -1, out_g.shape[3]), out_g)
    lse = None
    if lse_g is not None:
        lse = torch.empty_like(lse_g).scatter_(2, q_perm[:, None, :].expand(-1, heads, -1), lse_g)
    return out, lse


def _value_scale(
    value_scale: torch.Tensor, dtype: torch.dtype, batch: int, heads: int, nk: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the value scale (B|1, H|1, Nk) in `dtype`, None), or in float16 (value scale / peak, peak)
    (`bounded_value_scale`: w * v past float16's range; the output times peak)."""
    w = per_key(value_scale, "value_scale", batch=batch, heads=heads, keys=nk)
    if dtype != torch.float16:
        return w.to(dtype), None
    w, peak = bounded_value_scale(value_scale)
    return w.to(dtype), peak
