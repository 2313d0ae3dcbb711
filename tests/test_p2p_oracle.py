"""The oracle diagnostic of benchmarks/p2p.py (`--oracle`, `CopyAttentionOutputs`): a CI-sized smoke on 2 seeds.

The oracle bounds attention-level editing only if its hooks really replace the edited rows' attention outputs, with
or without a control applied, and leave the base rows alone."""

from __future__ import annotations

import numpy as np
import pytest

import attnctl

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("p2p.py", "p2p_benchmark_oracle")


@pytest.fixture(scope="module")
def toy():
    from attnctl.toy import load_toy_shapes

    return load_toy_shapes()


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_copying_every_attention_output_makes_the_edit_the_base_image(bench, toy):
    """The prompt enters the toy UNet only through cross-attention, and the edited row starts from the base's noise:
    with every attention output copied (7 attention modules of each kind x 10 steps) the edit IS the base image,
    and the base rows are the stock batch's."""
    seeds = [0, 1]
    oracle = bench.CopyAttentionOutputs(self_until=1.0, cross_until=1.0)
    copied = bench.pairs(toy, oracle, seeds, 2)
    assert oracle.calls == {"attn1": 70, "attn2": 70}
    stock = bench.pairs(toy, None, seeds, 2)
    for (base, edited), (stock_base, stock_edited) in zip(copied, stock):
        assert np.array_equal(_pixels(edited), _pixels(base))
        assert np.array_equal(_pixels(base), _pixels(stock_base))
        assert not np.array_equal(_pixels(stock_edited), _pixels(stock_base))


def test_the_hooks_fire_under_a_prompt_to_prompt_control_and_only_in_their_window(bench, toy):
    """Oracle 2 (self-attention outputs from base, cross-attention P2P replace at (1, 1)): the hooks still see every
    self-attention call with the control applied; a window of 0.1 copies cross-attention at step 0 only, and
    `cross_layers` only in the layers named."""
    control = attnctl.PromptToPrompt("replace", cross_steps=1.0, self_steps=1.0)
    oracle = bench.CopyAttentionOutputs(self_until=1.0, cross_until=0.1, control=control)
    (base, edited), = bench.pairs(toy, oracle, [0], 1)
    assert oracle.calls == {"attn1": 70, "attn2": 7}
    assert not np.array_equal(_pixels(edited), _pixels(base))
    layered = bench.CopyAttentionOutputs(self_until=0.0, cross_until=0.1, cross_layers=("up_blocks",))
    bench.pairs(toy, layered, [0], 1)
    assert layered.calls == {"attn1": 0, "attn2": 4}
