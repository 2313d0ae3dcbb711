"""Token merging over an image-token grid, and training-free agent attention: the tensor math.

- Bipartite soft matching with one random destination per stride x stride cell, as in Bolya and Hoffman
  2023, "Token Merging for Fast Stable Diffusion" (ToMe for SD, arXiv:2303.17604): every token that is not a
  destination is a source; each source finds its most similar destination (cosine similarity of a metric:
  the controls use the hidden states entering the transformer block, as tomesd does); the
  `count` sources with the highest similarity are merged into their destination by mean. Attention then runs
  on the merged sequence and `MergePlan.unmerge` copies each group's output back to every member.
- Agent attention, Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear Attention"
  (ECCV 2024, arXiv:2312.08874), applied training-free to Stable Diffusion as AgentSD: agent tokens (a
  stronger merge of the same tokens) attend to the keys and values, then the queries attend to the agents.

Nothing here materialises an N x N tensor: the similarity is sources x destinations (N x N / s^2), and
both attentions of agent attention go through the attention op (SDPA: no N x N on CPU or GPU).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from `seed` and `parts` (layer name, step): stable across runs and machines."""
    text = ":".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def cell_destinations(
    grid_hw: tuple[int, int], stride: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Destination and source token indices (ascending int64, CPU) of a row-major `grid_hw` token grid.

    The grid is cut into `(h // stride) x (w // stride)` cells of `stride x stride` tokens from the top left;
    one token of each cell, drawn uniformly from `generator` (None: the cell's top-left token, tomesd's
    `use_rand=False`), is a destination. Every other token (including the rows and columns that do not fill a
    whole cell) is a source. A grid smaller than one cell has no destinations.
    """
    h, w = grid_hw
    cells_h, cells_w = h // stride, w // stride
    if cells_h == 0 or cells_w == 0:
        return torch.zeros(0, dtype=torch.long), torch.arange(h * w)
    if generator is None:
        pick = torch.zeros(cells_h, cells_w, dtype=torch.long)
    else:
        pick = torch.randint(stride * stride, (cells_h, cells_w), generator=generator, device=generator.device).cpu()
    rows = torch.arange(cells_h)[:, None] * stride + pick // stride
    cols = torch.arange(cells_w)[None, :] * stride + pick % stride
    dst = (rows * w + cols).flatten().sort().values
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[dst] = True
    return dst, (~is_dst).nonzero().flatten()


def video_cell_destinations(
    frames: int, grid_hw: tuple[int, int], stride: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cell_destinations` on a frame-major `frames x h x w` video grid: cells of `1 x stride x stride` tokens
    within each frame (one destination each, drawn frame after frame from `generator`), so a merge never mixes two
    frames. One frame: `cell_destinations` itself."""
    if frames == 1:
        return cell_destinations(grid_hw, stride, generator)
    per_frame = grid_hw[0] * grid_hw[1]
    parts = [cell_destinations(grid_hw, stride, generator) for _ in range(frames)]
    dst = torch.cat([d + f * per_frame for f, (d, _) in enumerate(parts)])
    src = torch.cat([s + f * per_frame for f, (_, s) in enumerate(parts)])
    return dst, src


@dataclass(frozen=True)
class MergePlan:
    """Where each of the N tokens of every batch row goes in the merged sequence of `kept` tokens.

    The merged sequence of a row is `[unmerged sources in token order; destinations in token order]`; a
    destination's entry is the mean of itself and the sources merged into it. `group[b, t]` is the position
    of token t's entry, `counts[b, j]` how many tokens entry j holds.
    """

    tokens: int
    kept: int
    group: torch.Tensor  # (B, N) int64
    counts: torch.Tensor  # (B, kept) float32

    @property
    def merged(self) -> int:
        """Tokens merged away per row (N - kept)."""
        return self.tokens - self.kept

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, kept, C): each group's mean (accumulated in float32; a lone token is copied exactly)."""
        if self.kept == self.tokens:
            return x
        batch, _, channels = x.shape
        accumulate = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        index = self.group[:, :, None].expand(batch, self.tokens, channels)
        sums = torch.zeros(batch, self.kept, channels, dtype=accumulate, device=x.device)
        sums.scatter_add_(1, index, x.to(accumulate))
        return (sums / self.counts[:, :, None].to(accumulate)).to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, kept, C) -> (B, N, C): every token receives its group's entry."""
        if self.kept == self.tokens:
            return y
        return torch.gather(y, 1, self.group[:, :, None].expand(y.shape[0], self.tokens, y.shape[2]))

    def rows(self, index: torch.Tensor) -> MergePlan:
        """The plan of the batch rows `index` only."""
        return MergePlan(self.tokens, self.kept, self.group.index_select(0, index), self.counts.index_select(0, index))

    def merge_keys(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N) or (B, H, N) per-token values (key bias, value scale) -> the mean over each group."""
        if values.ndim == 2:
            return self.merge(values.expand(self.group.shape[0], -1)[:, :, None])[:, :, 0]
        moved = values.expand(self.group.shape[0], -1, -1).transpose(1, 2)
        return self.merge(moved).transpose(1, 2)


def identity_plan(batch: int, tokens: int, device: torch.device | str) -> MergePlan:
    return MergePlan(
        tokens, tokens, torch.arange(tokens, device=device).expand(batch, -1), torch.ones(batch, tokens, device=device)
    )


@torch.no_grad()
def match(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: for every source its most similar destination (cosine) and its rank.

    Returns `target` (B, Ns): the index (into `dst`) of each source's best destination (the first on ties),
    and `rank` (B, Ns): 0 for the source with the highest similarity, ties broken by token order.
    """
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, Ns, Nd): the only pairwise tensor
    best, target = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return target, rank


@torch.no_grad()
def plan_from_matching(
    tokens: int, dst: torch.Tensor, src: torch.Tensor, target: torch.Tensor, rank: torch.Tensor, count: int
) -> MergePlan:
    """The plan that merges the `count` best-ranked sources (capped at the number of sources)."""
    batch, sources = rank.shape
    count = max(0, min(int(count), sources))
    device = rank.device
    if count == 0:
        return identity_plan(batch, tokens, device)
    unmerged = sources - count
    merged = rank < count
    position = (~merged).long().cumsum(1) - 1  # place of each unmerged source among the unmerged ones
    source_group = torch.where(merged, unmerged + target, position)
    group = torch.empty(batch, tokens, dtype=torch.long, device=device)
    group[:, dst] = (unmerged + torch.arange(dst.numel(), device=device)).expand(batch, -1)
    group[:, src] = source_group
    kept = unmerged + dst.numel()
    counts = torch.zeros(batch, kept, device=device).scatter_add_(1, group, torch.ones(batch, tokens, device=device))
    return MergePlan(tokens, kept, group, counts)


def plan_merge(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, count: int) -> MergePlan:
    """Match the tokens of `metric` (B, N, C) and merge `count` sources: the ToMe plan of one layer call."""
    target, rank = match(metric, dst.to(metric.device), src.to(metric.device))
    return plan_from_matching(metric.shape[1], dst.to(metric.device), src.to(metric.device), target, rank, count)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float | None = None,
    scale_power: float = 1.0,
    shortcut: float = 0.0,
    attend: Attend | None = None,
) -> torch.Tensor:
    """Agent attention (Han et al. 2024) over (B, H, N, D) tensors with agents (B, H, Na, D).

    `agent_values = softmax(A Kᵀ s) V`, then `out = softmax(Q Aᵀ s^scale_power) agent_values + shortcut V`,
    with `s = scale` (default `D ** -0.5`). `scale_power` and `shortcut` are AgentSD's `k_scale2` and
    `k_shortcut` (1 and 0 give the plain two-softmax form). The shortcut needs self-attention (V per query).
    `attend(q, k, v)` is the softmax attention op with the default scale `D ** -0.5` (SDPA if None).
    """
    attend = attend or (lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_))
    default = q.shape[-1] ** -0.5
    s = default if scale is None else float(scale)
    first = agents if s == default else agents * (s / default)
    agent_values = attend(first, k, v)
    factor = s**scale_power / default
    out = attend(q if factor == 1.0 else q * factor, agents, agent_values)
    if shortcut:
        if v.shape[2] != q.shape[2]:
            raise ValueError(f"agent attention's shortcut needs self-attention, got {q.shape[2]} queries and {v.shape[2]} values")
        out = out + shortcut * v
    return out
