"""Prompt-to-Prompt editing: a base prompt and edited prompts from the same noise, the edits taking the base's
attention (Hertz et al. 2022). Saves the stock batch and the edited batch as two strips, base first.

    python examples/prompt_to_prompt.py                                  # embedded toy-shapes (trained), offline
    python examples/prompt_to_prompt.py --model toy-shapes-grounded      # the toy model whose word maps locate objects
    python examples/prompt_to_prompt.py --model tiny-flux                # any embedded tiny model too
    python examples/prompt_to_prompt.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda \
        --dtype float16 --prompts "a cat riding a bicycle" "a dog riding a bicycle" --local-blend cat dog
    python examples/prompt_to_prompt.py --mode refine --prompts "a circle" "a red circle"
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.render.generate import embedded_call_defaults
from attnctl.render.loading import TOY_MODELS


def strip(images):
    from PIL import Image

    out = Image.new("RGB", (sum(image.width for image in images), images[0].height))
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-shapes", help="embedded name (toy-shapes, tiny-sd, ...), a directory or a hub id")
    parser.add_argument("--prompts", nargs="+", default=None, help="base prompt, then the edited prompts "
                                                                    "(default on the toy models: a red / blue / green circle)")
    parser.add_argument("--mode", default="replace", choices=("replace", "refine"))
    parser.add_argument("--cross-steps", type=float, default=0.8)
    parser.add_argument("--self-steps", type=float, default=0.4)
    parser.add_argument("--local-blend", nargs="*", default=None, help="words whose attention maps confine the edit")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: the model's own")
    parser.add_argument("--out", default="out/prompt_to_prompt")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps (CI)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = attnctl.load_pipeline(args.model, torch_dtype=dtype, device=args.device)
    options = embedded_call_defaults(args.model)
    if args.steps or args.quick:
        options["num_inference_steps"] = args.steps or 2
    options.setdefault("num_inference_steps", 2 if args.model.startswith("tiny-") else 50)
    if args.prompts:
        prompts = args.prompts
    elif args.model in TOY_MODELS:
        prompts = ["a red circle", "a blue circle", "a green circle"]
    else:
        prompts = ["a red cat on the street", "a blue cat on the street"]
    control = attnctl.PromptToPrompt(args.mode, cross_steps=args.cross_steps, self_steps=args.self_steps,
                                     local_blend=tuple(args.local_blend) if args.local_blend else None)

    def generate():
        # one generator per row with the same seed: the stock batch starts every prompt from the same noise, as
        # the control makes it (it copies the base row's start latents into the edited rows)
        generators = [torch.Generator(device="cpu").manual_seed(args.seed) for _ in prompts]
        return pipe(prompts, generator=generators, **options).images

    stock = generate()
    with attnctl.apply(pipe, [control]) as handle:
        edited = generate()
        print(handle.describe())
    os.makedirs(args.out, exist_ok=True)
    strip(stock).save(os.path.join(args.out, "stock.png"))
    strip(edited).save(os.path.join(args.out, "edited.png"))
    print(f"prompts: {prompts}")
    print(f"saved {args.out}/stock.png and edited.png ({args.model}, {options['num_inference_steps']} steps, {control.mode})")


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
