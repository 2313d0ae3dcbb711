"""Identities first: apply with no controls routes through attnctl's processors and is bitwise stock."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.processors.base import ControlledProcessor
from attnctl.testing import TINY_MODELS

from .helpers import Probe, generate

pytestmark = pytest.mark.parity


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.mark.parametrize("name", TINY_MODELS)
def test_empty_apply_is_bitwise_stock_and_routes_through_attnctl(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name)
    with attnctl.apply(pipe, []) as handle:
        processors = list(_denoiser(pipe).attn_processors.values())
        assert processors and all(isinstance(p, ControlledProcessor) for p in processors)
        controlled = generate(pipe, name)
    after = generate(pipe, name)
    assert torch.equal(stock, controlled)
    assert torch.equal(stock, after)
    assert not any(isinstance(p, ControlledProcessor) for p in _denoiser(pipe).attn_processors.values())
    assert "forward" not in _denoiser(pipe).__dict__
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__
    assert not handle.live


@pytest.mark.parametrize("name", TINY_MODELS)
def test_identity_edit_asks_every_layer_every_step(name, tiny_cache):
    """A control that changes nothing is asked at every layer and step, and the output stays bitwise stock."""
    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=3)
    probe = Probe()
    with attnctl.apply(pipe, [probe]) as handle:
        controlled = generate(pipe, name, steps=3)
    assert torch.equal(stock, controlled)
    layers = {entry[0] for entry in probe.log if entry[0] != "bind"}
    assert layers == {layer.name for layer in handle.adapter.layers}
    assert sorted({entry[1] for entry in probe.log if entry[0] != "bind"}) == [0, 1, 2]


def test_img2img_identity(tiny_cache):
    from diffusers import StableDiffusionImg2ImgPipeline

    base = tiny_cache("tiny-sd")
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(base)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def run():
        return pipe("a photo of a cat", image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    stock = run()
    with attnctl.apply(pipe, []):
        controlled = run()
    assert torch.equal(stock, run())
    assert torch.equal(stock, controlled)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_reference_backend_close_to_stock(name, tiny_cache, monkeypatch):
    """backend="reference" computes every layer's attention explicitly, without controls too: close to stock, not
    bitwise (README), one eager call per layer and step (batched CFG rows in one call)."""
    import dataclasses

    from attnctl import kernels

    calls = []
    eager = kernels.BACKENDS["reference"]

    def counted(q, k, v, spec):
        calls.append(q.shape)
        return eager.fn(q, k, v, spec)

    monkeypatch.setitem(kernels.BACKENDS, "reference", dataclasses.replace(eager, fn=counted))
    pipe = tiny_cache(name)
    stock = generate(pipe, name, steps=2)
    assert not calls
    with attnctl.apply(pipe, [], backend="reference") as handle:
        controlled = generate(pipe, name, steps=2)
    assert len(calls) == 2 * len(handle.adapter.layers)
    assert not torch.equal(controlled, stock)
    torch.testing.assert_close(controlled, stock, rtol=1e-4, atol=1e-4)
