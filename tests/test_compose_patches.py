"""Other libraries' patches (issue #17): instance-level denoiser wrappers (DeepCache, cache-dit), replaced
attention forwards (tgate), swapped block classes (tomesd), changed token counts, and remove() after another
library stacked on attnctl's wrappers."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import CallLayoutError, PipelineChangedError, UnsupportedError
from attnctl.testing import make_tiny_pipeline

from .helpers import generate

PROMPT = "a photo of a cat"
MUTE = {"cat": 0.0}


def _wrap_forward(module):
    """An instance-level forward wrapper taking *args, **kwargs only, as DeepCache and cache-dit install; it
    calls the saved forward and can be undone by restoring it (`orig = m.forward; m.forward = new; m.forward = orig`)."""
    orig = module.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    module.forward = forward
    return orig, calls


def _restore(module, orig):
    module.forward = orig  # what those libraries do on disable: the saved bound method, set back as an attribute


@pytest.fixture(scope="module")
def sd():
    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt=PROMPT)
    with attnctl.apply(pipe, attnctl.Reweight(MUTE)):
        muted = generate(pipe, "tiny-sd", prompt=PROMPT)
    assert not torch.equal(stock, muted)
    return pipe, stock, muted


@pytest.mark.parametrize("order", ["before", "after"])
def test_denoiser_forward_wrapped_by_another_library(sd, order):
    """The call signature comes from the class (the wrapper takes *args, **kwargs), and save/restore of
    `forward` never captures attnctl: both orders give the controlled output, and everything is restored."""
    pipe, stock, muted = sd
    if order == "before":
        orig, calls = _wrap_forward(pipe.unet)
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    if order == "after":
        orig, calls = _wrap_forward(pipe.unet)
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), muted)
    assert calls  # the other library's wrapper ran
    if order == "after":
        _restore(pipe.unet, orig)  # the other library's disable, while attnctl is applied
        assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), muted)
    handle.remove()
    if order == "before":
        assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)
        _restore(pipe.unet, orig)
    del pipe.unet.__dict__["forward"]
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)


def _first_cross_attention(pipe):
    return next((name, m) for name, m in pipe.unet.named_modules() if name.endswith("attn2"))


def test_replaced_attention_forward_is_detected_at_apply_and_at_every_call(sd):
    pipe, stock, _ = sd
    name, module = _first_cross_attention(pipe)
    original = module.forward
    module.forward = lambda *a, **k: original(*a, **k)  # tgate-style: a forward that may bypass the processor
    try:
        with pytest.raises(PipelineChangedError, match=rf"{name}.*instance attribute"):
            attnctl.apply(pipe, attnctl.Reweight(MUTE))
        assert not pipe.unet._forward_pre_hooks and "encode_prompt" not in pipe.__dict__  # untouched
    finally:
        del module.forward
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    module.forward = lambda *a, **k: original(*a, **k)
    try:
        for _ in range(2):  # every call, not only the first
            with pytest.raises(PipelineChangedError, match=rf"forward of attention module {name} was replaced"):
                generate(pipe, "tiny-sd", prompt=PROMPT)
    finally:
        del module.forward
        handle.remove()
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)


def _tome_like(module):
    """tomesd's patch: `module.__class__ = make_tome_block(module.__class__)`, a subclass made outside diffusers."""
    base = type(module)
    module.__class__ = type("ToMeBlock", (base,), {"__module__": "tomesd.patch"})
    return base


def test_swapped_block_class_is_detected_at_apply_and_at_every_call(sd):
    pipe, stock, _ = sd
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    base = _tome_like(block)
    try:
        with pytest.raises(PipelineChangedError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0 has class tomesd\.patch\.ToMeBlock"):
            attnctl.apply(pipe, [])
    finally:
        block.__class__ = base
    handle = attnctl.apply(pipe, [])
    _tome_like(block)
    try:
        for _ in range(2):
            with pytest.raises(PipelineChangedError, match=r"changed class from BasicTransformerBlock to tomesd\.patch\.ToMeBlock"):
                generate(pipe, "tiny-sd", prompt=PROMPT)
    finally:
        block.__class__ = base
        handle.remove()
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)


def _drop_one_token(module, args, kwargs):
    """A pre-hook merging away one query token (what token merging does), invisible to class and forward checks."""
    if args:
        return (args[0][:, :-1], *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, :-1]}


@pytest.mark.parametrize("name, control", [
    ("tiny-sd", attnctl.Reweight(MUTE)),
    ("tiny-sd3", attnctl.Reweight(MUTE)),
    ("tiny-flux", attnctl.Reweight(MUTE)),
    ("tiny-sd", attnctl.TGate(gate_step=1)),  # a reuse hook: checked before anything is cached
])
def test_token_count_other_than_the_geometry_is_an_attnctl_error(tiny_cache, name, control):
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, control) as handle:
        modules = [handle.adapter.modules[layer.name] for layer in handle.runtime.resolved[0]]  # the layers it acts on
        hooks = [m.register_forward_pre_hook(_drop_one_token, with_kwargs=True) for m in modules]
        try:
            with pytest.raises(CallLayoutError, match=r"query tokens, but the denoiser's inputs give"):
                generate(pipe, name, prompt=PROMPT, steps=2)
        finally:
            for hook in hooks:
                hook.remove()


def test_remove_after_another_library_stacked_on_attnctl_wrappers(sd):
    """cache-dit style: a library saves attnctl's wrapper and stacks on it after apply. remove() restores all it
    can, raises naming what it could not, and the wrapper left behind is a pure pass-through (stock output)."""
    pipe, stock, _ = sd
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    ours = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: ours(*a, **k)
    with pytest.raises(PipelineChangedError, match=r"except its wrapper\(s\) of pipe\.encode_prompt.*inert pure pass-throughs"):
        handle.remove()
    assert not handle.live
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())
    assert "check_inputs" not in pipe.__dict__
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)
    handle.remove()  # idempotent, nothing left to report
    again = attnctl.apply(pipe, attnctl.Reweight(MUTE))  # a fresh handle stacks on the leftovers and works
    assert not torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)
    again.remove()
    del pipe.encode_prompt
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)


def test_processor_held_by_another_library_is_inert_after_remove(sd):
    """A library that wrapped attnctl's processor keeps calling it after remove(): it runs the stock processor."""
    pipe, stock, _ = sd
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE), backend="reference")
    name, module = _first_cross_attention(pipe)
    ours = module.processor

    class Holder:
        def __call__(self, *args, **kwargs):
            return ours(*args, **kwargs)

    module.processor = Holder()
    handle.remove()
    assert ours.inert
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)
    module.set_processor(ours.original)


@pytest.mark.parametrize("order", ["before", "after"])
def test_block_forwards_wrapped_by_another_library_are_not_flagged(sd, order):
    """DeepCache wraps the forward of UNet blocks (not attention modules) at instance level: that keeps calling the
    attention processors, so it composes; only attention modules' forwards and swapped classes are refused."""
    pipe, stock, muted = sd
    blocks = [pipe.unet.down_blocks[0], pipe.unet.up_blocks[-1]]
    if order == "before":
        saved = [_wrap_forward(block) for block in blocks]
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    if order == "after":
        saved = [_wrap_forward(block) for block in blocks]
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), muted)
    assert all(calls for _, calls in saved)
    handle.remove()
    for block in blocks:
        del block.__dict__["forward"]
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)


def test_the_deepcache_package_composes_in_both_orders():
    """The DeepCache package itself (installed as the tgate test extra's dependency) on tiny SD: with no control
    attnctl leaves its output bitwise; with Reweight, enabling DeepCache before or after `apply` gives the same
    controlled output (not DeepCache's own); disabled and removed in either order, the pipeline is stock again."""
    from DeepCache import DeepCacheSDHelper

    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt=PROMPT, steps=6)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    cached = generate(pipe, "tiny-sd", prompt=PROMPT, steps=6)
    assert not torch.equal(cached, stock)  # DeepCache skips the deep blocks at some steps
    with attnctl.apply(pipe, []):
        assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT, steps=6), cached)
    with attnctl.apply(pipe, attnctl.Reweight(MUTE)):
        before = generate(pipe, "tiny-sd", prompt=PROMPT, steps=6)
    helper.disable()
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT, steps=6), stock)
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    helper.enable()
    after = generate(pipe, "tiny-sd", prompt=PROMPT, steps=6)
    helper.disable()
    handle.remove()
    assert torch.equal(before, after) and not torch.equal(before, cached)
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT, steps=6), stock)


def test_the_tomesd_and_tgate_packages_patches_are_refused_clearly():
    """The packages themselves: tomesd's class swap and the attention forwards tgate leaves behind are refused at
    `apply` (the pipeline stays as it was) and, when made after `apply`, at the next call; undone, all is stock."""
    import tgate
    import tomesd

    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt=PROMPT)
    processors = dict(pipe.unet.attn_processors)
    tomesd.apply_patch(pipe, ratio=0.5)
    with pytest.raises(PipelineChangedError, match="ToMeBlock"):
        attnctl.apply(pipe, attnctl.Reweight(MUTE))
    assert pipe.unet.attn_processors == processors
    tomesd.remove_patch(pipe)
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    tomesd.apply_patch(pipe, ratio=0.5)
    with pytest.raises(PipelineChangedError, match="ToMeBlock"):
        generate(pipe, "tiny-sd", prompt=PROMPT)
    tomesd.remove_patch(pipe)
    handle.remove()
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)

    gated = make_tiny_pipeline("tiny-sd")
    tgate.SD.tgate(gated, PROMPT, num_inference_steps=2, gate_step=1, output_type="latent", height=32, width=32)
    with pytest.raises(PipelineChangedError, match="forward"):
        attnctl.apply(gated, attnctl.Reweight(MUTE))


@pytest.mark.parametrize("make", [lambda: attnctl.AttentionMaps(["cat"]), lambda: attnctl.TGate(gate_step=4),
                                  lambda: attnctl.PromptToPrompt(),
                                  lambda: attnctl.ConsistentSubjects(subject=["photo"], map_layers="down_blocks")],
                         ids=["maps", "tgate", "p2p", "consistent-words"])
def test_controls_that_need_every_layer_refuse_blocks_another_library_skips(make):
    """DeepCache skips the deep blocks at its cached steps, outside attnctl: a control that needs each of its layers
    at every step (`step_cache_refusal`: maps would miss those layers, P2P's edits and TGate's cache would not be
    applied there) raises at the first such denoiser call, naming the layer and the step; the pipeline is stock after."""
    from DeepCache import DeepCacheSDHelper

    prompts = ["a photo of a cat", "a photo of a dog"]
    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt=prompts, steps=6)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    control = make()
    try:
        with attnctl.apply(pipe, [control]):
            with pytest.raises(UnsupportedError, match=rf"{type(control).__name__} acts on \S+ .*did not run in the unet "
                                                       r"denoiser's call at step 1: .*DeepCache"):
                generate(pipe, "tiny-sd", prompt=prompts, steps=6)
    finally:
        helper.disable()
    assert torch.equal(generate(pipe, "tiny-sd", prompt=prompts, steps=6), stock)


def test_controls_outside_their_steps_or_without_maps_compose_with_deepcache():
    """The skipped-layer check asks only for the layers a control acts on at that step: PromptToPrompt whose windows
    end at step 0 runs through DeepCache's cached steps (and still edits), ConsistentSubjects with box subjects reads
    no maps (no `step_cache_refusal`). An extra forward (SAG's degraded pass) through DeepCache's forward would fill or
    read its feature cache with another batch (a bare torch error at the next cached step, or silently wrong
    features): refused at the first one, naming the wrapper."""
    from DeepCache import DeepCacheSDHelper

    prompts = ["a photo of a cat", "a photo of a dog"]
    pipe = make_tiny_pipeline("tiny-sd")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        cached = generate(pipe, "tiny-sd", prompt=prompts, steps=6)
        for control in (attnctl.PromptToPrompt(cross_steps=0.2, self_steps=0.2),
                        attnctl.ConsistentSubjects(subject=[(0.0, 0.0, 0.5, 1.0)])):
            with attnctl.apply(pipe, [control]):
                out = generate(pipe, "tiny-sd", prompt=prompts, steps=6)
            assert torch.isfinite(out).all() and not torch.equal(out, cached), type(control).__name__
        with attnctl.apply(pipe, [attnctl.SAG()]):
            with pytest.raises(UnsupportedError, match=r"runs the unet denoiser again on 2 rows .* the denoiser's forward is DeepCache's"):
                generate(pipe, "tiny-sd", prompt=prompts, steps=6)
    finally:
        helper.disable()


def test_extra_forwards_pass_through_a_stateless_wrapper_and_refuse_a_block_cache_under_accelerate():
    """A forward wrapper that keeps no state (a user's pass-through) lets SAG's extra forward through unchanged; DeepCache's
    wrapper is found under accelerate's hook too (`_old_forward`, as `enable_model_cpu_offload` stacks it) and refused."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from DeepCache import DeepCacheSDHelper

    pipe = make_tiny_pipeline("tiny-sd")
    with attnctl.apply(pipe, [attnctl.SAG()]):
        plain = generate(pipe, "tiny-sd", prompt=PROMPT)
    original = pipe.unet.forward
    pipe.unet.forward = lambda *args, **kwargs: original(*args, **kwargs)
    try:
        with attnctl.apply(pipe, [attnctl.SAG()]):
            assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), plain)
    finally:
        del pipe.unet.forward
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    add_hook_to_module(pipe.unet, ModelHook())  # accelerate keeps DeepCache's forward as `_old_forward`
    try:
        assert "_old_forward" in pipe.unet.__dict__
        with attnctl.apply(pipe, [attnctl.SAG()]):
            with pytest.raises(UnsupportedError, match=r"the denoiser's forward is DeepCache's"):
                generate(pipe, "tiny-sd", prompt=PROMPT, steps=6)
    finally:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(pipe.unet)
        helper.disable()


def test_a_compiled_denoiser_with_a_block_cache_refuses_controls_that_need_every_layer():
    """Compiled, the edits are made before the forward and attnctl cannot see the blocks DeepCache skips: AttentionMaps
    is refused at apply (and at the next call when DeepCache is enabled after it); Reweight composes."""
    from DeepCache import DeepCacheSDHelper

    pipe = make_tiny_pipeline("tiny-sd")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    pipe.unet.compile()  # lazily: nothing is traced before a call
    try:
        helper.enable()
        with pytest.raises(UnsupportedError, match=r"AttentionMaps cannot run in the compiled pipe.unet, whose forward is DeepCache's"):
            attnctl.apply(pipe, attnctl.AttentionMaps(["cat"]))
        assert not pipe.unet._forward_pre_hooks
        attnctl.apply(pipe, attnctl.Reweight(MUTE)).remove()
        helper.disable()
        handle = attnctl.apply(pipe, attnctl.AttentionMaps(["cat"]))
        helper.enable()
        with pytest.raises(UnsupportedError, match=r"AttentionMaps cannot run in the compiled pipe.unet"):
            generate(pipe, "tiny-sd", prompt=PROMPT)
        helper.disable()
        handle.remove()
    finally:
        pipe.unet._compiled_call_impl = None


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3"])
def test_diffusers_pag_pipelines_are_refused_at_apply(tiny_cache, name):
    """diffusers' PAG pipelines (PAGMixin) swap their own processors in during a call and batch a third, perturbed
    row group: refused at apply, naming the pipeline and attnctl.PAG on the plain pipeline, with nothing installed."""
    from diffusers import AutoPipelineForText2Image

    base = tiny_cache(name)
    pag = AutoPipelineForText2Image.from_pipe(base, enable_pag=True)
    denoiser = base.unet if hasattr(base, "unet") else base.transformer
    before = dict(denoiser.attn_processors)
    with pytest.raises(UnsupportedError, match=f"{type(pag).__name__} is a diffusers PAG pipeline.*attnctl.PAG"):
        attnctl.apply(pag, [])
    assert denoiser.attn_processors == before
    assert not denoiser._forward_pre_hooks and not denoiser._forward_hooks
    assert not {"check_inputs", "encode_prompt", "maybe_free_model_hooks"} & pag.__dict__.keys()
    attnctl.apply(AutoPipelineForText2Image.from_pipe(pag, enable_pag=False), [attnctl.PAG()]).remove()


def test_remove_restores_the_stock_processors_a_failed_pag_call_left(sd):
    """A PAG pipeline sharing the controlled UNet (from_pipe) sets diffusers' PAG processors on its layers, and its
    call fails (the denoiser belongs to the controlled pipeline); diffusers sets the processors it found back only when
    the call completes. remove() puts the stock processors back there too: the shared UNet is stock again."""
    from diffusers import StableDiffusionPAGPipeline

    pipe, stock, _ = sd
    pag = StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    pag_stock = generate(pag, "tiny-sd", prompt=PROMPT, pag_scale=3.0)
    handle = attnctl.apply(pipe, attnctl.Reweight(MUTE))
    with pytest.raises(attnctl.HandleError, match="outside a call of the pipeline it was applied to"):
        generate(pag, "tiny-sd", prompt=PROMPT, pag_scale=3.0)
    assert any(type(p).__name__.startswith("PAG") for p in pipe.unet.attn_processors.values())
    handle.remove()
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert torch.equal(generate(pipe, "tiny-sd", prompt=PROMPT), stock)
    assert torch.equal(generate(pag, "tiny-sd", prompt=PROMPT, pag_scale=3.0), pag_stock)
    attnctl.apply(pipe, []).remove()
