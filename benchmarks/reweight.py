"""Cost of Reweight and of AttentionMaps capture, against no control, at 4096-token attention.

Two configs, each variant interleaved with the others in one process (the order rotating from round to
round), medians after a warm-up round:

1. pipeline: the SD-like UNet of `benchmarks/overhead.py` (block channels 32/64, 4 heads) at a 64x64 latent
   (4096 image tokens at the first level, 77 text tokens), CFG batch of 2, latents out. Variants: stock
   (nothing applied), attnctl with no control, Reweight (Prompt-to-Prompt value scale; and normalize=True,
   an additive key bias), AttentionMaps (3 words, every cross-attention layer, every step).
2. attention op: one joint-attention call (batch 2, 4 heads of 64, 4096 image + 333 text tokens, SD3's
   layout), plain SDPA against Reweight's edit (value scale on the text keys for the image-query rows), and
   a cross-attention call (4096 queries, 77 keys); plus the extra work AttentionMaps adds to such a call
   (the 3 words' probabilities of the image rows, recomputed from q and k in chunks).

    python benchmarks/reweight.py [--repeats 5] [--latent 64] [--steps 2] [--threads N]

Target: Reweight at most 5% over no control. Ratios only; a 2-core shared CPU is noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import torch


def _overhead_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead.py")
    spec = importlib.util.spec_from_file_location("attnctl_bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interleaved(variants: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats + 1):  # the first round is warm-up
        shift = repeat % len(names)  # rotate the order, so no variant always runs first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if repeat:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def pipeline_benchmark(args) -> None:
    import attnctl

    pipe = _overhead_module().build(args.latent)
    size = args.latent * 2  # the tiny VAE downsamples by 2
    prompt = "a photo of a red cat on the street"

    def call():
        with torch.inference_mode():
            pipe(prompt, num_inference_steps=args.steps, height=size, width=size, output_type="latent",
                 generator=torch.Generator().manual_seed(0))

    def with_controls(controls):
        def run():
            handle = attnctl.apply(pipe, controls)
            try:
                call()
            finally:
                handle.remove()

        return run

    variants = {
        "stock": call,
        "attnctl, no control": with_controls([]),
        "Reweight": with_controls([attnctl.Reweight({"red": 2.0, "street": 0.5})]),
        "Reweight normalize": with_controls([attnctl.Reweight({"red": 2.0, "street": 0.5}, normalize=True)]),
        "AttentionMaps": with_controls([attnctl.AttentionMaps(["red", "cat", "street"])]),
    }
    medians = _interleaved(variants, args.repeats)
    base = medians["attnctl, no control"]
    print(f"pipeline: SD-like UNet 32/64, latent {args.latent}x{args.latent} ({args.latent**2} image tokens, 77 text "
          f"tokens), CFG, {args.steps} steps, {args.repeats} repeats, medians after warm-up")
    for name, value in medians.items():
        print(f"  {name:22s} {value * 1000:9.1f} ms   x{value / base:6.3f} vs no control   x{value / medians['stock']:6.3f} vs stock")


def op_benchmark(args) -> None:
    from attnctl.controls.maps.capture import word_attention
    from attnctl.kernels import AttentionSpec, attention

    g = torch.Generator().manual_seed(0)
    results = []
    for label, n_image, n_text, joint in (("joint 4096+333 (SD3 layout)", 4096, 333, True), ("cross 4096x77", 4096, 77, False)):
        n_q = n_image + (n_text if joint else 0)
        n_k = n_q if joint else n_text
        q = torch.randn(2, 4, n_q, 64, generator=g)
        k = torch.randn(2, 4, n_k, 64, generator=g)
        v = torch.randn(2, 4, n_k, 64, generator=g)
        scale = torch.ones(2, n_k)
        text = slice(n_image, n_image + n_text) if joint else slice(0, n_text)
        scale[1, text.start + 2] = 2.0
        scale[1, text.start + 5] = 0.0
        rows = (0, n_image) if joint else None
        specs = {
            "plain sdpa": AttentionSpec(),
            "Reweight (value scale)": AttentionSpec(value_scale=scale, query_range=rows),
            "Reweight normalize (bias)": AttentionSpec(key_bias=torch.log(scale), query_range=rows),
        }
        variants = {name: (lambda spec=spec, q=q, k=k, v=v: attention(q, k, v, spec, "sdpa")) for name, spec in specs.items()}
        selector = torch.zeros(2, 3, n_k)  # 3 words, one token each
        for w in range(3):
            selector[:, w, text.start + 2 + w] = 1.0
        image_q = q[:, :, :n_image]
        variants["AttentionMaps capture (extra)"] = lambda q=image_q, k=k, s=selector: word_attention(q, k, s)
        results.append((label, _interleaved(variants, args.repeats)))
    print(f"attention op (sdpa backend): batch 2, 4 heads of 64, {args.repeats} repeats, medians")
    for label, medians in results:
        base = medians["plain sdpa"]
        for name, value in medians.items():
            print(f"  {label:28s} {name:26s} {value * 1000:8.2f} ms   x{value / base:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="a smoke run: smallest sizes, one repeat (CI; not a measurement)")
    parser.add_argument("--only", choices=("pipeline", "op"), default=None)
    args = parser.parse_args()
    if args.quick:  # a smoke run (CI): the smallest sizes, one repeat; the numbers mean nothing
        args.repeats, args.latent, args.steps = 1, 16, 1
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    if args.only in (None, "op"):
        op_benchmark(args)
    if args.only in (None, "pipeline"):
        pipeline_benchmark(args)
    print("target: Reweight <= 1.05 x no control")


if __name__ == "__main__":
    main()
