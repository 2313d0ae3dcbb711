"""diffusers' CFG-cutoff callbacks (`SDCFGCutoffCallback`, `SDXLCFGCutoffCallback`, `SD3CFGCutoffCallback`) drop the
uncond rows mid-call: from the step after the cutoff the denoiser gets the cond rows only, as in a call without CFG.

The expectation for a control is its own definition in a call without CFG from there on: a call with
guidance_scale=1 (cond rows only) whose latents are replaced, at the end of the cutoff step, by the cutoff run's
(`_spliced`); the schedulers of the tiny pipelines (DDIM, Euler, flow-matching Euler) keep no state across steps
but the step index, so the steps after the splice see exactly the inputs of the cutoff run's."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers.callbacks import SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

import attnctl
from attnctl.control import Bound, Control
from attnctl.errors import CallLayoutError

from .helpers import generate

STEPS, CUT = 4, 1  # steps 0 and 1 with CFG, 2 and 3 on the cond rows only
CALLBACKS = {"tiny-sd": SDCFGCutoffCallback, "tiny-sdxl": SDXLCFGCutoffCallback, "tiny-sd3": SD3CFGCutoffCallback}
PROMPT = ["a photo of a red cat"]


def _cutoff(name: str):
    return CALLBACKS[name](cutoff_step_ratio=None, cutoff_step_index=CUT)


def _cut_run(pipe, name: str, prompt=PROMPT, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The official callback's run, and its latents at the end of the cutoff step."""
    callback, kept = _cutoff(name), {}

    def step_end(pipeline, step, timestep, tensors):
        tensors = callback(pipeline, step, timestep, tensors)
        if step == CUT:
            kept["latents"] = tensors["latents"].clone()
        return tensors

    out = generate(pipe, name, prompt=prompt, steps=STEPS, callback_on_step_end=step_end,
                   callback_on_step_end_tensor_inputs=[*callback.tensor_inputs, "latents"], **kwargs)
    return out, kept["latents"]


def _spliced(pipe, name: str, latents: torch.Tensor, prompt=PROMPT, **kwargs) -> torch.Tensor:
    """A call without CFG whose latents are the cutoff run's from the end of the cutoff step on."""

    def step_end(pipeline, step, timestep, tensors):
        if step == CUT:
            tensors["latents"] = latents
        return tensors

    return generate(pipe, name, prompt=prompt, steps=STEPS, guidance=1.0, callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=["latents"], **kwargs)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd3"])
def test_no_controls_is_the_stock_cutoff_run(tiny_cache, name):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, prompt=PROMPT, steps=STEPS, callback_on_step_end=_cutoff(name))
    handle = attnctl.apply(pipe, [])
    try:
        assert torch.equal(generate(pipe, name, prompt=PROMPT, steps=STEPS, callback_on_step_end=_cutoff(name)), stock)
    finally:
        handle.remove()


def _regions():
    return attnctl.Regions([attnctl.Region("a red cat", box=(0, 0, 0.5, 1)), attnctl.Region("a photo", box=(0.5, 0, 1, 1))])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3"])
@pytest.mark.parametrize("make", [lambda: attnctl.Reweight({"cat": 3.0}), _regions], ids=["Reweight", "Regions"])
def test_controls_run_as_without_cfg_after_the_cutoff(tiny_cache, name, make):
    pipe = tiny_cache(name)
    stock, _ = _cut_run(pipe, name)
    handle = attnctl.apply(pipe, [make()])
    try:
        cut, latents = _cut_run(pipe, name)
        expected = _spliced(pipe, name, latents)
    finally:
        handle.remove()
    assert not torch.equal(cut, stock)  # the control acts after the cutoff
    assert torch.equal(cut, expected)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3"])
def test_attention_maps_count_the_cond_rows_before_and_after_the_cutoff(tiny_cache, name):
    """Steps 0-1 (CFG): the maps of a call without the callback; steps 2-3: those of a call without CFG."""
    pipe = tiny_cache(name)
    before, after = attnctl.AttentionMaps(["cat"], steps=(0.0, 0.5), key="before"), attnctl.AttentionMaps(["cat"], steps=(0.5, 1.0), key="after")
    handle = attnctl.apply(pipe, [before, after])
    try:
        _, latents = _cut_run(pipe, name)
        cut = {key: handle.outputs[key] for key in ("before", "after")}
        generate(pipe, name, prompt=PROMPT, steps=STEPS)
        with_cfg = handle.outputs["before"]
        _spliced(pipe, name, latents)
        without_cfg = handle.outputs["after"]
    finally:
        handle.remove()
    assert cut["before"].contributions == with_cfg.contributions and torch.equal(cut["before"].grid_maps, with_cfg.grid_maps)
    assert cut["after"].contributions == without_cfg.contributions and torch.equal(cut["after"].grid_maps, without_cfg.grid_maps)
    assert cut["after"].contributions[0] > 0


def test_tgate_with_its_gate_after_the_cutoff_runs_as_without_cfg(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    handle = attnctl.apply(pipe, [attnctl.TGate(gate_step=3)])  # the cross-attention cached at step 2: cond rows only
    try:
        cut, latents = _cut_run(pipe, "tiny-sd")
        assert torch.equal(cut, _spliced(pipe, "tiny-sd", latents))
    finally:
        handle.remove()


def test_tgate_with_its_gate_before_the_cutoff_is_unchanged_by_it(tiny_cache):
    """TGATE (Zhang et al. 2024) after its gate reuses the cached cross-attention and returns one prediction for both
    CFG rows; SD's UNet reads the text only through cross-attention, so the cond rows the callback leaves predict the
    same: the run equals TGate's without the callback."""
    pipe = tiny_cache("tiny-sd")
    handle = attnctl.apply(pipe, [attnctl.TGate(gate_step=1)])
    try:
        cut, _ = _cut_run(pipe, "tiny-sd")
        assert torch.equal(cut, generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS))
    finally:
        handle.remove()


@dataclass(frozen=True)
class _PerRowState(Control, type_name="test-cfg-cutoff-unverified"):
    """A control that says it cannot follow a CFG cutoff (say, state sized for the CFG rows at bind)."""

    cfg_cutoff_refusal = "it keeps state per CFG row"

    def bind(self, context):
        return Bound(self, context.layers, (0.0, 1.0))


def test_a_control_that_cannot_follow_is_refused_and_the_handle_stays_usable(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS)
    handle = attnctl.apply(pipe, [_PerRowState()])
    try:
        with pytest.raises(CallLayoutError, match=r"_PerRowState cannot follow this call from step 2: its uncond rows were dropped.*SDCFGCutoffCallback.*it keeps state per CFG row"):
            generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS, callback_on_step_end=_cutoff("tiny-sd"))
        assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS), stock)
    finally:
        handle.remove()
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS), stock)


def test_sd3_callback_with_several_prompts_is_refused_with_controls(tiny_cache):
    """SD3CFGCutoffCallback keeps `prompt_embeds[-1:]`: with two prompts both images read the second prompt's text."""
    pipe, prompts = tiny_cache("tiny-sd3"), ["a photo of a cat", "a photo of a red cat"]
    stock = generate(pipe, "tiny-sd3", prompt=prompts, steps=STEPS, callback_on_step_end=_cutoff("tiny-sd3"))
    handle = attnctl.apply(pipe, [])
    try:
        assert torch.equal(generate(pipe, "tiny-sd3", prompt=prompts, steps=STEPS, callback_on_step_end=_cutoff("tiny-sd3")), stock)
    finally:
        handle.remove()
    handle = attnctl.apply(pipe, [attnctl.Reweight({"cat": 3.0})])
    try:
        with pytest.raises(CallLayoutError, match=r"2 image row\(s\) of this call read 1 row\(s\) of text: fewer text rows "
                           r"than images.*prompt_embeds\[-1:\].*the call has 2 prompts"):
            generate(pipe, "tiny-sd3", prompt=prompts, steps=STEPS, callback_on_step_end=_cutoff("tiny-sd3"))
    finally:
        handle.remove()


@pytest.mark.parametrize("make", [lambda: attnctl.Reweight({"cat": 3.0}), attnctl.PAG], ids=["Reweight", "PAG"])
def test_sd3_callback_with_one_prompt_and_several_images_runs(tiny_cache, make):
    """SD3CFGCutoffCallback's one cond row serves every image of one prompt (num_images_per_prompt=2): SD3's denoiser
    broadcasts it. It was refused ("the images no longer read their own prompts"), even for PAG; the controls follow it
    as a call without CFG would, within the float noise of the stock run's own cut-vs-spliced difference."""
    pipe = tiny_cache("tiny-sd3")
    stock, latents = _cut_run(pipe, "tiny-sd3", num_images_per_prompt=2)
    noise = float((stock - _spliced(pipe, "tiny-sd3", latents, num_images_per_prompt=2)).abs().max())
    handle = attnctl.apply(pipe, [make()])
    try:
        cut, latents = _cut_run(pipe, "tiny-sd3", num_images_per_prompt=2)
        expected = _spliced(pipe, "tiny-sd3", latents, num_images_per_prompt=2)
    finally:
        handle.remove()
    assert not torch.equal(cut, stock)
    assert float((cut - expected).abs().max()) <= max(4 * noise, 1e-6)


def test_sd_cutoff_with_too_few_or_too_many_text_rows_names_the_cause(tiny_cache):
    """Stock fails in both with a raw size error; the refusal said "SD3CFGCutoffCallback keeps the last row ... use one
    prompt per call" in both, though the call had one prompt."""
    pipe = tiny_cache("tiny-sd")

    def flag_only(pipeline, step, timestep, tensors):  # drops CFG but leaves the negative rows in prompt_embeds
        if step == CUT:
            pipeline._guidance_scale = 0.0
        return tensors

    handle = attnctl.apply(pipe, [attnctl.Reweight({"cat": 2.0})])
    try:
        with pytest.raises(CallLayoutError, match=r"2 image row\(s\) of this call read 1 row\(s\) of text: fewer text rows "
                           r"than images.*does not broadcast one text row.*num_images_per_prompt=2"):
            generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS, callback_on_step_end=_cutoff("tiny-sd"), num_images_per_prompt=2)
        with pytest.raises(CallLayoutError, match=r"1 image row\(s\) of this call read 2 row\(s\) of text: more text rows "
                           r"than images.*slice them as well"):
            generate(pipe, "tiny-sd", prompt=PROMPT, steps=STEPS, callback_on_step_end=flag_only)
    finally:
        handle.remove()


def test_layout_follows_the_pipelines_cfg_flag():
    from attnctl.pipelines.protocol import PromptRecord, base_rows, protocol_for

    record = PromptRecord([{"prompt": ["a cat", "a dog"], "num_images_per_prompt": 1, "do_classifier_free_guidance": True}])
    rows = base_rows(protocol_for("unet"), record, 2, None, {}, cfg_now=False)
    assert [(row.branch, row.prompt) for row in rows.rows] == [("cond", 0), ("cond", 1)]
    with pytest.raises(CallLayoutError, match="batch of 2 rows"):  # the pipeline still says CFG: nothing is guessed
        base_rows(protocol_for("unet"), record, 2, None, {}, cfg_now=True)


def test_zimage_cfg_truncation_runs_the_cond_rows_alone_past_it():
    """ZImagePipeline's own `cfg_truncation`: past it the pipeline passes the cond rows only and leaves
    `do_classifier_free_guidance` True; the call failed at that step even with no controls."""
    from attnctl.testing.new_families import available

    if not available("tiny-zimage"):
        pytest.skip("tiny-zimage needs diffusers >= 0.42")
    from attnctl.testing import make_tiny_pipeline

    from .helpers import Probe

    pipe = make_tiny_pipeline("tiny-zimage")
    options = dict(prompt="a photo of a cat", negative_prompt="a dog", guidance=4.0, steps=4, cfg_truncation=0.5)
    stock = generate(pipe, "tiny-zimage", **options)
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        assert torch.equal(generate(pipe, "tiny-zimage", **options), stock)
    frames = {}
    for entry in probe.log:
        if entry[0] != "bind":
            frames.setdefault(entry[-1], (entry[1], tuple(row[0] for row in entry[3])))
    assert list(frames.values()) == [(0, ("cond", "uncond")), (1, ("cond", "uncond")), (2, ("cond", "uncond")), (3, ("cond",))]
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 3.0}, branch="cond")]):
        assert not torch.equal(generate(pipe, "tiny-zimage", **options), stock)
