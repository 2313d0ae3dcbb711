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


def generate(pipe, name, prompt, steps=2, guidance=5.0, seed=0):
    """tests.helpers.generate with the prompt as a keyword (Flux2KleinPipeline's first argument is `image`) and a
    video pipeline's frames."""
    out = pipe(prompt=list(prompt) if isinstance(prompt, list) else prompt, num_inference_steps=steps, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(seed), **dict(CALL_DEFAULTS[name]))
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


def _compiled_run(name, make, entry, steps, prompt=PROMPT, observed=None):
    """(eager, compiled, again, stock graphs, graphs after the first controlled call, graphs after the second).
    `observed`: a list that gets what observing controls published, eager then compiled (`_observations`)."""
    pipe = make_tiny_pipeline(name)
    denoiser = _denoiser(pipe)
    stock = CompileCounterWithBackend("eager")
    _compile(denoiser, entry, stock)
    generate(pipe, name, prompt=prompt, steps=steps)
    _uncompile(denoiser)
    torch._dynamo.reset()
    with attnctl.apply(pipe, make()) as handle:
        eager = generate(pipe, name, prompt=prompt, steps=steps)
        if observed is not None:
            observed.append(_observations(handle))
    counters.clear()
    counter = CompileCounterWithBackend("eager")
    _compile(denoiser, entry, counter)
    try:
        with attnctl.apply(pipe, make()) as handle:
            compiled = generate(pipe, name, prompt=prompt, steps=steps)
            first = counter.frame_count
            if observed is not None:
                observed.append(_observations(handle))
            again = generate(pipe, name, prompt=prompt, steps=steps)
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
        "prompt-to-prompt": lambda: attnctl.PromptToPrompt(),
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
    """What an observing control (AttentionMaps) published: its maps and counts, by output key."""
    from attnctl.controls.maps.capture import AttentionMapResult

    return {key: (value.grid_maps, value.contributions) for key, value in handle.outputs.items()
            if isinstance(value, AttentionMapResult)}


def _same_observations(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(
        torch.equal(got[key][0], expected[key][0]) and got[key][1] == expected[key][1] for key in expected
    )
