"""Layer selection and step windows shared by all controls."""

from __future__ import annotations

import pytest

from attnctl.errors import ConfigError, SelectionError
from attnctl.families import adapter_for
from attnctl.selection import select_layers, validate_layers
from attnctl.steps import StepInfo, validate_steps
from attnctl.testing import make_tiny_pipeline


@pytest.fixture(scope="module")
def layers():
    from attnctl.families.base import LayerInfo

    names = [f"transformer_blocks.{i}.attn" for i in range(12)] + ["transformer_blocks.1.attn2"]
    return tuple(LayerInfo(n, i, "joint" if n.endswith("attn") else "self", "blocks", int(n.split(".")[1])) for i, n in enumerate(names))


def _names(chosen):
    return [l.name for l in chosen]


def test_whole_parts_never_match_longer_numbers(layers):
    assert _names(select_layers(layers, "transformer_blocks.1", default=None, owner="t")) == [
        "transformer_blocks.1.attn", "transformer_blocks.1.attn2"]


def test_blocks_dot_one_selects_nothing_but_errors(layers):
    with pytest.raises(SelectionError, match="matched no attention layer"):
        select_layers(layers, "blocks.1", default=None, owner="t")


def test_kinds_groups_wildcards_and_intersections(layers):
    assert _names(select_layers(layers, "self", default=None, owner="t")) == ["transformer_blocks.1.attn2"]
    assert len(select_layers(layers, "joint & transformer_blocks.1[01]", default=None, owner="t")) == 2
    assert _names(select_layers(layers, ["transformer_blocks.7", "transformer_blocks.9"], default=None, owner="t")) == [
        "transformer_blocks.7.attn", "transformer_blocks.9.attn"]
    assert len(select_layers(layers, None, default="joint", owner="t")) == 12


def test_unet_groups_and_levels():
    adapter = adapter_for(make_tiny_pipeline("tiny-sd").unet)
    mid = select_layers(adapter.layers, "self & mid", default=None, owner="t")
    assert _names(mid) == ["mid_block.attentions.0.transformer_blocks.0.attn1"] and mid[0].level == 1
    cross = select_layers(adapter.layers, "cross", default=None, owner="t")
    assert len(cross) == 4 and all(l.text == "keys" for l in cross)
    assert {l.level for l in adapter.layers if l.group == "up"} == {0}


def test_sdxl_levels_and_flux_groups():
    sdxl = adapter_for(make_tiny_pipeline("tiny-sdxl").unet)
    assert min(l.level for l in sdxl.layers) == 1  # the first level has no attention, as in real SDXL
    flux = adapter_for(make_tiny_pipeline("tiny-flux").transformer)
    assert [(l.group, l.text, l.concatenated) for l in flux.layers] == [
        ("double", "first", False), ("single", "first", True), ("single", "first", True)]


def test_bad_selections():
    for bad in ([], [1], "self &", "a b", 3):
        with pytest.raises(SelectionError):
            validate_layers(bad)


def test_step_windows():
    assert validate_steps((0, 1)) == (0.0, 1.0)
    assert validate_steps((0.0, 0.0)) == (0.0, 0.0)
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0, 1.5), (0,), "ab", (float("nan"), 1), (True, 1)):
        with pytest.raises(ConfigError):
            validate_steps(bad)
    assert StepInfo(0, 10).inside((0.0, 0.2)) and StepInfo(1, 10).inside((0.0, 0.2))
    assert not StepInfo(2, 10).inside((0.0, 0.2))
    assert not StepInfo(0, 10).inside((0.0, 0.0))
