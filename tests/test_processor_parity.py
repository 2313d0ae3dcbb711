"""Processor parity at the module level: IP-Adapter inputs, fused projections, qk-norm, SD3.5 dual attention."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.families.base import LayerInfo
from attnctl.processors.flux import FluxAttnProcessor
from attnctl.processors.self_cross import SelfCrossAttnProcessor
from attnctl.testing import make_tiny_pipeline

from .helpers import Probe, generate

pytestmark = pytest.mark.parity


class _NoFrame:
    """A runtime stand-in outside any pipeline call: no edits, stock math."""

    backend = "auto"
    prefilled = False

    def edit_for(self, layer):
        return None


def test_ip_adapter_processor_is_reproduced():
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    stock = IPAdapterAttnProcessor2_0(hidden_size=16, cross_attention_dim=12, num_tokens=(4, 2), scale=[0.7, 1.3])
    torch.nn.init.normal_(stock.to_k_ip[0].weight)
    ours = SelfCrossAttnProcessor(LayerInfo("x.attn2", 0, "cross", "down", 0), _NoFrame(), stock)
    hidden = torch.randn(2, 6, 16)
    text = torch.randn(2, 5, 12)
    ip = [torch.randn(2, 4, 12), torch.randn(2, 2, 12)]
    expected = stock(attn, hidden, encoder_hidden_states=(text, ip))
    got = ours(attn, hidden, encoder_hidden_states=(text, ip))
    assert torch.equal(expected, got)
    # with IP-Adapter masks: (1, num_images, h, w) per adapter
    ip_masked = [torch.randn(2, 1, 4, 12), torch.randn(2, 1, 2, 12)]
    masks = [torch.ones(1, 1, 2, 3), torch.zeros(1, 1, 2, 3)]
    expected = stock(attn, hidden, encoder_hidden_states=(text, ip_masked), ip_adapter_masks=masks)
    got = ours(attn, hidden, encoder_hidden_states=(text, ip_masked), ip_adapter_masks=masks)
    assert torch.equal(expected, got)


def test_flux_ip_adapter_processor_is_reproduced():
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxIPAdapterAttnProcessor

    torch.manual_seed(0)
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, out_dim=32, context_pre_only=False, bias=True)
    stock = FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=24, num_tokens=(4,), scale=0.8)
    ours = FluxAttnProcessor(LayerInfo("transformer_blocks.0.attn", 0, "joint", "double", 0, text="first"), _NoFrame(), stock)
    hidden, text = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    ip = [torch.randn(2, 4, 24)]
    expected = stock(attn, hidden, text, None, None, ip_hidden_states=ip)
    got = ours(attn, hidden, text, None, None, ip_hidden_states=ip)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-pixart"])
def test_fused_projections_before_apply(name):
    pipe = make_tiny_pipeline(name)
    pipe.transformer.fuse_qkv_projections()
    stock = generate(pipe, name)
    with attnctl.apply(pipe, [Probe()]):
        controlled = generate(pipe, name)
    assert torch.equal(stock, controlled)


@pytest.mark.parametrize("options", [{"qk_norm": "rms_norm"}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}, {"t5": False}])
def test_sd3_variants_identity(options):
    pipe = make_tiny_pipeline("tiny-sd3", **options)
    stock = generate(pipe, "tiny-sd3")
    probe = Probe()
    with attnctl.apply(pipe, [probe]) as handle:
        controlled = generate(pipe, "tiny-sd3")
    assert torch.equal(stock, controlled)
    kinds = [(l.name, l.kind) for l in handle.adapter.layers]
    if options.get("dual_attention_layers"):
        assert ("transformer_blocks.0.attn2", "self") in kinds
    assert {entry[0] for entry in probe.log if entry[0] != "bind"} == {name for name, _ in kinds}
