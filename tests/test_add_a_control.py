"""docs/architecture.md "Add a control in 5 steps", followed to the letter: a per-head attention temperature
(logits of head h multiplied by t_h) written in this file alone, touching no processor, kernel or family file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import attnctl
from attnctl.control import BindContext, Bound, Control
from attnctl.denoiser_call import DenoiserCall
from attnctl.errors import ConfigError
from attnctl.families.base import LayerInfo, ModelAdapter
from attnctl.processors.edit import Edit, LayerHook
from attnctl.selection import LayerSpec, validate_layers
from attnctl.validation import set_field

from .helpers import generate


# 1. the config: a frozen dataclass, validated on construction, registered under a type name
@dataclass(frozen=True)
class HeadTemperature(Control, type_name="head-temperature-test"):
    """Per-head attention temperature: `softmax(t_h * q k^T * scale)` on the selected self-attention layers."""

    factors: tuple[float, ...] = (1.0,)
    layers: LayerSpec = None

    kinds: ClassVar[tuple[str, ...]] = ("self",)

    def __post_init__(self) -> None:
        factors = tuple(self.factors)
        if not factors or any(not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0 for f in factors):
            raise ConfigError(f"HeadTemperature.factors must be positive numbers, one per head, got {self.factors!r}")
        set_field(self, "factors", tuple(float(f) for f in factors))
        set_field(self, "layers", validate_layers(self.layers, name="HeadTemperature.layers"))

    # 2. where it acts: default layers, and what it does to each (one declaration, checked by apply)
    def default_layers(self, adapter: ModelAdapter) -> str:
        return "self"

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        return ("query",)  # it transforms the queries of the op

    # 3. bind once per pipeline call
    def bind(self, context: BindContext) -> Bound:
        return _TemperatureBound(self, context)


# 4. the per-call state: the edit at a layer in a denoiser call (None: untouched, bitwise stock)
class _TemperatureBound(Bound):
    def __init__(self, control: HeadTemperature, context: BindContext):
        super().__init__(control, context.layers, (0.0, 1.0))
        self.hook = _TemperatureHook(torch.tensor(control.factors, device=context.device))  # once per call
        self.idle = all(f == 1.0 for f in control.factors)

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        return None if self.idle else Edit(hooks=(self.hook,))


# 5. the hook: scaling q per head scales that head's logits; the op itself stays the backend's
class _TemperatureHook(LayerHook):
    def __init__(self, factors: torch.Tensor):
        self.factors = factors

    def attend(self, call, q, k, v, spec, compute):
        heads = q.shape[1]
        if self.factors.numel() not in (1, heads):
            raise ConfigError(f"HeadTemperature has {self.factors.numel()} factors; {call.layer.name} has {heads} heads")
        factors = self.factors.to(device=q.device, dtype=q.dtype).expand(heads)
        return compute(q * factors[None, :, None, None], k, v, spec)


def _reference_attention(q, k, v, factors):
    """softmax(t_h q k^T / sqrt(d)) v in float64, written from the definition."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    logits = logits * torch.tensor(factors, dtype=torch.float64)[None, :, None, None]
    return (torch.softmax(logits, -1) @ v.double()).to(q.dtype)


def test_idle_temperature_is_bitwise_stock(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd")
    with attnctl.apply(pipe, [HeadTemperature((1.0,))]):
        assert torch.equal(generate(pipe, "tiny-sd"), stock)


def test_temperature_changes_self_attention_as_defined(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    module = pipe.unet.get_submodule(layer)
    seen = {}

    def capture(mod, args, kwargs, out):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = out

    handle_hook = module.register_forward_hook(capture, with_kwargs=True)
    try:
        factors = tuple(0.5 + 0.5 * h for h in range(module.heads))
        with attnctl.apply(pipe, [HeadTemperature(factors, layers=layer)]) as handle:
            generate(pipe, "tiny-sd", steps=1)
            assert "HeadTemperature" in handle.describe()
    finally:
        handle_hook.remove()
    hidden = seen["hidden"]
    batch, heads = hidden.shape[0], module.heads
    q, k, v = (proj(hidden).view(batch, -1, heads, module.to_q.out_features // heads).transpose(1, 2) for proj in (module.to_q, module.to_k, module.to_v))
    out = _reference_attention(q, k, v, factors).transpose(1, 2).reshape(batch, -1, module.to_q.out_features)
    expected = module.to_out[1](module.to_out[0](out))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-5)


def test_bad_factors_are_refused_with_the_value():
    with pytest.raises(ConfigError, match="-1"):
        HeadTemperature((1.0, -1.0))


def test_a_query_transform_cannot_share_a_layer_with_token_merging(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with pytest.raises(ConfigError, match="HeadTemperature \\(query\\) and ToMe \\(tokens\\)"):
        attnctl.apply(pipe, [HeadTemperature((2.0,)), attnctl.ToMe()])
