"""Reference attention (reference-only, PrimeComposer): the images of one call read a reference picture.

Row 0 of the call carries the reference (encoded by the pipeline's VAE, noised to each step); the other rows attend to
its self-attention keys and values; on UNet models a third run adds reference-only's AdaIN (their feature maps take
the reference's channel statistics). Saves the reference and the images side by side, stock (top), with
ReferenceAttention (middle) and, on UNet models, with AdaIN too (bottom): comparison.png.

    python examples/reference_attention.py                                   # embedded default model, offline
    python examples/reference_attention.py --image my_reference.png --prompts "a circle on the left"
    python examples/reference_attention.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --steps 30 \\
        --image dog.png --reference-prompt "a photo of a dog" --prompts "a dog on the beach" "a dog in the snow"
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.render.generate import example_pipeline
from attnctl.render.loading import embedded_models
from attnctl.render.outputs import strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"embedded ({', '.join(embedded_models())}), a directory or a hub id")
    parser.add_argument("--image", default=None, help="the reference picture (default: the model's image of --reference-prompt, seed 1)")
    parser.add_argument("--reference-prompt", default="a green circle on the left", help="the reference row's prompt")
    parser.add_argument("--prompts", nargs="+", default=["a circle on the left"] * 3, help="one image each")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/reference_attention")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 1 image (CI)")
    args = parser.parse_args()

    model, pipe, options = example_pipeline(args.model, args.device, args.steps, args.quick)
    prompts = args.prompts[:1] if args.quick else args.prompts
    if args.image is None:
        reference = pipe(args.reference_prompt, generator=torch.Generator(args.device).manual_seed(1), **options).images[0]
    else:
        from PIL import Image

        with Image.open(args.image) as opened:
            reference = opened.convert("RGB")
    unet = hasattr(pipe, "unet")
    variants = [None, attnctl.ReferenceAttention(reference, strength=args.strength)]
    if unet:  # AdaIN needs a UNet's blocks (refused on transformer families)
        variants.append(attnctl.ReferenceAttention(reference, strength=args.strength, adain=True))

    rows = []
    for control in variants:
        generators = [torch.Generator(args.device).manual_seed(args.seed + i) for i in range(len(prompts) + 1)]
        handle = attnctl.apply(pipe, [control]) if control is not None else None
        try:
            images = pipe([args.reference_prompt, *prompts], generator=generators, **options).images
        finally:
            if handle is not None:
                handle.remove()
        rows.append(strip([reference, *images[1:]]))  # row 0's own image is a by-product: show the reference instead
    os.makedirs(args.out, exist_ok=True)
    strip(rows, vertical=True).save(os.path.join(args.out, "comparison.png"))
    labels = ["stock", f"ReferenceAttention(strength={args.strength:g})", f"ReferenceAttention(strength={args.strength:g}, adain=True)"]
    print(f"rows: {', '.join(labels[:len(variants)])}")
    print(f"saved comparison.png in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
