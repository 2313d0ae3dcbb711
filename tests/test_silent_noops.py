"""Inputs under which a control was accepted and then silently did nothing (the output bitwise stock) or something
other than asked. Each is now refused with the bad value and what is allowed, or, where the idle output is a
documented identity (a step window outside the call's steps, a TGate gate after the last step), warned about once
per call. Tiny pipelines, 2-step calls: a few seconds in all."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from PIL import Image

import attnctl
from attnctl import ConfigError, SelectionError
from attnctl.testing import make_tiny_pipeline

from .helpers import generate

PROMPTS = ["a photo of a cat", "a red cat on the street"]


@pytest.fixture(scope="module")
def sd():
    return make_tiny_pipeline("tiny-sd")


def _processors(pipe) -> set[str]:
    return {type(p).__name__ for p in pipe.unet.attn_processors.values()}


def _run(pipe, controls, prompt=PROMPTS, steps=2):
    with attnctl.apply(pipe, controls):
        return generate(pipe, "tiny-sd", prompt=prompt, steps=steps)


def _idle_warnings(caught) -> list[str]:
    found = [w for w in caught if "is idle in this call" in str(w.message)]
    assert all(issubclass(w.category, attnctl.IdleControlWarning) for w in found)  # one category to filter on
    return [str(w.message) for w in found]


# -- step windows that hold no step of the call: identity kept, one warning -----------------------------------------
@pytest.mark.parametrize("control, steps, words", [
    (attnctl.PAG(steps=(0.6, 0.9)), 2, ["PAG", "steps=(0.6, 0.9)", "2 steps"]),
    (attnctl.Reweight({"cat": 3.0}, steps=(0.05, 0.1)), 10, ["Reweight", "steps=(0.05, 0.1)", "10 steps"]),
    (attnctl.SkipLayer(blocks=("up_blocks.1.attentions.0.transformer_blocks.0",)), 5,
     ["SkipLayer", "steps=(0.01, 0.2)", "5 steps", "strict"]),
    (attnctl.TGate(), 10, ["TGate", "gate_step=10", "10 steps of this call", "at most 9"]),
    (attnctl.PromptToPrompt(mode="refine", cross_steps=(0.0, 0.1), self_steps=(0.0, 0.1)), 2,
     ["PromptToPrompt", "cross_steps=(0.0, 0.1)", "self_steps=(0.0, 0.1)", "2 steps"]),
], ids=["pag", "reweight", "skip-layer-default", "tgate-default", "p2p"])
def test_a_window_without_a_step_of_the_call_warns_once_and_stays_stock(sd, control, steps, words):
    """The window is outside every step of this call's schedule (rounding, a gate after the last step): the documented
    identity holds (bitwise stock; P2P only shares the base row's noise), and one warning names the control, its
    window and the step count."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(sd, [control], steps=steps)
    messages = _idle_warnings(caught)
    assert len(messages) == 1, messages
    assert all(word in messages[0] for word in words), messages[0]
    if not isinstance(control, attnctl.PromptToPrompt):
        assert torch.equal(got, generate(sd, "tiny-sd", prompt=PROMPTS, steps=steps))


@pytest.mark.parametrize("control", [
    attnctl.PAG(steps=(0.5, 0.5)), attnctl.PAG(scale=0.0), attnctl.PAG(), attnctl.TGate(gate_step=1),
    attnctl.PromptToPrompt(mode="refine", cross_steps=0.0, self_steps=0.0),
], ids=["empty-window", "scale-0", "acting", "tgate-acting", "p2p-off"])
def test_explicitly_off_or_acting_controls_do_not_warn(sd, control):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(sd, [control])
    assert not _idle_warnings(caught)


# -- AttentionInterpolation: two rows are the two endpoints, nothing between ------------------------------------------
def test_interpolation_of_two_rows_warns_and_stays_stock(sd):
    """With two prompt rows both are endpoints (t = 0 and t = 1): the output is the stock images, bit for bit (a tested
    identity, tests/test_interpolation.py), and a warning says so."""
    stock = generate(sd, "tiny-sd", prompt=PROMPTS, steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(_run(sd, [attnctl.AttentionInterpolation()]), stock)
    messages = _idle_warnings(caught)
    assert len(messages) == 1 and "AttentionInterpolation" in messages[0] and "2 prompt rows" in messages[0], messages
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(sd, [attnctl.AttentionInterpolation()], prompt=[*PROMPTS, "a dog"])
    assert not _idle_warnings(caught)


# -- Regions: a selection where the regions act nowhere; isolation without two subjects --------------------------------
def test_regions_on_self_attention_only_is_refused_unless_isolating(sd):
    """Region prompts act on cross / joint layers: `layers="self"` without isolation changed nothing."""
    region = attnctl.Region("a dog", box=(0, 0, 0.5, 1))
    with pytest.raises(SelectionError, match="'self' holds no cross- or joint-attention"):
        attnctl.apply(sd, [attnctl.Regions([region], layers="self")])
    assert _processors(sd) == {"AttnProcessor2_0"}
    stock = generate(sd, "tiny-sd", prompt=PROMPTS, steps=2)
    # documented identity (base_ratio=1 without isolation) and isolation on self layers stay accepted
    assert torch.equal(_run(sd, [attnctl.Regions([region], layers="self", base_ratio=1.0)]), stock)
    two = [region, attnctl.Region("a cat", box=(0.5, 0, 1, 1))]
    assert not torch.equal(_run(sd, [attnctl.Regions(two, layers="self", isolate=True, base_ratio=1.0)]), stock)
    # each requested action needs a layer of its own: region prompts (base_ratio < 1) on self layers only act nowhere
    with pytest.raises(SelectionError, match="cross- or joint-attention \\(region prompts\\)"):
        attnctl.apply(sd, [attnctl.Regions(two, layers="self", isolate=True)])
    assert _processors(sd) == {"AttnProcessor2_0"}


def test_isolation_only_with_one_subject_is_refused():
    with pytest.raises(ConfigError, match="1 subject region"):
        attnctl.Regions([attnctl.Region("a dog", box=(0, 0, 0.5, 1))], isolate=True, base_ratio=1.0)
    two = [attnctl.Region("a dog", box=(0, 0, 0.5, 1)), attnctl.Region("sky", box=(0, 0, 1, 0.2), subject=False)]
    with pytest.raises(ConfigError, match="at least two regions with subject=True"):
        attnctl.Regions(two, isolate=True, base_ratio=1.0)
    with pytest.warns(attnctl.IdleControlWarning, match="isolation does nothing"):
        attnctl.Regions(two, isolate=True)  # region prompts still act; isolation is idle, and says so


# -- BoxGuidance: a box smaller than a cell of every map it guides ------------------------------------------------------
@pytest.mark.parametrize("constraints", [("ratio",), ("inner",)])
def test_box_guidance_with_a_box_that_holds_no_cell_is_refused(sd, constraints):
    """Chen et al.'s hard box `mask[int(y0 h):int(y1 h), int(x0 w):int(x1 w)]` is empty for a box under one cell:
    the loss had no gradient and the output was bitwise stock."""
    control = attnctl.BoxGuidance(boxes={"cat": (0.0, 0.0, 0.01, 0.01)}, constraints=constraints)
    with attnctl.apply(sd, [control]):
        with pytest.raises(ConfigError, match=r"box \(0.0, 0.0, 0.01, 0.01\) of 'cat' holds no cell"):
            generate(sd, "tiny-sd", prompt="a photo of a cat", steps=2)
    assert _processors(sd) == {"AttnProcessor2_0"}


# -- StructuredGuidance: no noun phrase in any prompt -------------------------------------------------------------------
def test_structured_guidance_without_a_phrase_warns_and_stays_stock(sd):
    """The chunker drops a phrase that is the whole prompt ("a red cat"): with no phrase in any row the output is
    bitwise stock (a tested identity, tests/test_structured.py), and a warning says so."""
    stock = generate(sd, "tiny-sd", prompt="a red cat", steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(_run(sd, [attnctl.StructuredGuidance()], prompt="a red cat"), stock)
    messages = _idle_warnings(caught)
    assert len(messages) == 1 and "no noun phrase in the prompts ['a red cat']" in messages[0], messages
    for control, prompt in ((attnctl.StructuredGuidance(), ["a red cat", "a photo of a cat"]),  # one row is enough
                            (attnctl.StructuredGuidance(phrases=["a red cat"]), "a red cat"),  # named by the user
                            (attnctl.StructuredGuidance(scale=0.0), "a red cat")):  # scale 0: the identity, no warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(sd, [control], prompt=prompt)
        assert not _idle_warnings(caught)


# -- Model.generate / attnctl render: PromptToPrompt needs its edits ----------------------------------------------------
def test_generate_refuses_prompt_to_prompt_without_edits_before_installing(sd):
    model = attnctl.Model(sd, "tiny-sd")
    with pytest.raises(ConfigError, match="edits"):
        model.generate("a red cat", seed=0, steps=2, width=32, height=32, controls=attnctl.PromptToPrompt(mode="refine"))
    assert _processors(sd) == {"AttnProcessor2_0"}


# -- ToMe / AgentAttention: a stride larger than the token grid ----------------------------------------------------------
@pytest.mark.parametrize("control, name", [(attnctl.ToMe(stride=64), "ToMe.stride=64"),
                                           (attnctl.AgentAttention(stride=64, late_stride=2), "AgentAttention.stride=64")])
def test_a_stride_larger_than_the_token_grid_is_refused(sd, control, name):
    """No stride x stride cell fits the grid, so there is no destination token: it failed with an IndexError deep in
    the matching."""
    with attnctl.apply(sd, [control]):
        with pytest.raises(ConfigError, match=rf"{name} is larger than the \d+x\d+ token grid"):
            generate(sd, "tiny-sd", prompt=PROMPTS, steps=2)
    assert _processors(sd) == {"AttnProcessor2_0"}
    stock = generate(sd, "tiny-sd", prompt=PROMPTS, steps=2)
    assert torch.equal(_run(sd, [attnctl.ToMe(ratio=0.0, stride=64)]), stock)  # ratio 0 is stock: no cell is needed


# -- regions, subjects and reference regions that hold no image token ---------------------------------------------------
TINY_BOX = (0.0, 0.0, 0.01, 0.01)


def test_a_region_that_labels_no_token_warns_where_labels_carry_it(tiny_cache):
    """Joint attention (Flux) and isolation give each token to the region covering the most of it, at least half: a
    region under half a token cell is dropped there (Flux: its prompt entirely, the output nearly stock). The project's
    own layouts hide a soft background under the subjects (tests/test_regions_models.py), so it warns rather than
    refuses. On cross-attention its soft coverage still weighs its prompt in: no warning there."""
    def dropped(pipe, name, regions, prompt):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with attnctl.apply(pipe, [regions]):
                generate(pipe, name, prompt=prompt, steps=2)
        return [str(w.message) for w in caught if "labels no image token" in str(w.message)]

    flux = tiny_cache("tiny-flux")
    messages = dropped(flux, "tiny-flux", attnctl.Regions([attnctl.Region("a dog", box=TINY_BOX)]), "a photo of a cat")
    assert len(messages) == 1 and "Region('a dog', box=(0.0, 0.0, 0.01, 0.01))" in messages[0], messages
    sd = tiny_cache("tiny-sd")
    isolated = attnctl.Regions([attnctl.Region("a dog", box=TINY_BOX), attnctl.Region("a cat", box=(0.5, 0, 1, 1))],
                               isolate=True)
    assert len(dropped(sd, "tiny-sd", isolated, PROMPTS)) == 1
    assert not dropped(sd, "tiny-sd", attnctl.Regions([attnctl.Region("a dog", box=TINY_BOX)]), PROMPTS)
    # labelled on the 16x16 grid only (two cells three quarters covered), not on the 8x8 one (two cells 3/8 covered):
    # isolation skips it there, and says so
    coarse = attnctl.Regions([attnctl.Region("a dog", box=(1.25 / 16, 0, 2.75 / 16, 1)), attnctl.Region("a cat", box=(0.5, 0, 1, 1))],
                             isolate=True)
    messages = dropped(sd, "tiny-sd", coarse, PROMPTS)
    assert len(messages) == 1 and "on the token grid(s) 8x8 (of 2" in messages[0], messages


def _one_pixel_mask() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[0, 0] = 1.0
    return mask


@pytest.mark.parametrize("control, words", [
    (attnctl.ConsistentSubjects(subject=TINY_BOX), "the subject box (0.0, 0.0, 0.01, 0.01) holds no image token"),
    (attnctl.ConsistentSubjects(mask=_one_pixel_mask()), "mask[0] holds no image token"),
    (attnctl.ReferenceAttention(Image.new("RGB", (32, 32), (0, 200, 0)), region=TINY_BOX),
     "region (0.0, 0.0, 0.01, 0.01) holds no image token"),
], ids=["consistent-box", "consistent-mask", "reference-region"])
def test_a_subject_or_reference_region_that_holds_no_token_is_refused(sd, control, words):
    """Subjects and the reference's region hold the cells whose centre is inside the box (a mask: whose area average
    reaches the threshold): one that holds none shared nothing, and the generated images were stock."""
    with attnctl.apply(sd, [control]):
        with pytest.raises(ConfigError, match=re.escape(words)):
            generate(sd, "tiny-sd", prompt=PROMPTS, steps=2)
    assert _processors(sd) == {"AttnProcessor2_0"}


# -- Reweight(branch="uncond") in a call without negative-prompt rows --------------------------------------------------
def test_reweighting_the_negative_prompt_without_cfg_warns_and_stays_stock(sd):
    """guidance_scale 1: the call has no uncond rows, so there is nothing to reweight (bitwise stock, a tested identity
    on Flux without true CFG, tests/test_reweight.py)."""
    stock = generate(sd, "tiny-sd", prompt="a cat", steps=2, guidance=1.0, negative_prompt="a cat")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attnctl.apply(sd, [attnctl.Reweight({"cat": 3.0}, branch="uncond")]):
            assert torch.equal(generate(sd, "tiny-sd", prompt="a cat", steps=2, guidance=1.0, negative_prompt="a cat"), stock)
            generate(sd, "tiny-sd", prompt="a cat", steps=2, negative_prompt="a cat")  # with CFG: it acts, no warning
    messages = _idle_warnings(caught)
    assert len(messages) == 1 and "branch='uncond'" in messages[0], messages


# -- FastAttn: calibration that can choose nothing -----------------------------------------------------------------------
@pytest.mark.parametrize("control, steps, guidance, words", [
    (attnctl.FastAttn(threshold=1.0), 1, 5.0, "1 step"),
    (attnctl.FastAttn(techniques=("cfg_share",), threshold=1.0), 2, 1.0, "no classifier-free guidance"),
], ids=["one-step", "cfg-share-without-cfg"])
def test_fastattn_that_can_choose_nothing_warns_and_stays_stock(sd, control, steps, guidance, words):
    stock = generate(sd, "tiny-sd", prompt=PROMPTS, steps=steps, guidance=guidance)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attnctl.apply(sd, [control]):
            assert torch.equal(generate(sd, "tiny-sd", prompt=PROMPTS, steps=steps, guidance=guidance), stock)
    messages = _idle_warnings(caught)
    assert len(messages) == 1 and "FastAttn" in messages[0] and words in messages[0], messages


def test_generate_that_fails_at_bind_leaves_the_pipeline_stock(sd):
    """A word not in the prompt is found when the call binds, after the model attached its controls: the model releases
    them (it used to keep them installed until the next generate or release)."""
    model = attnctl.Model(sd, "tiny-sd")
    with pytest.raises(attnctl.TokenError, match="'dog' is not in the cond prompt"):
        model.generate("a red cat", seed=0, steps=2, width=32, height=32, controls=attnctl.Reweight({"dog": 2.0}))
    assert model.handle is None and _processors(sd) == {"AttnProcessor2_0"}
    with model:
        model.generate("a red cat", seed=0, steps=2, width=32, height=32, controls=attnctl.Reweight({"cat": 2.0}))
    assert _processors(sd) == {"AttnProcessor2_0"}


def test_attend_excite_kernel_wider_than_the_padded_maps_is_refused_at_bind():
    """The authors' smoothing pads by 1 and convolves without padding: a kernel wider than the map + 2 cannot run
    (it used to fail mid-pipeline with a raw torch error); refused at bind, the pipeline stock after."""
    from attnctl.toy import CALL_DEFAULTS, load_toy_shapes

    pipe = load_toy_shapes()
    call = {**CALL_DEFAULTS, "num_inference_steps": 2, "output_type": "latent"}
    stock = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **call).images
    with attnctl.apply(pipe, [attnctl.AttendExcite(subjects=["circle", "square"], kernel_size=7)]):
        with pytest.raises(attnctl.ConfigError, match="kernel_size=7 does not fit the 4x4"):
            pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **call)
    assert torch.equal(pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0), **call).images, stock)


@pytest.mark.parametrize("cross_steps", [(0.9, 1.0), {"default_": (0.9, 1.0)}], ids=["pair", "mapping"])
def test_p2p_reweight_outside_every_window_of_the_call_is_refused(cross_steps):
    """A reweighted word inside no cross-attention window of the call's steps would do nothing: refused for every
    window form (at 5 steps, (0.9, 1.0) over n + 1 = 6 entries holds no step)."""
    pipe = make_tiny_pipeline("tiny-sd")
    control = attnctl.PromptToPrompt(cross_steps=cross_steps, self_steps=0.0, reweight={"blue": 2.0})
    with attnctl.apply(pipe, [control]):
        with pytest.raises(ConfigError, match="reweight acts inside the cross-attention window"):
            pipe(["a red cat", "a blue cat"], num_inference_steps=5, output_type="latent",
                 generator=torch.Generator().manual_seed(0), height=32, width=32)
