"""The controls of every issue give the same result on the fused backends as on the eager reference.

Triton runs under its interpreter (TRITON_INTERPRET=1, set in conftest) and flex is compiled on the CPU, so
the shapes stay small: tiny SD at 16x16 pixels (64 image tokens), tiny Flux with 8 text tokens.
"""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.kernels import BACKENDS
from attnctl.testing import CALL_DEFAULTS

from .helpers import KernelLaunches

PROMPT = "a red cat on the left"
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _controls(name: str = "tiny-sd"):
    """The controls of each case. Tiny SD's cross-attention puts most of its mass on the 69 padding keys after the
    prompt's 8 tokens: weighting the prompt's words alone moved its latents by 2e-4, the size of the tolerance, so
    its Reweight weights the padding keys too (x3 on every other one; muted under normalize): 3e-2 and 1.5e-2,
    >100x TOL. Flux and SD3 (8 T5 tokens) move by 2e-2 to 3e-2 with the words alone."""
    padding = range(8, 77) if name == "tiny-sd" else range(0)
    regions = [attnctl.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)), attnctl.Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))]
    return {
        "reweight": lambda: [attnctl.Reweight({"red": 6.0, "cat": 0.0, **{p: 3.0 for p in padding[::2]}})],
        "reweight-normalize": lambda: [attnctl.Reweight({"red": 6.0, "cat": 0.0, **{p: 0.0 for p in padding}}, normalize=True)],
        "regions-isolate": lambda: [attnctl.Regions(regions, isolate=True)],
        "pladis": lambda: [attnctl.PLADIS(scale=2.0, alpha=1.5)],
        "pag+maps": lambda: [attnctl.PAG(scale=2.0, layers="self"), attnctl.AttentionMaps(words=("cat",), resolution=8)],
    }


#: The Triton kernels each case's controlled layers launch (PAG's perturbed rows need no attention; maps use hooks).
KERNELS = {"reweight": {"_attn_fwd"}, "reweight-normalize": {"_attn_fwd"}, "regions-isolate": {"_label_attn_fwd"},
           "pladis": {"_sparse_attn_fwd"}, "pag+maps": set()}


def _effect_floor(control: str) -> float:
    """The least max |control - stock| a case must show: 100x TOL's atol for Reweight (its settings are chosen for
    that), 50x for the others (measured 6e-3 to 0.14), so that a backend applying a control at a fraction of its
    strength cannot pass within the tolerance."""
    return (100 if control.startswith("reweight") else 50) * TOL["atol"]


def _generate(pipe, name, backend, controls, **extra):
    options = dict(CALL_DEFAULTS[name])
    options.update(height=16, width=16, **extra)
    with attnctl.apply(pipe, controls, backend=backend):
        return pipe(PROMPT, num_inference_steps=1, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **options).images


CASES = [
    ("tiny-sd", control, {}) for control in _controls()
] + [
    ("tiny-flux", control, {"max_sequence_length": 8}) for control in ("reweight", "regions-isolate", "pladis")
] + [
    ("tiny-sd3", control, {"max_sequence_length": 8}) for control in ("reweight-normalize", "regions-isolate")
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed (or not usable on this device)")
@pytest.mark.parametrize("name, control, extra", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_triton_matches_reference(name, control, extra, tiny_cache, monkeypatch):
    pipe = tiny_cache(name)
    reference = _generate(pipe, name, "reference", _controls(name)[control](), **extra)
    stock = _generate(pipe, name, "auto", [], **extra)
    launches = KernelLaunches(monkeypatch, pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
    try:
        fused = _generate(pipe, name, "triton", _controls(name)[control](), **extra)
    finally:
        launches.remove()
    assert (reference - stock).abs().max() > _effect_floor(control), "the control should change the output"
    torch.testing.assert_close(fused, reference, **TOL)
    launches.check(KERNELS[control])  # the kernels computed it, not SDPA's path for plain calls


@pytest.mark.parametrize("control", ["reweight", "regions-isolate"])
def test_flex_matches_reference(control, tiny_cache):
    pipe = tiny_cache("tiny-sd")
    reference = _generate(pipe, "tiny-sd", "reference", _controls()[control]())
    stock = _generate(pipe, "tiny-sd", "auto", [])
    fused = _generate(pipe, "tiny-sd", "flex", _controls()[control]())
    assert (reference - stock).abs().max() > _effect_floor(control), "the control should change the output"
    torch.testing.assert_close(fused, reference, **TOL)


def test_flex_refuses_pladis_at_apply(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(attnctl.BackendError, match="cannot do sparse, which PLADIS needs"):
        attnctl.apply(pipe, _controls()["pladis"](), backend="flex")
    assert not any(type(p).__module__.startswith("attnctl") for p in pipe.unet.attn_processors.values())


def _window_plan(pipe, name, window):
    from attnctl.controls.fastattn import FastAttnPlan, model_identity
    from attnctl.families import adapter_for

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    model, source, fingerprint = model_identity(denoiser)
    layers = [layer.name for layer in adapter_for(denoiser).layers if layer.kind in ("self", "joint")]
    methods = tuple((layer, ("full", "window_residual")) for layer in layers)
    return FastAttnPlan(model=model, fingerprint=fingerprint, steps=2, resolution=(16, 16), window=window,
                        threshold=0.1, methods=methods, source=source)


WINDOW_CASES = [  # flex once only: every new shape costs a compile on the CPU
    ("triton", "tiny-sd", (1, 1), {}),
    ("triton", "tiny-flux", 5, {"max_sequence_length": 8}),
    ("flex", "tiny-sd", (1, 1), {}),
]


@pytest.mark.parametrize("backend, name, window, extra", WINDOW_CASES, ids=["triton-sd-2d", "triton-flux-band", "flex-sd-2d"])
def test_fastattn_windows_match_reference(backend, name, window, extra, tiny_cache):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available here")
    pipe = tiny_cache(name)
    plan = _window_plan(pipe, name, window)
    options = dict(CALL_DEFAULTS[name])
    options.update(height=16, width=16, **extra)

    def run(backend):
        with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan)], backend=backend) as handle:
            latents = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                           generator=torch.Generator().manual_seed(0), **options).images
            return latents, handle.outputs["fastattn"]

    reference, report = run("reference")
    fused, _ = run(backend)
    assert any(any("window" in ran for ran in entry.ran) for entry in report.entries.values())
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
