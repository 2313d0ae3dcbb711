"""Controlled attention kernels against torch SDPA: issue #15's table and its targets.

(Named bench_kernels.py, not kernels.py: a script directory on sys.path would shadow the installed package
`kernels` that transformers imports.)

On CUDA (fp16 by default), per shape (sdxl-4k B2 H10 N4096 D64, flux B1 H24 N4608 D128, 16k B1 H24 N16384
D64): sdpa-flash without control (the baseline, in ms) and, as "x flash" = sdpa-flash time / variant time
(higher is faster), every variant of the issue's table:

    triton plain        attnctl's Triton kernel, no control
    triton reweight     per-key bias + value scale over every key (Prompt-to-Prompt reweighting)
    triton regions      8 subjects + background, isolation: the whole `attention(..., backend="triton")` call,
                        i.e. the grouped label kernel (triton_labels); its layout is cached per LabelMask
    triton regions (token order)  the ungrouped label kernel of triton_attention (issue #15's figure)
    triton window       a 2-D window of radius 8 over the token grid (tiles skipped)
    sdpa dense mask     SDPA with the regions as a dense additive (B, 1, N, N) mask (its GiB in brackets)
    flex reweight / flex regions  compiled flex_attention
    PLADIS x77 keys     triton sparse (entmax 1.5) / sdpa-flash, N queries x 77 keys, in ms

then the targets as PASS / FAIL lines. Timings are `triton.testing.do_bench` medians.

    python benchmarks/bench_kernels.py [--dtype fp16|bf16] [--shapes sdxl-4k,flux,16k]
    python benchmarks/bench_kernels.py --tiny        # CPU smoke run of the same table (seconds; interpreter)
    python benchmarks/bench_kernels.py --cpu [--threads N] [--repeats 5] [--sizes 256,1024]

--tiny runs every row at tiny sizes on CPU (Triton in its interpreter, flex skipped unless --flex): it checks
that the script and every variant run; its numbers are not GPU timings and no target is judged.
--cpu compares sdpa and compiled flex with the reference at small sizes, as ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

if "--tiny" in sys.argv or "--quick" in sys.argv:  # the Triton kernels run on CPU only in the interpreter, chosen before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from attnctl.kernels import BACKENDS, AttentionSpec, LabelMask, Sparse, Window, reference, sdpa

GPU_SHAPES = {  # name: (B, H, N, D, grid (h, w) of the image tokens)
    "sdxl-4k": (2, 10, 4096, 64, (64, 64)),
    "flux": (1, 24, 4608, 128, (72, 64)),
    "16k": (1, 24, 16384, 64, (128, 128)),
}
TINY_SHAPES = {  # the same rows at sizes the CPU interpreter runs in seconds
    "sdxl-4k": (1, 1, 64, 16, (8, 8)),
    "flux": (1, 1, 72, 32, (9, 8)),
    "16k": (1, 1, 256, 16, (16, 16)),
}
COLUMNS = (
    "triton-plain", "triton-reweight", "triton-regions", "triton-regions-token-order", "triton-window",
    "sdpa-dense-mask", "flex-reweight", "flex-regions",
)
HEADERS = {
    "triton-plain": "triton plain", "triton-reweight": "triton reweight", "triton-regions": "triton regions (grouped)",
    "triton-regions-token-order": "triton regions (token order)", "triton-window": "triton window",
    "sdpa-dense-mask": "sdpa dense mask", "flex-reweight": "flex reweight", "flex-regions": "flex regions",
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
    border = (rows < max(h // 16, 1)) | (cols < max(w // 16, 1))
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
# The table (CUDA, or --tiny on CPU)
# ---------------------------------------------------------------------------------------------------------


class Timer:
    """(median seconds, peak extra bytes, note) of a callable; OOM and errors become notes."""

    def __init__(self, cuda: bool, repeats: int):
        self.cuda, self.repeats = cuda, repeats

    def __call__(self, fn: Callable[[], object]) -> tuple[float | None, int | None, str]:
        try:
            if not self.cuda:
                times = []
                for _ in range(self.repeats):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                return statistics.median(times), None, ""
            import triton

            fn()  # warm-up (compiles flex / triton, builds cached layouts)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = triton.testing.do_bench(fn, warmup=10, rep=max(25, 10 * self.repeats), return_mode="median")
            return ms / 1000, peak, ""
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None, None, "OOM"
        except Exception as error:  # noqa: BLE001 - a benchmark cell reports, it does not stop the table
            if self.cuda:
                torch.cuda.empty_cache()
            return None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"


def measure_shape(name: str, shape: tuple, dtype: torch.dtype, device: torch.device, timer: Timer, with_flex: bool) -> dict:
    """Every cell of one row: {column: (seconds, peak bytes, note)}, plus the baseline and PLADIS."""
    from attnctl import kernels
    from attnctl.kernels import triton_attention as ta
    from attnctl.kernels import triton_labels as tlab
    from attnctl.kernels import triton_sparse as ts

    b, h, n, d, grid = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    bias = torch.randn(b, n, device=device, generator=g)
    scale = torch.rand(b, n, device=device, generator=g) + 0.5
    labels = regions(b, grid, device)
    reweight = AttentionSpec(key_bias=bias, value_scale=scale)
    region_spec = AttentionSpec(labels=labels)
    window = AttentionSpec(window=Window(grid, radius=(8, 8)))
    dense_mask = None

    def flash(q=q, k=k, v=v):
        if device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def dense():
        nonlocal dense_mask
        if dense_mask is None:  # built once, outside the timed calls (in the warm-up call)
            dense_mask = labels.dense().to(dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)

    variants: dict[str, Callable[[], object]] = {
        "triton-plain": lambda: ta.attention(q, k, v, AttentionSpec()),
        "triton-reweight": lambda: ta.attention(q, k, v, reweight),
        "triton-regions": lambda: kernels.attention(q, k, v, region_spec, "triton"),
        "triton-regions-token-order": lambda: ta.attention(q, k, v, region_spec),
        "triton-window": lambda: ta.attention(q, k, v, window),
        "sdpa-dense-mask": dense,
    }
    if with_flex and "flex" in BACKENDS:
        from attnctl.kernels import flex

        variants["flex-reweight"] = lambda: flex.attention(q, k, v, reweight)
        variants["flex-regions"] = lambda: flex.attention(q, k, v, region_spec)
    cells = {"sdpa-flash": timer(flash)}
    for column in COLUMNS:
        if column not in variants:
            cells[column] = (None, None, "skipped" if not with_flex else "no flex")
            continue
        cells[column] = timer(variants[column])
        if column == "sdpa-dense-mask" and dense_mask is not None:
            cells["dense-mask-bytes"] = dense_mask.numel() * dense_mask.element_size()
            dense_mask = None
    layout = tlab.layout(labels, n, n, *_tiles(q, region_spec), device)
    cells["layout-bytes"] = sum(t.numel() * t.element_size() for t in (
        layout.q_perm, layout.q_sorted, layout.k_perm, layout.k_sorted, layout.table, layout.counts, layout.order, layout.classes))
    cells["tiles"] = {kind: int((layout.classes == value).sum()) for kind, value in (("open", tlab.OPEN), ("mixed", tlab.MIXED), ("skipped", tlab.SKIPPED))}
    cells["output-bytes"] = q.numel() * q.element_size()
    # PLADIS on cross-attention: N image queries x 77 text keys
    kt, vt = (torch.randn(b, h, 77, d, device=device, dtype=dtype, generator=g) for _ in range(2))
    qc = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g)
    cells["pladis-flash"] = timer(lambda: flash(qc, kt, vt))
    cells["pladis"] = timer(lambda: ts.attention(qc, kt, vt, AttentionSpec(sparse=Sparse(1.5, 2.0))))
    return cells


def _tiles(q: torch.Tensor, spec: AttentionSpec) -> tuple[int, int]:
    from attnctl.kernels import triton_attention as ta

    config = ta.call_config(q, spec, None, q.device.type == "cuda", None)
    return config.block_m, config.block_n


def _ratio(cells: dict, column: str, base: str = "sdpa-flash") -> float | None:
    t, base_t = cells[column][0], cells[base][0]
    return base_t / t if t and base_t else None


def print_table(rows: dict[str, dict], shapes: dict[str, tuple]) -> None:
    heads = ["shape", "sdpa-flash"] + [HEADERS[c] for c in COLUMNS] + ["PLADIS x77 keys (sparse / flash)"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for name, cells in rows.items():
        b, h, n, d, _ = shapes[name]
        line = [f"{name} B{b} H{h} N{n} D{d}"]
        flash_t = cells["sdpa-flash"][0]
        line.append(f"{flash_t * 1e3:.3f} ms" if flash_t else cells["sdpa-flash"][2])
        for column in COLUMNS:
            ratio = _ratio(cells, column)
            text = f"{ratio:.2f}x" if ratio else (cells[column][2] or "-")
            if column == "sdpa-dense-mask" and "dense-mask-bytes" in cells:
                text += f" ({cells['dense-mask-bytes'] / 2**30:.2f} GiB)"
            line.append(text)
        sparse_t, pflash_t = cells["pladis"][0], cells["pladis-flash"][0]
        line.append(f"{sparse_t * 1e3:.3f} / {pflash_t * 1e3:.3f} ms" if sparse_t and pflash_t else (cells["pladis"][2] or "-"))
        print("| " + " | ".join(line) + " |")
    for name, cells in rows.items():
        tiles = cells["tiles"]
        total = sum(tiles.values())
        print(f"{name}: grouped label layout: {tiles['open']} open, {tiles['mixed']} mixed, {tiles['skipped']} skipped of "
              f"{total} tiles ({(tiles['open'] + tiles['mixed']) / total:.0%} visited); cached layout {cells['layout-bytes'] / 2**10:.0f} KiB")


def targets(rows: dict[str, dict], shapes: dict[str, tuple]) -> list[tuple[str, bool | None]]:
    """(description, passed or None when not measured) for every target of issue #15."""
    out: list[tuple[str, bool | None]] = []

    def check(text: str, value: float | None, ok: Callable[[float], bool]) -> None:
        out.append((f"{text}: {'not measured' if value is None else f'{value:.2f}'}", None if value is None else ok(value)))

    for name, cells in rows.items():
        n = shapes[name][2]
        if name != "16k":
            check(f"{name}: triton regions (whole attention() call) >= 1.0x sdpa-flash", _ratio(cells, "triton-regions"), lambda x: x >= 1.0)
        if name == "16k":
            check(f"{name}: triton regions >= 2x faster than sdpa dense mask", _ratio(cells, "triton-regions", "sdpa-dense-mask"), lambda x: x >= 2.0)
        mask_bytes = n * n * 2
        peak = cells["triton-regions"][1]
        extra = None if peak is None else (peak - cells["output-bytes"] + cells["layout-bytes"]) / mask_bytes
        check(f"{name}: triton regions extra memory (peak - output + cached layout) / one N x N fp16 mask <= 0.01 (O(N + tiles))", extra, lambda x: x <= 0.01)
        check(f"{name}: triton reweight >= 0.95x sdpa-flash", _ratio(cells, "triton-reweight"), lambda x: x >= 0.95)
        pladis = cells["pladis"][0] / cells["pladis-flash"][0] if cells["pladis"][0] and cells["pladis-flash"][0] else None
        check(f"{name}: PLADIS x77 keys time / sdpa-flash time <= 3", pladis, lambda x: x <= 3.0)
        check(f"{name}: flex regions >= sdpa dense mask speed", _ratio(cells, "flex-regions", "sdpa-dense-mask"), lambda x: x >= 1.0)
    return out


def run_table(args: argparse.Namespace) -> None:
    cuda = not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    shapes = GPU_SHAPES if cuda else TINY_SHAPES
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype] if cuda else torch.float32
    import triton

    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}), Triton interpreter, fp32 — a smoke run, not timings"
    print(f"machine: {where}, torch {torch.__version__}, triton {triton.__version__}, dtype {dtype}")
    timer = Timer(cuda, args.repeats if cuda else 1)  # --tiny: one call per cell, no warm-up
    rows = {}
    for name in args.shapes.split(","):
        if name not in shapes:
            raise SystemExit(f"--shapes takes {', '.join(shapes)}, got {name!r}")
        rows[name] = measure_shape(name, shapes[name], dtype, device, timer, with_flex=cuda or args.flex)
        if cuda:
            torch.cuda.empty_cache()
    print()
    print_table(rows, shapes)
    print()
    for text, passed in targets(rows, shapes):
        verdict = "SKIP (CPU smoke run)" if not cuda else {True: "PASS", False: "FAIL", None: "FAIL (not measured)"}[passed]
        print(f"{verdict}  {text}")


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
    parser.add_argument("--tiny", "--quick", dest="tiny", action="store_true",
                        help="CPU smoke run of the table at tiny sizes (interpreter; seconds; --quick: the same)")
    parser.add_argument("--flex", action="store_true", help="with --tiny: also the flex columns (compiles on CPU: slower)")
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison of sdpa / flex against the reference")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--shapes", default=",".join(GPU_SHAPES))
    parser.add_argument("--sizes", default="256,1024", help="--cpu: token counts (made into a near-square grid)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.tiny:
        from attnctl.kernels import triton_attention as ta

        if not ta.interpreted():
            raise SystemExit("--tiny needs the Triton interpreter: TRITON_INTERPRET was set to 0 before the kernels were imported")
        run_table(args)
    elif args.cpu:
        run_cpu(args)
    elif torch.cuda.is_available() and "triton" in BACKENDS and "cuda" in BACKENDS["triton"].devices:
        run_table(args)
    else:
        print("CUDA (with triton) is not available: the GPU table is not measured here (try --tiny or --cpu).")
        run_cpu(args)


if __name__ == "__main__":
    main()
