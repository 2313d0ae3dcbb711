"""Fidelity audit 3 (docs: /work/notes/audit3.md): Attend-and-Excite's loop and TGATE v2's self-attention schedule
against transcriptions of the authors' code.

- Attend-and-Excite: `_perform_iterative_refinement_step` and the step's update of yuval-alaluf/Attend-and-Excite
  (pipeline_attend_and_excite.py; diffusers' `StableDiffusionAttendAndExcitePipeline` is the same loop), its
  `_compute_max_attention_per_index` smoothing (reflect padding 1 whatever the kernel size), and an end-to-end run
  against diffusers' pipeline on the tiny SD model.
- TGATE: the `tgate` package's own `tgate_scheduler` (tgate 1.0.0, imported) and the caching rule of its
  `tgate_processor`, against attnctl's `cross_action` / `self_action` over many settings (the package's pipelines
  themselves: tests/test_tgate.py).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.controls.optimize.controls import AttendExciteBound
from attnctl.controls.tgate import cross_action, self_action
from attnctl.steps import StepInfo

from .helpers import generate

PROMPT = "a photo of a cat"


# -- Attend-and-Excite: the refinement loop -------------------------------------------------------------------------
def _authors_step(x, step, thresholds, step_size, loss_fn, max_refinement_steps=20):
    """One image, one step of the authors' denoising loop up to the update (their `__call__` and
    `_perform_iterative_refinement_step`, with `loss_fn` standing for the loss pass). Returns (x, updates taken)."""
    updates = 0

    def grad_of(z):
        z = z.clone().detach().requires_grad_(True)
        loss = loss_fn(z)
        return loss, torch.autograd.grad(loss, [z])[0]

    loss = loss_fn(x)
    if step in thresholds and loss > 1.0 - thresholds[step]:
        iteration = 0
        target_loss = max(0, 1.0 - thresholds[step])
        while loss > target_loss:
            iteration += 1
            loss, grad = grad_of(x)
            if loss != 0:
                x = x - step_size * grad
                updates += 1
            if iteration >= max_refinement_steps:
                break
        loss, _ = grad_of(x)  # "run one more time": the loss of the refined latent; its update follows
    loss, grad = grad_of(x)
    if loss != 0:
        x = x - step_size * grad
        updates += 1
    return x.detach(), updates


def _bare_bound(control):
    bound = object.__new__(AttendExciteBound)
    bound.control = control
    bound.losses = []
    return bound


@pytest.mark.parametrize("max_refinement_steps", [20, 6])
def test_attend_excite_refinement_loop_matches_the_authors(max_refinement_steps):
    """The step after the last above-target loss is still taken (the authors' `while` tests the loss of the latent
    before its update), then a closing loss pass and the step's own update: one step more than stopping at the
    first latent below the target. Two images: one leaves the loop early, one runs into the cap."""
    torch.manual_seed(0)
    weights = torch.stack([torch.full((4, 3, 3), 0.06), torch.full((4, 3, 3), 0.0004)])  # fast, slow

    def loss_one(z, w):
        return 1.0 - torch.sigmoid((z * w).sum() - 2.0)

    def gradient(x, inputs, frame, loss_of):
        x = x.detach().requires_grad_(True)
        losses = torch.stack([loss_one(x[j], weights[j]) for j in range(x.shape[0])])
        (grad,) = torch.autograd.grad(losses.sum(), [x])
        return losses.detach(), grad

    control = attnctl.AttendExcite(subjects=["cat"], refine=((0.0, 0.2),), max_refinement_steps=max_refinement_steps)
    bound = _bare_bound(control)
    bound.refine_at = {0: 0.2}
    bound.gradient = gradient
    x0 = torch.zeros(2, 4, 3, 3)
    outer = SimpleNamespace(step=StepInfo(0, 10))
    got = bound.optimise_step(x0.clone(), {}, None, None, outer)
    counts = []
    for j in range(2):
        expected, updates = _authors_step(x0[j], 0, {0: 0.2}, 20.0, lambda z, j=j: loss_one(z, weights[j]), max_refinement_steps)
        counts.append(updates)
        torch.testing.assert_close(got[j], expected, rtol=1e-6, atol=1e-7)
    assert counts[1] == max_refinement_steps + 1  # the slow image runs into the cap, then the step's update
    assert 2 <= counts[0] < counts[1]  # the fast image leaves early


def test_attend_excite_no_refinement_below_the_threshold_is_one_step():
    control = attnctl.AttendExcite(subjects=["cat"])
    bound = _bare_bound(control)
    bound.refine_at = {0: 0.05}
    calls = []

    def gradient(x, inputs, frame, loss_of):
        calls.append(1)
        return torch.tensor([0.9]), torch.ones_like(x)  # 0.9 < 1 - 0.05: no refinement

    bound.gradient = gradient
    got = bound.optimise_step(torch.zeros(1, 2), {}, None, None, SimpleNamespace(step=StepInfo(0, 10)))
    assert len(calls) == 1
    torch.testing.assert_close(got, torch.full((1, 2), -20.0))


# -- Attend-and-Excite: smoothing -------------------------------------------------------------------------------------
def _authors_peaks(attention_maps, indices, kernel_size, sigma):
    """`_compute_max_attention_per_index` with smoothing: `attention_maps` (h, w, T)."""
    attention_for_text = attention_maps[:, :, 1:-1] * 100
    attention_for_text = torch.softmax(attention_for_text, dim=-1)
    grids = torch.meshgrid(torch.arange(kernel_size, dtype=torch.float32), torch.arange(kernel_size, dtype=torch.float32), indexing="ij")
    kernel = 1
    for grid in grids:
        mean = (kernel_size - 1) / 2
        kernel = kernel * 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2))
    kernel = kernel / torch.sum(kernel)
    peaks = []
    for i in [index - 1 for index in indices]:
        image = attention_for_text[:, :, i]
        padded = F.pad(image.unsqueeze(0).unsqueeze(0), (1, 1, 1, 1), mode="reflect")
        peaks.append(F.conv2d(padded, kernel[None, None]).squeeze(0).squeeze(0).max())
    return peaks


@pytest.mark.parametrize("kernel_size, sigma", [(3, 0.5), (5, 1.0), (7, 2.0), (1, 0.5)])
def test_attend_excite_smoothing_pads_by_one_as_the_authors(kernel_size, sigma):
    torch.manual_seed(3)
    probabilities = torch.softmax(torch.randn(10, 10, 12) * 3, dim=-1)
    probabilities[0, :, 3] += 0.5  # the subject's peak on the border: the padding decides the smoothed maximum
    probabilities[:, 9, 7] += 0.4
    maps = probabilities.permute(2, 0, 1)[1:11][None]  # columns 1 .. T-2
    selector = torch.zeros(1, 2, 10)
    selector[0, 0, 2] = selector[0, 1, 6] = 1.0  # text positions 3 and 7
    control = attnctl.AttendExcite(subjects=["cat"], kernel_size=kernel_size, sigma=sigma)
    ours = _bare_bound(control)._loss(selector)(maps)[0]
    peaks = _authors_peaks(probabilities, [3, 7], kernel_size, sigma)
    expected = max(max(0, 1.0 - p) for p in peaks)
    torch.testing.assert_close(ours, torch.as_tensor(expected, dtype=torch.float32))
    if kernel_size == 5:  # same-size padding (kernel_size // 2) would read the border cells
        from attnctl.controls.optimize import losses

        same_size = losses.attend_excite_loss(losses.excite_maps(maps, selector, 100.0, kernel_size, sigma))[0]
        assert not torch.allclose(same_size, ours)


# -- Attend-and-Excite: the whole loop against diffusers' pipeline ----------------------------------------------------
def test_attend_excite_matches_diffusers_pipeline_with_refinement(tiny_cache):
    """diffusers' `StableDiffusionAttendAndExcitePipeline` (the authors' loop, per image) on the tiny SD model, two
    prompts, two subjects, 4 steps: updates at steps 0-2 (`max_iter_to_alter=3` = `steps=(0, 0.75)`), refinement at
    steps 0 and 2. The step-0 threshold is set between the losses of the first image's 3rd and 4th refinement iterates
    (read from a first run), so its loop leaves early there; at step 2 the loops run into their cap of 20. Its map
    resolution is the tiny model's default map level (8 x 8)."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        pipeline_stable_diffusion_attend_and_excite as peer_module,
    )

    pipe = tiny_cache("tiny-sd")
    parts = pipe.components
    peer = peer_module.StableDiffusionAttendAndExcitePipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    prompts = [PROMPT, "a red photo of a big cat"]
    indices = []
    for prompt in prompts:
        ids = pipe.tokenizer(prompt).input_ids
        indices.append([ids.index(pipe.tokenizer.convert_tokens_to_ids(word)) for word in ("cat</w>", "photo</w>")])
    seen: list[float] = []
    compute_loss = peer_module.StableDiffusionAttendAndExcitePipeline._compute_loss

    def spy(max_attention_per_index):
        loss = compute_loss(max_attention_per_index)
        seen.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        return loss

    def run_peer(thresholds):
        generator = torch.Generator().manual_seed(0)
        return peer(prompts, token_indices=indices, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                    generator=generator, output_type="latent", max_iter_to_alter=3, thresholds=thresholds,
                    attn_res=(8, 8)).images

    saved = dict(pipe.unet.attn_processors)
    try:
        peer_module.StableDiffusionAttendAndExcitePipeline._compute_loss = staticmethod(spy)
        run_peer({0: 0.5})
        trajectory = seen[1:5]  # step 0: the first pass, then the refinement iterates' losses
        assert all(a > b for a, b in zip(trajectory, trajectory[1:])), trajectory
        threshold = 1.0 - (trajectory[2] + trajectory[3]) / 2
        seen.clear()
        expected = run_peer({0: threshold, 2: 0.5})
    finally:
        peer_module.StableDiffusionAttendAndExcitePipeline._compute_loss = staticmethod(compute_loss)
        pipe.unet.set_attn_processor(saved)
    control = attnctl.AttendExcite(subjects=["cat", "photo"], steps=(0.0, 0.75), refine=((0.0, threshold), (0.5, 0.5)))
    with attnctl.apply(pipe, [control]):
        got = generate(pipe, "tiny-sd", prompt=prompts, steps=4, guidance=5.0)
    stock = generate(pipe, "tiny-sd", prompt=prompts, steps=4, guidance=5.0)
    effect = (expected - stock).abs().max()
    assert effect > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 * effect.item())


# -- TGATE v2: the package's scheduler --------------------------------------------------------------------------------
def _package_outputs(n, gate, warm_up, sp, fi, cross):
    """What the layer returns at each step under `tgate_processor`: ("fresh", s) computed at step s (the CFG batch
    before the gate, the one row after), ("mean", s) the mean of the CFG halves stored at s."""
    from tgate.tgate_utils import tgate_scheduler  # the test extra's peer package

    cache, out = None, []
    for step in range(n):
        ca, sa, keep_shape = tgate_scheduler(step, gate, sp, fi, warm_up)
        kwargs = ca if cross else sa
        if kwargs["reuse"] and cache is not None:
            out.append(cache)
            continue
        if kwargs["cache"]:
            cache = ("fresh", step) if keep_shape else ("mean", step)
        out.append(("fresh", step))
    return out


def _attnctl_outputs(n, gate, warm_up, sp, fi, cross):
    cache, out = None, []
    for step in range(n):
        action = cross_action(step, gate, n) if cross else self_action(step, gate, n, warm_up, sp, fi)
        if action == "reuse" and cache is not None:
            out.append(cache)
            continue
        if action == "store":
            cache = ("fresh", step)
        elif action == "store_mean":
            cache = ("mean", step)
        out.append(("fresh", step))
    return out


def test_tgate_schedule_matches_the_package_over_many_settings():
    checked = 0
    for n in range(1, 13):
        for gate in range(1, n + 3):
            for warm_up in range(0, 5):
                for sp in range(1, 6):
                    for fi in range(1, 5):
                        for cross in (True, False):
                            expected = _package_outputs(n, gate, warm_up, sp, fi, cross)
                            assert _attnctl_outputs(n, gate, warm_up, sp, fi, cross) == expected, (n, gate, warm_up, sp, fi, cross)
                            checked += 1
                        # fi_interval None (no reuse after the gate) is the package's fi_interval=1
                        assert _attnctl_outputs(n, gate, warm_up, sp, None, False) == _package_outputs(n, gate, warm_up, sp, 1, False)
    assert checked > 10000
    # sp_interval None: self-attention computed at every step before the gate (TGATE v1 there)
    for n, gate, fi in ((8, 4, 2), (10, 6, 1), (6, 9, 3)):
        outs = _attnctl_outputs(n, gate, 2, None, fi, False)
        assert outs[: min(gate - 1, n)] == [("fresh", s) for s in range(min(gate - 1, n))]
        assert outs[gate - 1 :] == _package_outputs(n, gate, 2, 1, fi, False)[gate - 1 :]


def test_tgate_defaults_are_the_package_defaults_with_v2_opt_in():
    control = attnctl.TGate()
    assert (control.gate_step, control.warm_up) == (10, 2)  # tgate(..., gate_step=10, warm_up=2)
    assert (control.sp_interval, control.fi_interval) == (None, None)  # v2 reuse opt-in (docs/methods.md "TGATE")
    # TGate(sp_interval=5, fi_interval=1) is the package's default v2 schedule
    v2 = attnctl.TGate(sp_interval=5, fi_interval=1)
    for n in (12, 25, 50):
        assert _attnctl_outputs(n, 10, v2.warm_up, 5, 1, False) == _package_outputs(n, 10, 2, 5, 1, False)
