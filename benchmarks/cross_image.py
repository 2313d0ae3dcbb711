"""Cross-image controls on the embedded toy-shapes model, where the truth is known from pixels.

Attention interpolation (AID, `attnctl.interpolate`) between "a red circle on the left" and "a red circle on the
right": a sequence passes when the red object's centroid x (largest red component, `attnctl.toy.analysis`) is found
in every image, never moves back by more than 0.02 of the width from one image to the next, and moves at least 0.3
of the width in all. Reported: the pass rate over the seeds for each mode and Beta(alpha, alpha), and for a baseline
without attention control, the usual linear interpolation of the prompt embeddings (the same n rows, the same
noise). Cost: one n-row call with the control against the same n-row call without it, interleaved in one run.

    python benchmarks/cross_image.py [--seeds 48] [--n 5] [--threads 2] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

PROMPT_A = "a red circle on the left"
PROMPT_B = "a red circle on the right"
MAX_BACK = 0.02
MIN_TRAVEL = 0.3


def centroid_xs(images: list[Any], colour: str = "red") -> list[float | None]:
    from attnctl.toy import analysis

    xs: list[float | None] = []
    for image in images:
        found = analysis.centroid(analysis.largest_component(analysis.color_masks(image)[colour]))
        xs.append(None if found is None else found[0] / image.size[0])
    return xs


def sequence_passes(xs: list[float | None]) -> bool:
    """Every centroid found, never back by more than MAX_BACK, and at least MIN_TRAVEL from first to last."""
    if any(x is None for x in xs):
        return False
    steps = [b - a for a, b in zip(xs, xs[1:])]
    return min(steps) >= -MAX_BACK and xs[-1] - xs[0] >= MIN_TRAVEL


def embedding_lerp(pipe: Any, n: int, seed: int, points: tuple[float, ...]) -> list[Any]:
    """The baseline: no attention control, the prompt embeddings interpolated linearly at `points`, same noise."""
    from attnctl.toy import CALL_DEFAULTS

    with torch.no_grad():
        a, negative = pipe.encode_prompt(PROMPT_A, "cpu", 1, True)
        b, _ = pipe.encode_prompt(PROMPT_B, "cpu", 1, True)
    t = torch.tensor(points, dtype=a.dtype).view(-1, 1, 1)
    embeds = (1 - t) * a + t * b
    generators = [torch.Generator().manual_seed(seed) for _ in range(n)]
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative.expand(n, -1, -1), generator=generators,
                **CALL_DEFAULTS).images


def aid_rates(pipe: Any, seeds: range, n: int, variants: list[tuple[str, float]], baseline: bool = True) -> dict[str, float]:
    """Pass rate of each (mode, alpha) variant (and of the baseline) over `seeds`."""
    from attnctl.controls.cross_image.interpolation import beta_points
    from attnctl.interpolate import interpolate

    passed: dict[str, int] = {}
    for seed in seeds:
        for mode, alpha in variants:
            images = interpolate(pipe, PROMPT_A, PROMPT_B, n, mode=mode, alpha=alpha, beta=alpha,
                                 generator=torch.Generator().manual_seed(seed))
            key = f"{mode} Beta({alpha:g},{alpha:g})"
            passed[key] = passed.get(key, 0) + sequence_passes(centroid_xs(images))
        if baseline:
            images = embedding_lerp(pipe, n, _seed_of(seed), beta_points(n, 1.0, 1.0))
            passed["embedding lerp (no control)"] = passed.get("embedding lerp (no control)", 0) + sequence_passes(centroid_xs(images))
    return {key: count / len(seeds) for key, count in passed.items()}


def _seed_of(seed: int) -> int:
    """The seed `interpolate` gives every row for `generator=torch.Generator().manual_seed(seed)`."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)).item())


def cost(pipe: Any, n: int, repeats: int) -> dict[str, float]:
    """Median seconds of one n-row call with each cross-image control and without any (the same rows and
    settings), interleaved in one run."""
    import attnctl
    from attnctl.controls.cross_image.consistent import ConsistentSubjects
    from attnctl.controls.cross_image.interpolation import AttentionInterpolation
    from attnctl.controls.cross_image.reference import ReferenceAttention
    from attnctl.toy import CALL_DEFAULTS, MAP_LAYERS

    reference = pipe(PROMPT_A, generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS).images[0]
    variants = {"stock": None, "AID outer": AttentionInterpolation(mode="outer"), "AID inner": AttentionInterpolation(mode="inner"),
                "consistent": ConsistentSubjects(), "consistent, all": ConsistentSubjects(reference=None),
                "consistent, word": ConsistentSubjects(subject="circle", map_layers=MAP_LAYERS),
                "consistent, reposition": ConsistentSubjects(reposition=((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)), isolate=True),
                "reference": ReferenceAttention(reference), "reference + adain": ReferenceAttention(reference, adain=True),
                "adain": ReferenceAttention(reference, strength=0.0, adain=True)}
    prompts = [PROMPT_A] * (n // 2) + [PROMPT_B] * (n - n // 2)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name, control in variants.items():
            handle = None if control is None else attnctl.apply(pipe, [control])
            start = time.perf_counter()
            pipe(prompts, generator=torch.Generator().manual_seed(r), output_type="latent", **CALL_DEFAULTS)
            if r:
                times[name].append(time.perf_counter() - start)
            if handle is not None:
                handle.remove()
    return {name: statistics.median(values) for name, values in times.items()}


class SwapAttentionOutputs:
    """Diagnostic, not a control: every attention module's output (self- and cross-attention) of the target rows is
    replaced by the reference row's (row 0 of each CFG half), at every layer and step: an upper bound on what any
    attention-level sharing can carry from the reference to the targets. Forward hooks on the module instances,
    removed after the call."""

    def __init__(self, kinds: tuple[str, ...] = ("attn1", "attn2")):
        self.kinds = kinds

    def install(self, pipe: Any) -> Any:
        def swap(module: Any, args: Any, kwargs: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            half = out.shape[0] // 2 if out.shape[0] % 2 == 0 else out.shape[0]
            for start in range(0, out.shape[0], half):
                out[start + 1 : start + half] = out[start]
            return out

        hooks = [m.register_forward_hook(swap, with_kwargs=True) for n, m in pipe.unet.named_modules() if n.rsplit(".", 1)[-1] in self.kinds]
        return lambda: [h.remove() for h in hooks]


def agreement_rates(pipe: Any, seeds: range, rows: int, variants: dict[str, Any], prompt: str = "a circle on the left") -> dict[str, tuple[float, float]]:
    """Consistent subjects: for a `rows`-image batch of `prompt` (no colour given; each row its own seed), how often
    every image's dominant colour (`analysis.describe`, the largest colour) is one and the same, and how often a
    target image (rows 1..) has the dominant colour of image 0 (the reference), stock and with each control of
    `variants` (None: stock; a `SwapAttentionOutputs`: the diagnostic). Returns {name: (all agree, match reference)}."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS, analysis

    agreed = dict.fromkeys(variants, 0)
    matched = dict.fromkeys(variants, 0)
    for seed in seeds:
        for name, control in variants.items():
            if isinstance(control, SwapAttentionOutputs):
                remove = control.install(pipe)
            else:
                handle = attnctl.apply(pipe, [control]) if control is not None else None
                remove = handle.remove if handle is not None else (lambda: None)
            generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(rows)]
            try:
                images = pipe([prompt] * rows, generator=generators, **CALL_DEFAULTS).images
            finally:
                remove()
            colours = [objects[0].color if objects else None for objects in map(analysis.describe, images)]
            agreed[name] += colours[0] is not None and len(set(colours)) == 1
            matched[name] += sum(colours[0] is not None and c == colours[0] for c in colours[1:])
    return {name: (agreed[name] / len(seeds), matched[name] / (len(seeds) * (rows - 1))) for name in variants}


def consistent_variants(quick: bool = False) -> dict[str, Any]:
    """The settings reported on the benchmark seeds (chosen on held-out seeds 1000-1015: `--only consistent-select`)."""
    from attnctl.controls.cross_image.consistent import ConsistentSubjects
    from attnctl.toy import MAP_LAYERS

    variants = {"stock": None,
                "ConsistentSubjects()": ConsistentSubjects(),
                "subject='circle' (word map)": ConsistentSubjects(subject="circle", map_layers=MAP_LAYERS),
                "subject='circle', strength=10": ConsistentSubjects(subject="circle", map_layers=MAP_LAYERS, strength=10.0),
                "strength=100": ConsistentSubjects(strength=100.0),
                "diagnostic: swap attention outputs": SwapAttentionOutputs()}
    if quick:
        return {key: variants[key] for key in ("stock", "subject='circle' (word map)")}
    return variants


def consistent_picture(pipe: Any, seeds: range, path: str, scale: int = 3) -> None:
    """The first seeds of the benchmark (not picked), one row each of 4 images of "a circle on the left" stock, with
    `subject="circle"` at strength 10, and with the diagnostic, side by side; saved to `path` (upscaled `scale`x)."""
    from PIL import Image

    import attnctl
    from attnctl.toy import CALL_DEFAULTS

    variants = consistent_variants()
    chosen = [variants["stock"], variants["subject='circle', strength=10"], variants["diagnostic: swap attention outputs"]]
    rows = []
    for seed in seeds:
        row = []
        for control in chosen:
            if isinstance(control, SwapAttentionOutputs):
                remove = control.install(pipe)
            else:
                handle = attnctl.apply(pipe, [control]) if control is not None else None
                remove = handle.remove if handle is not None else (lambda: None)
            generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(4)]
            try:
                row += pipe(["a circle on the left"] * 4, generator=generators, **CALL_DEFAULTS).images
            finally:
                remove()
        rows.append(row)
    size = rows[0][0].width * scale
    gap = 4 * scale
    sheet = Image.new("RGB", (len(rows[0]) * size + 2 * gap, len(rows) * size), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.resize((size, size), Image.NEAREST), (c * size + (c // 4) * gap, r * size))
    sheet.save(path)


def reference_picture(pipe: Any, seeds: range, path: str, variants: dict[str, Any], scale: int = 3,
                      reference: str = "a green circle on the left", prompt: str = "a circle on the left") -> None:
    """One row per variant (None: stock; else a callable of the reference image): the reference, then the 3 counted
    images of each seed of `seeds` (the benchmark's first seeds, not picked); saved to `path` (upscaled `scale`x)."""
    from PIL import Image

    import attnctl
    from attnctl.toy import CALL_DEFAULTS

    image = pipe(reference, generator=torch.Generator().manual_seed(1), **CALL_DEFAULTS).images[0]
    rows = []
    for make in variants.values():
        row = [image]
        for seed in seeds:
            handle = attnctl.apply(pipe, [make(image)]) if make is not None else None
            generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(4)]
            try:
                row += pipe([reference] + [prompt] * 3, generator=generators, **CALL_DEFAULTS).images[1:]
            finally:
                if handle is not None:
                    handle.remove()
        rows.append(row)
    size, gap = image.width * scale, 4 * scale
    sheet = Image.new("RGB", (len(rows[0]) * size + gap, len(rows) * size + (len(rows) - 1) * gap), (128, 128, 128))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile.resize((size, size), Image.NEAREST), (c * size + (gap if c else 0), r * (size + gap)))
    sheet.save(path)


def selection_variants() -> dict[str, Any]:
    """Candidates tried on the held-out seeds (1000-1015) before the benchmark seeds were run."""
    from attnctl.controls.cross_image.consistent import ConsistentSubjects
    from attnctl.toy import MAP_LAYERS

    word = {"subject": "circle", "map_layers": MAP_LAYERS}
    return {"stock": None,
            "ConsistentSubjects()": ConsistentSubjects(),
            "strength=10": ConsistentSubjects(strength=10.0),
            "strength=100": ConsistentSubjects(strength=100.0),
            "steps=(0,.5), strength=10": ConsistentSubjects(strength=10.0, steps=(0.0, 0.5)),
            "layers=down+mid, strength=10": ConsistentSubjects(strength=10.0, layers=("down_blocks.2", "mid_block")),
            "word": ConsistentSubjects(**word),
            "word, strength=10": ConsistentSubjects(**word, strength=10.0),
            "word, threshold=.3, strength=10": ConsistentSubjects(**word, strength=10.0, threshold=0.3),
            "reference=None, strength=10": ConsistentSubjects(reference=None, strength=10.0),
            "diagnostic: swap self-attention outputs": SwapAttentionOutputs(("attn1",)),
            "diagnostic: swap attention outputs": SwapAttentionOutputs()}


def reference_rates(pipe: Any, seeds: range, rows: int, variants: dict[str, Any], reference: str = "a green circle on the left",
                    prompt: str = "a circle on the left") -> dict[str, float]:
    """Reference attention: how often the object of an image of `prompt` (no colour given) takes the colour of the
    reference image (the stock image of `reference` for seed 1), stock and with each control of `variants` (a
    callable of the reference image). Row 0 of each call carries the reference; the `rows` others are counted."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS, analysis

    image = pipe(reference, generator=torch.Generator().manual_seed(1), **CALL_DEFAULTS).images[0]
    colour = analysis.describe(image)[0].color
    hits = dict.fromkeys(variants, 0)
    for seed in seeds:
        for name, make in variants.items():
            handle = attnctl.apply(pipe, [make(image)]) if make is not None else None
            generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(rows + 1)]
            try:
                images = pipe([reference] + [prompt] * rows, generator=generators, **CALL_DEFAULTS).images
            finally:
                if handle is not None:
                    handle.remove()
            found = [objects[0].color if objects else None for objects in map(analysis.describe, images[1:])]
            hits[name] += sum(c == colour for c in found)
    return {name: count / (len(seeds) * rows) for name, count in hits.items()}


def main() -> None:
    from attnctl.toy import MODEL_NAMES  # no diffusers import

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=48)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("all", "aid", "consistent", "consistent-select", "reference", "cost"), default="all")
    parser.add_argument("--model", choices=MODEL_NAMES, default="toy-shapes", help="embedded toy model")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, 3 images, 1 repeat (CI)")
    parser.add_argument("--picture", default=None, help="with --only consistent or reference: also save seeds 0-3 as a picture here")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.n, args.repeats = 1, 3, 1
    torch.set_num_threads(args.threads)
    from attnctl.render.loading import load_pipeline

    pipe = load_pipeline(args.model)
    if args.only == "cost":
        args.only = "cost-only"
    if args.only in ("all", "reference"):
        from attnctl.controls.cross_image.reference import ReferenceAttention

        variants_ref = {"stock": None, "ReferenceAttention()": lambda image: ReferenceAttention(image),
                        "ReferenceAttention(steps=(0,.5))": lambda image: ReferenceAttention(image, steps=(0.0, 0.5)),
                        "ReferenceAttention(strength=.5)": lambda image: ReferenceAttention(image, strength=0.5),
                        "ReferenceAttention(adain=True)": lambda image: ReferenceAttention(image, adain=True),
                        "ReferenceAttention(adain=True, style_fidelity=.5)":
                            lambda image: ReferenceAttention(image, adain=True, style_fidelity=0.5),
                        "ReferenceAttention(strength=0, adain=True)": lambda image: ReferenceAttention(image, strength=0.0, adain=True)}
        if args.quick:
            variants_ref = dict(list(variants_ref.items())[:2])
        print(f"reference attention: 3 images of 'a circle on the left' + the reference row, seeds 0..{args.seeds - 1}: "
              "the object takes the reference's colour (green)")
        for key, rate in reference_rates(pipe, range(args.seeds), 3, variants_ref).items():
            print(f"  {key:50s} {rate:6.1%}", flush=True)
        if args.picture and args.only == "reference":
            shown = ("stock", "ReferenceAttention()", "ReferenceAttention(adain=True)")
            reference_picture(pipe, range(4), args.picture, {key: variants_ref[key] for key in shown})
        if args.only == "reference":
            return
    if args.only == "consistent-select":
        print("consistent subjects, held-out seeds 1000..1015 (settings chosen here): 4 images of 'a circle on the left'; "
              "all one dominant colour / target = reference colour")
        for key, (rate, match) in agreement_rates(pipe, range(1000, 1016), 4, selection_variants()).items():
            print(f"  {key:40s} {rate:6.1%} {match:6.1%}", flush=True)
        return
    if args.only in ("all", "consistent"):
        print(f"consistent subjects: 4 images of 'a circle on the left', seeds 0..{args.seeds - 1}: all one dominant colour / "
              "target = reference colour")
        for key, (rate, match) in agreement_rates(pipe, range(args.seeds), 4, consistent_variants(args.quick)).items():
            print(f"  {key:40s} {rate:6.1%} {match:6.1%}", flush=True)
        if args.picture:
            consistent_picture(pipe, range(4), args.picture)
            print(f"saved {args.picture}")
        if args.only == "consistent":
            return
    variants = [] if args.only == "cost-only" else [("outer", 2.0)] if args.quick else [("outer", 2.0), ("inner", 2.0), ("outer", 1.0), ("outer", 3.0)]
    print(f"AID on {args.model}: {PROMPT_A!r} -> {PROMPT_B!r}, n={args.n}, seeds 0..{args.seeds - 1}")
    print(f"pass: centroid never back > {MAX_BACK} width, travel >= {MIN_TRAVEL} width")
    for key, rate in (aid_rates(pipe, range(args.seeds), args.n, variants, baseline=bool(variants)) if variants else {}).items():
        print(f"  {key:32s} {rate:6.1%}", flush=True)
    medians = cost(pipe, args.n, args.repeats)
    sys.stdout.flush()
    print(f"cost, one {args.n}-row call (CFG, {torch.get_num_threads()} threads), median of {args.repeats}:")
    for name, seconds in medians.items():
        print(f"  {name:24s} {seconds * 1000:8.1f} ms  x{seconds / medians['stock']:.2f}")


if __name__ == "__main__":
    main()
