"""Segmentation masks from attention on the embedded toy-shapes model: IoU against the pixels' object masks.

Images: two-object prompts without positions, `"a {c1} {s1} and a {c2} {s2}"` (prompt i, seed i), generated
stock. Per image and per word of its objects (both colour words and both shape words), the IoU of
`masks(word)` (threshold 0.5 on the min-max normalised map, docs/methods.md) against the object's mask from the
pixels (`attnctl.toy.analysis.color_masks(image)[colour] >= 0.5`; a shape word's object is the one of its
colour); objects the image does not show (coverage < 12 pixels) are skipped. Three readouts, each in its own
pass:

- `generation`: `AttentionMaps(words)` during the generation call itself (no magnets);
- `readout`: `attnctl.read_maps(pipe, image, prompt, words, strength, magnets=False)`: img2img at `strength`;
- `magnets`: the same readout with `magnets=True` (stop words appended, global sinks suppressed).

Also the time of each pass against the plain call (median).

    python benchmarks/segmentation.py [--count 96] [--strength 0.5] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 0.0


def two_object_prompts(count: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str, None]]]]:
    """`count` two-object prompts without positions (as benchmarks/structured.py draws them)."""
    import random

    from attnctl.toy.data import COLORS, SHAPES

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        c1, c2 = rng.sample(COLORS, 2)
        s1, s2 = rng.sample(SHAPES, 2)
        out.append((f"a {c1} {s1} and a {c2} {s2}", [(c1, s1, None), (c2, s2, None)]))
    return out


def segmentation(pipe: Any, count: int, *, strength: float = 0.5, threshold: float = 0.5) -> dict[str, Any]:
    """Mean IoU per readout over every (image, word) pair, the number of pairs and the median times."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS
    from attnctl.toy.analysis import MIN_MASS, color_masks

    scores: dict[str, list[float]] = {"generation": [], "readout": [], "magnets": []}
    times: dict[str, list[float]] = {"plain": [], "generation": [], "readout": [], "magnets": []}
    for i, (prompt, objects) in enumerate(two_object_prompts(count)):
        words = tuple(w for color, shape, _ in objects for w in (color, shape))
        def generator(seed: int = i) -> torch.Generator:
            return torch.Generator().manual_seed(seed)

        start = time.perf_counter()
        image = pipe(prompt, generator=generator(), **CALL_DEFAULTS).images[0]
        times["plain"].append(time.perf_counter() - start)
        results = {}
        with attnctl.apply(pipe, attnctl.AttentionMaps(words)) as handle:
            start = time.perf_counter()
            pipe(prompt, generator=generator(), **CALL_DEFAULTS)
            times["generation"].append(time.perf_counter() - start)
            results["generation"] = handle.outputs["attention_maps"]
        for name, magnets in (("readout", False), ("magnets", True)):
            start = time.perf_counter()
            results[name] = attnctl.read_maps(pipe, image, prompt, words, strength=strength, magnets=magnets, seed=i,
                                              num_inference_steps=CALL_DEFAULTS["num_inference_steps"],
                                              guidance_scale=CALL_DEFAULTS["guidance_scale"])
            times[name].append(time.perf_counter() - start)
        truth = color_masks(image)
        for color, shape, _ in objects:
            if truth[color].sum() < MIN_MASS:
                continue
            target = truth[color] >= 0.5
            for word in (color, shape):
                for name, result in results.items():
                    scores[name].append(iou(result.masks(word, threshold=threshold)[0].numpy(), target))
    return {
        "pairs": len(scores["magnets"]),
        **{f"iou_{name}": float(np.mean(values)) if values else float("nan") for name, values in scores.items()},
        **{f"time_{name}": statistics.median(values) for name, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 images (CI)")
    args = parser.parse_args()
    if args.quick:
        args.count = 2
    from attnctl.toy import load_toy_shapes

    pipe = load_toy_shapes()
    r = segmentation(pipe, args.count, strength=args.strength, threshold=args.threshold)
    print(f"toy-shapes, {args.count} two-object images (prompt i, seed i), {r['pairs']} (image, word) pairs, "
          f"threshold {args.threshold}, readout strength {args.strength}")
    for name in ("generation", "readout", "magnets"):
        print(f"mean IoU  {name:<10} {r[f'iou_{name}']:.3f}   median time {1000 * r[f'time_{name}']:.0f} ms "
              f"({r[f'time_{name}'] / r['time_plain']:.2f}x the plain call)")


if __name__ == "__main__":
    main()
