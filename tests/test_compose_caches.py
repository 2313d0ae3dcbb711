"""diffusers' caches and context parallelism with attnctl (issue #17).

Caches compose in both orders (enable_cache before or after apply gives the same output; with no control the
output is bitwise the cache's own), except where both would cache or capture the same thing: TGate, FastAttn
and AttentionMaps are refused with a cache installed. Tested on tiny-flux (every cache) and on tiny-chroma,
tiny-qwenimage and tiny-wan (FirstBlockCache and PAB), the tiny families whose denoiser has `enable_cache` in
diffusers 0.42 (CacheMixin); UNet, SD3 and PixArt have none (a test names them). Configs a diffusers version
lacks, and caches diffusers itself cannot run on a family, are skipped with the reason.
Context parallelism is refused (docs/context-parallel.md)."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import UnsupportedError
from attnctl.testing import make_tiny_pipeline

from .helpers import generate

diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of a cat"
STEPS = 6


def _config(key, pipe):
    """A config that makes the cache act on tiny-flux in 6 steps; skip (visibly) where diffusers lacks it."""
    makers = {
        "FirstBlockCache": ("FirstBlockCacheConfig", lambda c: c(threshold=1.0)),
        "FasterCache": ("FasterCacheConfig", lambda c: c(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,
        )),
        "TaylorSeerCache": ("TaylorSeerCacheConfig", lambda c: c(cache_interval=2, disable_cache_before_step=1)),
        "MagCache": ("MagCacheConfig", lambda c: c(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5)),
        "PyramidAttentionBroadcast": ("PyramidAttentionBroadcastConfig", lambda c: c(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep,
        )),
    }
    name, make = makers[key]
    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return make(cls)


@pytest.fixture(scope="module")
def flux():
    pipe = make_tiny_pipeline("tiny-flux")
    stock = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    return pipe, stock


CACHES = ["FirstBlockCache", "FasterCache", "TaylorSeerCache", "MagCache", "PyramidAttentionBroadcast"]


@pytest.mark.parametrize("key", CACHES)
def test_cache_composes_with_attnctl_in_both_orders(flux, key):
    pipe, stock = flux
    transformer = pipe.transformer
    control = attnctl.Reweight({"cat": 0.0})
    transformer.enable_cache(_config(key, pipe))
    try:
        cached = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        with attnctl.apply(pipe, []):
            identity = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        with attnctl.apply(pipe, control):  # cache first, attnctl second
            cache_then_attnctl = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
    handle = attnctl.apply(pipe, control)
    transformer.enable_cache(_config(key, pipe))  # attnctl first, cache second
    try:
        attnctl_then_cache = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
        handle.remove()
    assert key == "FirstBlockCache" or not torch.equal(cached, stock)  # the cache acts (FBC: checked below)
    assert torch.equal(identity, cached)  # attnctl without controls: bitwise the cache's output
    assert torch.equal(cache_then_attnctl, attnctl_then_cache)  # the order does not matter
    assert not torch.equal(cache_then_attnctl, cached)  # the control acts under the cache
    assert torch.equal(generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS), stock)  # both undone


def test_first_block_cache_skips_blocks_with_attnctl_applied(flux):
    """FirstBlockCache really skips: the processors of the later blocks run on fewer steps than the first's."""
    pipe, _ = flux
    from .helpers import Probe

    probe = Probe()
    pipe.transformer.enable_cache(_config("FirstBlockCache", pipe))
    try:
        with attnctl.apply(pipe, probe) as handle:
            generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
            first, last = handle.adapter.layers[0].name, handle.adapter.layers[-1].name
    finally:
        pipe.transformer.disable_cache()
    runs = {}
    for entry in probe.log:
        if entry[0] != "bind":
            runs.setdefault(entry[0], set()).add(entry[1])
    assert len(runs[first]) == STEPS and len(runs[last]) < STEPS, runs


@pytest.mark.parametrize("control", [attnctl.FastAttn(), attnctl.AttentionMaps(["cat"]), attnctl.ConsistentSubjects(subject=["cat"])],
                         ids=["FastAttn", "AttentionMaps", "ConsistentSubjects-words"])
@pytest.mark.parametrize("key", ["FasterCache", "PyramidAttentionBroadcast", "FirstBlockCache"])
def test_control_that_would_cache_the_same_thing_is_refused(flux, key, control):
    pipe, stock = flux
    name = type(control).__name__
    pipe.transformer.enable_cache(_config(key, pipe))
    try:
        with pytest.raises(UnsupportedError, match=rf"{name} cannot run with diffusers' .*{key[:10]}"):
            attnctl.apply(pipe, control)
        assert not pipe.transformer._forward_pre_hooks and "encode_prompt" not in pipe.__dict__
    finally:
        pipe.transformer.disable_cache()
    handle = attnctl.apply(pipe, control)
    pipe.transformer.enable_cache(_config(key, pipe))  # after apply: refused at the next call
    try:
        with pytest.raises(UnsupportedError, match=rf"{name} cannot run with diffusers'"):
            generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        pipe.transformer.disable_cache()
        handle.remove()


def test_tgate_with_pyramid_attention_broadcast_is_refused():
    """TGate (UNet, PixArt) and PAB both cache attention outputs: refused (PAB applied with diffusers' hook function
    on tiny-pixart, whose transformer has no enable_cache)."""
    from diffusers.hooks import HookRegistry, apply_pyramid_attention_broadcast

    pipe = make_tiny_pipeline("tiny-pixart")
    config = diffusers.PyramidAttentionBroadcastConfig(  # PixArt's pipeline keeps no current_timestep
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001), current_timestep_callback=lambda: 500
    )
    apply_pyramid_attention_broadcast(pipe.transformer, config)
    with pytest.raises(UnsupportedError, match=r"TGate cannot run with diffusers' PyramidAttentionBroadcast.*both would cache attention"):
        attnctl.apply(pipe, attnctl.TGate(gate_step=1))
    with attnctl.apply(pipe, attnctl.Reweight({"cat": 0.0})):  # a control that does not cache composes
        generate(pipe, "tiny-pixart", prompt=PROMPT, steps=2)
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("pyramid_attention_broadcast", recurse=True)
    with attnctl.apply(pipe, attnctl.TGate(gate_step=1)):
        generate(pipe, "tiny-pixart", prompt=PROMPT, steps=2)


def _fake_context_parallel(denoiser):
    """What enable_parallelism(ContextParallelConfig(...)) leaves on the model and its processors (the real call
    needs an initialised process group with several ranks)."""
    config = diffusers.ParallelConfig(context_parallel_config=diffusers.ContextParallelConfig(ring_degree=2))
    denoiser._parallel_config = config
    return config


def test_context_parallelism_is_refused_at_apply_and_at_every_call():
    if not hasattr(diffusers, "ContextParallelConfig"):
        pytest.skip(f"diffusers {diffusers.__version__} has no ContextParallelConfig")
    pipe = make_tiny_pipeline("tiny-flux")
    _fake_context_parallel(pipe.transformer)
    with pytest.raises(UnsupportedError, match=r"context parallelism \(ParallelConfig, enable_parallelism\).*docs/context-parallel.md"):
        attnctl.apply(pipe, [])
    assert not pipe.transformer._forward_pre_hooks
    pipe.transformer._parallel_config = None
    handle = attnctl.apply(pipe, [])
    _fake_context_parallel(pipe.transformer)
    with pytest.raises(UnsupportedError, match=r"context parallelism"):
        generate(pipe, "tiny-flux", prompt=PROMPT, steps=1)
    pipe.transformer._parallel_config = None
    handle.remove()


# -- the newer families (Chroma, Qwen-Image, Wan have CacheMixin in diffusers 0.42; SD3 and PixArt have not) -------
FAMILY_CACHES = [("tiny-chroma", "PyramidAttentionBroadcast"), ("tiny-chroma", "FirstBlockCache"),
                 ("tiny-qwenimage", "FirstBlockCache"), ("tiny-qwenimage", "PyramidAttentionBroadcast"),
                 ("tiny-wan", "FirstBlockCache"), ("tiny-wan", "PyramidAttentionBroadcast")]
FAMILY_STEPS = 4


def _family_generate(pipe, name):
    from attnctl.testing import CALL_DEFAULTS

    out = pipe(prompt=PROMPT, num_inference_steps=FAMILY_STEPS, guidance_scale=5.0, output_type="latent",
               generator=torch.Generator().manual_seed(0), **CALL_DEFAULTS[name])
    return out.frames if hasattr(out, "frames") else out.images  # Wan returns frames


def _family_config(key, pipe):
    config = _config(key, pipe)
    if key == "FirstBlockCache":
        config.threshold = 1.0  # skips on these random tiny models within 4 steps
    return config


_FAMILY_PIPES = {}


def _family(name):
    if name not in _FAMILY_PIPES:
        pipe = make_tiny_pipeline(name)
        _FAMILY_PIPES[name] = (pipe, _family_generate(pipe, name))
    return _FAMILY_PIPES[name]


@pytest.mark.parametrize("name,key", FAMILY_CACHES, ids=[f"{n}-{k}" for n, k in FAMILY_CACHES])
def test_cache_composes_on_newer_families_in_both_orders(name, key):
    """Same output either order, bitwise the cache's own output with no control, the control acts, all undone.
    A cache that diffusers itself cannot run on the family (without attnctl) is skipped with diffusers' error."""
    pipe, stock = _family(name)
    transformer = pipe.transformer
    control = attnctl.Reweight({"cat": 0.0})
    try:
        transformer.enable_cache(_family_config(key, pipe))
        cached = _family_generate(pipe, name)
    except Exception as error:  # noqa: BLE001 - stock diffusers fails: nothing of attnctl's to test
        if getattr(transformer, "_cache_config", None) is not None:
            transformer.disable_cache()
        pytest.skip(f"diffusers {diffusers.__version__} cannot run {key} on {type(transformer).__name__} without "
                    f"attnctl: {type(error).__name__}: {str(error)[:120]}")
    try:
        with attnctl.apply(pipe, []):
            identity = _family_generate(pipe, name)
        with attnctl.apply(pipe, control):  # cache first, attnctl second
            cache_then_attnctl = _family_generate(pipe, name)
    finally:
        transformer.disable_cache()
    handle = attnctl.apply(pipe, control)
    transformer.enable_cache(_family_config(key, pipe))  # attnctl first, cache second
    try:
        attnctl_then_cache = _family_generate(pipe, name)
    finally:
        transformer.disable_cache()
        handle.remove()
    assert not torch.equal(cached, stock)  # the cache acts
    assert torch.equal(identity, cached)  # attnctl without controls: bitwise the cache's output
    assert torch.equal(cache_then_attnctl, attnctl_then_cache)  # the order does not matter
    assert not torch.equal(cache_then_attnctl, cached)  # the control acts under the cache
    assert torch.equal(_family_generate(pipe, name), stock)  # both undone


@pytest.mark.parametrize("name", ["tiny-chroma", "tiny-qwenimage"])
def test_maps_with_a_cache_are_refused_on_newer_families(name):
    """AttentionMaps would miss the steps a cache skips: refused at apply and, cache enabled after apply, at the call.
    (Wan: no control that caches or captures runs on its video grid, AttentionMaps included, so nothing to refuse.)"""
    pipe, _ = _family(name)
    key = "PyramidAttentionBroadcast"  # runs on all three (FirstBlockCache is not registered for Chroma's blocks)
    pipe.transformer.enable_cache(_family_config(key, pipe))
    try:
        with pytest.raises(UnsupportedError, match=r"AttentionMaps cannot run with diffusers' PyramidAttentionBroadcast"):
            attnctl.apply(pipe, attnctl.AttentionMaps(["cat"]))
        assert not pipe.transformer._forward_pre_hooks
    finally:
        pipe.transformer.disable_cache()
    handle = attnctl.apply(pipe, attnctl.AttentionMaps(["cat"]))
    pipe.transformer.enable_cache(_family_config(key, pipe))
    try:
        with pytest.raises(UnsupportedError, match=r"AttentionMaps cannot run with diffusers'"):
            _family_generate(pipe, name)
    finally:
        pipe.transformer.disable_cache()
        handle.remove()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-pixart"])
def test_families_without_enable_cache_are_named(name):
    """diffusers 0.42 gives these denoisers no enable_cache (no CacheMixin), and their pipelines open no cache_context,
    so the block caches cannot run on them at all; PAB via apply_pyramid_attention_broadcast is covered above on
    PixArt. The test fails the day diffusers adds it, so the README's table can follow."""
    pipe = make_tiny_pipeline(name)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if hasattr(denoiser, "enable_cache"):
        pytest.fail(f"diffusers {diffusers.__version__} gives {type(denoiser).__name__} enable_cache: add {name} to FAMILY_CACHES")


def test_control_for_free_set_with_first_block_cache_in_both_orders(flux):
    """Reweight + Regions + PAG(steps=(0, 0.4)) under FirstBlockCache (the benchmark's "cff+fbc"): PAG's perturbed rows
    come and go with its window, so attnctl keys diffusers' cache state apart for its wider batch
    (foreign_patches.keyed_cache_context). Before, the first step after the window added a residual cached on two rows
    to one row and the next call failed (CallLayoutError: a batch of 2 rows)."""
    pipe, stock = flux

    def controls():
        regions = attnctl.Regions([attnctl.Region("a cat", box=(0.0, 0.0, 0.5, 1.0))], base_ratio=0.2)
        return [attnctl.Reweight({"cat": 2.0}), regions, attnctl.PAG(scale=3.0, steps=(0.0, 0.4))]

    with attnctl.apply(pipe, controls()):
        controlled = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    transformer = pipe.transformer
    transformer.enable_cache(_config("FirstBlockCache", pipe))
    try:
        cached = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        with attnctl.apply(pipe, controls()):  # cache first
            cache_then_attnctl = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
            again = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
    handle = attnctl.apply(pipe, controls())
    transformer.enable_cache(_config("FirstBlockCache", pipe))  # attnctl first
    try:
        attnctl_then_cache = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
        handle.remove()
    assert cache_then_attnctl.shape == stock.shape
    assert torch.equal(cache_then_attnctl, attnctl_then_cache) and torch.equal(cache_then_attnctl, again)
    assert not torch.equal(cache_then_attnctl, cached) and not torch.equal(cache_then_attnctl, controlled)  # both act
    assert torch.equal(generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS), stock)


def test_keyed_cache_context_names_attnctl_batches_apart(flux):
    """While PAG's rows are in the batch, the cache hooks see a context of their own; the pipeline's name comes back."""
    from diffusers.hooks.hooks import StateManager

    pipe, _ = flux
    transformer = pipe.transformer
    transformer.enable_cache(_config("FirstBlockCache", pipe))
    seen = set()

    def spy(module, args):
        for hook in module._diffusers_hook.hooks.values():
            for manager in vars(hook).values():
                if isinstance(manager, StateManager) and manager._context is not None:
                    seen.add(manager._context.name)

    spy_handle = transformer.transformer_blocks[0].register_forward_pre_hook(spy)
    try:
        with attnctl.apply(pipe, attnctl.PAG(scale=3.0, steps=(0.0, 0.4))):
            generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        spy_handle.remove()
        transformer.disable_cache()
    apart = seen - {"cond"}  # PAG's tag is numbered per instance ("pag#<n>")
    assert "cond" in seen and len(apart) == 1 and next(iter(apart)).startswith("cond|attnctl:cond,cond+pag"), seen


@pytest.mark.parametrize("key", ["FasterCache", "TaylorSeerCache", "PyramidAttentionBroadcast"])
def test_edits_limited_to_some_steps_under_attention_caches_are_refused(flux, key):
    """diffusers' attention-output caches reuse a layer's output by schedule, as TGate does: a Reweight or Regions
    window (or weights that change per step) on such a layer is refused, at apply and at the call when the cache is
    enabled after apply (a one-step window fell on reused steps and did nothing; Regions' window crashed under PAB)."""
    pipe, _ = flux
    windowed = [
        attnctl.Reweight({"cat": 0.0}, steps=(0.5, 0.6)),
        attnctl.Reweight({"cat": lambda step: 0.0 if step.index % 2 else 1.0}),
        attnctl.Regions([attnctl.Region("a dog", box=(0.0, 0.0, 0.5, 1.0))], steps=(0.0, 0.5)),
    ]
    pipe.transformer.enable_cache(_config(key, pipe))
    try:
        for control in windowed:
            with pytest.raises(UnsupportedError, match=rf"{type(control).__name__} .*under diffusers' {key[:10]}.*disable_cache"):
                attnctl.apply(pipe, control)
            assert not pipe.transformer._forward_pre_hooks
    finally:
        pipe.transformer.disable_cache()
    handle = attnctl.apply(pipe, windowed[0])
    pipe.transformer.enable_cache(_config(key, pipe))
    try:
        with pytest.raises(UnsupportedError, match="step window"):
            generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        pipe.transformer.disable_cache()
        handle.remove()


def test_pyramid_attention_broadcast_keeps_attnctl_batches_apart(flux):
    """PAB keeps one plain state per attention module (no cache context): PAG's rows, which come and go with its step
    window, get a state of their own per call layout, so PAB never hands a 2-row output to a 1-row call (it failed
    with a batch error on tiny-flux and PixArt); the pipeline's own state is the one PAB holds again after each call."""
    from diffusers.hooks import HookRegistry, apply_pyramid_attention_broadcast

    pipe, _ = flux
    pipe.transformer.enable_cache(_config("PyramidAttentionBroadcast", pipe))
    hook = pipe.transformer.transformer_blocks[0].attn._diffusers_hook.hooks["pyramid_attention_broadcast"]
    own = hook.state

    def fail_in_pags_batch(module, args, kwargs):
        if kwargs.get("hidden_states", args[0] if args else None).shape[0] == 2:
            raise RuntimeError("stopped in PAG's batch")

    try:
        with attnctl.apply(pipe, attnctl.PAG(scale=3.0, steps=(0.0, 0.5))) as handle:
            first = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
            assert hook.state is own
            assert not handle.runtime.last_call.cache_states  # attnctl's states (attention outputs) end with the call
            again = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
            stop = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(fail_in_pags_batch, with_kwargs=True)
            try:
                with pytest.raises(RuntimeError, match="stopped in PAG's batch"):
                    generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
            finally:
                stop.remove()
        assert hook.state is own  # a forward that raised in attnctl's batch gave PAB its state back at remove()
        cached = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        pipe.transformer.disable_cache()
    assert torch.isfinite(first).all() and torch.equal(first, again) and cached.shape == first.shape
    pixart = make_tiny_pipeline("tiny-pixart")
    config = diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001), current_timestep_callback=lambda: 500
    )
    apply_pyramid_attention_broadcast(pixart.transformer, config)
    try:
        with attnctl.apply(pixart, attnctl.PAG(scale=3.0, steps=(0.0, 0.5))):
            assert torch.isfinite(generate(pixart, "tiny-pixart", prompt=PROMPT, steps=STEPS)).all()
    finally:
        HookRegistry.check_if_exists_or_initialize(pixart.transformer).remove_hook("pyramid_attention_broadcast", recurse=True)


def _cache_on_pixart(pipe, key, cross=False):
    """A cache installed with diffusers' hook functions on tiny-pixart or tiny-sd3, whose transformers have no
    enable_cache."""
    from diffusers.hooks import apply_mag_cache, apply_pyramid_attention_broadcast

    if key == "MagCache":
        apply_mag_cache(pipe.transformer, _config(key, pipe))
        return
    cross_range = {"cross_attention_block_skip_range": 2, "cross_attention_timestep_skip_range": (-1, 1001)} if cross else {}
    apply_pyramid_attention_broadcast(pipe.transformer, diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001), current_timestep_callback=lambda: 500,
        **cross_range,
    ))


@pytest.mark.parametrize(("name", "key", "separate"), [
    ("tiny-pixart", "PyramidAttentionBroadcast", False), ("tiny-pixart", "MagCache", False),
    ("tiny-pixart", "PyramidAttentionBroadcast", True), ("tiny-pixart", "MagCache", True),
    ("tiny-sd3", "PyramidAttentionBroadcast", False), ("tiny-sd3", "MagCache", False),
])
def test_caches_without_enable_cache_keep_their_schedule_through_controlled_calls(name, key, separate, caplog):
    """On a denoiser without enable_cache (PixArt) diffusers never resets its cache hooks between calls: PAB counts
    its calls in one plain state (its phase: `iteration % block_skip_range`), MagCache counts the steps per cache context
    (it opens its own, "inference", at its first forward; the step indexes its ratios). With PAG's rows for some steps
    only, attnctl's batches run on states and contexts of their own, while the pipeline's still count every step: two
    equal calls give one image (PAB's phase drifted by PAG's steps, MagCache's first call filed PAG's batch under the
    pipeline's context: 'Dimension mismatch'), the cache-only output after remove() is the one before apply, and
    attnctl's contexts end with the call. With `separate=True` PAG's rows run as an extra pass beside the pipeline's
    call of each step, which the pipeline's state does not count."""
    import logging

    pipe = make_tiny_pipeline(name)
    _cache_on_pixart(pipe, key)
    before = [generate(pipe, name, prompt=PROMPT, steps=STEPS) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="diffusers.hooks.mag_cache"):
        with attnctl.apply(pipe, attnctl.PAG(scale=3.0, steps=(0.0, 0.4), separate=separate)):
            first, second = (generate(pipe, name, prompt=PROMPT, steps=STEPS) for _ in range(2))
    after = generate(pipe, name, prompt=PROMPT, steps=STEPS)
    assert torch.equal(before[0], before[1])
    assert torch.equal(first, second) and not torch.equal(first, before[0])
    assert torch.equal(after, before[0])
    assert "Dimension mismatch" not in caplog.text
    contexts = {name for module in pipe.transformer.modules() for hook in getattr(module.__dict__.get("_diffusers_hook"), "hooks", {}).values()
                for manager in vars(hook).values() for name in getattr(manager, "_state_cache", {})}
    assert not any("attnctl" in name for name in contexts), contexts


@pytest.mark.parametrize(("window", "separate"), [((0.0, 0.4), False), ((0.6, 1.0), False), ((0.0, 1.0), True)],
                         ids=["early", "late", "separate"])
def test_mag_cache_counts_every_step_across_attnctl_contexts(flux, window, separate, monkeypatch):
    """MagCache indexes its calibrated ratios and its retention steps by a step counter kept per cache context. PAG's
    batch runs under a context of its own for the steps of its window; each context still sees the pipeline's step
    (it counted only its own calls: the pipeline's context took step 3 for its step 0), and the next call starts at 0.
    An extra pass beside the pipeline's call (`separate=True`) counts on its own and not into the pipeline's."""
    if not hasattr(diffusers, "MagCacheConfig"):
        pytest.skip(f"diffusers {diffusers.__version__} has no MagCacheConfig")
    from diffusers.hooks import mag_cache

    seen = []
    forward = mag_cache.MagCacheHeadHook.new_forward

    def spy(self, module, *args, **kwargs):
        out = forward(self, module, *args, **kwargs)
        seen.append((self.state_manager.get_state().step_index, "attnctl" in self.state_manager._context.name))
        return out

    monkeypatch.setattr(mag_cache.MagCacheHeadHook, "new_forward", spy)
    pipe, _ = flux
    pipe.transformer.enable_cache(_config("MagCache", pipe))
    try:
        with attnctl.apply(pipe, attnctl.PAG(scale=3.0, steps=window, separate=separate)):
            for _ in range(2):
                generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        pipe.transformer.disable_cache()
    if separate:
        assert seen == [(step, keyed) for step in range(STEPS) for keyed in (False, True)] * 2
    else:
        pag_steps = [step for step in range(STEPS) if window[0] * STEPS <= step < window[1] * STEPS]
        assert seen == [(step, step in pag_steps) for step in range(STEPS)] * 2


def test_cache_hooks_added_after_a_controlled_call_keep_attnctl_batches_apart():
    """diffusers keeps a denoiser's list of child hook registries from its first use (attnctl's first controlled call
    read it) and refreshes it only in enable_cache, which PixArt lacks; attnctl finds the hooks anew at each pipeline
    call, so PAB hooks added after a controlled call, on layers that had none (cross-attention), also give PAG's rows
    a state of their own (they got PAG's batch: a batch size error inside diffusers)."""
    from diffusers.hooks import HookRegistry

    pipe = make_tiny_pipeline("tiny-pixart")
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    _cache_on_pixart(pipe, "PyramidAttentionBroadcast")
    with attnctl.apply(pipe, attnctl.PAG(scale=3.0, steps=(0.0, 0.4))):
        registry.reset_stateful_hooks()
        generate(pipe, "tiny-pixart", prompt=PROMPT, steps=STEPS)
        registry.remove_hook("pyramid_attention_broadcast", recurse=True)
        _cache_on_pixart(pipe, "PyramidAttentionBroadcast", cross=True)
        registry.reset_stateful_hooks()
        out = generate(pipe, "tiny-pixart", prompt=PROMPT, steps=STEPS)
    assert torch.isfinite(out).all()


def test_sea_cache_and_unknown_stateful_hooks_count_as_caches():
    """SeaCache (diffusers 0.42) and any stateful diffusers hook attnctl does not know are caches: the controls that
    need every layer at every step are refused with them (TGate with SeaCache was accepted; compiled, it never hit)."""
    from diffusers.hooks import HookRegistry, ModelHook

    from attnctl.foreign_patches import diffusers_caches

    pipe = make_tiny_pipeline("tiny-wan")
    config = getattr(diffusers, "SeaCacheConfig", None)
    if config is not None:
        pipe.transformer.enable_cache(config(threshold=100.0, retention_steps=1, cache_end_steps=1, max_consecutive_cached=0))
        try:
            assert "SeaCache" in diffusers_caches(pipe.transformer)
            with pytest.raises(UnsupportedError, match="TGate cannot run with diffusers' SeaCache"):
                attnctl.apply(pipe, attnctl.TGate(gate_step=2))
        finally:
            pipe.transformer.disable_cache()

    class FutureCacheHook(ModelHook):
        _is_stateful = True

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer.blocks[0])
    registry.register_hook(FutureCacheHook(), "future_cache_block")
    try:
        with pytest.raises(UnsupportedError, match="'future_cache_block' \\(a stateful diffusers hook, taken for a cache\\)"):
            attnctl.apply(pipe, attnctl.TGate(gate_step=2))
    finally:
        registry.remove_hook("future_cache_block")
    with attnctl.apply(pipe, attnctl.TGate(gate_step=2)):
        pass


def _refused_at_apply(pipe, control, match):
    handle = None
    try:
        with pytest.raises(UnsupportedError, match=match):
            handle = attnctl.apply(pipe, control)
    finally:
        if handle is not None:  # accepted: leave no live handle to the tests after it
            handle.remove()
    assert not pipe.transformer._forward_pre_hooks


def _layouts(probe):
    """(step, tags of the rows) of every call in which the probed layer's attention ran (not reused by the cache)."""
    return {(entry[1], tuple(sorted({(row[2] or "").split("#")[0] for row in entry[3]}))) for entry in probe.log if entry[0] != "bind"}


@pytest.mark.parametrize("control,computed", [
    (attnctl.PAG(scale=3.0, steps=(0.0, 0.4)), {(0, ("", "pag")), (2, ("", "pag")), (3, ("",)), (5, ("",))}),
    (attnctl.SEG(steps=(0.0, 0.4)), {(0, ("", "seg")), (2, ("", "seg")), (3, ("",)), (5, ("",))}),
    (attnctl.SkipLayer(blocks=("single_transformer_blocks.0",)), {(0, ("",)), (1, ("", "skip-layer")), (3, ("",)), (5, ("",))}),
], ids=["PAG-window", "SEG-window", "SkipLayer"])
def test_rows_for_some_steps_under_faster_cache(flux, control, computed):
    """FasterCache (Lv et al. 2024) reuses an attention output inside its timestep range except at every
    `block_skip_range`-th call of a batch (here 2, range t < 901: every step but the first); its state is one per
    batch, and a batch's first call computes (its first call falls on t = 1000, outside the range). PAG's and SEG's
    rows for steps 0-2 of 6, SkipLayer's for step 1 (its window is strict at both ends), get a state of their own
    (`keyed_cache_context`): that state, or the pipeline's own first used after PAG's window, started inside the range
    and FasterCache read its empty cache (TypeError: 'NoneType' object is not subscriptable). Each batch's first call
    now computes, then every second one: the layer runs at those calls only, in both orders."""
    from .helpers import Probe

    pipe, _ = flux
    transformer = pipe.transformer
    probe = Probe(layers=("transformer_blocks.0.attn",))
    transformer.enable_cache(_config("FasterCache", pipe))
    try:
        cached = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        with attnctl.apply(pipe, [probe, control]):  # cache first
            cache_then_attnctl = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
    handle = attnctl.apply(pipe, control)
    transformer.enable_cache(_config("FasterCache", pipe))  # attnctl first
    try:
        attnctl_then_cache = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
        handle.remove()
    assert _layouts(probe) == computed
    assert torch.equal(cache_then_attnctl, attnctl_then_cache) and not torch.equal(cache_then_attnctl, cached)


@pytest.mark.parametrize("key", ["FirstBlockCache", "MagCache"])
def test_skip_layer_on_a_block_cache_boundary_block_is_refused(flux, key):
    """SkipLayer runs a block on the rows that keep it. On the first block of FirstBlockCache / MagCache the hook's
    residual and decision cover the whole batch (FirstBlockCache: IndexError in SkipLayer's merge; MagCache: 'Dimension
    mismatch ... Returning input without residual', the later blocks dropped for the kept rows, no error); on the last
    block the stack's residual of the kept rows was broadcast to the skipping ones. Refused at apply and at the call
    when the cache comes after apply; a block between them still composes."""
    pipe, _ = flux
    transformer = pipe.transformer
    boundary = [attnctl.SkipLayer(blocks=(0,), steps=(0.0, 1.0)),
                attnctl.SkipLayer(blocks=("single_transformer_blocks.1",), steps=(0.0, 1.0))]
    transformer.enable_cache(_config(key, pipe))
    try:
        cached = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        for control, where in zip(boundary, ("transformer_blocks.0", "single_transformer_blocks.1")):
            _refused_at_apply(pipe, control, rf"SkipLayer cannot skip block {where} .*{key}")
        with attnctl.apply(pipe, attnctl.SkipLayer(blocks=("single_transformer_blocks.0",), steps=(0.0, 1.0))):
            between = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
    assert not torch.equal(between, cached)
    with attnctl.apply(pipe, boundary[0]):
        transformer.enable_cache(_config(key, pipe))
        try:
            with pytest.raises(UnsupportedError, match=rf"SkipLayer cannot skip block transformer_blocks.0 .*{key}"):
                generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        finally:
            transformer.disable_cache()


def test_sag_with_a_cache_that_can_leave_its_layer_unrun_is_refused(flux):
    """SAG's mask is the map of its layer at every step. diffusers' attention-output caches (PAB, FasterCache, TaylorSeer)
    reuse that layer's output on some steps, MagCache skips every block including the first, and FirstBlockCache skips
    the blocks after the first: the call failed part-way ('layer ... did not run in this denoiser call'), not naming
    the cache. Refused at apply and at the call when the cache comes after apply, naming it; with SAG's layer in
    FirstBlockCache's first block (tiny-flux's default) SAG acts under the cache."""
    pipe, _ = flux
    transformer = pipe.transformer
    for key in ("PyramidAttentionBroadcast", "FasterCache", "TaylorSeerCache", "MagCache"):
        transformer.enable_cache(_config(key, pipe))
        try:
            _refused_at_apply(pipe, attnctl.SAG(), rf"SAG reads the self-attention map of transformer_blocks.0.attn .*{key[:10]}")
        finally:
            transformer.disable_cache()
    with attnctl.apply(pipe, attnctl.SAG()):
        transformer.enable_cache(_config("PyramidAttentionBroadcast", pipe))
        try:
            with pytest.raises(UnsupportedError, match="SAG reads .*PyramidAttentionBroadcast"):
                generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        finally:
            transformer.disable_cache()
    transformer.enable_cache(_config("FirstBlockCache", pipe))
    try:
        _refused_at_apply(pipe, attnctl.SAG(layer="single_transformer_blocks.0.attn"),
                          r"SAG reads the self-attention map of single_transformer_blocks.0.attn .*FirstBlockCache, which skips "
                          "single_transformer_blocks.0")
        cached = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
        with attnctl.apply(pipe, attnctl.SAG()):
            guided = generate(pipe, "tiny-flux", prompt=PROMPT, steps=STEPS)
    finally:
        transformer.disable_cache()
    assert torch.isfinite(guided).all() and not torch.equal(guided, cached)


def test_faster_cache_skipping_unconditional_rows_is_refused_with_every_control():
    """FasterCache on a model that is not guidance-distilled (PixArt: CFG in one batch) runs the denoiser on the second
    half of the batch on its skip steps, after attnctl laid out the call's rows: PAG's perturbed row was read as the
    cond row (a 1e-4 PAG moved the output 0.73), Reweight failed on a batch of the wrong size. Refused at apply, and
    at the next call when the cache comes after apply; the distilled form (attention cache alone) composes."""
    from diffusers.hooks import FasterCacheConfig, HookRegistry, apply_faster_cache

    pipe = make_tiny_pipeline("tiny-pixart")

    def cache(distilled: bool) -> None:
        apply_faster_cache(pipe.transformer, FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=lambda: 500, attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=distilled, unconditional_batch_skip_range=2,
            unconditional_batch_timestep_skip_range=(-1, 1001), tensor_format="BCHW"))

    def uncache() -> None:
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("faster_cache_denoiser", recurse=True)
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("faster_cache_block", recurse=True)

    cache(False)
    for control in (attnctl.PAG(scale=1e-4), attnctl.Reweight({"cat": 2.0})):
        with pytest.raises(UnsupportedError, match=r"FasterCache on pipe.transformer skips the unconditional rows.*"
                                                   r"remove its hooks .*\('faster_cache_denoiser', 'faster_cache_block'\)"):
            attnctl.apply(pipe, [control])
    # a control no cache composes with is refused for that reason first (the distilled form would not help it)
    with pytest.raises(UnsupportedError, match=r"AttentionMaps cannot run with diffusers' FasterCache"):
        attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])])
    attnctl.apply(pipe, []).remove()  # no control, nothing to refuse
    uncache()
    with attnctl.apply(pipe, [attnctl.PAG(scale=2.0)]):
        cache(False)
        with pytest.raises(UnsupportedError, match="skips the unconditional rows"):
            generate(pipe, "tiny-pixart", prompt="a photo of a cat", steps=2)
        uncache()
        cache(True)
        generate(pipe, "tiny-pixart", prompt="a photo of a cat", steps=2)
    uncache()
