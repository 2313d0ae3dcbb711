"""The flex backend against the eager reference. Compiled flex costs several seconds per new shape on a
CPU, so the compiled tests share two shapes (a query range splits the call into two row groups)."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
import torch.nn.functional as F

from attnctl.errors import BackendError
from attnctl.kernels import BACKENDS, AttentionSpec, LabelMask, Sparse, Window, choose_backend, reference
from attnctl.kernels import sdpa as kernels_sdpa

flex = pytest.importorskip("attnctl.kernels.flex")
from torch.nn.attention.flex_attention import create_mask  # noqa: E402

INF = float("-inf")
WINDOW = Window((5, 8), radius=(1, 2), text_len=5, text_first=True)
N = 45


def _labels(seed: int) -> LabelMask:
    g = torch.Generator().manual_seed(seed)
    q_labels = torch.randint(0, 3, (2, N), generator=g)
    q_labels[:, 5:7] = 2  # label 2 sees nothing: fully masked rows
    k_labels = torch.randint(0, 2, (2, N), generator=g)
    return LabelMask(q_labels, k_labels, torch.tensor([[[0.0, INF], [INF, -1.5], [INF, INF]]]))


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, N, 16, generator=g) for _ in range(3))
    spec = AttentionSpec(
        attn_mask=torch.randn(2, 1, 1, N, generator=g),
        key_bias=torch.randn(2, N, generator=g),
        value_scale=torch.rand(2, N, generator=g) * 2,
        query_range=(5, N),  # the image rows of a text-first joint layout
        labels=_labels(seed),
        window=WINDOW,
    )
    return q, k, v, spec


def test_flex_matches_reference_and_never_recompiles_per_step():
    from torch._dynamo.utils import counters

    q, k, v, spec = _inputs(0)
    out, lse = flex.attention(q, k, v, spec)
    assert lse is None
    ref, _ = reference.attention(q, k, v, spec)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    dead = spec.labels.fully_masked_queries()
    assert dead.any() and (out.masked_select(dead[:, None, :, None]) == 0).all()

    graphs = counters["stats"]["unique_graphs"]
    q, k, v, spec = _inputs(1)  # a new step: new values, new labels object, same shapes and controls
    out, _ = flex.attention(q, k, v, spec)
    torch.testing.assert_close(out, reference.attention(q, k, v, spec)[0], rtol=2e-5, atol=2e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "a new step recompiled flex"


def test_block_masks_cached_per_layout_and_label_object():
    labels = _labels(3)
    spec = AttentionSpec(labels=labels, window=WINDOW)
    first = flex.block_mask(spec, 2, (0, N), N, torch.device("cpu"))
    assert flex.block_mask(spec, 2, (0, N), N, torch.device("cpu")) is first
    window_only = AttentionSpec(window=WINDOW)
    assert flex.block_mask(window_only, 2, (5, N), N, torch.device("cpu")) is flex.block_mask(window_only, 1, (5, N), N, torch.device("cpu"))
    key = id(labels)
    assert key in flex._LABEL_MASKS
    del spec, labels, first
    gc.collect()
    assert key not in flex._LABEL_MASKS


@pytest.mark.parametrize("window", [
    WINDOW, Window((4, 6), band=3, text_len=4), Window((3, 7), radius=(0, 1)),
    Window((3, 4), radius=(1, 1, 2), frames=3, text_len=5, text_first=True), Window((2, 3), radius=(0, 1, 0), frames=4, text_len=3),
])
@pytest.mark.parametrize("offset", [0, 4])
def test_mask_mods_are_the_spec(window, offset):
    """The mask_mods evaluated densely (no compilation) equal the spec's own dense masks (video: 3-D windows)."""
    n = window.n_img + window.text_len
    mask = create_mask(flex.window_mask(window, offset), None, None, n - offset, n, device="cpu")
    assert torch.equal(mask[0, 0], window.allowed()[offset:])
    labels = _labels(5)
    allowed = labels.table.expand(2, -1, -1) > INF
    mask = create_mask(flex.label_mask(labels.q_labels, labels.k_labels, allowed, offset), 2, None, N - offset, N, device="cpu")
    assert torch.equal(mask[:, 0], labels.dense()[:, 0, offset:] > INF)


def test_mod_names_are_readable():
    t = torch.zeros(1, 1, 4)
    mods = (flex.additive_mask(torch.zeros(1, 1, 1, 4)), flex.key_bias(t), flex.label_bias(t[0].long(), t[0].long(), t))
    assert [m.__name__ for m in mods] == ["additive_mask", "key_bias", "label_bias"]
    assert flex.compose(mods).__name__ == "additive_mask+key_bias+label_bias"
    assert flex.window_mask(WINDOW).__name__ == "window_2d"
    assert flex.window_mask(Window((2, 2), band=1)).__name__ == "window_band"


def test_flex_refusals_and_plain_calls():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(BackendError, match="per-row threshold"):
        flex.attention(q, q, q, AttentionSpec(sparse=Sparse()))
    with pytest.raises(BackendError, match="log-sum-exp on CPU"):
        flex.attention(q, q, q, AttentionSpec(key_bias=torch.zeros(1, 8), return_lse=True))
    assert torch.equal(flex.attention(q, q, q, AttentionSpec())[0], F.scaled_dot_product_attention(q, q, q))
    # the capability table says the same, and auto reads it
    assert "sparse" not in BACKENDS["flex"].features
    with pytest.raises(BackendError, match="lse on cpu"):
        choose_backend("flex", "cpu", ("lse",))
    assert choose_backend("flex", "cuda", ("lse",))[0] == "flex"
    # label masks on CUDA: dense SDPA while the mask fits, then flex (measured faster than the ungrouped triton kernel)
    assert choose_backend("auto", "cuda", ("key_bias", "labels"))[0] == "sdpa"
    over = kernels_sdpa.DENSE_MASK_LIMIT + 1
    assert choose_backend("auto", "cuda", ("key_bias", "labels"), dense_elements=over)[0] == "flex"
    assert choose_backend("auto", "cpu", ("labels", "window"))[0] == "sdpa"


def test_labels_run_on_the_grouped_order():
    """Label masks without a window: q / k / v rows gathered into the label-sorted order (cached permutation
    and BlockMask per LabelMask), output scattered back; same result as the reference, dead rows zero."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, N, 16, generator=g) for _ in range(3))
    labels = _labels(5)
    spec = AttentionSpec(labels=labels, key_bias=torch.randn(2, N, generator=g), value_scale=torch.rand(2, N, generator=g) * 2)
    assert flex.grouped(spec) and not flex.grouped(AttentionSpec(labels=labels, window=WINDOW))
    out, _ = flex.attention(q, k, v, spec)
    torch.testing.assert_close(out, reference.attention(q, k, v, spec)[0], rtol=2e-5, atol=2e-5)
    dead = labels.fully_masked_queries()
    assert dead.any() and (out.masked_select(dead[:, None, :, None]) == 0).all()
    first = flex.grouped_layout(labels, 2, N, N, torch.device("cpu"))
    assert flex.grouped_layout(labels, 2, N, N, torch.device("cpu")) is first
    key = id(labels)
    del spec, labels, first
    gc.collect()
    assert key not in flex._GROUPED


def test_grouped_block_mask_has_open_blocks_where_the_token_order_has_none():
    """On a region layout (boxes + background border) the token order leaves every block partial (mask_mod
    everywhere); sorted by label, blocks become full (no mask_mod) or empty (skipped)."""
    h = w = 32
    rows, cols = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None, :].expand(h, w)
    label = torch.where((rows < 2) | (cols < 2), 0, 1 + (rows * 2 // h) * 2 + cols * 2 // w).flatten()[None]
    table = torch.full((5, 5), INF)
    table.fill_diagonal_(0.0)
    table[0], table[:, 0] = 0.0, 0.0
    labels = LabelMask(label, label, table[None])
    n = h * w
    token_order = flex.block_mask(AttentionSpec(labels=labels), 1, (0, n), n, torch.device("cpu"))
    grouped = flex.grouped_layout(labels, 1, n, n, torch.device("cpu"))[-1]
    assert int(token_order.full_kv_num_blocks.sum()) == 0
    assert int(grouped.full_kv_num_blocks.sum()) > 0
    assert int(grouped.kv_num_blocks.sum() + grouped.full_kv_num_blocks.sum()) < int(token_order.kv_num_blocks.sum())


def test_inputs_flex_cannot_take_move_that_call_only(monkeypatch):
    """float64 tensors, or a call with no keys, are inputs compiled flex does not compile for: UnsupportedInputError, so
    `auto` runs that call on the next backend and nothing is recorded (the Inductor failure used to be recorded as
    flex failing on the device, refusing every later flex call there)."""
    import warnings

    from attnctl import kernels
    from attnctl.errors import UnsupportedInputError

    monkeypatch.setattr(kernels, "KERNEL_FAILURES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("flex", "sdpa", "reference"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, N, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, N, generator=g, dtype=torch.float64)
    spec = AttentionSpec(key_bias=bias)
    with pytest.raises(UnsupportedInputError, match="fp16, bf16, fp32; got torch.float64"):
        kernels.attention(q, k, v, spec, "flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one warning that auto moved the call on
        out, _ = kernels.attention(q, k, v, spec, "auto")
    expected = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias[:, None, None, :], -1) @ v
    torch.testing.assert_close(out, expected)
    empty = AttentionSpec(key_bias=torch.zeros(2, 0))
    with pytest.raises(UnsupportedInputError, match="at least one query and one key, got 45 and 0"):
        kernels.attention(q.float(), k[:, :, :0].float(), v[:, :, :0].float(), empty, "flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, _ = kernels.attention(q.float(), k[:, :, :0].float(), v[:, :, :0].float(), empty, "auto")
    assert out.shape == (2, 2, N, 16) and (out == 0).all()  # a row that attends to no key gives zeros
    assert not kernels.KERNEL_FAILURES and choose_backend("auto", "cpu", spec.features())[0] == "flex"


def test_labels_every_row_shares_run_per_row():
    """One-row labels (every batch row shares them: Regions' isolation) are repeated per row for flex's mods, as one
    derived LabelMask per batch size (flex's caches are per object): the output of the labels given per row."""
    q, k, v, spec = _inputs(0)
    labels = spec.labels
    shared = LabelMask(labels.q_labels[:1], labels.k_labels[:1], labels.table)
    repeated = LabelMask(shared.q_labels.repeat(2, 1), shared.k_labels.repeat(2, 1), shared.table)
    out, _ = flex.attention(q, k, v, dataclasses.replace(spec, labels=shared))
    expected, _ = flex.attention(q, k, v, dataclasses.replace(spec, labels=repeated))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, reference.attention(q, k, v, dataclasses.replace(spec, labels=shared))[0], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# BlockMasks built over chunks of query blocks (bounded mask memory at video sizes)
# ---------------------------------------------------------------------------------------------------------

MASK_BLOCK = 128  # torch's BlockMask tile
CHUNK_WINDOWS = {
    "2d": Window((16, 20), radius=(2, 3), text_len=7, text_first=True),
    "3d": Window((6, 8), radius=(1, 1, 2), frames=6, text_len=5),
    "band": Window((15, 20), band=17, text_len=9, text_first=True),
}


def _chunk_labels(n: int, batch: int, seed: int) -> LabelMask:
    g = torch.Generator().manual_seed(seed)
    q_labels = torch.randint(0, 3, (batch, n), generator=g)
    q_labels[:, :140] = 1  # whole blocks of one label: full and empty tiles as well as partial ones
    table = torch.tensor([[[0.0, INF, 0.0], [INF, -1.0, INF], [0.0, INF, INF]]])
    return LabelMask(q_labels, q_labels if seed % 2 else torch.randint(0, 3, (batch, n), generator=g), table)


def _used(blocks: torch.Tensor | None, indices: torch.Tensor | None) -> list:
    """The kv block lists a kernel reads: per (b, h, query block), the first `blocks` entries of `indices`."""
    if blocks is None:
        return [None]
    flat_blocks, flat_indices = blocks.flatten(0, -2), indices.flatten(0, -3)
    return [[row[:int(k)].tolist() for row, k in zip(rows, ks)] for rows, ks in zip(flat_indices, flat_blocks)]


def _same_block_mask(a, b) -> None:
    assert a.seq_lengths == b.seq_lengths and a.BLOCK_SIZE == b.BLOCK_SIZE
    for blocks, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                            ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        assert torch.equal(getattr(a, blocks), getattr(b, blocks)), blocks
        assert _used(getattr(a, blocks), getattr(a, indices)) == _used(getattr(b, blocks), getattr(b, indices)), indices


def _build_cases():
    """(name, batch, rows evaluated, build()) for every BlockMask flex.py makes: windows alone, labels with and without
    a window (token order, a row group starting past 0) and the label-sorted order."""
    cpu = torch.device("cpu")
    cases = []
    for name, w in CHUNK_WINDOWS.items():
        n = w.n_img + w.text_len
        cases.append((f"window {name}", 1, n, lambda w=w, n=n: flex.block_mask(AttentionSpec(window=w), 1, (0, n), n, cpu)))
        cases.append((f"window {name} rows 5:", 1, n - 5, lambda w=w, n=n: flex.block_mask(AttentionSpec(window=w), 1, (5, n), n, cpu)))
    w = CHUNK_WINDOWS["2d"]
    n = w.n_img + w.text_len
    for seed in (0, 1):
        cases.append((f"labels {seed}", 2, n - 3, lambda n=n, s=seed: flex.block_mask(AttentionSpec(labels=_chunk_labels(n, 2, s)), 2, (3, n), n, cpu)))
        cases.append((f"labels&window {seed}", 2, n - 7, lambda n=n, s=seed: flex.block_mask(
            AttentionSpec(labels=_chunk_labels(n, 2, s), window=w), 2, (7, n), n, cpu)))
        cases.append((f"grouped labels {seed}", 2, n, lambda n=n, s=seed: flex.grouped_layout(_chunk_labels(n, 2, s), 2, n, n, cpu)[-1]))
    return cases


@pytest.mark.parametrize("blocks_per_chunk", [1, 2])
def test_block_masks_built_in_chunks_equal_the_one_shot_ones(monkeypatch, blocks_per_chunk):
    """Past `MASK_CHUNK_ELEMENTS` the mask_mod is evaluated over chunks of whole query blocks, never more than the
    budget (or one block of rows) at once, and the joined BlockMask is the one-shot one, list for list; under the
    budget it is today's single `create_block_mask` call."""
    real = flex.create_block_mask
    calls = []

    def spy(mod, batch, heads, q_len, kv_len, **kwargs):
        calls.append((batch or 1) * q_len * kv_len)
        return real(mod, batch, heads, q_len, kv_len, **kwargs)

    monkeypatch.setattr(flex, "create_block_mask", spy)
    for name, batch, rows, build in _build_cases():
        n = build().seq_lengths[1]
        monkeypatch.setattr(flex, "MASK_CHUNK_ELEMENTS", batch * rows * n, raising=False)
        flex.clear_caches()
        calls.clear()
        one_shot = build()
        assert calls == [batch * rows * n], name
        budget = batch * blocks_per_chunk * MASK_BLOCK * n
        monkeypatch.setattr(flex, "MASK_CHUNK_ELEMENTS", budget + batch * n - 1, raising=False)  # a little under one more row
        flex.clear_caches()
        calls.clear()
        chunked = build()
        assert len(calls) == -(-rows // (blocks_per_chunk * MASK_BLOCK)) > 1 and max(calls) <= budget, (name, calls)
        assert chunked.mask_mod.__name__ == one_shot.mask_mod.__name__ != "shifted"  # the unshifted mod, for partial tiles
        _same_block_mask(chunked, one_shot)
    monkeypatch.setattr(flex, "MASK_CHUNK_ELEMENTS", 1, raising=False)
    flex.clear_caches()
    calls.clear()
    flex.block_mask(AttentionSpec(window=CHUNK_WINDOWS["3d"]), 1, (0, 293), 293, torch.device("cpu"))
    assert calls == [128 * 293] * 2 + [37 * 293]  # a budget under one block of rows: one block at a time
    flex.clear_caches()


def test_flex_outputs_with_chunked_block_masks_are_bitwise_the_one_shot_ones(monkeypatch):
    """Compiled flex with a chunk-built BlockMask (labels and a 3-D window, the combined mask_mod, with a label bias
    and a key bias) gives the very output of the one-shot one. One compiled shape: a cold compile costs ~20 s on a CPU."""
    w = CHUNK_WINDOWS["3d"]
    n = w.n_img + w.text_len
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    spec = AttentionSpec(labels=_chunk_labels(n, 2, 1), window=w, key_bias=torch.randn(2, n, generator=g))
    outs = []
    for budget in (1 << 30, 1):
        monkeypatch.setattr(flex, "MASK_CHUNK_ELEMENTS", budget, raising=False)
        flex.clear_caches()
        outs.append(flex.attention(q, k, v, spec)[0])
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], reference.attention(q, k, v, spec)[0], rtol=2e-5, atol=2e-5)
    flex.clear_caches()


def test_model_masks_are_read_in_their_own_dtype(monkeypatch):
    """Flex reads the model's mask without a float32 copy per call: Chroma's dense (B, 1, N, N) 0/1 mask in the model
    dtype as it is (diffusers adds it as it is), which the score_mod adds to the float32 score (an exact promotion:
    the reference's output), and a bool key mask (Qwen-Image, Z-Image) made additive in the queries' dtype once per
    mask. Before, every call copied the mask to float32 (`mask.float()`) and made a bool mask additive. Flex runs
    uncompiled here (a new mask dtype is a new graph: about 15 s of CPU for Inductor; compiled, the output is the same)."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnctl.kernels.spec import additive_in

    monkeypatch.setattr(flex, "compiled_flex", lambda: flex_attention)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, N, 16, generator=g) for _ in range(3))
    keys = torch.ones(2, N, dtype=torch.bool)
    keys[1, 30:] = False  # the second row's padding
    dense = (keys[:, None, :, None] & keys[:, None, None, :]).to(torch.float16)
    spec = AttentionSpec(attn_mask=dense, key_bias=torch.randn(2, N, generator=g))
    out, _ = flex.attention(q, k, v, spec)
    torch.testing.assert_close(out, reference.attention(q, k, v, spec)[0], rtol=2e-5, atol=2e-5)
    assert flex._mask4(dense, N, N, q.dtype) is dense
    key_mask = keys[:, None, None, :]
    read = flex._mask4(key_mask, N, N, torch.float16)
    assert read.dtype == torch.float16 and read is additive_in(key_mask, torch.float16)
    assert read is flex._mask4(keys[:, None, None, :], N, N, torch.float16)  # another view of the same mask: made once
    assert torch.equal(read.isinf(), ~key_mask) and (read <= 0).all()
