"""Windows on SDPA without an N x N mask: image queries in tiles, each tile attending to the keys of its bounding
box (a local neighbourhood gathered once per window), all tiles in one batched SDPA call.

A window (`spec.Window`) lets an image token see only nearby image tokens (and every text token). The dense
path (`sdpa._window_dense`) computes every pair and masks most of them away, so on a CPU a window is slower than
full attention. Here the image queries are cut into tiles: a run of `tile` tokens for a band; one frame x `tr` rows
x `tc` columns for a radius window. A tile's keys are the tokens of its bounding box under the window (the band's
`tile + 2w` tokens; for a radius, the frames `f +- rf`, rows `r0 - rh .. r1 + rh`, columns `c0 - rw .. c1 + rw`),
plus the text tokens; a small mask keeps exactly the window's pairs inside the box (and hides padding past the
grid's edges). The softmax runs over the same allowed keys as the dense path, so the result is the same up to
floating-point rounding, at the cost of the box's pairs instead of N x N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .semantics import window_near
from .spec import Window

#: Below this many image tokens the dense mask is small and the tiled path's gathers cost more than they save.
MIN_TOKENS = 1024
_PLANS: dict[tuple[Window, str], TilePlan] = {}
_PLAN_CACHE_SIZE = 16


@dataclass(frozen=True)
class TilePlan:
    """Index tensors of one window on one device: the image-token position of each tile's queries and box keys
    (padding repeats position 0), the box mask (tiles, queries, keys) as an additive bias, and the order that puts
    the tiles' valid query rows back in token order."""

    queries: torch.Tensor  # (tiles, tq) long
    keys: torch.Tensor  # (tiles, box) long
    bias: torch.Tensor  # (tiles, tq, box) float32: 0 allowed, -inf not
    order: torch.Tensor  # (n_img,) long: flat tile-query rows in token order
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    def pairs(self) -> int:
        return int(self.bias.shape[0] * self.bias.shape[1] * self.bias.shape[2])

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask in the attention's dtype, cast once per dtype (not at every call)."""
        found = self._cast.get(dtype)
        if found is None:
            with torch.inference_mode(False):
                found = self._cast[dtype] = self.bias.to(dtype)
        return found


def _band_tile(band: int) -> int:
    """Query tokens per tile of a band (measured on a CPU: larger tiles run SDPA faster, smaller ones gather less)."""
    return max(64, min(512, band // 2))


def _radius_tile(window: Window) -> tuple[int, int]:
    """(rows, columns) per tile of a radius window: twice the radius, at least 4."""
    (h, w), (_, rh, rw) = window.grid_hw, window.reach
    return min(h, max(4, 2 * rh)), min(w, max(4, 2 * rw))


def _band_plan(n_img: int, band: int, device: torch.device, tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tile = tile if tile is not None else _band_tile(band)
    starts = torch.arange(0, n_img, tile, device=device)
    queries = starts[:, None] + torch.arange(tile, device=device)[None, :]
    keys = starts[:, None] - band + torch.arange(tile + 2 * band, device=device)[None, :]
    return queries, keys


def _radius_plan(window: Window, device: torch.device, tile: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    (h, w), frames = window.grid_hw, window.frames
    rf, rh, rw = window.reach
    tr, tc = tile if tile is not None else _radius_tile(window)
    f, r0, c0 = torch.meshgrid(
        torch.arange(frames, device=device), torch.arange(0, h, tr, device=device), torch.arange(0, w, tc, device=device),
        indexing="ij",
    )
    f, r0, c0 = (t.reshape(-1, 1) for t in (f, r0, c0))
    qr, qc = torch.meshgrid(torch.arange(tr, device=device), torch.arange(tc, device=device), indexing="ij")
    q_row, q_col = r0 + qr.reshape(1, -1), c0 + qc.reshape(1, -1)
    q_ok = (q_row < h) & (q_col < w)
    queries = torch.where(q_ok, f * h * w + q_row * w + q_col, -1)
    kf, kr, kc = torch.meshgrid(
        torch.arange(-rf, rf + 1, device=device), torch.arange(-rh, tr + rh, device=device),
        torch.arange(-rw, tc + rw, device=device), indexing="ij",
    )
    k_frame, k_row, k_col = f + kf.reshape(1, -1), r0 + kr.reshape(1, -1), c0 + kc.reshape(1, -1)
    k_ok = (k_frame >= 0) & (k_frame < frames) & (k_row >= 0) & (k_row < h) & (k_col >= 0) & (k_col < w)
    keys = torch.where(k_ok, k_frame * h * w + k_row * w + k_col, -1)
    return queries, keys


def plan(window: Window, device: torch.device) -> TilePlan:
    """The tiles of `window` on `device`, made once per window value and device."""
    key = (window, str(device))
    found = _PLANS.get(key)
    if found is not None:
        return found
    with torch.inference_mode(False):  # normal tensors: usable in later calls with autograd on
        found = _make_plan(window, torch.device(device))
    if len(_PLANS) >= _PLAN_CACHE_SIZE:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = found
    return found


def _make_plan(window: Window, device: torch.device) -> TilePlan:
    n_img = window.n_img
    if window.band is not None:
        queries, keys = _band_plan(n_img, window.band, device)
        queries = torch.where(queries < n_img, queries, -1)
        keys = torch.where((keys >= 0) & (keys < n_img), keys, -1)
    else:
        queries, keys = _radius_plan(window, device)
    q_valid, k_valid = queries >= 0, keys >= 0
    q_pos, k_pos = queries.clamp(min=0), keys.clamp(min=0)
    allowed = window_near(window, q_pos[:, :, None], k_pos[:, None, :]) & k_valid[:, None, :]
    allowed |= ~q_valid[:, :, None]  # padded query rows see their box: no empty softmax (their rows are dropped)
    bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, -math.inf)
    flat = q_valid.reshape(-1).nonzero().squeeze(1)  # built once per window, not per call
    order = flat[torch.argsort(queries.reshape(-1)[flat])]
    return TilePlan(q_pos, k_pos, bias, order)


def tileable(window: Window) -> bool:
    """Whether the tiled path is worth it for `window`: enough image tokens, and a tile's box of keys at most half
    of them (a band as wide as the sequence saves nothing)."""
    n_img = window.n_img
    if n_img < MIN_TOKENS:
        return False
    if window.band is not None:
        box = _band_tile(window.band) + 2 * window.band
    else:
        (tr, tc), (rf, rh, rw) = _radius_tile(window), window.reach
        box = (2 * rf + 1) * (tr + 2 * rh) * (tc + 2 * rw)
    return 2 * box <= n_img


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, scale: float | None) -> torch.Tensor:
    """Windowed attention (B, H, N, D) over the joint sequence `window` describes, image queries tiled. The tiles
    go into SDPA's batch dimension (B x tiles, H, tile queries, box keys): four dimensions keep SDPA on its fused
    CPU kernel (five fall back to the math path)."""
    n_img, text = window.n_img, window.text_len
    start = text if window.text_first else 0
    image = slice(start, start + n_img)
    tiles = plan(window, q.device)
    batch, heads, _, dim = q.shape
    n_tiles, tq = tiles.queries.shape
    box = tiles.keys.shape[1]

    def gather(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:  # (B, H, N, d) -> (B x tiles, H, rows, d)
        picked = x[:, :, image].transpose(1, 2).index_select(1, index.reshape(-1))  # (B, tiles x rows, H, d)
        return picked.reshape(batch * n_tiles, rows, heads, x.shape[-1]).transpose(1, 2)

    q_t, k_t, v_t = gather(q, tiles.queries, tq), gather(k, tiles.keys, box), gather(v, tiles.keys, box)
    bias = tiles.bias_as(q.dtype)[:, None]  # (tiles, 1, tq, box)
    if text:
        text_keys = slice(0, text) if window.text_first else slice(n_img, n_img + text)

        def with_text(local: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            shared = x[:, :, text_keys].unsqueeze(1).expand(batch, n_tiles, heads, text, x.shape[-1])
            return torch.cat([local, shared.reshape(batch * n_tiles, heads, text, x.shape[-1])], dim=2)

        k_t, v_t = with_text(k_t, k), with_text(v_t, v)
        bias = F.pad(bias, (0, text))  # every image query sees every text token
    if batch > 1:
        bias = bias.unsqueeze(0).expand(batch, *bias.shape).reshape(batch * n_tiles, *bias.shape[1:])
    kwargs = {} if scale is None else {"scale": scale}
    out_t = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=bias, **kwargs)  # (B x tiles, H, tq, d)
    out_img = (
        out_t.reshape(batch, n_tiles, heads, tq, -1).transpose(1, 2).reshape(batch, heads, n_tiles * tq, -1)
        .index_select(2, tiles.order)
    )
    if not text:
        return out_img
    q_text = q[:, :, :text] if window.text_first else q[:, :, n_img:]
    out_text = F.scaled_dot_product_attention(q_text, k, v, **kwargs)  # text sees every token
    return torch.cat([out_text, out_img] if window.text_first else [out_img, out_text], dim=2)
