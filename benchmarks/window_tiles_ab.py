"""FastAttn's windows end to end on gpu_e2e's `wan-cpu` (Wan 2.1's layout at 256x448, 33 frames = 9 x 16 x 28 = 4032
tokens, 10 steps, CFG), the sdpa backend's tiles (`attnctl/kernels/window_tiles.py`) of this tree against those of a
git revision, in the same process and interleaved (issue 19: the speed-up beside the FLOP bound, before / after).

Per round and variant (band 448, 3-D window (1, 4, 4), each a fixed plan from `gpu_e2e.fast_plan`): stock, then the
variant with the base revision's tiles, then with this tree's; each applies the handle, makes one untimed call and one
timed call (process time). Medians over the rounds after a warm-up round. The FLOP bound is gpu_e2e's: stock FLOPs /
(stock FLOPs - the attention FLOPs the window skips). Run with one thread on a shared machine:

    OMP_NUM_THREADS=1 python benchmarks/window_tiles_ab.py [--base 81bfb27] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
sys.path.insert(1, _HERE)

import torch  # noqa: E402


def load_base(revision: str):
    """attnctl.kernels.window_tiles as of `revision`, as a module of its own (`git show`)."""
    root = os.path.dirname(_HERE)
    text = subprocess.run(["git", "show", f"{revision}:attnctl/kernels/window_tiles.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    name = "attnctl.kernels.window_tiles_base"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(text)
    spec = importlib.util.spec_from_file_location(name, handle.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def main(argv: list[str] | None = None) -> dict:
    import gpu_e2e

    import attnctl
    from attnctl.kernels import sdpa
    from attnctl.kernels import window_tiles as here

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="81bfb27", help="git revision whose window_tiles.py is the 'before'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny-wan, one repeat: a smoke run (numbers mean nothing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        base = load_base(args.base)
    except (OSError, subprocess.CalledProcessError) as error:  # no git, or a checkout without that revision
        print(f"window_tiles.py at {args.base} is not available here ({type(error).__name__}): this tree against itself")
        base = here
    model, steps = "wan-cpu", 10
    if args.quick:
        args.repeats, steps = 1, 3
    pipe, call = gpu_e2e.build(model, args.quick, "cpu", torch.float32)
    table = gpu_e2e.variants(model, steps, pipe, call, tiny=args.quick)
    names = [name for name in table if name.startswith("fastattn")]

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            out = pipe(prompt=gpu_e2e.PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                       output_type="latent", **call)
        return out.frames

    saved: dict[str, float] = {}

    def run(name: str, tiles) -> tuple[float, torch.Tensor]:
        sdpa.window_tiles = tiles
        handle = attnctl.apply(pipe, table[name].controls(), backend="sdpa") if name != "stock" else None
        try:
            generate()
            start = time.process_time()
            out = generate()
            elapsed = time.process_time() - start
            if handle is not None:
                report = handle.outputs["fastattn"]
                saved[name] = float(report.full_flops() - report.flops())
        finally:
            if handle is not None:
                handle.remove()
            sdpa.window_tiles = here
        return elapsed, out

    cases = [("stock", "here", here)] + [(name, label, tiles) for name in names for label, tiles in (("base", base), ("here", here))]
    times: dict[tuple[str, str], list[float]] = {(name, label): [] for name, label, _ in cases}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for round_index in range(args.repeats + 1):  # round 0: warm-up
        for name, label, tiles in cases:
            elapsed, out = run(name, tiles)
            if round_index:
                times[(name, label)].append(elapsed)
            else:
                outputs[(name, label)] = out
    stock_flops = gpu_e2e.count_flops(generate)
    stock = statistics.median(times[("stock", "here")])
    print(f"torch {torch.__version__}, {model}{' (tiny)' if args.quick else ''}, {steps} steps, {torch.get_num_threads()} "
          f"thread(s), process time, medians of {args.repeats}; base = window_tiles.py at {args.base}")
    print(f"stock {stock:.2f} s")
    result = {}
    for (name, label), values in times.items():
        if name == "stock":
            continue
        seconds = statistics.median(values)
        speedup = stock / seconds
        bound = stock_flops / max(1.0, stock_flops - saved[name])
        spread = (max(values) - min(values)) / seconds
        differs = (outputs[(name, label)] - outputs[(name, "base")]).abs().max().item()
        result[(name, label)] = {"seconds": seconds, "speedup": speedup, "bound": bound, "share": speedup / bound}
        print(f"{name:24s} {label:5s} {seconds:6.2f} s  speed-up {speedup:.3f}  FLOP bound {bound:.3f}  "
              f"share {speedup / bound:.2f}  spread {spread:.3f}  max |latents - base's| {differs:.1e}")
    return result


if __name__ == "__main__":
    main()
