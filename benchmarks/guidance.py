"""Cost of guidance by attention perturbation against CFG alone, where the denoiser dominates.

Config: the SD-like UNet of `benchmarks/overhead.py` (block channels 32/64, attention at both levels) at a
64x64 latent (4096 self-attention tokens), CFG, 2 steps, latents out. Variants, run interleaved in one
process, medians after a warm-up round, printed as ratios to CFG alone (the stock pipeline):

- `pag`: PAG on the mid block, its perturbed rows batched with the CFG rows in one forward (3 rows instead
  of 2; target <= 1.6x);
- `pag-separate`: the same with the perturbed rows as their own forward;
- `seg`: SEG (sigma 10) on the mid block, batched;
- `pag-self`: PAG on every self-attention layer, the 4096-token ones included (where computing only the
  unperturbed rows' attention shows);
- `skip`: skip-layer guidance on the mid block's transformer block, batched;
- `skip-down`: skip-layer guidance on the first down block's transformer block (4096 tokens; the block does not
  run for the perturbed rows);
- `sag`: SAG (two forwards: the CFG batch, then the degraded uncond rows);
- `pladis`: PLADIS on every cross-attention layer (no extra rows; the sparse transform runs on the eager
  reference backend on a CPU, the Triton kernel on CUDA).

    python benchmarks/guidance.py [--repeats 3] [--latent 64] [--steps 2] [--variants pag,sag] [--threads N]
                                  [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import torch

VARIANTS = ("pag", "pag-separate", "pag-self", "seg", "skip", "skip-down", "sag", "pladis")


def _build(latent: int):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead.py")
    spec = importlib.util.spec_from_file_location("attnctl_bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(latent)


def controls(variant: str):
    import attnctl

    return {
        "pag": [attnctl.PAG(scale=3.0)],
        "pag-separate": [attnctl.PAG(scale=3.0, separate=True)],
        "pag-self": [attnctl.PAG(scale=3.0, layers="self")],
        "seg": [attnctl.SEG(scale=3.0, sigma=10.0)],
        "skip": [attnctl.SkipLayer(scale=2.8, blocks=("mid_block.attentions.0.transformer_blocks.0",), steps=(0.0, 1.0))],
        "skip-down": [attnctl.SkipLayer(scale=2.8, blocks=("down_blocks.0.attentions.0.transformer_blocks.0",), steps=(0.0, 1.0))],
        "sag": [attnctl.SAG(scale=0.75)],
        "pladis": [attnctl.PLADIS(scale=2.0, alpha=1.5)],
    }[variant]


def main() -> None:
    import attnctl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="a smoke run: smallest sizes, one repeat (CI; not a measurement)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time (steadier on a contended machine; use with --threads 1)")
    args = parser.parse_args()
    if args.quick:  # a smoke run (CI): the smallest sizes, one repeat; the numbers mean nothing
        args.repeats, args.latent, args.steps = 1, 16, 2  # 2 steps: skip-layer's window (strict at both ends) holds step 1
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    pipe = _build(args.latent)
    size = args.latent * 2  # the tiny VAE downsamples by 2

    def run():
        with torch.inference_mode():
            pipe("a photo of a cat", num_inference_steps=args.steps, height=size, width=size, output_type="latent",
                 generator=torch.Generator().manual_seed(0))

    times: dict[str, list[float]] = {name: [] for name in ["cfg", *variants]}
    for repeat in range(args.repeats + 1):  # the first round is warm-up
        for name in times:
            handle = attnctl.apply(pipe, controls(name)) if name != "cfg" else None
            try:
                start = clock()
                run()
                elapsed = clock() - start
            finally:
                if handle is not None:
                    handle.remove()
            if repeat:
                times[name].append(elapsed)
    base = statistics.median(times["cfg"])
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"config: SD-like UNet 32/64, latent {args.latent}x{args.latent} ({args.latent**2} self-attention tokens), CFG, "
          f"{args.steps} steps, {args.repeats} repeats, medians after warm-up, {args.clock} clock")
    print(f"{'cfg':14s} {base * 1000:9.1f} ms   (stock pipeline, CFG alone)")
    targets = {"pag": "  (target <= 1.6)"}
    for name in variants:
        value = statistics.median(times[name])
        print(f"{name:14s} {value * 1000:9.1f} ms   ratio {value / base:6.3f}{targets.get(name, '')}")


if __name__ == "__main__":
    main()
