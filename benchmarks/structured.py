"""Structured Diffusion Guidance on the embedded toy-shapes model: colour binding, stock against SDG, one run.

Prompts: two objects without position words, `"a {c1} {s1} and a {c2} {s2}"` with two different colours and
two different shapes, drawn from a private generator; prompt i runs with seed i. An image is *bound* when both
colours are present and each colour's largest blob has its own shape (`attnctl.toy.analysis.check_two` with
no positions: its `colors` and `shapes` checks). Stock and `StructuredGuidance()` (the chunker's phrases
`"a {c1} {s1}"`, `"a {c2} {s2}"`, scale 1: the paper's average) run on the same prompts and seeds in one
process, interleaved; the time of each is its median per call (cost against a plain call).

    python benchmarks/structured.py [--count 96] [--steps 10] [--guidance 4] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch


def two_object_prompts(count: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str, None]]]]:
    """`count` two-object prompts without positions, and their objects (colour, shape, None)."""
    from attnctl.toy.data import COLORS, SHAPES

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        c1, c2 = rng.sample(COLORS, 2)
        s1, s2 = rng.sample(SHAPES, 2)
        out.append((f"a {c1} {s1} and a {c2} {s2}", [(c1, s1, None), (c2, s2, None)]))
    return out


def checks(image: Any, objects: list[tuple[str, str, None]]) -> dict[str, bool]:
    """`colors`: both colours present; `bound`: and each colour's blob has its own shape."""
    from attnctl.toy.analysis import check_two

    found = check_two(image, objects)
    return {"colors": found["colors"], "bound": found["colors"] and found["shapes"]}


def bound(image: Any, objects: list[tuple[str, str, None]]) -> bool:
    return checks(image, objects)["bound"]


def binding(pipe: Any, count: int, *, scale: float = 1.0, steps: int = 10, guidance: float = 4.0,
            layers: Any = None) -> dict[str, Any]:
    """Binding rates and median call times of stock and SDG over `count` prompts (prompt i with seed i).
    `layers`: SDG's layers (None: every cross-attention layer)."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS

    options = dict(CALL_DEFAULTS, num_inference_steps=steps, guidance_scale=guidance)
    hits = {"stock": 0, "sdg": 0}
    colors = {"stock": 0, "sdg": 0}
    times: dict[str, list[float]] = {"stock": [], "sdg": []}
    handle = None
    for i, (prompt, objects) in enumerate(two_object_prompts(count)):
        for name in ("stock", "sdg"):
            if name == "sdg":
                handle = attnctl.apply(pipe, attnctl.StructuredGuidance(scale=scale, layers=layers))
            try:
                start = time.perf_counter()
                image = pipe(prompt, generator=torch.Generator().manual_seed(i), **options).images[0]
                times[name].append(time.perf_counter() - start)
            finally:
                if handle is not None:
                    handle.remove()
                    handle = None
            found = checks(image, objects)
            hits[name] += found["bound"]
            colors[name] += found["colors"]
    return {
        "count": count,
        "stock": hits["stock"] / count,
        "sdg": hits["sdg"] / count,
        "colors_stock": colors["stock"] / count,
        "colors_sdg": colors["sdg"] / count,
        "time_stock": statistics.median(times["stock"]),
        "time_sdg": statistics.median(times["sdg"]),
    }


def main() -> None:
    from attnctl.toy import MODEL_NAMES  # no diffusers import

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--layers", nargs="+", default=None, help="SDG's layer selectors (default: every cross layer)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="toy-shapes", help="embedded toy model")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 prompts (CI)")
    args = parser.parse_args()
    if args.quick:
        args.count = 2
    from attnctl.toy import load_toy_shapes

    pipe = load_toy_shapes(model=args.model)
    layers = None if args.layers is None else tuple(args.layers)
    r = binding(pipe, args.count, scale=args.scale, steps=args.steps, guidance=args.guidance, layers=layers)
    print(f"{args.model}, {r['count']} two-object prompts without positions (prompt i, seed i), {args.steps} steps, "
          f"guidance {args.guidance}, SDG layers {'every cross-attention layer' if layers is None else layers}")
    print(f"colour binding  stock {100 * r['stock']:.1f}%   SDG (scale {args.scale}) {100 * r['sdg']:.1f}%   "
          f"difference {100 * (r['sdg'] - r['stock']):+.1f} points")
    print(f"both colours present  stock {100 * r['colors_stock']:.1f}%   SDG {100 * r['colors_sdg']:.1f}%")
    print(f"median call  stock {1000 * r['time_stock']:.1f} ms   SDG {1000 * r['time_sdg']:.1f} ms   "
          f"ratio {r['time_sdg'] / r['time_stock']:.2f}x")


if __name__ == "__main__":
    main()
