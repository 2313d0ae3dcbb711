"""Evaluate the toy-shapes model with automatic pixel analysis.

Stock part:
- one-object prompts with a position ("a red circle on the left"): colour, shape and position accuracy over
  every colour x shape x position, repeated over seeds (96 samples by default);
- one-object prompts without a position ("a red circle", the per-region prompts of region control):
  colour and shape accuracy;
- two-object prompts ("a red circle on the left and a blue square on the right"): binding accuracy
  (each colour on its own side) and fully-right accuracy (binding and both shapes), >= 64 samples;
- generation time per image (batch 1, CFG) and the training summary shipped with the model.

Controls part (``--controls``): the same two-object prompts with ``attnctl.Regions`` (one box per object)
and ``attnctl.Reweight`` (colour-word emphasis); see :func:`evaluate_controls`.

Usage::

    PYTHONPATH=. python benchmarks/toy_eval.py [--grid toy_grid.png] [--steps 10] [--guidance 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import attnctl
from attnctl.toy import (
    BINDING_REGION_LAYERS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    analysis,
    data,
    load_toy_shapes,
)

ObjectSpec = tuple[str, str, "str | None"]


# --------------------------------------------------------------------------- prompt sets
@dataclass(frozen=True)
class Case:
    """One evaluation sample: a prompt, the objects it asks for, and the seed of its initial noise."""

    prompt: str
    objects: tuple[ObjectSpec, ...]
    seed: int


def one_object_cases(n: int, seed: int = 0, with_position: bool = True) -> list[Case]:
    """Every colour x shape (x position) in turn, ``n`` cases, seeds ``seed*100000 + i``."""
    positions: Sequence[str | None] = data.POSITIONS if with_position else (None,)
    combos = [(c, s, p) for p in positions for c in data.COLORS for s in data.SHAPES]
    return [
        Case(data.object_phrase(*combos[i % len(combos)]), (combos[i % len(combos)],), seed * 100_000 + i)
        for i in range(n)
    ]


def two_object_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` random two-object prompts with distinct colours and positions on one axis (seeded)."""
    rng = np.random.default_rng(10_000 + seed)
    cases = []
    for i in range(n):
        c1, c2 = (data.COLORS[int(k)] for k in rng.choice(len(data.COLORS), size=2, replace=False))
        s1, s2 = (data.SHAPES[int(k)] for k in rng.integers(len(data.SHAPES), size=2))
        p1, p2 = data.POSITION_PAIRS[int(rng.integers(len(data.POSITION_PAIRS)))]
        if rng.random() < 0.5:
            p1, p2 = p2, p1
        objects = ((c1, s1, p1), (c2, s2, p2))
        prompt = " and ".join(data.object_phrase(*o) for o in objects)
        cases.append(Case(prompt, objects, seed * 100_000 + 50_000 + i))
    return cases


# --------------------------------------------------------------------------- generation
Generate = Callable[[list[Case]], np.ndarray]


class Progress:
    """Progress on stderr: a line when a stage starts and at most every 10 s within it (the evaluation runs for
    minutes on a CPU and printed nothing until the end)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int, force: bool = False) -> None:
        now = time.perf_counter()
        if force or done == total or now - self._last >= 10:
            self._last = now
            print(f"toy_eval: {stage} {done}/{total} images ({now - self.start:.0f} s)", file=sys.stderr, flush=True)


PROGRESS = Progress()


def stock_generator(pipe, steps: int, guidance: float, batch: int = 16) -> Generate:
    """Generate a list of cases with the stock pipeline, each from its own seeded noise (`stage`: report progress)."""

    def generate(cases: list[Case], stage: str = "") -> np.ndarray:
        out = []
        for i in range(0, len(cases), batch):
            chunk = cases[i : i + batch]
            gens = [torch.Generator().manual_seed(c.seed) for c in chunk]
            if stage:
                PROGRESS(stage, i, len(cases), force=i == 0)
            out.append(pipe([c.prompt for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                            height=32, width=32, generator=gens, output_type="np").images)
        if stage:
            PROGRESS(stage, len(cases), len(cases))
        return np.concatenate(out)

    return generate


def score(cases: list[Case], images: np.ndarray) -> dict[str, float]:
    """Accuracy of each check (fraction of cases), using :mod:`attnctl.toy.analysis`."""
    results = [
        analysis.check_one(img, *c.objects[0]) if len(c.objects) == 1 else analysis.check_two(img, list(c.objects))
        for c, img in zip(cases, images)
    ]
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def time_per_image(pipe, steps: int, guidance: float, repeats: int = 7) -> float:
    """Median seconds for one 32x32 image (batch 1), after a warm-up."""
    times = []
    for i in range(repeats + 1):
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, generator=g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# --------------------------------------------------------------------------- controls
def position_box(position: str) -> tuple[float, float, float, float]:
    """The half of the canvas a position word names, as a normalised box ``(x0, y0, x1, y1)``."""
    return {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
            "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0)}[position]


def evaluate_controls(pipe, cases: list[Case], steps: int, guidance: float, stock_images: np.ndarray,
                      weight: float = 2.0) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """The two-object cases with ``attnctl.Regions`` and ``attnctl.Reweight``; returns ``{name: (scores, images)}``.

    Regions: one box per object (the half of the canvas its position names), the object's phrase without
    position (``"a red circle"``) as the region prompt, the full two-object prompt as the base prompt; once with
    the settings this model needs (``layers=BINDING_REGION_LAYERS, isolate=True``: ``regions``) and once with
    the defaults (``regions_default``).
    Reweight: the first object's colour word weighted by ``weight`` (Prompt-to-Prompt, cond rows); reported as
    the change of that colour's area in pixels against the stock image of the same seed (mean, and the
    fraction of cases where it grew), and the same for the other object's colour as a control.
    """
    generate = stock_generator(pipe, steps, guidance, batch=1)
    out: dict[str, tuple[dict[str, float], np.ndarray]] = {}

    for name, options in (("regions", {"layers": BINDING_REGION_LAYERS, "isolate": True}), ("regions_default", {})):
        images = []
        for number, case in enumerate(cases):
            PROGRESS(f"two-object {name}", number, len(cases), force=number == 0)
            regions = attnctl.Regions([attnctl.Region(data.object_phrase(c, s), box=position_box(p)) for c, s, p in case.objects],
                                      **options)
            with attnctl.apply(pipe, [regions]):
                images.append(generate([case])[0])
        out[name] = (score(cases, np.stack(images)), np.stack(images))

    images, gains, others = [], [], []
    for number, (case, base) in enumerate(zip(cases, stock_images)):
        PROGRESS("two-object reweight", number, len(cases), force=number == 0)
        color, other = case.objects[0][0], case.objects[1][0]
        with attnctl.apply(pipe, [attnctl.Reweight({color: weight})]):
            img = generate([case])[0]
        images.append(img)
        after, before = analysis.color_masks(img), analysis.color_masks(base)
        gains.append(float(after[color].sum()) - float(before[color].sum()))
        others.append(float(after[other].sum()) - float(before[other].sum()))
    res = score(cases, np.stack(images))
    res["weighted_colour_area_gain_px"] = float(np.mean(gains))
    res["weighted_colour_area_grew"] = float(np.mean(np.array(gains) > 0))
    res["other_colour_area_gain_px"] = float(np.mean(others))
    out["reweight"] = (res, np.stack(images))
    return out


# --------------------------------------------------------------------------- output
def save_grid(rows: Sequence[np.ndarray], path: Path, scale: int = 4) -> None:
    """Save rows of images (each ``(n, 32, 32, 3)`` in [0, 1]) as one PNG, upscaled by ``scale``."""
    from PIL import Image

    n = max(len(r) for r in rows)
    grid = np.ones((len(rows) * 34, n * 34, 3))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid[i * 34 + 1 : i * 34 + 33, j * 34 + 1 : j * 34 + 33] = img
    im = Image.fromarray((grid * 255).round().astype(np.uint8))
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def print_table(rows: list[tuple[str, str, str]]) -> None:
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers directory (default: the embedded toy-shapes model)")
    p.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--scheduler", default=None, help="override the scheduler class, e.g. EulerDiscreteScheduler")
    p.add_argument("--n-one", type=int, default=96)
    p.add_argument("--n-free", type=int, default=48, help="one-object prompts without a position")
    p.add_argument("--n-two", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, default=None, help="save a picture grid of two-object prompts here")
    p.add_argument("--json", type=Path, default=None, help="save the numbers here")
    p.add_argument("--controls", action="store_true", help="also evaluate attnctl.Regions / attnctl.Reweight")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 / 1 / 1 prompts, 2 steps (CI; the numbers mean nothing)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_one, args.n_free, args.n_two, args.steps = 2, 1, 1, 2
    torch.set_num_threads(args.threads)

    pipe = load_toy_shapes(path=args.model)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
    model_dir = Path(pipe.name_or_path) if getattr(pipe, "name_or_path", None) else None
    generate = stock_generator(pipe, args.steps, args.guidance)

    report: dict = {"steps": args.steps, "guidance": args.guidance, "scheduler": type(pipe.scheduler).__name__}
    rows: list[tuple[str, str, str]] = [("metric", "n", "value")]
    summary = (model_dir / "training.json") if model_dir else None
    if summary and summary.is_file():
        train = json.loads(summary.read_text())
        report["training"] = train
        for key in ("total_minutes", "vae_minutes", "unet_minutes", "unet_seconds_per_step", "unet_steps", "final_loss"):
            if key in train:
                rows.append((f"training {key}", "", f"{train[key]:.4g}"))

    t0 = time.perf_counter()
    one = one_object_cases(args.n_one, args.seed)
    report["one_object"] = score(one, generate(one, "one-object"))
    free = one_object_cases(args.n_free, args.seed + 1, with_position=False)
    report["one_object_free"] = score(free, generate(free, "one-object without position"))
    two = two_object_cases(args.n_two, args.seed)
    two_images = generate(two, "two-object stock")
    report["two_object_stock"] = score(two, two_images)
    report["eval_seconds"] = time.perf_counter() - t0
    report["seconds_per_image"] = time_per_image(pipe, args.steps, args.guidance, repeats=1 if args.quick else 7)

    for k in ("color", "shape", "position", "all"):
        rows.append((f"one-object {k}", str(len(one)), f"{report['one_object'][k]:.1%}"))
    for k in ("color", "shape", "all"):
        rows.append((f"one-object no-position {k}", str(len(free)), f"{report['one_object_free'][k]:.1%}"))
    for k in ("colors", "binding", "shapes", "all"):
        rows.append((f"two-object stock {k}", str(len(two)), f"{report['two_object_stock'][k]:.1%}"))
    rows.append(("seconds per image (batch 1)", "", f"{report['seconds_per_image']:.3f}"))

    grid_rows = [two_images[:16]]
    if args.controls:
        controlled = evaluate_controls(pipe, two, args.steps, args.guidance, two_images)
        report["controls"] = {name: res for name, (res, _) in controlled.items()}
        for name, (res, images) in controlled.items():
            grid_rows.append(images[:16])
            for k, v in res.items():
                rows.append((f"two-object {name} {k}", str(len(two)), f"{v:.4g}" if k.endswith("_px") else f"{v:.1%}"))

    print(f"toy-shapes eval: {args.steps} steps, guidance {args.guidance}, {report['scheduler']}")
    print_table(rows)
    if args.grid:
        save_grid(grid_rows, args.grid)
        print(f"grid: {args.grid} (first 16 two-object prompts: {[c.prompt for c in two[:4]]} ...)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
