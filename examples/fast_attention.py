"""Cached and fast attention: DiTFastAttn (calibrate a plan, save it, generate with it) and TGATE.

    python examples/fast_attention.py                                  # toy-shapes (UNet self-attention), offline: FastAttn
    python examples/fast_attention.py --model tiny-pixart              # a DiT: its self-attention layers (the paper's default)
    python examples/fast_attention.py --method tgate --model tiny-sd   # TGATE on a UNet
    python examples/fast_attention.py --model tiny-flux --guidance-scale 1   # FastAttn without CFG
    python examples/fast_attention.py --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --device cuda --steps 20 \\
        --height 1024 --width 1024 --threshold 0.05          # a real model (hub id or local directory)

Prints what ran per layer and step, the attention FLOPs against full attention and the cache hits, and the PSNR
of the image against the uncached one. The plan is saved as JSON (`--plan` loads one instead of calibrating).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import attnctl
from attnctl.render.generate import embedded_call_defaults
from attnctl.testing import CALL_DEFAULTS

CALIBRATION = ["a red circle on a blue square", "a cat on a chair in a garden", "a boat on the sea at sunset"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-shapes", help="embedded name, a directory or a hub id")
    parser.add_argument("--method", choices=("fastattn", "tgate"), default="fastattn")
    parser.add_argument("--prompt", default="a photo of a dog under a tree")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=0.1, help="FastAttn: calibration threshold")
    parser.add_argument("--window", type=int, default=None, help="FastAttn: 1-D band half-width in tokens (default 64)")
    parser.add_argument("--plan", default=None, help="FastAttn: a saved plan (JSON) instead of calibrating")
    parser.add_argument("--gate", type=int, default=None, help="TGATE: gate step (default 40%% of the steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/fast_attention")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps (CI)")
    args = parser.parse_args()

    tiny = args.model in CALL_DEFAULTS
    pipe = attnctl.load_pipeline(args.model, device=args.device)
    options = embedded_call_defaults(args.model)
    for key in ("height", "width"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    if args.steps or args.quick:
        options["num_inference_steps"] = args.steps or 2
    options.setdefault("num_inference_steps", 8 if tiny else 25)
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    os.makedirs(args.out, exist_ok=True)

    if args.method == "tgate":
        control = attnctl.TGate(gate_step=args.gate or max(1, round(0.4 * options["num_inference_steps"])))
    elif args.plan:
        control = attnctl.FastAttn(plan=attnctl.FastAttnPlan.load(args.plan))
    else:
        calibrate = attnctl.FastAttn(threshold=args.threshold, window=args.window)
        plan = attnctl.calibrate(calibrate, pipe, CALIBRATION, generator=torch.Generator().manual_seed(1), **options)
        path = os.path.join(args.out, "plan.json")
        plan.save(path)
        print(f"calibrated on {len(CALIBRATION)} prompts; plan saved to {path}: {plan.counts()}")
        control = attnctl.FastAttn(plan=plan)

    def generate():
        return pipe(args.prompt, generator=torch.Generator().manual_seed(0), **options).images[0]

    reference = generate()
    with attnctl.apply(pipe, [control]) as handle:
        image = generate()
        report = next(iter(handle.outputs.values()))
    print(report.table())
    print(report.summary())
    a = np.asarray(reference, dtype=np.float64) / 255
    b = np.asarray(image, dtype=np.float64) / 255
    mse = float(((a - b) ** 2).mean())
    print(f"PSNR against the uncached image: {'inf' if mse == 0 else f'{10 * np.log10(1 / mse):.2f}'} dB"
          + (" (random-weight model: a weak measure)" if tiny else ""))
    reference.save(os.path.join(args.out, "uncached.png"))
    image.save(os.path.join(args.out, f"{args.method}.png"))
    print(f"saved {args.out}/uncached.png and {args.out}/{args.method}.png")


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
