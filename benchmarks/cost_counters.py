"""Deterministic cost counters per control: aten operations dispatched (each a kernel launch on a GPU) and host
synchronisations in a whole warm pipeline call, against stock (`attnctl.testing.counters`).

A warm call is the second call with the same handle (the first one builds per-handle caches), under
`torch.inference_mode`, `tiny-sd` / `tiny-flux` at 32x32, 4 steps, CFG 5 on tiny-sd, one prompt (`PROMPT`); the
controls that link the images of a call (`CROSS_IMAGE`) on three prompt rows (`ROWS`), against stock on the same
rows (`stock(rows)`). `ops/attn` divides the extra operations by the attention calls that got an edit from the
control. tests/test_cost_counters.py holds the CI targets; this prints the table.

    python benchmarks/cost_counters.py [--models tiny-sd,tiny-flux] [--controls reweight,regions] [--ops]
    OMP_NUM_THREADS=1 python benchmarks/cost_counters.py --block-cache flux-cpu [--fbc-threshold 1e9]
        # per denoiser call under FirstBlockCache: which calls ran every block, their cost (issue 17)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from dataclasses import dataclass, field
from typing import Any

# benchmarks/kernels.py would shadow the `kernels` package that transformers imports: run from the repo root
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import torch  # noqa: E402

PROMPT = "a photo of a red cat and a blue dog"
#: The prompt rows of the controls that link several images of a call: a base row and two edits of one word each
#: (PromptToPrompt swaps words one for one); row 0 is ReferenceAttention's reference and ConsistentSubjects' source,
#: the first and last rows AttentionInterpolation's endpoints.
ROWS = ("a photo of a red cat and a blue dog", "a photo of a red cat and a green dog", "a photo of a red fox and a blue dog")
STEPS = 4
MODELS = ("tiny-sd", "tiny-flux")


def _regions(isolate: bool):
    import attnctl

    return attnctl.Regions(
        [attnctl.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)), attnctl.Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))],
        base_ratio=0.2, isolate=isolate,
    )


def _skip_layer_block(model: str) -> int | str:
    """The first transformer block as SkipLayer names it on `model`'s family."""
    if model == "tiny-sd":
        return "down_blocks.0.attentions.0.transformer_blocks.0"
    if model == "tiny-sdxl":  # its first down block has no attention
        return "down_blocks.1.attentions.0.transformer_blocks.0"
    return "blocks.0" if model == "tiny-wan" else 0


def _reference_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


#: The controls that link several images of a call: measured on `ROWS`, against stock on `ROWS` ("stock(rows)").
CROSS_IMAGE = ("p2p", "p2p-refine-blend", "consistent", "consistent-words", "reference", "interpolation")
#: Stock on `PROMPT` and on `ROWS` (no handle).
STOCK = ("stock", "stock(rows)")


def prompt_for(name: str) -> str | list[str]:
    """The prompt a catalog entry is measured with: `ROWS` for the controls that link images, else `PROMPT`."""
    return list(ROWS) if name in CROSS_IMAGE or name == "stock(rows)" else PROMPT


def stock_for(name: str) -> str:
    """The stock entry a catalog entry is compared with (the same prompt rows)."""
    return "stock(rows)" if name in CROSS_IMAGE else "stock"


def controls(model: str) -> dict[str, Any]:
    """name -> factory of the control list (None: stock, no handle). The UNet-only ones are left out on Flux."""
    import attnctl

    catalog: dict[str, Any] = {
        "stock": None,
        "stock(rows)": None,
        "apply[]": lambda: [],
        "reweight": lambda: [attnctl.Reweight({"red": 2.0})],
        "regions": lambda: [_regions(False)],
        "regions+isolate": lambda: [_regions(True)],
        "pag": lambda: [attnctl.PAG(scale=3.0)],
        "seg": lambda: [attnctl.SEG(scale=3.0)],
        "sag": lambda: [attnctl.SAG(scale=0.75)],
        "pladis": lambda: [attnctl.PLADIS()],
        "skip-layer": lambda: [attnctl.SkipLayer(blocks=(_skip_layer_block(model),), steps=(0.0, 1.0))],
        "maps": lambda: [attnctl.AttentionMaps(["cat", "dog"])],
        "tgate": lambda: [attnctl.TGate(gate_step=2)],
        "tome0.5": lambda: [attnctl.ToMe(ratio=0.5)],
        "agent": lambda: [attnctl.AgentAttention()],
        "fastattn": lambda: [attnctl.FastAttn()],
        "structured": lambda: [attnctl.StructuredGuidance(phrases=["a red cat", "a blue dog"])],
        "attend-excite": lambda: [attnctl.AttendExcite(subjects=["cat", "dog"])],
        "a-star": lambda: [attnctl.AStar(subjects=["cat", "dog"])],
        # guidance at the first half of the steps (the default window, the first 20%, holds step 0 alone at any step
        # count up to 5: tests/test_cost_counters.py's per-step budgets would not see its per-iteration work)
        "box-guidance": lambda: [attnctl.BoxGuidance({"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)}, loss_threshold=0.0,
                                                     steps=(0.0, 0.5), iterations=2)],
        "boxdiff": lambda: [attnctl.BoxGuidance({"cat": (0.0, 0.0, 0.5, 1.0), "dog": (0.5, 0.0, 1.0, 1.0)},
                                                constraints=("inner", "outer", "corner"), loss_threshold=0.0, steps=(0.0, 0.5), iterations=2)],
        "p2p": lambda: [attnctl.PromptToPrompt()],
        "p2p-refine-blend": lambda: [attnctl.PromptToPrompt(mode="refine", local_blend=["cat", "dog"], reweight={"dog": 2.0})],
        "consistent": lambda: [attnctl.ConsistentSubjects()],
        "consistent-words": lambda: [attnctl.ConsistentSubjects(subject=["cat", "dog"], isolate=True)],
        "reference": lambda: [attnctl.ReferenceAttention(_reference_image(), region=(0.0, 0.0, 0.5, 1.0))],
        "interpolation": lambda: [attnctl.AttentionInterpolation(self_attention=True)],
        "rw+regions+pag": lambda: [attnctl.Reweight({"red": 2.0}), _regions(True), attnctl.PAG(scale=3.0)],
        "rw+regions+pag+tgate": lambda: [attnctl.Reweight({"red": 2.0}), _regions(False), attnctl.PAG(scale=3.0, steps=(0.0, 0.4)),
                                         attnctl.TGate(gate_step=2)],
    }
    if model == "tiny-flux":
        for name in ("seg", "sag", "tgate", "tome0.5", "agent", "rw+regions+pag+tgate", "structured"):
            catalog.pop(name)
    return catalog


@dataclass
class Cost:
    model: str
    control: str
    ops: int
    syncs: int
    sync_ops: dict[str, int]
    op_names: dict[str, int]
    attention_calls: int  # attention calls that got an edit (0 for stock)
    copies_in: int = 0  # host-to-device copy calls (a stream sync each on CUDA unless non_blocking)
    python_calls: int = 0  # Python and builtin function calls in the warm call (cProfile): the host work per call
    error: str | None = None


def _run(pipe: Any, model: str, steps: int, call: dict[str, Any] | None = None, prompt: str | list[str] = PROMPT):
    from attnctl.testing import CALL_DEFAULTS

    options = dict(CALL_DEFAULTS[model]) if call is None else dict(call)
    guidance = options.pop("guidance_scale", 5.0 if model != "tiny-flux" else 3.5)
    with torch.inference_mode():
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **options)
    return out.frames if hasattr(out, "frames") else out.images  # video pipelines (Wan) return frames


def measure(pipe: Any, model: str, name: str, make: Any, steps: int = STEPS, prompt: str | list[str] | None = None,
            profile: bool = True) -> Cost:
    """The counts of the second (warm) pipeline call with the control list `make()` applied (None: stock), on
    `prompt` (default `prompt_for(name)`). `profile`: also count the Python calls of a third call (cProfile)."""
    prompt = prompt_for(name) if prompt is None else prompt
    import attnctl
    from attnctl.testing.counters import CostCounter

    handle = attnctl.apply(pipe, make()) if make is not None else None
    edited = [0]
    try:
        if handle is not None:
            runtime = handle.runtime
            edit_for = runtime.edit_for

            def counting(layer):
                edit = edit_for(layer)
                if edit is not None:
                    edited[0] += 1
                return edit

            runtime.edit_for = counting
        _run(pipe, model, steps, prompt=prompt)
        edited[0] = 0
        with CostCounter() as counter:
            _run(pipe, model, steps, prompt=prompt)
        attention_calls = edited[0]
        python_calls = 0
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            try:
                _run(pipe, model, steps, prompt=prompt)
            finally:
                profiler.disable()
            python_calls = pstats.Stats(profiler).total_calls
    finally:
        if handle is not None:
            handle.remove()
    return Cost(model, name, counter.ops, counter.syncs, dict(counter.sync_ops), dict(counter.op_names), attention_calls,
                counter.copies_in, python_calls)


@dataclass
class DenoiserCallCost:
    """One denoiser call under a block cache (FirstBlockCache): did the later blocks run, and what it cost."""

    number: int
    rows: int  # batch rows the first block ran on (attnctl's perturbed rows included)
    tail_ran: bool  # the last block ran (FirstBlockCache skips it when the first block's residual barely moved)
    ops: int  # aten operations dispatched from attnctl's pre-hook to its post-hook (guidance combine included)
    layers_run: int  # attention layers whose processor ran
    edits_built: int  # layers whose edit the controls built in this call (`Runtime.edit_for` misses)
    op_names: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None  # the call's process time, with `timed=True` (then nothing is counted: ops stay 0)


def per_denoiser_call(
    pipe: Any, model: str, make: Any, cache: Any = None, steps: int = STEPS, timed: bool = False, call: dict[str, Any] | None = None,
) -> list[DenoiserCallCost]:
    """Per denoiser call of the second (warm) pipeline call with `make()` applied (None: stock) and the diffusers cache
    config `cache` enabled after attnctl: where a cache skips blocks, attnctl should build nothing for them. Counts
    (`aten ops` as in `measure`), or with `timed` each call's process time instead (no counter: it would slow the call).
    `call`: the pipeline's call arguments when `model` is not a tiny model (benchmarks/gpu_e2e.py's configs)."""
    import time

    import attnctl
    from attnctl.testing.counters import CostCounter

    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    handle = attnctl.apply(pipe, make()) if make is not None else None
    calls: list[DenoiserCallCost] = []
    hooks: list[Any] = []
    state: dict[str, Any] = {}
    try:
        if cache is not None:
            denoiser.enable_cache(cache)
        processors = {}
        if handle is not None:
            runtime = handle.runtime
            edit_for = runtime.edit_for

            def counting(layer):
                if state.get("call") is not None:
                    state["call"].layers_run += 1
                    if layer.index not in runtime._frame_edits:
                        state["call"].edits_built += 1
                return edit_for(layer)

            runtime.edit_for = counting
        else:  # stock: count the attention modules' calls
            for module in denoiser.modules():
                if hasattr(module, "processor") and hasattr(module, "to_q"):
                    processors[module] = module.register_forward_pre_hook(
                        lambda *_: state.get("call") and setattr(state["call"], "layers_run", state["call"].layers_run + 1))
        hooks.extend(processors.values())
        last = _last_attention(denoiser)

        def pre(module, args, kwargs):  # prepended after attnctl's: runs before it, so its pre-hook work counts
            if not state.get("on"):
                return
            main = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
            call = DenoiserCallCost(len(calls), 0, False, 0, 0, 0)
            call.rows = int(main.shape[0]) if isinstance(main, torch.Tensor) else 0
            state["call"] = call
            state["counter"] = None if timed else CostCounter().__enter__()
            state["start"] = time.process_time()

        def post(module, args, kwargs, output):  # appended: runs after attnctl's post-hook
            call = state.pop("call", None)
            if call is None:
                return
            counter = state.pop("counter")
            if counter is None:
                call.seconds = time.process_time() - state.pop("start")
            else:
                counter.__exit__(None, None, None)
                call.ops = counter.ops
                call.op_names = dict(counter.op_names)
            calls.append(call)

        def first_block(module, args, kwargs):
            main = kwargs.get("hidden_states", args[0] if args else None)
            if state.get("call") is not None and isinstance(main, torch.Tensor):
                state["call"].rows = int(main.shape[0])

        hooks.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        hooks.append(denoiser.register_forward_hook(post, with_kwargs=True))
        hooks.append(_first_block(denoiser).register_forward_pre_hook(first_block, with_kwargs=True))
        hooks.append(last.register_forward_pre_hook(lambda *_: state.get("call") and setattr(state["call"], "tail_ran", True)))
        _run(pipe, model, steps, call)
        state["on"] = True
        _run(pipe, model, steps, call)
    finally:
        for hook in hooks:
            hook.remove()
        if cache is not None:
            denoiser.disable_cache()
        if handle is not None:
            handle.remove()
    return calls


def _blocks(denoiser: Any) -> list[Any]:
    found = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        found.extend(getattr(denoiser, name, None) or ())
    return found


def _first_block(denoiser: Any) -> Any:
    return _blocks(denoiser)[0]


def _last_attention(denoiser: Any) -> Any:
    block = _blocks(denoiser)[-1]
    return getattr(block, "attn", None) or block.attn1


def table(models=MODELS, names=None, steps: int = STEPS) -> list[Cost]:
    from attnctl.testing import make_tiny_pipeline

    rows = []
    wanted = set(names or ()) | {stock_for(name) for name in names or ()}  # each with the stock it is compared with
    for model in models:
        pipe = make_tiny_pipeline(model)
        for name, make in controls(model).items():
            if wanted and name not in wanted:
                continue
            try:
                rows.append(measure(pipe, model, name, make, steps))
            except Exception as error:  # noqa: BLE001 - the table goes on
                rows.append(Cost(model, name, 0, 0, {}, {}, 0, error=f"{type(error).__name__}: {error}"[:200]))
    return rows


def block_cache_calls(model: str = "tiny-flux", threshold: float = 1e9, steps: int = 10) -> None:
    """Print, per kind of denoiser call (rows, full or first block only), what stock, Reweight + Regions +
    PAG(steps=(0, 0.4)) ("cff") and cff with trimmed region prompts cost under FirstBlockCache(threshold): aten ops on
    a tiny model, process time on a gpu_e2e config (`flux-cpu`). The default threshold skips every call it can."""
    import statistics

    from diffusers import FirstBlockCacheConfig

    import attnctl

    call = None
    if model.startswith("tiny-"):
        from attnctl.testing import make_tiny_pipeline

        pipe = make_tiny_pipeline(model)
    else:
        sys.path.insert(0, _HERE)
        import gpu_e2e

        pipe, call = gpu_e2e.build(model, False, "cpu", torch.float32)
    timed = call is not None

    def cff(trim: bool = False):
        regions = attnctl.Regions([attnctl.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)),
                                   attnctl.Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))], base_ratio=0.2, trim_prompts=trim)
        return [attnctl.Reweight({"red": 2.0}), regions, attnctl.PAG(scale=3.0, steps=(0.0, 0.4))]

    unit = "ms (process time, median)" if timed else "aten ops (median)"
    print(f"{model}, {steps} steps, FirstBlockCache(threshold={threshold:g}); per kind of denoiser call: count x {unit}")
    for name, make in (("stock", None), ("cff", cff), ("cff(trim)", lambda: cff(True))):
        calls = per_denoiser_call(pipe, model, make, FirstBlockCacheConfig(threshold=threshold), steps, timed=timed, call=call)
        kinds: dict[tuple[int, str], list[float]] = {}
        for one in calls:
            value = one.seconds * 1000 if timed else one.ops
            kinds.setdefault((one.rows, "all blocks" if one.tail_ran else "first block"), []).append(value)
        total = sum(one.seconds * 1000 if timed else one.ops for one in calls)
        cells = ", ".join(f"{rows} row(s) {kind}: {len(v)} x {statistics.median(v):.1f}" for (rows, kind), v in sorted(kinds.items()))
        print(f"  {name:10s} {cells}; total {total:.0f}; edits built {sum(one.edits_built for one in calls)} "
              f"for {sum(one.layers_run for one in calls)} attention calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--controls", default="")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--ops", action="store_true", help="also print the extra operations per aten name")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny-sd, Reweight, 2 steps (CI)")
    parser.add_argument("--block-cache", metavar="MODEL", default=None,
                        help="per denoiser call under FirstBlockCache (tiny-flux: ops; flux-cpu: process time) instead of the table")
    parser.add_argument("--fbc-threshold", type=float, default=1e9)
    args = parser.parse_args()
    if args.block_cache:
        torch.set_num_threads(1)
        block_cache_calls(args.block_cache, args.fbc_threshold, 10)
        return
    if args.quick:
        args.models, args.controls, args.steps = "tiny-sd", "reweight", 2
    torch.set_num_threads(1)
    rows = table(args.models.split(","), set(filter(None, args.controls.split(","))), args.steps)
    stock = {(row.model, row.control): row for row in rows if row.control in STOCK}
    print(f"torch {torch.__version__}; warm second call, {args.steps} steps, inference_mode; "
          "ops = aten ops dispatched (views excluded), syncs = host synchronisations, "
          "Python calls = function calls in the call (cProfile), the host work a GPU waits on when launch-bound")
    print("| model | control | ops | extra ops | edited attn calls | extra ops / attn call | syncs | extra syncs | extra copies in "
          "| extra Python calls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.error:
            print(f"| {row.model} | {row.control} | error: {row.error} |")
            continue
        base = stock[(row.model, stock_for(row.control))]
        extra = row.ops - base.ops
        per = f"{extra / row.attention_calls:.2f}" if row.attention_calls else "-"
        extra_syncs = {k: v - base.sync_ops.get(k, 0) for k, v in row.sync_ops.items() if v != base.sync_ops.get(k, 0)}
        print(f"| {row.model} | {row.control} | {row.ops} | {extra:+d} | {row.attention_calls} | {per} | {row.syncs} | "
              f"{row.syncs - base.syncs:+d} {extra_syncs or ''} | {row.copies_in - base.copies_in:+d} | "
              f"{row.python_calls - base.python_calls:+d} |")
        if args.ops and row.control not in STOCK:
            diff = {k: v - base.op_names.get(k, 0) for k, v in row.op_names.items() if v != base.op_names.get(k, 0)}
            print(f"|   | ops by name | {dict(sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:25])} |")


if __name__ == "__main__":
    main()
