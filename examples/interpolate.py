"""Attention interpolation (AID, He et al. NeurIPS 2024): n images from one prompt to another in one call.

Saves the images side by side (strip.png), as an animated GIF (sequence.gif) and one by one.

    python examples/interpolate.py                                          # embedded default model, offline
    python examples/interpolate.py --mode inner --n 7 --alpha 3
    python examples/interpolate.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --steps 30 \\
        --a "a photo of a cat" --b "a photo of a dog"
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.controls.cross_image.interpolation import DEFAULT_BETA
from attnctl.render.generate import example_pipeline
from attnctl.render.loading import embedded_models
from attnctl.render.outputs import save_video, strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"embedded ({', '.join(embedded_models())}), a directory or a hub id")
    parser.add_argument("--a", default="a red circle on the left", help="the first prompt (t = 0)")
    parser.add_argument("--b", default="a red circle on the right", help="the second prompt (t = 1)")
    parser.add_argument("--n", type=int, default=5, help="images, the two endpoints included")
    parser.add_argument("--mode", choices=("outer", "inner"), default="outer")
    parser.add_argument("--alpha", type=float, default=DEFAULT_BETA,
                        help="Beta(alpha, alpha) of the interpolation points")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/interpolate")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 3 images (CI)")
    args = parser.parse_args()

    model, pipe, options = example_pipeline(args.model, args.device, args.steps, args.quick)
    n = 3 if args.quick else args.n
    images = attnctl.interpolate(pipe, args.a, args.b, n, mode=args.mode, alpha=args.alpha, beta=args.alpha,
                                 generator=torch.Generator(args.device).manual_seed(args.seed), **options)
    points = attnctl.beta_points(n, args.alpha, args.alpha)
    os.makedirs(args.out, exist_ok=True)
    for index, image in enumerate(images):
        image.save(os.path.join(args.out, f"{index}.png"))
    strip(images).save(os.path.join(args.out, "strip.png"))
    save_video(images, os.path.join(args.out, "sequence.gif"), {"a": args.a, "b": args.b, "points": points}, fps=2)
    print(f"t = {', '.join(f'{t:.3f}' for t in points)}")
    print(f"saved strip.png, sequence.gif and {n} images in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
