"""The guidance wrapper: perturbed rows batched with the pipeline's rows, D added to every combined row."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import pytest
import torch

import attnctl
from attnctl.control import Bound, Control
from attnctl.denoiser_call import Perturbation, RowPlan
from attnctl.testing import make_tiny_pipeline

from .helpers import Probe, generate

pytestmark = pytest.mark.parity


@dataclass(frozen=True)
class ConstantGuidance(Control, type_name="test-constant-guidance"):
    """Adds perturbed copies of the cond rows and a constant guidance term (checks plumbing, not a method)."""

    value: float = 0.25
    separate: bool = False
    seen: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        return _ConstantBound(self, context.layers, (0.0, 1.0))


class _ConstantBound(Bound):
    def row_plan(self, frame):
        control = self.control

        def term(cond, perturbed, frame):
            control.seen.append((cond.shape, perturbed.shape, (cond - perturbed).abs().max().item()))
            return torch.full_like(cond, control.value)

        return RowPlan((Perturbation("const", term, separate=control.separate),))


def _capture_predictions(pipe):
    seen = []
    original = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        seen.append(model_output.clone())
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    return seen


@pytest.mark.parametrize(
    "name, extra",
    [
        ("tiny-sd", {}),
        ("tiny-sd", {"guidance": 1.0}),
        ("tiny-sdxl", {}),
        ("tiny-sd3", {}),
        ("tiny-pixart", {}),
        ("tiny-flux", {}),
        ("tiny-flux", {"negative_prompt": "a dog", "true_cfg_scale": 3.0}),
    ],
    ids=["sd-cfg", "sd-nocfg", "sdxl", "sd3", "pixart", "flux", "flux-true-cfg"],
)
@pytest.mark.parametrize("separate", [False, True], ids=["batched", "separate"])
def test_constant_term_is_added_to_the_combined_prediction(name, extra, separate):
    pipe = make_tiny_pipeline(name)
    stock_seen = _capture_predictions(pipe)
    generate(pipe, name, prompt="a cat", steps=1, **extra)
    guidance = ConstantGuidance(value=0.25, separate=separate)
    probe = Probe()
    controlled_seen = _capture_predictions(pipe)  # before apply: a wrap stacked on attnctl's would stay at remove()
    with attnctl.apply(pipe, [probe, guidance]):
        generate(pipe, name, prompt="a cat", steps=1, **extra)
    expected = stock_seen[0] + 0.25
    got = controlled_seen[0]
    if name == "tiny-pixart":  # learned sigma: the pipeline keeps the first half of the channels
        expected, got = expected[:, :4], got[:, :4]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the perturbed rows are copies of the cond rows, unperturbed here: the same prediction
    assert all(diff < 1e-4 for _, _, diff in guidance.seen)
    tags = {entry[3] for entry in probe.log if entry[0] != "bind"}
    assert any(("cond", 0, "const") in rows for rows in tags)


def test_uncond_call_before_cond_is_an_error():
    from attnctl.denoiser_call import RowLayout
    from attnctl.errors import CallLayoutError
    from attnctl.pipelines.denoiser import _spread

    with pytest.raises(CallLayoutError):
        _spread(torch.zeros(1, 4), RowLayout.single("uncond", 1), None)


def test_zero_scale_adds_no_rows():
    """A guidance control with nothing to do returns no row plan; the call stays bitwise stock."""
    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd")

    @dataclass(frozen=True)
    class Nothing(Control, type_name="test-nothing"):
        def bind(self, context):
            return Bound(self, context.layers, (0.0, 1.0))

    with attnctl.apply(pipe, [Nothing()]):
        assert torch.equal(generate(pipe, "tiny-sd"), stock)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_joint_attention_kwargs_tensors_are_rebatched_with_perturbed_rows(name):
    """SD3 / Flux carry IP-Adapter image embeds in `joint_attention_kwargs`: perturbed rows get their rows too."""
    pipe = make_tiny_pipeline(name)
    transformer = pipe.transformer
    real_forward = transformer.forward
    seen = []

    @functools.wraps(real_forward)  # as accelerate's hooks wrap it: the signature stays readable
    def forward(*args, **kwargs):
        bound = inspect.signature(real_forward).bind(*args, **kwargs)
        extra = dict(bound.arguments.get("joint_attention_kwargs") or {})
        embeds = extra.pop("probe_embeds", None)
        seen.append((bound.arguments["hidden_states"].shape[0], None if embeds is None else embeds[0].clone()))
        bound.arguments["joint_attention_kwargs"] = extra or None
        return real_forward(*bound.args, **bound.kwargs)

    transformer.forward = forward  # a user's (or accelerate's) instance-level wrap, which attnctl wraps in turn
    rows = torch.arange(2.0)[:, None].expand(2, 3)
    if name == "tiny-sd3":  # batched CFG: [uncond, cond] rows, as SD3 passes its IP-Adapter embeds
        rows = torch.arange(4.0)[:, None].expand(4, 3)
    control = ConstantGuidance()
    try:
        with attnctl.apply(pipe, [control]):
            generate(pipe, name, prompt=["a cat", "a dog"], steps=1, joint_attention_kwargs={"probe_embeds": [rows], "scale": 1.0})
    finally:
        del transformer.forward
    batch, embeds = seen[0]
    cond = [2, 3] if name == "tiny-sd3" else [0, 1]
    assert batch == len(rows) + 2 and embeds.shape[0] == batch
    assert torch.equal(embeds[:, 0], torch.tensor([*range(len(rows)), *cond], dtype=torch.float32))
