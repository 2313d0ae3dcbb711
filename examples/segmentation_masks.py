"""Segmentation masks from attention: a mask per word, read in a separate img2img pass with attention magnets
(RefAM), then used as a region mask in a second generation.

    python examples/segmentation_masks.py                          # embedded toy-shapes model, offline
    python examples/segmentation_masks.py --model toy-shapes-grounded   # the toy whose word maps locate objects
    python examples/segmentation_masks.py --no-magnets --strength 0.3
    python examples/segmentation_masks.py --model stabilityai/stable-diffusion-2-1-base --device cuda \\
        --prompt "a cat and a dog on a sofa" --words cat,dog --steps 30

Writes the generated image, each word's soft mask and binary mask (threshold 0.5 on the min-max normalised
map), and the second pass that puts the first word's region prompt inside that word's mask. On toy-shapes the
maps are read in its down-path cross-attention (`attnctl.toy.MAP_LAYERS`: its up-path maps are anti-correlated with
the objects); toy-shapes-grounded and real models read every cross-attention layer (`--layers` overrides). docs/methods.md gives the
measured IoU.
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import Image

import attnctl
from attnctl.render.generate import example_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="embedded name (toy-shapes, toy-shapes-grounded, tiny-sd), a directory or a hub id")
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--words", default="circle,square", help="comma-separated words")
    parser.add_argument("--strength", type=float, default=0.5, help="share of the schedule the readout re-runs")
    parser.add_argument("--no-magnets", action="store_true", help="read the plain maps (no magnets, no sink suppression)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--layers", default=None, help="comma-separated layer selectors (default: the model's map layers)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/segmentation_masks")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps (CI)")
    args = parser.parse_args()

    model, pipe, options = example_pipeline(args.model, args.device, args.steps, args.quick)
    options.setdefault("num_inference_steps", 30)
    words = [w.strip() for w in args.words.split(",") if w.strip()]

    image = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **options).images[0]  # stock
    layers = tuple(args.layers.split(",")) if args.layers else _map_layers(model)
    result = attnctl.read_maps(pipe, image, args.prompt, words, strength=args.strength, magnets=not args.no_magnets,
                               layers=layers, seed=args.seed, **options)
    os.makedirs(args.out, exist_ok=True)
    image.save(os.path.join(args.out, "image.png"))
    tiles = [image.convert("RGB")]
    for word in words:
        soft = result.masks(word, soft=True)[0]
        hard = result.masks(word, threshold=args.threshold)[0]
        Image.fromarray((soft.numpy() * 255).astype("uint8")).save(os.path.join(args.out, f"{word}_soft.png"))
        Image.fromarray(hard.numpy().astype("uint8") * 255).save(os.path.join(args.out, f"{word}_mask.png"))
        tiles += [Image.open(os.path.join(args.out, f"{word}_{kind}.png")).convert("RGB") for kind in ("soft", "mask")]
        print(f"{word:>10}: mask covers {100 * float(hard.float().mean()):.1f}% of the image")

    first = words[0]
    region = attnctl.Region(f"a {first}", mask=result.masks(first, threshold=args.threshold)[0])
    with attnctl.apply(pipe, attnctl.Regions([region], base_ratio=0.3)):
        second = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed + 1), **options).images[0]
    second.save(os.path.join(args.out, "second_pass.png"))
    tiles.append(second.convert("RGB"))
    width, height = image.size
    overview = Image.new("RGB", (width * len(tiles), height), (255, 255, 255))
    for column, tile in enumerate(tiles):
        overview.paste(tile.resize((width, height)), (column * width, 0))
    overview.save(os.path.join(args.out, "overview.png"))
    print(f"saved image.png, the masks, second_pass.png and overview.png to {args.out} ({model}, readout strength {args.strength}, "
          f"magnets {'off' if args.no_magnets else 'on'})")


def _map_layers(model: str) -> tuple[str, ...] | None:
    """Real models read every cross-attention layer (None). toy-shapes: its down path (attnctl.toy.MAP_LAYERS,
    docs/toy-shapes.md)."""
    if model != "toy-shapes":
        return None
    from attnctl.toy import MAP_LAYERS  # only in builds that ship the toy model

    return MAP_LAYERS


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
