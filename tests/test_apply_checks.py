"""What `attnctl.apply` refuses before installing anything: controls whose effects cannot share a layer, two
controls publishing the same output key, a backend that cannot run on the denoiser's device, what is not a
control. A refused apply leaves the pipeline exactly as it was."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

import attnctl
from attnctl import kernels
from attnctl.control import Bound, Control
from attnctl.errors import BackendError, ConfigError
from attnctl.processors.edit import CONFLICTS, EFFECTS, effect_conflict

from .helpers import Probe, generate


@dataclass(frozen=True)
class Effects(Control, type_name="test-effects"):
    """Declares `effects` on each of its layers and, optionally, an output key; changes nothing."""

    effects: tuple = ()
    layers: Any = None
    output_key: str | None = None

    def layer_effects(self, adapter, layer):
        return self.effects

    def bind(self, context):
        return Bound(self, context.layers, (0.0, 1.0))


@dataclass(frozen=True)
class OtherEffects(Effects, type_name="test-other-effects"):
    pass


def _untouched(pipe) -> bool:
    return (
        all(type(p).__module__.startswith("diffusers") for p in pipe.unet.attn_processors.values())
        and "forward" not in pipe.unet.__dict__
        and "encode_prompt" not in pipe.__dict__
    )


REQUIRED = (
    [("tokens", other) for other in ("labels", "region_tokens", "window", "query", "capture", "cache")]
    + [("sparse", "region_tokens"), ("window", "region_tokens")]
    + [(same, same) for same in ("labels", "window", "sparse", "tokens", "cache", "region_tokens", "region_prompts")]
)


def test_conflict_table_covers_the_required_pairs_and_is_symmetric():
    assert all(a in EFFECTS and b in EFFECTS for a, b, _ in CONFLICTS)
    for a, b in REQUIRED:
        assert effect_conflict(a, b) and effect_conflict(b, a) == effect_conflict(a, b), (a, b)
    assert effect_conflict("value_scale", "labels") is None
    assert effect_conflict("perturb", "tokens") is None
    assert effect_conflict("capture", "capture") is None


@pytest.mark.parametrize(("a", "b"), REQUIRED)
def test_conflicting_effects_on_a_shared_layer_are_refused_at_apply(tiny_cache, a, b):
    pipe = tiny_cache("tiny-sd")
    first = Effects(effects=("value_scale", a), layers="mid & self")
    second = OtherEffects(effects=(b,), layers="self")
    with pytest.raises(ConfigError) as caught:
        attnctl.apply(pipe, [first, second])
    message = str(caught.value)
    assert f"Effects ({a}) and OtherEffects ({b}) cannot share layer mid_block.attentions.0.transformer_blocks.0.attn1" in message
    assert "disjoint layers" in message
    assert _untouched(pipe)


@pytest.mark.parametrize("make, composes, match", [
    (lambda: attnctl.Reweight({"a": 0.0}, steps=(0.5, 1.0)), lambda: attnctl.Reweight({"a": 0.0}), r"steps=\(0\.5, 1\)"),
    (lambda: attnctl.PLADIS(steps=(0.5, 1.0)), lambda: attnctl.PLADIS(), r"steps=\(0\.5, 1\)"),
    (lambda: attnctl.StructuredGuidance(phrases=["a photo"], steps=(0.0, 0.5)),
     lambda: attnctl.StructuredGuidance(phrases=["a photo"]), r"steps=\(0, 0\.5\)"),
    (lambda: attnctl.Reweight({"a": lambda fraction: 0.0 if fraction >= 0.5 else 1.0}), lambda: attnctl.Reweight({"a": 0.5}),
     "change per step"),
    (lambda: attnctl.Reweight({"a": (1.0, 0.0)}), lambda: attnctl.Reweight({"a": (0.5, 0.5)}), "change per step"),
], ids=["reweight", "pladis", "structured", "reweight-callable", "reweight-ramp"])
def test_an_edit_limited_to_some_steps_is_refused_on_a_layer_a_cache_reuses(tiny_cache, make, composes, match):
    """TGate reuses cross-attention outputs from the gate on: an edit whose window starts after it (or whose weights
    change there) was skipped silently (the image was TGate's alone); one that ends before it was carried on. With
    every step and constant weights it composes."""
    pipe = tiny_cache("tiny-sd")
    before = generate(pipe, "tiny-sd", steps=4)
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ConfigError, match=r"cannot share layer .*" + match):
        attnctl.apply(pipe, [attnctl.TGate(gate_step=2), make()])
    assert pipe.unet.attn_processors == processors
    assert generate(pipe, "tiny-sd", steps=4).equal(before)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2), composes()]):
        generate(pipe, "tiny-sd", steps=4)


def test_guidance_windows_compose_with_a_cache_on_their_layers(tiny_cache):
    """PAG's perturbed rows exist only inside its window and the caches key outputs by row tag: nothing is skipped."""
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2, sp_interval=2, layers="self"), attnctl.PAG(steps=(0.5, 1.0), layers="self")]):
        generate(pipe, "tiny-sd", steps=4)


def test_effects_on_disjoint_layers_or_compatible_effects_are_accepted(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [Effects(effects=("tokens",), layers="mid"), OtherEffects(effects=("labels",), layers="down")]):
        pass
    with attnctl.apply(pipe, [Effects(effects=("labels", "capture"), layers="self"), OtherEffects(effects=("value_scale", "perturb"), layers="self")]):
        generate(pipe, "tiny-sd", steps=1)
    assert _untouched(pipe)


def test_one_control_alone_never_conflicts_with_itself(tiny_cache):
    with attnctl.apply(tiny_cache("tiny-sd"), [Effects(effects=("tokens", "window", "cache"))]):
        pass


def test_unknown_effect_names_the_control(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(ConfigError, match=r"Effects.layer_effects gave unknown effect\(s\) 'blur'"):
        attnctl.apply(pipe, [Effects(effects=("blur",))])
    assert _untouched(pipe)


def test_two_controls_publishing_one_output_key_are_refused(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(ConfigError, match=r"Effects and OtherEffects would both publish handle.outputs\['maps'\]"):
        attnctl.apply(pipe, [Effects(output_key="maps"), Probe(), OtherEffects(output_key="maps")])
    assert _untouched(pipe)
    with attnctl.apply(pipe, [Effects(output_key="maps"), OtherEffects(output_key="report"), Effects()]):
        pass


def test_apply_takes_one_control_or_a_list(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    probe = Probe()
    with attnctl.apply(pipe, probe) as handle:
        assert handle.controls == (probe,)
    for wrong in ("pag", 3, {"type": "pag"}, [probe, "pag"]):
        with pytest.raises(ConfigError, match="attnctl.apply takes"):
            attnctl.apply(pipe, wrong)
    assert _untouched(pipe)


def test_explicit_backend_must_run_on_the_denoisers_device(tiny_cache, monkeypatch):
    """Like triton without the interpreter on a CPU pipeline: refused at apply, not at the first call."""
    pipe = tiny_cache("tiny-sd")
    cuda_only = dataclasses.replace(kernels.BACKENDS["reference"], name="flex", devices=("cuda",))
    monkeypatch.setitem(kernels.BACKENDS, "flex", cuda_only)
    with pytest.raises(BackendError, match=r"backend 'flex' cannot run attnctl's layers on the denoiser's device \(cpu\)"):
        attnctl.apply(pipe, [], backend="flex")
    assert _untouched(pipe)
    lse_gap = dataclasses.replace(kernels.BACKENDS["reference"], name="flex", missing_on={"cpu": frozenset({"labels"})})
    monkeypatch.setitem(kernels.BACKENDS, "flex", lse_gap)
    two = [attnctl.Region("a cat", box=(0, 0, 0.5, 1)), attnctl.Region("a dog", box=(0.5, 0, 1, 1))]
    with pytest.raises(BackendError, match="cannot run Regions on the denoiser's device"):
        attnctl.apply(pipe, [attnctl.Regions(two, isolate=True)], backend="flex")  # isolation: label masks
    assert _untouched(pipe)
    # the features come from the declared effects of the layers: region prompts on cross-attention need no labels
    with attnctl.apply(pipe, [attnctl.Regions(two)], backend="flex"):
        pass
    with attnctl.apply(pipe, [Probe()], backend="flex"):  # what the device lacks is not needed here
        pass


def test_the_device_checked_is_the_offload_hooks_execution_device(tiny_cache, monkeypatch):
    """With CPU offload the weights rest on the CPU but the denoiser runs on the hook's execution device."""

    class Hook:  # what accelerate's CpuOffload / AlignDevicesHook expose
        execution_device = "cuda:0"

    pipe = tiny_cache("tiny-sd")
    cpu_only = dataclasses.replace(kernels.BACKENDS["reference"], name="flex", devices=("cpu",))
    monkeypatch.setitem(kernels.BACKENDS, "flex", cpu_only)
    monkeypatch.setattr(pipe.unet, "_hf_hook", Hook(), raising=False)
    with pytest.raises(BackendError, match=r"on the denoiser's device \(cuda:0\)"):
        attnctl.apply(pipe, [], backend="flex")
    assert _untouched(pipe)
