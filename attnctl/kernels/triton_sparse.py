"""Sparse attention for PLADIS in Triton (forward only): dense softmax and alpha-entmax of the same logits.

PLADIS (Kim et al. 2025, "PLADIS: Pushing the Limits of Attention in Diffusion Models at Inference Time by
Leveraging Sparsity") replaces cross-attention's output by `dense + scale * (sparse - dense)`, where
`sparse = entmax_alpha(logits) @ V` (Peters, Niculae and Martins 2019, "Sparse Sequence-to-Sequence
Models"; alpha = 2 is sparsemax, Martins and Astudillo 2016):

    entmax_alpha(z)_j = [(alpha - 1) z_j - tau]_+ ^ (1 / (alpha - 1)),   tau such that the row sums to 1.

The threshold tau is a per-row quantity that an element-wise score_mod cannot express, so this file
finds it inside the kernel. With x = (alpha - 1)(z - max z), tau lies in [-1, 0] and
f(tau) = sum_j [x_j - tau]_+^(1/(alpha-1)) is decreasing; Newton's method started from tau = -1 (where
f >= 1) climbs monotonically to the root for alpha <= 2 (f is convex; for sparsemax this is Michelot's
algorithm and ends exactly once the support stops changing); for alpha > 2 it is safeguarded by a bisection
bracket (`_newton`). In float32 a weight near the support's edge, (x - tau)^(1/(alpha-1)), carries the logits'
rounding error e as ~e^(1/(alpha-1)): ~1e-2 at alpha = 4 (the reference solves in float64). Two layouts of the
same kernel (a constexpr switch):

- ONE_TILE (the key row fits one tile, e.g. the 77 text keys of cross-attention): the logits are
  computed once and kept in registers; the dense softmax, the threshold iterations and both P @ V
  products use them: one pass over the keys.
- streaming (longer rows, e.g. the full rows of joint attention): a FlashAttention-2 pass gives the dense
  output and the row max; threshold passes follow, each streaming the key blocks again (QK recomputed,
  nothing stored), until every row of the block has |f(tau) - 1| <= TOL; a last pass accumulates the
  sparse P @ V. Label masks and windows skip fully masked tiles as in `triton_attention`.

Every control of `triton_attention` applies (mask, per-key bias and value scale on `query_range`, labels,
windows, log-sum-exp of the dense logits). The sparse combination applies to the `query_range` rows;
the other rows get the dense output. The sparse probabilities are renormalised to sum 1 (exact up to
rounding once tau has converged). Specification: `attnctl.kernels.reference.attention` with
`spec.sparse` (`reference.entmax`); tests in tests/test_kernels_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from . import triton_attention as ta
from .spec import AttentionSpec
from .triton_attention import _RUNTIME_INTS, LOG2E, _flash_loop, _key_block, _program_start, _tile_logits

#: Key rows up to this length (after rounding up to a power of two) use the one-pass layout.
ONE_TILE_MAX = 128
#: ... when a whole key row of K fits this many bytes of shared memory (V's row beside it): the tiles then fit the 99
#: KiB per block of consumer GPUs (sm_86 / sm_89); float32 rows of 128 keys at head dim 256 (160 KiB) use the multi-tile
#: layout instead.
ONE_TILE_BYTES = 65536
#: Threshold iterations at most (Newton converges in a handful; the cap bounds pathological rows).
MAX_ITER = 40
TOL = 1e-6

#: The constexpr switches of `_sparse_attn_fwd` and every value `attention` passes (see
#: `triton_attention.SWITCHES`; tests/test_kernels_compile.py compiles each one for real GPU targets).
SWITCHES: dict[str, tuple] = {
    **{name: values for name, values in ta.SWITCHES.items()},
    "ONE_TILE": (False, True),
    "MODE": (0, 1, 2),  # sparsemax, 1.5-entmax, other alpha (see `_mode`)
}
#: Constexprs with one value, passed by the launcher from these module constants.
FIXED = {"MAX_ITER_": MAX_ITER, "TOL_": TOL}
TILE_CONSTEXPRS = ta.TILE_CONSTEXPRS
#: Key-row lengths, one per BLOCK_N of the one-tile layout (`launch_config`), for the compile test.
ONE_TILE_KEYS = (16, 32, 64, 77)
POINTERS = ta.POINTERS
tile_constexprs = ta.tile_constexprs
FLOATS = ta.FLOATS + ("alpha_m1", "pow_", "mix")


def launchable(switches: dict) -> bool:
    """Whether `attention` can pass this combination: one-tile rows never use block lists."""
    if switches["ONE_TILE"]:
        return not switches["HAS_BLOCKS"]
    return ta.launchable(switches)


@triton.jit
def _entmax_terms(x, tau, pow_, MODE: tl.constexpr):
    """Per element: ([x - tau]_+^pow, pow * [x - tau]_+^(pow - 1)): the terms of f(tau) and of -f'(tau)."""
    d = x - tau[:, None]
    pos = d > 0.0
    dd = tl.where(pos, d, 0.0)
    if MODE == 0:  # sparsemax, pow = 1
        value = dd
        slope = tl.where(pos, 1.0, 0.0)
    elif MODE == 1:  # 1.5-entmax, pow = 2
        value = dd * dd
        slope = 2.0 * dd
    else:
        log_d = tl.log2(tl.where(pos, d, 1.0))
        value = tl.where(pos, tl.exp2(pow_ * log_d), 0.0)
        slope = tl.where(pos, pow_ * tl.exp2((pow_ - 1.0) * log_d), 0.0)
    return value, slope


@triton.jit
def _newton(tau, lo, hi, moved, moved_before, f, slope, active, TOL_: tl.constexpr):
    """One safeguarded Newton step on f(tau) = 1 (f decreasing), as `rtsafe` (Press et al., Numerical Recipes,
    9.4): the Newton step where it lands strictly inside the bracket [lo, hi] and moves tau less than half as far
    as the step before last (`moved_before`), bisection otherwise. For alpha > 2 f is concave between the points
    where a key enters the support, with an infinite slope there, so plain Newton can overshoot onto a bracket end
    and cycle. Rows within TOL_, or whose bracket is down to adjacent floats, keep their tau."""
    lo = tl.where(f >= 1.0, tau, lo)
    hi = tl.where(f >= 1.0, hi, tau)
    step = tau + (f - 1.0) / tl.where(slope > 0.0, slope, 1.0)
    mid = 0.5 * (lo + hi)
    newton = (slope > 0.0) & (step > lo) & (step < hi) & (tl.abs(step - tau) <= 0.5 * moved_before)
    new = tl.where(newton, step, mid)
    done = (tl.abs(f - 1.0) <= TOL_) | (mid == lo) | (mid == hi)
    move = active & (~done)
    moved_before = tl.where(move, moved, moved_before)
    moved = tl.where(move, tl.abs(new - tau), moved)
    tau = tl.where(move, new, tau)
    err = tl.max(tl.where(move, 1.0, 0.0), 0)
    return tau, lo, hi, moved, moved_before, err


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _sparse_attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    Bias, stride_bb, stride_bh, stride_bn,
    VScale, stride_wb, stride_wh, stride_wn,
    QLab, stride_qlb, KLab, stride_klb, Table, stride_tb, stride_tq, stride_tk,
    BlockNum, stride_nb, BlockIdx, stride_ib, stride_im,
    H, N_Q, N_K, HEAD_DIM, sm_scale, q_start, q_stop,
    win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
    alpha_m1, pow_, mix,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VSCALE: tl.constexpr, HAS_LABELS: tl.constexpr,
    WINDOW: tl.constexpr, HAS_BLOCKS: tl.constexpr, RETURN_LSE: tl.constexpr, ROW_RANGE: tl.constexpr,
    ONE_TILE: tl.constexpr, MODE: tl.constexpr, MAX_ITER_: tl.constexpr, TOL_: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    (
        off_hz, off_b, off_h, offs_m, offs_d, row_ok, in_range, q,
        K_bh, V_bh, Mask_bh, Bias_bh, VScale_bh, KLab_b, Table_b, q_lab, n_blocks, BlockIdx_row,
    ) = _program_start(
        Q, K, V, Mask, Bias, VScale, QLab, KLab, Table, BlockNum, BlockIdx,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_mb, stride_mh, stride_bb, stride_bh, stride_wb, stride_wh, stride_qlb, stride_klb, stride_tb,
        stride_nb, stride_ib, stride_im, H, N_Q, N_K, HEAD_DIM, q_start, q_stop,
        HAS_LABELS, HAS_BLOCKS, BLOCK_M, BLOCK_N, BLOCK_D,
    )

    if ONE_TILE:
        # --- the whole key row in one tile: logits once, everything from registers -------------------
        z, offs_n, key_ok = _tile_logits(
            q, K_bh, stride_kn, stride_kd, 0, offs_m, offs_d, row_ok, in_range, q_lab,
            Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, KLab_b, Table_b, stride_tq, stride_tk,
            N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
            HAS_MASK, HAS_BIAS, HAS_LABELS, WINDOW, BLOCK_N, INPUT_PRECISION, ROW_RANGE,
        )
        m = tl.max(z, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2((z - m_safe[:, None]) * LOG2E)
        l_i = tl.sum(p, 1)
        live = l_i > 0.0
        w_eff = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
        if HAS_VSCALE:
            w = tl.load(VScale_bh + offs_n * stride_wn, mask=key_ok, other=0.0).to(tl.float32)
            if ROW_RANGE:
                w_eff = tl.where(in_range[:, None], w[None, :], 1.0)
            else:
                w_eff = w_eff * w[None, :]
        v = tl.load(
            V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
        )
        dense = tl.dot((p * w_eff).to(v.dtype), v, input_precision=INPUT_PRECISION) / tl.where(live, l_i, 1.0)[:, None]
        active = in_range & row_ok & live
        x = alpha_m1 * (z - m_safe[:, None])
        tau = tl.full([BLOCK_M], -1.0, tl.float32)
        lo = tl.full([BLOCK_M], -1.0, tl.float32)
        hi = tl.zeros([BLOCK_M], tl.float32)
        moved = tl.full([BLOCK_M], 2.0, tl.float32)  # > the bracket: the first two Newton steps are free
        moved_before = tl.full([BLOCK_M], 2.0, tl.float32)
        it = 0
        go = tl.max(tl.where(active, 1.0, 0.0), 0) > 0.0
        while go:
            value, slope = _entmax_terms(x, tau, pow_, MODE)
            tau, lo, hi, moved, moved_before, err = _newton(
                tau, lo, hi, moved, moved_before, tl.sum(value, 1), tl.sum(slope, 1), active, TOL_
            )
            it += 1
            go = (it < MAX_ITER_) & (err > 0.0)
        ps, _ = _entmax_terms(x, tau, pow_, MODE)
        z_s = tl.sum(ps, 1)
        sparse = tl.dot((ps * w_eff).to(v.dtype), v, input_precision=INPUT_PRECISION) / tl.where(z_s > 0.0, z_s, 1.0)[:, None]
        out = tl.where(active[:, None], dense + mix * (sparse - dense), dense)
        m_log2 = m * LOG2E
    else:
        # --- streaming: dense flash pass (gives the row max), threshold passes, sparse P @ V pass --------
        m_log2, l_i, acc = _flash_loop(
            q, K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, offs_m, offs_d, row_ok, in_range, q_lab,
            Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, VScale_bh, stride_wn, KLab_b, Table_b, stride_tq, stride_tk,
            BlockIdx_row, n_blocks, N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
            HAS_MASK, HAS_BIAS, HAS_VSCALE, HAS_LABELS, WINDOW, HAS_BLOCKS, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, ROW_RANGE,
        )
        live = l_i > 0.0
        out = acc / tl.where(live, l_i, 1.0)[:, None]
        active = in_range & row_ok & live
        m = m_log2 / LOG2E
        m_safe = tl.where(live, m, 0.0)
        tau = tl.full([BLOCK_M], -1.0, tl.float32)
        lo = tl.full([BLOCK_M], -1.0, tl.float32)
        hi = tl.zeros([BLOCK_M], tl.float32)
        moved = tl.full([BLOCK_M], 2.0, tl.float32)  # > the bracket: the first two Newton steps are free
        moved_before = tl.full([BLOCK_M], 2.0, tl.float32)
        go = tl.max(tl.where(active, 1.0, 0.0), 0) > 0.0
        needed = go
        it = 0
        while go:
            f = tl.zeros([BLOCK_M], tl.float32)
            df = tl.zeros([BLOCK_M], tl.float32)
            for j in range(0, n_blocks):
                start_n = _key_block(BlockIdx_row, j, HAS_BLOCKS) * BLOCK_N
                z, offs_n, key_ok = _tile_logits(
                    q, K_bh, stride_kn, stride_kd, start_n, offs_m, offs_d, row_ok, in_range, q_lab,
                    Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, KLab_b, Table_b, stride_tq, stride_tk,
                    N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
                    HAS_MASK, HAS_BIAS, HAS_LABELS, WINDOW, BLOCK_N, INPUT_PRECISION, ROW_RANGE,
                )
                value, slope = _entmax_terms(alpha_m1 * (z - m_safe[:, None]), tau, pow_, MODE)
                f += tl.sum(value, 1)
                df += tl.sum(slope, 1)
            tau, lo, hi, moved, moved_before, err = _newton(tau, lo, hi, moved, moved_before, f, df, active, TOL_)
            it += 1
            go = (it < MAX_ITER_) & (err > 0.0)
        if needed:
            z_s = tl.zeros([BLOCK_M], tl.float32)
            acc_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for j in range(0, n_blocks):
                start_n = _key_block(BlockIdx_row, j, HAS_BLOCKS) * BLOCK_N
                z, offs_n, key_ok = _tile_logits(
                    q, K_bh, stride_kn, stride_kd, start_n, offs_m, offs_d, row_ok, in_range, q_lab,
                    Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, KLab_b, Table_b, stride_tq, stride_tk,
                    N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
                    HAS_MASK, HAS_BIAS, HAS_LABELS, WINDOW, BLOCK_N, INPUT_PRECISION, ROW_RANGE,
                )
                ps, _ = _entmax_terms(alpha_m1 * (z - m_safe[:, None]), tau, pow_, MODE)
                z_s += tl.sum(ps, 1)
                if HAS_VSCALE:
                    w = tl.load(VScale_bh + offs_n * stride_wn, mask=key_ok, other=0.0).to(tl.float32)
                    if ROW_RANGE:
                        ps = ps * tl.where(in_range[:, None], w[None, :], 1.0)
                    else:
                        ps = ps * w[None, :]
                v = tl.load(
                    V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
                )
                acc_s = tl.dot(ps.to(v.dtype), v, acc_s, input_precision=INPUT_PRECISION)
            sparse = acc_s / tl.where(z_s > 0.0, z_s, 1.0)[:, None]
            out = tl.where(active[:, None], out + mix * (sparse - out), out)

    tl.store(
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    if RETURN_LSE:
        lse = tl.where(live, (m_log2 + tl.log2(tl.where(live, l_i, 1.0))) / LOG2E, float("-inf"))
        tl.store(Lse + off_hz.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


def _mode(alpha: float) -> int:
    if alpha == 2.0:
        return 0
    if alpha == 1.5:
        return 1
    return 2


def one_tile(nk: int, head_dim: int = 16, itemsize: int = 2) -> bool:
    """Whether a key row of `nk` keys (of `head_dim`, `itemsize` bytes each) uses the one-pass layout."""
    block_n = triton.next_power_of_2(max(nk, 16))
    return block_n <= ONE_TILE_MAX and block_n * ta.head_block(head_dim) * itemsize <= ONE_TILE_BYTES


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, config: ta.Config | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PLADIS attention over (B, H, N, D): (out in v's dtype, log-sum-exp of the dense logits or None).

    Without `spec.sparse` this is `triton_attention.attention`. `config.block_n` is ignored in the
    one-tile layout (the tile is the whole key row).
    """
    if spec.sparse is None:
        return ta.attention(q, k, v, spec, config=config)
    return _sparse(q, k, v, spec, config)


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, config: ta.Config | None):
    alpha = float(spec.sparse.alpha)
    if not alpha > 1.0:
        raise ConfigError(f"Sparse.alpha must be > 1 (alpha -> 1 is softmax), got {alpha}")
    ta.check_inputs(q, k, v, who="triton (sparse)")
    out, lse = ta.outputs(q, v, spec.return_lse)
    if q.shape[2] == 0 or k.shape[2] == 0:  # nothing to compute: no rows, or rows that attend to nothing (zeros, lse -inf)
        return ta.empty_call(out, lse)
    spec, peak = ta.bounded(spec, q, k, v)
    launch(q, k, v, spec, out, lse, config=config, gpu=q.device.type == "cuda").run()
    return ta.unbounded(out, spec, peak), lse


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, out: torch.Tensor, lse: torch.Tensor | None,
    *, config: ta.Config | None, gpu: bool, shared_memory: int | None = None,
) -> ta.Launch:
    """The `_sparse_attn_fwd` launch of a call with `spec.sparse` into `out` / `lse` (see `ta.launch`)."""
    alpha = float(spec.sparse.alpha)
    head_dim, nk = q.shape[-1], k.shape[2]
    single = one_tile(nk, head_dim, q.element_size())
    config = launch_config(ta.call_config(q, spec, config, gpu, shared_memory), nk, gpu, head_dim, q.element_size())
    args, switches = ta.kernel_arguments(q, k, v, spec, config)
    if single:
        switches["HAS_BLOCKS"] = False
    return ta.Launch(
        "_sparse_attn_fwd", _sparse_attn_fwd, (triton.cdiv(q.shape[2], config.block_m), q.shape[0] * q.shape[1]),
        (q, k, v, out, lse if lse is not None else ta.unused(q.device, torch.float32),
         *q.stride(), *k.stride(), *v.stride(), *out.stride(),
         *args, alpha - 1.0, 1.0 / (alpha - 1.0), float(spec.sparse.scale)),
        dict(RETURN_LSE=lse is not None, ONE_TILE=single, MODE=_mode(alpha), **FIXED, **switches,
             num_warps=config.num_warps, num_stages=config.num_stages),
    )


def launch_config(config: ta.Config, nk: int, cuda: bool, head_dim: int = 16, itemsize: int = 2) -> ta.Config:
    """The tiles of a call with `nk` keys: `config`, or in the one-tile layout the whole key row as BLOCK_N
    (BLOCK_M at most 32 on a GPU: the row tile and its entmax terms live in registers)."""
    if not one_tile(nk, head_dim, itemsize):
        return config
    block_n = triton.next_power_of_2(max(nk, 16))
    block_m = min(config.block_m, 32) if cuda else config.block_m
    return ta.Config(block_m, block_n, 4 if cuda else config.num_warps, config.num_stages)


def _self_check(nk: int = 40, alpha: float = 1.5) -> float:
    """Max abs difference against the reference on a small random problem (run this module to see it)."""
    from . import reference
    from .spec import Sparse

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not ta.interpreted() else "cpu"
    q = torch.randn(1, 2, 24, 32, generator=g).to(device)
    k, v = (torch.randn(1, 2, nk, 32, generator=g).to(device) for _ in range(2))
    spec = AttentionSpec(sparse=Sparse(alpha=alpha, scale=2.0))
    out, _ = attention(q, k, v, spec)
    ref, _ = reference.attention(q, k, v, spec)
    return (out - ref).abs().max().item()


if __name__ == "__main__":  # pragma: no cover
    for nk in (40, 300):
        print(f"keys {nk}: max |triton - reference| = {_self_check(nk):.3g}")
