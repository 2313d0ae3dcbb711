"""Quickstart: load a pipeline, attach attnctl, generate, and see what attnctl did.

    python examples/quickstart.py                      # embedded default model, offline
    python examples/quickstart.py --model tiny-sd3     # another embedded model
    python examples/quickstart.py --model runwayml/stable-diffusion-v1-5 --device cuda   # a real model
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.pipelines.loading import embedded_models, load_pipeline
from attnctl.testing import CALL_DEFAULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"embedded ({', '.join(embedded_models())}), a directory or a hub id")
    parser.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()

    model = args.model or _default_model()
    pipe = load_pipeline(model, device=args.device)
    options = dict(CALL_DEFAULTS.get(model, {}))
    steps = args.steps or (2 if model.startswith("tiny-") else 20)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with attnctl.apply(pipe, []) as handle:
        image = pipe(args.prompt, num_inference_steps=steps, generator=generator, **options).images[0]
        print(handle.describe())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "image.png")
    image.save(path)
    print(f"saved {path} ({model}, {steps} steps)")


def _default_model() -> str:
    try:
        import attnctl.toy  # noqa: F401

        return "toy-shapes"
    except ImportError:
        return "tiny-sd"


if __name__ == "__main__":
    main()
