"""diffusers' IP-Adapter calls on a pipeline while a handle is applied: `set_ip_adapter_scale` reaches the adapter,
`load_ip_adapter` / `unload_ip_adapter` are refused before they change anything, and on Flux a query transform
(SEG's blur) leaves the IP-Adapter's own cross-attention stock, as it does on SD, where that branch is in attn2."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import PipelineChangedError
from attnctl.processors.flux import FluxAttnProcessor
from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline

EMBED = 16  # the tiny image encoder's embedding size


def _ip_adapter(pipe, name: str):
    """A tiny random IP-Adapter loaded the way `load_ip_adapter` loads one (the denoiser's own loader)."""
    generator = torch.Generator().manual_seed(0)
    denoiser = pipe.unet if name == "tiny-sd" else pipe.transformer
    width = denoiser.config.cross_attention_dim if name == "tiny-sd" else denoiser.config.joint_attention_dim
    projection = {"proj.weight": torch.randn(4 * width, EMBED, generator=generator) * 0.3, "proj.bias": torch.zeros(4 * width),
                  "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    layers = {}
    if name == "tiny-sd":
        channels = denoiser.config.block_out_channels
        cross = [n for n in denoiser.attn_processors if not n.endswith("attn1.processor")]
        for index, layer in enumerate(cross):
            block = int(layer.split(".")[1]) if not layer.startswith("mid") else len(channels) - 1
            size = channels[::-1][block] if layer.startswith("up") else channels[block]
            for kind in ("k", "v"):
                layers[f"{2 * index + 1}.to_{kind}_ip.weight"] = torch.randn(size, width, generator=generator)
    else:
        for index in range(len(denoiser.transformer_blocks)):
            for kind in ("k", "v"):
                layers[f"{index}.to_{kind}_ip.weight"] = torch.randn(denoiser.inner_dim, width, generator=generator)
                layers[f"{index}.to_{kind}_ip.bias"] = torch.zeros(denoiser.inner_dim)
    denoiser._load_ip_adapter_weights([{"image_proj": projection, "ip_adapter": layers}], low_cpu_mem_usage=False)
    return pipe


def _generate(pipe, name: str, steps: int = 2) -> torch.Tensor:
    image = torch.randn(1, 1, EMBED, generator=torch.Generator().manual_seed(5))
    if name == "tiny-sd":  # [negative; positive] image embeddings, as the CFG batch is ordered
        embeds = {"ip_adapter_image_embeds": [torch.cat([torch.zeros_like(image), image])]}
    else:
        embeds = {"ip_adapter_image_embeds": [image], "negative_ip_adapter_image_embeds": [torch.zeros_like(image)]}
    return pipe("a photo of a cat", num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                **embeds, **CALL_DEFAULTS[name]).images


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_set_ip_adapter_scale_while_applied_reaches_the_adapter(name):
    """diffusers finds the IP processors by class (SD) or sets `scale` on the processor object a layer holds (Flux):
    under a handle the scale went nowhere (the call kept scale 1, and remove() put back scale 1)."""
    pipe = _ip_adapter(make_tiny_pipeline(name), name)
    pipe.set_ip_adapter_scale(0.3)
    expected = _generate(pipe, name)
    pipe.set_ip_adapter_scale(1.0)
    full = _generate(pipe, name)
    handle = attnctl.apply(pipe, [])
    pipe.set_ip_adapter_scale(0.3)
    assert torch.equal(_generate(pipe, name), expected) and not torch.equal(expected, full)
    handle.remove()
    assert torch.equal(_generate(pipe, name), expected)  # the scale the user set stays


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_ip_adapter_loading_while_applied_is_refused_before_it_changes_anything(name):
    pipe = _ip_adapter(make_tiny_pipeline(name), name)
    stock = _generate(pipe, name)
    handle = attnctl.apply(pipe, [])
    with pytest.raises(PipelineChangedError, match=r"pipe.unload_ip_adapter rebuilds the attention processors.*handle.remove\(\) first"):
        pipe.unload_ip_adapter()
    with pytest.raises(PipelineChangedError, match=r"pipe.load_ip_adapter rebuilds"):
        pipe.load_ip_adapter("a/local/dir", subfolder="models", weight_name="ip-adapter.safetensors")
    assert torch.equal(_generate(pipe, name), stock)
    denoiser = pipe.unet if name == "tiny-sd" else pipe.transformer
    with pytest.raises(PipelineChangedError, match="rebuilt the attention processors by class"):
        type(next(iter(denoiser.attn_processors.values())))()  # what diffusers' model-level loaders do
    handle.remove()
    assert torch.equal(_generate(pipe, name), stock)
    pipe.unload_ip_adapter()  # stock again: diffusers' own call runs
    assert denoiser.encoder_hid_proj is None


def test_flux_query_transforms_leave_the_ip_adapter_queries_stock(monkeypatch):
    """SEG blurs the image queries of the joint self-attention (Hong 2024); the IP-Adapter's cross-attention to the
    image prompt read the blurred queries too (tiny-flux, SEG sigma=inf: that row's IP output constant over the
    image, SEG's effect 2.85 against 0.07 without the adapter). At the first block of the first step the perturbed
    row's input is the cond row's, so its IP queries must be the cond row's."""
    pipe = _ip_adapter(make_tiny_pipeline("tiny-flux"), "tiny-flux")
    seen = []
    stock_ip_adapter = FluxAttnProcessor._ip_adapter

    def spy(self, attn, ip_query, *args):
        seen.append(ip_query.detach().clone())
        return stock_ip_adapter(self, attn, ip_query, *args)

    monkeypatch.setattr(FluxAttnProcessor, "_ip_adapter", spy)
    with attnctl.apply(pipe, [attnctl.SEG(scale=3.0, sigma=float("inf"))]):
        _generate(pipe, "tiny-flux", steps=1)
    first = seen[0]
    assert first.shape[0] == 2  # the cond row and SEG's perturbed row (no true CFG)
    assert float(first[1].std(dim=0).mean()) > 0.1  # not one blurred query over the whole image
    torch.testing.assert_close(first[1], first[0])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_ip_adapter_unloading_through_a_pipeline_sharing_the_denoiser(name):
    """A from_pipe sibling calls diffusers' own unload, which clears the denoiser's image projection before it rebuilds
    the processors (refused there): the controlled calls ran without it (tiny-sd 15.9 off), also after remove()
    (tiny-flux: every call raised). The next controlled call is refused, and remove() puts the projection back."""
    pipe = _ip_adapter(make_tiny_pipeline(name), name)
    stock = _generate(pipe, name)
    sibling = type(pipe)(**pipe.components)
    handle = attnctl.apply(pipe, [])
    with pytest.raises(PipelineChangedError):
        sibling.unload_ip_adapter()
    with pytest.raises(PipelineChangedError, match="image projection .*encoder_hid_proj"):
        _generate(pipe, name)
    handle.remove()
    assert torch.equal(_generate(pipe, name), stock)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_ip_adapter_loading_through_the_denoiser_is_refused_before_it_changes_anything(name):
    """`load_ip_adapter` of any pipeline sharing the denoiser ends in the denoiser's own loader, which cleared the
    image projection before attnctl's processors refused to be rebuilt."""
    pipe = _ip_adapter(make_tiny_pipeline(name), name)
    stock = _generate(pipe, name)
    denoiser = pipe.unet if name == "tiny-sd" else pipe.transformer
    projection = denoiser.encoder_hid_proj
    with attnctl.apply(pipe, []):
        with pytest.raises(PipelineChangedError, match="_load_ip_adapter_weights .*nothing was changed"):
            denoiser._load_ip_adapter_weights([{"image_proj": {}, "ip_adapter": {}}], low_cpu_mem_usage=False)
        assert denoiser.encoder_hid_proj is projection
        assert torch.equal(_generate(pipe, name), stock)


def _text_projected_sd():
    """tiny-sd with a UNet that projects its text (Kolors' `encoder_hid_dim_type="text_proj"`), and an IP-Adapter,
    which moves that projection to `text_encoder_hid_proj`."""
    from diffusers import UNet2DConditionModel

    base = make_tiny_pipeline("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(base.unet.config, encoder_hid_dim_type="text_proj",
                                            encoder_hid_dim=base.text_encoder.config.hidden_size)
    pipe = type(base)(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return _ip_adapter(pipe, "tiny-sd")


def test_a_refused_unload_on_a_text_projecting_unet_is_undone_whole():
    """diffusers' unload also moves the text projection back before it is refused: remove() left
    text_encoder_hid_proj None, and the UNet then skipped its text projection (5.8 off stock)."""
    pipe = _text_projected_sd()
    stock = _generate(pipe, "tiny-sd")
    handle = attnctl.apply(pipe, [])
    with pytest.raises(PipelineChangedError):
        type(pipe)(**pipe.components).unload_ip_adapter()
    handle.remove()
    assert torch.equal(_generate(pipe, "tiny-sd"), stock)


def test_region_prompts_are_projected_as_the_unet_projects_text_under_an_ip_adapter():
    """With the IP-Adapter's image projection in `encoder_hid_proj`, the UNet still projects the text through
    `text_encoder_hid_proj`; attnctl's own projection of region prompts skipped it."""
    pipe = _text_projected_sd()
    with attnctl.apply(pipe, []) as handle:
        embeds = torch.randn(1, 7, pipe.text_encoder.config.hidden_size)
        expected = pipe.unet.text_encoder_hid_proj(embeds)
        torch.testing.assert_close(handle.adapter.project_text(embeds), expected)
