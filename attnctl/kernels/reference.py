"""The eager reference backend: explicit softmax over materialised logits. It is the specification every
other backend is tested against, so it favours readability over speed and computes in float32.
"""

from __future__ import annotations

import torch

from .spec import AttentionSpec, as_additive, per_key


def additive_bias(spec: AttentionSpec, batch: int, nq: int, nk: int, device: torch.device) -> torch.Tensor | None:
    """Everything in `spec` that adds to the logits, as one tensor broadcastable to (B, H, Nq, Nk), or None."""
    bias: torch.Tensor | None = None

    def add(term: torch.Tensor) -> None:
        nonlocal bias
        bias = term if bias is None else bias + term

    if spec.attn_mask is not None:
        add(as_additive(spec.attn_mask, torch.float32))
    if spec.key_bias is not None:
        key_bias = per_key(spec.key_bias, "key_bias", keys=nk)[:, :, None, :].float()  # (B|1, H|1, 1, Nk)
        add(torch.where(query_indicator(spec, nq, device) > 0, key_bias, 0.0))  # not a product: -inf * 0 is NaN
    if spec.labels is not None:
        add(spec.labels.dense().float())
    if spec.window is not None:
        allowed = spec.window.allowed(device)
        if allowed.shape != (nq, nk):
            raise ValueError(f"window covers {tuple(allowed.shape)} tokens but the call has ({nq}, {nk})")
        add(as_additive(allowed))
    return bias


def query_indicator(spec: AttentionSpec, nq: int, device: torch.device) -> torch.Tensor:
    """(Nq, 1) float: 1 for query rows the per-key edits apply to."""
    if spec.query_range is None:
        return torch.ones(nq, 1, device=device)
    start, stop = spec.query_range
    rows = torch.zeros(nq, 1, device=device)
    rows[start:stop] = 1.0
    return rows


def entmax(logits: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """alpha-entmax (Peters, Niculae and Martins 2019, "Sparse Sequence-to-Sequence Models").

    `p_i = [(alpha - 1) z_i - tau]_+ ^ (1 / (alpha - 1))` with tau chosen so that p sums to 1. alpha = 2 is
    sparsemax (Martins and Astudillo 2016) and alpha = 1.5 have exact sort-based solutions; other alpha use
    bisection. Entries at -inf get probability 0; a row that is all -inf gives zeros.
    """
    if alpha <= 1.0:
        raise ValueError(f"entmax needs alpha > 1 (alpha -> 1 is softmax), got {alpha}")
    z = logits.float().movedim(dim, -1)
    dead = torch.isneginf(z).all(-1, keepdim=True)
    finite = torch.where(torch.isneginf(z), torch.full_like(z, -1e4), z)
    finite = finite - finite.max(-1, keepdim=True).values
    finite = torch.where(torch.isneginf(z), torch.full_like(z, -1e4), finite)
    finite = finite.masked_fill(dead, 0.0)  # all -inf: solve a uniform row instead (zeroed below)
    if alpha == 2.0:
        probs = _sparsemax(finite)
    elif alpha == 1.5:
        probs = _entmax15(finite)
    else:
        probs = _entmax_bisect(finite, alpha)
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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with every control of `spec`, by the formulas. Returns (out in v's dtype, lse or None)."""
    batch, _, nq, head_dim = q.shape
    nk = k.shape[2]
    scale = spec.scale if spec.scale is not None else head_dim**-0.5
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    bias = additive_bias(spec, batch, nq, nk, q.device)
    if bias is not None:
        logits = logits + bias
    dead = torch.isneginf(logits).all(-1, keepdim=True)  # rows whose every key is masked -> zeros
    probs = torch.softmax(logits, dim=-1).masked_fill(dead, 0.0)
    values = v.float()
    rows = query_indicator(spec, nq, q.device)  # (Nq, 1)
    if spec.value_scale is not None:
        scaled = values * per_key(spec.value_scale, "value_scale", keys=nk)[..., None].float()  # (B|1, H|1, Nk, 1)
        out = probs @ values * (1 - rows) + probs @ scaled * rows
    else:
        scaled = values
        out = probs @ values
    if spec.sparse is not None:
        sparse = entmax(logits, spec.sparse.alpha)
        sparse_out = sparse @ scaled
        out = out + rows * spec.sparse.scale * (sparse_out - out)
    lse = None
    if spec.return_lse:
        lse = torch.logsumexp(logits, dim=-1)
    return out.to(v.dtype), lse
