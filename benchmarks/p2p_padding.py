"""Why Prompt-to-Prompt replace loses colour on toy-shapes (diagnosis, docs/methods.md "Prompt-to-Prompt editing").

P2P's replace copies the base row's cross-attention probabilities over EVERY text token into the edited row. The
toy model's text encoder is causal (CLIP), so the tokens after the swapped colour word ("circle", EOS and the EOS
padding) are encoded with the colour in them, and the model reads the colour there: most of the cross-attention
mass is on the padding. This script runs P2P on diffusers' eager attention (materialised probabilities, as P2P's
`AttentionControlEdit`; tests/test_p2p.py checks the control equals it end to end) with a per-token mix
`P_edit := a * P_base + (1 - a) * P_edit` in the cond rows' cross-attention (self-attention and uncond rows: P2P's
copy), for `a` = 1 everywhere (P2P replace), 0 at the swapped word, 0 after it, 0 from it on, 0 everywhere.
It prints the base rows' mean cross-attention mass per token and, per variant, the benchmark's checks.

    python benchmarks/p2p_padding.py [--first-seed 1000] [--seeds 16]     # held-out seeds (the benchmark: 0..47)
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("p2p_benchmark", Path(__file__).resolve().parent / "p2p.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
BASE, EDIT, judge, overlap, split = _bench.BASE, _bench.EDIT, _bench.judge, _bench.overlap, _bench.split


class _Mixed:
    """Eager attention with P2P's edits; `state` holds the step, the windows and the per-token mix `alpha`."""

    def __init__(self, is_cross: bool, state: dict):
        self.is_cross, self.state = is_cross, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state
        batch, n = hidden_states.shape[0], s["n"]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        probs = attn.get_attention_scores(q, k, attention_mask)
        probs = probs.view(batch, attn.heads, *probs.shape[1:]).clone()
        half = batch // 2  # rows: [uncond base, uncond edit, cond base, cond edit]
        if self.is_cross and s["record"] and s["step"] < int(s["cross"] * s["steps"]):
            s["mass"] += probs[half : half + n].mean(dim=(0, 1, 2))
            s["calls"] += 1
        if s["step"] < int((s["cross"] if self.is_cross else s["self"]) * s["steps"]):
            for start in (0, half):
                base, own = probs[start : start + n], probs[start + n : start + 2 * n]
                if self.is_cross and start == half:
                    alpha = s["alpha"].view(1, 1, 1, -1)
                    probs[start + n : start + 2 * n] = alpha * base + (1 - alpha) * own
                else:
                    probs[start + n : start + 2 * n] = base
        out = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1), v))
        return attn.to_out[1](attn.to_out[0](out))


def main() -> None:

    from attnctl.toy import CALL_DEFAULTS, load_toy_shapes
    from attnctl.toy.analysis import describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 1
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    pipe = load_toy_shapes()
    tokens = pipe.tokenizer(BASE).input_ids
    swap = next(i for i, (a, b) in enumerate(zip(tokens, pipe.tokenizer(EDIT).input_ids)) if a != b)
    length = pipe.tokenizer.model_max_length
    state = {"step": 0, "n": len(seeds), "cross": 0.8, "self": 0.4, "steps": CALL_DEFAULTS["num_inference_steps"],
             "record": True, "mass": torch.zeros(length), "calls": 0}
    pipe.unet.set_attn_processor({name: _Mixed(name.endswith("attn2.processor"), state) for name in pipe.unet.attn_processors})

    def tick(pipeline, i, t, kwargs):
        state["step"] = i + 1
        return {}

    def variant(name: str, alpha: torch.Tensor) -> None:
        state["alpha"], state["step"] = alpha, 0
        generators = [torch.Generator().manual_seed(s) for s in seeds] + [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe([BASE, EDIT], **dict(CALL_DEFAULTS, num_images_per_prompt=len(seeds), generator=generators),
                      callback_on_step_end=tick).images
        n = len(seeds)
        results = [dict(judge(images[i], images[n + i]), iou=overlap(images[i], images[n + i]), split=split(images[n + i])) for i in range(n)]
        ok = sum(all(r[key] for key in ("shape", "centroid", "color")) for r in results)
        counts = " ".join(f"{key} {sum(r[key] for r in results)}" for key in ("shape", "centroid", "color", "split"))
        colours = sorted({"+".join(o.color or "?" for o in describe(images[n + i])) for i in range(n)})
        print(f"{name:>34}: success {ok}/{n} ({counts}; IoU {sum(r['iou'] for r in results) / n:.3f}; colours {colours})", flush=True)

    print(f"toy-shapes {BASE!r} -> {EDIT!r}, seeds {seeds[0]}..{seeds[-1]}, cross 0.8 / self 0.4, swapped token {swap}")
    ones = torch.ones(length)
    variant("P2P replace (base probs everywhere)", ones)
    state["record"] = False
    mass = state["mass"] / max(state["calls"], 1)
    last = len(tokens)
    print(f"base cond rows' cross-attention mass: per token {[round(float(m), 3) for m in mass[:last]]} "
          f"(BOS .. EOS), padding after EOS {float(mass[last:].sum()):.3f}")
    for name, zero in (("own probs at the swapped word", slice(swap, swap + 1)), ("own probs after it", slice(swap + 1, None)),
                       ("own probs from it on", slice(swap, None)), ("own cross probs (self copy only)", slice(0, None))):
        alpha = ones.clone()
        alpha[zero] = 0
        variant(name, alpha)


if __name__ == "__main__":
    main()
