"""Wan 2.2's two experts (issue #19): `transformer` runs the high-noise steps, `transformer_2` the low-noise ones
(below the pipeline's `boundary_ratio`). One handle controls both: layers are named behind their expert's attribute,
the output is bitwise stock with no control and after remove, and a control acts on whichever expert runs a step.
"""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import HandleError, PipelineChangedError, UnsupportedError
from attnctl.processors.base import ControlledProcessor
from attnctl.testing.new_families import NEW_CALL_DEFAULTS, available

from .helpers import Probe
from .test_families_new import PROMPT, RefIdentitySelfAttention, RefWanRegionCross, _processors, _wan_tubes

pytestmark = pytest.mark.skipif(not available("tiny-wan"), reason="tiny-wan22 needs diffusers >= 0.42 with WanPipeline")

STEPS = 4  # timesteps 1000, 858, 602, 9 under tiny-wan's scheduler: boundary 700 -> steps 0-1 high, 2-3 low noise
EXPERTS = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def pipe():
    from attnctl.testing.new_families import tiny_wan22

    pipe = tiny_wan22()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=("a cat", "a dog"), guidance: float = 4.0, steps: int = STEPS, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prompt = list(prompt) if not isinstance(prompt, str) else prompt
    return pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", generator=generator,
                **NEW_CALL_DEFAULTS["tiny-wan"]).frames


class ExpertCalls:
    """Which expert ran each denoiser call, with its inputs (prepended pre-hooks: made after attnctl.apply, they see
    the pipeline's rows), and the prediction handed to `scheduler.step`."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.predictions = pipe, [], []
        self._hooks = [
            getattr(pipe, attribute).register_forward_pre_hook(self._make(attribute), with_kwargs=True, prepend=True)
            for attribute in EXPERTS
        ]
        original = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.predictions.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        pipe.scheduler.step = step

    def _make(self, attribute):
        def pre(module, args, kwargs):
            self.calls.append((attribute, dict(kwargs)))

        return pre

    def close(self):
        del self.pipe.scheduler.step
        for hook in self._hooks:
            hook.remove()


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_empty_apply_and_remove_are_bitwise_stock_on_both_experts(pipe, guidance):
    calls = ExpertCalls(pipe)
    try:
        stock = generate(pipe, guidance=guidance)
    finally:
        calls.close()
    per_step = 2 if guidance > 1 else 1
    assert [attribute for attribute, _ in calls.calls] == ["transformer"] * 2 * per_step + ["transformer_2"] * 2 * per_step
    with attnctl.apply(pipe, []) as handle:
        assert set(handle.denoisers()) == set(EXPERTS)
        for attribute in EXPERTS:
            processors = _processors(getattr(pipe, attribute))
            assert processors and all(isinstance(p, ControlledProcessor) for p in processors.values())
        with pytest.raises(HandleError, match="pipe.transformer already has a live attnctl handle"):
            attnctl.apply(pipe, [])
        controlled = generate(pipe, guidance=guidance)
    after = generate(pipe, guidance=guidance)
    assert torch.equal(stock, controlled) and torch.equal(stock, after)
    for attribute in EXPERTS:
        expert = getattr(pipe, attribute)
        assert not any(isinstance(p, ControlledProcessor) for p in _processors(expert).values())
        assert not expert._forward_pre_hooks and not expert._forward_hooks and "cache_context" not in expert.__dict__
    attnctl.apply(pipe, []).remove()  # both experts are free again


def test_layers_are_named_per_expert_and_run_on_the_expert_of_the_step(pipe):
    probe = Probe()
    with attnctl.apply(pipe, [probe]) as handle:
        generate(pipe, prompt="a cat")
    names = [layer.name for layer in handle.adapter.layers]
    blocks = [f"blocks.{b}.{a}" for b in range(2) for a in ("attn1", "attn2")]
    assert names == [f"{expert}.{block}" for expert in EXPERTS for block in blocks]
    assert [layer.index for layer in handle.adapter.layers] == list(range(8))
    seen = {}
    for entry in probe.log:
        if entry[0] != "bind":
            seen.setdefault(entry[1], set()).add(entry[0])
    assert seen == {0: set(names[:4]), 1: set(names[:4]), 2: set(names[4:]), 3: set(names[4:])}
    binds = [entry for entry in probe.log if entry[0] == "bind"]
    assert len(binds) == 1 and binds[0][1] == STEPS  # one binding per pipeline call, the steps of both experts
    # selectors match path parts: `blocks.1 & self` is both experts' block 1, `transformer_2` the low-noise expert only
    pag = attnctl.PAG(scale=1.0)
    assert [layer.name for layer in pag.select(handle.adapter)] == ["transformer.blocks.1.attn1", "transformer_2.blocks.1.attn1"]
    low = attnctl.Reweight({"cat": 2.0}, layers="transformer_2 & cross")
    assert [layer.name for layer in low.select(handle.adapter)] == ["transformer_2.blocks.0.attn2", "transformer_2.blocks.1.attn2"]
    assert sorted(handle.adapter.transformer_blocks()) == [f"{e}.blocks.{b}" for e in EXPERTS for b in range(2)]


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
def test_pag_perturbs_the_expert_that_runs_each_step(pipe, guidance):
    """docs/methods.md "PAG" with the default layers (the middle block's self-attention, in both experts): at every
    step the prediction is the stock CFG combination of that step's expert plus scale * (cond - perturbed), the
    perturbed pass being that expert with identity self-attention in its block 1."""
    scale = 1.5
    with attnctl.apply(pipe, [attnctl.PAG(scale=scale)]):
        calls = ExpertCalls(pipe)  # its pre-hooks go before attnctl's: the pipeline's own rows
        try:
            generate(pipe, prompt="a cat", guidance=guidance)
        finally:
            calls.close()
    per_step = 2 if guidance > 1 else 1
    assert len(calls.calls) == STEPS * per_step and len(calls.predictions) == STEPS
    for step, prediction in enumerate(calls.predictions):
        attribute, cond_inputs = calls.calls[step * per_step]
        assert attribute == EXPERTS[step // 2]
        expert = getattr(pipe, attribute)

        def run(inputs, expert=expert):
            with torch.no_grad():
                return expert(**{**inputs, "return_dict": False})[0]

        cond = run(cond_inputs)
        layer = expert.blocks[1].attn1
        original = layer.processor
        layer.set_processor(RefIdentitySelfAttention())
        try:
            perturbed = run(cond_inputs)
        finally:
            layer.set_processor(original)
        expected = cond
        if per_step == 2:
            uncond = run(calls.calls[step * per_step + 1][1])
            expected = uncond + guidance * (cond - uncond)
        assert (cond - perturbed).abs().max() > 1e-4
        torch.testing.assert_close(prediction, expected + scale * (cond - perturbed), rtol=1e-4, atol=1e-4)


def test_regions_use_each_experts_own_text_projection(pipe):
    """Regions (docs/methods.md, tubes on video) in every attn2 of both experts: each expert projects the region
    prompts with its own text embedder; against the stock pipeline with a reference processor on each expert."""
    regions, weights = _wan_tubes()
    stock = generate(pipe, prompt=PROMPT, guidance=1.0)
    with attnctl.apply(pipe, [attnctl.Regions(regions, base_ratio=0.2)]):
        got = generate(pipe, prompt=PROMPT, guidance=1.0)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt([r.prompt for r in regions], do_classifier_free_guidance=False,
                                       max_sequence_length=NEW_CALL_DEFAULTS["tiny-wan"]["max_sequence_length"])
    originals = {}
    for attribute in EXPERTS:
        expert = getattr(pipe, attribute)
        with torch.no_grad():
            text = expert.condition_embedder.text_embedder(embeds)
        for i, block in enumerate(expert.blocks):
            originals[attribute, i] = block.attn2.processor
            block.attn2.set_processor(RefWanRegionCross(text, weights, 0.2))
    try:
        expected = generate(pipe, prompt=PROMPT, guidance=1.0)
    finally:
        for (attribute, i), processor in originals.items():
            getattr(pipe, attribute).blocks[i].attn2.set_processor(processor)
    assert (expected - stock).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(pipe, prompt=PROMPT, guidance=1.0), stock)


def test_skip_layer_names_each_experts_blocks(pipe):
    # the message used to say "blocks has 0 block(s)"; it says how blocks are named on a pipeline with experts
    with pytest.raises(attnctl.errors.SelectionError, match=r"2 denoiser experts .*'transformer.blocks.1' and 'transformer_2.blocks.1'"):
        attnctl.apply(pipe, [attnctl.SkipLayer(blocks=("blocks.1",))])
    stock = generate(pipe, prompt="a cat", guidance=1.0)
    with attnctl.apply(pipe, [attnctl.SkipLayer(blocks=("transformer_2.blocks.1",), scale=2.0, steps=(0.0, 1.0))]):
        got = generate(pipe, prompt="a cat", guidance=1.0)
    assert not torch.equal(got, stock) and torch.isfinite(got).all()


def _batches(pipe, control):
    """The output of a 4-step call under `control`, and the batch size of each expert's calls (pipeline rows + perturbed)."""
    log = []
    hooks = [getattr(pipe, attribute).register_forward_pre_hook(
        lambda m, a, k, attribute=attribute: log.append((attribute, k["hidden_states"].shape[0])), with_kwargs=True)
        for attribute in EXPERTS]
    try:
        with attnctl.apply(pipe, [control]):
            out = generate(pipe, prompt="a cat")
    finally:
        for hook in hooks:
            hook.remove()
    return out, log


@pytest.mark.parametrize("make", [
    lambda steps: attnctl.PAG(scale=2.0, layers="transformer & self", steps=steps),
    lambda steps: attnctl.SEG(scale=2.0, sigma=1.0, layers="transformer & self", steps=steps),
    lambda steps: attnctl.SkipLayer(blocks=("transformer.blocks.1",), scale=2.0, steps=steps),
], ids=["pag", "seg", "skip-layer"])
def test_perturbed_rows_run_only_on_the_expert_holding_the_layers(pipe, make):
    """Layers on the high-noise expert only: the low-noise expert's calls hold the pipeline's row alone (the perturbed
    rows ran there at full cost for a term of cond - cond), and the output is that of the same control with a step
    window on the high-noise steps."""
    got, log = _batches(pipe, make((0.0, 1.0)))
    windowed, _ = _batches(pipe, make((0.0, 0.5)))
    assert [size for attribute, size in log if attribute == "transformer_2"] == [1] * 4  # cond, uncond; 2 steps
    assert any(size == 2 for attribute, size in log if attribute == "transformer")
    assert torch.equal(got, windowed)


def _sag_run(pipe, control, steps=STEPS):
    """The predictions handed to `scheduler.step` and the output of a call under `control` (CFG 4)."""
    predictions = []
    original = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        predictions.append(model_output.clone())
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    try:
        with attnctl.apply(pipe, [control]):
            out = generate(pipe, prompt="a cat", steps=steps)
    finally:
        del pipe.scheduler.step
    return predictions, out


@pytest.mark.parametrize("ratio, expert", [(0.0, "transformer"), (1.01, "transformer_2")])
def test_sag_on_one_expert_is_sag_on_that_denoiser_alone(ratio, expert):
    """A boundary that gives every step to one expert: SAG (default layer) on the two-expert pipeline is SAG on a
    pipeline with that expert as its only denoiser (its middle block's attn1, docs/methods.md "SAG" on video). SAG's
    default was the first expert's layer only: the second expert's steps failed ("did not run")."""
    from diffusers import WanPipeline

    from attnctl.testing.new_families import tiny_wan22

    two = tiny_wan22(boundary_ratio=ratio)
    two.set_progress_bar_config(disable=True)
    with attnctl.apply(two, []) as handle:
        assert [layer.name for layer in attnctl.SAG().select(handle.adapter)] == [f"{e}.blocks.1.attn1" for e in EXPERTS]
    _, got = _sag_run(two, attnctl.SAG(scale=1.0))
    one = WanPipeline(tokenizer=two.tokenizer, text_encoder=two.text_encoder, vae=two.vae, scheduler=two.scheduler,
                      transformer=getattr(two, expert))
    one.set_progress_bar_config(disable=True)
    stock = generate(one, prompt="a cat")
    _, expected = _sag_run(one, attnctl.SAG(scale=1.0))
    assert not torch.equal(expected, stock)
    assert torch.equal(got, expected)


def test_sag_reads_the_map_of_the_expert_that_runs_each_step(pipe):
    """Two experts (steps 0-1 high noise, 2-3 low noise): the steps of the high-noise expert are those of SAG on that
    expert alone (a pipeline with it as its only denoiser, same trajectory until the switch); a layer on one expert
    only gives SAG on that expert's steps (= a step window on them); every step of the default gets its degraded pass
    on its own expert."""
    from diffusers import WanPipeline

    log = []
    hooks = [getattr(pipe, attribute).register_forward_pre_hook(lambda m, a, attribute=attribute: log.append(attribute))
             for attribute in EXPERTS]
    try:
        predictions, _ = _sag_run(pipe, attnctl.SAG(scale=1.0))
    finally:
        for hook in hooks:
            hook.remove()
    assert log == ["transformer"] * 6 + ["transformer_2"] * 6  # per step: cond, uncond, SAG's degraded pass
    one = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                      transformer=pipe.transformer)
    one.set_progress_bar_config(disable=True)
    alone, _ = _sag_run(one, attnctl.SAG(scale=1.0))
    for step in (0, 1):
        assert torch.equal(predictions[step], alone[step])
    _, high = _sag_run(pipe, attnctl.SAG(scale=1.0, layer="transformer.blocks.1.attn1"))
    _, window = _sag_run(pipe, attnctl.SAG(scale=1.0, steps=(0.0, 0.5)))
    assert torch.equal(high, window)
    _, low = _sag_run(pipe, attnctl.SAG(scale=1.0, layer="transformer_2.blocks.1.attn1"))
    _, window = _sag_run(pipe, attnctl.SAG(scale=1.0, steps=(0.5, 1.0)))
    assert torch.equal(low, window)
    _, named = _sag_run(pipe, attnctl.SAG(scale=1.0, layer=("transformer.blocks.1.attn1", "transformer_2.blocks.0.attn1")))
    assert named.shape == window.shape and torch.isfinite(named).all()
    with pytest.raises(attnctl.errors.SelectionError, match="2 self-attention layers of expert transformer; it needs exactly one per expert"):
        attnctl.apply(pipe, [attnctl.SAG(layer="transformer & self")])


def test_experts_that_differ_are_refused_and_a_replaced_expert_is_detected(pipe):
    from diffusers import WanPipeline, WanTransformer3DModel

    config = dict(pipe.transformer.config)
    config["patch_size"] = (1, 1, 1)
    other = WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=pipe.transformer, transformer_2=WanTransformer3DModel(**config).eval(), boundary_ratio=0.7,
    )
    with pytest.raises(UnsupportedError, match="differ in class or patch size"):
        attnctl.apply(other, [])
    assert not any(isinstance(p, ControlledProcessor) for p in _processors(pipe.transformer).values())

    handle = attnctl.apply(pipe, [])
    second = pipe.transformer_2
    try:
        pipe.transformer_2 = WanTransformer3DModel(**dict(second.config)).eval()
        with pytest.raises(PipelineChangedError, match="pipe.transformer_2 was replaced"):
            generate(pipe, prompt="a cat", guidance=1.0)
    finally:
        pipe.transformer_2 = second
        handle.remove()


@pytest.mark.parity
def test_wan22_image_to_video_two_experts_identity_and_a_control(pipe, monkeypatch):
    """Wan 2.2 A14B's image-to-video layout: no CLIP image encoder, the image as latent channels, two experts; bitwise
    stock under apply and after remove, and Reweight changes the output through both experts' cross-attention."""
    import importlib
    import types

    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image

    module = importlib.import_module("diffusers.pipelines.wan.pipeline_wan_i2v")
    if not hasattr(module, "ftfy"):  # called unguarded by the I2V pipeline: a no-op stand-in
        monkeypatch.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
    experts = []
    for seed in (0, 5):
        torch.manual_seed(seed)
        experts.append(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4, text_dim=32,
            freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval())
    i2v = WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.7,
    )
    i2v.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (48, 64), (200, 30, 30))

    def run():
        return i2v(image=image, prompt="a red cat", num_inference_steps=STEPS, guidance_scale=4.0, height=64, width=48, num_frames=9,
                   max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    stock = run()
    probe = Probe()
    with attnctl.apply(i2v, [probe]):
        controlled = run()
    assert torch.equal(stock, controlled) and torch.equal(stock, run())
    assert {entry[0].split(".")[0] for entry in probe.log if entry[0] != "bind"} == set(EXPERTS)
    with attnctl.apply(i2v, [attnctl.Reweight({"red": 3.0}, layers="transformer_2")]):
        assert not torch.equal(run(), stock)


def test_tgate_across_the_two_experts(pipe):
    """TGATE on Wan 2.2's two experts: after the gate each step runs its expert once (the uncond call returns the cond
    call's prediction); the second expert's cross-attention has no stored mean (it never ran before the gate), so it
    computes, and the report says so; remove() leaves both experts stock."""
    stock = generate(pipe)
    ran = {name: [] for name in EXPERTS}
    hooks = [getattr(pipe, name).blocks[0].register_forward_hook(lambda m, a, o, name=name: ran[name].append(1)) for name in EXPERTS]
    try:
        with attnctl.apply(pipe, [attnctl.TGate(gate_step=1)]) as handle:
            with pytest.warns(UserWarning, match="no stored cross-attention at transformer_2"):
                out = generate(pipe)
            report = handle.outputs["tgate"]
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert len(ran["transformer"]) == 2 + 1 and len(ran["transformer_2"]) == 2  # steps 0-1 high noise, 2-3 low noise
    assert report.hits > 0 and any("miss" in entry.ran for entry in report.entries.values())
    assert all("forward" not in getattr(pipe, name).__dict__ for name in EXPERTS)
    assert torch.equal(generate(pipe), stock)


def test_attention_maps_in_compiled_experts_count_only_the_expert_that_runs(pipe):
    """Both experts compiled: the edits are computed before each forward for the layers of the expert that runs
    (`Runtime.prefill_edits`), so AttentionMaps counts each step once per prompt row, as eager does (the other expert's
    layers used to be counted too: twice the contributions); the same maps, no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    with attnctl.apply(pipe, attnctl.AttentionMaps(["cat"])) as handle:
        generate(pipe)
        eager = handle.outputs["attention_maps"]
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("eager")
    experts = [getattr(pipe, name) for name in EXPERTS]
    for expert in experts:
        expert.compile(backend=counter)
    try:
        with attnctl.apply(pipe, attnctl.AttentionMaps(["cat"])) as handle:
            generate(pipe)
            compiled = handle.outputs["attention_maps"]
    finally:
        for expert in experts:
            expert._compiled_call_impl = None
        torch._dynamo.reset()
    assert counter.frame_count > 0 and not counters["graph_break"]
    assert compiled.contributions == eager.contributions == (2 * STEPS, 2 * STEPS)  # 2 layers with maps, per step
    assert torch.equal(compiled.grid_maps, eager.grid_maps)


def _observed_experts(pipe, steps, guidance=4.0):
    """The expert each step ran (the first denoiser call of the step), from forward pre-hooks: what the pipeline did."""
    calls = ExpertCalls(pipe)
    try:
        generate(pipe, steps=steps, guidance=guidance)
    finally:
        calls.close()
    per_step = 2 if guidance > 1 else 1
    return tuple(attribute for attribute, _ in calls.calls[::per_step])


def test_fastattn_plan_records_the_expert_schedule_and_refuses_another(pipe):
    """A plan calibrated on one expert schedule (boundary_ratio 0.7: 3 + 3 of 6 steps) has no methods for an expert
    at the steps it did not run; another boundary_ratio (0.4: 5 + 1) or scheduler shift runs another expert there,
    which silently lost the plan's sharing (a 'miss', full attention). The plan records the schedule the pipeline
    ran (compared with forward pre-hooks), a mismatch is refused naming both, and a plan without the field still
    loads and runs, with a warning where its methods are lost."""
    import dataclasses
    import warnings

    from diffusers import FlowMatchEulerDiscreteScheduler

    from attnctl.testing.new_families import tiny_wan22

    steps = 6
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=10.0, window=(0, 1, 1)), pipe, "a red cat", num_inference_steps=steps,
                             guidance_scale=4.0, generator=torch.Generator().manual_seed(0), **NEW_CALL_DEFAULTS["tiny-wan"])
    assert plan.experts == _observed_experts(pipe, steps) == ("transformer",) * 3 + ("transformer_2",) * 3
    assert attnctl.FastAttnPlan.from_json(plan.to_json()) == plan
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]) as handle:  # the same schedule: every planned share hits
        generate(pipe, steps=steps)
        assert not any("miss" in entry.ran for entry in handle.outputs["fastattn"].entries.values())

    other = tiny_wan22(boundary_ratio=0.4)
    other.set_progress_bar_config(disable=True)
    shifted = tiny_wan22()
    shifted.set_progress_bar_config(disable=True)
    shifted.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    for moved, runs in ((other, "transformer at steps 0-4, transformer_2 at step 5"),
                        (shifted, "transformer at steps 0-1, transformer_2 at steps 2-5")):
        assert _observed_experts(moved, steps) != plan.experts
        with attnctl.apply(moved, [attnctl.FastAttn(plan=plan)]):
            with pytest.raises(attnctl.ConfigError) as error:
                generate(moved, steps=steps)
        assert "transformer at steps 0-2, transformer_2 at steps 3-5" in str(error.value) and runs in str(error.value)

    legacy = dataclasses.replace(plan, experts=None)
    data = legacy.to_dict()
    assert "experts" not in data and attnctl.FastAttnPlan.from_dict(data) == legacy  # plans made before the field
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attnctl.apply(pipe, [attnctl.FastAttn(plan=legacy)]):
            generate(pipe, steps=steps)
    with pytest.warns(UserWarning, match="transformer_2 at step 4.*this call runs transformer at steps 0-4"):
        with attnctl.apply(other, [attnctl.FastAttn(plan=legacy)]):
            generate(other, steps=steps)


def test_a_control_whose_layers_sit_on_an_expert_that_runs_none_of_its_steps_warns_idle(pipe):
    """A control acting only through layers of an expert that runs none of its steps (boundary_ratio=0.0 gives every
    step to `transformer`; or the expert's steps lie outside the control's window) is stock for the call: warned as
    an empty step window is, naming the expert and the boundary (it was silent; AttentionMaps returned zero maps)."""
    import warnings

    from attnctl.testing.new_families import tiny_wan22

    zero = tiny_wan22(boundary_ratio=0.0)
    zero.set_progress_bar_config(disable=True)
    stock = generate(zero, prompt="a cat", steps=2)
    for control in (attnctl.Reweight({"cat": 2.0}, layers="transformer_2"), attnctl.AttentionMaps(["cat"], layers="transformer_2 & cross")):
        with pytest.warns(attnctl.IdleControlWarning, match=(
            rf"{type(control).__name__} is idle in this call: its layers are all on transformer_2, which runs none of the 2 "
            r"steps of this call \(WanPipeline's boundary_ratio=0: transformer runs the steps whose timestep is at least 0")):
            with attnctl.apply(zero, [control]):
                assert torch.equal(generate(zero, prompt="a cat", steps=2), stock)
    # the fixture's boundary: transformer_2 runs steps 2 and 3 of 4, outside the window (0, 0.5)
    with pytest.warns(attnctl.IdleControlWarning, match=r"PAG is idle .* which runs steps 2, 3 of the 4 steps of this call, none inside "
                                                       r"its step window steps=\(0, 0.5\)"):
        with attnctl.apply(pipe, [attnctl.PAG(scale=1.0, layers="transformer_2 & self", steps=(0.0, 0.5))]):
            generate(pipe, prompt="a cat")
    # not warned: a window holding one of the expert's steps, and TGATE, which also drops the CFG rows whatever its layers
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        with attnctl.apply(pipe, [attnctl.Reweight({"cat": 2.0}, layers="transformer_2", steps=(0.0, 0.75))]):
            generate(pipe, prompt="a cat")
        with attnctl.apply(zero, [attnctl.TGate(gate_step=1, layers="transformer_2 & cross")]):
            assert not torch.equal(generate(zero, prompt="a cat", steps=2), stock)


def test_every_control_acting_through_its_layers_alone_warns_on_an_expert_that_runs_no_step():
    """Regions (cross-attention: no region tokens), StructuredGuidance, ConsistentSubjects and AttentionInterpolation
    change a denoiser call only at their layers: on `transformer_2` with boundary_ratio=0.0 (every step on
    `transformer`) they are stock, and warn as Reweight does (they were silent)."""
    from attnctl.testing.new_families import tiny_wan22

    zero = tiny_wan22(boundary_ratio=0.0)
    zero.set_progress_bar_config(disable=True)
    one, two, three = ["a red cat"], ["a red cat", "a green dog"], ["a red cat", "a green dog", "a blue cat"]
    cases = (
        (attnctl.Regions([attnctl.Region("a blue dog", box=(0.0, 0.0, 0.5, 1.0))], base_ratio=0.0, layers="transformer_2"), one),
        (attnctl.StructuredGuidance(phrases=["a red cat"], layers="transformer_2"), one),
        (attnctl.ConsistentSubjects(strength=4.0, layers="transformer_2"), two),
        (attnctl.AttentionInterpolation(layers="transformer_2"), three),
    )
    stock = {len(prompt): generate(zero, prompt=prompt, steps=2) for prompt in (one, two, three)}
    for control, prompt in cases:
        with pytest.warns(attnctl.IdleControlWarning, match=(
                rf"{type(control).__name__} is idle in this call: its layers are all on transformer_2, which runs none of "
                r"the 2 steps of this call \(WanPipeline's boundary_ratio=0")):
            with attnctl.apply(zero, [control]):
                assert torch.equal(generate(zero, prompt=prompt, steps=2), stock[len(prompt)])


def test_fastattn_with_one_step_per_expert_warns_idle(pipe):
    """Calibration runs full attention at a layer's first step (nothing cached yet: no earlier output, no residual),
    and a layer of an expert first runs at that expert's first step: with one step per expert (2 steps across the
    boundary) FastAttn is stock, and warns as a one-step call does; with 3 steps one expert has a second step, where
    calibration chooses sharing at this threshold."""
    import warnings

    fast = attnctl.FastAttn(threshold=10.0, window=1)
    stock = {steps: generate(pipe, prompt="a cat", steps=steps) for steps in (2, 3)}
    with pytest.warns(attnctl.IdleControlWarning, match=(
            r"FastAttn is idle in this call: each expert holding its layers \(transformer, transformer_2\) runs at most "
            r"one step of this call \(transformer at step 0, transformer_2 at step 1\)")):
        with attnctl.apply(pipe, [fast]):
            assert torch.equal(generate(pipe, prompt="a cat", steps=2), stock[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        with attnctl.apply(pipe, [fast]):
            assert not torch.equal(generate(pipe, prompt="a cat", steps=3), stock[3])


def test_a_pipeline_with_transformer_2_alone_is_refused_naming_it(pipe):
    """diffusers runs a Wan 2.2 pipeline with `transformer=None` and `transformer_2` only (every step below the
    boundary); apply said it "holds neither a unet nor a transformer". The refusal names transformer_2 and says to pass
    it as `transformer`, which runs the same steps: bitwise the same output."""
    from diffusers import WanPipeline

    parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler)
    alone = WanPipeline(**parts, transformer=None, transformer_2=pipe.transformer_2, boundary_ratio=1.01)
    alone.set_progress_bar_config(disable=True)
    with pytest.raises(UnsupportedError, match=r"WanPipeline holds a `transformer_2` but no `transformer` \(transformer=None\).*"
                                               r"Pass that expert as `transformer`"):
        attnctl.apply(alone, [attnctl.Reweight({"cat": 2.0})])
    assert not any(isinstance(p, ControlledProcessor) for p in _processors(pipe.transformer_2).values())
    moved = WanPipeline(**parts, transformer=pipe.transformer_2)
    moved.set_progress_bar_config(disable=True)
    assert torch.equal(generate(moved, prompt="a cat", steps=2), generate(alone, prompt="a cat", steps=2))
    attnctl.apply(moved, []).remove()
