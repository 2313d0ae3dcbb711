"""Quickstart: a binding failure fixed by regions, before and after, offline in seconds on a CPU.

    python examples/quickstart.py                      # embedded toy-shapes model -> out/quickstart/grid.png
    python examples/quickstart.py --model tiny-sd3     # a random-weight fixture (exercises the plumbing only)
    python examples/quickstart.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --size 512

The prompt names two objects; the stock model often gives each the other's colour (attribute binding). With
`attnctl.Regions`, each half of the canvas attends to its own object's prompt. The same seeds are generated
stock and with regions; on the toy-shapes model every picture is also checked by pixel analysis. Real models
take the default region settings.
"""

from __future__ import annotations

import argparse
import os

import torch

import attnctl
from attnctl.controls.maps.heatmap import grid
from attnctl.render.generate import default_model, embedded_call_defaults
from attnctl.render.loading import embedded_models, load_pipeline

OBJECTS = (("red", "circle", "left"), ("blue", "square", "right"))
BOXES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"embedded ({', '.join(embedded_models())}), a directory or a hub id")
    parser.add_argument("--seeds", type=int, default=8, help="how many seeds (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (toy-shapes: 10)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/quickstart")
    parser.add_argument("--describe", action="store_true", help="also print what attnctl did (handle.describe())")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, 2 steps (CI)")
    args = parser.parse_args()

    model = args.model or default_model()
    pipe = load_pipeline(model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    options = embedded_call_defaults(model)
    if args.quick:
        args.seeds = min(args.seeds, 2)
    if args.steps or args.quick:
        options["num_inference_steps"] = args.steps or 2
    elif model.startswith("tiny-"):
        options["num_inference_steps"] = 2
    if args.size:
        options.update(height=args.size, width=args.size)

    prompt = " and ".join(f"a {color} {shape} on the {side}" for color, shape, side in OBJECTS)
    regions = attnctl.Regions([attnctl.Region(f"a {color} {shape}", box=BOXES[side]) for color, shape, side in OBJECTS],
                              **_region_options(model))
    seeds = list(range(args.seeds))
    rows = []
    for name, controls in (("stock", []), ("regions", [regions])):
        with attnctl.apply(pipe, controls) as handle:
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
            images = pipe([prompt] * len(seeds), generator=generators, **options).images
            if controls and args.describe:
                print(handle.describe())
        verdicts = [_binding(image) if model == "toy-shapes" else None for image in images]
        rows.append(grid([(f"{name} {seed}{_mark(ok)}", image) for seed, image, ok in zip(seeds, images, verdicts)]))
        if model == "toy-shapes":
            print(f"{name:>8}: colours bound to the right sides in {sum(verdicts)}/{len(seeds)} images", flush=True)

    os.makedirs(args.out, exist_ok=True)
    picture = _stack(rows)
    path = os.path.join(args.out, "grid.png")
    picture.save(path)
    print(f"prompt: {prompt!r}\nsaved {path} (top: stock, bottom: regions; {model}, seeds {seeds[0]}..{seeds[-1]})")


def _region_options(model: str) -> dict:
    """Real models take the defaults. toy-shapes: region prompts act in the 8x8 cross-attention and the subjects are
    kept apart in every self-attention layer (attnctl.toy.BINDING_REGION_LAYERS, docs/toy-shapes.md)."""
    if model != "toy-shapes":
        return {}
    from attnctl.toy import BINDING_REGION_LAYERS  # only in builds that ship the toy model

    return {"layers": BINDING_REGION_LAYERS, "isolate": True}


def _binding(image) -> bool:
    from attnctl.toy import analysis

    return bool(analysis.check_two(image, list(OBJECTS))["binding"])


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ok" if ok else " wrong")


def _stack(rows):
    from PIL import Image

    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height
    return canvas


if __name__ == "__main__":
    try:
        main()
    except attnctl.AttnctlError as error:  # a bad argument or input: its message, not a traceback
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: {error}") from None
