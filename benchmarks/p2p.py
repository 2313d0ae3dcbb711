"""Prompt-to-Prompt replace on the embedded toy-shapes model: "a red circle" -> "a blue circle".

For every seed, the base image ("a red circle") and the edited image ("a blue circle") come from one call with
`attnctl.PromptToPrompt(mode="replace")`. Success (issue 20): the edited image has the base image's shape
(`attnctl.toy.analysis.describe`: one object each, same shape class), its centroid within 0.1 of the image width
of the base's (Euclidean distance), and the new colour (blue). The stock batch (no control, each row with the same
seed) is measured the same way for comparison. Seeds run in batches: `num_images_per_prompt=k` with one
generator per row (row i of each prompt gets seed s_i through its own generator, so the stock batch starts both prompts from the same noise too, as the control
makes it by copying the base rows' start latents).

    python benchmarks/p2p.py [--seeds 48] [--batch 8] [--cross-steps 0.8] [--self-steps 0.4] [--layers ...]
"""

from __future__ import annotations

import argparse
import time

import torch

BASE, EDIT = "a red circle", "a blue circle"


def judge(base, edited, color: str = "blue") -> dict[str, bool]:
    """The three checks of one seed (pixels only)."""
    from attnctl.toy import IMAGE_SIZE
    from attnctl.toy.analysis import describe

    a, b = describe(base), describe(edited)
    if len(a) != 1 or len(b) != 1:
        return {"shape": False, "centroid": False, "color": len(b) == 1 and b[0].color == color}
    (ax, ay), (bx, by) = a[0].centroid, b[0].centroid
    distance = ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 / IMAGE_SIZE
    return {"shape": a[0].shape == b[0].shape and a[0].shape is not None, "centroid": distance <= 0.1, "color": b[0].color == color}


def run(pipe, control, seeds: list[int], batch: int) -> list[dict[str, bool]]:
    import attnctl
    from attnctl.toy import CALL_DEFAULTS

    results = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        # base rows, then edited rows: one generator object per row, the same seeds for both prompts
        generators = [torch.Generator().manual_seed(s) for s in chunk] + [torch.Generator().manual_seed(s) for s in chunk]
        kwargs = dict(CALL_DEFAULTS, num_images_per_prompt=len(chunk), generator=generators)
        if control is None:
            images = pipe([BASE, EDIT], **kwargs).images
        else:
            with attnctl.apply(pipe, [control]):
                images = pipe([BASE, EDIT], **kwargs).images
        results.extend(judge(images[i], images[len(chunk) + i]) for i in range(len(chunk)))
    return results


def summary(name: str, results: list[dict[str, bool]]) -> float:
    n = len(results)
    ok = sum(all(r.values()) for r in results)
    parts = ", ".join(f"{key} {sum(r[key] for r in results) / n:.0%}" for key in ("shape", "centroid", "color"))
    print(f"{name:>10}: success {ok}/{n} = {ok / n:.1%} ({parts})")
    return ok / n


def main() -> None:
    import attnctl
    from attnctl.toy import load_toy_shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=48)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cross-steps", type=float, default=None)
    parser.add_argument("--self-steps", type=float, default=None)
    parser.add_argument("--branch", default=None)
    parser.add_argument("--layers", nargs="*", default=None)
    parser.add_argument("--no-stock", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.batch = 2, 2
    options = {k: v for k, v in (("cross_steps", args.cross_steps), ("self_steps", args.self_steps), ("branch", args.branch)) if v is not None}
    if args.layers:
        options["layers"] = tuple(args.layers)
    control = attnctl.PromptToPrompt("replace", **options)
    pipe = load_toy_shapes()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"toy-shapes, {BASE!r} -> {EDIT!r}, seeds {seeds[0]}..{seeds[-1]}, {control}, torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    summary("p2p", run(pipe, control, seeds, args.batch))
    print(f"   ({time.perf_counter() - start:.0f} s)")
    if not args.no_stock:
        summary("stock", run(pipe, None, seeds, args.batch))


if __name__ == "__main__":
    main()
