"""Throughput of `attnctl render` against a plain loop over `pipe(...)` doing the same work.

Config: tiny-sd (the embedded random-weight SD-like fixture, 32x32 images), JOBS jobs x SEEDS seeds, STEPS
steps, CFG, no controls, one process. The plain loop calls the pipeline once per image with a seeded
generator and saves a PNG; `attnctl render` does the same from a job file and also writes the parameters
into the PNG, the journal and the manifest, atomically. The model is built once and shared (its load
time is left out of both). Both variants run interleaved in one process, each into a fresh folder;
medians after a warm-up round; printed as images per second, the time per image spent outside
`pipe(...)` (PNG encoding, bookkeeping) and the median of the paired ratios (target: overhead <= 5%).
Tiny images take milliseconds, so this is the worst case for the renderer's fixed cost per image.

    python benchmarks/render.py [--jobs 4] [--seeds 6] [--steps 2] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch


def main() -> None:
    from attnctl.render.generate import Model
    from attnctl.render.runner import RenderOptions, render
    from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: smallest sizes, one repeat (CI; not a measurement)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:  # a smoke run (CI): the smallest sizes, one repeat; the numbers mean nothing
        args.jobs, args.seeds, args.steps, args.repeats = 1, 2, 1, 1
    torch.set_num_threads(args.threads)

    pipe = make_tiny_pipeline("tiny-sd")
    prompts = ["a photo of a cat", "a red car on the street", "a blue circle on the left", "a house near a lake"]
    jobs = [{"id": f"job{j}", "prompt": prompts[j % len(prompts)], "negative_prompt": "blurry",
             "seeds": list(range(args.seeds)), "steps": args.steps, "guidance_scale": 5.0} for j in range(args.jobs)]
    images = args.jobs * args.seeds
    scratch = tempfile.mkdtemp(prefix="attnctl-bench-render-")
    job_file = os.path.join(scratch, "jobs.jsonl")
    with open(job_file, "w") as handle:
        handle.writelines(json.dumps(job) + "\n" for job in jobs)
    size = CALL_DEFAULTS["tiny-sd"]

    def plain(out: str) -> float:
        inside = 0.0
        for job in jobs:
            folder = os.path.join(out, job["id"])
            os.makedirs(folder, exist_ok=True)
            for seed in job["seeds"]:
                start = time.perf_counter()
                image = pipe(job["prompt"], negative_prompt=job["negative_prompt"], num_inference_steps=job["steps"],
                             guidance_scale=job["guidance_scale"], generator=torch.Generator().manual_seed(seed),
                             **size).images[0]
                inside += time.perf_counter() - start
                image.save(os.path.join(folder, f"{seed}.png"))
        return inside

    def renderer(out: str) -> float:
        summary = render(job_file, RenderOptions(out=out, progress="none"), model=Model(pipe, "tiny-sd"))
        assert summary.rendered == images and not summary.failed, summary.format()
        with open(os.path.join(out, "manifest.jsonl")) as handle:
            return sum(json.loads(line)["seconds"]["generate"] for line in handle)

    variants = {"plain loop": plain, "attnctl render": renderer}
    times: dict[str, list[float]] = {name: [] for name in variants}
    outside: dict[str, list[float]] = {name: [] for name in variants}
    ratios: list[float] = []
    try:
        for repeat in range(args.repeats + 1):  # the first round is a warm-up
            order = list(variants) if repeat % 2 else list(reversed(variants))  # alternate who goes first
            elapsed: dict[str, float] = {}
            for name in order:
                out = os.path.join(scratch, f"out-{repeat}-{name.split()[0]}")
                start = time.perf_counter()
                inside = variants[name](out)
                elapsed[name] = time.perf_counter() - start
                shutil.rmtree(out)
                if repeat:
                    times[name].append(elapsed[name])
                    outside[name].append((elapsed[name] - inside) / images)
            if repeat:
                ratios.append(elapsed["attnctl render"] / elapsed["plain loop"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"config: tiny-sd 32x32, {args.jobs} jobs x {args.seeds} seeds = {images} images, {args.steps} steps, CFG, "
          f"no controls, {args.repeats} repeats, medians after warm-up, variants interleaved")
    for name in variants:
        median = statistics.median(times[name])
        print(f"{name:15s} {images / median:8.2f} images/s   ({median * 1000 / images:7.1f} ms/image, of which "
              f"{statistics.median(outside[name]) * 1000:5.2f} ms outside pipe(...))")
    print(f"overhead        {statistics.median(ratios) - 1:8.1%}   (median of paired ratios; target <= 5%)")


if __name__ == "__main__":
    main()
