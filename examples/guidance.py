"""Guidance by attention perturbation: PAG, SEG, SAG, PLADIS and skip-layer guidance on one pipeline.

Generates the same prompt and seed without guidance and with each method, saves every image and a strip of
them side by side (`--describe` also prints what attnctl did: `handle.describe()`).

    python examples/guidance.py                                   # toy-shapes (trained), offline
    python examples/guidance.py --model tiny-sd3 --methods pag,skip
    python examples/guidance.py --model stabilityai/stable-diffusion-3.5-medium --device cuda --dtype bfloat16 \\
        --methods skip,pag --steps 28
    python examples/guidance.py --model /path/to/sd15 --device cuda --methods pag,seg,sag,pladis,pag+seg

Real models run each method on its default layers (PAG and SEG on a UNet's mid-block self-attention; skip-layer on
SD3.5-M's blocks 7, 8, 9, elsewhere the middle block, over 1%-20% of the steps). The 32x32 toy-shapes model gets
other layers (`TOY_SETTINGS`): its mid block is a 4x4 grid of 16 tokens, and perturbing only that changes the saved
image by a few levels of 255 at most.
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.families import adapter_for
from attnctl.handle import denoiser_of
from attnctl.render.generate import embedded_call_defaults
from attnctl.render.loading import embedded_models, load_pipeline

METHODS = ("pag", "seg", "sag", "pladis", "skip", "pag+seg")


#: toy-shapes only (a real model keeps the defaults). Its mid block, where PAG and SEG act by default on a UNet and
#: skip_blocks() picks for skip-layer, is a 4x4 grid of 16 tokens: perturbing it there changed the saved image by at
#: most 6 of 255 levels (0.01-0.15 on average, seeds 0-2). So on toy PAG and SEG perturb every self-attention layer
#: (the 8x8 levels too), and skip-layer skips the 8x8 down block's transformer block on every step but the first
#: (SD3.5-M's 1%-20% window holds one of toy's 10 steps). Change from the unguided image, seeds 0-5, mean (max) of
#: 255: PAG 7.6-32 (201-242), SEG 5.0-7.0 (92-188), skip 6.1-11.1 (188-242), PAG+SEG 8.2-33 (171-240).
TOY_SETTINGS = {"layers": "self", "skip_blocks": ("down_blocks.1.attentions.0.transformer_blocks.0",), "skip_steps": (0.0, 1.0)}


def skip_blocks(pipe) -> tuple:
    """SD3.5-M's blocks 7, 8, 9 where the model has them; else its middle transformer block."""
    _, denoiser = denoiser_of(pipe)
    adapter = adapter_for(denoiser)
    available = adapter.transformer_blocks()
    blocks = [name for name in available if name.startswith("transformer_blocks.")]
    if adapter.indexed_blocks and len(blocks) > 9:
        return (7, 8, 9)
    if adapter.indexed_blocks:
        return (len(blocks) // 2,)
    mid = [name for name in available if name.startswith("mid_block.")]
    return (mid[0],) if mid else (next(iter(available)),)


def controls_for(method: str, pipe, few_steps: bool = False, toy: bool = False) -> list[attnctl.Control]:
    """The controls of `method`; `toy`: toy-shapes' layers and skip window (TOY_SETTINGS) instead of the defaults."""
    # SD3.5-M's window (1%-20% of the steps) holds no step of a short run, and SkipLayer's window excludes both ends
    # (n start < i < n stop): every step but the first there (of --quick's 2 steps, step 1)
    skip_steps = (0.0, 1.0) if few_steps else (0.01, 0.2)
    layers = None  # PAG / SEG: the family's default layers
    if toy:
        layers, skip_steps = TOY_SETTINGS["layers"], TOY_SETTINGS["skip_steps"]
    table = {
        "pag": lambda: [attnctl.PAG(scale=3.0, layers=layers)],
        "seg": lambda: [attnctl.SEG(scale=3.0, sigma=10.0, layers=layers)],
        "sag": lambda: [attnctl.SAG(scale=0.75)],
        "pladis": lambda: [attnctl.PLADIS(scale=2.0, alpha=1.5)],
        "skip": lambda: [attnctl.SkipLayer(scale=2.8, blocks=TOY_SETTINGS["skip_blocks"] if toy else skip_blocks(pipe),
                                           steps=skip_steps)],
        "pag+seg": lambda: [attnctl.PAG(scale=2.0, layers=layers), attnctl.SEG(scale=2.0, sigma=10.0, layers=layers)],
    }
    return table[method]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-shapes", help=f"embedded ({', '.join(embedded_models())}), a directory or a hub id")
    parser.add_argument("--prompt", default=None, help="default: 'a red circle on the left and a blue square on the "
                                                         "right' on toy-shapes, else 'a photo of a cat on a red car'")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None, help="the pipeline's own CFG scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: the model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/guidance")
    parser.add_argument("--describe", action="store_true", help="print what attnctl did per method (handle.describe())")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps (CI)")
    args = parser.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_pipeline(args.model, device=args.device, torch_dtype=dtype)
    tiny = args.model in embedded_models()
    options = embedded_call_defaults(args.model)
    if args.steps or args.quick:
        options["num_inference_steps"] = args.steps or 2
    options.setdefault("num_inference_steps", 4 if tiny else 28)
    prompt = args.prompt or ("a red circle on the left and a blue square on the right" if args.model == "toy-shapes"
                             else "a photo of a cat on a red car")
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    os.makedirs(args.out, exist_ok=True)

    def generate():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(prompt, generator=generator, **options).images[0]

    images = [("none", generate())]
    for method in methods:
        controls = controls_for(method, pipe, options["num_inference_steps"] < 10, toy=args.model == "toy-shapes")
        with attnctl.apply(pipe, controls) as handle:
            images.append((method, generate()))
            if args.describe:
                print(handle.describe())
        print(f"{method}: done", flush=True)
    for name, image in images:
        image.save(os.path.join(args.out, f"{name.replace('+', '_')}.png"))
    strip = _strip([image for _, image in images])
    strip.save(os.path.join(args.out, "strip.png"))
    print(f"saved {len(images)} images and strip.png ({', '.join(n for n, _ in images)}) to {args.out}")


def _strip(images):
    from PIL import Image

    width = sum(image.width for image in images)
    height = max(image.height for image in images)
    out = Image.new("RGB", (width, height))
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
