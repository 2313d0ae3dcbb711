"""Generation under `torch.inference_mode()`, as many users run it: every control works there, gives what it gives
under `torch.no_grad()`, and the masks it caches in one mode serve the next call in the other."""

from __future__ import annotations

import pytest
import torch

import attnctl

from .helpers import generate


def _regions(isolate: bool) -> attnctl.Regions:
    return attnctl.Regions([attnctl.Region("a red car", box=(0, 0, 0.5, 1)), attnctl.Region("a cat", box=(0.5, 0, 1, 1))],
                           isolate=isolate)


CASES = [
    ("tiny-sd", lambda: attnctl.Reweight({"a": 2.0})),
    ("tiny-sd", lambda: attnctl.AttentionMaps(["a"])),
    ("tiny-sd", lambda: _regions(isolate=True)),
    ("tiny-sd", lambda: attnctl.PAG()),
    ("tiny-sd", lambda: attnctl.SAG()),
    ("tiny-sd", lambda: attnctl.PLADIS()),
    ("tiny-sd", lambda: attnctl.ToMe()),
    ("tiny-sd", lambda: attnctl.AgentAttention()),
    ("tiny-sd", lambda: attnctl.TGate(gate_step=2)),
    ("tiny-sd3", lambda: _regions(isolate=True)),
    ("tiny-sd3", lambda: attnctl.SEG()),
    ("tiny-sd3", lambda: attnctl.SkipLayer(blocks=(1,))),
    ("tiny-flux", lambda: _regions(isolate=True)),
    ("tiny-flux", lambda: attnctl.FastAttn(threshold=1.0)),
    ("tiny-pixart", lambda: attnctl.FastAttn(threshold=1.0)),
]


BOXES = {"cat": (0.0, 0.0, 0.5, 1.0), "car": (0.5, 0.0, 1.0, 1.0)}
#: The latent optimisers and SDG make their constants at bind: in the call's mode, where the loss passes (which run
#: outside inference mode) must still be able to save them for backward.
OPTIMISERS = [
    ("tiny-sd", lambda: attnctl.AttendExcite(subjects=["cat", "car"])),
    ("tiny-sd", lambda: attnctl.AStar(subjects=["cat", "car"])),
    ("tiny-sd", lambda: attnctl.BoxGuidance(BOXES)),
    ("tiny-sd", lambda: attnctl.BoxGuidance(BOXES, constraints=("inner", "outer", "corner"), loss_threshold=0.0)),
    ("tiny-sd", lambda: attnctl.StructuredGuidance(phrases=["a red cat", "a blue car"])),
    ("tiny-flux", lambda: attnctl.BoxGuidance(BOXES)),
]


@pytest.mark.parametrize("name,make", OPTIMISERS, ids=[f"{n}-{type(m()).__name__}-{i}" for i, (n, m) in enumerate(OPTIMISERS)])
def test_optimisers_bound_first_under_inference_mode_give_the_no_grad_result(tiny_cache, name, make):
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, [make()]):
        with torch.inference_mode():
            inferred = generate(pipe, name, prompt="a red cat and a blue car", steps=4)
    with attnctl.apply(pipe, [make()]):
        with torch.no_grad():
            expected = generate(pipe, name, prompt="a red cat and a blue car", steps=4)
    torch.testing.assert_close(inferred, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name,make", CASES, ids=[f"{n}-{type(m()).__name__}" for n, m in CASES])
def test_controls_run_under_inference_mode_as_under_no_grad(tiny_cache, name, make):
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, [make()]):
        with torch.no_grad():
            expected = generate(pipe, name, steps=4)
        with torch.inference_mode():
            inferred = generate(pipe, name, steps=4)
        with torch.no_grad():
            again = generate(pipe, name, steps=4)
    torch.testing.assert_close(inferred, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


#: Half-precision pipelines cast the float masks and biases they are given (sdpa), and Z-Image's processor re-orders
#: its padded RoPE table and mask once per forward: both caches are keyed by the tensor's version counter, which
#: tensors made under inference mode lack (reading it raised "Inference tensors do not track version counter").
HALF = [
    ("tiny-sd", lambda: attnctl.Reweight({"red": 2.0}, normalize=True), {}),
    ("tiny-chroma", lambda: attnctl.ConsistentSubjects(), {}),
    ("tiny-zimage", lambda: attnctl.PAG(), {"height": 48, "width": 48}),  # 144 image tokens, padded to 160
]


@pytest.mark.parametrize("name,make,size", HALF, ids=[n for n, _, _ in HALF])
def test_half_precision_pipelines_run_under_inference_mode_as_under_no_grad(name, make, size):
    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline(name).to(torch.bfloat16)
    prompts = ("a red cat on the street", "a red dog on the street")  # a fresh list per call: Z-Image templates it in place
    with attnctl.apply(pipe, [make()]):
        with torch.no_grad():
            expected = generate(pipe, name, prompt=list(prompts), steps=2, **size)
        with torch.inference_mode():
            inferred = generate(pipe, name, prompt=list(prompts), steps=2, **size)
    torch.testing.assert_close(inferred, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart"])
def test_regions_with_a_latent_optimiser_run_first_under_inference_mode(tiny_cache, name):
    """Regions' region prompts encoded in an inference-mode call, and the region keys its edits keep for the call,
    were inference tensors; the optimiser's loss pass (autograd on) saves them: the first call failed (at its first
    step for the prompts, at its second for the keys: 4 steps, the window the first half)."""
    pipe = tiny_cache(name)
    regions = lambda: attnctl.Regions([attnctl.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)),  # noqa: E731
                                       attnctl.Region("a blue car", box=(0.5, 0.0, 1.0, 1.0))], isolate=True)
    with attnctl.apply(pipe, [regions(), attnctl.AttendExcite(subjects=["cat", "car"])]):
        with torch.inference_mode():
            inferred = generate(pipe, name, prompt="a red cat and a blue car", steps=4)
    with attnctl.apply(pipe, [regions(), attnctl.AttendExcite(subjects=["cat", "car"])]):
        with torch.no_grad():
            expected = generate(pipe, name, prompt="a red cat and a blue car", steps=4)
    torch.testing.assert_close(inferred, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_regions_with_a_late_optimiser_window_under_inference_mode(tiny_cache, name):
    """On joint attention the dense form of Regions' label mask is made by the attention backend and cached for the
    call: made in the inference-mode forwards before an optimiser's window opens, it was an inference tensor that the
    window's first loss pass (autograd on) had to save for backward."""
    pipe = tiny_cache(name)

    def run(mode):
        controls = [attnctl.Regions([attnctl.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)),
                                     attnctl.Region("a blue car", box=(0.5, 0.0, 1.0, 1.0))], isolate=True),
                    attnctl.AttendExcite(subjects=["cat", "car"], steps=(0.5, 1.0), refine=())]
        with attnctl.apply(pipe, controls), mode():
            return generate(pipe, name, prompt="a red cat and a blue car", steps=4)

    torch.testing.assert_close(run(torch.inference_mode), run(torch.no_grad), rtol=0, atol=0)
