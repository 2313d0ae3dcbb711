"""The grouped label kernel (`triton_labels`) against the eager reference, and its tile classification.

Runs in the Triton interpreter on CPU (conftest.py sets TRITON_INTERPRET=1) on small shapes; on a CUDA
machine with TRITON_INTERPRET=0 the same tests run on the GPU. Speed is measured by
benchmarks/bench_kernels.py on a GPU, not here.
"""

from __future__ import annotations

import gc

import pytest
import torch

from attnctl.errors import BackendError, ConfigError
from attnctl.kernels import BACKENDS, AttentionSpec, LabelMask, Sparse, Window, reference

triton = pytest.importorskip("triton")
from attnctl.kernels import triton_attention as ta  # noqa: E402
from attnctl.kernels import triton_labels as tlab  # noqa: E402

INTERPRETED = ta.interpreted()
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
INF = float("-inf")


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def _close(out, ref, lse=None, ref_lse=None, tol=2e-5):
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    if ref_lse is not None:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=tol, atol=tol)


def grid_regions(h: int, w: int, count: int = 4, batch: int = 1) -> LabelMask:
    """The benchmark's layout at a small size: `count` subject boxes in two rows plus a background border;
    subjects never see each other, background sees and is seen by everything."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    per_row = count // 2
    label = 1 + (rows * 2 // h) * per_row + cols * per_row // w
    label = torch.where((rows < 2) | (cols < 2), 0, label).flatten()
    table = torch.full((count + 1, count + 1), INF)
    table.fill_diagonal_(0.0)
    table[0, :] = 0.0
    table[:, 0] = 0.0
    labels = label[None].expand(batch, -1).contiguous().to(DEVICE)
    return LabelMask(labels, labels, table[None].to(DEVICE))


_TABLE = [[0.0, INF, -0.5], [INF, 0.0, 0.0], [INF, INF, INF]]  # label 2 sees nothing: dead rows


def _random_labels(batch, nq, nk, seed, table=_TABLE, same=False):
    g = torch.Generator().manual_seed(seed)
    q_labels = torch.randint(0, 3, (batch, nq), generator=g)
    q_labels[:, min(3, nq - 1)] = 2
    k_labels = q_labels if same else torch.randint(0, 3, (batch, nk), generator=g)
    ql = q_labels.to(DEVICE)
    return LabelMask(ql, ql if same else k_labels.to(DEVICE), torch.tensor(table).expand(batch, -1, -1).contiguous().to(DEVICE))


CASES = {
    "labels": dict(),
    "mask": dict(mask=True),
    "bias+scale+range": dict(bias=True, scale=True, qrange=(5, 33)),
    "all+lse": dict(mask=True, bias=True, scale=True, qrange=(0, 30), lse=True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("same", [False, True], ids=["cross", "self"])
def test_grouped_kernel_matches_reference(case, same):
    opts = CASES[case]
    batch, heads, n = 2, 2, 45
    labels = _random_labels(batch, n, n, seed=len(case), same=same)
    fields = {"labels": labels, "return_lse": opts.get("lse", False)}
    if opts.get("mask"):
        fields["attn_mask"] = _rand(batch, 1, 1, n, seed=7)
    if opts.get("bias"):
        fields["key_bias"] = _rand(batch, heads, n, seed=8)
    if opts.get("scale"):
        fields["value_scale"] = _rand(batch, n, seed=9).abs()
    if opts.get("qrange"):
        fields["query_range"] = opts["qrange"]
    spec = AttentionSpec(**fields)
    q, k, v = _rand(batch, heads, n, 24, seed=1), _rand(batch, heads, n, 24, seed=2), _rand(batch, heads, n, 24, seed=3)
    out, lse = tlab.attention(q, k, v, spec, config=ta.Config(16, 16))
    ref, ref_lse = reference.attention(q, k, v, spec)
    _close(out, ref, lse, ref_lse)
    dead = labels.fully_masked_queries()
    assert dead.any() and (out.masked_select(dead[:, None, :, None]) == 0).all()


@pytest.mark.parametrize("nq, nk, head_dim", [(1, 1, 16), (17, 40, 40), (70, 9, 8)])
def test_odd_sizes_and_strided_inputs(nq, nk, head_dim):
    labels = _random_labels(1, nq, nk, seed=nq)
    q = _rand(1, nq, 3, head_dim, seed=1).transpose(1, 2)  # (B, N, H, D) viewed as (B, H, N, D)
    k, v = _rand(1, nk, 3, head_dim, seed=2).transpose(1, 2), _rand(1, nk, 3, head_dim, seed=3).transpose(1, 2)
    spec = AttentionSpec(labels=labels, return_lse=True)
    out, lse = tlab.attention(q, k, v, spec, config=ta.Config(16, 16))
    ref, ref_lse = reference.attention(q, k, v, spec)
    _close(out, ref, lse, ref_lse)


def test_fp16_matches_reference():
    labels = grid_regions(8, 8)
    q, k, v = (_rand(1, 2, 64, 32, seed=s).half() for s in (1, 2, 3))
    out, _ = tlab.attention(q, k, v, AttentionSpec(labels=labels), config=ta.Config(16, 16))
    assert out.dtype == torch.float16
    _close(out, reference.attention(q, k, v, AttentionSpec(labels=labels))[0], tol=4e-3)


def _brute_classes(labels: LabelMask, layout: tlab.Layout, bm: int, bn: int) -> torch.Tensor:
    """Tile classes from the dense mask in the sorted order: SKIPPED if every pair is -inf, OPEN if every pair
    is 0, else MIXED (out-of-range positions of the last tiles do not count)."""
    dense = labels.dense()[:, 0].cpu()
    batch, nq, nk = dense.shape
    out = torch.zeros(layout.classes.shape, dtype=torch.int8)
    for b in range(batch):
        grouped = dense[b][layout.q_perm[b].long().cpu()][:, layout.k_perm[b].long().cpu()]
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                tile = grouped[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
                if torch.isneginf(tile).all():
                    out[b, i, j] = tlab.SKIPPED
                elif (tile == 0).all():
                    out[b, i, j] = tlab.OPEN
                else:
                    out[b, i, j] = tlab.MIXED
    return out


@pytest.mark.parametrize("make", [lambda: grid_regions(16, 16, batch=2), lambda: _random_labels(2, 50, 37, seed=3)], ids=["regions", "random"])
def test_tile_classes_are_exact(make):
    labels = make()
    nq, nk = labels.q_labels.shape[1], labels.k_labels.shape[1]
    layout = tlab.layout(labels, nq, nk, 16, 8, torch.device("cpu"))
    assert torch.equal(layout.classes.cpu(), _brute_classes(labels, layout, 16, 8))
    for b in range(labels.q_labels.shape[0]):  # the permutations sort the labels
        assert torch.equal(labels.q_labels[b][layout.q_perm[b].long()].cpu(), layout.q_sorted[b].long().cpu())
        assert (layout.q_sorted[b][1:] >= layout.q_sorted[b][:-1]).all()
    counts, order, classes = layout.counts.long(), layout.order.long(), layout.classes
    assert torch.equal(counts[..., 0], (classes == tlab.OPEN).sum(-1))
    assert torch.equal(counts[..., 1], (classes == tlab.MIXED).sum(-1))
    ranked = classes.gather(-1, order)  # open tiles, then mixed, then skipped
    position = torch.arange(order.shape[-1])
    assert ((ranked == tlab.OPEN) == (position < counts[..., :1])).all()
    assert ((ranked == tlab.MIXED) == ((position >= counts[..., :1]) & (position < counts.sum(-1, keepdim=True)))).all()


def test_grouping_skips_what_the_token_order_cannot():
    """On the benchmark's kind of layout the token order visits (nearly) every tile and gathers the table in
    each; grouped, whole tiles are skipped and most visited ones need no per-element mask."""
    labels = grid_regions(32, 32)
    n = 32 * 32
    ungrouped = ta._label_tiles(labels, n, n, 64, 64)
    layout = tlab.layout(labels, n, n, 64, 64, torch.device("cpu"))
    visited = (layout.classes != tlab.SKIPPED).sum().item()
    mixed = (layout.classes == tlab.MIXED).sum().item()
    assert visited < ungrouped.sum().item()
    assert mixed < visited / 2
    allowed = (labels.dense() > INF).float().mean().item()
    assert visited / layout.classes.numel() < allowed + 0.25  # tiles visited close to the allowed fraction


def test_layout_cached_per_object_small_and_dropped_with_it(monkeypatch):
    labels = grid_regions(8, 8)
    n = 64
    spec = AttentionSpec(labels=labels)
    q = _rand(1, 1, n, 16)
    built = []
    original = tlab.tile_classes
    monkeypatch.setattr(tlab, "tile_classes", lambda *a: built.append(1) or original(*a))
    for _ in range(3):
        tlab.attention(q, q, q, spec, config=ta.Config(16, 16))
    assert len(built) == 1
    layout = tlab.layout(labels, n, n, 16, 16, q.device)
    tiles = layout.classes.numel()
    elements = sum(t.numel() for t in (layout.q_perm, layout.q_sorted, layout.k_perm, layout.k_sorted, layout.counts, layout.order))
    assert elements <= 4 * n + 3 * tiles  # O(N + tiles), no N x N
    labels.q_labels[0, 0] = 1  # an in-place change rebuilds
    tlab.attention(q, q, q, spec, config=ta.Config(16, 16))
    assert len(built) == 2
    key = id(labels)
    del spec, labels
    gc.collect()
    assert key not in tlab._LAYOUTS


def test_backend_routes_labels_to_the_grouped_kernel(monkeypatch):
    calls = []
    original = tlab.attention
    monkeypatch.setattr(tlab, "attention", lambda *a, **kw: calls.append(a[3]) or original(*a, **kw))
    labels = grid_regions(6, 6)
    q = _rand(1, 2, 36, 16)
    fn = BACKENDS["triton"].fn
    out, _ = fn(q, q, q, AttentionSpec(labels=labels, key_bias=_rand(1, 36)))
    assert len(calls) == 1
    fn(q, q, q, AttentionSpec(labels=labels, window=Window((6, 6), radius=(1, 1))))  # windows: ungrouped kernel
    fn(q, q, q, AttentionSpec(labels=labels, sparse=Sparse(1.5, 2.0)))  # PLADIS: sparse kernel
    assert len(calls) == 1


def test_refusals():
    q = _rand(1, 1, 8, 16)
    with pytest.raises(BackendError, match="labels and without window"):
        tlab.attention(q, q, q, AttentionSpec())
    bad = LabelMask(torch.tensor([[0] * 7 + [5]]).to(DEVICE), torch.zeros(1, 8, dtype=torch.long).to(DEVICE), torch.zeros(1, 2, 2).to(DEVICE))
    with pytest.raises(ConfigError, match="q_labels must lie in"):
        tlab.attention(q, q, q, AttentionSpec(labels=bad))
    with pytest.raises(ConfigError, match="label vectors must be"):
        tlab.attention(q, q, q, AttentionSpec(labels=LabelMask(torch.zeros(1, 7, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 1, 1))))


@pytest.mark.parametrize("same", [False, True], ids=["cross", "self"])
def test_labels_every_row_shares_run_per_row(same):
    """One-row labels (every batch row shares them: Regions' isolation) through the registered backend: repeated per
    row for the kernels, the output of the labels given per row."""
    from attnctl.kernels.semantics import labels_for_batch

    one = _random_labels(1, 40, 40, seed=5, same=same)
    shared = LabelMask(one.q_labels, one.q_labels if same else one.k_labels, one.table[:1])
    repeated = labels_for_batch(shared, 3)
    assert labels_for_batch(shared, 3) is repeated and tuple(repeated.q_labels.shape) == (3, 40)
    assert (repeated.k_labels is repeated.q_labels) == same  # one vector stays one (one sort)
    q, k, v = _rand(3, 2, 40, 16, seed=1), _rand(3, 2, 40, 16, seed=2), _rand(3, 2, 40, 16, seed=3)
    fn = BACKENDS["triton"].fn
    for spec in (AttentionSpec(labels=shared), AttentionSpec(labels=shared, window=Window((5, 8), radius=(1, 1)))):
        out, _ = fn(q, k, v, spec)
        _close(out, reference.attention(q, k, v, spec)[0])
