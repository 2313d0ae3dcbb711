"""Cost of region control, and memory of label masks against dense masks.

1. Time and peak memory of `Regions` against no control, with 2, 8 and 32 regions (a grid of boxes), on an
   SD-like UNet (block channels 32/64, attention at both levels, 4 heads), CFG, latents out. Times: all
   variants interleaved in one process, medians after a warm-up round, as ratios to no control. Peak memory:
   one subprocess per variant: the peak RSS during two calls over the RSS before them (Linux: the peak mark is
   reset with /proc/self/clear_refs and read from VmHWM; elsewhere `ru_maxrss` growth), and the process's
   total max RSS (`getrusage`).
2. One self-attention call with subject isolation at 4096 image tokens (batch 2 = [uncond, cond], 8 heads of
   40 channels, as SD 1.5's highest level), 4 subject regions: the peak memory of the dense-mask path (the sdpa
   backend materialises the (B, 1, N, N) mask) against label paths, which never build it: a query-blocked
   evaluation written here (blocks of 256 query rows, each block's mask built from the labels; the fused
   flex / Triton label kernels are another issue's) and any registered backend that takes labels without a
   dense mask (flex, triton). Each path runs once in its own subprocess; memory is the peak RSS during
   that call over the RSS before it (for flex this includes its compilation).

    python benchmarks/regions.py [--repeats 5] [--latent 64] [--threads N] [--skip-pipeline] [--skip-attention]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def grid_regions(count: int):
    import attnctl

    colours = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white")
    things = ("cat", "dog", "bird", "car", "tree", "house", "boat", "star")
    cols = {2: 2, 8: 4, 32: 8}.get(count, count)
    rows = max(1, count // cols)
    return [
        attnctl.Region(f"a {colours[r % 8]} {things[c % 8]}", box=(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
        for r in range(rows) for c in range(cols)
    ][:count]


def controls_for(variant: str):
    import attnctl

    if variant == "none":
        return None
    count, _, flag = variant.partition("+")
    return [attnctl.Regions(grid_regions(int(count)), base_ratio=0.2, isolate=flag == "isolate")]


def _overhead_build(latent: int):
    """The SD-like UNet pipeline of benchmarks/overhead.py, loaded by path: the benchmarks folder is never put on
    sys.path, where a module of it could shadow an installed package."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead.py")
    spec = importlib.util.spec_from_file_location("attnctl_bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(latent)


def build(latent: int):
    return _overhead_build(latent)  # the SD-like UNet of the overhead benchmark


def call(pipe, latent: int, steps: int) -> None:
    with torch.inference_mode():
        pipe("a photo of a cat", num_inference_steps=steps, height=latent * 2, width=latent * 2, output_type="latent",
             generator=torch.Generator().manual_seed(0))


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def start_peak() -> float:
    """Reset the peak-RSS mark where Linux allows it (clear_refs 5); return the RSS to measure growth from."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        current = _status_mb("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return maxrss_mb()


def maxrss_mb() -> float:
    """Peak RSS in MB: VmHWM (resettable) where available, else getrusage's ru_maxrss."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- workers (one configuration per process, for peak memory) ------------------------------------------------------
def pipeline_worker(variant: str, latent: int, steps: int) -> dict:
    import attnctl

    pipe = build(latent)
    controls = controls_for(variant)
    handle = attnctl.apply(pipe, controls) if controls else None
    before = start_peak()  # the model built (and attnctl applied): what follows is the calls' peak
    call(pipe, latent, steps)
    call(pipe, latent, steps)
    after = maxrss_mb()
    if handle is not None:
        handle.remove()
    return {"growth_mb": after - before, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def attention_worker(path: str, tokens: int) -> dict:
    from attnctl.kernels import BACKENDS, AttentionSpec, LabelMask

    side = int(tokens**0.5)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, tokens, 40, generator=generator) for _ in range(3))
    rows = torch.arange(tokens) // side
    cols = torch.arange(tokens) % side
    quadrant = 1 + (rows >= side // 2).long() * 2 + (cols >= side // 2).long()
    image = torch.where(((rows % (side // 2)) > 4) & ((cols % (side // 2)) > 4), quadrant, torch.zeros_like(quadrant))
    labels = torch.stack([torch.zeros_like(image), image])  # uncond row unrestricted, cond row isolated
    table = torch.zeros(5, 5)
    for a in range(1, 5):
        for b in range(1, 5):
            if a != b:
                table[a, b] = float("-inf")
    mask = LabelMask(labels, labels, table[None])
    spec = AttentionSpec(labels=mask)
    spec_bytes = labels.numel() * labels.element_size() * 2 + table.numel() * table.element_size()
    dense_bytes = 2 * tokens * tokens * 4

    def blocked(block: int = 256) -> torch.Tensor:
        import torch.nn.functional as F

        out = torch.empty_like(q)
        gathered = mask.table.expand(2, -1, -1)
        for start in range(0, tokens, block):
            stop = min(start + block, tokens)
            rows_table = torch.gather(gathered, 1, labels[:, start:stop, None].expand(-1, -1, gathered.shape[-1]))
            bias = torch.gather(rows_table, 2, labels[:, None, :].expand(-1, stop - start, -1))[:, None]
            out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=bias)
        return out

    def run():
        if path == "dense-sdpa":
            return BACKENDS["sdpa"].fn(q, k, v, spec)[0]
        if path == "labels-blocked":
            return blocked()
        return BACKENDS[path].fn(q, k, v, spec)[0]

    before = start_peak()  # no warm-up: the high-water mark must be this call's (flex: includes its compile)
    start = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - start
    after = maxrss_mb()
    check = float(out[1, :, :8].abs().sum())
    return {"growth_mb": after - before, "ms": elapsed * 1000, "spec_mb": spec_bytes / 2**20, "dense_mb": dense_bytes / 2**20, "check": check}


def subprocess_json(args: list[str], threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, __file__, "--threads", str(threads), *args], capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the parent ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: smallest sizes, one repeat (CI; not a measurement)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # a smoke run (CI): the smallest sizes, one repeat; the numbers mean nothing
        args.repeats, args.latent, args.steps, args.tokens = 1, 16, 1, 256
    torch.set_num_threads(args.threads)

    if args.worker:
        kind, _, variant = args.worker.partition(":")
        result = pipeline_worker(variant, args.latent, args.steps) if kind == "pipeline" else attention_worker(variant, args.tokens)
        print(json.dumps(result))
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}")
    if not args.skip_pipeline:
        pipeline_benchmark(args)
    if not args.skip_attention:
        attention_benchmark(args)


def pipeline_benchmark(args) -> None:
    import attnctl

    variants = ("none", "2+isolate") if args.quick else ("none", "2", "8", "32", "2+isolate", "8+isolate", "32+isolate")
    pipe = build(args.latent)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for repeat in range(args.repeats + 1):  # round 0 is warm-up
        for variant in variants:
            controls = controls_for(variant)
            handle = attnctl.apply(pipe, controls) if controls else None
            start = time.perf_counter()
            call(pipe, args.latent, args.steps)
            elapsed = time.perf_counter() - start
            if handle is not None:
                handle.remove()
            if repeat:
                times[variant].append(elapsed)
    memory = {v: subprocess_json(["--worker", f"pipeline:{v}", "--latent", str(args.latent), "--steps", str(args.steps)], args.threads) for v in variants}
    print(f"\n[1] Regions vs no control: SD-like UNet 32/64, latent {args.latent}x{args.latent} "
          f"({args.latent**2} and {(args.latent // 2) ** 2} tokens at the two attention levels), CFG, {args.steps} steps, "
          f"base_ratio 0.2, a grid of boxes; {args.repeats} repeats, medians after warm-up; memory: a subprocess per variant")
    base_time = statistics.median(times["none"])
    base_mem = memory["none"]
    print(f"{'variant':>16} {'time ms':>9} {'ratio':>7} {'call peak growth MB':>20} {'max RSS MB':>11} {'RSS ratio':>10}")
    for variant in variants:
        median = statistics.median(times[variant])
        mem = memory[variant]
        label = "no control" if variant == "none" else f"{variant.replace('+isolate', '')} regions" + (" +iso" if "isolate" in variant else "")
        print(f"{label:>16} {median * 1000:9.1f} {median / base_time:7.2f} {mem['growth_mb']:20.1f} {mem['maxrss_mb']:11.1f} "
              f"{mem['maxrss_mb'] / base_mem['maxrss_mb']:10.3f}")


def attention_benchmark(args) -> None:
    from attnctl.kernels import BACKENDS

    paths = ["dense-sdpa", "labels-blocked"]
    if not args.quick:
        paths += [name for name in ("flex", "triton") if name in BACKENDS and "labels" in BACKENDS[name].features]
    results = {}
    for path in paths:
        try:
            results[path] = subprocess_json(["--worker", f"attention:{path}", "--tokens", str(args.tokens)], args.threads)
        except RuntimeError as error:
            results[path] = {"error": str(error).strip().splitlines()[-1]}
    print(f"\n[2] One self-attention call with isolation: {args.tokens} tokens, batch 2 ([uncond, cond]), 8 heads x 40, "
          "4 subject regions; memory: peak RSS growth during the call, a subprocess per path")
    dense = results["dense-sdpa"]
    print(f"label spec handed to the backend: {dense['spec_mb']:.3f} MB (labels + table); dense mask: {dense['dense_mb']:.1f} MB")
    print(f"{'path':>16} {'peak growth MB':>15} {'vs dense':>9} {'time ms':>9}")
    for path, result in results.items():
        if "error" in result:
            print(f"{path:>16} failed: {result['error']}")
            continue
        ratio = result["growth_mb"] / dense["growth_mb"] if dense["growth_mb"] > 0 else float("nan")
        print(f"{path:>16} {result['growth_mb']:15.1f} {ratio:9.3f} {result['ms']:9.1f}")
    checks = {p: r["check"] for p, r in results.items() if "check" in r}
    if len(set(round(c, 2) for c in checks.values())) > 1:
        print(f"warning: the paths disagree on a checksum: {checks}")


if __name__ == "__main__":
    main()
