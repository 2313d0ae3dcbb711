"""A `callback_on_step_end` that switches the prompt mid-call (returns other `prompt_embeds`, made before the call or
with `pipe.encode_prompt` inside the callback).

The controls are bound at the call's first denoiser call, with the words resolved in the prompts it started with. A
control that resolved words there is refused at the first denoiser call that reads other text (it silently kept the
old prompt's positions: Reweight("cat") boosted the new prompt's token at cat's position); a control that reads no
words follows the switch as a call made with the new prompt would (the run equals a call with the new prompt whose
latents are replaced by the switched run's at the end of the switch step: "spliced"; DDIM keeps no state across
steps but the step index)."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import CallLayoutError

from .helpers import Probe, generate

STEPS, AT = 3, 0  # the callback switches at the end of step 0
A, B = ["a photo of a cat"], ["a cat on a red car"]


def _sd_embeds(pipe, prompt) -> torch.Tensor:
    """SD's CFG batch [uncond; cond] for `prompt` (made before the handle is applied: an encode_prompt outside the
    denoising loop starts a call)."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    return torch.cat([uncond, cond])


def _switched(pipe, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The run on prompt A switched to `embeds` at the end of step AT, and its latents there."""
    kept = {}

    def callback(pipeline, step, timestep, tensors):
        if step == AT:
            tensors["prompt_embeds"] = embeds
            kept["latents"] = tensors["latents"].clone()
        return tensors

    out = generate(pipe, "tiny-sd", prompt=A, steps=STEPS, callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["prompt_embeds", "latents"])
    return out, kept["latents"]


def _spliced(pipe, latents: torch.Tensor) -> torch.Tensor:
    def callback(pipeline, step, timestep, tensors):
        if step == AT:
            tensors["latents"] = latents
        return tensors

    return generate(pipe, "tiny-sd", prompt=B, steps=STEPS, callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=["latents"])


@pytest.mark.parametrize("make, name", [
    (lambda: attnctl.Reweight({"cat": 3.0}), "Reweight"),
    (lambda: attnctl.AttentionMaps(["cat"]), "AttentionMaps"),
    (lambda: attnctl.AttendExcite(["cat"]), "AttendExcite"),
    (lambda: attnctl.TGate(gate_step=1), "TGate"),  # it reuses the cross-attention cached with A's text at step 0
], ids=["Reweight", "AttentionMaps", "AttendExcite", "TGate-gate-before"])
def test_a_control_bound_to_the_words_refuses_a_switched_prompt(tiny_cache, make, name):
    pipe = tiny_cache("tiny-sd")
    embeds = _sd_embeds(pipe, B)
    handle = attnctl.apply(pipe, [make()])
    try:
        with pytest.raises(CallLayoutError, match=rf"the text the controls were bound to changed mid-call: at step 1 .*"
                           rf"callback_on_step_end that returned other prompt_embeds.*{name} cannot follow it"):
            _switched(pipe, embeds)
        generate(pipe, "tiny-sd", prompt=A, steps=STEPS)  # the handle runs on
    finally:
        handle.remove()


@pytest.mark.parametrize("make", [lambda: attnctl.PAG(scale=2.0), lambda: attnctl.TGate(gate_step=2)], ids=["PAG", "TGate-gate-after"])
def test_a_control_that_reads_no_words_follows_a_switched_prompt(tiny_cache, make):
    pipe = tiny_cache("tiny-sd")
    embeds = _sd_embeds(pipe, B)
    handle = attnctl.apply(pipe, [make()])
    try:
        out, latents = _switched(pipe, embeds)
        assert torch.equal(out, _spliced(pipe, latents))
    finally:
        handle.remove()


def test_a_cfg_cutoff_slice_is_not_a_switch(tiny_cache):
    """diffusers' 'dynamic classifier-free guidance' recipe keeps `prompt_embeds.chunk(2)[-1]`: the same storage."""
    pipe = tiny_cache("tiny-sd")

    def cut(pipeline, step, timestep, tensors):
        if step == AT:
            pipeline._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 3.0})]):
        generate(pipe, "tiny-sd", prompt=A, steps=STEPS, callback_on_step_end=cut, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_encode_prompt_in_a_callback_runs_inside_the_call(tiny_cache):
    """`pipe.encode_prompt` inside the loop was refused (HandleError) even with no controls, though stock runs it. It
    no longer starts a call: no controls give the stock output, the steps are counted on, and a word control is
    refused by the switch it makes."""
    pipe = tiny_cache("tiny-sd")

    def callback(pipeline, step, timestep, tensors):
        if step == AT:
            cond, uncond = pipeline.encode_prompt(B, "cpu", 1, True)
            tensors["prompt_embeds"] = torch.cat([uncond, cond])
        return tensors

    options = dict(prompt=A, steps=STEPS, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    stock = generate(pipe, "tiny-sd", **options)
    with attnctl.apply(pipe, []):
        assert torch.equal(generate(pipe, "tiny-sd", **options), stock)
    probe = Probe()
    with attnctl.apply(pipe, [probe]):
        generate(pipe, "tiny-sd", **options)
    assert [entry for entry in probe.log if entry[0] == "bind"] == [("bind", STEPS, True, 1)]
    assert sorted({entry[1] for entry in probe.log if entry[0] != "bind"}) == list(range(STEPS))
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 3.0})]):
        with pytest.raises(CallLayoutError, match="changed mid-call"):
            generate(pipe, "tiny-sd", **options)


@pytest.mark.parametrize("make", [lambda: attnctl.AttentionMaps(["cat"]), lambda: attnctl.AttendExcite(["cat"])],
                         ids=["AttentionMaps", "AttendExcite"])
def test_a_switch_to_another_text_length_is_refused_clearly(tiny_cache, make):
    """SD3 takes any text length; these raised a raw RuntimeError / IndexError deep in their hooks."""
    pipe = tiny_cache("tiny-sd3")
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(B, B, B, device="cpu", do_classifier_free_guidance=True,
                                                                 max_sequence_length=64)
    embeds, pooled = torch.cat([uncond, cond]), torch.cat([pooled_uncond, pooled])

    def callback(pipeline, step, timestep, tensors):
        if step == AT:
            tensors["prompt_embeds"], tensors["pooled_prompt_embeds"] = embeds, pooled
        return tensors

    with attnctl.apply(pipe, [make()]):
        with pytest.raises(CallLayoutError, match="changed mid-call"):
            generate(pipe, "tiny-sd3", prompt=A, steps=STEPS, callback_on_step_end=callback,
                     callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"])
