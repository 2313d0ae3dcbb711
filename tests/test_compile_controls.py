"""torch.compile per control (issue #17): the perturbing guidance controls (PAG, SEG) run compiled, and every
registered control either runs compiled or is refused at apply with a reason of its own.

What is checked for a control that runs compiled: compiled output == eager output (bitwise with dynamo's "eager"
backend; within the stock compiled-vs-eager tolerance with inductor), no graph break, at most max(2 x, stock + 2)
the graphs stock compiles (a control's active / inactive steps and its extra rows' batch), never one per step, and
no new graph on the next pipeline call. CI traces with the "eager" backend on tiny-sd's blocks; the family matrix is `slow`.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import attnctl
from attnctl.control import Control, registered_controls
from attnctl.errors import UnsupportedError
from attnctl.families import adapter_for
from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline
from attnctl.testing.new_families import REQUIRES, available


def generate(pipe, name, prompt, steps=2, guidance=5.0, seed=0, **kwargs):
    """tests.helpers.generate with the prompt as a keyword (Flux2KleinPipeline's first argument is `image`) and a
    video pipeline's frames."""
    out = pipe(prompt=list(prompt) if isinstance(prompt, list) else prompt, num_inference_steps=steps, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(seed), **{**CALL_DEFAULTS[name], **kwargs})
    return out.frames if hasattr(out, "frames") else out.images


PROMPT = "a photo of a cat"
DEFAULT_REASON = Control.compile_refusal(None, None)  # the base class's "not verified" text


@pytest.fixture(autouse=True)
def _heavy_matrix_on_request(request):
    """As tests/test_compose_compile.py: the `slow` matrices run with `-m slow` or ATTNCTL_SLOW=1 only."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("-m") or "") and not os.environ.get("ATTNCTL_SLOW"):
        pytest.skip("heavy compile matrix: run with -m slow (or ATTNCTL_SLOW=1)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _compile(denoiser, entry, backend):
    if entry == "blocks":
        denoiser.compile_repeated_blocks(backend=backend, fullgraph=True)
    else:
        denoiser.compile(backend=backend)


def _uncompile(denoiser):
    for module in denoiser.modules():
        module._compiled_call_impl = None


def _compiled_run(name, make, entry, steps, prompt=PROMPT, observed=None, **call):
    """(eager, compiled, again, stock graphs, graphs after the first controlled call, graphs after the second).
    `observed`: a list that gets what observing controls published, eager then compiled (`_observations`); `call`:
    more pipeline arguments."""
    pipe = make_tiny_pipeline(name)
    denoiser = _denoiser(pipe)
    stock = CompileCounterWithBackend("eager")
    _compile(denoiser, entry, stock)
    generate(pipe, name, prompt=prompt, steps=steps, **call)
    _uncompile(denoiser)
    torch._dynamo.reset()
    with attnctl.apply(pipe, make()) as handle:
        eager = generate(pipe, name, prompt=prompt, steps=steps, **call)
        if observed is not None:
            observed.append(_observations(handle))
    counters.clear()
    counter = CompileCounterWithBackend("eager")
    _compile(denoiser, entry, counter)
    try:
        with attnctl.apply(pipe, make()) as handle:
            compiled = generate(pipe, name, prompt=prompt, steps=steps, **call)
            first = counter.frame_count
            if observed is not None:
                observed.append(_observations(handle))
            again = generate(pipe, name, prompt=prompt, steps=steps, **call)
    finally:
        _uncompile(denoiser)
    return eager, compiled, again, stock.frame_count, first, counter.frame_count


def _check(label, eager, compiled, again, stock, first, total):
    assert torch.equal(compiled, eager) and torch.equal(again, eager), label
    assert not counters["graph_break"], (label, dict(counters["graph_break"]))
    # a step window's active / inactive graphs and one more batch shape (perturbed rows, SAG's second pass); one graph
    # per step would exceed it (4 steps)
    assert first <= max(2 * stock, stock + 2), (label, stock, first)
    assert total == first, (label, first, total)  # the second call compiles nothing


PROMPTS = ["a photo of a cat", "a cat and a dog", "a cat on a red car"]  # three rows: cross-image controls link rows


def _reference_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


GUIDANCE = {
    "PAG": lambda: attnctl.PAG(steps=(0.0, 0.5)),  # 4 steps: perturbed rows at steps 0, 1; none at 2, 3
    "SEG": lambda: attnctl.SEG(sigma=1.0, steps=(0.0, 0.5)),
}


def test_guidance_inductor_matches_eager_within_stock_tolerance():
    """PAG and SEG together on tiny-sd's mid-block self-attention, that module compiled with inductor: the
    controlled |compiled - eager| is within what the stock module shows (floored at float32 rounding)."""
    pipe = make_tiny_pipeline("tiny-sd")
    module = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1  # PAG's and SEG's default layer

    def run(controlled):
        if not controlled:
            return generate(pipe, "tiny-sd", prompt=PROMPT, steps=2)
        with attnctl.apply(pipe, [attnctl.PAG(), attnctl.SEG(sigma=1.0)]):
            return generate(pipe, "tiny-sd", prompt=PROMPT, steps=2)

    eager_stock, eager_ctl = run(False), run(True)
    module.compile()  # inductor
    try:
        compiled_stock, compiled_ctl = run(False), run(True)
    finally:
        module._compiled_call_impl = None
    assert not torch.equal(eager_ctl, eager_stock)  # the controls act
    stock_tolerance = (compiled_stock - eager_stock).abs().max().item()
    difference = (compiled_ctl - eager_ctl).abs().max().item()
    assert difference <= max(4 * stock_tolerance, 1e-5), (difference, stock_tolerance)


MATRIX_CONTROLS = {
    **GUIDANCE,
    "PAG-separate": lambda: attnctl.PAG(separate=True, steps=(0.0, 0.5)),  # the perturbed rows as their own forward
    "PAG+SEG": lambda: [attnctl.PAG(), attnctl.SEG(sigma=1.0)],  # PAG runs the rest of the chain on the other rows
    "PAG+PAG": lambda: [attnctl.PAG(), attnctl.PAG(scale=1.0)],  # the inner one maps its rows through row_source
    "ConsistentSubjects": lambda: attnctl.ConsistentSubjects(),
    "ReferenceAttention": lambda: attnctl.ReferenceAttention(_reference_image(), region=(0.0, 0.0, 0.5, 1.0)),
    "AttentionInterpolation": lambda: attnctl.AttentionInterpolation(),
}


@pytest.mark.slow
@pytest.mark.parametrize("name, entry", [
    ("tiny-sd", "blocks"), ("tiny-sdxl", "inplace"), ("tiny-sd3", "inplace"), ("tiny-flux", "blocks"), ("tiny-flux", "inplace"),
    ("tiny-pixart", "inplace"),
])
def test_guidance_compile_matrix(name, entry):
    for label, make in MATRIX_CONTROLS.items():
        torch._dynamo.reset()
        counters.clear()
        _check(f"{name} {entry} {label}", *_compiled_run(name, make, entry, steps=4, prompt=PROMPTS))


LEFT_RIGHT = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
CROSS_CONTROLS = {
    "Regions": lambda: attnctl.Regions([attnctl.Region("a cat", LEFT_RIGHT[0]), attnctl.Region("a dog", LEFT_RIGHT[1])]),
    # label masks (joint attention's region rules, isolation) and soft masks, the base ratio at 0, a step window
    "Regions-isolate": lambda: attnctl.Regions([attnctl.Region("a cat", LEFT_RIGHT[0]), attnctl.Region("a dog", LEFT_RIGHT[1])], isolate=True),
    "Regions-soft": lambda: attnctl.Regions([attnctl.Region("a cat", (0, 0, 0.6, 1)), attnctl.Region("a dog", (0.4, 0, 1, 1))], base_ratio=0.0),
    "Regions-chen": lambda: attnctl.Regions([attnctl.Region("a cat", LEFT_RIGHT[0]), attnctl.Region("a dog", LEFT_RIGHT[1])],
                                            joint_rule="chen", steps=(0.0, 0.5)),
    "ConsistentSubjects-isolate": lambda: attnctl.ConsistentSubjects(subject=LEFT_RIGHT, isolate=True, strength=3.0),
    "StructuredGuidance": lambda: attnctl.StructuredGuidance(),
}
REGIONS = ("Regions", "Regions-isolate", "Regions-soft", "Regions-chen", "ConsistentSubjects-isolate")


MAPS = {
    "AttentionMaps": lambda: attnctl.AttentionMaps(["cat", "dog"]),
    "AttentionMaps-window-mean": lambda: attnctl.AttentionMaps(["cat"], steps=(0.0, 0.5), heads="mean"),
    "AttentionMaps+PAG": lambda: [attnctl.AttentionMaps(["cat"]), attnctl.PAG()],
}


def _check_maps(label, name, entry, make):
    observed: list = []
    _check(label, *_compiled_run(name, make, entry, steps=4, prompt=PROMPTS, observed=observed))
    eager, compiled = observed
    assert eager and _same_observations(compiled, eager), label


def test_attention_maps_run_compiled_on_joint_attention():
    """AttentionMaps on tiny-flux's joint attention, the transformer's blocks compiled: the same maps and counts as
    eager (each layer's rows are decided with its edit; the hook only adds to the running sums), no graph break,
    no graph per step or per call."""
    _check_maps("tiny-flux blocks AttentionMaps", "tiny-flux", "blocks", MAPS["AttentionMaps"])


@pytest.mark.slow
@pytest.mark.parametrize("name, entry", [
    ("tiny-sd", "inplace"), ("tiny-sdxl", "blocks"), ("tiny-sd3", "inplace"), ("tiny-flux", "inplace"), ("tiny-pixart", "inplace"),
    ("tiny-chroma", "inplace"), ("tiny-qwenimage", "inplace"), ("tiny-flux2", "inplace"), ("tiny-wan", "inplace"),
    ("tiny-zimage", "inplace"),
])
def test_attention_maps_compile_matrix(name, entry):
    if name in REQUIRES and not available(name):
        pytest.skip(f"{name} needs a newer diffusers")
    for label, make in MAPS.items():
        torch._dynamo.reset()
        counters.clear()
        _check_maps(f"{name} {entry} {label}", name, entry, make)


def test_label_masks_run_compiled_on_joint_attention():
    """Regions with isolation on tiny-flux's joint attention (one masked softmax over image, base text and region
    text, from labels), the transformer compiled: bitwise the eager output, no graph break, no graph per step or
    per call. In a graph the label mask runs on sdpa (`kernels.choose_traced_backend`)."""
    _check("tiny-flux Regions-isolate", *_compiled_run("tiny-flux", CROSS_CONTROLS["Regions-isolate"], "inplace", steps=4, prompt=PROMPTS))


def _gathers_in_compiled_graphs(name, make):
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pipe = make_tiny_pipeline(name)
    denoiser = _denoiser(pipe)
    denoiser.compile(backend=recording)
    try:
        with attnctl.apply(pipe, make()):
            generate(pipe, name, prompt=PROMPTS, steps=2)
    finally:
        _uncompile(denoiser)
    assert graphs
    return [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and "gather" in str(n.target)]


def test_consistent_subjects_isolation_mask_is_made_before_the_graph():
    """ConsistentSubjects' isolation on tiny-sd, compiled: its label mask over own and appended keys is made dense with
    the edit, so the graph holds no gather (it held 24 per graph, rebuilt at every attention call)."""
    assert not _gathers_in_compiled_graphs("tiny-sd", CROSS_CONTROLS["ConsistentSubjects-isolate"])


def test_label_masks_are_made_before_the_graph_and_refused_past_the_dense_limit(monkeypatch):
    """Regions with isolation on tiny-flux, compiled: the dense masks (the joint rules and the blend's base attention)
    are made before the forward, once per mask, so the graph holds no gather; a mask past sdpa's dense limit is refused
    with a BackendError before the forward starts (naming the limit), not inside dynamo."""
    import dataclasses

    from attnctl import kernels
    from attnctl.errors import BackendError

    assert not _gathers_in_compiled_graphs("tiny-flux", CROSS_CONTROLS["Regions-isolate"])
    pipe = make_tiny_pipeline("tiny-flux")
    pipe.transformer.compile(backend="eager")
    try:
        monkeypatch.setitem(kernels.BACKENDS, "sdpa", dataclasses.replace(kernels.BACKENDS["sdpa"], dense_limit=1000))
        with attnctl.apply(pipe, CROSS_CONTROLS["Regions-isolate"]()):
            with pytest.raises(BackendError, match=r"under torch.compile, label masks .* sdpa backend, which makes them dense: this call's mask has \d+ elements, past its limit of 1000; run the denoiser uncompiled"):
                generate(pipe, "tiny-flux", prompt=PROMPTS, steps=2)
    finally:
        _uncompile(pipe.transformer)


def test_auto_picks_traceable_backends_while_compiling():
    """In a graph `auto` picks sdpa, or the reference where sdpa cannot do the call (PLADIS' entmax, log-sum-exp),
    on CUDA too, where eager `auto` picks the fused kernels by measured speed: their host-side launch code has not
    been verified inside a graph on a GPU. An explicit fused backend is honoured; a window past sdpa's dense limit
    is refused, naming it."""
    from attnctl import kernels
    from attnctl.errors import BackendError

    for device in ("cpu", "cuda"):
        for features, expected in [(("key_bias", "value_scale"), "sdpa"), (("window",), "sdpa"), (("labels",), "sdpa"),
                                   (("value_scale", "query_range"), "sdpa"), (("sparse",), "reference"), (("lse",), "reference")]:
            assert kernels.choose_traced_backend("auto", device, features, 1000, (4096, 64)) == expected, (device, features)
    if "triton" in kernels.BACKENDS:
        assert kernels.choose_backend("auto", "cuda", ("window",), 1000, (4096, 64))[0] == "triton"  # eagerly: measured fastest
        assert kernels.choose_traced_backend("triton", "cuda", ("window",), 1000) == "triton"
    with pytest.raises(BackendError, match=r"under torch.compile, windows \(FastAttn\) run on the sdpa backend, which makes them dense: this call's mask has \d+ elements, past its limit"):
        kernels.choose_traced_backend("auto", "cuda", ("window",), dense_elements=1 << 40)


def test_label_masks_under_compile_refuse_a_fused_backend():
    """The fused backends build label layouts on the host, which dynamo cannot trace: a compiled denoiser with an
    explicit fused backend is refused at apply (nothing installed); `auto` runs label masks on sdpa in a graph."""
    from attnctl.errors import BackendError
    from attnctl.kernels import choose_traced_backend

    assert choose_traced_backend("auto", "cuda", ("labels",)) == "sdpa"
    assert choose_traced_backend("auto", "cpu", ("labels", "key_bias")) == "sdpa"
    with pytest.raises(BackendError, match="'flex' builds its label-mask layouts .* on the host"):
        choose_traced_backend("flex", "cpu", ("labels",))
    with pytest.raises(BackendError, match="under torch.compile, label masks .* run on the sdpa backend.*past its limit"):
        choose_traced_backend("auto", "cpu", ("labels",), dense_elements=1 << 40)
    pipe = make_tiny_pipeline("tiny-sd")
    pipe.unet.compile()  # lazily: nothing is traced
    try:
        with pytest.raises(BackendError, match="Regions needs label masks, which backend 'flex' builds on the host"):
            attnctl.apply(pipe, CROSS_CONTROLS["Regions-isolate"](), backend="flex")
        assert not pipe.unet._forward_pre_hooks
        attnctl.apply(pipe, CROSS_CONTROLS["Regions"](), backend="flex").remove()  # no label mask: no refusal
    finally:
        pipe.unet._compiled_call_impl = None
    with attnctl.apply(pipe, CROSS_CONTROLS["Regions-isolate"](), backend="flex"):  # compiled after apply: at the call
        pipe.unet.compile()
        try:
            with pytest.raises(BackendError, match="Regions needs label masks, which backend 'flex' builds on the host"):
                generate(pipe, "tiny-sd", prompt=PROMPTS, steps=2)
        finally:
            pipe.unet._compiled_call_impl = None


@pytest.mark.slow
@pytest.mark.parametrize("name, entry, controls", [
    ("tiny-sd", "inplace", REGIONS + ("StructuredGuidance",)), ("tiny-sdxl", "blocks", REGIONS + ("StructuredGuidance",)),
    ("tiny-pixart", "inplace", REGIONS + ("StructuredGuidance",)), ("tiny-sd3", "inplace", REGIONS),
    ("tiny-flux", "inplace", REGIONS), ("tiny-flux", "blocks", ("Regions", "Regions-isolate")),
])
def test_cross_attention_controls_compile_matrix(name, entry, controls):
    """Controls with per-layer constants (region keys, phrase values) on the families where they compile: no graph
    per layer (their edits carry each layer's tensors)."""
    for label in controls:
        torch._dynamo.reset()
        counters.clear()
        _check(f"{name} {entry} {label}", *_compiled_run(name, CROSS_CONTROLS[label], entry, steps=4, prompt=PROMPTS))


# -- cache controls: a cache read is made with the edit, a write kept on the hook and filed before the next edits ---
def _fastattn_plan(name: str, steps: int, methods: list[str]):
    from .cache_helpers import make_plan

    pipe = make_tiny_pipeline(name)  # the same weights as _compiled_run's pipeline: the plan's fingerprint matches
    layers = [layer.name for layer in adapter_for(_denoiser(pipe)).layers if layer.kind != "cross"][:3]
    call = CALL_DEFAULTS[name]
    frames = (call["num_frames"] - 1) // 4 + 1 if "num_frames" in call else 1  # Wan's VAE: 4 frames per latent frame
    return make_plan(pipe, steps, {layer: methods for layer in layers}, window=(0, 1, 1) if frames > 1 else (1, 1),
                     resolution=(call["height"], call["width"]), frames=frames)


#: 6 steps that use each method (full, window + residual, step sharing, window + CFG sharing) and repeat some
FASTATTN_METHODS = ["full", "window_residual", "window_residual", "step_share", "step_share", "window_residual+cfg_share"]
#: graphs for the 6 steps above (each step's structure: full keeping a residual; window; window keeping the output;
#: the shared output returned; window on the cond rows): fewer than the steps, so no graph per step
FASTATTN_GRAPHS = 5
#: TGATE v2 over 6 steps (gate 3, self-attention stored every 2 steps): the self / cross actions of steps 3 and 5
#: are the same (reuse / reuse on the cond rows), so 5 structures, 5 graphs
TGATE = {"TGate": (lambda: attnctl.TGate(gate_step=3), 3),
         "TGate-v2": (lambda: attnctl.TGate(gate_step=3, warm_up=0, sp_interval=2, fi_interval=2), 5)}


def _check_cache(label, name, entry, make, graphs, again_graphs=0):
    """Bitwise the eager output and the same report, no graph break, at most `graphs` graphs over 6 steps, none more
    on the next call (`again_graphs`: Wan's skipped uncond call, see the test)."""
    counters.clear()
    observed: list = []
    eager, compiled, again, _, first, total = _compiled_run(name, make, entry, steps=6, prompt=PROMPTS, observed=observed)
    assert torch.equal(compiled, eager) and torch.equal(again, eager), label
    assert not counters["graph_break"], (label, dict(counters["graph_break"]))
    assert first <= graphs and total <= first + again_graphs, (label, first, total)
    assert observed[0] and _same_observations(observed[1], observed[0]), label


def test_caches_run_compiled():
    """TGate (with TGATE v2's self-attention reuse) on tiny-sd and FastAttn with a plan on tiny-pixart, the denoiser
    compiled: the same output and the same cache report as eager, no graph break, no graph per step or per call."""
    torch._dynamo.reset()
    make, graphs = TGATE["TGate-v2"]
    _check_cache("tiny-sd TGate-v2", "tiny-sd", "inplace", make, graphs)
    torch._dynamo.reset()
    plan = _fastattn_plan("tiny-pixart", 6, FASTATTN_METHODS)
    _check_cache("tiny-pixart FastAttn", "tiny-pixart", "inplace", lambda: attnctl.FastAttn(plan=plan), FASTATTN_GRAPHS)


def test_fastattn_calibration_is_refused_under_compile_and_its_plan_runs(monkeypatch):
    """Calibration chooses each layer's method from measured errors (host reads): refused in a compiled denoiser,
    naming the way out (calibrate uncompiled, apply the plan). PAG listed before it runs (its identity rows sit inside
    FastAttn's hook, which sees the layer's own rows, for which the plan's caches are made). A window past
    sdpa's dense limit (the backend a graph runs windows on) is refused before the forward."""
    import dataclasses

    from attnctl import kernels
    from attnctl.errors import BackendError

    pipe = make_tiny_pipeline("tiny-pixart")
    pipe.transformer.compile(backend="eager")
    try:
        with pytest.raises(UnsupportedError, match=r"FastAttn cannot run .*calibrate uncompiled \(attnctl.calibrate\)"):
            attnctl.apply(pipe, attnctl.FastAttn())
        plan = _fastattn_plan("tiny-pixart", 2, ["full", "window_residual"])
        layer = plan.layers[0]
        # PAG listed first: its identity rows sit inside FastAttn's hook, which sees the layer's own rows
        with attnctl.apply(pipe, [attnctl.PAG(layers=(layer,)), attnctl.FastAttn(plan=plan)]):
            assert torch.isfinite(generate(pipe, "tiny-pixart", prompt=PROMPTS, steps=2)).all()
        assert type(pipe.transformer.transformer_blocks[0].attn1.processor).__module__.startswith("diffusers.")
    finally:
        _uncompile(pipe.transformer)
    # step 0 runs full attention and its window (the residual step 1 reuses) in the graph: refused before it starts
    counter = CompileCounterWithBackend("eager")
    pipe.transformer.compile(backend=counter)
    monkeypatch.setitem(kernels.BACKENDS, "sdpa", dataclasses.replace(kernels.BACKENDS["sdpa"], dense_limit=1000))
    try:
        with attnctl.apply(pipe, attnctl.FastAttn(plan=plan)):
            with pytest.raises(BackendError, match=r"under torch.compile, windows \(FastAttn\) run on the sdpa backend.*past its limit of 1000"):
                generate(pipe, "tiny-pixart", prompt=PROMPTS, steps=2)
        assert counter.frame_count == 0
    finally:
        _uncompile(pipe.transformer)


def test_fastattn_compiled_in_sd3s_skip_layer_pass():
    """SD3's skip-layer pass skips blocks: their layers get no edit in a compiled forward either, so the report is
    eager's (it counted the skipped layers' planned methods). After the call no processor holds an edit (the edits
    hold cached tensors of the call)."""
    name, steps = "tiny-sd3", 3
    plan = _fastattn_plan(name, steps, ["full", "window_residual", "cfg_share"])
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        pipe = make_tiny_pipeline(name)
        if compiled:
            pipe.transformer.compile(backend="eager")
        try:
            with attnctl.apply(pipe, attnctl.FastAttn(plan=plan)) as handle:
                latents = generate(pipe, name, prompt=PROMPTS, steps=steps, skip_guidance_layers=[0],
                                   skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
                results.append((latents, _observations(handle)))
                assert all(processor.edit_now is None for processor in handle._processors.values())  # no cached tensor kept
        finally:
            _uncompile(pipe.transformer)
    (eager, seen_eager), (compiled, seen_compiled) = results
    assert torch.equal(compiled, eager)
    assert _same_observations(seen_compiled, seen_eager)


@pytest.mark.slow
@pytest.mark.parametrize("name, entry", [
    ("tiny-sd", "blocks"), ("tiny-sdxl", "blocks"), ("tiny-pixart", "inplace"), ("tiny-wan", "inplace"),
])
def test_tgate_compile_matrix(name, entry):
    """On blocks a block class compiles once per structure and shape: TGATE v2 on tiny-sd's blocks needs 10 graphs of
    one block class (5 structures, each static and then dynamic over the levels' sizes), past dynamo's default
    recompile limit of 8 (README: raise it, or compile the whole denoiser). Wan runs CFG as two calls and TGATE skips
    the uncond call after the gate (its output is the cond call's): dynamo finds nothing to compile in that call and
    compiles the transformer's inner function again on the next pipeline call (at most once per structure), then
    nothing (measured: 4 / 6 / 6 / 6 graphs after 1-4 calls of 6 steps with a gate at step 3)."""
    for label, (make, graphs) in TGATE.items():
        torch._dynamo.reset()
        blocks = {"tiny-sd": 2, "tiny-sdxl": 1}.get(name, 1) if entry == "blocks" else 1  # block classes x levels stock compiles
        with torch._dynamo.config.patch(recompile_limit=16):
            _check_cache(f"{name} {entry} {label}", name, entry, make, graphs * blocks + (2 if name == "tiny-wan" else 0),
                         again_graphs=graphs if name == "tiny-wan" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("name, entry", [
    ("tiny-sd", "inplace"), ("tiny-sd3", "inplace"), ("tiny-flux", "inplace"), ("tiny-flux", "blocks"), ("tiny-wan", "inplace"),
])
def test_fastattn_compile_matrix(name, entry):
    torch._dynamo.reset()
    plan = _fastattn_plan(name, 6, FASTATTN_METHODS)
    graphs = FASTATTN_GRAPHS * (3 if entry == "blocks" else 1) + (FASTATTN_GRAPHS if name == "tiny-wan" else 0)
    _check_cache(f"{name} {entry} FastAttn", name, entry, lambda: attnctl.FastAttn(plan=plan), graphs)


# -- Prompt-to-Prompt: hooks per layer and phase, the blend's maps added in place ------------------------------------
P2P_PROMPTS = ["a photo of a cat", "a photo of a dog"]
P2P = {
    "replace": lambda: attnctl.PromptToPrompt(),
    "blend": lambda: attnctl.PromptToPrompt(local_blend=["cat", "dog"]),
    "refine-reweight": lambda: attnctl.PromptToPrompt(mode="refine", reweight={"dog": 2.0}),
    "word-windows": lambda: attnctl.PromptToPrompt(cross_steps={"default_": 0.8, "dog": 0.3}),
    "both-branches": lambda: attnctl.PromptToPrompt(branch="both", local_blend=["cat", "dog"]),
}


def test_prompt_to_prompt_runs_compiled_on_joint_attention():
    """PromptToPrompt with local blending on tiny-flux, the transformer compiled: bitwise the eager latents (the
    blend reads the maps the graph added), one graph per phase of its windows, none on the next call; the same with
    PAG listed before it on tiny-sd."""
    torch._dynamo.reset()
    counters.clear()
    _check("tiny-flux P2P blend", *_compiled_run("tiny-flux", P2P["blend"], "inplace", steps=4, prompt=P2P_PROMPTS))
    # PAG listed first (its identity rows sit inside P2P's hook whatever the order)
    torch._dynamo.reset()
    counters.clear()
    _check("tiny-sd PAG+P2P", *_compiled_run("tiny-sd", lambda: [attnctl.PAG(), P2P["replace"]()], "inplace", steps=3, prompt=P2P_PROMPTS))


@pytest.mark.slow
@pytest.mark.parametrize("name, entry", [
    ("tiny-sd", "inplace"), ("tiny-sd", "blocks"), ("tiny-sdxl", "blocks"), ("tiny-sd3", "inplace"), ("tiny-flux", "inplace"),
    ("tiny-flux", "blocks"), ("tiny-pixart", "inplace"),
])
def test_prompt_to_prompt_compile_matrix(name, entry):
    """Graphs: the word windows add a third phase (steps inside the default window but outside the word's)."""
    for label, make in P2P.items():
        torch._dynamo.reset()
        counters.clear()
        eager, compiled, again, stock, first, total = _compiled_run(name, make, entry, steps=4, prompt=P2P_PROMPTS)
        assert torch.equal(compiled, eager) and torch.equal(again, eager), label
        assert not counters["graph_break"], (label, dict(counters["graph_break"]))
        assert first <= 3 * stock and total == first, (label, stock, first, total)


EARLIER_CONTROLS = {  # verified on UNet / SD3 / Flux / PixArt by tests/test_compose_compile.py
    "SAG": lambda: attnctl.SAG(steps=(0.0, 0.5)),
    "Reweight": lambda: attnctl.Reweight({"cat": 0.0}, steps=(0.0, 0.5)),
    "PLADIS": lambda: attnctl.PLADIS(),
}


@pytest.mark.slow
@pytest.mark.parametrize("name, labels", [
    ("tiny-chroma", ("PAG", "SEG", "SAG", "Reweight", "PLADIS", "ConsistentSubjects", "AttentionInterpolation", "Regions", "Regions-isolate")),
    ("tiny-qwenimage", ("PAG", "SEG", "SAG", "Reweight", "PLADIS", "ConsistentSubjects", "Regions", "Regions-isolate")),
    ("tiny-flux2", ("PAG", "SEG", "SAG", "Reweight", "PLADIS", "ConsistentSubjects", "Regions", "Regions-isolate")),
    ("tiny-wan", ("PAG", "Reweight", "PLADIS", "Regions", "Regions-isolate")),  # SEG and SAG on video are not in the compiled matrix yet
])
def test_newer_families_compile_matrix(name, labels):
    """The whole denoiser compiled (the newer families have no `_repeated_blocks` entry point tested here)."""
    if not available(name):
        pytest.skip(f"{name} needs a newer diffusers")
    for label in labels:
        torch._dynamo.reset()
        counters.clear()
        make = {**MATRIX_CONTROLS, **EARLIER_CONTROLS, **CROSS_CONTROLS}[label]
        _check(f"{name} {label}", *_compiled_run(name, make, "inplace", steps=4, prompt=PROMPTS))


# -- every registered control: runs compiled, or refused with a reason of its own ------------------------------
def _smoke_controls():
    """One instance of every registered control (test-only probes left out); a step window where it has one."""
    region = attnctl.Region
    return {
        "a-star": lambda: attnctl.AStar(["cat", "dog"]),
        "agent-attention": lambda: attnctl.AgentAttention(),
        "attend-excite": lambda: attnctl.AttendExcite(["cat"]),
        "attention-interpolation": lambda: attnctl.AttentionInterpolation(),
        "attention-maps": lambda: attnctl.AttentionMaps(["cat"]),
        "box-guidance": lambda: attnctl.BoxGuidance({"cat": (0.0, 0.0, 0.5, 1.0)}),
        "consistent-subjects": lambda: attnctl.ConsistentSubjects(),
        "fastattn": lambda: attnctl.FastAttn(),
        "pag": GUIDANCE["PAG"],
        "pladis": lambda: attnctl.PLADIS(),
        "prompt-to-prompt": lambda: attnctl.PromptToPrompt(mode="refine"),  # PROMPTS add and remove words
        "reference-attention": lambda: attnctl.ReferenceAttention(_reference_image(), region=(0.0, 0.0, 0.5, 1.0)),
        "regions": lambda: attnctl.Regions([region("a cat", (0, 0, 0.5, 1)), region("a dog", (0.5, 0, 1, 1))]),
        "reweight": lambda: attnctl.Reweight({"cat": 0.0}, steps=(0.0, 0.5)),
        "sag": lambda: attnctl.SAG(steps=(0.0, 0.5)),
        "seg": GUIDANCE["SEG"],
        "skip-layer": lambda: attnctl.SkipLayer(blocks=("mid_block.attentions.0.transformer_blocks.0",)),
        "structured-guidance": lambda: attnctl.StructuredGuidance(),
        "tgate": lambda: attnctl.TGate(gate_step=1),
        "tome": lambda: attnctl.ToMe(),
    }


def test_every_registered_control_is_listed():
    listed = set(_smoke_controls())
    registered = {name for name in registered_controls() if not (name.startswith("test-") or name.endswith("-test"))}  # tests' own
    assert registered == listed, (sorted(registered - listed), sorted(listed - registered))


_STOCK_GRAPHS: list[int] = []


def _stock_graphs(pipe) -> int:
    """Graphs stock compiles for tiny-sd's blocks on PROMPTS (measured once per session)."""
    if not _STOCK_GRAPHS:
        counter = CompileCounterWithBackend("eager")
        pipe.unet.compile_repeated_blocks(backend=counter, fullgraph=True)
        try:
            generate(pipe, "tiny-sd", prompt=PROMPTS, steps=4)
        finally:
            _uncompile(pipe.unet)
            torch._dynamo.reset()
        _STOCK_GRAPHS.append(counter.frame_count)
    return _STOCK_GRAPHS[0]


@pytest.mark.parametrize("type_name", sorted(_smoke_controls()))
def test_every_control_runs_compiled_or_names_its_reason(tiny_cache, type_name):
    """tiny-sd: a control that declares itself compile-ready runs with the UNet's blocks compiled (fullgraph,
    dynamo's eager backend), 3 prompt rows, 4 steps: bitwise the eager output, no graph break, at most
    max(2 x, stock + 2) stock's graphs (never one per step), none on the next call. A control that is not is
    refused at apply (the UNet compiled lazily: nothing is traced), and its reason is its own, not the base class's
    "not verified"."""
    control = _smoke_controls()[type_name]()
    pipe = tiny_cache("tiny-sd")
    denoiser = pipe.unet
    why = control.compile_refusal(adapter_for(denoiser))
    if why is not None:
        assert why != DEFAULT_REASON and why.strip(), type_name
        denoiser.compile()
        try:
            with pytest.raises(UnsupportedError, match=rf"{type(control).__name__} cannot run in the torch.compile'd pipe.unet .*: {re.escape(why[:40])}"):
                attnctl.apply(pipe, control)
        finally:
            denoiser._compiled_call_impl = None
        assert not denoiser._forward_pre_hooks
        return
    stock = _stock_graphs(pipe)
    with attnctl.apply(pipe, control) as handle:
        eager = generate(pipe, "tiny-sd", prompt=PROMPTS, steps=4)
        observed = _observations(handle)
    plain = generate(pipe, "tiny-sd", prompt=PROMPTS, steps=4)
    assert not torch.equal(eager, plain) or observed, f"{type_name} does not act in this smoke"
    counters.clear()
    counter = CompileCounterWithBackend("eager")
    denoiser.compile_repeated_blocks(backend=counter, fullgraph=True)
    try:
        with attnctl.apply(pipe, control) as handle:
            compiled = generate(pipe, "tiny-sd", prompt=PROMPTS, steps=4)
            first = counter.frame_count
            assert _same_observations(_observations(handle), observed), type_name
            again = generate(pipe, "tiny-sd", prompt=PROMPTS, steps=4)
    finally:
        _uncompile(denoiser)
    _check(type_name, eager, compiled, again, stock, first, counter.frame_count)


def _observations(handle) -> dict:
    """What an observing control published, by output key: AttentionMaps' maps and counts, a cache control's report
    (what ran at each layer and step, its FLOPs and hits)."""
    import dataclasses

    from attnctl.controls.caching import CacheReport
    from attnctl.controls.maps.capture import AttentionMapResult

    found = {}
    for key, value in handle.outputs.items():
        if isinstance(value, AttentionMapResult):
            found[key] = (value.grid_maps, value.contributions)
        elif isinstance(value, CacheReport):
            found[key] = (None, {where: dataclasses.astuple(entry) for where, entry in value.entries.items()})
    return found


def _same_observations(got: dict, expected: dict) -> bool:
    def same(a, b):
        return a is b is None or (a is not None and b is not None and torch.equal(a, b))

    return got.keys() == expected.keys() and all(
        same(got[key][0], expected[key][0]) and got[key][1] == expected[key][1] for key in expected
    )


def test_zimage_with_image_padding_compiles_once():
    """Z-Image at a size whose image tokens are padded (32x40: 80 tokens): the processor's per-key edit over the
    padding is made in the graph, so the second call compiles nothing (a lookup by the edit's identity guarded on it
    and compiled the layers again at every call)."""
    if not available("tiny-zimage"):
        pytest.skip("needs diffusers with ZImagePipeline")
    _check("tiny-zimage padded Reweight", *_compiled_run("tiny-zimage", lambda: [attnctl.Reweight({"cat": 2.0})], "inplace",
                                                          steps=3, prompt="a red cat", height=32, width=40))


# -- new image sizes and prompt lengths: the graph with dynamic sizes is reused, as stock ----------------------
SIZES = [(32, 32), (48, 48), (64, 64), (32, 64), (64, 32), (48, 32), (80, 80), (32, 96), (96, 32), (48, 64)]
WORDS = "a photo of a cat on a red car near a big tree in the park at night".split()


def _sweep(name, make, calls):
    """(eager outputs, compiled outputs, graphs compiled) of the pipeline calls `calls` (keyword arguments) with the
    controls `make()`, the whole denoiser compiled on dynamo's "eager" backend."""
    pipe = make_tiny_pipeline(name)
    with attnctl.apply(pipe, make()):
        eager = [generate(pipe, name, steps=1, **call) for call in calls]
    counter = CompileCounterWithBackend("eager")
    _denoiser(pipe).compile(backend=counter)
    try:
        with attnctl.apply(pipe, make()):
            compiled = [generate(pipe, name, steps=1, **call) for call in calls]
    finally:
        _uncompile(_denoiser(pipe))
    return eager, compiled, counter.frame_count


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_new_image_sizes_reuse_the_compiled_graph(name):
    """Dynamo compiles a stock denoiser for the first image size, and once more with dynamic sizes at the second
    (automatic dynamic shapes), which every later size reuses. With controls the same holds: the layers read the
    call's sizes from a tensor's shape, never as ints the graph would be specialised to. Ten sizes, past dynamo's
    recompile limit (8), after which a graph per size would run the denoiser uncompiled."""
    calls = [{"prompt": PROMPT, "height": h, "width": w} for h, w in SIZES]
    eager, compiled, graphs = _sweep(name, lambda: [attnctl.PAG(), attnctl.Reweight({"cat": 2.0})], calls)
    for call, want, got in zip(calls, eager, compiled):
        assert torch.equal(got, want), call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 2, graphs


@pytest.mark.parametrize("make", [lambda: attnctl.Reweight({"cat": 2.0}), lambda: attnctl.PAG()], ids=["reweight", "pag"])
def test_new_prompt_lengths_reuse_the_compiled_graph(make):
    """Qwen-Image's text length is the prompt's: stock compiles a static graph and a dynamic one, reused by every
    later length. With controls: at most a static and a dynamic graph per structure (Reweight edits the cond call
    only, so its uncond call is another structure; PAG's cond call has the perturbed rows), never one per length."""
    calls = [{"prompt": " ".join(WORDS[:n])} for n in (5, 7, 9, 11, 13, 15, 17, 6, 8, 10)]
    eager, compiled, graphs = _sweep("tiny-qwenimage", make, calls)
    for call, want, got in zip(calls, eager, compiled):
        assert torch.equal(got, want), call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 4, graphs


# -- FastAttn with a plan: no graph on the next call, none per image size ---------------------------------------------
def test_fastattn_plan_compiles_no_graph_on_the_next_call_nor_per_image_size():
    """FastAttn's window runs in a graph on sdpa as a dense mask the edit makes before the forward and hands the graph
    as a tensor (`sdpa.prepare_window`): the graph neither reads the process-wide mask cache (it guarded on the cache
    being empty, so the next call, after the first had filled it, compiled again) nor builds the mask from the grid's
    sizes (a graph per image size, and FailOnRecompileLimitHit under fullgraph=True past dynamo's limit). Two
    structures (step 0: full attention keeping the residual; step 1: window + residual), each compiled for the first
    size and once more with dynamic sizes, as stock's one; bitwise the eager output at each size."""
    from attnctl.kernels import sdpa

    from .cache_helpers import make_plan

    name, sizes = "tiny-sd", [(32, 32), (48, 48), (32, 48), (48, 32)]
    pipe = make_tiny_pipeline(name)
    layers = [layer.name for layer in adapter_for(pipe.unet).layers if layer.kind != "cross"][:3]

    def run(size, calls=1):
        plan = make_plan(pipe, 2, {layer: ["full", "window_residual"] for layer in layers}, window=(1, 1), resolution=size)
        with attnctl.apply(pipe, attnctl.FastAttn(plan=plan)):
            return [generate(pipe, name, PROMPT, height=size[0], width=size[1]) for _ in range(calls)]

    sdpa.clear_caches()  # no mask left by an eager run (one hid the second call's compile)
    counter = CompileCounterWithBackend("eager")
    pipe.unet.compile(backend=counter, fullgraph=True)
    try:
        compiled = run(sizes[0], calls=2)
        assert counter.frame_count == 2, counter.frame_count  # the two structures, none more on the second call
        compiled += [run(size)[0] for size in sizes[1:]]
    finally:
        _uncompile(pipe.unet)
    assert counter.frame_count <= 4, counter.frame_count  # each structure static and dynamic, not one per size
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager = [run(size)[0] for size in sizes]
    for got, want in zip(compiled, [eager[0], *eager]):
        assert torch.equal(got, want)


# -- Regions and AttentionMaps over image sizes: per-grid data made with the edit, sizes read from shapes ------------
def _regions_and_maps():
    soft = torch.zeros(30, 40)
    soft[:, :20] = torch.linspace(1.0, 0.4, 20)  # a soft mask over the left half
    regions = [attnctl.Region("a cat", mask=soft), attnctl.Region("a dog", box=(0.5, 0.0, 1.0, 1.0))]
    return [attnctl.Regions(regions, isolate=True), attnctl.AttentionMaps(["cat"])]


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_regions_and_attention_maps_reuse_the_compiled_graph_across_sizes(name):
    """Regions (a soft mask, isolation) with AttentionMaps at four image sizes compile stock's two graphs (static, then
    dynamic), with outputs and maps bitwise the eager ones. They compiled one graph per size: the hooks looked their
    grid's tables up by the graph's symbolic grid, looped over the query count with `range`, held slices in closures
    and compared with the maps' grid as ints, each of which made the size a constant of the graph."""
    pipe = make_tiny_pipeline(name)
    sizes = SIZES[:4]

    def run():
        out = []
        with attnctl.apply(pipe, _regions_and_maps()) as handle:
            for h, w in sizes:
                image = generate(pipe, name, "a cat and a dog", steps=1, height=h, width=w)
                out.append((image, handle.outputs["attention_maps"].grid_maps))
        return out

    eager = run()
    counter = CompileCounterWithBackend("eager")
    _denoiser(pipe).compile(backend=counter)
    try:
        compiled = run()
    finally:
        _uncompile(_denoiser(pipe))
    for size, (want, want_maps), (got, got_maps) in zip(sizes, eager, compiled):
        assert torch.equal(got, want) and torch.equal(got_maps, want_maps), size
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counter.frame_count <= 2, counter.frame_count


# -- fix-sag: SAG and SEG (default sigma) keep stock's graphs over image sizes ----------------------------------------


def test_sag_and_seg_compile_no_graph_per_image_size():
    """SAG with SEG at its default sigma (whose kernel the grid's longest side clamps) over four image sizes: stock
    compiles 2 graphs (static, then dynamic sizes); SAG's degraded pass is a second structure, so 4. Before, SAG's
    query-chunk loop (`range` over the image tokens) and SEG's kernel taps made the sizes constants: a graph per size
    (6). SAG's loop now guards only the chunk count (image tokens / 1024 at its layer); SEG's kernel is a tensor
    input. Two prompts: SAG's second pass then has 2 rows (at 1 row dynamo's CPU convolutions guard on the sizes, as
    a stock batch of 1 does)."""
    sizes = [(32, 32), (48, 48), (64, 64), (32, 48)]
    calls = [{"prompt": PROMPTS[:2], "height": h, "width": w} for h, w in sizes]
    eager, compiled, graphs = _sweep("tiny-sd", lambda: [attnctl.SAG(), attnctl.SEG()], calls)
    for call, want, got in zip(calls, eager, compiled):
        assert torch.equal(got, want), call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 4, graphs


# -- cross-image controls over image sizes: one graph with dynamic sizes, as stock ------------------------------------
@pytest.mark.parametrize("name, make, prompts", [
    ("tiny-sd", CROSS_CONTROLS["ConsistentSubjects-isolate"], PROMPTS[:2]),
    ("tiny-flux", P2P["replace"], P2P_PROMPTS),
], ids=["consistent-subjects-isolate", "p2p-joint"])
def test_cross_image_controls_reuse_the_compiled_graph_over_image_sizes(name, make, prompts):
    """Stock compiles a static graph and a dynamic one that every later size reuses; so do these. ConsistentSubjects'
    appended image keys (a slice a closure captured) and its isolation masks (kept per key count), Prompt-to-Prompt's
    joint token spans (compared with `is None`) made a size a constant of the graph: one graph per size."""
    calls = [{"prompt": prompts, "height": h, "width": w} for h, w in [(32, 32), (48, 48), (32, 48), (48, 32)]]
    eager, compiled, graphs = _sweep(name, make, calls)
    for call, want, got in zip(calls, eager, compiled):
        assert torch.equal(got, want), call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 2, graphs


# -- SEG's kernel on the queries' device; P2P's blend maps over image sizes ---------------------------------
def test_seg_compiled_blur_moves_its_kernel_to_the_queries_device():
    """A compiled forward reads SEG's kernel as a tensor made before it, on the device of the denoiser's inputs; the
    layer may run elsewhere (accelerate's hooks move the inputs of a model placed with a device map inside its
    forward, after attnctl's pre-hook). The traced blur moves the kernel to the queries' device ("meta" here stands
    for the other device; before, both convolutions took the CPU kernel), and stays bitwise the eager blur."""
    from attnctl.controls.guidance.seg import blur_tokens, grid_kernel

    hw = (4, 6)
    kernel = grid_kernel(1.0, hw, "cpu")
    devices = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.nn.functional.conv2d:
                devices.append(tuple(str(arg.meta["example_value"].device) for arg in node.args[:2]))
        return gm.forward

    blur = torch.compile(lambda tokens, k: blur_tokens(tokens, hw, 1.0, k), backend=backend, fullgraph=True)
    assert blur(torch.zeros(2, 24, 8, device="meta"), kernel).device.type == "meta"
    assert devices == [("meta", "meta")] * 2, devices
    tokens = torch.randn(2, 24, 8)
    assert torch.equal(blur(tokens, kernel), blur_tokens(tokens, hw, 1.0))


def test_prompt_to_prompt_local_blend_on_a_unet_compiles_as_stock_over_image_sizes():
    """Local blending reads its maps at the cross-attention level nearest to 16x16 tokens, which on a UNet moves with
    the image size (tiny-sd: the finest level at 32x32, the mid block from 48x48 on). The maps buffer, made with the
    edit, has its token count marked dynamic: before, the mid block's maps, first read by dynamo's dynamic graph,
    were static there and the next size compiled a third graph (stock: 2)."""
    calls = [{"prompt": P2P_PROMPTS, "height": h, "width": w} for h, w in [(32, 32), (48, 48), (64, 64)]]
    eager, compiled, graphs = _sweep("tiny-sd", P2P["blend"], calls)
    for call, want, got in zip(calls, eager, compiled):
        assert torch.equal(got, want), call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 2, graphs


# -- query-chunk loops compile a graph per power of two of chunks, not one per chunk count -----------------
def test_query_chunk_loops_reuse_a_graph_within_a_power_of_two_of_chunks(monkeypatch):
    """SAG's received attention with its row budget forced to 16 rows, at four sizes of 96 to 128 image tokens at its
    layer: they needed 6, 6, 7, 8 chunks, a graph per count (the loop count is a constant of the graph: at real
    sizes a graph per few image sizes, and dynamo's recompile limit after 8). Now every count is a power of two
    (`kernels.chunks.row_chunks`: 8 chunks of 12 to 16 rows here), so the sizes share stock's graphs plus SAG's second
    pass (4); bitwise the eager outputs. The reference backend and AttentionMaps chunk the same way."""
    from attnctl.controls.guidance import sag

    monkeypatch.setattr(sag, "QUERY_CHUNK", 16)
    calls = [{"prompt": PROMPTS[:2], "height": h, "width": w} for h, w in [(32, 48), (48, 32), (40, 40), (32, 64)]]
    eager, compiled, graphs = _sweep("tiny-sd", lambda: [attnctl.SAG()], calls)
    for call, want, got in zip(calls, eager, compiled):
        assert torch.equal(got, want), call
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs <= 4, graphs


def test_an_empty_trailing_query_chunk_changes_nothing(monkeypatch):
    """9 query rows at 3 a chunk go in 4 chunks (a power of two), the last one empty: each chunked computation (the
    reference backend with PLADIS's sparse transform and lse, AttentionMaps' word mass, dense and sparse, SAG's
    received attention) gives bitwise what its three non-empty chunks give."""
    from attnctl.controls.guidance import sag
    from attnctl.controls.maps.capture import _sparse_words, word_attention
    from attnctl.kernels import reference
    from attnctl.kernels.chunks import row_chunks
    from attnctl.kernels.semantics import block_logits, probabilities
    from attnctl.kernels.spec import AttentionSpec, Sparse

    for n in range(1, 70):
        for budget in range(1, 20):
            chunks = row_chunks(5, 5 + n, budget)
            assert chunks[0].start == 5 and chunks[-1].stop == 5 + n and all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
            assert all(0 <= c.stop - c.start <= budget for c in chunks) and len(chunks) & (len(chunks) - 1) == 0
            assert len(chunks) == 1 or len(chunks) // 2 * budget < n  # the smallest power of two that fits
    thirds = [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert row_chunks(0, 9, 3) == [*thirds, slice(9, 9)]
    g = torch.Generator().manual_seed(0)
    b, h, n = 2, 3, 9
    q, k, v = (torch.randn(b, h, n, 8, generator=g) for _ in range(3))
    selector = (torch.rand(b, 4, n, generator=g) > 0.5).float()
    bias = torch.randn(b, 1, n, n, generator=g)
    spec = AttentionSpec(key_bias=torch.randn(b, n, generator=g), query_range=(2, n), sparse=Sparse(1.5, 2.0), return_lse=True)
    budget = b * h * n * 3  # elements: 3 rows
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    out, lse = reference.attention(q, k, v, spec)
    parts = [reference._attention_rows(q, k, v, v, spec, rows) for rows in thirds]
    assert torch.equal(out, torch.cat([p[0] for p in parts], 2)) and torch.equal(lse, torch.cat([p[1] for p in parts], -1))
    maps = word_attention(q, k, selector, bias=bias, chunk_elements=budget)
    assert torch.equal(maps, torch.cat([word_attention(q[:, :, rows], k, selector, bias=bias[:, :, rows]) for rows in thirds], 1))
    maps = word_attention(q, k, selector, bias=lambda lo, hi: bias[:, :, lo:hi], chunk_elements=budget)
    assert torch.equal(maps, torch.cat([word_attention(q[:, :, rows], k, selector, bias=bias[:, :, rows]) for rows in thirds], 1))
    sparse = _sparse_words(q, k, selector, spec, slice(0, n), chunk_elements=budget)
    assert torch.equal(sparse, torch.cat([_sparse_words(q, k, selector, spec, rows) for rows in thirds], 1))
    monkeypatch.setattr(sag, "QUERY_CHUNK", 3)
    received = sag.received_attention(q, k, AttentionSpec(), slice(0, n))
    plain = AttentionSpec()
    expected = sum(probabilities(block_logits(q, k, plain, rows, slice(0, n)), plain, rows).sum(dim=2) for rows in thirds)
    assert torch.equal(received, expected.mean(dim=1))
