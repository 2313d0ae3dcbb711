"""Controlled attention kernels against torch SDPA and the materialised reference.

On CUDA (fp16 by default), per shape: time, TFLOP/s (of the dense problem, 4 B H N^2 D, for every variant,
so that tile skipping shows as higher throughput) and peak extra memory of

    sdpa-flash         torch SDPA forced to its flash backend, no control       (the baseline)
    triton-plain       attnctl's Triton kernel, no control
    triton-reweight    per-key bias + value scale (Prompt-to-Prompt reweighting over every key)
    triton-regions     8 subject regions with isolation, evaluated from label vectors (tiles skipped)
    triton-window      a 2-D window of radius 8 over the token grid (tiles skipped)
    flex-reweight      compiled flex_attention with the same bias + value scale
    flex-regions       compiled flex_attention with the regions' mask_mod (BlockMask)
    sdpa-dense-mask    torch SDPA with the regions as a dense additive (B, 1, N, N) mask
    reference          attnctl's eager reference (fp32 logits, N x N materialised; OOM is reported)

plus PLADIS (triton sparse, entmax 1.5) on a cross-attention shape (N queries x 77 keys) against the
reference. Targets from the issue: controlled >= 0.85x sdpa-flash throughput; regions >= 3x faster than
sdpa-dense-mask at N >= 4096; no N x N allocation. Timings are `triton.testing.do_bench` medians.

On CPU (or with --cpu): sdpa and compiled flex against the reference at small sizes, medians after
warm-up (flex's compilation time for each new shape is printed separately), as ratios.

    python benchmarks/kernels.py [--dtype fp16|bf16] [--shapes sdxl-4k,sdxl-1k,flux,16k] [--repeats 7]
    python benchmarks/kernels.py --cpu [--threads N] [--repeats 5] [--sizes 256,1024]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnctl.kernels import BACKENDS, AttentionSpec, LabelMask, Sparse, Window, reference, sdpa

GPU_SHAPES = {  # name: (B, H, N, D, grid (h, w) of the image tokens)
    "sdxl-4k": (2, 10, 4096, 64, (64, 64)),
    "sdxl-1k": (2, 20, 1024, 64, (32, 32)),
    "flux": (1, 24, 4608, 128, (72, 64)),
    "16k": (1, 24, 16384, 64, (128, 128)),
}
INF = float("-inf")


def regions(batch: int, grid: tuple[int, int], device, count: int = 8) -> LabelMask:
    """`count` subject regions as a 2 x count/2 grid of boxes over the image, plus background (label 0) on
    a border; isolation: subjects never see each other, background is shared."""
    h, w = grid
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    per_row = count // 2
    label = 1 + (rows * 2 // h) * per_row + cols * per_row // w
    border = (rows < h // 16) | (cols < w // 16)
    label = torch.where(border, 0, label).flatten()
    table = torch.full((count + 1, count + 1), INF, device=device)
    table.fill_diagonal_(0.0)
    table[0, :] = 0.0
    table[:, 0] = 0.0
    labels = label[None].expand(batch, -1).contiguous()
    return LabelMask(labels, labels, table[None])


def dense_tflops(b: int, h: int, nq: int, nk: int, d: int, seconds: float) -> float:
    return 4 * b * h * nq * nk * d / seconds / 1e12


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------


def _cuda_measure(fn: Callable[[], object], repeats: int) -> tuple[float | None, float | None, str]:
    """(median seconds, peak extra GiB, note); OOM and errors become notes."""
    import triton

    try:
        fn()  # warm-up (compiles flex / triton)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = triton.testing.do_bench(fn, warmup=10, rep=max(25, 10 * repeats), return_mode="median")
        return ms / 1000, peak, ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, "OOM"
    except Exception as error:  # noqa: BLE001 - a benchmark row reports, it does not stop the table
        torch.cuda.empty_cache()
        return None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"


def run_cuda(args: argparse.Namespace) -> None:
    import triton

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    print(f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, dtype {args.dtype}")
    print("time: triton.testing.do_bench median; TFLOP/s of the dense problem 4*B*H*N^2*D; memory: peak extra GiB of one call")
    for name in args.shapes.split(","):
        cuda_shape(name, dtype, args.repeats)
        torch.cuda.empty_cache()


def cuda_shape(name: str, dtype: torch.dtype, repeats: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnctl.kernels import triton_attention as ta
    from attnctl.kernels import triton_sparse as ts

    device = torch.device("cuda")
    b, h, n, d, grid = GPU_SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    bias = torch.randn(b, n, device=device, generator=g)
    scale = torch.rand(b, n, device=device, generator=g) + 0.5
    labels = regions(b, grid, device)
    window = Window(grid, radius=(8, 8))
    reweight = AttentionSpec(key_bias=bias, value_scale=scale)
    region_spec = AttentionSpec(labels=labels)
    dense_mask = None

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def dense():
        nonlocal dense_mask
        if dense_mask is None:  # built once, outside the timed calls (after the warm-up call)
            dense_mask = labels.dense().to(dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)

    variants: list[tuple[str, Callable[[], object]]] = [
        ("sdpa-flash", flash),
        ("triton-plain", lambda: ta.attention(q, k, v, AttentionSpec())),
        ("triton-reweight", lambda: ta.attention(q, k, v, reweight)),
        ("triton-regions", lambda: ta.attention(q, k, v, region_spec)),
        ("triton-window", lambda: ta.attention(q, k, v, AttentionSpec(window=window))),
    ]
    if "flex" in BACKENDS:
        from attnctl.kernels import flex

        variants += [("flex-reweight", lambda: flex.attention(q, k, v, reweight)), ("flex-regions", lambda: flex.attention(q, k, v, region_spec))]
    variants += [("sdpa-dense-mask", dense), ("reference", lambda: reference.attention(q, k, v, region_spec))]
    print(f"\n{name}: B={b} H={h} N={n} D={d} grid={grid}, regions: 8 subjects + background, isolation")
    print(f"{'variant':18s} {'ms':>9s} {'TFLOP/s':>8s} {'vs flash':>9s} {'vs dense':>9s} {'peak GiB':>9s}")
    results = {}
    for label, fn in variants:
        seconds, peak, note = _cuda_measure(fn, repeats)
        results[label] = seconds
        if label == "sdpa-dense-mask" and dense_mask is not None:
            peak = (peak or 0.0) + dense_mask.numel() * dense_mask.element_size() / 2**30  # the mask itself
        if seconds is None:
            print(f"{label:18s} {note}")
            continue
        flash_t, dense_t = results.get("sdpa-flash"), results.get("sdpa-dense-mask")
        vs_flash = f"{flash_t / seconds:9.2f}" if flash_t else f"{'-':>9s}"
        vs_dense = f"{dense_t / seconds:9.2f}" if dense_t else f"{'-':>9s}"
        print(f"{label:18s} {seconds * 1e3:9.3f} {dense_tflops(b, h, n, n, d, seconds):8.1f} {vs_flash} {vs_dense} {peak:9.3f}")
    dense_t = results.get("sdpa-dense-mask")
    if dense_t and results.get("triton-regions"):
        print(f"triton-regions vs sdpa-dense-mask: {dense_t / results['triton-regions']:.2f}x faster (target >= 3 at N >= 4096)")
    if results.get("sdpa-flash") and results.get("triton-reweight"):
        print(f"triton-reweight throughput vs sdpa-flash: {results['sdpa-flash'] / results['triton-reweight']:.2f} (target >= 0.85)")
    dense_mask = None
    torch.cuda.empty_cache()

    # PLADIS on cross-attention: N image queries x 77 text keys
    kt, vt = (torch.randn(b, h, 77, d, device=device, dtype=dtype, generator=g) for _ in range(2))
    qc = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g)
    pladis = AttentionSpec(sparse=Sparse(1.5, 2.0))
    print(f"{'PLADIS (x77 keys)':18s}", end="")
    for label, fn in (
        ("sdpa-flash", lambda: F.scaled_dot_product_attention(qc, kt, vt)),
        ("triton-sparse", lambda: ts.attention(qc, kt, vt, pladis)),
        ("reference", lambda: reference.attention(qc, kt, vt, pladis)),
    ):
        seconds, peak, note = _cuda_measure(fn, repeats)
        print(f"  {label} {seconds * 1e3:.3f} ms" if seconds else f"  {label} {note}", end="")
    print()


# ---------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------


def _cpu_median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, fp32")
    print(f"time: median of {args.repeats} after one warm-up call; ratio = reference time / variant time (higher is faster)")
    has_flex = "flex" in BACKENDS
    for size in (int(s) for s in args.sizes.split(",")):
        cpu_size(size, args.repeats, has_flex)


def cpu_size(size: int, repeats: int, has_flex: bool) -> None:
    if has_flex:
        from attnctl.kernels import flex
    side = int(round(size**0.5))
    grid = (side, size // side)
    n = grid[0] * grid[1]
    b, h, d = 1, 4, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    specs = {
        "reweight": AttentionSpec(key_bias=torch.randn(b, n, generator=g), value_scale=torch.rand(b, n, generator=g) + 0.5),
        "regions": AttentionSpec(labels=regions(b, grid, "cpu")),
        "window": AttentionSpec(window=Window(grid, radius=(4, 4))),
    }
    print(f"\nN={n} (grid {grid}), B={b} H={h} D={d}")
    print(f"{'control':10s} {'reference ms':>13s} {'sdpa ms':>9s} {'ratio':>6s} {'flex ms':>9s} {'ratio':>6s} {'flex compile s':>15s}")
    for label, spec in specs.items():
        ref_t = _cpu_median(lambda spec=spec: reference.attention(q, k, v, spec), repeats)
        sdpa_t = _cpu_median(lambda spec=spec: sdpa.attention(q, k, v, spec), repeats)
        row = f"{label:10s} {ref_t * 1e3:13.2f} {sdpa_t * 1e3:9.2f} {ref_t / sdpa_t:6.2f}"
        if has_flex:
            start = time.perf_counter()
            flex.attention(q, k, v, spec)  # the first call of a new shape compiles
            compile_s = time.perf_counter() - start
            flex_t = _cpu_median(lambda spec=spec: flex.attention(q, k, v, spec), repeats)
            row += f" {flex_t * 1e3:9.2f} {ref_t / flex_t:6.2f} {compile_s:15.1f}"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison even where CUDA is available")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--shapes", default=",".join(GPU_SHAPES))
    parser.add_argument("--sizes", default="256,1024", help="CPU: token counts (made into a near-square grid)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if torch.cuda.is_available() and not args.cpu and "triton" in BACKENDS and "cuda" in BACKENDS["triton"].devices:
        run_cuda(args)
    else:
        if not args.cpu:
            print("CUDA (with triton) is not available: the GPU table is not measured here; running the CPU comparison.")
        run_cpu(args)


if __name__ == "__main__":
    main()
