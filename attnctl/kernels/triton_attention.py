"""Controlled flash attention in Triton (forward only: attnctl is training-free).

The algorithm is FlashAttention-2 (Tri Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning"): one program per block of BLOCK_M query rows of one (batch, head)
streams over blocks of BLOCK_N keys with an online softmax, so no N x N tensor ever exists. The code
follows the Triton fused-attention tutorial (06): the jit kernel with constexpr switches, the launcher,
the public function; the specification it is tested against is `attnctl.kernels.reference.attention`
(see `_self_check` at the bottom and tests/test_kernels_triton.py).

What a control can add to a tile of logits, each behind a constexpr switch (the kernel is compiled once
per combination):

- the model's own additive mask (`attn_mask`, any shape broadcastable to (B, H, Nq, Nk));
- a per-key additive bias and a per-key value scale, (B, Nk) or (B, H, Nk), applied to the query rows in
  `query_range` only. The value scale multiplies the probability tile before the P @ V product,
  `(P * w) V = P (w * V)`: Prompt-to-Prompt's reweighting without renormalisation;
- region labels: `table[b, q_label, k_label]` gathered from two label vectors and a small table;
- a window over the image-token grid (2-D radius, 3-D radius over video frames, or 1-D band; text tokens before or after the image
  tokens attend to and are attended by everything).

Labels and windows also make tiles that are fully masked: the launcher lists, per query block, the key
blocks that can contain an allowed pair (`block_lists`, cached per layout and resolution), and the kernel
visits only those. Rows whose every key is masked produce zeros (and log-sum-exp -inf), never NaN.

Dtypes fp16, bf16 and fp32 (fp32 dots in IEEE precision, to match the reference); head dims up to 256.
Head dims that are not a power of two (40, 72, 80, 96, 160) are padded to the next one by masked loads
(no copy). Any sequence length: the last blocks are masked.

Under `TRITON_INTERPRET=1` (set before this module is first imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from ..errors import BackendError, ConfigError, KernelCompileError, UnsupportedInputError
from .spec import (
    KERNEL_DTYPES,
    AttentionSpec,
    LabelMask,
    Window,
    additive_in,
    bounded_value_scale,
    check_kernel_dtypes,
    per_key,
    times_peak,
)

#: log2(e). A module global read inside @triton.jit code must be a `tl.constexpr` instance (the annotated form
#: `LOG2E: tl.constexpr = ...` is not accepted either); a plain float compiles only in the interpreter.
LOG2E = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 256
DTYPES = KERNEL_DTYPES
#: Integer arguments that change between layers / controls: not specialised (no new compilation per value).
_RUNTIME_INTS = ("q_start", "q_stop", "win_w", "win_hw", "win_rf", "win_rh", "win_rw", "win_band", "text_start", "n_img")

#: The constexpr switches of `_attn_fwd` that a spec sets, and every value the launcher (`kernel_arguments`,
#: `attention`) passes. tests/test_kernels_compile.py compiles every value for real GPU targets and checks that
#: SWITCHES + TILE_CONSTEXPRS are exactly the kernel's constexpr parameters, so a new switch cannot escape it.
SWITCHES: dict[str, tuple] = {
    "HAS_MASK": (False, True),
    "HAS_BIAS": (False, True),
    "HAS_VSCALE": (False, True),
    "HAS_LABELS": (False, True),
    "WINDOW": (0, 1, 2),  # none, radius (2-D, or 3-D over video frames), 1-D band
    "HAS_BLOCKS": (False, True),
    "RETURN_LSE": (False, True),
    "ROW_RANGE": (False, True),  # the per-key edits apply to some query rows only (`query_range` cuts the rows)
}
#: Constexprs set by the tile sizes, the head dim and the dtype (`tile_constexprs`).
TILE_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "INPUT_PRECISION")
#: One head dim per BLOCK_D specialisation (`head_block`), for the compile test.
HEAD_DIM_CLASSES = (16, 32, 64, 128, 256)


def launchable(switches: dict) -> bool:
    """Whether the launcher can pass this switch combination: block lists exist exactly with labels or a window."""
    return bool(switches["HAS_BLOCKS"]) == bool(switches["HAS_LABELS"] or switches["WINDOW"])


#: Pointer arguments of the kernels: "qkv" is the dtype of q / k / v (and of the output), "mask" the dtype of
#: the model's mask (a float mask as passed, usually the model dtype; a bool mask made additive in the qkv dtype), else a fixed dtype (labels and block lists
#: int32, per-key edits float32 unless given in another float dtype, the label table float32).
POINTERS: dict[str, str] = {
    "Q": "qkv", "K": "qkv", "V": "qkv", "Out": "qkv", "Lse": "fp32", "Mask": "mask", "Bias": "fp32", "VScale": "fp32",
    "QLab": "i32", "KLab": "i32", "Table": "fp32", "BlockNum": "i32", "BlockIdx": "i32",
}
#: Float scalar arguments (fp32); every other non-constexpr argument is an int32 size or stride.
FLOATS = ("sm_scale",)


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


#: The floor of a finite logit: masks, per-key biases or label tables filled with a dtype's minimum (`torch.finfo(float32).min`) times log2(e) would
#: overflow to -inf and read as "masked", where the reference keeps them finite (a row masked that way on every key
#: is a uniform average there, not empty). -1e37 * log2(e) is finite and still makes exp() zero beside any real logit.
FINITE_FLOOR = -1e37


@triton.jit
def _finite_floor(z):
    """Finite logits below FINITE_FLOOR raised to it; -inf (a masked key) stays -inf."""
    return tl.where(z == float("-inf"), z, tl.maximum(z, -1e37))


@triton.jit
def _tile_logits(
    q, K_bh, stride_kn, stride_kd, start_n, offs_m, offs_d, row_ok, in_range, q_lab,
    Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, KLab_b, Table_b, stride_tq, stride_tk,
    N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_RANGE: tl.constexpr,
):
    """Logits (natural units, float32) of one (BLOCK_M, BLOCK_N) tile with every control applied.

    Keys past N_K and masked pairs are -inf. Returns (logits, key offsets, key-in-range mask). Without
    ROW_RANGE every row is in the query range: the per-key edits need no per-element select.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < N_K
    k = tl.load(
        K_bh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0,
    )
    z = tl.dot(q, k, input_precision=INPUT_PRECISION) * sm_scale
    if HAS_MASK:
        z += tl.load(
            Mask_bh + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
            mask=row_ok[:, None] & key_ok[None, :], other=0.0,
        ).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias_bh + offs_n * stride_bn, mask=key_ok, other=0.0).to(tl.float32)
        if ROW_RANGE:
            z += tl.where(in_range[:, None], bias[None, :], 0.0)
        else:
            z += bias[None, :]
    if HAS_LABELS:
        k_lab = tl.load(KLab_b + offs_n, mask=key_ok, other=0)
        z += tl.load(Table_b + q_lab[:, None] * stride_tq + k_lab[None, :] * stride_tk)
    if HAS_MASK or HAS_BIAS or HAS_LABELS:  # after every additive term: a table entry can be a dtype's minimum too
        z = _finite_floor(z)
    if WINDOW != 0:
        qi = offs_m - text_start
        ki = offs_n - text_start
        q_img = (qi >= 0) & (qi < n_img)
        k_img = (ki >= 0) & (ki < n_img)
        if WINDOW == 1:  # radius over the frame-major (frames, h, w) grid: win_hw = h * w; one frame: rf = 0
            qi = tl.where(q_img, qi, 0)
            ki = tl.where(k_img, ki, 0)
            qp = qi % win_hw
            kp = ki % win_hw
            near = tl.abs((qp // win_w)[:, None] - (kp // win_w)[None, :]) <= win_rh
            near = near & (tl.abs((qp % win_w)[:, None] - (kp % win_w)[None, :]) <= win_rw)
            near = near & (tl.abs((qi // win_hw)[:, None] - (ki // win_hw)[None, :]) <= win_rf)
        else:  # 1-D band over the flattened image tokens
            near = tl.abs(qi[:, None] - ki[None, :]) <= win_band
        allowed = near | (~q_img)[:, None] | (~k_img)[None, :]
        z = tl.where(allowed, z, float("-inf"))
    z = tl.where(key_ok[None, :], z, float("-inf"))
    return z, offs_n, key_ok


@triton.jit
def _key_block(BlockIdx_row, j, HAS_BLOCKS: tl.constexpr):
    """The j-th key block a query block visits: from the block list when labels / windows skip tiles."""
    if HAS_BLOCKS:
        return tl.load(BlockIdx_row + j)
    else:
        return j


@triton.jit
def _flash_loop(
    q, K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, offs_m, offs_d, row_ok, in_range, q_lab,
    Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, VScale_bh, stride_wn, KLab_b, Table_b, stride_tq, stride_tk,
    BlockIdx_row, n_blocks, N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VSCALE: tl.constexpr, HAS_LABELS: tl.constexpr,
    WINDOW: tl.constexpr, HAS_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_RANGE: tl.constexpr,
):
    """The FlashAttention-2 inner loop over the visited key blocks: returns (row max in log2 units, row sum
    of exp2(s - max), unnormalised P @ V accumulator)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_blocks):
        start_n = _key_block(BlockIdx_row, j, HAS_BLOCKS) * BLOCK_N
        z, offs_n, key_ok = _tile_logits(
            q, K_bh, stride_kn, stride_kd, start_n, offs_m, offs_d, row_ok, in_range, q_lab,
            Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, KLab_b, Table_b, stride_tq, stride_tk,
            N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
            HAS_MASK, HAS_BIAS, HAS_LABELS, WINDOW, BLOCK_N, INPUT_PRECISION, ROW_RANGE,
        )
        s = z * LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: no NaN from -inf - -inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_VSCALE:
            w = tl.load(VScale_bh + offs_n * stride_wn, mask=key_ok, other=0.0).to(tl.float32)
            if ROW_RANGE:
                p = p * tl.where(in_range[:, None], w[None, :], 1.0)
            else:
                p = p * w[None, :]
        v = tl.load(
            V_bh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
        )
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    return m_i, l_i, acc


@triton.jit
def _program_start(
    Q, K, V, Mask, Bias, VScale, QLab, KLab, Table, BlockNum, BlockIdx,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_mb, stride_mh, stride_bb, stride_bh, stride_wb, stride_wh, stride_qlb, stride_klb, stride_tb,
    stride_nb, stride_ib, stride_im, H, N_Q, N_K, HEAD_DIM, q_start, q_stop,
    HAS_LABELS: tl.constexpr, HAS_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """What every kernel program starts with (dense and sparse kernels alike): its (batch, head) and query
    block, the query tile, the per-(batch, head) base pointers of every control's tensors, the query labels
    and the number of key blocks it visits (from the block list when labels / windows skip tiles)."""
    pid_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = (off_hz // H).to(tl.int64)
    off_h = (off_hz % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    in_range = (offs_m >= q_start) & (offs_m < q_stop)

    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    Mask_bh = Mask + off_b * stride_mb + off_h * stride_mh
    Bias_bh = Bias + off_b * stride_bb + off_h * stride_bh
    VScale_bh = VScale + off_b * stride_wb + off_h * stride_wh
    KLab_b = KLab + off_b * stride_klb
    Table_b = Table + off_b * stride_tb
    q_lab = offs_m * 0
    if HAS_LABELS:
        q_lab = tl.load(QLab + off_b * stride_qlb + offs_m, mask=row_ok, other=0)
    if HAS_BLOCKS:
        n_blocks = tl.load(BlockNum + off_b * stride_nb + pid_m)
    else:
        n_blocks = tl.cdiv(N_K, BLOCK_N)
    BlockIdx_row = BlockIdx + off_b * stride_ib + pid_m * stride_im
    return (
        off_hz, off_b, off_h, offs_m, offs_d, row_ok, in_range, q,
        K_bh, V_bh, Mask_bh, Bias_bh, VScale_bh, KLab_b, Table_b, q_lab, n_blocks, BlockIdx_row,
    )


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_fwd(
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
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VSCALE: tl.constexpr, HAS_LABELS: tl.constexpr,
    WINDOW: tl.constexpr, HAS_BLOCKS: tl.constexpr, RETURN_LSE: tl.constexpr, ROW_RANGE: tl.constexpr,
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

    m_i, l_i, acc = _flash_loop(
        q, K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, offs_m, offs_d, row_ok, in_range, q_lab,
        Mask_bh, stride_mm, stride_mn, Bias_bh, stride_bn, VScale_bh, stride_wn, KLab_b, Table_b, stride_tq, stride_tk,
        BlockIdx_row, n_blocks, N_K, HEAD_DIM, sm_scale, win_w, win_hw, win_rf, win_rh, win_rw, win_band, text_start, n_img,
        HAS_MASK, HAS_BIAS, HAS_VSCALE, HAS_LABELS, WINDOW, HAS_BLOCKS, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, ROW_RANGE,
    )
    dead = l_i == 0.0  # every key masked: output zeros
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    tl.store(
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    if RETURN_LSE:
        lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) / LOG2E)
        tl.store(Lse + off_hz.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Launcher: tensors of a spec -> kernel arguments; block lists for tile skipping
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one call."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def _is_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(_attn_fwd, InterpretedFunction)


_INTERPRETED = _is_interpreted()  # fixed when the kernels are defined (TRITON_INTERPRET is read then)


def interpreted() -> bool:
    """Whether the kernels of this module run in the Triton interpreter (on CPU tensors)."""
    return _INTERPRETED


def _compile_errors() -> tuple[type[BaseException], ...]:
    from triton.compiler.errors import CompilationError

    found: list[type[BaseException]] = [CompilationError]
    try:
        from triton.runtime import errors
    except ImportError:  # pragma: no cover - old triton
        return tuple(found)
    found += [getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name)]
    return tuple(found)


@contextlib.contextmanager
def compiling(kernel: str, device: torch.device) -> Iterator[None]:
    """Around a kernel launch: on a CUDA device, that device is the current one (Triton launches on the current
    device and its stream: tensors on another GPU would be read from the wrong one); a compilation failure (the
    first launch of a variant compiles it) becomes a `KernelCompileError` naming the kernel, so that `auto` can move
    to the next backend."""
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    except _compile_errors() as error:
        raise KernelCompileError(kernel, str(device), error) from error
    except RuntimeError as error:
        if "PassManager" not in str(error):  # an MLIR pass failed: a compile error too; anything else is not
            raise
        raise KernelCompileError(kernel, str(device), error) from error


def head_block(head_dim: int) -> int:
    """The padded head dim the kernel computes with: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


#: Shared memory per block (bytes) a masked fp16 / bf16 call at a head dim in (64, 128] that is a multiple of 16 needs
#: in 128 x 64 tiles at 3 stages: Triton pipelines the model's mask tile beside K and V once HEAD_DIM carries the
#: divisibility-by-16 hint (compiled for sm_80 with the masks the models pass, `triton_aot.MASKS`, in the model dtype:
#: 131,584 bytes `_attn_fwd`, 131,840 `_label_attn_fwd`, 132,608 with a per-key bias and value scale too, 131,072-131,584
#: `_sparse_attn_fwd` streaming; head dim 72 loads unvectorised and needs 66,048). At 2 stages 98,304-98,560 without
#: labels but 131,072-131,584 with them; in 128 x 32 tiles at 2 stages 57,344-82,176 (`cuda_config`). A bool mask is
#: passed in the queries' dtype (`additive_in`); a float32 mask on a half call needs up to 164,352 bytes on sm_80
#: (`_attn_fwd`), which A100 has (166,912), and no GPU lies between these and the 101,376 of sm_86 / sm_89.
MASKED_WIDE_SHARED = 132608


def default_config(dtype: torch.dtype, head_dim: int, gpu: bool, *, masked: bool, shared_memory: int | None) -> Config:
    """Tile sizes: `cuda_config`'s on a GPU (`shared_memory`: its shared memory per block); 64 x 64 in the
    interpreter, whose cost grows with the number of programs and tiles (tests pass smaller tiles to exercise block
    boundaries)."""
    if not gpu:
        return Config(64, 64)
    if shared_memory is None:
        raise ValueError("default_config on a GPU needs the device's shared memory per block (`device_shared_memory`)")
    return cuda_config(dtype, head_dim, masked=masked, shared_memory=shared_memory)


def cuda_config(dtype: torch.dtype, head_dim: int, *, masked: bool, shared_memory: int) -> Config:
    """The tile sizes `default_config` picks on a GPU with `shared_memory` bytes per block (opt-in maximum) for a call
    with (`masked`) or without the model's mask (the compile test compiles each of them): the FlashAttention-2
    tutorial's, smaller for fp32 and wide heads. Float32 at head dims above 128 takes smaller tiles (64 x 32 needed up
    to 152 KiB); a masked fp16 / bf16 call at head dims 80-128 takes 128 x 32 tiles at 2 stages where 128 x 64 at 3
    do not fit (`MASKED_WIDE_SHARED`: sm_86 / sm_89, 99 KiB per block; 2 stages of 128 x 64 do not fit with labels
    either). Every other tile fits 99 KiB, and sm_80 / sm_90 take the same tiles."""
    block_d = head_block(head_dim)
    if dtype == torch.float32:
        return Config(64, 32, num_warps=4, num_stages=2) if block_d <= 128 else Config(32, 32, num_warps=4, num_stages=1)
    if block_d <= 64:
        return Config(128, 64, num_warps=4, num_stages=3)
    if block_d <= 128:
        if masked and head_dim % 16 == 0 and shared_memory < MASKED_WIDE_SHARED:
            return Config(128, 32, num_warps=8, num_stages=2)
        return Config(128, 64, num_warps=8, num_stages=3)
    return Config(64, 32, num_warps=8, num_stages=2)


#: Per CUDA device index: its shared memory per block (`device_shared_memory`), read once.
_SHARED_MEMORY: dict[int, int] = {}


def device_shared_memory(device: torch.device) -> int:
    """The shared memory per block (bytes) a kernel may use on a CUDA device: the opt-in maximum (sm_80 166,912,
    sm_86 / sm_89 101,376, sm_90 232,448; ROCm reports the plain per-block size), read once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _SHARED_MEMORY.get(index)
    if found is None:
        props = torch.cuda.get_device_properties(index)
        found = _SHARED_MEMORY[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)
    return found


def call_config(
    q: torch.Tensor, spec: AttentionSpec, config: Config | None, gpu: bool, shared_memory: int | None
) -> Config:
    """The tiles of a call: `config`, else `default_config`'s for its dtype, head dim and mask on the GPU of `q` (or
    for a GPU with `shared_memory` bytes per block: the compile test builds GPU launches from CPU tensors)."""
    if config is not None:
        return config
    if gpu and shared_memory is None:
        if q.device.type != "cuda":
            raise ValueError(f"a GPU launch from tensors on {q.device} needs the target's shared memory per block")
        shared_memory = device_shared_memory(q.device)
    return default_config(q.dtype, q.shape[-1], gpu, masked=spec.attn_mask is not None, shared_memory=shared_memory)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher builds it. `run` launches it; `triton_aot` compiles the same call for a GPU
    target without a GPU (`JITFunction.warmup`), so the compile test gets the runtime's specialisation."""

    name: str  # the kernel's name, for compile-failure records (`compiling`)
    kernel: Any  # the @triton.jit function (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, int]
    args: tuple
    options: dict  # constexprs, num_warps, num_stages

    def run(self) -> None:
        with compiling(self.name, self.args[0].device):
            self.kernel[self.grid](*self.args, **self.options)


#: One tensor per (device, dtype), passed for the pointers of the controls a call does not use: the kernels read
#: them only behind their switches, so one allocation serves every call.
_UNUSED: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def unused(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The placeholder tensor for a pointer argument the kernel does not read (never written either)."""
    key = (str(device), dtype)
    found = _UNUSED.get(key)
    if found is None:
        found = _UNUSED[key] = torch.zeros(1, device=device, dtype=dtype)
    return found


def outputs(q: torch.Tensor, v: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output (B, H, Nq, D) in v's dtype and, when asked, the float32 log-sum-exp (B, H, Nq) of a kernel call."""
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    return torch.empty(q.shape, dtype=v.dtype, device=q.device), lse


def empty_call(out: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A call with no query or no key: every row attends to nothing (zeros, log-sum-exp -inf)."""
    out.zero_()
    if lse is not None:
        lse.fill_(float("-inf"))
    return out, lse


def bounded(
    spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[AttentionSpec, torch.Tensor | None]:
    """(`spec`, None), or in float16 with a value scale (`spec` with the scale over its peak, the peak): the kernels
    round P * w to float16 for the P @ V product, inf past 65504 (`bounded_value_scale`). `unbounded` multiplies the
    edited rows' output by the peak."""
    if spec.value_scale is None or v.dtype != torch.float16:
        return spec, None
    per_key(spec.value_scale, "value_scale", batch=q.shape[0], heads=q.shape[1], keys=k.shape[2])
    scale, peak = bounded_value_scale(spec.value_scale)
    return dataclasses.replace(spec, value_scale=scale), peak


def unbounded(out: torch.Tensor, spec: AttentionSpec, peak: torch.Tensor | None) -> torch.Tensor:
    """`out` (a kernel's, in place) with the rows the value scale applies to times `peak` (`bounded`)."""
    if peak is not None:
        start, stop = spec.query_range if spec.query_range is not None else (0, out.shape[2])
        times_peak(out[:, :, start:stop], peak)
    return out


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, who: str = "triton") -> None:
    """Raise UnsupportedInputError for what the kernels cannot take (`auto` then uses another backend)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise UnsupportedInputError(f"the {who} backend takes (B, H, N, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreted()):
        raise UnsupportedInputError(
            f"the {who} backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, set before attnctl's "
            f"triton kernels are first imported); got a tensor on {q.device}"
        )
    check_kernel_dtypes(q, k, v, who)
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise UnsupportedInputError(f"the {who} backend needs equal head dims for q, k and v, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise UnsupportedInputError(f"the {who} backend supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise UnsupportedInputError(f"the {who} backend needs matching batch / heads / keys, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _per_key_view(t: torch.Tensor, batch: int, heads: int, nk: int, name: str) -> torch.Tensor:
    """(B, Nk) or (B, H, Nk), batch 1 broadcast -> a (B, H, Nk) view with zero strides where broadcast."""
    t = per_key(t, name, batch=batch, heads=heads, keys=nk)
    if not t.is_floating_point():
        t = t.float()
    return t.expand(batch, heads, nk)


def _mask4(mask: torch.Tensor, batch: int, heads: int, nq: int, nk: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's mask as the kernels read it: additive, a (B, H, Nq, Nk) view (zero strides where it broadcasts); a bool
    mask in `dtype`, the queries' (`additive_in`: made once per mask; a float mask is read in its own dtype)."""
    mask = additive_in(mask, dtype)
    while mask.ndim < 4:
        mask = mask[None]
    try:
        return mask.expand(batch, heads, nq, nk)
    except RuntimeError as error:
        raise ConfigError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to ({batch}, {heads}, {nq}, {nk})") from error


def _labels(labels: LabelMask, batch: int, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The label vectors as the kernels read them (int32, unit stride along the tokens) and the float32 table, made
    once per LabelMask, label versions and size (controls reuse one LabelMask for every step and layer)."""
    ql, kl, table = labels.q_labels, labels.k_labels, labels.table
    if tuple(ql.shape) != (batch, nq) or tuple(kl.shape) != (batch, nk):
        raise ConfigError(f"label vectors must be ({batch}, {nq}) and ({batch}, {nk}), got {tuple(ql.shape)} and {tuple(kl.shape)}")
    if table.ndim != 3 or table.shape[0] not in (1, batch):
        raise ConfigError(f"label table must be (B or 1, Lq, Lk), got {tuple(table.shape)}")
    per_object = _per_label_mask(labels)
    key = ("vectors", labels.versions(), batch, nq, nk)
    found = per_object.get(key)
    if found is None:
        found = per_object[key] = (ql.to(torch.int32).contiguous(), kl.to(torch.int32).contiguous(), table.float().expand(batch, -1, -1))
    return found


def _check_window(window: Window, nq: int, nk: int) -> None:
    n = window.n_img + window.text_len
    if nq != n or nk != n:
        raise ConfigError(f"window covers {n} tokens (grid {window.grid_hw} + {window.text_len} text) but the call has ({nq}, {nk})")


# Block lists: for each query block, the key blocks that may hold an allowed pair. A list is a pair
# (count (Bl, nQB) int32, indices (Bl, nQB, nKB) int32: the open blocks first, ascending), Bl = B with
# labels, 1 for a window alone. Windows are cached by layout; labels by the LabelMask object (controls
# build it once per pipeline call and reuse it every step), dropped when that object dies.
_WINDOW_LISTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
#: Per LabelMask object: its block lists and its kernel-ready label vectors (`_labels`), dropped when it dies.
_LABEL_LISTS: dict[int, dict[tuple, tuple[torch.Tensor, ...]]] = {}
_WINDOW_CACHE_SIZE = 64


def _per_label_mask(labels: LabelMask) -> dict[tuple, tuple[torch.Tensor, ...]]:
    per_object = _LABEL_LISTS.get(id(labels))
    if per_object is None:
        per_object = _LABEL_LISTS[id(labels)] = {}
        weakref.finalize(labels, _LABEL_LISTS.pop, id(labels), None)
    return per_object


def _window_tiles(window: Window, n: int, block_m: int, block_n: int, device: torch.device) -> torch.Tensor:
    """(nQB, nKB) bool: tiles that can hold an allowed pair (bounding boxes of rows / columns: conservative)."""

    def blocks(block: int) -> dict[str, torch.Tensor]:
        nb = triton.cdiv(n, block)
        idx = torch.arange(nb * block, device=device)
        start = window.text_len if window.text_first else 0
        n_img = window.n_img
        img = idx - start
        valid = idx < n
        is_img = valid & (img >= 0) & (img < n_img)
        text = (valid & ~is_img).view(nb, block).any(1)
        big = 1 << 30
        out = {"text": text, "any_img": is_img.view(nb, block).any(1)}
        values = {"i": img}
        if window.radius is not None:
            per_frame = window.grid_hw[0] * window.grid_hw[1]
            values = {
                "f": img.div(per_frame, rounding_mode="floor"),
                "r": img.remainder(per_frame).div(window.grid_hw[1], rounding_mode="floor"),
                "c": img.remainder(window.grid_hw[1]),
            }
        for key, value in values.items():
            out[key + "0"] = torch.where(is_img, value, big).view(nb, block).amin(1)
            out[key + "1"] = torch.where(is_img, value, -big).view(nb, block).amax(1)
        return out

    qb, kb = blocks(block_m), blocks(block_n)
    near = qb["any_img"][:, None] & kb["any_img"][None, :]
    if window.radius is not None:
        reach = dict(zip(("f", "r", "c"), window.reach, strict=True))
    else:
        reach = {"i": window.band}
    for key, radius in reach.items():
        near = near & (kb[key + "0"][None, :] <= qb[key + "1"][:, None] + radius)
        near = near & (kb[key + "1"][None, :] >= qb[key + "0"][:, None] - radius)
    return near | qb["text"][:, None] | kb["text"][None, :]


def _label_tiles(labels: LabelMask, nq: int, nk: int, block_m: int, block_n: int) -> torch.Tensor:
    """(B, nQB, nKB) bool: tiles where some query label present may see some key label present."""

    def present(vectors: torch.Tensor, n: int, block: int, count: int) -> torch.Tensor:
        batch = vectors.shape[0]
        nb = triton.cdiv(n, block)
        padded = torch.full((batch, nb * block), count, dtype=torch.int64, device=vectors.device)
        padded[:, :n] = vectors.long()
        out = torch.zeros(batch, nb, count + 1, device=vectors.device)
        out.scatter_(2, padded.view(batch, nb, block), 1.0)
        return out[..., :count]

    table = labels.table.float().expand(labels.q_labels.shape[0], -1, -1)
    open_pairs = (table > float("-inf")).float()
    q_present = present(labels.q_labels, nq, block_m, table.shape[1])
    k_present = present(labels.k_labels, nk, block_n, table.shape[2])
    return (q_present @ open_pairs @ k_present.transpose(1, 2)) > 0


def _check_label_values(labels: LabelMask) -> None:
    """Labels index the table in the kernel: out-of-range values would read outside it (checked once per
    LabelMask and layout, a host sync)."""
    lq, lk = labels.table.shape[1], labels.table.shape[2]
    for vector, count, name in ((labels.q_labels, lq, "q_labels"), (labels.k_labels, lk, "k_labels")):
        if vector.numel() and (int(vector.min()) < 0 or int(vector.max()) >= count):
            raise ConfigError(f"LabelMask.{name} must lie in [0, {count}) (the table's size), got values in [{int(vector.min())}, {int(vector.max())}]")


def _lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = tiles.sum(-1).to(torch.int32).contiguous()
    order = torch.sort((~tiles).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return count, order


def block_lists(
    spec: AttentionSpec, nq: int, nk: int, block_m: int, block_n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The key blocks each query block visits, or None when every tile must be visited (no labels, no window)."""
    if spec.labels is None and spec.window is None:
        return None
    window_key = None
    if spec.window is not None:
        window_key = (spec.window, nq, nk, block_m, block_n, str(device))
    if spec.labels is None:
        lists = _WINDOW_LISTS.get(window_key)
        if lists is None:
            tiles = _window_tiles(spec.window, nq, block_m, block_n, device)[None]
            lists = _lists(tiles)
            if len(_WINDOW_LISTS) >= _WINDOW_CACHE_SIZE:
                _WINDOW_LISTS.pop(next(iter(_WINDOW_LISTS)))
            _WINDOW_LISTS[window_key] = lists
        return lists
    labels = spec.labels
    versions = labels.versions()
    key = (window_key, versions, nq, nk, block_m, block_n, str(device))
    per_object = _per_label_mask(labels)
    lists = per_object.get(key)
    if lists is None:
        _check_label_values(labels)
        tiles = _label_tiles(labels, nq, nk, block_m, block_n)
        if spec.window is not None:
            tiles = tiles & _window_tiles(spec.window, nq, block_m, block_n, device)[None]
        lists = per_object[key] = _lists(tiles)
    return lists


def clear_caches() -> None:
    """Forget every cached block list."""
    _WINDOW_LISTS.clear()
    _LABEL_LISTS.clear()


def kernel_arguments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, config: Config
) -> tuple[list, dict]:
    """Positional tensor / stride / size arguments and constexpr switches shared by the dense and sparse kernels
    (everything after the output pointers of `_attn_fwd`, from `Mask` on)."""
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    dummy = unused(q.device, torch.float32)
    dummy_int = unused(q.device, torch.int32)
    args: list = []
    if spec.attn_mask is not None:
        mask = _mask4(spec.attn_mask, batch, heads, nq, nk, q.dtype)
        args += [mask, *mask.stride()]
    else:
        args += [dummy, 0, 0, 0, 0]
    for tensor, name in ((spec.key_bias, "key_bias"), (spec.value_scale, "value_scale")):
        if tensor is not None:
            t = _per_key_view(tensor, batch, heads, nk, name)
            args += [t, *t.stride()]
        else:
            args += [dummy, 0, 0, 0]
    if spec.labels is not None:
        ql, kl, table = _labels(spec.labels, batch, nq, nk)
        args += [ql, ql.stride(0), kl, kl.stride(0), table, *table.stride()]
    else:
        args += [dummy_int, 0, dummy_int, 0, dummy, 0, 0, 0]
    if spec.window is not None:
        _check_window(spec.window, nq, nk)
    lists = block_lists(spec, nq, nk, config.block_m, config.block_n, q.device)
    if lists is not None:
        count, order = lists
        args += [count, count.stride(0) if count.shape[0] > 1 else 0, order, order.stride(0) if order.shape[0] > 1 else 0, order.stride(1)]
    else:
        args += [dummy_int, 0, dummy_int, 0, 0]
    scale = spec.scale if spec.scale is not None else head_dim**-0.5
    q_start, q_stop = spec.query_range if spec.query_range is not None else (0, nq)
    window = spec.window
    if window is not None:
        rf, rh, rw = window.reach if window.radius is not None else (0, 0, 0)
        win = [
            window.grid_hw[1], max(window.grid_hw[0] * window.grid_hw[1], 1), rf, rh, rw,
            window.band if window.band is not None else 0, window.text_len if window.text_first else 0,
            window.n_img,
        ]
    else:
        win = [1, 1, 0, 0, 0, 0, 0, 0]
    args += [heads, nq, nk, head_dim, float(scale), int(q_start), int(q_stop), *win]
    switches = dict(
        HAS_MASK=spec.attn_mask is not None,
        HAS_BIAS=spec.key_bias is not None,
        HAS_VSCALE=spec.value_scale is not None,
        HAS_LABELS=spec.labels is not None,
        WINDOW=0 if window is None else (1 if window.radius is not None else 2),
        HAS_BLOCKS=lists is not None,
        ROW_RANGE=(int(q_start), int(q_stop)) != (0, nq),
        **tile_constexprs(config, head_dim, q.dtype),
    )
    return args, switches


def tile_constexprs(config: Config, head_dim: int, dtype: torch.dtype) -> dict:
    """The constexprs set by the tile sizes, head dim and dtype (`TILE_CONSTEXPRS`)."""
    return dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=head_block(head_dim),
        # fp32: exact products, as the reference (no TF32); fp16 / bf16 ignore it on NVIDIA, and AMD's backend takes
        # "tf32" on gfx942 only
        INPUT_PRECISION="ieee",
    )


# ---------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Controlled attention over (B, H, N, D) tensors: (out in v's dtype, log-sum-exp (B, H, Nq) float32 or None).

    `spec.sparse` is not handled here (see `triton_sparse`).
    """
    if spec.sparse is not None:
        raise BackendError("triton_attention.attention does not apply sparse attention; use triton_sparse.attention")
    check_inputs(q, k, v)
    out, lse = outputs(q, v, spec.return_lse)
    if q.shape[2] == 0 or k.shape[2] == 0:  # nothing to compute: no rows, or rows that attend to nothing (zeros, lse -inf)
        return empty_call(out, lse)
    spec, peak = bounded(spec, q, k, v)
    launch(q, k, v, spec, out, lse, config=config, gpu=q.device.type == "cuda").run()
    return unbounded(out, spec, peak), lse


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, out: torch.Tensor, lse: torch.Tensor | None,
    *, config: Config | None, gpu: bool, shared_memory: int | None = None,
) -> Launch:
    """The `_attn_fwd` launch of a call into `out` / `lse`, at `config` or the tiles `default_config` picks on a GPU
    (`gpu`: `q`'s, or one with `shared_memory` bytes per block) or in the interpreter (`call_config`)."""
    config = call_config(q, spec, config, gpu, shared_memory)
    args, switches = kernel_arguments(q, k, v, spec, config)
    return Launch(
        "_attn_fwd", _attn_fwd, (triton.cdiv(q.shape[2], config.block_m), q.shape[0] * q.shape[1]),
        (q, k, v, out, lse if lse is not None else unused(q.device, torch.float32),
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *args),
        dict(RETURN_LSE=lse is not None, **switches, num_warps=config.num_warps, num_stages=config.num_stages),
    )


def _self_check(n: int = 40, head_dim: int = 24) -> float:
    """Max abs difference against the reference on a small random problem (run this module to see it)."""
    from . import reference

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
    q, k, v = (torch.randn(2, 2, n, head_dim, generator=g).to(device) for _ in range(3))
    spec = AttentionSpec(key_bias=torch.randn(2, n, generator=g).to(device), query_range=(3, n - 5), return_lse=True)
    out, lse = attention(q, k, v, spec)
    ref, ref_lse = reference.attention(q, k, v, spec)
    return max((out - ref).abs().max().item(), (lse - ref_lse).abs().max().item())


if __name__ == "__main__":  # pragma: no cover
    print(f"max |triton - reference| = {_self_check():.3g}")
