"""Test-time latent optimisation on attention maps: Attend-and-Excite, A-STAR and box layout guidance.

Saves the stock image and one image per method (and all of them side by side), same prompt and seed.

    python examples/attend_and_excite.py                               # embedded default model, offline
    python examples/attend_and_excite.py --subjects circle square --box circle 0.5 0 1 1
    python examples/attend_and_excite.py --model stabilityai/stable-diffusion-2-1-base --device cuda --steps 50 \\
        --prompt "a cat and a frog" --subjects cat frog --box cat 0 0 0.5 1
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import Image

import attnctl
from attnctl.render.generate import example_pipeline
from attnctl.toy import MAP_LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="embedded model, a directory or a hub id")
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--subjects", nargs="+", default=["circle", "square"], help="the subject words")
    parser.add_argument("--box", nargs=5, default=["circle", "0.5", "0", "1", "1"], metavar=("WORD", "X0", "Y0", "X1", "Y1"),
                        help="a word of the prompt and its box for BoxGuidance (relative coordinates)")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="the map layers (default: the controls' default level; on toy-shapes its down path, "
                             "down_blocks.2: its up path's maps are anti-correlated with the object)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/attend_and_excite")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps (CI)")
    args = parser.parse_args()

    model, pipe, options = example_pipeline(args.model, args.device, args.steps, args.quick)
    options.setdefault("num_inference_steps", 50)
    word, *box = args.box
    layers = tuple(args.layers) if args.layers else (MAP_LAYERS if model == "toy-shapes" else None)  # the toy's up-path maps are anti-correlated with the object
    # the paper's refinement steps, 0, 0.2 and 0.4 of the steps, fall on distinct steps of the window from 5 steps on;
    # a shorter run (--quick's 2 steps) refines at step 0 only (the paper's others would be dropped, with a warning)
    refine = None if options["num_inference_steps"] >= 5 else ((0.0, 0.05),)
    methods = {
        "stock": [],
        "attend_excite": [attnctl.AttendExcite(subjects=args.subjects, layers=layers, refine=refine)],
        "a_star": [attnctl.AStar(subjects=args.subjects, layers=layers, loss="both" if len(args.subjects) > 1 else "retention")],
        "box_guidance": [attnctl.BoxGuidance({word: tuple(float(v) for v in box)}, layers=layers)],
    }
    os.makedirs(args.out, exist_ok=True)
    images = []
    for name, controls in methods.items():
        with attnctl.apply(pipe, controls):
            image = pipe(args.prompt, generator=torch.Generator(device="cpu").manual_seed(args.seed), **options).images[0]
        image.save(os.path.join(args.out, f"{name}.png"))
        images.append(image)
    size = images[0].size
    strip = Image.new("RGB", (size[0] * len(images), size[1]), (255, 255, 255))
    for position, image in enumerate(images):
        strip.paste(image.convert("RGB"), (position * size[0], 0))
    strip.save(os.path.join(args.out, "comparison.png"))
    print(f"saved {', '.join(f'{n}.png' for n in methods)} and comparison.png to {args.out} ({model}, {options['num_inference_steps']} steps)")


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
