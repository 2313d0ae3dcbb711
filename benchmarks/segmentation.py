"""Segmentation masks from attention on the embedded toy-shapes model: IoU against the pixels' object masks.

Images: two-object prompts without positions, `"a {c1} {s1} and a {c2} {s2}"` (prompt i, seed i), generated
stock. Per image and per word of its objects (both colour words and both shape words), the IoU of
`masks(word)` (threshold 0.5 on the min-max normalised map, docs/methods.md) against the object's mask from the
pixels (`attnctl.toy.analysis.color_masks(image)[colour] >= 0.5`; a shape word's object is the one of its
colour); objects the image does not show (coverage < 12 pixels) are skipped. On `toy-shapes` the maps are read in
`attnctl.toy.MAP_LAYERS` (the layers whose maps locate objects there, chosen on held-out seeds: docs/toy-shapes.md);
on `--model toy-shapes-grounded` in every cross-attention layer (the method's default; `--layers all` on either). Three readouts, each in its own pass:

- `generation`: `AttentionMaps(words)` during the generation call itself (no magnets);
- `readout`: `attnctl.read_maps(pipe, image, prompt, words, strength, magnets=False)`: img2img at `strength`;
- `magnets`: the same readout with `magnets=True` (stop words appended, global sinks suppressed).

Also the time of each pass against the plain call (median).

    python benchmarks/segmentation.py [--count 96] [--strength 0.5] [--threshold 0.5 ...] [--layers all|NAME ...]
    python benchmarks/segmentation.py --model toy-shapes-grounded
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


def perfect_map_mask(truth: np.ndarray, grid: tuple[int, int], threshold: float) -> np.ndarray:
    """The mask a map that is perfect at the token `grid` gives: the object's pixel mask area-averaged onto the grid,
    then resized and thresholded exactly as `AttentionMapResult.masks` does (bilinear to the image's size, min-max
    normalised, `>= threshold`): the ceiling of the IoU for maps read at that grid."""
    import torch.nn.functional as F

    from attnctl.controls.maps.masks import masks_from_maps

    pixels = torch.tensor(truth, dtype=torch.float32)[None, None]
    on_grid = F.adaptive_avg_pool2d(pixels, grid)
    resized = F.interpolate(on_grid, size=truth.shape, mode="bilinear", align_corners=False)[0]
    return masks_from_maps(resized, threshold=threshold)[0].numpy()


def segmentation(pipe: Any, count: int, *, strength: float = 0.5, thresholds: tuple[float, ...] = (0.5,),
                 layers: Any = None) -> dict[str, Any]:
    """Mean IoU per readout and threshold over every (image, word) pair (`iou_<readout>` at the first threshold,
    `iou_<readout>@<threshold>` at each), the number of pairs and the median times. `layers`: as `AttentionMaps`."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS
    from attnctl.toy.analysis import MIN_MASS, color_masks

    scores: dict[tuple[str, float], list[float]] = {
        (name, t): [] for name in ("generation", "readout", "magnets", "ceiling") for t in thresholds
    }
    times: dict[str, list[float]] = {"plain": [], "generation": [], "readout": [], "magnets": []}
    grid = None
    for i, (prompt, objects) in enumerate(two_object_prompts(count)):
        words = tuple(w for color, shape, _ in objects for w in (color, shape))
        def generator(seed: int = i) -> torch.Generator:
            return torch.Generator().manual_seed(seed)

        start = time.perf_counter()
        image = pipe(prompt, generator=generator(), **CALL_DEFAULTS).images[0]
        times["plain"].append(time.perf_counter() - start)
        results = {}
        with attnctl.apply(pipe, attnctl.AttentionMaps(words, layers=layers)) as handle:
            start = time.perf_counter()
            pipe(prompt, generator=generator(), **CALL_DEFAULTS)
            times["generation"].append(time.perf_counter() - start)
            results["generation"] = handle.outputs["attention_maps"]
        for name, magnets in (("readout", False), ("magnets", True)):
            start = time.perf_counter()
            results[name] = attnctl.read_maps(pipe, image, prompt, words, strength=strength, magnets=magnets, seed=i, layers=layers,
                                              num_inference_steps=CALL_DEFAULTS["num_inference_steps"],
                                              guidance_scale=CALL_DEFAULTS["guidance_scale"])
            times[name].append(time.perf_counter() - start)
        truth = color_masks(image)
        for color, shape, _ in objects:
            if truth[color].sum() < MIN_MASS:
                continue
            target = truth[color] >= 0.5
            grid = tuple(results["generation"].grid_maps.shape[-2:])
            for word in (color, shape):
                for name, result in results.items():
                    for threshold in thresholds:
                        scores[name, threshold].append(iou(result.masks(word, threshold=threshold)[0].numpy(), target))
                for threshold in thresholds:
                    scores["ceiling", threshold].append(iou(perfect_map_mask(target, grid, threshold), target))
    means = {key: float(np.mean(values)) if values else float("nan") for key, values in scores.items()}
    return {
        "pairs": len(scores["magnets", thresholds[0]]),
        **{f"iou_{name}@{threshold:g}": value for (name, threshold), value in means.items()},
        **{f"iou_{name}": means[name, thresholds[0]] for name in ("generation", "readout", "magnets", "ceiling")},
        "grid": grid,
        **{f"time_{name}": statistics.median(values) for name, values in times.items()},
    }


def main() -> None:
    from attnctl.toy import MODEL_NAMES  # no diffusers import

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.5], help="mask thresholds (each is reported)")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="layer selectors; default attnctl.toy.MAP_LAYERS on toy-shapes, every layer on toy-shapes-grounded; 'all' every cross-attention layer")
    parser.add_argument("--model", choices=MODEL_NAMES, default="toy-shapes", help="embedded toy model")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 images (CI)")
    args = parser.parse_args()
    if args.quick:
        args.count = 2
    from attnctl.toy import MAP_LAYERS, load_toy_shapes

    default = MAP_LAYERS if args.model == "toy-shapes" else None
    layers = default if args.layers is None else None if args.layers == ["all"] else tuple(args.layers)
    pipe = load_toy_shapes(model=args.model)
    thresholds = tuple(args.threshold)
    r = segmentation(pipe, args.count, strength=args.strength, thresholds=thresholds, layers=layers)
    print(f"{args.model}, {args.count} two-object images (prompt i, seed i), {r['pairs']} (image, word) pairs, "
          f"layers {'every cross-attention layer' if layers is None else layers}, readout strength {args.strength}")
    for name in ("generation", "readout", "magnets"):
        ious = "  ".join(f"threshold {t:g}: {r[f'iou_{name}@{t:g}']:.3f}" for t in thresholds)
        print(f"mean IoU  {name:<10} {ious}   median time {1000 * r[f'time_{name}']:.0f} ms "
              f"({r[f'time_{name}'] / r['time_plain']:.2f}x the plain call)")
    ious = "  ".join(f"threshold {t:g}: {r[f'iou_ceiling@{t:g}']:.3f}" for t in thresholds)
    print(f"mean IoU  {'ceiling':<10} {ious}   (a map perfect at the {r['grid'][0]}x{r['grid'][1]} token grid the maps are "
          "read at: the objects' pixels averaged onto it, then the same resizing and threshold)")


if __name__ == "__main__":
    main()
