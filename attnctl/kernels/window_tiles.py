"""Windows on SDPA without an N x N mask: image queries in tiles, each tile attending to the keys of its own tight
box (the neighbourhood its queries can reach, clipped to the grid), tiles of one size in one batched SDPA call.

A window (`spec.Window`) lets an image token see only nearby image tokens (and every text token). The dense
path (`sdpa._window_dense`) computes every pair and masks most of them away, so on a CPU a window is slower than
full attention. Here the image queries are cut into blocks: runs of `t` tokens for a band (a 1-D window over the
frame-major tokens), `tf` frames x `tr` rows x `tc` columns for a radius window. A block's keys are the tokens of
its box, per dimension `[start - r, stop + r)` clipped to the grid (the edges' boxes are smaller: no padding keys
are computed), plus the text tokens; a small mask keeps exactly the window's pairs inside the box. Blocks whose box
has the same number of keys and the same number of queries share one SDPA call (B x blocks in its batch
dimension); blocks of the same shape at the same place relative to the edges have the same mask, so a group whose
blocks all do stores it once and broadcasts it. The softmax runs over the same allowed keys as the dense path, so
the result is the same up to floating-point rounding, at the cost of the boxes' pairs instead of N x N.

The block shape is chosen per window by a cost model of SDPA on small tiles (`tile_cost`): pairs computed x the
time per pair at `tq` queries per tile, measured on a CPU (one thread, float32, the fused flash kernel): about
3.2 + 64 / tq ns per pair and head (full attention 3.05), so small tiles compute fewer wasted pairs but each pair
costs more. Plans (index tensors, masks) are made once per window value and device, never per call.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.nn.functional as F

from .semantics import window_near
from .spec import Window, kept_tensors

#: Below this many image tokens the dense mask is small and the tiled path's gathers cost more than they save.
MIN_TOKENS = 1024
#: Tiles only where their modelled cost is at most this fraction of full attention's (`tileable`).
MAX_COST = 0.8
#: About this many elements of gathered queries, keys and values at once (at least one tile). The tiles' boxes overlap,
#: so each key is gathered once per box that holds it: all of a call's tiles at once held 24 copies of K and V for a
#: radius (1, 8, 8) window at Wan's 480p (15 GiB per row of Wan 14B in bfloat16). A group's tiles are gathered in
#: chunks within this.
GATHER_BUDGET = 2**25
_PLANS: dict[tuple[Window, str], TilePlan] = {}
_PLAN_CACHE_SIZE = 16

#: Time per (query, key) pair of SDPA over tiles of `tq` queries, relative units: `PAIR_COST + QUERY_OVERHEAD / tq`
#: (measured on a CPU, one thread, float32: 3.2 + 64 / tq ns per pair and head; the fused kernel's small-tile GEMMs).
PAIR_COST, QUERY_OVERHEAD = 3.2, 64.0
_BAND_TILES = (32, 64, 96, 128, 192, 256, 384, 512)
_FRAME_TILES = (1, 2, 3, 4)
_SIDE_TILES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class TileGroup:
    """Blocks of `tq` queries with `box` keys each, computed in one SDPA call: positions in the joint sequence of
    each block's queries (tiles, tq) and keys (tiles, box + text), and the additive mask over them (tiles or 1, tq,
    keys), or None where every pair in the boxes is allowed."""

    queries: torch.Tensor  # (tiles, tq) long, positions in the joint sequence
    keys: torch.Tensor  # (tiles, keys) long, positions in the joint sequence (the box, then the text tokens)
    bias: torch.Tensor | None  # (tiles | 1, tq, keys) float32: 0 allowed, -inf not; None: all allowed
    runs: tuple[int, int] | None = None  # (first query, first key) where each block's queries and keys are runs of
    # consecutive tokens, block i's starting tq x i later (a band without text): views of q, k, v, no gather
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    def chunk_tiles(self, heads: int, dim_k: int, dim_v: int) -> int:
        """How many of the group's tiles (over the batch) are gathered and computed at once: `GATHER_BUDGET`
        elements of queries, keys and values, at least one tile."""
        tq, keys = self.queries.shape[1], self.keys.shape[1]
        return max(1, GATHER_BUDGET // (heads * (tq * dim_k + keys * (dim_k + dim_v))))

    def bias_for(self, dtype: torch.dtype, batch: int) -> torch.Tensor | None:
        """The mask as SDPA takes it for `batch` rows, (B x tiles | 1, 1, tq, keys) in the attention's dtype, made once
        per dtype and batch size (not at every call)."""
        if self.bias is None:
            return None
        found = self._cast.get((dtype, batch))
        if found is None:
            with kept_tensors():
                found = self.bias.to(dtype)[:, None]
                if batch > 1 and found.shape[0] > 1:
                    found = found.repeat(batch, 1, 1, 1)  # batch-major, as the tiles are in SDPA's batch dimension
                self._cast[(dtype, batch)] = found
        return found


@dataclass(frozen=True)
class TilePlan:
    """The blocks of one window on one device, grouped by (queries, keys) per block; `shape`: the block shape
    ((t,) for a band, (tf, tr, tc) for a radius window); `tokens`: the joint sequence's length.

    Per batch size, the rows every group gathers, as indices into the (B x N) rows of a (B, N, H, d) tensor
    (`indices`), made once; on a CPU, the gathered rows go to buffers kept for the latest dtype and shape (`buffers`),
    since a fresh allocation of tens of MB per call costs more in page faults than the gather itself (measured: 7 ms
    against 1.3 ms per call for the wan-cpu 3-D window's keys). Groups of consecutive tokens (`TileGroup.runs`)
    gather nothing: their blocks are views of q, k and v."""

    groups: tuple[TileGroup, ...]
    shape: tuple[int, ...]
    tokens: int
    _indices: dict = field(default_factory=dict, compare=False, repr=False)
    _workspace: dict = field(default_factory=dict, compare=False, repr=False)

    def pairs(self) -> int:
        """(query, key) pairs the tiles compute (text keys included)."""
        return sum(int(g.queries.numel() * g.keys.shape[1]) for g in self.groups)

    def image_queries(self) -> torch.Tensor:
        """Every tile's query positions, concatenated."""
        return torch.cat([g.queries.reshape(-1) for g in self.groups])

    def indices(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query rows, key rows) of every gathered group (not `runs`) in turn, each group batch-major: rows of the
        flattened (B x N)."""
        found = self._indices.get(batch)
        if found is None:
            with kept_tensors():
                device = self.groups[0].queries.device
                offsets = (torch.arange(batch, device=device) * self.tokens)[:, None, None]
                found = tuple(
                    torch.cat([(getattr(g, name)[None] + offsets).reshape(-1) for g in self.groups if g.runs is None]
                              + [torch.zeros(0, dtype=torch.long, device=device)])
                    for name in ("queries", "keys")
                )
            self._indices[batch] = found
        return found

    def buffers(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Buffers for one chunk of gathered rows of `tensors` = (q, k, v) (the largest chunk of any group), reused
        from call to call on a CPU; None elsewhere (the CUDA caching allocator already reuses memory) and when
        autograd could save them for a backward pass."""
        like, _, value = tensors
        if like.device.type != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return None
        batch, heads, _, dim_k = like.shape
        dim_v = value.shape[-1]
        key = (like.dtype, batch, heads, dim_k, dim_v, torch.is_inference_mode_enabled(), threading.get_ident())
        found = self._workspace.get(key)
        if found is None:
            n_q = n_k = 0
            for group in self.groups:
                if group.runs is None:
                    tiles = min(batch * group.queries.shape[0], group.chunk_tiles(heads, dim_k, dim_v))
                    n_q, n_k = max(n_q, tiles * group.queries.shape[1]), max(n_k, tiles * group.keys.shape[1])
            self._workspace.clear()  # one workspace per plan: the latest shape
            found = self._workspace[key] = (
                like.new_empty(n_q, heads, dim_k), like.new_empty(n_k, heads, dim_k), like.new_empty(n_k, heads, dim_v)
            )
        return found


def tile_cost(tq: int, keys: int) -> float:
    """Modelled time of one tile of `tq` queries against `keys` keys (relative units)."""
    return tq * keys * (PAIR_COST + QUERY_OVERHEAD / tq)


def _segments(n: int, size: int, reach: int) -> list[tuple[int, int, int, int]]:
    """Cut `[0, n)` into runs of `size` (the last one shorter): per run (start, length, box start, box length), the box
    being the run widened by `reach` on each side and clipped to `[0, n)`."""
    runs = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        lo, hi = max(0, start - reach), min(n, stop + reach)
        runs.append((start, stop - start, lo, hi - lo))
    return runs


def _dims(window: Window) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(grid, reach) of the window's image tokens: one dimension for a band, (frames, rows, columns) for a radius."""
    if window.band is not None:
        return (window.n_img,), (window.band,)
    h, w = window.grid_hw
    return (window.frames, h, w), window.reach


def _shape_cost(grid: tuple[int, ...], reach: tuple[int, ...], shape: tuple[int, ...], text: int) -> float:
    per_dim = [Counter((length, box) for _, length, _, box in _segments(n, s, r)) for n, s, r in zip(grid, shape, reach)]
    total = 0.0
    for combo in product(*(c.items() for c in per_dim)):
        tq, box, count = 1, 1, 1
        for (length, span), times in combo:
            tq, box, count = tq * length, box * span, count * times
        total += count * tile_cost(tq, box + text)
    return total


def _candidates(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    if len(grid) == 1:
        return [(t,) for t in _BAND_TILES if t <= grid[0]] or [(grid[0],)]
    frames, h, w = grid
    return [
        (tf, tr, tc) for tf in _FRAME_TILES for tr in _SIDE_TILES for tc in _SIDE_TILES
        if tf <= frames and tr <= h and tc <= w and tf * tr * tc >= 16
    ] or [(1, h, w)]


@functools.lru_cache(maxsize=64)
def choose_shape(window: Window) -> tuple[int, ...]:
    """The block shape of least modelled cost (`tile_cost` summed over the blocks, clipped boxes and text included)."""
    grid, reach = _dims(window)
    return min(_candidates(grid), key=lambda shape: (_shape_cost(grid, reach, shape, window.text_len), shape))


@functools.lru_cache(maxsize=64)
def planned_cost(window: Window) -> float:
    """The modelled cost of the window's tiles, relative to full attention over the same tokens."""
    grid, reach = _dims(window)
    n = window.n_img + window.text_len
    return _shape_cost(grid, reach, choose_shape(window), window.text_len) / (window.n_img * n * PAIR_COST)


def plan(window: Window, device: torch.device) -> TilePlan:
    """The tiles of `window` on `device`, made once per window value and device."""
    key = (window, str(device))
    found = _PLANS.get(key)
    if found is not None:
        return found
    with kept_tensors():
        found = make_plan(window, device)
    if len(_PLANS) >= _PLAN_CACHE_SIZE:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = found
    return found


def _block_positions(grid: tuple[int, ...], runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Flat row-major positions of the block `runs` = ((start, length) per dimension) on `grid`."""
    flat = torch.zeros((), dtype=torch.long)
    for (start, length), stride in zip(runs, _strides(grid)):
        flat = flat[..., None] + (torch.arange(start, start + length) * stride)
    return flat.reshape(-1)


def _strides(grid: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(grid):
        strides.append(step)
        step *= n
    return strides[::-1]


def make_plan(window: Window, device: torch.device | str, shape: tuple[int, ...] | None = None) -> TilePlan:
    """The tiles of `window` with blocks of `shape` (default: `choose_shape`), not cached (`plan` caches)."""
    grid, reach = _dims(window)
    shape = tuple(shape) if shape is not None else choose_shape(window)
    if len(shape) != len(grid) or any(not 1 <= s <= n for s, n in zip(shape, grid)):
        raise ValueError(f"a block shape for this window has {len(grid)} sizes within {grid}, got {shape!r}")
    device = torch.device(device)
    text = window.text_len
    start = text if window.text_first else 0  # the image tokens' offset in the joint sequence
    text_keys = torch.arange(text) + (0 if window.text_first else window.n_img)
    per_dim = [_segments(n, s, r) for n, s, r in zip(grid, shape, reach)]
    # blocks by (queries, keys): one SDPA call each; within a group, blocks of the same place relative to the grid's
    # edges (per dimension: length, offset in the box, box length) have the same mask, computed once
    groups_of: dict[tuple[int, int], list[tuple[tuple, torch.Tensor, torch.Tensor]]] = {}
    for combo in product(*per_dim):
        queries = _block_positions(grid, tuple((s, length) for s, length, _, _ in combo))
        keys = _block_positions(grid, tuple((lo, span) for _, _, lo, span in combo))
        place = tuple((length, s - lo, span) for s, length, lo, span in combo)
        groups_of.setdefault((queries.numel(), keys.numel()), []).append((place, queries, keys))
    masks: dict[tuple, torch.Tensor] = {}
    groups = []
    for (_, _), members in sorted(groups_of.items()):
        for place, queries, keys in members:
            if place not in masks:
                masks[place] = window_near(window, queries[:, None], keys[None, :])
        places = list(dict.fromkeys(place for place, _, _ in members))
        if len(places) == 1:  # every block of the group has the same mask: one, broadcast over the blocks
            allowed = masks[places[0]][None]
        else:
            allowed = torch.stack([masks[place] for place, _, _ in members])
        bias = None
        if not bool(allowed.all()):
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, -math.inf)
            if text:
                bias = F.pad(bias, (0, text))  # every image query sees every text token
            bias = bias.to(device)
        queries = torch.stack([q for _, q, _ in members])
        keys = torch.stack([k for _, _, k in members])
        runs = None if text else _runs(queries, keys)
        keys = torch.cat([keys + start, text_keys.expand(keys.shape[0], text)], dim=1)
        groups.append(TileGroup((queries + start).to(device), keys.to(device), bias, runs))
    return TilePlan(tuple(groups), shape, window.n_img + text)


def _runs(queries: torch.Tensor, keys: torch.Tensor) -> tuple[int, int] | None:
    """(first query, first key) when every block's queries and keys are consecutive tokens and block i starts
    tq x i after block 0 (so the blocks are views of the tensors), else None."""
    count, tq = queries.shape
    q0, k0 = queries[:, :1], keys[:, :1]
    consecutive = bool((queries == q0 + torch.arange(tq)).all()) and bool((keys == k0 + torch.arange(keys.shape[1])).all())
    steps = torch.arange(count)[:, None] * tq
    if consecutive and bool((q0 == q0[0] + steps).all()) and bool((k0 == k0[0] + steps).all()):
        return int(q0[0]), int(k0[0])
    return None


def tileable(window: Window) -> bool:
    """Whether the tiled path is worth it for `window`: enough image tokens, and the tiles' modelled cost at most
    `MAX_COST` of full attention's (the dense mask costs full attention and more; a band as wide as the sequence
    saves nothing). Measured on a CPU: tiles at a modelled 0.52-0.75 ran 0.6-0.85 of full attention's time, the
    dense mask 1.1-1.2."""
    if window.n_img < MIN_TOKENS:
        return False
    return planned_cost(window) <= MAX_COST


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None, tiles: TilePlan | None = None
) -> torch.Tensor:
    """Windowed attention (B, H, N, D) over the joint sequence `window` describes, image queries tiled. Each group's
    tiles go into SDPA's batch dimension (B x tiles, H, tile queries, box keys): four dimensions keep SDPA on its
    fused CPU kernel (five fall back to the math path). The result is stored (B, N, H, D) and returned as its
    (B, H, N, D) view: the processors' next step, `transpose(1, 2).flatten(2, 3)`, is then free. `tiles`: a plan of
    this window on q's device (default: `plan(window, q.device)`, cached)."""
    n_img, text = window.n_img, window.text_len
    tiles = tiles if tiles is not None else plan(window, q.device)
    batch, heads, n, dim_k = q.shape
    dim_v = v.shape[-1]
    q_index, k_index = tiles.indices(batch)
    buffers = tiles.buffers(q, k, v) or (None, None, None)
    # the processors' layout: (B, N, H, d) storage viewed as (B, H, N, d); rows of one token are contiguous
    q_rows, k_rows, v_rows = (x.transpose(1, 2) if x.transpose(1, 2).is_contiguous() else x.transpose(1, 2).contiguous()
                              for x in (q, k, v))

    def gather(rows: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:  # (rows, H, d)
        rows = rows.view(batch * n, heads, rows.shape[-1])
        if buffer is None:
            return torch.index_select(rows, 0, index)
        return torch.index_select(rows, 0, index, out=buffer[: index.numel()])

    out = q.new_empty(batch, n, heads, dim_v)
    out_rows = out.view(batch * n, heads, dim_v)
    kwargs = {} if scale is None else {"scale": scale}
    q_at = k_at = 0
    for group in tiles.groups:
        count, tq = group.queries.shape
        box = group.keys.shape[1]
        if group.runs is not None:  # views: block i's queries and keys start tq x i tokens after block 0's
            first_q, first_k = group.runs
            for b in range(batch):
                q_t = q_rows[b, first_q : first_q + count * tq].view(count, tq, heads, dim_k).transpose(1, 2)
                k_t, v_t = (x[b, first_k:].unfold(0, box, tq)[:count].transpose(2, 3) for x in (k_rows, v_rows))
                out_t = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=group.bias_for(q.dtype, 1), **kwargs)
                out[b, first_q : first_q + count * tq].view(count, tq, heads, dim_v).copy_(out_t.transpose(1, 2))
            continue
        rows, chunk = batch * count, group.chunk_tiles(heads, dim_k, dim_v)
        bias = group.bias_for(q.dtype, batch)
        for first in range(0, rows, chunk):  # tiles batch-major, as the indices and a per-tile bias are
            tiles_here = min(chunk, rows - first)
            queries = q_index[q_at + first * tq : q_at + (first + tiles_here) * tq]
            keys = k_index[k_at + first * box : k_at + (first + tiles_here) * box]
            q_t = gather(q_rows, queries, buffers[0]).view(tiles_here, tq, heads, dim_k).transpose(1, 2)
            k_t = gather(k_rows, keys, buffers[1]).view(tiles_here, box, heads, dim_k).transpose(1, 2)
            v_t = gather(v_rows, keys, buffers[2]).view(tiles_here, box, heads, dim_v).transpose(1, 2)
            mask = bias if bias is None or bias.shape[0] == 1 else bias[first : first + tiles_here]
            out_t = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, **kwargs)
            out_rows[queries.view(tiles_here, tq)] = out_t.transpose(1, 2)  # (tiles, tq, H, d)
        q_at, k_at = q_at + rows * tq, k_at + rows * box
    out = out.view(batch, n, heads, dim_v)
    if text:
        rows = slice(0, text) if window.text_first else slice(n_img, n)
        out_text = F.scaled_dot_product_attention(q[:, :, rows], k, v, **kwargs)  # text sees every token
        out[:, rows] = out_text.transpose(1, 2)
    return out.transpose(1, 2)
