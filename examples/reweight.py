"""Reweight words at the attention level, written in prompt syntax: stock and reweighted images side by side.

    python examples/reweight.py                                   # embedded toy-shapes (trained), offline
    python examples/reweight.py --model tiny-flux                 # tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, tiny-pixart too
    python examples/reweight.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype float16 \
        --prompt "a (red:1.8) car on a street, [blurry]"          # a hub id or a local diffusers directory

attnctl weights *attention* (Prompt-to-Prompt), not text embeddings as A1111 and compel do.

On toy-shapes the default prompt 'a (red:0) circle' mutes "red", and the circle loses its colour on some seeds only:
on seeds 1, 4, 6 and 7 of 0-7 it turns green or blue, on the others it stays red (seed 0 too). The default seed is 1.
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.render.generate import embedded_call_defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-shapes", help="embedded name (toy-shapes, tiny-sd, ...), a directory or a hub id")
    parser.add_argument("--prompt", default=None, help="default: 'a (red:0) circle' on toy-shapes (red muted: the "
                                                         "circle loses its colour on some seeds, seed 1 among them), else "
                                                         "'a (red:2.5) car on the (street:0.5), [blurry]'")
    parser.add_argument("--normalize", action="store_true", help="renormalise: softmax(logits + log w)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1, help="default 1: a seed where the toy default shows its effect")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: the model's own")
    parser.add_argument("--out", default="out/reweight")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps (CI)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = attnctl.load_pipeline(args.model, torch_dtype=dtype, device=args.device)
    options = embedded_call_defaults(args.model)
    if args.steps or args.quick:
        options["num_inference_steps"] = args.steps or 2
    options.setdefault("num_inference_steps", 2 if args.model.startswith("tiny-") else 30)
    steps = options["num_inference_steps"]
    prompt = args.prompt or ("a (red:0) circle" if args.model == "toy-shapes" else "a (red:2.5) car on the (street:0.5), [blurry]")
    clean, control = attnctl.Reweight.from_prompt(prompt, normalize=args.normalize)
    print(f"prompt: {clean!r}")
    print(f"weights: {[(w.query, w.factor) for w in control.weights]}")

    def generate():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(clean, generator=generator, **options).images[0]

    stock = generate()
    with attnctl.apply(pipe, [control]) as handle:
        reweighted = generate()
        print(handle.describe())

    os.makedirs(args.out, exist_ok=True)
    from PIL import Image

    pair = Image.new("RGB", (stock.width * 2, stock.height))
    pair.paste(stock, (0, 0))
    pair.paste(reweighted, (stock.width, 0))
    for name, image in (("stock.png", stock), ("reweighted.png", reweighted), ("side_by_side.png", pair)):
        image.save(os.path.join(args.out, name))
    print(f"saved {args.out}/stock.png, reweighted.png and side_by_side.png ({args.model}, {steps} steps)")


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
