"""End to end: a control whose edits carry key bias, value scale, region labels, a window and log-sum-exp
capture generates the same latents on every backend (tiny SD at 16x16 pixels: an 8x8 latent, 64 image
tokens, small enough for the Triton interpreter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnctl
from attnctl.control import Bound, Control
from attnctl.kernels import BACKENDS
from attnctl.kernels.spec import LabelMask, Window
from attnctl.processors.edit import Edit, LayerHook

from .helpers import KernelLaunches, generate

INF = float("-inf")


class _CaptureLse(LayerHook):
    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def attend(self, call, q, k, v, spec, compute):
        out, lse = compute(q, k, v, spec)
        self.store.setdefault(self.name, []).append(lse)
        return out, lse


@dataclass(frozen=True)
class KernelProbe(Control, type_name="test-kernel-probe"):
    """Cross-attention: a key bias and a value scale on the cond rows. Self-attention: two column regions
    (region 1 cannot see region 0, region 0 sees region 1 with a -2 penalty) and a 5x5 window."""

    layers: Any = ("down_blocks.0",)
    lse: bool = False
    store: dict = field(default_factory=dict, compare=False, hash=False)

    def bind(self, context):
        return _KernelProbeBound(self, context.layers, (0.0, 1.0))


class _KernelProbeBound(Bound):
    def __init__(self, control, layers, steps):
        super().__init__(control, layers, steps)
        self.labels: dict[tuple, LabelMask] = {}  # one LabelMask per layout for the whole call

    def edit(self, layer, frame):
        geometry = frame.geometry(layer)
        batch = len(frame.rows)
        cond = frame.rows.mask("cond").float()[:, None]
        hooks = (_CaptureLse(self.control.store, layer.name),) if self.control.lse else ()
        if layer.kind == "cross":
            g = torch.Generator().manual_seed(1)
            bias = torch.randn(1, geometry.text_len, generator=g) * cond
            scale = 1 + (torch.rand(1, geometry.text_len, generator=g) * 2 - 1) * cond
            return Edit(key_bias=bias, value_scale=scale, return_lse=self.control.lse, hooks=hooks)
        h, w = geometry.image_hw
        key = (batch, h, w)
        if key not in self.labels:
            regions = (torch.arange(h * w) % w >= w // 2).long()[None].expand(batch, -1)
            self.labels[key] = LabelMask(regions, regions, torch.tensor([[[0.0, -2.0], [INF, 0.0]]]))
        window = Window((h, w), radius=(2, 2))
        return Edit(labels=self.labels[key], window=window, return_lse=self.control.lse, hooks=hooks)


def _run(pipe, backend: str, lse: bool):
    probe = KernelProbe(lse=lse)
    with attnctl.apply(pipe, [probe], backend=backend) as handle:
        latents = generate(pipe, "tiny-sd", prompt="a photo of a cat", height=16, width=16)
        used = {handle.runtime.backend_log[name][0] for name in probe.store} if lse else None
    return latents, probe.store, used


@pytest.fixture(scope="module")
def reference_run(tiny_cache):
    return _run(tiny_cache("tiny-sd"), "reference", lse=True)


@pytest.mark.parametrize("backend", ["sdpa", "triton", "flex"])
def test_backends_generate_like_the_reference(tiny_cache, reference_run, backend, monkeypatch):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available here")
    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", prompt="a photo of a cat", height=16, width=16)
    expected, expected_lse, _ = reference_run
    assert (expected - stock).abs().max() > 1e-3, "the probe control changes nothing: the test could not fail"
    if backend == "triton":  # without log-sum-exp first: each controlled layer's edits launch the flash kernel
        launches = KernelLaunches(monkeypatch, pipe.unet)
        try:
            latents, _, _ = _run(pipe, backend, lse=False)
        finally:
            launches.remove()
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
        launches.check({"_attn_fwd"})  # key bias + value scale; labels + window
        assert {layer for layer, _, kernel, _ in launches.calls if kernel} == set(expected_lse)
    lse = backend == "triton"  # sdpa has no log-sum-exp; compiled flex has none on CPU
    latents, store, used = _run(pipe, backend, lse)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    if lse:
        assert used == {"triton"} and set(store) == set(expected_lse) and len(store) == 2
        for name, values in store.items():
            for got, want in zip(values, expected_lse[name]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_sends_layers_past_the_dense_limit_elsewhere(tiny_cache, reference_run, monkeypatch):
    """`auto` on CPU picks sdpa for the label / window layers while their dense mask fits its limit, and the
    next backend once it does not; the latents do not change."""
    import dataclasses

    from attnctl import kernels

    pipe = tiny_cache("tiny-sd")
    expected, _, _ = reference_run
    latents, log, _ = _run_auto(pipe)
    assert log["down_blocks.0.attentions.0.transformer_blocks.0.attn1"][0] == "sdpa"
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    # 2 rows x 64 x 64 image tokens = 8192 elements at down_blocks.0's self-attention: a limit below that
    monkeypatch.setitem(kernels.BACKENDS, "sdpa", dataclasses.replace(kernels.BACKENDS["sdpa"], dense_limit=8000))
    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("sdpa", "reference"))  # flex's CPU compilation stays out of this test
    latents, log, _ = _run_auto(pipe)
    assert log["down_blocks.0.attentions.0.transformer_blocks.0.attn1"][0] == "reference"
    assert "dense mask of 8192 elements" in log["down_blocks.0.attentions.0.transformer_blocks.0.attn1"][1]
    assert log["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0] == "sdpa"  # per-key edits: no dense mask
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


def _run_auto(pipe):
    probe = KernelProbe()
    with attnctl.apply(pipe, [probe]) as handle:
        latents = generate(pipe, "tiny-sd", prompt="a photo of a cat", height=16, width=16)
        return latents, dict(handle.runtime.backend_log), None
