"""Region-label attention in Triton that skips masked work: tokens grouped by label (forward only).

A label mask (`LabelMask`: query i and key j interact with additive bias `table[b, q_label[i], k_label[j]]`)
over an image is ragged in token order: every tile of 128 query rows spans image rows that cross several
regions and the background border, so a kernel over the token order visits every (query tile, key tile)
pair and gathers the table per element (issue #15: 4-7x slower than attention without control). Here the
tokens are grouped by label first:

1. per label layout (cached with the `LabelMask` object, like the block lists of `triton_attention`): a
   stable sort of the query labels and of the key labels gives one permutation each, and the sorted label
   vectors. After sorting, a tile holds few labels (a contiguous run of label values);
2. per (query tile, key tile) pair of the sorted order, from per-tile label sets (`present`, (B, tiles, L)):
   **skipped** if every present pair is masked (-inf), **open** if every present pair is 0 (no per-element
   work at all), **mixed** otherwise (the table is gathered per element, as in `triton_attention`). Each
   query tile gets a list of key tiles, open ones first; memory O(B (N + tiles x (L + key tiles))), never N x N;
3. the kernel (FlashAttention-2, as `triton_attention._attn_fwd`) loads its query rows, key rows and value
   rows through the permutations (row gathers: no permuted copy of q, k or v is made), loops over the open
   tiles without mask code, then over the mixed ones, and stores each output row (and log-sum-exp) at its
   original position: the un-permutation costs nothing.

Other controls that act per key or per pair ride along (the model's mask, a per-key bias and value scale on
`query_range`, log-sum-exp): they are read at the original indices. Windows and PLADIS keep the ungrouped
kernels (`triton_attention`, `triton_sparse`). Rows whose every key is masked give zeros (lse -inf).

Specification: `attnctl.kernels.reference.attention`; tests in tests/test_kernels_labels.py. Whether this is
faster than SDPA with a dense mask is measured by benchmarks/bench_kernels.py on a GPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import BackendError
from . import triton_attention as ta
from .spec import AttentionSpec, LabelMask
from .triton_attention import LOG2E, _finite_floor

_RUNTIME_INTS = ("q_start", "q_stop")

#: The constexpr switches of `_label_attn_fwd` and every value `attention` passes (labels are always on; see
#: `triton_attention.SWITCHES` and tests/test_kernels_compile.py).
SWITCHES: dict[str, tuple] = {
    "HAS_MASK": (False, True),
    "HAS_BIAS": (False, True),
    "HAS_VSCALE": (False, True),
    "RETURN_LSE": (False, True),
    "ROW_RANGE": (False, True),
}
TILE_CONSTEXPRS = ta.TILE_CONSTEXPRS
POINTERS: dict[str, str] = {
    **{name: kind for name, kind in ta.POINTERS.items() if name not in ("QLab", "KLab", "BlockNum", "BlockIdx")},
    "QPerm": "i32", "KPerm": "i32", "QLab": "i32", "KLab": "i32", "TileCount": "i32", "TileIdx": "i32",
}
FLOATS = ta.FLOATS
tile_constexprs = ta.tile_constexprs
cuda_config = ta.cuda_config


def launchable(switches: dict) -> bool:
    """Every combination of the switches can be launched."""
    return True


# ---------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _label_step(
    m_i, l_i, acc, q, kb, offs_d, row_ok, in_range, q_idx, q_lab,
    K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, KPerm_b, KLab_b, Table_b, stride_tq, stride_tk,
    Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, VScale_bh, stride_wn, N_K, HEAD_DIM, sm_scale,
    MIXED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VSCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_RANGE: tl.constexpr,
):
    """One key tile (index `kb` in the sorted key order) of the online softmax; MIXED adds the label table."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = offs_n < N_K
    k_idx = tl.load(KPerm_b + offs_n, mask=key_ok, other=0)  # original key positions
    k = tl.load(
        K_bh + k_idx[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0,
    )
    z = tl.dot(q, k, input_precision=INPUT_PRECISION) * sm_scale
    if HAS_MASK:
        z += tl.load(
            Mask_bh + q_idx[:, None] * stride_mm + k_idx[None, :] * stride_mn,
            mask=row_ok[:, None] & key_ok[None, :], other=0.0,
        ).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias_bh + k_idx * stride_bn, mask=key_ok, other=0.0).to(tl.float32)
        if ROW_RANGE:
            z += tl.where(in_range[:, None], bias[None, :], 0.0)
        else:
            z += bias[None, :]
    if MIXED:
        k_lab = tl.load(KLab_b + offs_n, mask=key_ok, other=0)
        z += tl.load(Table_b + q_lab[:, None] * stride_tq + k_lab[None, :] * stride_tk)
    if HAS_MASK or HAS_BIAS or MIXED:  # after every additive term: a table entry can be a dtype's minimum too
        z = _finite_floor(z)
    s = tl.where(key_ok[None, :], z * LOG2E, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_VSCALE:
        w = tl.load(VScale_bh + k_idx * stride_wn, mask=key_ok, other=0.0).to(tl.float32)
        if ROW_RANGE:
            p = p * tl.where(in_range[:, None], w[None, :], 1.0)
        else:
            p = p * w[None, :]
    v = tl.load(
        V_bh + k_idx[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _label_attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn,
    Bias, stride_bb, stride_bh, stride_bn,
    VScale, stride_wb, stride_wh, stride_wn,
    QPerm, QLab, stride_pqb, KPerm, KLab, stride_pkb,
    Table, stride_tb, stride_tq, stride_tk,
    TileCount, stride_cb, TileIdx, stride_ib, stride_im,
    H, N_Q, N_K, HEAD_DIM, sm_scale, q_start, q_stop,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VSCALE: tl.constexpr, RETURN_LSE: tl.constexpr,
    ROW_RANGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the sorted query order
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    q_idx = tl.load(QPerm + off_b * stride_pqb + offs_m, mask=row_ok, other=0)  # original query rows
    q_lab = tl.load(QLab + off_b * stride_pqb + offs_m, mask=row_ok, other=0)
    in_range = (q_idx >= q_start) & (q_idx < q_stop)
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + q_idx[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    Mask_bh = Mask + off_b * stride_mb + off_h * stride_mh
    Bias_bh = Bias + off_b * stride_bb + off_h * stride_bh
    VScale_bh = VScale + off_b * stride_wb + off_h * stride_wh
    KPerm_b = KPerm + off_b * stride_pkb
    KLab_b = KLab + off_b * stride_pkb
    Table_b = Table + off_b * stride_tb
    n_open = tl.load(TileCount + off_b * stride_cb + pid_m * 2)
    n_visit = n_open + tl.load(TileCount + off_b * stride_cb + pid_m * 2 + 1)
    Idx_row = TileIdx + off_b * stride_ib + pid_m * stride_im

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_open):  # every pair allowed with bias 0: no label work
        m_i, l_i, acc = _label_step(
            m_i, l_i, acc, q, tl.load(Idx_row + j), offs_d, row_ok, in_range, q_idx, q_lab,
            K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, KPerm_b, KLab_b, Table_b, stride_tq, stride_tk,
            Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, VScale_bh, stride_wn, N_K, HEAD_DIM, sm_scale,
            False, HAS_MASK, HAS_BIAS, HAS_VSCALE, BLOCK_N, INPUT_PRECISION, ROW_RANGE,
        )
    for j in range(n_open, n_visit):  # mixed tiles: the table per element
        m_i, l_i, acc = _label_step(
            m_i, l_i, acc, q, tl.load(Idx_row + j), offs_d, row_ok, in_range, q_idx, q_lab,
            K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, KPerm_b, KLab_b, Table_b, stride_tq, stride_tk,
            Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, VScale_bh, stride_wn, N_K, HEAD_DIM, sm_scale,
            True, HAS_MASK, HAS_BIAS, HAS_VSCALE, BLOCK_N, INPUT_PRECISION, ROW_RANGE,
        )

    dead = l_i == 0.0  # every key masked: output zeros
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    tl.store(
        Out + off_b * stride_ob + off_h * stride_oh + q_idx[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    if RETURN_LSE:
        lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) / LOG2E)
        tl.store(Lse + off_hz.to(tl.int64) * N_Q + q_idx, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Layout: permutations, sorted labels and tile lists, once per label layout
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The grouped order of one label layout at one tile size (all int32, contiguous, on the call's device)."""

    q_perm: torch.Tensor  # (B, Nq): original query row of each sorted position
    q_sorted: torch.Tensor  # (B, Nq): its label
    k_perm: torch.Tensor  # (B, Nk)
    k_sorted: torch.Tensor  # (B, Nk)
    table: torch.Tensor  # (B | 1, Lq, Lk) float32
    counts: torch.Tensor  # (B, nQB, 2): open and mixed key tiles per query tile
    order: torch.Tensor  # (B, nQB, nKB): open key tiles first, then mixed, then the skipped ones
    classes: torch.Tensor  # (B, nQB, nKB) int8: 0 skipped, 1 open, 2 mixed (for tests and the benchmark)


_LAYOUTS: dict[int, dict[tuple, Layout]] = {}

SKIPPED, OPEN, MIXED = 0, 1, 2


def _sort(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, perm = torch.sort(labels, dim=-1, stable=True)
    return perm.to(torch.int32).contiguous(), values.to(torch.int32).contiguous()


def _present(sorted_labels: torch.Tensor, block: int, count: int) -> torch.Tensor:
    """(B, tiles, count) float: 1 where a label occurs in a tile of the sorted order."""
    batch, n = sorted_labels.shape
    nb = triton.cdiv(n, block)
    padded = torch.full((batch, nb * block), count, dtype=torch.int64, device=sorted_labels.device)
    padded[:, :n] = sorted_labels.long()
    out = torch.zeros(batch, nb, count + 1, device=sorted_labels.device)
    out.scatter_(2, padded.view(batch, nb, block), 1.0)
    return out[..., :count]


def tile_classes(q_sorted: torch.Tensor, k_sorted: torch.Tensor, table: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """(B, nQB, nKB) int8: SKIPPED (every present label pair -inf), OPEN (every present pair 0), else MIXED."""
    table = table.float().expand(q_sorted.shape[0], -1, -1)
    q_present = _present(q_sorted, block_m, table.shape[1])
    k_present = _present(k_sorted, block_n, table.shape[2])

    def any_pair(pairs: torch.Tensor) -> torch.Tensor:
        return (q_present @ pairs.float() @ k_present.transpose(1, 2)) > 0

    visit = any_pair(table > float("-inf"))
    mixed = any_pair(table != 0)
    classes = torch.where(visit, torch.where(mixed, MIXED, OPEN), SKIPPED)
    return classes.to(torch.int8)


def layout(labels: LabelMask, nq: int, nk: int, block_m: int, block_n: int, device: torch.device) -> Layout:
    """The grouped layout of `labels` at this tile size, built once per LabelMask object, label versions and
    size (the cache entry dies with the object); label values are checked when it is built."""
    key = (labels.versions(), nq, nk, block_m, block_n, str(device))
    per_object = _LAYOUTS.get(id(labels))
    if per_object is None:
        per_object = _LAYOUTS[id(labels)] = {}
        weakref.finalize(labels, _LAYOUTS.pop, id(labels), None)
    found = per_object.get(key)
    if found is not None:
        return found
    batch = labels.q_labels.shape[0]
    ql, kl, table = ta._labels(labels, batch, nq, nk)
    ta._check_label_values(labels)
    q_perm, q_sorted = _sort(ql)
    if labels.k_labels is labels.q_labels:  # self-attention over one label vector: one sort
        k_perm, k_sorted = q_perm, q_sorted
    else:
        k_perm, k_sorted = _sort(kl)
    classes = tile_classes(q_sorted, k_sorted, labels.table, block_m, block_n)
    rank = torch.where(classes == OPEN, 0, torch.where(classes == MIXED, 1, 2)).to(torch.int8)
    order = torch.sort(rank, dim=-1, stable=True).indices.to(torch.int32).contiguous()
    counts = torch.stack([(classes == OPEN).sum(-1), (classes == MIXED).sum(-1)], -1).to(torch.int32).contiguous()
    table32 = labels.table.float().contiguous()
    found = per_object[key] = Layout(q_perm, q_sorted, k_perm, k_sorted, table32, counts, order, classes)
    return found


def clear_caches() -> None:
    """Forget every cached layout."""
    _LAYOUTS.clear()


# ---------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------


def supports(spec: AttentionSpec) -> bool:
    """Whether this kernel computes `spec`: labels without a window or PLADIS."""
    return spec.labels is not None and spec.window is None and spec.sparse is None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, config: ta.Config | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label-mask attention over (B, H, N, D) tensors, tokens grouped by label: (out in v's dtype, lse or None)."""
    if not supports(spec):
        raise BackendError(
            "triton_labels.attention takes a spec with labels and without window or sparse; got features "
            f"{', '.join(spec.features()) or 'none'}"
        )
    ta.check_inputs(q, k, v, who="triton (labels)")
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
    """The `_label_attn_fwd` launch of a call into `out` / `lse` (see `ta.launch`)."""
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    config = ta.call_config(q, spec, config, gpu, shared_memory)
    grouped = layout(spec.labels, nq, nk, config.block_m, config.block_n, q.device)
    dummy = ta.unused(q.device, torch.float32)
    args: list = []
    if spec.attn_mask is not None:
        mask = ta._mask4(spec.attn_mask, batch, heads, nq, nk, q.dtype)
        args += [mask, *mask.stride()]
    else:
        args += [dummy, 0, 0, 0, 0]
    for tensor, name in ((spec.key_bias, "key_bias"), (spec.value_scale, "value_scale")):
        if tensor is not None:
            t = ta._per_key_view(tensor, batch, heads, nk, name)
            args += [t, *t.stride()]
        else:
            args += [dummy, 0, 0, 0]
    table = grouped.table
    args += [grouped.q_perm, grouped.q_sorted, grouped.q_perm.stride(0), grouped.k_perm, grouped.k_sorted, grouped.k_perm.stride(0)]
    args += [table, table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2)]
    args += [grouped.counts, grouped.counts.stride(0), grouped.order, grouped.order.stride(0), grouped.order.stride(1)]
    scale = spec.scale if spec.scale is not None else head_dim**-0.5
    q_start, q_stop = spec.query_range if spec.query_range is not None else (0, nq)
    args += [heads, nq, nk, head_dim, float(scale), int(q_start), int(q_stop)]
    return ta.Launch(
        "_label_attn_fwd", _label_attn_fwd, (triton.cdiv(nq, config.block_m), batch * heads),
        (q, k, v, out, lse if lse is not None else dummy, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *args),
        dict(
            HAS_MASK=spec.attn_mask is not None, HAS_BIAS=spec.key_bias is not None,
            HAS_VSCALE=spec.value_scale is not None, RETURN_LSE=lse is not None, ROW_RANGE=(int(q_start), int(q_stop)) != (0, nq),
            **tile_constexprs(config, head_dim, q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        ),
    )
