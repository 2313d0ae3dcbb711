"""TGATE (Zhang et al. 2024): identities, an independent reference of the reference code's loop, the report."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnctl
from attnctl.controls.tgate import self_action
from attnctl.errors import ConfigError, UnsupportedError

from .helpers import generate

pytestmark = pytest.mark.parity


# -- an independent reference, written from docs/methods.md and the T-GATE repository's `tgate_scheduler` -----------------
def _schedule(step, gate, warm_up, sp, fi):
    """(cross action, self action) per the reference's scheduler; actions: None, "cache", "reuse", "mean"."""
    if step < gate - 1:
        cross = None
        if sp is None or step < warm_up:
            selfa = None
        elif step == warm_up or step % sp == 0:
            selfa = "cache"
        else:
            selfa = "reuse"
    elif step == gate - 1:
        cross, selfa = "mean", ("mean" if fi is not None else None)
    else:
        cross = "reuse"
        selfa = None if fi is None else ("cache" if step % fi == 0 else "reuse")
    return cross, selfa


class _Clock:
    def __init__(self):
        self.step = 0


def _reference_processor(clock, gate, warm_up, sp, fi, cross):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Reference(AttnProcessor2_0):
        cache = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
            action = _schedule(clock.step, gate, warm_up, sp, fi)[0 if cross else 1]
            if action == "reuse" and self.cache is not None:
                return self.cache
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            if action == "cache":
                self.cache = out
            elif action == "mean":
                self.cache = (out.chunk(2)[0] + out.chunk(2)[1]) / 2 if clock.cfg else out
            return out

    return Reference()


def _run_reference(pipe, name, gate, steps, guidance, warm_up=0, sp=None, fi=None, **kwargs):
    """The TGATE loop with stock processors and a hand-written wrapper: one uncond row from step `gate` on."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    clock = _Clock()
    clock.cfg = guidance > 1
    saved = dict(denoiser.attn_processors)
    processors = {}
    for key in saved:
        module = denoiser.get_submodule(key[: -len(".processor")])
        is_cross = module.is_cross_attention
        if is_cross or sp is not None or fi is not None:
            processors[key] = _reference_processor(clock, gate, warm_up, sp, fi, is_cross)
        else:
            processors[key] = saved[key]
    original_forward = denoiser.forward
    original_step = pipe.scheduler.step

    def halve(value, rows):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
            return value[: rows // 2]
        if isinstance(value, dict):
            return {k: halve(v, rows) for k, v in value.items()}
        return value

    def forward(*args, **kw):
        rows = args[0].shape[0] if args else kw["hidden_states"].shape[0]
        if clock.cfg and clock.step >= gate:
            args = tuple(halve(a, rows) for a in args)
            kw = {k: halve(v, rows) for k, v in kw.items()}
            out = original_forward(*args, **kw)
            sample = out[0] if isinstance(out, tuple) else out.sample
            return (torch.cat([sample, sample]),)
        return original_forward(*args, **kw)

    def step(*args, **kw):
        result = original_step(*args, **kw)
        clock.step += 1
        return result

    denoiser.set_attn_processor(processors)
    denoiser.forward = forward
    pipe.scheduler.step = step
    try:
        return generate(pipe, name, steps=steps, guidance=guidance, **kwargs)
    finally:
        del denoiser.forward
        del pipe.scheduler.step
        denoiser.set_attn_processor(saved)


# -- identities -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-pixart"])
@pytest.mark.parametrize("gate", [4, 9])
def test_gate_at_or_beyond_the_steps_is_bitwise_stock(name, gate, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=4)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=gate)]) as handle:
        controlled = generate(pipe, name, steps=4)
        report = handle.outputs["tgate"]
    assert torch.equal(controlled, stock)
    assert report.flops_ratio() == 1.0 and report.hits == 0


@pytest.mark.parametrize("options, words", [
    (dict(gate_step=4, fi_interval=1), ["fi_interval=1", "sp_interval=None"]),
    (dict(gate_step=10, fi_interval=2), ["gate_step=10", "fi_interval=2"]),
    (dict(gate_step=10, sp_interval=5, warm_up=3), ["warm_up=3", "sp_interval=5"]),
], ids=["fi-only", "fi-gate-beyond", "sp-after-the-last-step"])
def test_v2_intervals_that_reuse_no_step_warn_idle_and_stay_stock(options, words, tiny_cache):
    """A gate at or beyond the call's step count with v2 intervals whose schedule (the reference's `_schedule`) reuses no
    self-attention output in the call: bitwise stock, and the handle says so, naming the intervals."""
    pipe = tiny_cache("tiny-sd")
    control = attnctl.TGate(**options)
    assert all(_schedule(i, control.gate_step, control.warm_up, control.sp_interval, control.fi_interval)[1] != "reuse"
               for i in range(4))
    stock = generate(pipe, "tiny-sd", steps=4)
    with pytest.warns(attnctl.IdleControlWarning, match="TGate is idle") as caught:
        with attnctl.apply(pipe, [control]):
            controlled = generate(pipe, "tiny-sd", steps=4)
    assert torch.equal(controlled, stock)
    message = next(str(w.message) for w in caught if issubclass(w.category, attnctl.IdleControlWarning))
    assert all(word in message for word in words), message


def test_a_gate_at_the_last_step_with_self_attention_reuse_acts_and_does_not_warn(tiny_cache):
    """gate_step = steps with sp_interval=5, fi_interval=1 reuses self-attention before the gate (the `tgate`
    package does too: test_tgate_matches_the_tgate_package): not stock, no idle warning."""
    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.IdleControlWarning)
        with attnctl.apply(pipe, [attnctl.TGate(gate_step=6, sp_interval=5, fi_interval=1)]) as handle:
            controlled = generate(pipe, "tiny-sd", steps=6)
    assert (controlled - stock).abs().max() > 1e-3 and handle.outputs["tgate"].hits > 0


# -- against the reference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, guidance, options",
    [
        ("tiny-sd", 5.0, {}),
        ("tiny-sd", 1.0, {}),
        ("tiny-sdxl", 5.0, {}),
        ("tiny-pixart", 4.5, {}),
        ("tiny-sd", 5.0, {"warm_up": 1, "sp": 2, "fi": 2}),
        ("tiny-sd", 1.0, {"warm_up": 0, "sp": 3, "fi": 1}),
    ],
    ids=["sd-cfg", "sd-nocfg", "sdxl-cfg", "pixart-cfg", "sd-v2-reuse", "sd-v2-nocfg"],
)
def test_tgate_matches_the_reference_loop(name, guidance, options, tiny_cache):
    pipe = tiny_cache(name)
    steps, gate = 6, 3
    expected = _run_reference(pipe, name, gate, steps, guidance, **options)
    control = attnctl.TGate(gate_step=gate, warm_up=options.get("warm_up", 2), sp_interval=options.get("sp"), fi_interval=options.get("fi"))
    with attnctl.apply(pipe, [control]) as handle:
        got = generate(pipe, name, steps=steps, guidance=guidance)
        report = handle.outputs["tgate"]
    stock = generate(pipe, name, steps=steps, guidance=guidance)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, stock)  # the reference did change something, so the match means something
    assert report.hits > 0
    cross = [layer.name for layer in handle.adapter.layers if layer.kind == "cross"]
    for step in range(gate, steps):
        assert all(report.entries[(step, layer)].ran == ["cached"] for layer in cross)


@pytest.mark.parametrize("name, module", [("tiny-sd", "SD"), ("tiny-sdxl", "SDXL"), ("tiny-pixart", "PixArt_Alpha")])
@pytest.mark.parametrize("steps, gate, warm_up, sp, fi", [(8, 5, 2, 5, 1), (10, 6, 1, 2, 2), (6, 6, 2, 5, 1)])
def test_tgate_matches_the_tgate_package(name, module, steps, gate, warm_up, sp, fi):
    """The peer's own code: the `tgate` package's pipelines (TGATE v2, its self-attention reuse included) against
    `TGate` with the same settings, bitwise."""
    import importlib

    from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline

    peer = importlib.import_module(f"tgate.{module}")
    prompt = "a photo of a cat"
    theirs = peer.tgate(make_tiny_pipeline(name), prompt, num_inference_steps=steps, guidance_scale=4.5, output_type="latent",
                        generator=torch.Generator().manual_seed(0), gate_step=gate, sp_interval=sp, fi_interval=fi,
                        warm_up=warm_up, **CALL_DEFAULTS[name]).images
    pipe = make_tiny_pipeline(name)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=gate, warm_up=warm_up, sp_interval=sp, fi_interval=fi)]):
        ours = generate(pipe, name, prompt=prompt, steps=steps, guidance=4.5)
    # it acts (with the gate at the last step only a few self-attention outputs are reused: 9e-4 on PixArt)
    assert (theirs - generate(pipe, name, prompt=prompt, steps=steps, guidance=4.5)).abs().max() > 1e-4
    assert torch.equal(ours, theirs)


def test_after_the_gate_one_null_text_row_runs_and_both_rows_get_its_prediction(tiny_cache):
    """Rows of every denoiser call, seen by a probe: [uncond, cond] before the gate, one row per prompt after."""
    from .helpers import Probe

    pipe = tiny_cache("tiny-sdxl")
    probe = Probe(layers="cross")
    seen = []

    def spy(module, args, kwargs, out):
        # attnctl's forward hook runs first: later hooks see the pipeline's rows in the output (the inputs they get
        # are the rows the denoiser runs, one after the gate)
        seen.append((out[0].shape[0], kwargs["encoder_hidden_states"].shape[0], kwargs["added_cond_kwargs"]["text_embeds"].shape[0], out[0].clone()))

    hook = pipe.unet.register_forward_hook(spy, with_kwargs=True)
    try:
        with attnctl.apply(pipe, [probe, attnctl.TGate(gate_step=2)]):
            generate(pipe, "tiny-sdxl", prompt="a cat", steps=4)
    finally:
        hook.remove()
    rows = {entry[1]: entry[3] for entry in probe.log if entry[0] != "bind"}
    assert rows[0] == rows[1] == (("uncond", 0, None), ("cond", 0, None))
    assert rows[2] == rows[3] == (("cond", 0, None),)  # the null-text row, labelled cond for other controls
    assert [s[:3] for s in seen] == [(2, 2, 2)] * 2 + [(2, 1, 1)] * 2  # the pipeline still sees its two rows
    for _, _, _, out in seen[2:]:
        assert torch.equal(out[0], out[1])


# -- configuration and families -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"gate_step": 0}, {"gate_step": 2.5}, {"warm_up": -1}, {"sp_interval": 0}, {"fi_interval": True}])
def test_bad_config_raises(kwargs):
    with pytest.raises(ConfigError):
        attnctl.TGate(**kwargs)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_joint_attention_models_raise_clearly(name, tiny_cache):
    pipe = tiny_cache(name)
    with pytest.raises(UnsupportedError, match="FastAttn"):
        attnctl.apply(pipe, [attnctl.TGate()])
    assert "forward" not in pipe.transformer.__dict__


def test_the_issues_v1_signature_is_the_default_gate(tiny_cache):
    """`TGate(gate_step=10, warm_up=0, sp_interval=None, fi_interval=None)` (the v1 spelling, no warm-up of a reuse
    that is off) is accepted and acts as `TGate(gate_step=...)`; a warm-up that would wait for a reuse is refused."""
    control = attnctl.TGate(gate_step=1, warm_up=0, sp_interval=None, fi_interval=None)
    assert attnctl.Control.from_dict({"type": "tgate", "gate_step": 1, "warm_up": 0}) == control
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [control]):
        issue = generate(pipe, "tiny-sd", steps=2)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=1)]):
        default = generate(pipe, "tiny-sd", steps=2)
    assert torch.equal(issue, default)
    with pytest.raises(ConfigError, match="warm_up=3 does nothing without sp_interval"):
        attnctl.TGate(warm_up=3)


def test_self_layers_need_an_interval(tiny_cache):
    with pytest.raises(ConfigError, match="interval"):
        attnctl.apply(tiny_cache("tiny-sd"), [attnctl.TGate(layers="self")])


def test_round_trip_dict():
    control = attnctl.TGate(gate_step=7, warm_up=2, sp_interval=5, fi_interval=1)
    assert attnctl.Control.from_dict(control.to_dict()) == control


def test_self_schedule_matches_the_reference_scheduler():
    got = [self_action(s, 10, 25, 2, 5, 1) for s in range(14)]
    assert got == ["compute", "compute", "store", "reuse", "reuse", "store", "reuse", "reuse", "reuse", "store_mean",
                   "store", "store", "store", "store"]


def test_report_counts_flops_of_the_dropped_rows(tiny_cache):
    """After the gate: cross-attention costs nothing, self-attention half of the CFG baseline."""
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2)]) as handle:
        generate(pipe, "tiny-sd", steps=4)
        report = handle.outputs["tgate"]
    for layer in handle.adapter.layers:
        before = report.entries[(0, layer.name)]
        after = report.entries[(3, layer.name)]
        assert before.flops == before.full_flops > 0
        assert after.full_flops == before.full_flops
        assert after.flops == (0.0 if layer.kind == "cross" else before.flops / 2)
    assert "cached" in report.table() and report.summary().startswith("tgate")


# -- families whose pipelines run CFG as separate calls (Wan) -----------------------------------------------------
def _wan():
    from attnctl.testing import make_tiny_pipeline
    from attnctl.testing.new_families import NEW_CALL_DEFAULTS, available

    if not available("tiny-wan"):
        pytest.skip("tiny-wan needs diffusers >= 0.42 with WanPipeline")
    return make_tiny_pipeline("tiny-wan"), NEW_CALL_DEFAULTS["tiny-wan"]


def _wan_frames(pipe, options, steps, guidance):
    return pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(0), **options).frames


def _wan_reference(pipe, options, gate, steps, guidance):
    """TGATE written from its definition over Wan's two calls per step (cond, then uncond): at step gate-1 every
    cross-attention layer keeps the mean of its cond and uncond outputs; from step `gate` on it returns that mean, and
    the uncond call's prediction is the cond call's (CFG dropped). Stock processors, forward hooks only."""
    calls = [0]
    cfg = guidance > 1
    means: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    cond_out = {}

    def where():
        per_step = 2 if cfg else 1
        return calls[0] // per_step, ("cond", "uncond")[calls[0] % per_step]

    def cross_hook(name):
        def hook(module, args, out):
            step, branch = where()
            if step == gate - 1:
                if branch == "cond":
                    kept[name] = out
                    means[name] = out
                else:
                    means[name] = (kept[name] + out) / 2
            elif step >= gate:
                return means[name]
        return hook

    def model_hook(module, args, kwargs, out):
        step, branch = where()
        calls[0] += 1
        if step >= gate and branch == "uncond":
            return cond_out["last"]
        cond_out["last"] = out

    handles = [block.attn2.register_forward_hook(cross_hook(f"blocks.{i}")) for i, block in enumerate(pipe.transformer.blocks)]
    handles.append(pipe.transformer.register_forward_hook(model_hook, with_kwargs=True))
    try:
        return _wan_frames(pipe, options, steps, guidance)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "nocfg"])
def test_wan_separate_cfg_calls_match_the_reference(guidance):
    pipe, options = _wan()
    steps, gate = 4, 2
    expected = _wan_reference(pipe, options, gate, steps, guidance)
    stock = _wan_frames(pipe, options, steps, guidance)
    ran = []
    hook = pipe.transformer.blocks[0].register_forward_hook(lambda module, args, out: ran.append(1))
    try:
        with attnctl.apply(pipe, [attnctl.TGate(gate_step=gate)]) as handle:
            got = _wan_frames(pipe, options, steps, guidance)
            report = handle.outputs["tgate"]
    finally:
        hook.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, stock)
    calls_per_step = 2 if guidance > 1 else 1
    assert len(ran) == calls_per_step * gate + (steps - gate)  # after the gate the uncond call does not run
    layers = [layer.name for layer in handle.adapter.layers]
    for step in range(gate, steps):
        for name in layers:
            entry = report.entries[(step, name)]
            assert ("skipped" in entry.ran) == (guidance > 1)
            assert entry.flops <= entry.full_flops / calls_per_step
    assert report.hits > 0
    assert "forward" not in pipe.transformer.__dict__ and not pipe.transformer._diffusers_hook.get_hook("attnctl_reuse_cond_call")
    torch.testing.assert_close(_wan_frames(pipe, options, steps, guidance), stock, rtol=0, atol=0)


def test_wan_gate_at_or_beyond_the_steps_is_bitwise_stock():
    pipe, options = _wan()
    stock = _wan_frames(pipe, options, 3, 5.0)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=3)]):
        assert torch.equal(_wan_frames(pipe, options, 3, 5.0), stock)


def test_wan_uncond_call_without_its_cond_call_raises():
    """The skip needs the step's cond call first (Wan's order): without it, a clear error, and remove() still restores."""
    from attnctl.errors import CallLayoutError

    pipe, options = _wan()
    stock = _wan_frames(pipe, options, 2, 5.0)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=1)]) as handle:

        def forget(module, args, out):  # runs after attnctl's forward hook: as if no cond call had been seen
            handle._hooks._cond_output = None

        hook = pipe.transformer.register_forward_hook(forget)
        try:
            with pytest.raises(CallLayoutError, match="no cond call came before"):
                _wan_frames(pipe, options, 2, 5.0)
        finally:
            hook.remove()
    assert "forward" not in pipe.transformer.__dict__
    assert torch.equal(_wan_frames(pipe, options, 2, 5.0), stock)


def test_wan_tgate_with_pag_keeps_the_guidance_in_the_one_prediction():
    """With PAG, the cond call after the gate returns cond + D (PAG's term); the uncond call returns that, so the
    pipeline's CFG gives cond + D, as batched TGATE gives its selected row's prediction plus D."""
    pipe, options = _wan()
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2)]):
        alone = _wan_frames(pipe, options, 4, 5.0)
    seen = []

    def record(module, args, kwargs, out):
        seen.append(out[0].clone() if isinstance(out, tuple) else out.sample.clone())

    hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)  # after attnctl's hook: what the pipeline gets
    try:
        with attnctl.apply(pipe, [attnctl.TGate(gate_step=2), attnctl.PAG(scale=2.0)]):
            both = _wan_frames(pipe, options, 4, 5.0)
    finally:
        hook.remove()
    assert torch.isfinite(both).all() and not torch.allclose(both, alone)
    assert len(seen) == 8  # two calls a step (PAG's row rides in the cond call's batch); the reused one too
    after_gate = seen[4:]
    assert torch.equal(after_gate[0], after_gate[1]) and torch.equal(after_gate[2], after_gate[3])


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_sags_degraded_pass_does_not_fold_into_the_gate_mean(tiny_cache, monkeypatch, guidance):
    """SAG's extra forward of degraded rows at the step before the gate (uncond rows; cond rows without CFG) is not a
    separate uncond call (Wan): TGATE's stored mean is the main forward's only (it was averaged with SAG's uncond rows,
    or replaced by its degraded cond rows)."""
    from attnctl.controls.caching import BranchCache

    stored = []
    original = BranchCache.store_by_prompt
    monkeypatch.setattr(BranchCache, "store_by_prompt", lambda self, key, prompts, value: (stored.append(key), original(self, key, prompts, value))[1])
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2), attnctl.SAG(steps=(0.0, 1.0))]):
        generate(pipe, "tiny-sd", steps=4, guidance=guidance)
    from attnctl.families import adapter_for

    cross = sum(1 for layer in adapter_for(pipe.unet).layers if layer.kind == "cross")
    assert len(stored) == cross, stored  # one mean per cross-attention layer, from the main forward
