"""FastAttn's windows on a video token grid, attention op only (issue 19): each backend against full attention, beside
the attention FLOP bound (all pairs / pairs the window allows), and how the flex block mask tiles the window.

Why this exists: on a CPU the end-to-end FLOP bound of `gpu_e2e.py --models wan-cpu` cannot be approached, because
there the stock denoiser's time is not attention's (memory-bound element-wise work dominates, see the note of issue 19);
this isolates the window kernels. Defaults: the grid of gpu_e2e's wan-cpu (9 x 16 x 28 = 4032 tokens), one row,
2 heads of 64, the band of one frame (448) and the 3-D window (1, 4, 4). Timed with the process's CPU time
(`--clock wall` for wall time), interleaved, medians.

    python benchmarks/video_window_attention.py [--grid 9,16,28] [--heads 2] [--dim 64] [--repeats 5]
        [--backends sdpa,flex] [--windows band=448,3d=1x4x4] [--layout processors|contiguous] [--quick]

q, k, v are laid out as the processors pass them ((B, N, H, D) storage seen as (B, H, N, D); `--layout contiguous`
for (B, H, N, D) storage), and the calls run in inference mode, as in a pipeline. For the sdpa backend the tiles'
block shape and modelled cost (`window_tiles.choose_shape`, `planned_cost`) are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import torch  # noqa: E402


def parse_window(text: str, grid: tuple[int, int, int]):
    from attnctl.controls.caching import window_pairs
    from attnctl.kernels import Window

    frames, h, w = grid
    name, _, value = text.partition("=")
    if name == "band":
        window = Window((h, w), band=int(value), frames=frames)
    else:
        window = Window((h, w), radius=tuple(int(v) for v in value.split("x")), frames=frames)
    return text, window, window_pairs(window)


def main(argv: list[str] | None = None) -> dict:
    from attnctl.kernels import AttentionSpec, attention

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="9,16,28")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="sdpa,flex")
    parser.add_argument("--windows", default="band=448,3d=1x4x4")
    parser.add_argument("--clock", choices=("wall", "process"), default="process")
    parser.add_argument("--layout", choices=("processors", "contiguous"), default="processors")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 3 x 8 x 8 grid, one repeat (numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.repeats, args.windows = "3,8,8", 1, "band=64,3d=1x2x2"
    grid = tuple(int(v) for v in args.grid.split(","))
    n = grid[0] * grid[1] * grid[2]
    clock = time.process_time if args.clock == "process" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    if args.layout == "processors":
        q, k, v = (torch.randn(args.batch, n, args.heads, args.dim, generator=g).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, generator=g) for _ in range(3))
    windows = [parse_window(text, grid) for text in args.windows.split(",")]
    cases = {"full (sdpa)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
    for text, window, _ in windows:
        spec = AttentionSpec(window=window)
        for backend in args.backends.split(","):
            cases[f"{text} ({backend})"] = (lambda spec=spec, backend=backend: attention(q, k, v, spec, backend=backend))
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():  # warm-up: compiles flex, builds the masks and tile plans
            fn()
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = clock()
                fn()
                times[name].append(clock() - start)
    full = statistics.median(times["full (sdpa)"])
    print(f"torch {torch.__version__}, {n} tokens (grid {grid}), batch {args.batch}, {args.heads} heads of {args.dim}, "
          f"{args.clock} clock, medians of {args.repeats}")
    print(f"{'case':26s} {'ms':>9s} {'speed-up':>9s} {'bound':>7s} {'share':>6s}")
    result = {}
    for name, values in times.items():
        ms = statistics.median(values) * 1000
        bound = next((n * n / pairs for text, _, pairs in windows if name.startswith(text + " ")), 1.0)
        speedup = full * 1000 / ms
        result[name] = {"ms": ms, "speedup": speedup, "bound": bound}
        print(f"{name:26s} {ms:9.1f} {speedup:9.3f} {bound:7.3f} {speedup / bound:6.2f}")
    from attnctl.kernels import window_tiles

    for text, window, _ in windows:
        if window_tiles.tileable(window):
            print(f"sdpa tiles of {text}: blocks {'x'.join(map(str, window_tiles.choose_shape(window)))}, modelled cost "
                  f"{window_tiles.planned_cost(window):.3f} of full attention")
        else:
            print(f"sdpa of {text}: dense mask (not tiled)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        from attnctl.kernels.flex import window_mask
    except ImportError:
        return result
    for text, window, pairs in windows:
        mask = create_block_mask(window_mask(window), None, None, n, n, device="cpu")
        blocks = mask.kv_num_blocks.sum().item()
        full_blocks = mask.full_kv_num_blocks.sum().item() if mask.full_kv_num_blocks is not None else 0
        total = mask.kv_num_blocks.shape[-1] * -(-n // mask.BLOCK_SIZE[1])
        print(f"flex block mask of {text}: {(blocks + full_blocks) / total:.3f} of the {mask.BLOCK_SIZE} tiles visited, "
              f"{full_blocks / total:.3f} full (no mask evaluated), {blocks / total:.3f} partial; pairs allowed {pairs / n / n:.3f}")
    return result


if __name__ == "__main__":
    main()
