"""Handle life cycle: exact restore, exceptions, one handle per denoiser, things that replace processors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import attnctl
from attnctl.control import Bound, Control
from attnctl.errors import ConfigError, HandleError, PipelineChangedError, UnsupportedError
from attnctl.testing import make_tiny_pipeline

from .helpers import Probe, generate, tiny_sdxl_conditioned

pytestmark = pytest.mark.parity


def _snapshot(pipe, denoiser):
    return (
        {k: v for k, v in denoiser.attn_processors.items()},
        dict(pipe.__dict__),
        dict(denoiser.__dict__),
        dict(pipe.scheduler.__dict__),
    )


def _same(a, b):
    procs_a, pipe_a, den_a, sched_a = a
    procs_b, pipe_b, den_b, sched_b = b
    assert procs_a.keys() == procs_b.keys() and all(procs_a[k] is procs_b[k] for k in procs_a)
    for left, right in ((pipe_a, pipe_b), (den_a, den_b), (sched_a, sched_b)):
        methods_left = {k for k, v in left.items() if _is_method(v)}
        methods_right = {k for k, v in right.items() if _is_method(v)}
        assert methods_left == methods_right, methods_left ^ methods_right
        for key in methods_left:
            assert left[key] is right[key], key


def _is_method(value):
    return callable(value) and not isinstance(value, (torch.nn.Module, type))


@dataclass(frozen=True)
class Explode(Control, type_name="test-explode"):
    """Raises inside the denoiser at a given step."""

    at_step: int = 1

    def bind(self, context):
        return _ExplodeBound(self, context.layers, (0.0, 1.0))


class _ExplodeBound(Bound):
    def edit(self, layer, frame):
        if frame.step.index == self.control.at_step:
            raise RuntimeError("boom")
        return None


def test_remove_restores_exactly_and_is_idempotent():
    pipe = make_tiny_pipeline("tiny-sd")
    before = _snapshot(pipe, pipe.unet)
    handle = attnctl.apply(pipe, [Probe()])
    assert handle.live
    handle.remove()
    handle.remove()
    _same(before, _snapshot(pipe, pipe.unet))
    assert "step" not in pipe.scheduler.__dict__


def test_exception_keeps_handle_live_and_next_call_is_fresh():
    pipe = make_tiny_pipeline("tiny-sd")
    before = _snapshot(pipe, pipe.unet)
    stock = generate(pipe, "tiny-sd", steps=3)
    probe = Probe()
    with pytest.raises(RuntimeError, match="boom"):
        with attnctl.apply(pipe, [probe, Explode(at_step=1)]) as handle:
            with pytest.raises(RuntimeError, match="boom"):
                generate(pipe, "tiny-sd", steps=3)
            assert handle.live
            # the next call starts from fresh state: the explosion is at step 1 again, not carried over
            probe.log.clear()
            generate(pipe, "tiny-sd", steps=3)
    assert not handle.live
    _same(before, _snapshot(pipe, pipe.unet))
    assert torch.equal(generate(pipe, "tiny-sd", steps=3), stock)
    steps_seen = sorted({entry[1] for entry in probe.log if entry[0] != "bind"})
    assert steps_seen == [0, 1]


@dataclass(frozen=True)
class FailingFinish(Control, type_name="test-failing-finish"):
    """A control whose end-of-call work raises."""

    def bind(self, context):
        return _FailingFinishBound(self, context.layers, (0.0, 1.0))


class _FailingFinishBound(Bound):
    def edit(self, layer, frame):
        return None

    def finish(self):
        raise ValueError("finish failed")


def test_a_control_whose_finish_raises_leaves_the_pipeline_restorable():
    """Its error reaches the caller, the other controls still finish, the next call starts clean, and remove()
    restores everything before raising it (remove() raised first and left every processor installed)."""
    pipe = make_tiny_pipeline("tiny-sd")
    before = _snapshot(pipe, pipe.unet)
    stock = generate(pipe, "tiny-sd", steps=2)
    maps = attnctl.AttentionMaps(["cat"])
    handle = attnctl.apply(pipe, [FailingFinish(), maps])
    for _ in range(2):
        with pytest.raises(ValueError, match="finish failed"):
            generate(pipe, "tiny-sd", steps=2)
        assert handle.outputs["attention_maps"] is not None  # the other control finished
    handle.remove()
    _same(before, _snapshot(pipe, pipe.unet))
    assert torch.equal(generate(pipe, "tiny-sd", steps=2), stock)


def test_a_call_that_ended_with_an_error_controls_nothing_after_it():
    """After a controlled call raised mid-loop, the denoiser called outside the pipeline's call (a from_pipe
    pipeline, the user calling pipe.unet) is refused as it is before any call (it ran with the failed call's state)."""
    from diffusers import StableDiffusionPipeline

    pipe = make_tiny_pipeline("tiny-sd")
    other = StableDiffusionPipeline.from_pipe(pipe)

    def stop(*args):
        raise RuntimeError("stop")

    with attnctl.apply(pipe, [attnctl.Reweight({"a": 5.0})]):
        with pytest.raises(RuntimeError, match="stop"):
            generate(pipe, "tiny-sd", steps=3, callback_on_step_end=stop)
        with pytest.raises(HandleError, match="outside a call"):
            generate(other, "tiny-sd", steps=3)
        generate(pipe, "tiny-sd", steps=3)  # the pipeline itself runs on


def _nested_call(p, i, t, kwargs):
    p("a red car", num_inference_steps=1, height=32, width=32, output_type="latent")
    return kwargs


def test_a_callback_that_restarts_the_call_is_refused():
    """A callback that calls the pipeline again finished the outer call's controls mid-loop, and the outer loop then
    failed with a misleading "outside a call" error. It is refused; the next call runs. (A callback's
    `encode_prompt` runs inside the call: tests/test_prompt_switch.py.)"""
    pipe = make_tiny_pipeline("tiny-sd")
    with attnctl.apply(pipe, [Probe()]):
        with pytest.raises(HandleError, match="from inside its own call"):
            generate(pipe, "tiny-sd", steps=3, callback_on_step_end=_nested_call)
        generate(pipe, "tiny-sd", steps=2)


def test_a_second_thread_cannot_call_a_pipeline_in_a_call():
    """Two threads calling one controlled pipeline shared one call's state (the outputs were wrong); the second is
    refused while the first is in its call."""
    import threading

    pipe = make_tiny_pipeline("tiny-sd")
    started, release, errors = threading.Event(), threading.Event(), []

    def wait(p, i, t, kwargs):
        started.set()
        release.wait(30)
        return kwargs

    with attnctl.apply(pipe, [Probe()]):
        first = threading.Thread(target=lambda: generate(pipe, "tiny-sd", steps=2, callback_on_step_end=wait))
        first.start()
        assert started.wait(30)
        try:
            generate(pipe, "tiny-sd", steps=2)
        except HandleError as error:
            errors.append(error)
        finally:
            release.set()
            first.join(60)
    assert errors and "another thread" in str(errors[0])


def test_exception_in_with_block_restores_pipeline():
    pipe = make_tiny_pipeline("tiny-flux")
    before = _snapshot(pipe, pipe.transformer)
    with pytest.raises(RuntimeError, match="boom"):
        with attnctl.apply(pipe, [Explode(at_step=0)]):
            generate(pipe, "tiny-flux")
    _same(before, _snapshot(pipe, pipe.transformer))


def test_one_live_handle_per_denoiser_and_from_pipe():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = make_tiny_pipeline("tiny-sd")
    handle = attnctl.apply(pipe, [])
    with pytest.raises(HandleError, match="already has a live attnctl handle"):
        attnctl.apply(pipe, [])
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    with pytest.raises(HandleError, match="from_pipe"):
        attnctl.apply(other, [])
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(HandleError, match="outside a call of the pipeline"):
        other("a cat", image=image, num_inference_steps=2, output_type="latent")
    handle.remove()
    with attnctl.apply(other, []):
        other("a cat", image=image, num_inference_steps=2, output_type="latent")


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda p: p.unet.set_attn_processor(__import__("diffusers").models.attention_processor.AttnProcessor2_0()), "tiny-sd"),
        (lambda p: p.fuse_qkv_projections(), "tiny-sd"),
        (lambda p: p.transformer.set_attention_backend("_native_math"), "tiny-flux"),
    ],
    ids=["set_attn_processor", "fuse_qkv_projections", "set_attention_backend"],
)
def test_processor_changes_after_apply_are_detected(change, name):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also sets diffusers' process-wide active backend, which reset_attention_backend leaves
    # set: every later test in this process would run stock attention on it. Restore it.
    active = _AttentionBackendRegistry._active_backend
    try:
        pipe = make_tiny_pipeline(name)
        handle = attnctl.apply(pipe, [])
        change(pipe)
        with pytest.raises(PipelineChangedError, match="after attnctl.apply"):
            generate(pipe, name)
        handle.remove()
    finally:
        _AttentionBackendRegistry._active_backend = active  # (set_active_backend is newer than diffusers 0.35)


def test_set_default_attn_processor_is_not_advised_before_apply():
    """set_default_attn_processor installs diffusers' AttnProcessor, which apply refuses: the error at the call must
    not advise making it before apply, and apply's refusal says how to put the default AttnProcessor2_0 back; done,
    the pipeline is stock and controllable again."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = make_tiny_pipeline("tiny-pixart")
    stock = generate(pipe, "tiny-pixart")
    handle = attnctl.apply(pipe, [Probe()])
    pipe.transformer.set_default_attn_processor()
    with pytest.raises(PipelineChangedError, match="set_default_attn_processor installs diffusers' AttnProcessor, which "
                       "attnctl does not reproduce") as error:
        generate(pipe, "tiny-pixart")
    assert "set_default_attn_processor or" not in str(error.value)
    handle.remove()
    with pytest.raises(UnsupportedError, match=r"pipe\.transformer\.set_attn_processor\(AttnProcessor2_0\(\)\)"):
        attnctl.apply(pipe, [Probe()])
    pipe.transformer.set_attn_processor(AttnProcessor2_0())
    with attnctl.apply(pipe, [Probe()]):
        assert torch.equal(generate(pipe, "tiny-pixart"), stock)


def test_apply_after_fusing_under_a_handle_then_remove_and_unfuse():
    """fuse under a live handle (refused at the call), remove(), unfuse: diffusers puts back the processors it saved
    at fuse time, the removed handle's. apply takes them for the stock ones they wrap (it refused them as
    unsupported), and remove() leaves the stock processors."""
    from attnctl.processors.base import ControlledProcessor

    pipe = make_tiny_pipeline("tiny-sd")
    kinds = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    handle = attnctl.apply(pipe, [])
    pipe.fuse_qkv_projections()
    with pytest.raises(PipelineChangedError):
        generate(pipe, "tiny-sd")
    handle.remove()
    pipe.unfuse_qkv_projections()
    stock = generate(pipe, "tiny-sd")  # (unfusing keeps the fused weights' rounding: not bitwise the first output)
    with attnctl.apply(pipe, [Probe()]):
        assert torch.equal(generate(pipe, "tiny-sd"), stock)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == kinds
    assert not any(isinstance(p, ControlledProcessor) for p in pipe.unet.attn_processors.values())


def test_projections_fused_then_unfused_before_apply_are_reproduced():
    """unfuse_qkv_projections leaves the modules' `fused_projections` flag set and AttnProcessor2_0 back, which reads
    to_q / to_k / to_v: the controlled processor follows the stock processor, not the flag (it used to_qkv)."""
    pipe = make_tiny_pipeline("tiny-sd")
    pipe.fuse_qkv_projections()
    pipe.unfuse_qkv_projections()
    stock = generate(pipe, "tiny-sd")
    with attnctl.apply(pipe, [Probe()]):
        assert torch.equal(generate(pipe, "tiny-sd"), stock)


def test_fused_projections_before_apply_are_reproduced():
    pipe = make_tiny_pipeline("tiny-sd")
    pipe.fuse_qkv_projections()
    stock = generate(pipe, "tiny-sd")
    with attnctl.apply(pipe, [Probe()]):
        controlled = generate(pipe, "tiny-sd")
    assert torch.equal(stock, controlled)


@pytest.mark.parametrize("order", ["before", "after"])
def test_model_cpu_offload_before_or_after_apply(order):
    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd")
    if order == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    handle = attnctl.apply(pipe, [Probe()])
    if order == "after":
        pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe, "tiny-sd"), stock)
    handle.remove()
    assert "_hf_hook" in pipe.unet.__dict__  # offload still installed
    assert torch.equal(generate(pipe, "tiny-sd"), stock)
    pipe.remove_all_hooks()
    assert pipe.unet.forward == type(pipe.unet).forward.__get__(pipe.unet)
    assert torch.equal(generate(pipe, "tiny-sd"), stock)


def test_compiled_denoiser_refuses_controls_not_verified_compiled():
    """Compiling is no longer refused as such (tests/test_compose_compile.py); a control that cannot run compiled is,
    at apply or at the first call after compiling. Nothing is traced here (compile is lazy)."""
    pipe = make_tiny_pipeline("tiny-sd")
    unet = pipe.unet
    pipe.unet = torch.compile(unet)
    with pytest.raises(UnsupportedError, match="torch.compile"):
        attnctl.apply(pipe, [attnctl.ToMe()])
    attnctl.apply(pipe, []).remove()
    pipe.unet = unet
    handle = attnctl.apply(pipe, [attnctl.ToMe()])
    unet.compile()
    with pytest.raises(UnsupportedError, match="torch.compile"):
        generate(pipe, "tiny-sd")
    unet._compiled_call_impl = None
    handle.remove()


def test_bad_arguments_leave_pipeline_untouched():
    pipe = make_tiny_pipeline("tiny-sd")
    before = _snapshot(pipe, pipe.unet)
    with pytest.raises(ConfigError, match="backend must be one of"):
        attnctl.apply(pipe, [], backend="fast")
    with pytest.raises(ConfigError, match="takes attnctl controls"):
        attnctl.apply(pipe, ["reweight"])
    with pytest.raises(attnctl.SelectionError, match="matched no attention layer"):
        attnctl.apply(pipe, [Probe(layers="transformer_blocks.3")])
    with pytest.raises(UnsupportedError, match="neither a `unet` nor a `transformer`"):
        attnctl.apply(object(), [])
    _same(before, _snapshot(pipe, pipe.unet))


def test_describe_lists_layers_steps_and_backends():
    pipe = make_tiny_pipeline("tiny-sd")
    with attnctl.apply(pipe, [Probe(layers="self & mid", steps=(0.2, 0.8))]) as handle:
        text = handle.describe()
    assert "Probe: steps 0.2 <= i/n < 0.8, 1 layer(s)" in text
    assert "mid_block.attentions.0.transformer_blocks.0.attn1 (self): sdpa" in text
    assert "no control: 7 layer(s)" in text


def test_a_denoiser_with_a_live_handle_cannot_be_copied_or_pickled():
    """The copy held the handle's runtime (the whole original pipeline), failed every call with a misleading
    message and could not be restored; now the copy is refused, and after remove() it works."""
    import copy
    import pickle

    pipe = make_tiny_pipeline("tiny-sd")
    handle = attnctl.apply(pipe, [Probe()])
    for attempt in (lambda: copy.deepcopy(pipe.unet), lambda: pickle.dumps(pipe.unet)):
        with pytest.raises(HandleError, match="cannot be copied or pickled while the handle is applied"):
            attempt()
    handle.remove()
    copy.deepcopy(pipe.unet)
    pickle.dumps(pipe.unet)


@pytest.mark.parametrize("keeper", ["fuse_then_unfuse", "saved_dict"])
def test_processors_left_by_a_removed_handle_copy_and_pickle_as_the_stock_ones(keeper):
    """diffusers' fuse_qkv_projections saves the processors it finds (attnctl's, under a live handle) and
    unfuse_qkv_projections puts them back after remove(); a library may save `attn_processors` and set them back
    likewise. No handle is live then: the UNet and the pipeline copy and pickle, as stock ones (the copies hold
    the stock processors, not attnctl's), and the copy generates the stock output."""
    import copy
    import pickle

    from attnctl.processors.base import ControlledProcessor

    pipe = make_tiny_pipeline("tiny-sd")
    stock_kinds = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    handle = attnctl.apply(pipe, [Probe()])
    if keeper == "fuse_then_unfuse":
        pipe.fuse_qkv_projections()
        handle.remove()
        pipe.unfuse_qkv_projections()
    else:
        saved = pipe.unet.attn_processors
        handle.remove()
        pipe.unet.set_attn_processor(saved)
    assert all(isinstance(p, ControlledProcessor) for p in pipe.unet.attn_processors.values())
    stock = generate(pipe, "tiny-sd")
    unet = copy.deepcopy(pipe.unet)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == stock_kinds
    again = pickle.loads(pickle.dumps(pipe))
    assert {name: type(p) for name, p in again.unet.attn_processors.items()} == stock_kinds
    again.set_progress_bar_config(disable=True)
    assert torch.equal(generate(again, "tiny-sd"), stock)


def test_a_scheduler_or_image_processor_copied_while_applied_is_stock_and_its_own():
    """A deep copy or pickle of `pipe.scheduler` made while a handle was live kept attnctl's `step` wrapper, bound to
    the original scheduler: a pipeline given the copy stepped the original's state (7.92 off stock, also after
    remove()), and pickling failed with a PicklingError. The copy now holds the class's step, bound to itself."""
    import copy
    import inspect
    import pickle

    from diffusers import StableDiffusionPipeline

    from attnctl.instance import is_attnctl_wrapper

    pipe = make_tiny_pipeline("tiny-sd")
    unet = make_tiny_pipeline("tiny-sd", seed=1).unet
    stock = generate(StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": copy.deepcopy(pipe.scheduler)}), "tiny-sd")
    with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]):  # wraps image_processor.postprocess too
        assert "eta" in inspect.signature(pipe.scheduler.step).parameters  # diffusers reads the step's signature
        images = copy.deepcopy(pipe.image_processor)
        assert not is_attnctl_wrapper(images.postprocess) and images.postprocess.__self__ is images
        for scheduler in (copy.deepcopy(pipe.scheduler), pickle.loads(pickle.dumps(pipe.scheduler))):
            assert not is_attnctl_wrapper(scheduler.step) and scheduler.step.__self__ is scheduler
            pipe.scheduler.set_timesteps(50)  # the original's state, as another call of `pipe` leaves it
            other = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler})
            assert torch.equal(generate(other, "tiny-sd"), stock)
        state = copy.deepcopy(pipe.scheduler.__dict__)  # diffusers' panorama puts a scheduler's state back per view
        assert state["step"] is pipe.scheduler.step


@pytest.mark.parametrize("name", ["StableDiffusionAttendAndExcitePipeline", "StableDiffusionSAGPipeline", "StableDiffusionPanoramaPipeline"])
def test_sd_pipelines_that_set_their_own_processors_or_denoise_views_are_refused(name):
    """diffusers' Attend-and-Excite and SAG pipelines set their own processors during each call (every CFG call failed
    with a handle, and remove() left their processors); the panorama pipeline denoises several views per step from
    copies of the scheduler's state (steps all counted 0: step windows silently idle). Refused at apply, untouched."""
    import diffusers

    base = make_tiny_pipeline("tiny-sd")
    klass = getattr(diffusers, name)
    pipe = klass(**{key: value for key, value in base.components.items() if key in klass._get_signature_keys(klass)[0]})
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(UnsupportedError, match=name):
        attnctl.apply(pipe, [attnctl.Reweight({"cat": 2.0})])
    assert pipe.unet.attn_processors == processors and "step" not in vars(pipe.scheduler)


def test_a_pipeline_without_prompts_and_an_unknown_denoiser_is_told_what_is_supported():
    """Issue #2: an unsupported model raises an error that lists what is supported (an unconditional DDPM pipeline
    has no encode_prompt either; the denoiser is what it is told about)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(UnsupportedError, match="UNet2DModel is not supported; supported: UNet2DConditionModel"):
        attnctl.apply(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), [])


def test_a_live_processor_copies_as_the_stock_one_and_the_denoiser_stays_refused():
    """diffusers' ComponentsManager deep-copies `attn_processors` for its report (`repr`, `get_model_info`): that
    raised while a component was controlled. A live processor copies and pickles as its stock original; a copy of the
    denoiser or the pipeline is still refused."""
    import copy
    import pickle

    pipe = make_tiny_pipeline("tiny-sd")
    stock_kinds = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    with attnctl.apply(pipe, [Probe()]):
        for processors in (copy.deepcopy(pipe.unet.attn_processors), pickle.loads(pickle.dumps(pipe.unet.attn_processors))):
            assert {name: type(p) for name, p in processors.items()} == stock_kinds
        for attempt in (lambda: copy.deepcopy(pipe.unet), lambda: pickle.dumps(pipe), lambda: copy.deepcopy(pipe)):
            with pytest.raises(HandleError, match="cannot be copied or pickled while the handle is applied"):
                attempt()


def test_two_handles_on_pipelines_sharing_a_scheduler_are_removed_in_any_order():
    """Both handles wrap the one scheduler's step: removing the first (under the second's wrapper) takes its wrapper
    out of the stack (it was reported as another library's patch and stayed), and after both the scheduler is
    stock."""
    from diffusers import StableDiffusionPipeline

    first = make_tiny_pipeline("tiny-sd")
    second = StableDiffusionPipeline(**{**first.components, "unet": make_tiny_pipeline("tiny-sd", seed=1).unet})
    second.set_progress_bar_config(disable=True)
    stock = generate(first, "tiny-sd", steps=2), generate(second, "tiny-sd", steps=2)
    handles = attnctl.apply(first, [Probe()]), attnctl.apply(second, [Probe()])
    generate(first, "tiny-sd", steps=2)
    handles[0].remove()
    generate(second, "tiny-sd", steps=2)  # the second handle still counts its steps
    handles[1].remove()
    assert "step" not in first.scheduler.__dict__
    assert torch.equal(generate(first, "tiny-sd", steps=2), stock[0]) and torch.equal(generate(second, "tiny-sd", steps=2), stock[1])


def test_outputs_of_a_call_that_failed_are_missing_not_none():
    """AttentionMaps reserves its slot when it binds: after a call that failed before its end, `handle.outputs[key]`
    raised nothing and gave None; it says the last call failed."""
    from attnctl.handle import MissingOutputError

    pipe = make_tiny_pipeline("tiny-sd")

    def stop(*args):
        raise RuntimeError("stop")

    with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
        with pytest.raises(RuntimeError, match="stop"):
            generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3, callback_on_step_end=stop)
        with pytest.raises(MissingOutputError, match="the last one failed"):
            handle.outputs["attention_maps"]
        generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=2)
        assert handle.outputs["attention_maps"] is not None


def _stop_at(step, error=RuntimeError):
    def callback(pipeline, i, t, kwargs):
        if i == step:
            raise error("stop")
        return kwargs

    return callback


@pytest.mark.parametrize("control, key", [
    (attnctl.AttentionMaps(["cat"]), "attention_maps"),  # publishes when the call finishes
    (attnctl.TGate(gate_step=2), "tgate"),  # the three others publish their report when they bind
    (attnctl.FastAttn(threshold=0.3), "fastattn"),
    (attnctl.ToMe(ratio=0.5), "tome"),
], ids=["maps", "tgate", "fastattn", "tome"])
def test_no_output_of_a_failed_call_is_ever_readable(control, key):
    """After a call failed at step 1 of 4, `handle.outputs[key]` says the last call failed, before and after anything
    that ends that call: a from_pipe sibling's refused call, `remove()`. The reports published at bind showed the
    failed call's partial numbers (TGate: flops_ratio 1.0, 0 hits) and the finishing ones its partial results
    (AttentionMaps: sum 438 against 885 for the call run to its end; FastAttn: a 4-step plan whose steps 2-3 were
    never calibrated)."""
    from diffusers import StableDiffusionPipeline

    from attnctl.handle import MissingOutputError

    pipe = make_tiny_pipeline("tiny-sd")
    other = StableDiffusionPipeline.from_pipe(pipe)
    handle = attnctl.apply(pipe, [control])
    generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4)
    assert handle.outputs[key] is not None
    with pytest.raises(RuntimeError, match="stop"):
        generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4, callback_on_step_end=_stop_at(1))
    with pytest.raises(MissingOutputError, match="the last one failed"):
        handle.outputs[key]
    with pytest.raises(HandleError, match="outside a call"):  # it ends the failed call, whose controls finish
        generate(other, "tiny-sd", prompt="a photo of a cat", steps=4)
    with pytest.raises(MissingOutputError, match="the last one failed"):
        handle.outputs[key]
    with pytest.raises(RuntimeError, match="stop"):
        generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4, callback_on_step_end=_stop_at(1))
    handle.remove()
    with pytest.raises(MissingOutputError, match="the last one failed"):
        handle.outputs[key]


def test_a_with_block_left_by_a_failed_call_publishes_nothing_and_the_next_call_everything():
    """A KeyboardInterrupt at step 1 leaving the with block published the interrupted call's maps as the last
    call's; a call run to its end after a failed one publishes the same maps as on a fresh handle."""
    from attnctl.handle import MissingOutputError

    pipe = make_tiny_pipeline("tiny-sd")
    with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
        generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4)
        fresh = handle.outputs["attention_maps"].maps
    with pytest.raises(KeyboardInterrupt):
        with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
            with pytest.raises(RuntimeError, match="stop"):
                generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4, callback_on_step_end=_stop_at(2))
            generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4)
            assert torch.equal(handle.outputs["attention_maps"].maps, fresh)
            generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=4, callback_on_step_end=_stop_at(1, KeyboardInterrupt))
    with pytest.raises(MissingOutputError, match="the last one failed"):
        handle.outputs["attention_maps"]


def _paused_call(pipe, results, **kwargs):
    """A thread running a controlled call that waits in its first callback until released."""
    import threading

    started, release = threading.Event(), threading.Event()

    def wait(pipeline, i, t, kw):
        if i == 0:
            started.set()
            release.wait(60)
        return kw

    def run():
        try:
            results["call"] = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3, callback_on_step_end=wait, **kwargs)
        except BaseException as error:  # noqa: BLE001 - the test reads it
            results["call"] = error

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    return thread, release


def test_a_pipeline_sharing_the_denoiser_cannot_join_a_call_running_in_another_thread():
    """A from_pipe sibling called from another thread while the controlled call ran joined that call: its denoiser
    calls took the call's steps and controls (sibling 0.10 off stock, the call 0.067 off a call alone); a
    `scheduler.step` of the shared scheduler from there counted as the call's step. Both are refused; the call's
    output and maps are those of the call alone."""
    from diffusers import StableDiffusionPipeline

    pipe = make_tiny_pipeline("tiny-sd")
    other = StableDiffusionPipeline.from_pipe(pipe)
    controls = [attnctl.AttentionMaps(["cat"]), attnctl.PAG(scale=2.0)]
    with attnctl.apply(pipe, controls) as handle:
        alone = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3)
        maps = handle.outputs["attention_maps"].maps
    stock_other = generate(other, "tiny-sd", prompt="a red car on the street", steps=3, seed=9)
    latents = torch.zeros(1, 4, 4, 4)
    with attnctl.apply(pipe, controls) as handle:
        results: dict = {}
        thread, release = _paused_call(pipe, results)
        try:
            with pytest.raises(HandleError, match="in a call in another thread"):
                generate(other, "tiny-sd", prompt="a red car on the street", steps=3, seed=9)
            with pytest.raises(HandleError, match="in a call in another thread"):
                other.scheduler.step(latents, other.scheduler.timesteps[1], latents)
        finally:
            release.set()
            thread.join(60)
        assert torch.equal(results["call"], alone)
        assert torch.equal(handle.outputs["attention_maps"].maps, maps)
        assert torch.equal(generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3), alone)  # the step count is right
    assert torch.equal(generate(other, "tiny-sd", prompt="a red car on the street", steps=3, seed=9), stock_other)


def test_a_pipeline_sharing_the_denoiser_called_from_a_callback_is_refused():
    """A from_pipe sibling called from the controlled call's own callback (same thread) ran inside that call: its
    denoiser calls took the call's controls (0.10 off its stock output). Refused; the controlled call runs on."""
    from diffusers import StableDiffusionPipeline

    pipe = make_tiny_pipeline("tiny-sd")
    other = StableDiffusionPipeline.from_pipe(pipe)
    errors = []

    def callback(pipeline, i, t, kwargs):
        if i == 0:
            try:
                generate(other, "tiny-sd", prompt="a red car on the street", steps=3, seed=9)
            except HandleError as error:
                errors.append(str(error))
        return kwargs

    with attnctl.apply(pipe, [attnctl.PAG(scale=2.0)]):
        alone = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3)
        assert torch.equal(generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3, callback_on_step_end=callback), alone)
    assert errors and "was called from inside a call of the controlled StableDiffusionPipeline" in errors[0]


def test_a_modular_pipeline_sharing_the_denoiser_called_from_a_callback_is_refused():
    """A diffusers ModularPipeline built from the controlled pipeline's components, called from its callback, was not
    recognised as another pipeline: its denoiser calls ran under the running call's controls, silently (0.32 off its
    stock output on Flux) or failing with a misleading CallLayoutError (here). Refused as a from_pipe sibling is."""
    import diffusers

    if not hasattr(diffusers, "ModularPipeline"):
        pytest.skip("this diffusers has no modular pipelines")
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    pipe = make_tiny_pipeline("tiny-sdxl")
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    try:
        modular.update_components(**{k: v for k, v in pipe.components.items() if k in modular._component_specs and v is not None})
    except ValueError as error:  # diffusers before 0.36 takes only components made with ComponentSpec.load()
        pytest.skip(f"this diffusers cannot build a modular pipeline from loaded components: {error}")
    modular.set_progress_bar_config(disable=True)
    errors = []

    def callback(pipeline, i, t, kwargs):
        try:
            modular(prompt="a dog", num_inference_steps=1, height=32, width=32, output="latents")
        except HandleError as error:
            errors.append(str(error))
        return kwargs

    with attnctl.apply(pipe, []):
        generate(pipe, "tiny-sdxl", steps=1, callback_on_step_end=callback)
    assert errors and "a StableDiffusionXLModularPipeline was called from inside a call of the controlled" in errors[0]


def test_remove_during_a_call_is_refused():
    """`handle.remove()` from the running call's callback, or from another thread, ended the call mid-loop: its
    partial maps were published (sum 217 against 885) and the rest of the loop ran stock. Refused, the call runs
    to its end as if nothing had happened, and `remove()` after it restores the pipeline."""
    pipe = make_tiny_pipeline("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3)
    controls = [attnctl.AttentionMaps(["cat"]), attnctl.PAG(scale=2.0)]
    with attnctl.apply(pipe, controls) as handle:
        alone = generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3)
        maps = handle.outputs["attention_maps"].maps
    handle = attnctl.apply(pipe, controls)
    errors = []

    def callback(pipeline, i, t, kwargs):
        if i == 0:
            try:
                handle.remove()
            except HandleError as error:
                errors.append(str(error))
        return kwargs

    assert torch.equal(generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3, callback_on_step_end=callback), alone)
    assert errors and "handle.remove() was called during a call" in errors[0]
    results: dict = {}
    thread, release = _paused_call(pipe, results)
    try:
        with pytest.raises(HandleError, match="during a call"):
            handle.remove()
        with pytest.raises(HandleError, match="during a call"):
            handle.__exit__(RuntimeError, RuntimeError("the with block's error"), None)
    finally:
        release.set()
        thread.join(60)
    assert handle.live and torch.equal(results["call"], alone)
    assert torch.equal(handle.outputs["attention_maps"].maps, maps)
    handle.remove()
    assert torch.equal(generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=3), stock)


def test_a_call_that_returns_before_its_end_hook_publishes_its_outputs(tiny_cache):
    """StableDiffusionXLAdapterPipeline returns early for output_type="latent", before `maybe_free_model_hooks`, where
    attnctl ends a call: `handle.outputs` raised MissingOutputError and the call stayed open. A call whose pipeline
    returned ends when its outputs are read, with the maps of the same call run to its end (output_type="np")."""
    pipe = tiny_sdxl_conditioned(tiny_cache("tiny-sdxl"), "adapter")
    options = dict(prompt="a cat", image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                   num_inference_steps=3, height=32, width=32)
    maps = {}
    with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
        for output_type in ("np", "latent"):
            pipe(**options, output_type=output_type, generator=torch.Generator().manual_seed(0))
            result = handle.outputs["attention_maps"]
            maps[output_type] = result.maps
            assert handle.runtime.call is None and handle.runtime.last_call.finished
        pipe(**options, output_type="latent", generator=torch.Generator().manual_seed(0))
        pipe(**options, output_type="np", generator=torch.Generator().manual_seed(0))  # the returned call ends first
        assert torch.equal(handle.outputs["attention_maps"].maps, maps["np"])
    assert torch.equal(maps["latent"], maps["np"]) and bool(maps["np"].any())


def test_the_with_block_keeps_the_pipelines_own_error():
    """A call failed mid-loop inside `with attnctl.apply(...)` and a control then failed to finish: the pipeline's
    error reaches the caller (the control's one replaced it), the control's becomes a warning, and the pipeline is
    stock again."""
    pipe = make_tiny_pipeline("tiny-sd")
    before = _snapshot(pipe, pipe.unet)

    def stop(*args):
        raise RuntimeError("the pipeline's error")

    with pytest.warns(RuntimeWarning, match="finish failed"):
        with pytest.raises(RuntimeError, match="the pipeline's error"):
            with attnctl.apply(pipe, [FailingFinish()]):
                generate(pipe, "tiny-sd", steps=3, callback_on_step_end=stop)
    _same(before, _snapshot(pipe, pipe.unet))


def test_a_pipeline_without_check_inputs_runs_again_after_a_failed_call():
    """Z-Image's pipelines start a call in encode_prompt: after a call failed mid-loop, the retry's frame could take
    the dead call's address and be taken for it ("encode_prompt during the denoising loop", every retry refused); the
    call's frame is now held and compared by identity."""
    from attnctl.testing import CALL_DEFAULTS
    from attnctl.testing.new_families import available

    if not available("tiny-zimage"):
        pytest.skip("tiny-zimage needs a newer diffusers")
    pipe = make_tiny_pipeline("tiny-zimage")

    def run(**kwargs):
        return pipe("a cat", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **CALL_DEFAULTS["tiny-zimage"], **kwargs)

    def stop(*args):
        raise RuntimeError("stop")

    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 2.0})]):
        for _ in range(5):
            with pytest.raises(RuntimeError, match="stop"):
                run(callback_on_step_end=stop)
            run()


def test_apply_from_a_callback_of_the_running_call_is_refused_clearly():
    """It raised 'the denoiser was called outside a call of the pipeline ... from_pipe' and the call died."""
    pipe = make_tiny_pipeline("tiny-sd")
    errors = []

    def callback(pipeline, step, timestep, kwargs):
        try:
            attnctl.apply(pipeline, [])
        except HandleError as error:
            errors.append(str(error))
        return kwargs

    stock = generate(pipe, "tiny-sd")
    assert torch.equal(generate(pipe, "tiny-sd", callback_on_step_end=callback), stock)
    assert errors and "during a call of this StableDiffusionPipeline (from a callback?)" in errors[0]
    with attnctl.apply(pipe, []):  # nothing was left installed
        assert torch.equal(generate(pipe, "tiny-sd"), stock)



def test_a_handle_keeps_no_tensor_of_a_finished_call():
    """After a call the handle held its last denoiser call's inputs (latents, text embeddings) and every step's
    guidance term (PAG: one latent-sized tensor per step, kept until the next call ended, and after remove())."""
    import gc
    import weakref

    pipe = make_tiny_pipeline("tiny-sd")
    seen: list = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(weakref.ref(t) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)),
        with_kwargs=True,
    )
    outputs: list = []
    pipe.unet.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output[0])))
    try:
        with attnctl.apply(pipe, [attnctl.PAG(scale=2.0)]) as handle:
            held: list = []

            def count_terms(pipeline, step, timestep, kwargs):
                held.append(len(handle.runtime.call.guidance_terms))
                return kwargs

            generate(pipe, "tiny-sd", steps=3, callback_on_step_end=count_terms)
            assert held == [1, 1, 1]  # during the call, the step's own D only
            gc.collect()
            assert seen and outputs and not [ref for ref in seen + outputs if ref() is not None]
            assert handle.runtime.last_call.bound  # what a control reports stays readable
    finally:
        hook.remove()


def test_a_pipeline_dropped_without_remove_is_freed_and_a_live_one_stays_refused():
    """The registry of live handles held each handle strongly, and the handle its pipeline: a pipeline dropped without
    handle.remove() (a notebook cell run again, a Model never released) was never freed."""
    import gc
    import weakref

    pipe = make_tiny_pipeline("tiny-sd")
    attnctl.apply(pipe, [attnctl.PAG(scale=1.0)])  # the handle itself is not kept
    gc.collect()
    with pytest.raises(HandleError, match="already has a live attnctl handle"):
        attnctl.apply(pipe, [])
    generate(pipe, "tiny-sd", steps=1)
    unet = weakref.ref(pipe.unet)
    del pipe
    gc.collect()
    assert unet() is None


def test_a_pipeline_whose_denoiser_was_swapped_keeps_its_handle_reachable_until_removed():
    """After `pipe.unet = other` the old handle's wrappers stay on the pipeline: a second apply was accepted, every call
    still raised, and with the first handle object lost nothing could remove it. The second apply is refused, and
    both errors carry the stale handle (`error.handle.remove()`)."""
    pipe = make_tiny_pipeline("tiny-sd")
    attnctl.apply(pipe, [Probe()])  # the handle object is lost, as in a notebook cell run again
    pipe.unet = make_tiny_pipeline("tiny-sd", seed=1).unet
    with pytest.raises(PipelineChangedError, match="pipe.unet was replaced after attnctl.apply") as changed:
        generate(pipe, "tiny-sd", steps=1)
    with pytest.raises(HandleError, match="still has a live attnctl handle") as refused:
        attnctl.apply(pipe, [])
    assert refused.value.handle is changed.value.handle is not None
    refused.value.handle.remove()
    stock = generate(pipe, "tiny-sd", steps=1)
    with attnctl.apply(pipe, []):
        assert torch.equal(generate(pipe, "tiny-sd", steps=1), stock)


def test_remove_drops_what_the_handle_kept_across_calls():
    """Regions' label masks (and the backends' dense forms of them) stayed in a removed handle's caches while a
    `handle` variable lived; the last call's outputs stay readable."""
    from attnctl.kernels import sdpa

    pipe = make_tiny_pipeline("tiny-flux")
    regions = attnctl.Regions([attnctl.Region("a red cat", box=(0, 0, 0.5, 1)), attnctl.Region("a dog", box=(0.5, 0, 1, 1))])
    handle = attnctl.apply(pipe, [regions, attnctl.AttentionMaps(["cat"])])
    generate(pipe, "tiny-flux", prompt="a red cat and a dog", steps=1)
    assert handle.runtime._handle_caches and len(sdpa._LABEL_DENSE) > 0
    handle.remove()
    import gc

    gc.collect()
    assert not handle.runtime._handle_caches and len(sdpa._LABEL_DENSE) == 0
    assert handle.outputs["attention_maps"].maps.shape[0] == 1


def test_removing_the_last_live_handle_clears_the_backends_module_caches(tiny_cache, monkeypatch):
    """The backends' module caches (sdpa's dense window masks: up to 32 N x N tensors) outlived every handle: the last
    handle.remove() clears them; while another handle is live they stay."""
    import weakref

    from attnctl import handle
    from attnctl.kernels import sdpa

    for registry in ("_LIVE", "_LIVE_PIPELINES"):  # only this test's handles count (not one another test left live)
        monkeypatch.setattr(handle, registry, weakref.WeakKeyDictionary())
    first, second = tiny_cache("tiny-sd"), tiny_cache("tiny-sdxl")
    one, two = attnctl.apply(first, []), attnctl.apply(second, [])
    monkeypatch.setitem(sdpa._WINDOW_DENSE, "test entry", torch.zeros(4, 4))
    one.remove()
    assert "test entry" in sdpa._WINDOW_DENSE  # `two` is live
    two.remove()
    assert not sdpa._WINDOW_DENSE
    two.remove()  # idempotent


def test_encode_prompt_between_calls_keeps_the_last_calls_outputs():
    """Embeddings computed ahead with pipe.encode_prompt between two calls start no pipeline call: the last call's
    outputs stay readable (they were cleared, and handle.outputs said no call had finished)."""
    from attnctl.handle import MissingOutputError

    pipe = make_tiny_pipeline("tiny-sd")
    with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
        generate(pipe, "tiny-sd", prompt="a photo of a cat", steps=1)
        maps = handle.outputs["attention_maps"]
        embeds, negative = pipe.encode_prompt("a photo of a dog", "cpu", 1, True)
        assert handle.outputs["attention_maps"] is maps
        assert embeds.shape[0] == negative.shape[0] == 1
        generate(pipe, "tiny-sd", prompt="a cat", steps=1)
        assert handle.outputs["attention_maps"] is not maps

        def stop(*_):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):  # a failed call's partial maps never read as a call's, encode or not
            generate(pipe, "tiny-sd", prompt="a cat", steps=2, callback_on_step_end=stop)
        pipe.encode_prompt("a photo of a dog", "cpu", 1, True)
        with pytest.raises(MissingOutputError, match="the last one failed"):
            handle.outputs["attention_maps"]
