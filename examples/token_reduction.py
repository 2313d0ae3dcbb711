"""Faster self-attention by token reduction: ToMe and AgentAttention (AgentSD) against the stock pipeline.

    python examples/token_reduction.py                                  # embedded toy-shapes (trained), offline
    python examples/token_reduction.py --model tiny-sdxl --ratio 0.6    # another embedded model
    python examples/token_reduction.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --size 512

Generates the same image three times (stock, `attnctl.ToMe`, `attnctl.AgentAttention`) from the same seed,
prints the time of each, the PSNR against stock and what the controls report (tokens merged per layer and
step, attention FLOPs against full attention), and saves the images.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

import attnctl
from attnctl.render.generate import embedded_call_defaults
from attnctl.render.loading import embedded_models, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-shapes", help=f"embedded ({', '.join(embedded_models())}), a directory or a hub id")
    parser.add_argument("--prompt", default="a photo of a cat on a red car")
    parser.add_argument("--ratio", type=float, default=0.5, help="ToMe merge ratio (AgentAttention keeps the authors' 0.4)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image height and width (real models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/token_reduction")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, no warm-up (CI)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device)
    options = embedded_call_defaults(args.model)
    if args.size:
        options.update(height=args.size, width=args.size)
    if args.steps or args.quick:
        options["num_inference_steps"] = args.steps or 2
    options.setdefault("num_inference_steps", 4 if args.model.startswith("tiny-") else 30)
    steps = options["num_inference_steps"]
    os.makedirs(args.out, exist_ok=True)

    def generate():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        start = time.perf_counter()
        image = pipe(args.prompt, generator=generator, **options).images[0]
        return image, time.perf_counter() - start

    if not args.quick:
        generate()  # warm-up
    stock, stock_time = generate()
    stock.save(os.path.join(args.out, "stock.png"))
    print(f"{args.model}, {steps} steps: stock {stock_time:.2f} s")
    for name, control in (("tome", attnctl.ToMe(ratio=args.ratio)), ("agent", attnctl.AgentAttention())):
        with attnctl.apply(pipe, [control]) as handle:
            image, elapsed = generate()
            report = handle.outputs["tome" if name == "tome" else "agent_attention"]
        image.save(os.path.join(args.out, f"{name}.png"))
        print(f"\n{control}\n  {elapsed:.2f} s ({stock_time / elapsed:.2f}x), PSNR vs stock {psnr(image, stock):.2f} dB, "
              f"attention FLOPs {report.flops_ratio():.3f} of full attention")
        for step, entry in report.per_step().items():
            print(f"  step {step}: {int(entry['merged'])} tokens merged per image over the layers, FLOPs {entry['flops_ratio']:.3f}")
        for layer, entry in report.per_layer().items():
            print(f"  {layer}: {entry['merged']:.0f} tokens merged per call, FLOPs {entry['flops_ratio']:.3f}")
    print(f"\nsaved stock.png, tome.png, agent.png in {args.out}")


def psnr(image, reference) -> float:
    a = np.asarray(image, dtype=np.float64) / 255.0
    b = np.asarray(reference, dtype=np.float64) / 255.0
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
