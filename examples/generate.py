"""Wrapped generation: load a model, attach controls given as data, generate a few seeds, save PNGs that
carry their parameters. The same API `attnctl render` uses for every image.

    python examples/generate.py                                   # embedded default model, offline, no controls
    python examples/generate.py --model tiny-sd3 --seeds 0 1 2
    python examples/generate.py --control '{"type": "PAG", "scale": 3.0}'     # any attnctl control, as data
    python examples/generate.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --steps 30 \\
        --width 1024 --height 1024 --control '{"type": "Reweight", "weights": {"cat": 1.5}}'
"""

from __future__ import annotations

import argparse
import json
import os

import attnctl
from attnctl.render.generate import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="embedded name, local diffusers folder or hub id")
    parser.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--control", action="append", default=[], help="a control as JSON: {\"type\": ..., field: value}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="out/generate")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed, 2 steps (CI)")
    args = parser.parse_args()

    controls = []
    for text in args.control:
        try:
            data = json.loads(text)
            controls.append(attnctl.Control.from_dict(data))  # class names accepted in any case, as in job files
        except (json.JSONDecodeError, attnctl.ConfigError) as error:
            parser.error(f"--control {text!r}: {error}")
    name = args.model or default_model()
    from attnctl.render.generate import embedded_call_defaults

    embedded = embedded_call_defaults(name)
    steps = args.steps or (2 if args.quick else None) or (None if "num_inference_steps" in embedded else 20)
    seeds = args.seeds[:1] if args.quick else args.seeds
    os.makedirs(args.out, exist_ok=True)
    with attnctl.Model.load(name, device=args.device, dtype=args.dtype) as model:
        print(model)
        for seed in seeds:
            result = model.generate(args.prompt, seed=seed, controls=controls, negative_prompt=args.negative_prompt,
                                    steps=steps, width=args.width, height=args.height,
                                    guidance_scale=args.guidance_scale)
            path = os.path.join(args.out, f"{seed}.png")
            result.save(path)
            print(f"{path}: {result.seconds:.2f} s, {result.image.width}x{result.image.height}")
        if model.handle is not None:
            print(model.handle.describe())


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
