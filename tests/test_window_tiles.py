"""The sdpa backend's tiled windows (`attnctl.kernels.window_tiles`) against a dense masked softmax in float64 over
`Window.allowed` (the window's pairs written out on the whole grid, independent of the tiles and of
`kernels.semantics`)."""

from __future__ import annotations

import pytest
import torch

from attnctl.kernels import sdpa, window_tiles
from attnctl.kernels.spec import AttentionSpec, Window


def dense(q, k, v, window, scale=None):
    """softmax(q k^T * scale, masked to the window's pairs) v, float64."""
    q, k, v = q.double(), k.double(), v.double()
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.softmax(logits.masked_fill(~window.allowed(), float("-inf")), dim=-1) @ v


WINDOWS = [
    Window((8, 12), band=5),
    Window((4, 6), band=30, frames=3),  # a band wider than one frame reaches the neighbouring frames
    Window((8, 12), radius=(2, 3)),
    Window((7, 9), radius=(1, 2), text_len=4),  # text after the image tokens: seen by and seeing every token
    Window((8, 12), band=17, text_len=5, text_first=True),
    Window((6, 10), radius=(1, 2, 3), frames=3),
    Window((5, 7), radius=(0, 1, 1), frames=4, text_len=3, text_first=True),
]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"band{w.band}" if w.band else f"r{w.radius}x{w.frames}t{w.text_len}")
@pytest.mark.parametrize("batch", [1, 2])
def test_tiles_compute_the_window_of_the_definition(window, batch):
    generator = torch.Generator().manual_seed(0)
    n = window.n_img + window.text_len
    q, k, v = (torch.randn(batch, 2, n, 16, generator=generator) for _ in range(3))
    got = window_tiles.attention(q, k, v, window, None)
    torch.testing.assert_close(got.double(), dense(q, k, v, window), rtol=1e-5, atol=2e-6)
    scaled = window_tiles.attention(q, k, v, window, 0.3)
    torch.testing.assert_close(scaled.double(), dense(q, k, v, window, 0.3), rtol=1e-5, atol=2e-6)


def test_tiles_cover_every_image_query_once_and_keep_fewer_pairs():
    window = Window((16, 16), radius=(1, 2, 2), frames=4)
    plan = window_tiles.plan(window, torch.device("cpu"))
    assert sorted(plan.queries.reshape(-1)[plan.order].tolist()) == list(range(window.n_img))
    assert plan.pairs() < window.n_img**2 / 4


def test_sdpa_runs_a_large_window_tiled_and_other_edits_densely(monkeypatch):
    window = Window((32, 32), band=40)
    assert window.n_img >= window_tiles.MIN_TOKENS and window_tiles.tileable(window)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, window.n_img, 8, generator=generator) for _ in range(3))
    tiled = []
    run = window_tiles.attention
    monkeypatch.setattr(window_tiles, "attention", lambda *args: tiled.append(1) or run(*args))
    out, _ = sdpa.attention(q, k, v, AttentionSpec(window=window))
    assert tiled and torch.allclose(out.double(), dense(q, k, v, window), atol=2e-6)
    sdpa.attention(q, k, v, AttentionSpec(window=window, key_bias=torch.zeros(1, window.n_img)))  # with a bias: dense
    assert len(tiled) == 1
    assert not window_tiles.tileable(Window((8, 8), band=4))  # small grids keep the dense mask
    assert not window_tiles.tileable(Window((32, 32), band=1000))  # a box of keys as large as the sequence saves nothing
    assert window_tiles.tileable(Window((24, 24), radius=(1, 4, 4), frames=7))


def test_a_plan_made_in_inference_mode_serves_autograd_later():
    window = Window((8, 12), radius=(1, 2))
    window_tiles._PLANS.clear()
    with torch.inference_mode():
        window_tiles.plan(window, torch.device("cpu"))
    q = torch.randn(1, 1, window.n_img, 8, requires_grad=True)
    window_tiles.attention(q, q, q, window, None).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
