"""Backends against the eager reference, and the reference against the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnctl.errors import BackendError, ConfigError
from attnctl.kernels import (
    BACKENDS,
    AttentionSpec,
    LabelMask,
    Sparse,
    Window,
    attention,
    choose_backend,
    validate_backend,
)
from attnctl.kernels.reference import entmax


def _qkv(b=2, h=3, nq=20, nk=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g), torch.randn(b, h, nk, d, generator=g))


def _naive(q, k, v, bias=None, scale_v=None, rows=None):
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, -1)
    out = probs @ v
    if scale_v is not None:
        scaled = probs @ (v * scale_v)
        out = scaled if rows is None else torch.where(rows[:, None], scaled, out)
    return out


def test_plain_matches_sdpa_bitwise():
    q, k, v = _qkv()
    out, lse = attention(q, k, v, AttentionSpec(), "sdpa")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert lse is None
    ref, lse = attention(q, k, v, AttentionSpec(return_lse=True), "reference")
    torch.testing.assert_close(ref, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, -1))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("query_range", [None, (4, 15)])
def test_value_scale_and_key_bias(backend, query_range):
    q, k, v = _qkv()
    scale = torch.rand(2, 12) * 2
    bias = torch.randn(2, 12)
    rows = torch.zeros(20, dtype=torch.bool)
    rows[slice(*query_range) if query_range else slice(None)] = True
    spec = AttentionSpec(value_scale=scale, key_bias=bias, query_range=query_range)
    out, _ = attention(q, k, v, spec, backend)
    full_bias = bias[:, None, None, :] * rows[:, None].float()
    expected = _naive(q, k, v, bias=full_bias, scale_v=scale[:, None, :, None], rows=rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_value_scale_equals_reweighted_probabilities():
    """Prompt-to-Prompt: A * w without renormalisation equals A (w * V)."""
    q, k, v = _qkv()
    w = torch.rand(2, 12) * 3
    out, _ = attention(q, k, v, AttentionSpec(value_scale=w), "sdpa")
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
    torch.testing.assert_close(out, (probs * w[:, None, None, :]) @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_labels_and_fully_masked_rows(backend):
    q, k, v = _qkv(nq=10, nk=10)
    q_labels = torch.tensor([[0] * 5 + [1] * 4 + [2]] * 2)
    k_labels = torch.tensor([[0] * 5 + [1] * 5] * 2)
    inf = float("-inf")
    table = torch.tensor([[[0.0, inf], [inf, -1.5], [inf, inf]]])  # label 2 sees nothing
    spec = AttentionSpec(labels=LabelMask(q_labels, k_labels, table))
    out, _ = attention(q, k, v, spec, backend)
    dense = table[0][q_labels[0]][:, k_labels[0]]
    expected = _naive(q, k, v, bias=torch.nan_to_num(dense, neginf=-1e30))
    expected[:, :, 9] = 0.0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("window", [Window((3, 4), radius=(1, 1), text_len=2, text_first=True), Window((3, 4), band=2, text_len=3)])
def test_window(backend, window):
    n = 12 + window.text_len
    q, k, v = _qkv(nq=n, nk=n)
    out, _ = attention(q, k, v, AttentionSpec(window=window), backend)
    allowed = window.allowed()
    expected = _naive(q, k, v, bias=torch.zeros(n, n).masked_fill(~allowed, float("-inf")))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    img = slice(window.text_len, None) if window.text_first else slice(0, 12)
    block = allowed[img, img]
    if window.radius:  # token (1, 1) sees its 3x3 neighbourhood only
        assert block[5].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    else:
        assert block[5].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


def _entmax_by_bisection(z, alpha):
    x = z * (alpha - 1)
    lo, hi = x.max(-1, keepdim=True).values - 1, x.max(-1, keepdim=True).values
    for _ in range(200):
        tau = (lo + hi) / 2
        total = (x - tau).clamp(min=0).pow(1 / (alpha - 1)).sum(-1, keepdim=True)
        lo, hi = torch.where(total >= 1, tau, lo), torch.where(total >= 1, hi, tau)
    return (x - (lo + hi) / 2).clamp(min=0).pow(1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 3.0])
def test_entmax_matches_definition(alpha):
    z = torch.randn(4, 7, 33, dtype=torch.float64) * 3
    p = entmax(z, alpha).double()
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 7, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p, _entmax_by_bisection(z, alpha), rtol=2e-4, atol=2e-4)
    assert (p == 0).any()  # sparse


def test_entmax_bisection_is_exact_to_float32_for_large_alpha():
    """Peters et al.'s entmax at alpha = 4 (p = (x - tau)^(1/3): steep at the support's edge) against a float64
    bisection of the definition: every probability to float32 rounding (a float32 tau moved one by 3e-3)."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 16, 77, generator=generator) * 3
    z[..., 60:] = float("-inf")
    expected = _entmax_by_bisection(z.double().clamp(min=-1e30), 4.0)
    expected = expected / expected.sum(-1, keepdim=True)
    got = entmax(z, 4.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


def test_sparsemax_known_values():
    z = torch.tensor([[1.0, 0.5, -3.0]])
    torch.testing.assert_close(entmax(z, 2.0), torch.tensor([[0.75, 0.25, 0.0]]))
    z = torch.tensor([[0.0, float("-inf"), 0.0]])
    torch.testing.assert_close(entmax(z, 1.5), torch.tensor([[0.5, 0.0, 0.5]]))


def test_reference_sparse_combination():
    q, k, v = _qkv()
    out, _ = attention(q, k, v, AttentionSpec(sparse=Sparse(alpha=2.0, scale=2.0)), "reference")
    logits = q @ k.transpose(-1, -2) / 8**0.5
    dense = torch.softmax(logits, -1) @ v
    sparse = entmax(logits, 2.0) @ v
    torch.testing.assert_close(out, dense + 2.0 * (sparse - dense), rtol=1e-5, atol=1e-5)


def test_backend_choice_and_refusals():
    assert choose_backend("auto", "cpu", ())[0] == "sdpa"
    assert choose_backend("auto", "cpu", ("sparse",))[0] == "reference"
    name, why = choose_backend("auto", "cpu", ("lse",))
    assert name == "reference" and "lse" in why
    with pytest.raises(BackendError, match="cannot do sparse"):
        choose_backend("sdpa", "cpu", ("sparse",))
    with pytest.raises(ConfigError, match="backend must be one of"):
        validate_backend("xformers")
    q, k, v = _qkv()
    with pytest.raises(BackendError):
        attention(q, k, v, AttentionSpec(return_lse=True), "sdpa")


def test_auto_skips_sdpa_past_its_dense_limit(monkeypatch):
    from attnctl import kernels
    from attnctl.kernels import sdpa

    over = sdpa.DENSE_MASK_LIMIT + 1
    assert choose_backend("auto", "cpu", ("labels",), dense_elements=sdpa.DENSE_MASK_LIMIT)[0] == "sdpa"
    name, why = choose_backend("auto", "cpu", ("labels",), dense_elements=over)
    assert name == ("flex" if "flex" in kernels.BACKENDS else "reference")
    assert f"sdpa would build a dense mask of {over} elements" in why
    assert choose_backend("auto", "cpu", ("window", "lse"), dense_elements=over)[0] == "reference"  # no lse in CPU flex
    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("sdpa", "reference"))
    assert choose_backend("auto", "cpu", ("window",), dense_elements=over)[0] == "reference"
    assert choose_backend("auto", "cpu", ("key_bias",), dense_elements=0)[0] == "sdpa"
    with pytest.raises(BackendError, match="dense mask of"):
        choose_backend("sdpa", "cpu", ("labels",), dense_elements=over)


def test_auto_attention_past_the_dense_limit_runs_on_another_backend(monkeypatch):
    """The reviewer's case at a small size: a label mask over sdpa's (lowered) limit is not sent to sdpa."""
    import dataclasses

    from attnctl import kernels

    monkeypatch.setitem(kernels.BACKENDS, "sdpa", dataclasses.replace(kernels.BACKENDS["sdpa"], dense_limit=100))
    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("sdpa", "reference"))  # keep flex's compilation out of this test
    monkeypatch.setattr(kernels.sdpa, "DENSE_MASK_LIMIT", 100)
    q, k, v = _qkv(nq=12, nk=12)
    labels = LabelMask(torch.zeros(2, 12, dtype=torch.long), torch.arange(12).remainder(2).expand(2, -1), torch.tensor([[[0.0, float("-inf")]]]))
    spec = AttentionSpec(labels=labels)
    assert spec.dense_elements(2, 12, 12) == 288
    with pytest.raises(BackendError, match="limit 100"):
        attention(q, k, v, spec, "sdpa")
    out, _ = attention(q, k, v, spec, "auto")
    ref, _ = attention(q, k, v, spec, "reference")
    torch.testing.assert_close(out, ref)


def test_sdpa_caches_dense_masks_per_label_mask_and_window(monkeypatch):
    import gc

    from attnctl.kernels import sdpa

    sdpa.clear_caches()
    built = []
    original = LabelMask.dense
    monkeypatch.setattr(LabelMask, "dense", lambda self: built.append(1) or original(self))
    q, k, v = _qkv(nq=12, nk=12)
    labels = LabelMask(torch.zeros(2, 12, dtype=torch.long), torch.arange(12).remainder(2).expand(2, -1), torch.tensor([[[0.0, -2.0]]]))
    spec = AttentionSpec(labels=labels)
    first, _ = attention(q, k, v, spec, "sdpa")
    second, _ = attention(q, k, v, AttentionSpec(labels=labels, key_bias=torch.zeros(2, 12)), "sdpa")
    assert torch.equal(first, second) and len(built) == 1  # one dense mask for both calls
    attention(q.double(), k.double(), v.double(), spec, "sdpa")
    assert len(built) == 2  # another dtype: built again
    torch.testing.assert_close(first, attention(q, k, v, spec, "reference")[0])
    assert len(sdpa._LABEL_DENSE) == 1
    del spec, labels
    gc.collect()
    assert len(sdpa._LABEL_DENSE) == 0  # the entry dies with its LabelMask

    window = Window((3, 4), radius=(1, 1))
    allowed = []
    original_allowed = Window.allowed
    monkeypatch.setattr(Window, "allowed", lambda self, device=None: allowed.append(1) or original_allowed(self, device))
    for _ in range(3):
        out, _ = attention(q, k, v, AttentionSpec(window=Window((3, 4), radius=(1, 1))), "sdpa")
    assert len(allowed) == 1  # windows are cached by value
    torch.testing.assert_close(out, attention(q, k, v, AttentionSpec(window=window), "reference")[0])


def test_per_key_shapes_are_checked_once_for_every_backend():
    from attnctl.kernels.spec import as_additive, per_key

    assert per_key(torch.ones(2, 5)).shape == (2, 1, 5)
    assert per_key(torch.ones(2, 3, 5), batch=2, heads=3, keys=5).shape == (2, 3, 5)
    with pytest.raises(ConfigError, match=r"key_bias must have shape \(B, Nk\) or \(B, H, Nk\) = \(2, \[3,\] 5\), got \(2, 4\)"):
        per_key(torch.ones(2, 4), "key_bias", batch=2, heads=3, keys=5)
    q, k, v = _qkv()
    for backend in ("reference", "sdpa"):
        with pytest.raises(ConfigError, match="value_scale must have shape"):
            attention(q, k, v, AttentionSpec(value_scale=torch.ones(2, 11)), backend)
    mask = torch.tensor([True, False])
    assert torch.equal(as_additive(mask), torch.tensor([0.0, float("-inf")]))
    assert as_additive(mask, torch.float16).dtype == torch.float16
    assert as_additive(torch.zeros(2), torch.float64).dtype == torch.float64


def test_sdpa_gets_the_mask_in_the_querys_dtype(monkeypatch):
    """A model's float32 mask (Chroma's) with bfloat16 queries and an edit: SDPA gets the mask in bfloat16, as CUDA's
    memory-efficient kernel requires (it refuses a bias of another dtype; the CPU promotes silently). float32's most
    negative value becomes bfloat16's, not -inf; the result agrees with the reference backend."""
    from attnctl.kernels import sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 6)
    mask[:, :, :, -2:] = torch.finfo(torch.float32).min
    spec = AttentionSpec(attn_mask=mask, key_bias=torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0]] * 2))
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", lambda *a, **kw: (seen.append(kw["attn_mask"]), real(*a, **kw))[1])
    out, _ = attention(q, k, v, spec, backend="sdpa")
    assert seen and all(m.dtype == torch.bfloat16 and torch.isfinite(m).all() for m in seen)
    expected, _ = attention(q, k, v, spec, backend="reference")
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    converted = sdpa._mask_in_dtype(mask, torch.bfloat16)  # made once per mask tensor, not per attention call
    assert sdpa._mask_in_dtype(mask, torch.bfloat16) is converted
    mask[:, :, :, 0] = float("-inf")  # in place: converted again, -inf kept
    again = sdpa._mask_in_dtype(mask, torch.bfloat16)
    assert again is not converted and torch.isneginf(again[..., 0]).all() and torch.isfinite(again[..., 1:]).all()


def test_sdpa_keeps_key_biases_and_label_tables_finite_in_float16(monkeypatch):
    """float32 key biases and label tables reach SDPA in the queries' dtype clamped to its range, as model masks do:
    in float16 a bias of +7e4 became +inf (the rows NaN), a penalty of -1e5 on every key -inf (the rows zeros), where
    the logits are float32 in the definition: +7e4 puts all the weight on its key, -1e5 on every key is the plain
    softmax. The conversion is made once per bias tensor, not per attention call."""
    from attnctl.kernels import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).half() for n in (4, 6, 6))
    softmax = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1) @ v.double()
    boost = AttentionSpec(key_bias=torch.tensor([[7e4, 0, 0, 0, 0, 0.0]]))
    out, _ = attention(q, k, v, boost, "sdpa")
    torch.testing.assert_close(out.double(), v[:, :, :1].double().expand(1, 2, 4, 16))
    everywhere = LabelMask(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long), torch.tensor([[[-1e5]]]))
    for spec in (AttentionSpec(key_bias=torch.full((1, 6), -1e5)), AttentionSpec(labels=everywhere)):
        out, _ = attention(q, k, v, spec, "sdpa")
        torch.testing.assert_close(out.double(), softmax, atol=4e-3, rtol=4e-3)
    conversions = []
    real = sdpa._in_dtype
    monkeypatch.setattr(sdpa, "_in_dtype", lambda *a: (conversions.append(1), real(*a))[1])
    for _ in range(3):
        attention(q, k, v, boost, "sdpa")
    assert len(conversions) <= 1


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_labels_every_row_shares_are_one_row(backend):
    """Labels every batch row shares (Regions' isolation) are one row of each tensor: the same output as the labels
    repeated per row, a (1, 1, Nq, Nk) dense mask that SDPA broadcasts, counted once against sdpa's dense limit."""
    q, k, v = _qkv(b=3, nq=10, nk=10)
    inf = float("-inf")
    q_labels = torch.tensor([[0] * 4 + [1] * 5 + [2]])
    table = torch.tensor([[[0.0, inf, -1.0], [inf, 0.0, -0.5], [inf, inf, inf]]])
    shared = LabelMask(q_labels, q_labels, table)
    repeated = LabelMask(q_labels.repeat(3, 1), q_labels.repeat(3, 1), table)
    out, _ = attention(q, k, v, AttentionSpec(labels=shared), backend)
    expected, _ = attention(q, k, v, AttentionSpec(labels=repeated), backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert shared.rows == 1 and shared.dense().shape == (1, 1, 10, 10) and shared.fully_masked_queries().shape == (1, 10)
    assert AttentionSpec(labels=shared).dense_elements(3, 10, 10) == 100
    assert AttentionSpec(labels=repeated).dense_elements(3, 10, 10) == 300
    mask = torch.zeros(3, 1, 1, 10)
    assert AttentionSpec(labels=shared, attn_mask=mask).dense_elements(3, 10, 10) == 300  # the sum has a row per mask row


def test_sdpa_adds_a_model_mask_and_labels_once_per_mask_tensor():
    """The model's mask plus a label mask is made once per mask tensor and LabelMask (every layer of a denoiser call
    passes the same ones), again after an in-place change of the mask, and forgotten when the mask dies."""
    import gc

    from attnctl.kernels import sdpa

    sdpa.clear_caches()
    q, k, v = _qkv(nq=12, nk=12)
    labels = LabelMask(torch.zeros(1, 12, dtype=torch.long), torch.arange(12).remainder(2)[None], torch.tensor([[[0.0, -2.0]]]))
    mask = torch.zeros(2, 1, 12, 12)
    mask[1, :, :, -3:] = float("-inf")
    spec = AttentionSpec(attn_mask=mask, labels=labels)
    out, _ = attention(q, k, v, spec, "sdpa")
    torch.testing.assert_close(out, attention(q, k, v, spec, "reference")[0])
    made = sdpa._shared_mask(spec, 12, 12, q)
    assert sdpa._shared_mask(spec, 12, 12, q) is made and made.shape == (2, 1, 12, 12)
    assert sdpa._shared_mask(AttentionSpec(attn_mask=mask.clone(), labels=labels), 12, 12, q) is not made  # another tensor
    mask[0, :, :, 0] = -1.0  # in place: made again
    again = sdpa._shared_mask(spec, 12, 12, q)
    assert again is not made and again[0, 0, 0, 0] == -1.0
    del spec, mask, made, again
    gc.collect()
    assert len(sdpa._SHARED_MASKS) == 0  # the entries went with their mask tensors


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_reference_goes_in_blocks_of_query_rows_past_its_element_budget(monkeypatch, alpha):
    """A large call never materialises all of its logits (the sparse transform's sort-based solution made about ten
    N x N tensors: Flux 1024 peaked at 25 GiB per attention call): blocks of query rows, as unblocked up to the rounding
    of the q k^T product on fewer rows (a different BLAS kernel; the softmax, entmax and P V of a row are bitwise)."""
    from attnctl.kernels import reference

    torch.manual_seed(0)
    b, h, n, d = 2, 3, 26, 8  # 14 image tokens (a 2 x 7 grid) after 12 text tokens
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    spec = AttentionSpec(
        key_bias=torch.randn(b, n), value_scale=torch.rand(b, n) + 0.5, query_range=(12, n), sparse=Sparse(alpha, 2.0),
        labels=LabelMask(torch.arange(n).remainder(3)[None], torch.arange(n).remainder(2)[None], torch.tensor([[[0.0, -1.0]] * 3])),
        window=Window((2, 7), radius=(1, 1), text_len=12, text_first=True), return_lse=True,
    )
    q.requires_grad_(True)
    whole, whole_lse = reference.attention(q, k, v, spec)
    calls = []
    real = reference._attention_rows
    monkeypatch.setattr(reference, "_attention_rows", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", b * h * n * 5)  # at most 5 rows a block
    blocks, blocks_lse = reference.attention(q, k, v, spec)
    # 26 rows need 6 blocks of 5: 8 (a power of two, `chunks.row_chunks`) of 4, the last one empty
    assert [(s.start, s.stop) for s in calls] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), (24, 26), (26, 26)]
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks_lse, whole_lse, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(blocks.sum(), [q])
    (expected,) = torch.autograd.grad(whole.sum(), [q])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_sdpa_sums_a_label_mask_and_key_bias_once_for_every_layer(monkeypatch):
    """The label mask is cached; its sum with the key bias (ConsistentSubjects(isolate=True): a (B, 1, Nq, Nk) tensor,
    128 MiB at SDXL 1024 for 2 images) was made again at every layer call: now once per pair of tensors, and it goes
    with the key bias."""
    import gc

    from attnctl.kernels import sdpa

    q, k, v = _qkv(nq=10, nk=12)
    labels = LabelMask(torch.zeros(2, 10, dtype=torch.long), torch.arange(12).remainder(2).expand(2, -1), torch.tensor([[[0.0, -2.0]]]))
    masks = []
    real = sdpa._call
    monkeypatch.setattr(sdpa, "_call", lambda q, k, v, mask, scale: masks.append(mask) or real(q, k, v, mask, scale))
    spec = AttentionSpec(labels=labels, key_bias=torch.randn(2, 12))
    outs = [attention(q, k, v, spec, "sdpa")[0] for _ in range(3)]  # three layers of one denoiser call
    assert len({id(m) for m in masks}) == 1 and all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0], attention(q, k, v, spec, "reference")[0], rtol=1e-5, atol=1e-5)
    spec = AttentionSpec(labels=labels, key_bias=torch.randn(2, 12))  # the next call's key bias: a new sum
    attention(q, k, v, spec, "sdpa")
    assert masks[-1] is not masks[0]
    del masks[:], spec
    gc.collect()
    assert len(sdpa._BIASED_MASKS) == 0  # each entry went with its key bias


@pytest.mark.parametrize("case", ["labels", "labels+bias", "window", "model mask+labels"])
def test_sdpa_lays_cached_masks_out_with_aligned_rows(monkeypatch, case):
    """CUDA's memory-efficient SDPA copies, at every call, a mask whose strides are not multiples of 8 elements
    (ATen's `preprocess_mask`; SD3's 4096 + 333 tokens): the cached masks are slices of tensors whose rows are padded
    to a multiple of 8, with the same values. Checked here with the CPU counted as a device that wants it."""
    from attnctl.kernels import sdpa

    nk = 13
    q, k, v = _qkv(b=2, nq=nk, nk=nk)
    labels = LabelMask(torch.arange(nk).remainder(3).expand(2, -1), torch.arange(nk).remainder(3).expand(2, -1),
                       torch.tensor([[[0.0, -3.0, float("-inf")], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    spec = {
        "labels": AttentionSpec(labels=labels),
        "labels+bias": AttentionSpec(labels=labels, key_bias=torch.randn(2, nk)),
        "window": AttentionSpec(window=Window((1, nk), band=2), query_range=(2, 9)),
        "model mask+labels": AttentionSpec(labels=labels, attn_mask=torch.rand(2, 1, 1, nk) > 0.2),
    }[case]
    sdpa.clear_caches()
    plain = attention(q, k, v, spec, "sdpa")[0]
    sdpa.clear_caches()
    monkeypatch.setattr(sdpa, "ALIGNED_DEVICES", frozenset({"cpu"}))
    masks = []
    real = sdpa._call
    monkeypatch.setattr(sdpa, "_call", lambda q, k, v, mask, scale: masks.append(mask) or real(q, k, v, mask, scale))
    aligned = attention(q, k, v, spec, "sdpa")[0]
    sdpa.clear_caches()
    assert torch.equal(aligned, plain)
    assert masks and all(m is not None for m in masks)
    for mask in masks:
        assert all(stride % sdpa.MASK_ALIGNMENT == 0 for stride, size in zip(mask.stride()[:-1], mask.shape[:-1]) if size > 1), mask.stride()


@pytest.mark.parametrize("length", [1, 11])
def test_sdpa_refuses_a_key_bias_of_the_wrong_length(length):
    """A key bias of one entry broadcast over every key (cancelled by the softmax) or of another length is refused by
    name, as the reference backend refuses it (the cached mask + key-bias sum had read the key count off the bias)."""
    q, k, v = _qkv(nq=10, nk=12)
    with pytest.raises(ConfigError, match="key_bias"):
        attention(q, k, v, AttentionSpec(key_bias=torch.randn(2, length)), "sdpa")


# --- float16 value scales past float16's range ---------------------------------------------------------------------


def _fp16_value_scale_case(layout):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=g).half() for _ in range(3))
    scale = torch.ones(2, 20)
    scale[:, 16:18] = 1e5
    scale[1, 3] = 0.0
    if layout == "rows":
        return q, k, v, AttentionSpec(value_scale=scale, query_range=(4, 20))  # two row groups: one flex graph less
    labels = torch.tensor([[0] * 10 + [1] * 10] * 2)
    table = torch.zeros(2, 2, 2)
    table[:, 0, 1] = float("-inf")
    return q, k, v, AttentionSpec(value_scale=scale, labels=LabelMask(labels, labels, table))


@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
@pytest.mark.parametrize("layout", ["rows", "labels"])
def test_float16_value_scale_past_its_range_gives_the_float32_output(backend, layout):
    """A value scale (Reweight's factor: valid up to float32's largest) of 1e5 in float16: sdpa, flex and triton
    scaled V (or P * w) in float16, where w * |v| past 65504 is inf and mixed-sign infs NaN (an all-NaN latent), though
    the output, an average of the scaled values, is finite, as the reference's float32 one is. They scale by w / peak
    and multiply the output by the peak."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available here")
    q, k, v, spec = _fp16_value_scale_case(layout)
    out, _ = attention(q, k, v, spec, backend)
    expected, _ = attention(q.float(), k.float(), v.float(), spec, "reference")
    assert torch.isfinite(out).all()
    assert expected.abs().max() > 1e4  # the scaled keys dominate: finite only because of the bound
    assert (out.float() - expected).abs().max() <= 2e-3 * expected.abs().max()


def test_float16_value_scale_of_at_most_one_and_other_dtypes_are_unchanged(monkeypatch):
    """The bound changes nothing where it is not needed: a float16 scale of at most 1 (peak 1) and bf16 / float32 at
    any scale give SDPA of (w * V) to the bit, as before. The bound is made once per value-scale tensor."""
    from attnctl.kernels import spec as spec_module

    for dtype, factor in ((torch.float16, 0.5), (torch.float16, 1.0), (torch.bfloat16, 1e5), (torch.float32, 1e5)):
        q, k, v = (t.to(dtype) for t in _qkv())
        scale = torch.ones(2, 12)
        scale[:, 3:5] = factor
        scale[:, 7] = 0.0
        out, _ = attention(q, k, v, AttentionSpec(value_scale=scale), "sdpa")
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v * scale[:, None, :, None].to(dtype))), (dtype, factor)
    made = []
    real = spec_module._bounded
    monkeypatch.setattr(spec_module, "_bounded", lambda s: (made.append(1), real(s))[1])
    q, k, v, spec = _fp16_value_scale_case("rows")
    for _ in range(3):
        attention(q, k, v, spec, "sdpa")
    assert len(made) == 1


def test_float16_pipeline_with_a_huge_reweight_factor_has_a_finite_latent():
    import attnctl
    from attnctl.testing import make_tiny_pipeline

    from .helpers import generate

    pipe = make_tiny_pipeline("tiny-sd").to(torch.float16)
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 1e5})], backend="auto"):
        latent = generate(pipe, "tiny-sd", prompt="a photo of a cat")
    assert torch.isfinite(latent).all()


def test_float16_value_scale_changed_in_place_under_inference_mode_is_read_again():
    """The bound is cached by tensor and version; a tensor made under inference_mode has no version, so it is not
    cached: a scale changed in place between calls (a control updating it per step) is read again."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 16, 16).half() * 0.1, torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16).half()
    with torch.inference_mode():
        scale = torch.ones(1, 8)
        scale[:, 2] = 50.0
        attention(q, k, v, AttentionSpec(value_scale=scale), "sdpa")
        scale[:, 2] = 2.0
        got, _ = attention(q, k, v, AttentionSpec(value_scale=scale), "sdpa")
        expected, _ = attention(q.float(), k.float(), v.float(), AttentionSpec(value_scale=scale), "reference")
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-3)
