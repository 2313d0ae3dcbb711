"""ControlNet pipelines (diffusers' `StableDiffusionControlNetPipeline` on tiny-sd): apply with no controls and idle
controls is bitwise stock (plain and guess mode); controls that pick or replace rows give the ControlNet residuals
the rows they run for. The expectations are eager hooks on the UNet's inputs, run before attnctl's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl.testing import tiny_sd_controlnet

from .helpers import Probe, generate

PROMPTS = ["a photo of a cat", "a photo of a dog"]  # two prompt rows: a CFG call's rows are [u0, u1, c0, c1]
RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


@pytest.fixture(scope="module")
def pipe(tiny_cache):
    return tiny_sd_controlnet(tiny_cache("tiny-sd"), seed=1)


def condition() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def run(pipe, steps=2, **kwargs):
    return generate(pipe, "tiny-sd", PROMPTS, steps=steps, image=condition(), **kwargs)


class _ResidualHook:
    """A forward pre-hook on the UNet, ahead of attnctl's: at the UNet calls in `calls` (one call per step here), the
    rows `targets` of every ControlNet residual become `change(residual, targets)`."""

    def __init__(self, unet, calls, targets, change):
        self.calls, self.targets, self.change, self.count = set(calls), list(targets), change, 0
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True, prepend=True)

    def __call__(self, module, args, kwargs):
        number, self.count = self.count, self.count + 1
        if number not in self.calls:
            return None
        kwargs = dict(kwargs)
        for name in RESIDUALS:
            value = kwargs[name]
            if isinstance(value, (list, tuple)):
                kwargs[name] = type(value)(self.change(v, self.targets) for v in value)
            else:
                kwargs[name] = self.change(value, self.targets)
        return args, kwargs


def _from_cond(residual, targets):
    """The uncond rows' residuals replaced by the cond rows' of the same prompt."""
    changed = residual.clone()
    changed[targets] = residual[[i + len(PROMPTS) for i in targets]]
    return changed


def _zeroed(residual, targets):
    changed = residual.clone()
    changed[targets] = 0
    return changed


@pytest.mark.parametrize("guess_mode", [False, True])
def test_empty_and_idle_apply_are_bitwise_stock(pipe, guess_mode):
    stock = run(pipe, guess_mode=guess_mode)
    controlnet_processors = dict(pipe.controlnet.attn_processors)
    with attnctl.apply(pipe, []):
        assert torch.equal(run(pipe, guess_mode=guess_mode), stock)
    idle = [Probe(), attnctl.TGate(gate_step=2), attnctl.ReferenceAttention(_picture(), strength=0.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnctl.errors.IdleControlWarning)
        with attnctl.apply(pipe, idle):
            assert torch.equal(run(pipe, guess_mode=guess_mode), stock)
            assert pipe.controlnet.attn_processors == controlnet_processors  # the ControlNet's own layers stay stock
    assert torch.equal(run(pipe, guess_mode=guess_mode), stock)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_tgate_kept_rows_get_the_cond_rows_controlnet_residuals(pipe, guess_mode):
    """After the gate TGATE's one row per prompt stands for the guided prediction: it takes the residuals the
    pipeline's ControlNet gave the cond row of its prompt (in guess mode the uncond rows' are zeros, which would switch
    the ControlNet off after the gate)."""
    steps, gate = 4, 2
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=gate)]):
        controlled = run(pipe, steps=steps, guess_mode=guess_mode)
        hook = _ResidualHook(pipe.unet, range(gate, steps), range(len(PROMPTS)), _from_cond)
        try:
            expected = run(pipe, steps=steps, guess_mode=guess_mode)
        finally:
            hook.handle.remove()
        switched_off = run(pipe, steps=steps, guess_mode=guess_mode, control_guidance_end=gate / steps)
    assert torch.equal(controlled, expected)
    assert (controlled - switched_off).abs().max() > 0.05


@pytest.mark.parametrize("guess_mode", [False, True])
def test_reference_rows_run_without_controlnet_residuals(pipe, guess_mode):
    """The reference row's latent is the noised reference, not the latent the ControlNet saw: it runs without the
    residuals, as the community `stable_diffusion_controlnet_reference.py` runs its reference pass."""
    reference_rows = [0, len(PROMPTS)]  # prompt row 0, uncond and cond
    with attnctl.apply(pipe, [attnctl.ReferenceAttention(_picture())]):
        controlled = run(pipe, steps=3, guess_mode=guess_mode)
        hook = _ResidualHook(pipe.unet, range(3), reference_rows, _zeroed)
        try:
            expected = run(pipe, steps=3, guess_mode=guess_mode)
        finally:
            hook.handle.remove()
    assert torch.equal(controlled, expected)


def test_latent_optimisers_warn_once_that_the_residuals_are_the_pipeline_s(pipe, tiny_cache):
    """The optimisers move the latent after the pipeline ran the ControlNet at the latent before the update: documented,
    and warned once per handle (docs/methods.md, latent optimisation); a pipeline without one is not warned."""
    control = attnctl.AttendExcite(subjects=["photo"], refine=(), steps=(0.0, 0.5))

    def warned(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        return [w for w in caught if "not re-run at the moved latent" in str(w.message)]

    with attnctl.apply(pipe, [control]):
        assert len(warned(lambda: run(pipe, steps=2))) == 1
        assert not warned(lambda: run(pipe, steps=2))  # once per handle
    plain = tiny_cache("tiny-sd")
    with attnctl.apply(plain, [control]):
        assert not warned(lambda: generate(plain, "tiny-sd", PROMPTS, steps=2))


def _picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
