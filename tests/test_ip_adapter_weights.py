"""IP-Adapter weights stay in the denoiser's module tree while attnctl is applied: `.to()` moves and casts
them, state_dict sees them under their stock names, and no call moves them again."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.processors.base import ControlledProcessor
from attnctl.testing import make_tiny_pipeline

pytestmark = pytest.mark.parity


def _with_ip_processors(pipe):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = pipe.unet
    processors = {}
    torch.manual_seed(0)
    for name, processor in unet.attn_processors.items():
        module = unet.get_submodule(name[: -len(".processor")])
        if module.is_cross_attention:
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=module.to_q.out_features, cross_attention_dim=module.to_k.in_features, num_tokens=(4,), scale=1.0
            )
            torch.nn.init.normal_(processor.to_k_ip[0].weight)
        processors[name] = processor
    unet.set_attn_processor(dict(processors))
    return {name: p for name, p in processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}


def test_ip_adapter_weights_follow_to_and_stay_in_the_state_dict(monkeypatch):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = make_tiny_pipeline("tiny-sd")
    stock = _with_ip_processors(pipe)
    unet = pipe.unet
    keys = list(unet.state_dict())
    assert any(".processor.to_k_ip.0.weight" in key for key in keys)
    handle = attnctl.apply(pipe, [])
    name = next(iter(stock))
    module = unet.get_submodule(name[: -len(".processor")])
    ours = module.processor
    assert isinstance(ours, ControlledProcessor) and isinstance(ours, torch.nn.Module)
    assert type(ours).__name__ == "SelfCrossAttnProcessor" and ours.original is stock[name]
    assert list(unet.state_dict()) == keys  # same names, same tensors
    assert torch.equal(unet.state_dict()[name + ".to_k_ip.0.weight"], stock[name].to_k_ip[0].weight)
    self_attention = next(p for p in unet.attn_processors.values() if not isinstance(p, torch.nn.Module))
    assert isinstance(self_attention, ControlledProcessor)  # processors without weights stay plain objects

    unet.to(torch.bfloat16)
    assert stock[name].to_k_ip[0].weight.dtype == torch.bfloat16
    monkeypatch.setattr(IPAdapterAttnProcessor2_0, "to", lambda *a, **k: pytest.fail("moved during a call"))
    hidden = torch.randn(2, 16, module.to_q.in_features, dtype=torch.bfloat16)
    context = (torch.randn(2, 7, module.to_k.in_features, dtype=torch.bfloat16), [torch.randn(2, 4, module.to_k.in_features, dtype=torch.bfloat16)])
    got = module(hidden, encoder_hidden_states=context)
    monkeypatch.undo()
    handle.remove()
    assert module.processor is stock[name] and stock[name].to_k_ip[0].weight.dtype == torch.bfloat16
    assert list(unet.state_dict()) == keys
    expected = module(hidden, encoder_hidden_states=context)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_flux_ip_adapter_weights_follow_to():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    pipe = make_tiny_pipeline("tiny-flux")
    transformer = pipe.transformer
    name = next(n for n in transformer.attn_processors if n.startswith("transformer_blocks."))
    module = transformer.get_submodule(name[: -len(".processor")])
    inner = module.to_q.out_features
    stock = FluxIPAdapterAttnProcessor(hidden_size=inner, cross_attention_dim=16, num_tokens=(4,), scale=0.8)
    module.set_processor(stock)
    keys = list(transformer.state_dict())
    with attnctl.apply(pipe, []):
        assert list(transformer.state_dict()) == keys
        transformer.to(torch.float64)
        assert stock.to_k_ip[0].weight.dtype == torch.float64
        hidden = torch.randn(1, 4, inner, dtype=torch.float64)
        text = torch.randn(1, 3, inner, dtype=torch.float64)
        got = module(hidden, text, ip_hidden_states=[torch.randn(1, 4, 16, dtype=torch.float64)])
        assert got[2].dtype == torch.float64
    assert module.processor is stock
