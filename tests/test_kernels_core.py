"""Backends against the eager reference, and the reference against the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnctl.errors import BackendError, ConfigError
from attnctl.kernels import AttentionSpec, LabelMask, Sparse, Window, attention, choose_backend, validate_backend
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
