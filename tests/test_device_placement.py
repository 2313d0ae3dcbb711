"""Multi-device placements. A pipeline-level device map (`DiffusionPipeline.from_pretrained(..., device_map="balanced")`)
makes the latents on the pipeline's execution device (its first hooked component's) and runs the denoiser whole on
another: accelerate's hook moves its inputs inside `forward`, after attnctl's pre-hook, so attnctl makes its per-call
tensors on the device the hook names (`Runtime.layer_device`). A denoiser split over devices (`device_map="auto"` on the
model) is refused at apply.

No second device here: the "meta" device stands for the denoiser's GPU (cpu and meta tensors do not mix, as two GPUs'
do not), with the denoiser's weights on it and accelerate's hooks of a device map (a top hook that moves the inputs, one
per submodule); a meta output cannot come back, so the top hook returns zeros of its shape on the inputs' device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnctl
import attnctl.kernels as kernels
from attnctl.control import Bound, Control
from attnctl.testing import make_tiny_pipeline

from .helpers import generate

accelerate_hooks = pytest.importorskip("accelerate.hooks")

PROMPT = "a photo of a cat"
META = torch.device("meta")


@dataclass(frozen=True)
class DeviceProbe(Control, type_name="test-device-probe"):
    """Records the devices attnctl chose: the bind context's, and each denoiser call's."""

    log: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        self.log.append(("bind", context.device, context.input_device))
        return _DeviceProbeBound(self, context.layers, (0.0, 1.0))

    def compile_refusal(self, adapter):
        return None  # no edit: nothing in the graph


class _DeviceProbeBound(Bound):
    def edit(self, layer, frame):
        shape = frame.canvas_shape  # made before a compiled forward, for the layers in its graph
        self.control.log.append(("frame", frame.device, frame.device if shape is None else shape.device))
        return None


class _ZerosBack(accelerate_hooks.AlignDevicesHook):
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        return (torch.zeros(sample.shape, dtype=sample.dtype, device=self.input_device),)


def _place_on_meta(module: torch.nn.Module) -> None:
    """What `from_pretrained(device_map="balanced")` does to a denoiser assigned a device of its own (dispatch_model with
    force_hooks: a top hook that moves the inputs, io_same_device; a hook per submodule), the device being "meta"."""
    module.to(META)
    accelerate_hooks.add_hook_to_module(module, _ZerosBack(execution_device=META, io_same_device=True, place_submodules=True))
    accelerate_hooks.attach_execution_device_hook(module, META)


@pytest.fixture
def meta_backends(monkeypatch):
    """sdpa and reference run on meta tensors (shapes only); attnctl's table lists real devices."""
    for name in ("sdpa", "reference"):
        backend = kernels.BACKENDS[name]
        monkeypatch.setitem(kernels.BACKENDS, name, dataclasses.replace(backend, devices=(*backend.devices, "meta")))


def _reference_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


PLACED_CONTROLS = {
    # a (steps, rows, keys) scale table made at bind, read by every cross-attention layer
    "Reweight": (lambda: attnctl.Reweight({"cat": 0.0}), PROMPT),
    # tables made per layer edit on the frame's device
    "ConsistentSubjects": (lambda: attnctl.ConsistentSubjects(), [PROMPT, PROMPT]),
    # latents put into the denoiser's inputs: on the inputs' device, not the layers'
    "ReferenceAttention": (lambda: attnctl.ReferenceAttention(_reference_image(), region=(0.0, 0.0, 0.5, 1.0)), [PROMPT, PROMPT]),
}


# compiled: Reweight only; an index tensor made on "meta" reaches dynamo as a real meta tensor, which it does not fake
# (a GPU's would be), so ConsistentSubjects' and ReferenceAttention's row indices cannot be traced on this stand-in
@pytest.mark.parametrize("label, compiled", [
    ("Reweight", False), ("Reweight", True), ("ConsistentSubjects", False), ("ReferenceAttention", False),
])
def test_pipeline_device_map_tensors_on_the_denoisers_device(meta_backends, label, compiled):
    make, prompt = PLACED_CONTROLS[label]
    pipe = make_tiny_pipeline("tiny-sd")
    _place_on_meta(pipe.unet)
    probe = DeviceProbe()
    if compiled:
        torch._dynamo.reset()
        pipe.unet.compile(backend="eager")
    try:
        with attnctl.apply(pipe, [make(), probe]):
            out = generate(pipe, "tiny-sd", prompt=prompt, steps=2)
    finally:
        pipe.unet._compiled_call_impl = None
    assert out.device.type == "cpu"  # the pipeline's own latents stay where the pipeline made them
    assert probe.log[0] == ("bind", META, torch.device("cpu"))
    assert {entry[1:] for entry in probe.log[1:]} == {(META, META)}


def test_hook_device_reads_the_denoisers_own_hook():
    pipe = make_tiny_pipeline("tiny-sd")
    _place_on_meta(pipe.unet)
    from attnctl.pipelines.denoiser import hook_device

    assert hook_device(pipe.unet) == META
    assert hook_device(make_tiny_pipeline("tiny-sd").unet) is None


def _untouched(pipe: Any, processors: dict[str, Any]) -> bool:
    unet = pipe.unet
    return not unet._forward_pre_hooks and not unet._forward_hooks and unet.attn_processors == processors


def test_split_denoiser_refused_by_its_hooks():
    """`device_map="auto"` on the model: the top hook runs on the main device, each block's hook on its own."""
    pipe = make_tiny_pipeline("tiny-sd")
    top, block = accelerate_hooks.ModelHook(), accelerate_hooks.ModelHook()
    top.execution_device, block.execution_device = "cpu", META  # accelerate's hooks keep ints or devices; both read
    accelerate_hooks.add_hook_to_module(pipe.unet, top)
    accelerate_hooks.add_hook_to_module(pipe.unet.down_blocks[1], block)
    processors = pipe.unet.attn_processors
    with pytest.raises(attnctl.UnsupportedError, match=r"several devices \(pipe.unet on cpu, meta\).*device_map='balanced'"):
        attnctl.apply(pipe, attnctl.Reweight({"cat": 0.0}))
    assert _untouched(pipe, processors)


def test_split_denoiser_refused_by_its_parameters():
    pipe = make_tiny_pipeline("tiny-sd")
    pipe.unet.down_blocks[1].to(META)
    processors = pipe.unet.attn_processors
    with pytest.raises(attnctl.UnsupportedError, match=r"pipe.unet on cpu, meta"):
        attnctl.apply(pipe)
    assert _untouched(pipe, processors)


def test_a_group_offloaded_expert_counts_at_its_onload_device():
    """diffusers' group offloading keeps an expert's weights on the offload device between uses and loads them onto
    its onload device to run: Wan 2.2 with one expert group-offloaded onto the device where the other one lives runs
    on one device, and is accepted (its resting weights' device is not where it runs). The group hook is a stand-in
    with the attributes diffusers' has (a group with an onload device), "meta" the device both experts run on."""
    from types import SimpleNamespace

    hooks = pytest.importorskip("diffusers.hooks.hooks")
    from attnctl.testing.new_families import tiny_wan22

    try:
        pipe = tiny_wan22()
    except (ImportError, AttributeError) as missing:
        pytest.skip(f"tiny-wan22 needs diffusers >= 0.42: {missing}")

    class GroupOffloadStandIn(hooks.ModelHook):
        group = SimpleNamespace(onload_device=META)

    pipe.transformer_2.to(META)
    for block in pipe.transformer.blocks:  # weights resting on the CPU, run on meta
        hooks.HookRegistry.check_if_exists_or_initialize(block).register_hook(GroupOffloadStandIn(), "group_offloading")
    attnctl.apply(pipe, attnctl.Reweight({"cat": 0.0})).remove()
    GroupOffloadStandIn.group = SimpleNamespace(onload_device=torch.device("cpu"))  # now loaded onto another device
    with pytest.raises(attnctl.UnsupportedError, match=r"pipe.transformer on cpu; pipe.transformer_2 on meta"):
        attnctl.apply(pipe)
