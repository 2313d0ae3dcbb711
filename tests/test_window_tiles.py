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
    assert sorted(plan.image_queries().tolist()) == list(range(window.n_img))
    assert plan.pairs() < window.n_img**2 / 4


# Block shapes forced past the cost model's choice: blocks spanning several frames, runs that do not divide the grid
# (short last blocks, boxes clipped at both edges), a block as large as the grid, one-token blocks, text first / last.
FORCED = [
    (Window((6, 10), radius=(1, 2, 3), frames=5), (2, 4, 3)),
    (Window((6, 10), radius=(1, 2, 3), frames=5), (3, 6, 10)),
    (Window((5, 7), radius=(2, 1, 2), frames=4, text_len=3, text_first=True), (1, 2, 3)),
    (Window((5, 7), radius=(0, 2, 1), frames=3, text_len=4), (2, 5, 1)),
    (Window((9, 11), radius=(3, 2)), (1, 4, 5)),
    (Window((9, 11), radius=(3, 2), text_len=6, text_first=True), (1, 1, 1)),
    (Window((6, 9), band=20, frames=3), (7,)),
    (Window((6, 9), band=20, frames=3, text_len=5), (162,)),
    (Window((6, 9), band=3, text_len=2, text_first=True), (1,)),
]


@pytest.mark.parametrize(("window", "shape"), FORCED, ids=lambda x: str(x) if isinstance(x, tuple) else None)
@pytest.mark.parametrize("batch", [1, 2])
def test_every_block_shape_computes_the_window_of_the_definition(window, shape, batch):
    tiles = window_tiles.make_plan(window, "cpu", shape)
    assert tiles.shape == shape
    assert sorted(tiles.image_queries().tolist()) == [i + (window.text_len if window.text_first else 0) for i in range(window.n_img)]
    generator = torch.Generator().manual_seed(2)
    n = window.n_img + window.text_len
    q, k, v = (torch.randn(batch, 3, n, 8, generator=generator) for _ in range(3))
    for _ in range(2):  # the second call reuses the plan's buffers
        with torch.inference_mode():
            got = window_tiles.attention(q, k, v, window, None, tiles)
        torch.testing.assert_close(got.double(), dense(q, k, v, window), rtol=1e-5, atol=2e-6)


CHUNKED = [
    (Window((12, 16), radius=(1, 2, 2), frames=4), (1, 4, 4)),
    (Window((12, 16), radius=(1, 2, 2), frames=4, text_len=3, text_first=True), (2, 4, 4)),
    (Window((16, 20), radius=(2, 3), text_len=4), (1, 4, 5)),
]


@pytest.mark.parametrize(("window", "shape"), CHUNKED, ids=["3d", "3d-text-first", "2d-text"])
def test_tiles_gathered_in_chunks_give_the_one_shot_output(window, shape, monkeypatch):
    """Under a gather budget of a few tiles, each group's tiles are gathered and computed a chunk at a time (per-tile
    masks sliced with them, batch-major), with the output of gathering them all at once, and buffers of one chunk."""
    generator = torch.Generator().manual_seed(6)
    n = window.n_img + window.text_len
    q, k, v = (torch.randn(2, 3, n, 8, generator=generator) for _ in range(3))
    with torch.inference_mode():
        whole = window_tiles.attention(q, k, v, window, None, window_tiles.make_plan(window, "cpu", shape))
        one_tile = 3 * 8 * 3 * max(g.keys.shape[1] for g in window_tiles.make_plan(window, "cpu", shape).groups)
        monkeypatch.setattr(window_tiles, "GATHER_BUDGET", one_tile)  # at least one tile of every group
        tiles = window_tiles.make_plan(window, "cpu", shape)
        assert max(-(-2 * g.queries.shape[0] // g.chunk_tiles(3, 8, 8)) for g in tiles.groups) > 2  # several chunks
        chunked = window_tiles.attention(q, k, v, window, None, tiles)
    torch.testing.assert_close(chunked.double(), dense(q, k, v, window), rtol=1e-5, atol=2e-6)
    assert torch.equal(chunked, whole)
    gathered = sum(buffer.numel() for buffer in tiles.buffers(q, k, v))
    assert gathered <= window_tiles.GATHER_BUDGET


def test_interior_blocks_share_one_mask_and_edge_blocks_have_smaller_boxes():
    window = Window((16, 28), radius=(1, 4, 4), frames=9)  # gpu_e2e's wan-cpu grid and 3-D window
    tiles = window_tiles.make_plan(window, "cpu", (1, 8, 4))
    boxes = {g.keys.shape[1] for g in tiles.groups}
    # a block of 8 rows x 4 columns sees 12 x 12 (rows clipped at the top or bottom: 0..11 or 4..15), 3 frames; the
    # first / last frame's blocks 2 frames, the first / last column's blocks 8 columns
    assert max(boxes) == 3 * 12 * 12 and min(boxes) == 2 * 12 * 8
    band = window_tiles.make_plan(Window((16, 28), band=448, frames=9), "cpu", (128,))
    interior = max(band.groups, key=lambda g: g.queries.shape[0])  # blocks of one place: one mask, broadcast
    assert interior.queries.shape == (24, 128) and interior.keys.shape[1] == 128 + 2 * 448 and interior.bias.shape[0] == 1
    # tight boxes: fewer pairs than one box of the largest size for every block
    assert tiles.pairs() < window.n_img * max(boxes)


def test_the_cost_model_prefers_tight_blocks_to_the_old_twice_the_radius_tiles():
    window = Window((16, 28), radius=(1, 4, 4), frames=9)
    chosen = window_tiles.choose_shape(window)
    grid, reach = (9, 16, 28), (1, 4, 4)
    cost = window_tiles._shape_cost
    assert cost(grid, reach, chosen, 0) <= cost(grid, reach, (1, 8, 8), 0) < cost(grid, reach, (9, 16, 28), 0)
    assert window_tiles.planned_cost(window) < 0.2  # of full attention, modelled
    assert window_tiles.tile_cost(16, 100) / 1600 > window_tiles.tile_cost(256, 100) / 25600  # small tiles cost more per pair
    with pytest.raises(ValueError, match="block shape"):
        window_tiles.make_plan(window, "cpu", (1, 17, 4))


def test_inputs_in_either_memory_layout_and_dtype_give_the_same_window():
    window = Window((8, 12), radius=(1, 2, 2), frames=3, text_len=4)
    generator = torch.Generator().manual_seed(3)
    n = window.n_img + window.text_len
    rows = [torch.randn(2, n, 2, 8, generator=generator) for _ in range(3)]
    processors = [x.transpose(1, 2) for x in rows]  # (B, N, H, d) storage, the processors' layout
    contiguous = [x.contiguous() for x in processors]
    reference = dense(*processors, window)
    with torch.inference_mode():
        for q, k, v in (processors, contiguous):
            torch.testing.assert_close(window_tiles.attention(q, k, v, window, None).double(), reference, rtol=1e-5, atol=2e-6)
        as64 = window_tiles.attention(*(x.double() for x in processors), window, None)  # another dtype: its own buffers
    torch.testing.assert_close(as64, reference, rtol=1e-10, atol=1e-12)


def test_a_call_does_not_overwrite_an_earlier_result():
    window = Window((8, 12), radius=(1, 2, 2), frames=3)
    generator = torch.Generator().manual_seed(4)
    first, second = ([torch.randn(1, 2, window.n_img, 8, generator=generator) for _ in range(3)] for _ in range(2))
    with torch.inference_mode():
        out_first = window_tiles.attention(*first, window, None)
        window_tiles.attention(*second, window, None)
    torch.testing.assert_close(out_first.double(), dense(*first, window), rtol=1e-5, atol=2e-6)


def test_gradients_through_the_tiles_match_the_dense_window():
    window = Window((6, 8), radius=(1, 1, 2), frames=3, text_len=3, text_first=True)
    generator = torch.Generator().manual_seed(5)
    n = window.n_img + window.text_len
    leaves = [torch.randn(2, 2, n, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    weights = torch.randn(2, 2, n, 8, generator=generator, dtype=torch.float64)
    tiled = torch.autograd.grad((window_tiles.attention(*leaves, window, None) * weights).sum(), leaves)
    reference = torch.autograd.grad((dense(*leaves, window) * weights).sum(), leaves)
    for got, want in zip(tiled, reference):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_no_host_sync_in_a_call_once_the_plan_is_made():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default):
                self.seen.append(func)
            return func(*args, **(kwargs or {}))

    window = Window((16, 28), radius=(1, 4, 4), frames=9, text_len=5)
    q = torch.randn(2, 2, window.n_img + window.text_len, 8)
    with torch.inference_mode():
        window_tiles.attention(q, q, q, window, None)  # the plan, indices and buffers are made here
        with Syncs() as mode:
            window_tiles.attention(q, q, q, window, None)
    assert mode.seen == []


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
    assert window_tiles.tileable(Window((32, 32), radius=(4, 4), text_len=512))  # text keys in every block: still cheaper


def test_a_plan_made_in_inference_mode_serves_autograd_later():
    window = Window((8, 12), radius=(1, 2))
    window_tiles._PLANS.clear()
    with torch.inference_mode():
        window_tiles.plan(window, torch.device("cpu"))
    q = torch.randn(1, 1, window.n_img, 8, requires_grad=True)
    window_tiles.attention(q, q, q, window, None).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_a_window_sdpa_computes_in_tiles_is_not_refused_as_a_dense_mask(monkeypatch):
    """A window alone that sdpa computes in tiles builds no dense mask: past the dense limit (lowered here) sdpa runs
    it, and `auto` on a CPU keeps sdpa (not flex, which compiles for seconds per shape). A window with another edit,
    and a window too small to tile, still build B x N x N masks and are still refused past the limit."""
    import dataclasses

    from attnctl import kernels
    from attnctl.errors import BackendError

    monkeypatch.setitem(kernels.BACKENDS, "sdpa", dataclasses.replace(kernels.BACKENDS["sdpa"], dense_limit=1000))
    monkeypatch.setattr(sdpa, "DENSE_MASK_LIMIT", 1000)
    window = Window((32, 32), band=40)
    n = window.n_img
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 1, n, 8, generator=generator) for _ in range(3))
    spec = AttentionSpec(window=window)
    out, _ = kernels.attention(q, k, v, spec, "sdpa")
    torch.testing.assert_close(out.double(), dense(q, k, v, window), rtol=1e-5, atol=2e-6)
    assert sdpa.mask_elements(spec, 2, n, n) == 0 and spec.dense_elements(2, n, n) == 2 * n * n
    name, _ = kernels.choose_backend("auto", "cpu", spec.features(), sdpa.mask_elements(spec, 2, n, n), (n, 8))
    assert name == "sdpa"
    biased = AttentionSpec(window=window, key_bias=torch.zeros(2, n))
    with pytest.raises(BackendError, match="limit 1000"):
        kernels.attention(q, k, v, biased, "sdpa")
    small = Window((8, 8), band=4)
    with pytest.raises(BackendError, match="dense mask of 8192 elements"):
        kernels.attention(*(x[:, :, :64] for x in (q, k, v)), AttentionSpec(window=small), "sdpa")


def test_in_a_graph_sdpa_makes_a_tileable_window_dense(monkeypatch):
    """The tiles' plan lookups break a dynamo graph (fullgraph=True raised): inside torch.compile sdpa makes the window
    a dense mask, counted against its limit as such."""
    window = Window((32, 32), band=40)
    assert window_tiles.tileable(window)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, window.n_img, 8, generator=generator) for _ in range(3))
    spec = AttentionSpec(window=window)
    seen = []
    compiled = torch.compile(
        lambda q, k, v: (seen.append(sdpa.mask_elements(spec, 1, window.n_img, window.n_img)), sdpa.attention(q, k, v, spec)[0])[1],
        backend="eager", fullgraph=True,
    )
    torch.testing.assert_close(compiled(q, k, v).double(), dense(q, k, v, window), rtol=1e-5, atol=2e-6)
    assert seen == [window.n_img**2]
