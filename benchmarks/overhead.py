"""Overhead of `attnctl.apply(pipe, [])` against the stock pipeline.

Config: an SD-like UNet (block channels 32/64, two attention levels, 4 heads) at a 64x64 latent, so
that self-attention over 4096 tokens dominates, CFG batch of 2, 2 steps, latents out. Both variants run
interleaved in one process; medians after warm-up; printed as a ratio (target: at most 1.05).

    python benchmarks/overhead.py [--repeats 7] [--latent 64] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def build(latent: int):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from attnctl.testing.pipelines import _clip_text_encoder, _vae
    from attnctl.testing.tokenizers import tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=latent, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_clip_text_encoder(), tokenizer=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    import attnctl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: smallest sizes, one repeat (CI; not a measurement)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:  # a smoke run (CI): the smallest sizes, one repeat; the numbers mean nothing
        args.repeats, args.latent, args.steps = 1, 16, 1
    torch.set_num_threads(args.threads)
    pipe = build(args.latent)
    size = args.latent * 2  # the tiny VAE downsamples by 2

    def run():
        with torch.inference_mode():
            pipe("a photo of a cat", num_inference_steps=args.steps, height=size, width=size, output_type="latent",
                 generator=torch.Generator().manual_seed(0))

    handle = None
    times = {"stock": [], "attnctl": []}
    for repeat in range(args.repeats + 1):  # first round is warm-up
        for variant in ("stock", "attnctl"):
            if variant == "attnctl":
                handle = attnctl.apply(pipe, [])
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if handle is not None:
                handle.remove()
                handle = None
            if repeat:
                times[variant].append(elapsed)
    stock, controlled = statistics.median(times["stock"]), statistics.median(times["attnctl"])
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"config: SD-like UNet 32/64, latent {args.latent}x{args.latent} ({args.latent**2} self-attention tokens), CFG, "
          f"{args.steps} steps, {args.repeats} repeats, medians after warm-up")
    print(f"stock   {stock * 1000:8.1f} ms")
    print(f"attnctl {controlled * 1000:8.1f} ms   (apply(pipe, []))")
    print(f"ratio   {controlled / stock:8.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
