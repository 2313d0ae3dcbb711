"""Token reduction (ToMe, AgentAttention) against the stock pipeline: end-to-end time, peak memory, PSNR.

Config: the SD-like UNet of `overhead.py` (block channels 32/64, two attention levels, 8 heads) at a 64x64
latent, so that self-attention over 4096 tokens dominates; CFG batch of 2; latents out. Both controls act
on their default layers (the 4096-token level). Times: every configuration runs interleaved in this
process, medians after a warm-up round, as wall time and as this process's CPU time (steadier on a shared
machine). Peak memory: one subprocess per configuration builds the pipeline, then forks; the fork runs one
generation and reports its max RSS (a forked child's high-water mark starts at its RSS at the fork, so the
build's own peak is left out; torch has no CPU peak counter). PSNR: output latents against stock, same
seed, peak = the stock latents' range.

    python benchmarks/token_reduction.py [--repeats 3] [--steps 2] [--latent 64] [--threads N] [--no-memory]

Anchors (GPU, SD 1.5 at 512^2): ToMe-SD reports 1.87x faster and 3.83x less memory at ratio 0.5; AgentSD
1.84x faster (FID 28.84 -> 28.42). On a CPU, stock SDPA already avoids N x N memory: expect memory ~1x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def _overhead_build(latent: int):
    """The SD-like UNet pipeline of benchmarks/overhead.py, loaded by path: the benchmarks folder is never put on
    sys.path, where a module of it could shadow an installed package."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead.py")
    spec = importlib.util.spec_from_file_location("attnctl_bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(latent)


RATIOS = (0.3, 0.5, 0.7)
CONFIGS: tuple[str, ...] = ("stock",) + tuple(f"tome-{r}" for r in RATIOS) + tuple(f"agent-{r}" for r in RATIOS)


def control_for(config: str):
    import attnctl

    if config == "stock":
        return None
    kind, ratio = config.split("-")
    return attnctl.ToMe(ratio=float(ratio)) if kind == "tome" else attnctl.AgentAttention(ratio=float(ratio))


def generate(pipe, latent: int, steps: int) -> torch.Tensor:
    size = latent * 2  # the tiny VAE downsamples by 2
    with torch.inference_mode():
        return pipe("a photo of a cat", num_inference_steps=steps, height=size, width=size, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def run_config(pipe, config: str, latent: int, steps: int):
    import attnctl

    control = control_for(config)
    if control is None:
        start, cpu = time.perf_counter(), time.process_time()
        out = generate(pipe, latent, steps)
        return (time.perf_counter() - start, time.process_time() - cpu), out, None
    with attnctl.apply(pipe, [control]) as handle:
        start, cpu = time.perf_counter(), time.process_time()
        out = generate(pipe, latent, steps)
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        report = next(iter(handle.outputs.values()))
    return elapsed, out, report


def psnr(out: torch.Tensor, reference: torch.Tensor) -> float:
    mse = torch.mean((out.double() - reference.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(config: str, latent: int, steps: int, threads: int) -> None:
    """One configuration in a fresh process: build, fork, one generation in the fork, its max RSS."""
    import gc

    build = _overhead_build

    torch.set_num_threads(threads)
    pipe = build(latent)
    gc.collect()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fork: its RSS high-water mark starts here
        os.close(read)
        base = current_rss_mib()
        run_config(pipe, config, latent, steps)
        os.write(write, json.dumps({"config": config, "base_mib": base, "peak_mib": max_rss_mib()}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        data = stream.read()
    os.waitpid(pid, 0)
    print(data)


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(config: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", config, "--latent", str(args.latent),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration subprocesses")
    parser.add_argument("--quick", action="store_true", help="a smoke run: smallest sizes, one repeat (CI; not a measurement)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # a smoke run (CI): the smallest sizes, one repeat; the numbers mean nothing
        args.repeats, args.latent, args.steps, args.no_memory = 1, 16, 1, True
    if args.child:
        child(args.child, args.latent, args.steps, args.threads)
        return
    build = _overhead_build

    torch.set_num_threads(args.threads)
    pipe = build(args.latent)
    times: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
    outputs: dict[str, torch.Tensor] = {}
    reports = {}
    for repeat in range(args.repeats + 1):  # the first round is warm-up
        for config in CONFIGS:
            elapsed, out, report = run_config(pipe, config, args.latent, args.steps)
            outputs[config], reports[config] = out, report
            if repeat:
                times[config].append(elapsed)
    wall = {c: statistics.median(t[0] for t in times[c]) for c in CONFIGS}
    cpu = {c: statistics.median(t[1] for t in times[c]) for c in CONFIGS}
    memories = {} if args.no_memory else {c: memory(c, args) for c in CONFIGS}

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}")
    print(f"config: SD-like UNet 32/64, latent {args.latent}x{args.latent} ({args.latent**2} self-attention tokens at "
          f"level 0), CFG, {args.steps} steps, {args.repeats} repeats, medians after warm-up; controls on their default "
          "layers (level 0 self-attention)")
    header = f"{'config':<10} {'wall ms':>9} {'speed-up':>8} {'CPU ms':>9} {'speed-up':>8} {'attn FLOPs':>10} {'PSNR dB':>8}"
    if memories:
        header += f" {'peak RSS MiB':>12} {'vs stock':>8} {'gen. MiB':>9}"
    print(header)
    for config in CONFIGS:
        report = reports[config]
        flops = f"{report.flops_ratio():.3f}" if report is not None else "1.000"
        quality = psnr(outputs[config], outputs["stock"])
        line = (f"{config:<10} {wall[config] * 1000:>9.1f} {wall['stock'] / wall[config]:>7.2f}x {cpu[config] * 1000:>9.1f} "
                f"{cpu['stock'] / cpu[config]:>7.2f}x {flops:>10} {quality:>8.2f}")
        if memories:
            m, s = memories[config], memories["stock"]
            line += f" {m['peak_mib']:>12.1f} {m['peak_mib'] / s['peak_mib']:>7.3f}x {m['peak_mib'] - m['base_mib']:>9.1f}"
        print(line)
    print(f"ToMe at ratio 0.5: {wall['stock'] / wall['tome-0.5']:.2f}x end to end by wall time, "
          f"{cpu['stock'] / cpu['tome-0.5']:.2f}x by CPU time (target >= 1.5x)")


if __name__ == "__main__":
    main()
