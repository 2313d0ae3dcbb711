"""DiTFastAttn (Yuan et al. 2024): identities, each technique against an explicit reference, the greedy calibration
rule against an independent re-computation, plans (JSON, mismatches), and the FLOPs of the report."""

from __future__ import annotations

import json

import pytest
import torch

import attnctl
from attnctl.errors import ConfigError

from .cache_helpers import Capture, band_allowed, explicit_attention, grid_allowed, make_plan
from .helpers import generate

pytestmark = pytest.mark.parity

FAMILIES = [("tiny-pixart", 4.5), ("tiny-sd3", 5.0), ("tiny-flux", 1.0), ("tiny-sd", 5.0)]


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().sum() / b.double().abs().sum())


# -- identities -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, guidance", FAMILIES)
def test_threshold_zero_is_bitwise_stock(name, guidance, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=3, guidance=guidance)
    with attnctl.apply(pipe, [attnctl.FastAttn(threshold=0.0)]) as handle:
        controlled = generate(pipe, name, steps=3, guidance=guidance)
        report = handle.outputs["fastattn"]
    assert torch.equal(controlled, stock)
    assert report.flops_ratio() == 1.0 and report.hits == 0
    assert set(report.plan.counts()) >= {"full"} and report.plan.counts()["full"] == 3 * len(report.plan.layers)
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=report.plan)]):  # an all-full plan changes nothing either
        assert torch.equal(generate(pipe, name, steps=3, guidance=guidance), stock)


# -- calibration, then inference with the plan ---------------------------------------------------------------------
SEPARATE_PASSES = [
    ("tiny-flux", 1.0, {"negative_prompt": "a dog", "true_cfg_scale": 3.0}),
    ("tiny-sd3", 5.0, {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.9}),
]


@pytest.mark.parametrize("name, guidance, extra", [(n, g, {}) for n, g in FAMILIES] + SEPARATE_PASSES,
                         ids=["pixart-cfg", "sd3-cfg", "flux-nocfg", "sd-cfg", "flux-true-cfg", "sd3-skip-layer"])
def test_calibrated_plan_reproduces_the_calibration_call(name, guidance, extra, tiny_cache):
    """The calibration call applies its choices as it makes them; running the plan it made gives the same output.
    Steps with several denoiser calls (Flux true CFG, SD3 skip-layer passes) keep one cache per call."""
    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=5, guidance=guidance, **extra)
    control = attnctl.FastAttn(threshold=0.3, window=4)
    plan = attnctl.calibrate(control, pipe, ["a photo of a cat", "a red car on the street"], num_inference_steps=5,
                             guidance_scale=guidance, generator=torch.Generator().manual_seed(0), **_defaults(name), **extra)
    with attnctl.apply(pipe, [control]) as handle:
        calibrated = generate(pipe, name, steps=5, guidance=guidance, **extra)
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]) as handle:
        planned = generate(pipe, name, steps=5, guidance=guidance, **extra)
        report = handle.outputs["fastattn"]
    torch.testing.assert_close(planned, calibrated, rtol=1e-5, atol=1e-5)
    assert not torch.equal(planned, stock)
    counts = plan.counts()
    assert counts["step_share"] > 0
    assert all(plan.per_step(layer)[0] == "full" for layer in plan.layers)  # the first step is never compressed
    if guidance <= 1:
        assert counts["cfg_share"] + counts["window_residual+cfg_share"] == 0
    assert report.flops_ratio() < 1.0
    # one hit per step_share (layer, step), and one more per extra denoiser call of such a step
    assert report.hits == counts["step_share"] if not extra else report.hits > counts["step_share"]


def _defaults(name):
    from attnctl.testing import CALL_DEFAULTS

    return dict(CALL_DEFAULTS[name])


# -- each technique against an explicit reference -------------------------------------------------------------------
def test_window_residual_band_matches_the_reference_and_counts_window_flops(tiny_cache):
    pipe = tiny_cache("tiny-pixart")
    layer = "transformer_blocks.0.attn1"
    plan = make_plan(pipe, 4, {layer: ["full", "window_residual", "window_residual", "full"]}, window=8)
    capture = Capture(layers=layer)
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(plan=plan)]) as handle:
        generate(pipe, "tiny-pixart", steps=4)
        report = handle.outputs["fastattn"]
    calls = {entry[1]: entry for entry in capture.log}
    _, _, _, q0, k0, v0, out0, window0 = calls[0]
    n = q0.shape[2]
    band = band_allowed(n, 8)
    residual = explicit_attention(q0, k0, v0) - explicit_attention(q0, k0, v0, band)
    torch.testing.assert_close(out0, explicit_attention(q0, k0, v0), rtol=1e-4, atol=1e-5)
    assert window0 is None  # full steps run plain attention (the window for the residual is the hook's own call)
    for step in (1, 2):
        _, _, _, q, k, v, out, window = calls[step]
        assert window is not None and window.band == 8
        torch.testing.assert_close(out, explicit_attention(q, k, v, band) + residual, rtol=1e-4, atol=1e-5)
    batch, heads, _, head_dim = q0.shape
    full = 4.0 * batch * n * n * heads * head_dim
    windowed = 4.0 * batch * int(band.sum()) * heads * head_dim
    assert report.entries[(0, layer)].flops == full + windowed  # the residual needs the window too
    assert report.entries[(1, layer)].flops == windowed
    assert report.entries[(3, layer)].flops == full  # no later window step: no residual
    assert report.entries[(1, layer)].full_flops == full


def test_rows_a_window_step_has_no_residual_for_keep_one_from_then_on(tiny_cache):
    """PAG's perturbed rows from a late start reach a window_residual layer with no residual kept for them: that
    step runs full attention and keeps a residual, so the next window step reuses it (it used to miss, and run
    full attention, at every window step until the plan's next full step)."""
    pipe = tiny_cache("tiny-pixart")
    layer = "transformer_blocks.0.attn1"
    plan = make_plan(pipe, 4, {layer: ["full", "window_residual", "window_residual", "window_residual"]}, window=8)
    capture = Capture(layers=layer)
    pag = attnctl.PAG(layers="transformer_blocks.1.attn1", steps=(0.5, 1.0))  # perturbed rows at steps 2 and 3
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(plan=plan), pag]) as handle:
        generate(pipe, "tiny-pixart", steps=4, guidance=4.5)
        report = handle.outputs["fastattn"]
    calls = {entry[1]: entry for entry in capture.log}
    _, _, rows2, q2, k2, v2, out2, _ = calls[2]
    _, _, rows3, q3, k3, v3, out3, _ = calls[3]
    assert len(rows2) == len(rows3) == 6  # uncond, cond, perturbed, for each of the two prompts
    band = band_allowed(q2.shape[2], 8)
    torch.testing.assert_close(out2, explicit_attention(q2, k2, v2), rtol=1e-4, atol=1e-5)
    residual = explicit_attention(q2, k2, v2) - explicit_attention(q2, k2, v2, band)
    torch.testing.assert_close(out3, explicit_attention(q3, k3, v3, band) + residual, rtol=1e-4, atol=1e-5)
    full = report.entries[(2, layer)].full_flops
    windowed = report.entries[(3, layer)].flops
    assert windowed < full
    assert report.entries[(2, layer)].flops == full + windowed  # the miss also ran the window, for its residual


@pytest.mark.parametrize("name, layer, text_first", [
    ("tiny-flux", "transformer_blocks.0.attn", True),
    ("tiny-flux", "single_transformer_blocks.1.attn", True),
    ("tiny-sd3", "transformer_blocks.0.attn", False),
])
def test_2d_window_on_joint_layouts_leaves_text_unrestricted(name, layer, text_first, tiny_cache):
    pipe = tiny_cache(name)
    guidance = 1.0 if name == "tiny-flux" else 5.0
    plan = make_plan(pipe, 3, {layer: ["full", "window_residual", "window_residual"]}, window=(1, 2))
    capture = Capture(layers=layer)
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(plan=plan)]) as handle:
        generate(pipe, name, steps=3, guidance=guidance)
        report = handle.outputs["fastattn"]
    calls = {entry[1]: entry for entry in capture.log}
    q0, k0, v0 = calls[0][3:6]
    window = calls[1][7]
    h, w = window.grid_hw
    text = q0.shape[2] - h * w
    assert text > 0 and window.text_len == text and window.text_first == text_first
    allowed = grid_allowed(h, w, 1, 2, text, text_first)
    residual = explicit_attention(q0, k0, v0) - explicit_attention(q0, k0, v0, allowed)
    q, k, v, out = calls[1][3], calls[1][4], calls[1][5], calls[1][6]
    torch.testing.assert_close(out, explicit_attention(q, k, v, allowed) + residual, rtol=1e-4, atol=1e-5)
    batch, heads, tokens, head_dim = q.shape
    assert report.entries[(1, layer)].flops == 4.0 * batch * int(allowed.sum()) * heads * head_dim
    assert report.entries[(1, layer)].full_flops == 4.0 * batch * tokens * tokens * heads * head_dim


def test_step_share_reuses_the_layer_output(tiny_cache):
    pipe = tiny_cache("tiny-sd3")
    layer = "transformer_blocks.1.attn"
    plan = make_plan(pipe, 4, {layer: ["full", "step_share", "step_share", "full"]})
    outputs = []
    module = pipe.transformer.get_submodule(layer)
    hook = module.register_forward_hook(lambda mod, args, out: outputs.append(tuple(o.clone() for o in out)))
    try:
        with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]) as handle:
            generate(pipe, "tiny-sd3", steps=4)
            report = handle.outputs["fastattn"]
    finally:
        hook.remove()
    for step in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(outputs[step], outputs[0]))
    assert not torch.equal(outputs[3][0], outputs[0][0])
    assert report.hits == 2 and report.entries[(1, layer)].flops == 0.0


def test_a_plan_frees_each_cache_at_the_first_step_that_no_longer_reads_it(tiny_cache, monkeypatch):
    """With a plan, a residual lives until the window steps that read it are over, a module output until its run of
    step sharing is (at the next step's first edit), not to the end of the call; the output is unchanged."""
    from attnctl.controls.fastattn import FastAttnBound

    pipe = tiny_cache("tiny-pixart")
    window_layer, shared_layer = "transformer_blocks.0.attn1", "transformer_blocks.1.attn1"
    plan = make_plan(pipe, 6, {window_layer: ["full", "window_residual", "window_residual", "full", "window_residual", "full"],
                               shared_layer: ["full", "step_share", "full", "full", "full", "full"]}, window=8)
    held: dict[int, dict[str, tuple[int, int]]] = {}
    drop = FastAttnBound.drop_unread

    def spy(self, step):
        drop(self, step)
        held[step] = {layer.name: (len(self.states[layer.index].residual), len(self.states[layer.index].output)) for layer in self.layers}

    monkeypatch.setattr(FastAttnBound, "drop_unread", spy)
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]):
        freed = generate(pipe, "tiny-pixart", steps=6)
    assert [held[step][window_layer][0] > 0 for step in range(6)] == [False, True, True, False, True, False]
    assert [held[step][shared_layer][1] > 0 for step in range(6)] == [False, True, False, False, False, False]
    monkeypatch.setattr(FastAttnBound, "drop_unread", lambda self, step: None)
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]):
        kept = generate(pipe, "tiny-pixart", steps=6)
    assert torch.equal(freed, kept)


def test_cfg_share_computes_cond_rows_and_copies_them(tiny_cache):
    pipe = tiny_cache("tiny-pixart")
    layer = "transformer_blocks.1.attn1"
    plan = make_plan(pipe, 2, {layer: ["cfg_share", "full"]})
    capture = Capture(layers=layer)
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(plan=plan)]) as handle:
        generate(pipe, "tiny-pixart", steps=2)
        report = handle.outputs["fastattn"]
    _, _, rows, q, k, v, out, _ = capture.log[0]
    uncond, cond = rows.indices("uncond"), rows.indices("cond")
    assert len(uncond) == len(cond) == 2
    torch.testing.assert_close(out[list(cond)], explicit_attention(q[list(cond)], k[list(cond)], v[list(cond)]), rtol=1e-4, atol=1e-5)
    assert torch.equal(out[list(uncond)], out[list(cond)])
    assert report.entries[(0, layer)].flops == report.entries[(0, layer)].full_flops / 2


# -- the greedy rule, re-computed independently --------------------------------------------------------------------
def test_calibration_takes_the_most_compressive_choice_below_the_threshold(tiny_cache):
    """From the q, k, v each layer received during calibration, recompute every candidate's error by the spec."""
    pipe = tiny_cache("tiny-pixart")
    threshold, band, steps = 0.2, 8, 5
    capture = Capture()
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(threshold=threshold, window=band)]) as handle:
        generate(pipe, "tiny-pixart", steps=steps)
        plan = handle.outputs["fastattn"].plan
    assert plan.layers == ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
    log = {(entry[0], entry[1]): entry for entry in capture.log}
    chosen_somewhere = set()
    for layer in plan.layers:
        methods = plan.per_step(layer)
        residual = None
        for step in range(steps):
            _, _, rows, q, k, v, out, _ = log[(layer, step)]
            allowed = band_allowed(q.shape[2], band)
            full = explicit_attention(q, k, v)
            window = explicit_attention(q, k, v, allowed)
            cond = list(rows.indices("cond"))
            assert list(rows.indices("uncond")) == list(range(len(cond)))

            def share(x, source=cond + cond):  # rows are [uncond..., cond...]: each takes its prompt's cond row
                return x[source]

            fraction = float(allowed.sum()) / allowed.numel()
            options = [(0.0, "step_share", log[(layer, step - 1)][6] if step else None)]
            if residual is not None:
                options += [(fraction / 2, "window_residual+cfg_share", share(window + residual)),
                            (fraction, "window_residual", window + residual)]
            options += [(0.5, "cfg_share", share(full))]
            if step == 0:  # the first step is always full attention (the authors' calibration skips it)
                options = []
            expected, expected_out = "full", full
            for _, name, candidate in sorted((o for o in options if o[2] is not None), key=lambda o: o[0]):
                if _rel_l1(candidate, full) < threshold:
                    expected, expected_out = name, candidate
                    break
            assert methods[step] == expected, (layer, step)
            torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-4)
            chosen_somewhere.add(expected)
            if expected in ("full", "cfg_share"):
                residual = full - window if expected == "full" else share(full - window)
    assert {"step_share", "full"} & chosen_somewhere and len(chosen_somewhere) >= 2


# -- plans -----------------------------------------------------------------------------------------------------------
def test_plan_json_round_trip_and_mismatches(tiny_cache, tmp_path):
    pipe = tiny_cache("tiny-pixart")
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=0.3, window=(1, 1)), pipe, "a photo of a cat", num_inference_steps=3, **_defaults("tiny-pixart"))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = attnctl.FastAttnPlan.load(path)
    assert loaded == plan and loaded.window == (1, 1) and loaded.resolution == (32, 32) and loaded.steps == 3
    control = attnctl.FastAttn(plan=loaded)
    assert attnctl.Control.from_dict(control.to_dict()) == control
    with attnctl.apply(pipe, [control]):
        with pytest.raises(ConfigError, match="4"):
            generate(pipe, "tiny-pixart", steps=4)
        with pytest.raises(ConfigError, match="48x48"):
            generate(pipe, "tiny-pixart", steps=3, height=48, width=48)
        generate(pipe, "tiny-pixart", steps=3)  # the handle stays usable after a mismatch
    other = tiny_cache("tiny-sd")
    with pytest.raises(ConfigError, match="calibrated for PixArtTransformer2DModel"):
        attnctl.apply(other, [control])
    assert "forward" not in other.unet.__dict__


def test_a_plan_runs_only_at_the_timesteps_it_was_calibrated_at(tiny_cache):
    """A plan keyed on the step count alone ran a text-to-image plan of 4 steps on an img2img call running 4 steps
    (strength 0.5 of 8) at other timesteps, silently. A plan records the timesteps of its steps (diffusers' schedule:
    `set_timesteps(n)`, img2img keeping its last `strength * n`) and refuses other ones; the img2img pipeline's own
    plan runs there, and a plan saved before timesteps were recorded checks the count only."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_cache("tiny-sd")
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = dict(image=image, strength=0.5, num_inference_steps=8, output_type="latent")
    control = attnctl.FastAttn(threshold=0.05)
    plan = attnctl.calibrate(control, pipe, "a cat", num_inference_steps=4, **_defaults("tiny-sd"))
    own = attnctl.calibrate(control, i2i, "a cat", generator=torch.Generator().manual_seed(0), **options)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    assert plan.timesteps == tuple(float(t) for t in scheduler.timesteps)
    scheduler.set_timesteps(8)
    assert own.timesteps == tuple(float(t) for t in scheduler.timesteps[4:]) and own.steps == plan.steps == 4
    assert attnctl.FastAttnPlan.from_json(plan.to_json()) == plan
    shown = r"\(" + ", ".join(f"{t:.4g}" for t in own.timesteps) + r"\)"
    with attnctl.apply(i2i, [attnctl.FastAttn(plan=plan)]):
        with pytest.raises(ConfigError, match=f"calibrated at the timesteps .*, but this call runs {shown}"):
            i2i("a cat", generator=torch.Generator().manual_seed(0), **options)
    with attnctl.apply(i2i, [attnctl.FastAttn(plan=own)]):
        i2i("a cat", generator=torch.Generator().manual_seed(0), **options)
    older = attnctl.FastAttnPlan.from_dict({key: value for key, value in plan.to_dict().items() if key != "timesteps"})
    with attnctl.apply(i2i, [attnctl.FastAttn(plan=older)]):
        i2i("a cat", generator=torch.Generator().manual_seed(0), **options)
    with pytest.raises(ConfigError, match=r"FastAttnPlan.timesteps must be None or the timestep \(a number\) of each of its 4 steps"):
        attnctl.FastAttnPlan.from_dict({**plan.to_dict(), "timesteps": [999, 500]})


def test_a_plan_runs_only_with_the_scheduler_it_was_calibrated_with(tiny_cache):
    """A plan calibrated with Euler was accepted on Heun (3 corrector calls the plan never measured, at the same step
    timesteps) and on EulerAncestral (other latents): the timesteps alone do not tell schedulers apart. A plan records
    the scheduler's class and refuses another, naming both; a plan saved before it was recorded runs unchecked, and
    serialises (control dict, hence the renderer's request digest) as it did then."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    pipe = tiny_cache("tiny-sd")
    saved = pipe.scheduler
    try:
        pipe.scheduler = EulerDiscreteScheduler.from_config(saved.config)
        plan = attnctl.calibrate(attnctl.FastAttn(threshold=0.05), pipe, "a cat", num_inference_steps=3, **_defaults("tiny-sd"))
        assert plan.scheduler == "EulerDiscreteScheduler" and plan.to_dict()["scheduler"] == "EulerDiscreteScheduler"
        assert attnctl.FastAttnPlan.from_json(plan.to_json()) == plan
        control = attnctl.FastAttn(plan=plan)
        assert attnctl.Control.from_dict(control.to_dict()) == control
        older = attnctl.FastAttnPlan.from_dict({key: value for key, value in plan.to_dict().items() if key != "scheduler"})
        assert older.scheduler is None and "scheduler" not in attnctl.FastAttn(plan=older).to_dict()["plan"]
        for other in (HeunDiscreteScheduler, EulerAncestralDiscreteScheduler):
            pipe.scheduler = other.from_config(saved.config)
            with attnctl.apply(pipe, [control]):
                with pytest.raises(ConfigError, match=f"calibrated with EulerDiscreteScheduler, but this call runs {other.__name__}"):
                    generate(pipe, "tiny-sd", steps=3)
            with attnctl.apply(pipe, [attnctl.FastAttn(plan=older)]):  # the same step timesteps: the older plan runs
                generate(pipe, "tiny-sd", steps=3)
        pipe.scheduler = EulerDiscreteScheduler.from_config(saved.config)
        with attnctl.apply(pipe, [control]):
            generate(pipe, "tiny-sd", steps=3)
    finally:
        pipe.scheduler = saved
    with pytest.raises(ConfigError, match="FastAttnPlan.scheduler must be None or the scheduler's class name, got 3"):
        attnctl.FastAttnPlan.from_dict({**plan.to_dict(), "scheduler": 3})


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": -0.1}, "threshold"),
    ({"window": -1}, "window"),
    ({"window": (1, 2, 3, 4)}, "window"),  # (1, 2, 3) is a 3-D video window (refused on images at apply)
    ({"window": 2.5}, "window"),
    ({"techniques": ("window",)}, "techniques"),
    ({"techniques": "step_share"}, "techniques"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        attnctl.FastAttn(**kwargs)


def test_plan_validation(tiny_cache):
    pipe = tiny_cache("tiny-pixart")
    with pytest.raises(ConfigError, match="needs an earlier step"):
        make_plan(pipe, 2, {"transformer_blocks.0.attn1": ["step_share", "full"]})
    with pytest.raises(ConfigError, match="unknown method"):
        make_plan(pipe, 2, {"transformer_blocks.0.attn1": ["full", "skip"]})
    plan = make_plan(pipe, 2, {"transformer_blocks.0.attn1": ["full", "window_residual"]})
    with pytest.raises(ConfigError, match="does not allow"):
        attnctl.FastAttn(plan=plan, techniques=("step_share",))
    with pytest.raises(ConfigError, match="differs"):
        attnctl.FastAttn(plan=plan, window=3)
    with pytest.raises(ConfigError, match="JSON"):
        attnctl.FastAttnPlan.from_json("{not json")
    cross = make_plan(pipe, 2, {"transformer_blocks.0.attn2": ["full", "window_residual"]})
    with pytest.raises(ConfigError, match="cross-attention"):
        attnctl.apply(pipe, [attnctl.FastAttn(plan=cross)])


PLAN_FIELDS = {"model": "PixArtTransformer2DModel", "fingerprint": "f", "steps": 4, "resolution": [32, 32], "window": 4,
               "threshold": 0.1}


@pytest.mark.parametrize("methods, match", [
    ({"transformer_blocks.0.attn1": 3}, r"methods\['transformer_blocks.0.attn1'\] must be a list of per-step methods, got 3"),
    ({"transformer_blocks.0.attn1": None}, r"methods\['transformer_blocks.0.attn1'\] must be a list of per-step methods, got None"),
    ({"a": "full"}, r"methods\['a'\] must be a list of per-step methods, got 'full'"),  # not 4 methods 'f', 'u', 'l', 'l'
    ([["a", 3]], r"methods\['a'\] must be a list of per-step methods, got 3"),
    ([["a"]], r"\(layer name, methods per step\) pairs, got \['a'\]"),
    (7, r"FastAttnPlan.methods must be a mapping .* got 7"),
    ("a", r"FastAttnPlan.methods must be a mapping .* got 'a'"),
])
def test_malformed_plan_methods_are_config_errors_naming_the_layer(methods, match):
    """A hand-edited or truncated plan file: a ConfigError naming the layer and the value, never a bare TypeError."""
    with pytest.raises(ConfigError, match=match):
        attnctl.FastAttnPlan.from_json(json.dumps({**PLAN_FIELDS, "methods": methods}))
    with pytest.raises(ConfigError, match=match):
        attnctl.FastAttnPlan(**{**PLAN_FIELDS, "resolution": (32, 32), "methods": methods})
    with pytest.raises(ConfigError, match="FastAttnPlan.model must be a string, got 5"):
        attnctl.FastAttnPlan.from_dict({**PLAN_FIELDS, "model": 5, "methods": {}})


def test_techniques_restrict_the_choices(tiny_cache):
    pipe = tiny_cache("tiny-sd3")
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=10.0, techniques=("cfg_share",)), pipe, "a cat", num_inference_steps=3, **_defaults("tiny-sd3"))
    assert [set(methods[1:]) for _, methods in plan.methods] == [{"cfg_share"}] * len(plan.layers)
    assert all(methods[0] == "full" for _, methods in plan.methods)  # the first step is never compressed


def test_default_layers_follow_the_family_traits_not_its_name():
    """FastAttn reads `text_attention` (cross: self-attention layers by default; joint: every layer), whatever the
    family is called (it used to list four family names)."""
    from attnctl.families.base import ModelAdapter

    class Cross(ModelAdapter):
        text_attention = "cross"

    class Joint(ModelAdapter):
        text_attention = "joint"

    for cls, expected in ((Cross, "self"), (Joint, None)):
        adapter = cls("some-new-family", torch.nn.Linear(1, 1), (), {})
        attnctl.FastAttn().validate_for(adapter)
        assert attnctl.FastAttn().default_layers(adapter) == expected


def test_calibrate_refuses_arguments_the_pipeline_does_not_take_and_empty_prompts(tiny_cache):
    """diffusers swallows an unknown argument into **kwargs: `num_inference_step=2` calibrated a 50-step plan."""
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(attnctl.ConfigError, match="takes no argument.*'num_inference_step'"):
        attnctl.calibrate(attnctl.FastAttn(threshold=0.1), pipe, "a cat", num_inference_step=2)
    with pytest.raises(attnctl.ConfigError, match="non-empty list of prompts"):
        attnctl.calibrate(attnctl.FastAttn(threshold=0.1), pipe, [], num_inference_steps=2)
    assert not any(type(p).__module__.startswith("attnctl") for p in pipe.unet.attn_processors.values())


def test_calibrate_passes_the_prompts_by_name(tiny_cache):
    """Flux2KleinPipeline's first argument is `image`: calibrate passed the prompts there ("Provide either 'prompt'
    or 'prompt_embeds'"); the plan made equals the plan of the calibrating control applied by hand."""
    from attnctl.testing.new_families import available

    if not available("tiny-flux2"):
        pytest.skip("diffusers lacks tiny-flux2")
    pipe = tiny_cache("tiny-flux2")
    options = dict(_defaults("tiny-flux2"), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=0.5), pipe, ["a photo of a cat"], **options)
    with attnctl.apply(pipe, [attnctl.FastAttn(threshold=0.5)]) as handle:
        pipe(prompt=["a photo of a cat"], output_type="latent", **dict(options, generator=torch.Generator().manual_seed(0)))
        by_hand = handle.outputs["fastattn"].plan
    assert plan.methods == by_hand.methods and plan.counts() != {"full": 3 * len(plan.layers)}
    with pytest.raises(attnctl.ConfigError, match="`prompt`"):
        attnctl.calibrate(attnctl.FastAttn(threshold=0.5), pipe, "a cat", prompt="a dog", **options)


def test_setups_that_can_only_run_full_attention_warn_idle(tiny_cache):
    """A window on cross-attention layers only, or a plan of full attention everywhere: bitwise stock, and said so
    (they were silent)."""
    import dataclasses
    import warnings

    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", steps=3)
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=0.1), pipe, "a cat", num_inference_steps=3, height=32, width=32)
    full = dataclasses.replace(plan, methods=tuple((name, ("full",) * len(methods)) for name, methods in plan.methods))
    for control, reason in ((attnctl.FastAttn(threshold=0.1, techniques=("window_residual",), layers="cross"), "every selected layer is cross-attention"),
                            (attnctl.FastAttn(plan=full), "full attention on every layer and step")):
        with attnctl.apply(pipe, [control]):
            with pytest.warns(attnctl.IdleControlWarning, match=reason):
                out = generate(pipe, "tiny-sd", steps=3)
        assert torch.equal(out, stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]):
            generate(pipe, "tiny-sd", steps=3)


def test_a_calibration_stopped_early_makes_no_plan(tiny_cache):
    """A calibration call stopped at step 1 of 4 (a callback setting `pipe._interrupt`, diffusers' way to stop) ran
    the denoiser at steps 0-1 only; calibrate returned a 4-step plan whose steps 2-3 said "full" without having been
    calibrated, which `plan.check` accepts for any 4-step call. It raises, naming the steps that ran; applied
    without a plan, the stopped call's report has no plan. The same call run to its end makes one."""
    pipe = tiny_cache("tiny-sd")

    def stop_after_step_1(pipeline, i, t, kwargs):
        if i == 1:
            pipeline._interrupt = True
        return kwargs

    options = dict(_defaults("tiny-sd"), num_inference_steps=4)
    with pytest.raises(ConfigError, match="ran 2 of its 4 denoising steps"):
        attnctl.calibrate(attnctl.FastAttn(threshold=0.3), pipe, "a cat", callback_on_step_end=stop_after_step_1, **options)
    with attnctl.apply(pipe, [attnctl.FastAttn(threshold=0.3)]) as handle:
        generate(pipe, "tiny-sd", steps=4, callback_on_step_end=stop_after_step_1)
        report = handle.outputs["fastattn"]
        assert report.plan is None and {step for step, _ in report.entries} == {0, 1}
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=0.3), pipe, "a cat", **options)
    assert plan.steps == 4 and "step_share" in plan.counts()


# -- CFG sharing needs uncond rows beside their cond rows in one denoiser call -----------------------------------------
def _idle_messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, attnctl.IdleControlWarning)]


def test_cfg_share_alone_is_refused_where_cfg_never_batches_uncond_with_cond_rows(tiny_cache):
    """The paper's ASC copies a prompt's cond attention to its uncond rows in the same forward (batched CFG). Families
    whose CFG is a separate uncond call (Flux, Chroma, Qwen-Image, Flux.2, Wan true CFG) or absent (guidance-distilled)
    never have both in one call: CFG sharing alone could never act there, so it is refused at apply (it was silently
    bitwise stock), as is a plan that asks for it; batched families take it."""
    from attnctl.errors import UnsupportedError
    from attnctl.families.base import ModelAdapter

    class Separate(ModelAdapter):
        cfg_calls = "separate"

    class Batched(ModelAdapter):
        cfg_calls = "batched"

    alone = attnctl.FastAttn(threshold=10.0, techniques=("cfg_share",))
    with pytest.raises(UnsupportedError, match=r"techniques=\('cfg_share',\)\) can never act on some-family: .*uncond call of its own"):
        alone.validate_for(Separate("some-family", torch.nn.Linear(1, 1), (), {}))
    alone.validate_for(Batched("some-family", torch.nn.Linear(1, 1), (), {}))
    attnctl.FastAttn(threshold=10.0, techniques=("step_share", "cfg_share")).validate_for(Separate("some-family", torch.nn.Linear(1, 1), (), {}))
    # threshold 0 is the documented identity (idle, bitwise stock): accepted as every idle control is
    attnctl.FastAttn(threshold=0.0, techniques=("cfg_share",)).validate_for(Separate("some-family", torch.nn.Linear(1, 1), (), {}))

    pipe = tiny_cache("tiny-flux")
    with pytest.raises(UnsupportedError, match="can never act on flux"):
        attnctl.apply(pipe, [alone])
    only = make_plan(pipe, 2, {"transformer_blocks.0.attn": ["full", "cfg_share"]})
    with pytest.raises(UnsupportedError, match=r"plan's only method besides full attention is cfg_share, which can never act on flux"):
        attnctl.apply(pipe, [attnctl.FastAttn(plan=only)])
    assert not any(type(p).__module__.startswith("attnctl") for p in pipe.transformer.attn_processors.values())
    # beside another method (a hand-made plan: calibration never chooses it here) its steps run full attention: warned
    some = make_plan(pipe, 2, {"transformer_blocks.0.attn": ["full", "cfg_share"], "single_transformer_blocks.0.attn": ["full", "step_share"]})
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=some)]):
        with pytest.warns(attnctl.IdleControlWarning, match=r"FastAttn's 'cfg_share' is idle in this call: .*the flux family never"):
            generate(pipe, "tiny-flux", steps=2, guidance=1.0)


@pytest.mark.parametrize("name, guidance, extra", [
    ("tiny-flux", 1.0, {}),
    ("tiny-flux", 1.0, {"negative_prompt": "a dog", "true_cfg_scale": 3.0}),  # true CFG: a separate uncond call
    ("tiny-sd", 1.0, {}),  # batched CFG, but none in this call
], ids=["flux-distilled", "flux-true-cfg", "sd-no-cfg"])
def test_cfg_share_beside_other_techniques_warns_where_no_row_can_take_it(name, guidance, extra, tiny_cache):
    """CFG sharing asked for beside other techniques in a call with no uncond rows next to their cond rows: the other
    techniques act, calibration never chooses CFG sharing (nor window + CFG sharing, cheaper than the window alone),
    and the handle says that part is idle. The default techniques' fallback (documented) stays quiet."""
    import warnings

    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=3, guidance=guidance, **extra)
    control = attnctl.FastAttn(threshold=10.0, window=1, techniques=("window_residual", "cfg_share"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attnctl.apply(pipe, [control]) as handle:
            out = generate(pipe, name, steps=3, guidance=guidance, **extra)
            plan = handle.outputs["fastattn"].plan
    messages = _idle_messages(caught)
    assert len(messages) == 1 and "'cfg_share' is idle" in messages[0] and "'window_residual' only" in messages[0], messages
    counts = plan.counts()
    assert counts["cfg_share"] == counts["window_residual+cfg_share"] == 0 and counts["window_residual"] > 0, counts
    assert not torch.equal(out, stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        with attnctl.apply(pipe, [attnctl.FastAttn(threshold=10.0)]):  # the default techniques: no warning
            generate(pipe, name, steps=2, guidance=guidance, **extra)


def test_a_plan_of_cfg_sharing_in_a_call_without_cfg_warns(tiny_cache):
    """A plan calibrated with CFG, run without it (guidance 1 on SD): its cfg_share steps run full attention. A plan of
    nothing but CFG sharing is then bitwise stock and idle; beside step sharing, its CFG sharing part is idle. With CFG
    neither warns."""
    import warnings

    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", steps=3, guidance=1.0)
    layers = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.1.attentions.0.transformer_blocks.0.attn1")
    only = make_plan(pipe, 3, {name: ["full", "cfg_share", "cfg_share"] for name in layers})
    some = make_plan(pipe, 3, {layers[0]: ["full", "cfg_share", "cfg_share"], layers[1]: ["full", "step_share", "full"]})
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=only)]):
        with pytest.warns(attnctl.IdleControlWarning, match="FastAttn is idle in this call: its plan's only method .* cfg_share"):
            out = generate(pipe, "tiny-sd", steps=3, guidance=1.0)
    assert torch.equal(out, stock)
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=some)]):
        with pytest.warns(attnctl.IdleControlWarning, match="FastAttn's 'cfg_share' is idle in this call: .* no classifier-free guidance"):
            out = generate(pipe, "tiny-sd", steps=3, guidance=1.0)
    assert not torch.equal(out, stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        for plan in (only, some):
            with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)]):
                generate(pipe, "tiny-sd", steps=3)
