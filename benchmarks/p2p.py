"""Prompt-to-Prompt replace on the embedded toy-shapes model: "a red circle" -> "a blue circle".

For every seed, the base image ("a red circle") and the edited image ("a blue circle") come from one call with
`attnctl.PromptToPrompt(mode="replace")`. Success (issue 20): the edited image has the base image's shape
(`attnctl.toy.analysis.describe`: one object each, same shape class), its centroid within 0.1 of the image width
of the base's (Euclidean distance), and the new colour (blue). The stock batch (no control, each row with the same
seed) is measured the same way for comparison, and the mean intersection over union of the two images' object
coverage shows how much of the layout is kept. Seeds run in batches: `num_images_per_prompt=k` with one
generator per row (row i of each prompt gets seed s_i through its own generator, so the stock batch starts both prompts from the same noise too, as the control
makes it by copying the base rows' start latents).

    python benchmarks/p2p.py [--seeds 48] [--batch 8] [--cross-steps 0.8] [--self-steps 0.4] [--layers ...]
    python benchmarks/p2p.py --cost 5        # time: the edited batch against the same batch without linking
    python benchmarks/p2p.py --oracle        # + the oracle diagnostics (`CopyAttentionOutputs`), in the same run
    python benchmarks/p2p.py --model toy-shapes-grounded --picture docs/images/p2p_toy_grounded.png

The oracle (`--oracle`) bounds what any attention-level edit can do for this target: the edited rows' attention
OUTPUTS are set from the base rows' (forward hooks, a diagnostic, not a control). Since the edited row starts from
the base row's noise and the prompt enters the toy UNet only through cross-attention, copying every attention output
at every step makes the edit the base image; the variants differ in what stays the edited prompt's. The base image
itself must hold one object of a known shape for a seed to count, which bounds every method on the seeds.
"""

from __future__ import annotations

import argparse
import time

import torch

BASE, EDIT = "a red circle", "a blue circle"


def judge(base, edited, color: str = "blue") -> dict[str, bool]:
    """The three checks of one seed (pixels only)."""
    from attnctl.toy.analysis import describe

    a, b = describe(base), describe(edited)
    if len(a) != 1 or len(b) != 1:
        return {"shape": False, "centroid": False, "color": len(b) == 1 and b[0].color == color}
    return {"shape": a[0].shape == b[0].shape and a[0].shape is not None, "centroid": _apart(a[0], b[0]) <= 0.1, "color": b[0].color == color}


def _apart(a, b) -> float:
    """Distance between two objects' centroids, in image widths."""
    from attnctl.toy import IMAGE_SIZE

    (ax, ay), (bx, by) = a.centroid, b.centroid
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 / IMAGE_SIZE


def judge_objects(base, edited, old: str = "red", new: str = "blue") -> bool:
    """A per-object reading of the same check, reported beside it (not the issue's): every `old`-coloured object of
    the base image has a `new`-coloured object in the edit of the same known shape within 0.1 of the width, and the
    edit has no `old`-coloured object left. It counts edits of base images that hold other objects too (on toy-shapes,
    "a red circle" also captions a red circle beside another object: docs/toy-shapes.md), which `judge` fails."""
    from attnctl.toy.analysis import describe

    before = [o for o in describe(base) if o.color == old]
    after = describe(edited)
    if not before or any(o.color == old for o in after):
        return False

    def matched(obj) -> bool:
        return any(o.color == new and o.shape == obj.shape and obj.shape is not None and _apart(o, obj) <= 0.1 for o in after)

    return all(matched(obj) for obj in before)


class CopyAttentionOutputs:
    """Oracle diagnostic, not a control: in the edited rows (prompt rows k..2k-1 of every CFG branch, k images per
    prompt), the output of every self-attention module (`attn1`) is replaced by its base row's (row r - k) in the
    steps `i < self_until * n`, and of every cross-attention module (`attn2`) in the steps `i < cross_until * n`
    (n: the call's steps; one UNet call per step under batched CFG); in the step the fraction cuts, the output is
    the mix `w * base + (1 - w) * own` with `w = until * n - i`. What is not copied is what the pipeline
    computes, with `control` (a `PromptToPrompt`, or None for stock) applied under the hooks. `cross_layers`: module
    name prefixes, to copy the cross-attention of those layers only. Forward hooks on the
    module instances, removed after the call."""

    def __init__(self, self_until: float = 1.0, cross_until: float = 0.0, control=None, cross_layers: tuple[str, ...] | None = None):
        self.self_until, self.cross_until, self.control, self.cross_layers = self_until, cross_until, control, cross_layers

    def __repr__(self) -> str:
        layers = "" if self.cross_layers is None else f", cross_layers={self.cross_layers}"
        return f"CopyAttentionOutputs(self_until={self.self_until}, cross_until={self.cross_until}{layers}, control={self.control})"

    def install(self, pipe, rows_per_prompt: int, steps: int):
        """Hooks on `pipe.unet`; returns their remover. `self.calls[kind]` counts the module outputs copied."""
        state = {"step": -1}
        calls = self.calls = {"attn1": 0, "attn2": 0}
        until = {"attn1": self.self_until * steps, "attn2": self.cross_until * steps}

        def tick(module, args):
            state["step"] += 1

        def copy(kind):
            def hook(module, args, out):
                weight = min(max(until[kind] - state["step"], 0.0), 1.0)  # a step cut by the fraction: a mix
                if weight == 0.0:
                    return out
                out, k = out.clone(), rows_per_prompt
                for group in range(0, out.shape[0], 2 * k):  # [base rows, edited rows] per CFG branch
                    edited = out[group + k : group + 2 * k]
                    out[group + k : group + 2 * k] = weight * out[group : group + k] + (1 - weight) * edited if weight < 1 else out[group : group + k]
                calls[kind] += 1
                return out

            return hook

        hooks = [pipe.unet.register_forward_pre_hook(tick)]
        hooks += [m.register_forward_hook(copy(name.rsplit(".", 1)[-1])) for name, m in pipe.unet.named_modules()
                  if name.endswith(".attn1") or name.endswith(".attn2") and (self.cross_layers is None or name.startswith(self.cross_layers))]
        return lambda: [h.remove() for h in hooks]


def oracle_variants() -> dict[str, CopyAttentionOutputs]:
    """The oracle variants reported with `--oracle` (docs/methods.md, "Prompt-to-Prompt editing")."""
    import attnctl

    strongest = attnctl.PromptToPrompt("replace", cross_steps=1.0, self_steps=1.0)
    variants = {
        "oracle 1: self-attn outputs from base, cross stock": CopyAttentionOutputs(1.0, 0.0),
        "oracle 2: self-attn outputs from base, cross P2P replace (1, 1)": CopyAttentionOutputs(1.0, 0.0, strongest),
        "oracle 3: all attn outputs from base": CopyAttentionOutputs(1.0, 1.0),
    }
    for t in (0.05, 0.1, 0.15, 0.2):  # 0.05 / 0.15: half of step 0 / step 1 (a mix)
        variants[f"oracle 4: all from base for steps < {t:g}, then self from base, cross stock"] = CopyAttentionOutputs(1.0, t)
    variants["oracle 5: all from base for steps < 0.1, then stock"] = CopyAttentionOutputs(0.1, 0.1)
    # the best of a scan of layer groups x windows on these seeds (docs/methods.md)
    variants["oracle 6: self from base, up-block cross from base for steps < 0.1"] = CopyAttentionOutputs(1.0, 0.1, cross_layers=("up_blocks",))
    return variants


def pairs(pipe, control, seeds: list[int], batch: int) -> list[tuple]:
    """(base image, edited image) per seed; `control` a `PromptToPrompt`, a `CopyAttentionOutputs` or None (stock)."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS

    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        # base rows, then edited rows: one generator object per row, the same seeds for both prompts
        generators = [torch.Generator().manual_seed(s) for s in chunk] + [torch.Generator().manual_seed(s) for s in chunk]
        kwargs = dict(CALL_DEFAULTS, num_images_per_prompt=len(chunk), generator=generators)
        remove, applied = (lambda: None), control
        if isinstance(control, CopyAttentionOutputs):
            remove = control.install(pipe, len(chunk), CALL_DEFAULTS["num_inference_steps"])
            applied = control.control
        try:
            if applied is None:
                images = pipe([BASE, EDIT], **kwargs).images
            else:
                with attnctl.apply(pipe, [applied]):
                    images = pipe([BASE, EDIT], **kwargs).images
        finally:
            remove()
        out.extend((images[i], images[len(chunk) + i]) for i in range(len(chunk)))
    return out


def picture(pipe, control, seeds: list[int], path: str, scale: int = 3) -> None:
    """The benchmark's first seeds (not picked), one column each: the base image, the stock edited prompt from the
    same noise, and the edit with `control`; saved to `path` (upscaled `scale`x, 4 px between rows)."""
    from PIL import Image

    stock, edited = pairs(pipe, None, seeds, len(seeds)), pairs(pipe, control, seeds, len(seeds))
    rows = [[a for a, _ in stock], [b for _, b in stock], [b for _, b in edited]]
    side = rows[0][0].width * scale
    out = Image.new("RGB", (side * len(seeds), len(rows) * (side + 4) - 4), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            out.paste(image.convert("RGB").resize((side, side), Image.LANCZOS), (c * side, r * (side + 4)))
    out.save(path)


def overlap(base, edited) -> float:
    """Intersection over union of the two images' object coverage (any palette colour), a softer measure of
    "the same layout" than the centroid check."""
    from attnctl.toy.analysis import color_masks

    a, b = (sum(color_masks(image).values()) > 0.5 for image in (base, edited))
    return float((a & b).sum() / max((a | b).sum(), 1))


def split(edited) -> bool:
    """The edited image holds more than one object (`describe` separates objects by colour): on toy-shapes this is
    mostly one circle in two colours (e.g. blue and green), which the shape check counts as a lost shape."""
    from attnctl.toy.analysis import describe

    return len(describe(edited)) > 1


def run(pipe, control, seeds: list[int], batch: int) -> list[dict[str, float]]:
    return [dict(judge(a, b), iou=overlap(a, b), split=split(b), objects=judge_objects(a, b)) for a, b in pairs(pipe, control, seeds, batch)]


def summary(name: str, results: list[dict[str, float]]) -> float:
    n = len(results)
    ok = sum(all(r[key] for key in ("shape", "centroid", "color")) for r in results)
    parts = ", ".join(f"{key} {sum(r[key] for r in results) / n:.0%}" for key in ("shape", "centroid", "color"))
    iou = sum(r["iou"] for r in results) / n
    splits = sum(r.get("split", False) for r in results)
    objects = sum(r.get("objects", False) for r in results)
    print(f"{name:>10}: success {ok}/{n} = {ok / n:.1%} ({parts}; mean object IoU {iou:.3f}; edited image in several "
          f"colour parts {splits}/{n}; per object {objects}/{n} = {objects / n:.1%})")
    return ok / n


def cost(repeats: int) -> None:
    """Time of the edited batch against the same batch without linking (no control), interleaved in one process,
    medians after a warm-up round: toy-shapes (batched CFG, 10 steps) and tiny-flux (no CFG, 64x64, 4 steps)."""
    import statistics

    import attnctl
    from attnctl.testing import CALL_DEFAULTS as TINY_DEFAULTS
    from attnctl.testing import make_tiny_pipeline
    from attnctl.toy import CALL_DEFAULTS, load_toy_shapes

    setups = [
        ("toy-shapes", load_toy_shapes(), [BASE, EDIT], dict(CALL_DEFAULTS, num_images_per_prompt=4)),
        ("tiny-flux", make_tiny_pipeline("tiny-flux"), ["a red cat on the street", "a blue cat on the street"],
         dict(TINY_DEFAULTS["tiny-flux"], height=64, width=64, num_inference_steps=4, num_images_per_prompt=4)),
    ]
    variants = {
        "no control": None,
        "p2p default (0.8 / 0.4)": attnctl.PromptToPrompt(),
        "p2p every step": attnctl.PromptToPrompt(cross_steps=1.0, self_steps=1.0),
        "p2p refine every step": attnctl.PromptToPrompt("refine", cross_steps=1.0, self_steps=1.0),
        "p2p + local blend": attnctl.PromptToPrompt(local_blend=("circle", "cat")),
    }
    for name, pipe, prompts, kwargs in setups:
        times: dict[str, list[float]] = {label: [] for label in variants}
        labels = list(variants)
        for repeat in range(repeats + 1):
            shift = repeat % len(labels)
            for label in labels[shift:] + labels[:shift]:
                control = variants[label]
                generator = torch.Generator().manual_seed(0)
                handle = attnctl.apply(pipe, [control]) if control is not None else None
                try:
                    start = time.perf_counter()
                    pipe(prompts, generator=generator, output_type="latent", **kwargs)
                    elapsed = time.perf_counter() - start
                finally:
                    if handle is not None:
                        handle.remove()
                if repeat:
                    times[label].append(elapsed)
        base = statistics.median(times["no control"])
        print(f"{name}: batch of {len(prompts) * kwargs['num_images_per_prompt']} rows, {kwargs['num_inference_steps']} steps")
        for label in labels:
            median = statistics.median(times[label])
            print(f"   {label:>24}: {median:.3f} s  ratio {median / base:.2f}")


def main() -> None:
    import attnctl
    from attnctl.toy import MODEL_NAMES, load_toy_shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=48)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cross-steps", type=float, default=None)
    parser.add_argument("--self-steps", type=float, default=None)
    parser.add_argument("--branch", default=None)
    parser.add_argument("--layers", nargs="*", default=None)
    parser.add_argument("--no-stock", action="store_true")
    parser.add_argument("--model", choices=MODEL_NAMES, default="toy-shapes", help="embedded toy model")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds (CI)")
    parser.add_argument("--oracle", action="store_true", help="also run the oracle diagnostics (CopyAttentionOutputs)")
    parser.add_argument("--picture", default=None, help="also save seeds 0-7 (base / stock edit / P2P edit rows) here")
    parser.add_argument("--cost", type=int, default=0, metavar="REPEATS", help="time the edited batch against no control instead")
    args = parser.parse_args()
    if args.cost:
        cost(args.cost)
        return
    if args.quick:
        args.seeds, args.batch = 2, 2
    options = {k: v for k, v in (("cross_steps", args.cross_steps), ("self_steps", args.self_steps), ("branch", args.branch)) if v is not None}
    if args.layers:
        options["layers"] = tuple(args.layers)
    control = attnctl.PromptToPrompt("replace", **options)
    pipe = load_toy_shapes(model=args.model)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"{args.model}, {BASE!r} -> {EDIT!r}, seeds {seeds[0]}..{seeds[-1]}, {control}, torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    summary("p2p", run(pipe, control, seeds, args.batch))
    print(f"   ({time.perf_counter() - start:.0f} s)")
    if not args.no_stock:
        summary("stock", run(pipe, None, seeds, args.batch))
    if args.picture:
        picture(pipe, control, list(range(8)), args.picture)
        print(f"saved {args.picture}")
    if args.oracle:
        from attnctl.toy.analysis import describe

        usable = sum(len(objects) == 1 and objects[0].shape is not None for objects in (describe(a) for a, _ in pairs(pipe, None, seeds, args.batch)))
        print(f"base images with one object of a known shape (the most any edit can reach): {usable}/{len(seeds)} = {usable / len(seeds):.1%}")
        for name, oracle in oracle_variants().items():
            print(f"{name} ({oracle})")
            summary("oracle", run(pipe, oracle, seeds, args.batch))


if __name__ == "__main__":
    main()
