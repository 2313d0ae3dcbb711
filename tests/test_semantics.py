"""kernels.semantics: one meaning of an `AttentionSpec` (restrict a spec, evaluate it on a block), and the
behaviour changes of issue #22's "one module for spec semantics" (see /work/notes/22-semantics.md): each test
named `test_change_*` pins one of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnctl
from attnctl import AttentionMaps
from attnctl.control import Bound, Control
from attnctl.controls.guidance.pag import joint_identity
from attnctl.controls.guidance.sag import received_attention
from attnctl.errors import ConfigError, UnsupportedError
from attnctl.kernels import reference
from attnctl.kernels.semantics import (
    block_bias,
    block_logits,
    merge_specs,
    pair_bias,
    probabilities,
    spec_tokens,
)
from attnctl.kernels.spec import AttentionSpec, LabelMask, Sparse, Window, as_additive
from attnctl.processors.edit import Edit, LayerHook, merge_edits
from attnctl.testing import CALL_DEFAULTS

from .reference_attention import layout, text_positions
from .test_guidance_math import ref_entmax

INF = float("-inf")


def _labels(batch: int, n: int, seed: int = 0) -> LabelMask:
    g = torch.Generator().manual_seed(seed)
    table = torch.tensor([[[0.0, -1.5, INF], [INF, 0.0, -0.5], [0.0, 0.0, 0.0]]])
    return LabelMask(torch.randint(0, 3, (batch, n), generator=g), torch.randint(0, 3, (batch, n), generator=g), table)


def _dense_bias(spec: AttentionSpec, batch: int, n: int) -> torch.Tensor:
    """The spec's additive logits over the whole (n x n) call, written from the field docs (float64)."""
    bias = torch.zeros(batch, 1, n, n, dtype=torch.float64)
    if spec.attn_mask is not None:
        bias = bias + as_additive(spec.attn_mask).double()
    if spec.key_bias is not None:
        rows = torch.zeros(n, 1, dtype=torch.bool)
        lo, hi = spec.query_range or (0, n)
        rows[lo:hi] = True
        bias = bias + torch.where(rows, spec.key_bias.double()[:, None, None, :], 0.0)
    if spec.labels is not None:
        bias = bias + spec.labels.dense().double()
    if spec.window is not None:
        bias = bias + as_additive(spec.window.allowed()).double()
    return bias


def _full_spec(batch: int, n: int, text_len: int) -> AttentionSpec:
    g = torch.Generator().manual_seed(3)
    key_bias = torch.randn(batch, n, generator=g)
    key_bias[0, 1] = INF  # a masked key on the edited rows
    return AttentionSpec(
        attn_mask=torch.randn(batch, 1, n, n, generator=g), key_bias=key_bias, query_range=(2, 9),
        labels=_labels(batch, n), window=Window((3, 3), radius=(1, 1), text_len=text_len, text_first=True),
    )


def test_block_and_pair_bias_are_blocks_of_the_dense_bias():
    batch, text_len = 2, 3
    n = 9 + text_len
    spec = _full_spec(batch, n, text_len)
    dense = _dense_bias(spec, batch, n)
    for queries, keys in ((slice(0, n), slice(0, n)), (slice(3, 8), slice(0, 4)), (slice(5, 12), slice(2, 11))):
        got = block_bias(spec, queries, keys).double().expand(batch, 1, -1, -1)
        torch.testing.assert_close(got, dense[:, :, queries, keys])
    for queries, keys in ((slice(3, 12), slice(3, 12)), (slice(3, 8), slice(6, 11))):
        got = pair_bias(spec, queries, keys).double()
        want = torch.stack([dense[:, :, i, j] for i, j in zip(range(queries.start, queries.stop), range(keys.start, keys.stop))], -1)
        torch.testing.assert_close(got[..., 0].expand(batch, 1, -1), want)
    # the reference backend evaluates through the same function
    torch.testing.assert_close(reference.additive_bias(spec, batch, n, n, torch.device("cpu")).double(), dense)


def test_change_minus_inf_key_bias_outside_the_query_range_is_not_nan():
    """Before: `bias_block` / `bias_pairs` multiplied the key bias by the 0/1 query rows, so a -inf key bias gave
    NaN logits on the rows outside `query_range` (PAG's identity, SAG's received attention). Now those rows get
    nothing, as in the reference backend."""
    torch.manual_seed(0)
    batch, heads, n_img, n_txt, dim = 1, 2, 6, 3, 4
    total = n_img + n_txt
    image, text = slice(0, n_img), slice(n_img, total)
    q, k, v = (torch.randn(batch, heads, total, dim) for _ in range(3))
    key_bias = torch.zeros(batch, total)
    key_bias[:, n_img] = INF
    spec = AttentionSpec(key_bias=key_bias, query_range=(0, 3))  # image rows 3..5 are not edited
    bias = block_bias(spec, image, text)[0, 0]
    assert torch.isneginf(bias[:3, 0]).all() and torch.isfinite(bias[3:]).all()
    assert block_bias(spec, slice(3, 6), text) is None  # no edited row: nothing added
    out, lse = joint_identity(q, k, v, spec, image)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    received = received_attention(q, k, AttentionSpec(key_bias=key_bias, query_range=(0, 3)), image)
    assert torch.isfinite(received).all()


def _dense_weights(q, k, spec: AttentionSpec) -> torch.Tensor:
    n = q.shape[2]
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + _dense_bias(spec, q.shape[0], n)
    probs = torch.softmax(logits, -1)
    if spec.sparse is not None:
        lo, hi = spec.query_range or (0, n)
        probs[:, :, lo:hi] += spec.sparse.scale * (ref_entmax(logits, spec.sparse.alpha) - probs)[:, :, lo:hi]
    return probs


@pytest.mark.parametrize("extra", ["window", "sparse"])
def test_change_sag_received_attention_honours_windows(extra):
    """Before: SAG's received attention ignored a window (DiTFastAttn) on its layer; now the window is part of the
    logits. PLADIS's sparse transform is still left out, now explicitly (its weights are no distribution)."""
    torch.manual_seed(1)
    batch, heads, text_len, dim = 2, 2, 3, 4
    n = 16 + text_len
    image = slice(text_len, n)
    q, k = (torch.randn(batch, heads, n, dim) for _ in range(2))
    if extra == "window":
        spec = AttentionSpec(window=Window((4, 4), radius=(1, 1), text_len=text_len, text_first=True))
    else:
        spec = AttentionSpec(sparse=Sparse(alpha=1.5, scale=2.0), query_range=(image.start, image.stop))
    weights = _dense_weights(q, k, spec if extra == "window" else AttentionSpec())[:, :, image, image]
    block = weights / weights.sum(-1, keepdim=True)
    expected = block.sum(2).mean(1)
    torch.testing.assert_close(received_attention(q, k, spec, image).double(), expected, rtol=1e-5, atol=1e-5)
    if extra == "window":
        plain = _dense_weights(q, k, AttentionSpec())[:, :, image, image]
        assert not torch.allclose((plain / plain.sum(-1, keepdim=True)).sum(2).mean(1), expected, atol=1e-3)


def test_sag_received_attention_bounds_its_chunks_by_elements(monkeypatch):
    """SAG's received attention runs over query chunks of at most CHUNK_ELEMENTS per (B, H, rows, keys) tensor (at
    video sizes 1024 rows were tens of GiB); the result does not depend on the chunking."""
    from attnctl.controls.guidance import sag

    torch.manual_seed(2)
    batch, heads, text_len, n_img = 2, 3, 5, 40
    image = slice(text_len, text_len + n_img)
    q, k = (torch.randn(batch, heads, text_len + n_img, 8) for _ in range(2))
    whole = received_attention(q, k, AttentionSpec(), image)
    rows_seen = []
    block_logits = sag.block_logits
    monkeypatch.setattr(sag, "block_logits", lambda q, k, spec, queries, keys: (
        rows_seen.append(queries.stop - queries.start), block_logits(q, k, spec, queries, keys))[1])
    monkeypatch.setattr(sag, "CHUNK_ELEMENTS", batch * heads * k.shape[2] * 7)
    torch.testing.assert_close(received_attention(q, k, AttentionSpec(), image), whole, rtol=1e-6, atol=1e-6)
    assert rows_seen == [5] * 8  # 40 rows need 6 chunks of 7: 8 (a power of two, `chunks.row_chunks`) of 5


def test_probabilities_refuse_or_ignore_sparse_when_asked():
    logits = torch.randn(1, 1, 4, 5)
    spec = AttentionSpec(sparse=Sparse(), query_range=(2, 4))
    with pytest.raises(UnsupportedError, match="sparse"):
        probabilities(logits, spec, slice(0, 4), sparse="refuse")
    assert torch.equal(probabilities(logits, spec, slice(0, 2), sparse="refuse"), torch.softmax(logits, -1))  # not its rows
    assert torch.equal(probabilities(logits, spec, slice(0, 4), sparse="ignore"), torch.softmax(logits, -1))


# -- restricting a spec to a sub-attention ------------------------------------------------------------------------


def _sub_reference(q, k, v, spec: AttentionSpec, positions: list[int]) -> torch.Tensor:
    """The full call's meaning restricted to `positions`: the other keys masked out, the kept rows read back."""
    n = q.shape[2]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[positions] = True
    mask = keep[None, None, None, :].expand(q.shape[0], 1, n, n)
    if spec.attn_mask is not None:
        mask = as_additive(spec.attn_mask) + as_additive(mask)
    full = AttentionSpec(**{**spec.__dict__, "attn_mask": mask})
    out, _ = reference.attention(q.double(), k.double(), v.double(), full)
    return out[:, :, positions]


def test_change_sub_attention_specs_carry_windows_sparse_and_per_query_masks():
    """Before: Regions' `sub_spec` refused a window, sparse and the model's per-query mask. `spec_tokens` restricts
    them: a window when the sub-attention keeps the image grid whole (square, text on one side), sparse with its
    query range mapped, a per-query mask sliced at the query spans."""
    torch.manual_seed(2)
    batch, heads, dim, text_len, extra = 2, 2, 4, 3, 2  # [text (3); region text (2); image (9)]
    n = text_len + extra + 9
    q, k, v = (torch.randn(batch, heads, n, dim) for _ in range(3))
    g = torch.Generator().manual_seed(5)
    window = Window((3, 3), radius=(1, 1), text_len=text_len + extra, text_first=True)
    spec = AttentionSpec(
        attn_mask=torch.randn(batch, 1, n, n, generator=g), key_bias=torch.randn(batch, n, generator=g),
        value_scale=torch.rand(batch, n, generator=g) + 0.5, query_range=(text_len + extra, n), window=window,
        sparse=Sparse(alpha=1.5, scale=2.0),
    )
    spans = ((0, text_len), (text_len + extra, n))
    positions = [*range(0, text_len), *range(text_len + extra, n)]
    sub = spec_tokens(spec, spans, spans, torch.tensor(positions))
    assert sub.window == Window((3, 3), radius=(1, 1), text_len=text_len, text_first=True)
    assert sub.query_range == (text_len, text_len + 9) and sub.sparse == spec.sparse
    assert sub.attn_mask.shape == (batch, 1, len(positions), len(positions))
    index = torch.tensor(positions)
    out, _ = reference.attention(*(t.index_select(2, index).double() for t in (q, k, v)), sub)
    torch.testing.assert_close(out, _sub_reference(q, k, v, spec, positions))
    # rows restricted too, labels kept and restricted
    labelled = AttentionSpec(labels=_labels(batch, n))
    rows = torch.tensor([1])
    sub = spec_tokens(labelled, spans, spans, index, rows=rows)
    torch.testing.assert_close(sub.labels.dense(), labelled.labels.dense()[1:, :, index][:, :, :, index])


def test_sub_attention_refuses_a_window_it_cannot_express():
    window = Window((3, 3), radius=(1, 1), text_len=3, text_first=True)
    spec = AttentionSpec(window=window)
    with pytest.raises(ConfigError, match="window"):  # image queries only (Regions' blend): not square
        spec_tokens(spec, ((3, 12),), ((0, 3), (3, 12)), torch.arange(12))
    with pytest.raises(ConfigError, match="window"):  # part of the image grid
        spec_tokens(spec, ((0, 3), (3, 8)), ((0, 3), (3, 8)), torch.arange(8))


# -- edits ------------------------------------------------------------------------------------------------------


class _Hook(LayerHook):
    pass


def test_edit_holds_its_kernel_edits_as_a_spec():
    bias = torch.randn(2, 5)
    edit = Edit(key_bias=bias, query_range=(1, 3), hooks=[_Hook()])
    assert edit.kernel.key_bias is bias and edit.key_bias is bias and edit.query_range == (1, 3) and edit.labels is None
    assert isinstance(edit.hooks, tuple) and edit.per_key and not Edit().per_key
    mask = torch.zeros(2, 1, 1, 5)
    spec = edit.spec(attn_mask=mask, scale=0.5)
    assert spec.attn_mask is mask and spec.scale == 0.5 and spec.key_bias is bias and edit.kernel.attn_mask is None
    assert Edit(kernel=spec).kernel is spec and hash(Edit()) == hash(Edit()) and Edit() == Edit()
    with pytest.raises(TypeError):
        Edit(scale=0.5)
    with pytest.raises(TypeError):
        Edit(kernel=spec, key_bias=bias)
    with pytest.raises(AttributeError):
        _ = edit.nothing
    merged = merge_edits([edit, Edit(key_bias=bias, value_scale=torch.ones(2, 5), query_range=(1, 3), return_lse=True)], "here")
    torch.testing.assert_close(merged.key_bias, 2 * bias)
    assert merged.return_lse and merged.query_range == (1, 3) and len(merged.hooks) == 1
    with pytest.raises(ConfigError, match="different query rows"):
        merge_edits([edit, Edit(key_bias=bias)], "here")
    assert len(merge_edits([edit, Edit(hooks=(_Hook(),))], "here").hooks) == 2  # exclusivity is checked at apply
    with pytest.raises(ConfigError, match="window"):
        merge_specs([AttentionSpec(window=Window((2, 2), band=1))] * 2, "here")


# -- attention maps ---------------------------------------------------------------------------------------------

PROMPTS = ["a red cat on the street", "a photo of a red car"]
WORDS = ["red", "street"]


class _Record(LayerHook):
    def __init__(self, log: list):
        self.log = log

    def attend(self, call, q, k, v, spec, compute):
        out, lse = compute(q, k, v, spec)
        self.log.append({"rows": call.rows, "q": q, "k": k, "spec": spec})
        return out, lse


@dataclass(frozen=True)
class SpecProbe(Control, type_name="test-semantics-probe"):
    """Joint layers: a label mask (image queries cannot see the first text tokens), a window or sparse attention
    on the image rows, recording the merged spec and q, k of every call."""

    extra: str = "labels"
    log: list = field(default_factory=list, compare=False, hash=False)
    layers: Any = "joint"

    def bind(self, context):
        bound = Bound(self, context.layers, (0.0, 1.0))
        control = self

        def edit(layer, frame):
            geometry = frame.geometry(layer)
            image, n = geometry.image_slice, geometry.query_len
            hooks = (_Record(control.log),)
            if control.extra == "labels":
                labels = torch.zeros(len(frame.rows), n, dtype=torch.long)
                labels[:, image] = 1
                k_labels = torch.zeros(len(frame.rows), n, dtype=torch.long)
                k_labels[:, geometry.text_slice.start : geometry.text_slice.start + 4] = 1
                table = torch.tensor([[[0.0, 0.0], [0.0, INF]]])
                return Edit(labels=LabelMask(labels, k_labels, table), hooks=hooks)
            if control.extra == "window":
                return Edit(window=Window(geometry.image_hw, radius=(1, 1), text_len=geometry.text_len, text_first=image.start > 0), hooks=hooks)
            return Edit(sparse=Sparse(alpha=1.5, scale=2.0), query_range=(image.start, image.stop), hooks=hooks)

        bound.edit = edit
        return bound


@pytest.mark.parametrize("extra", ["labels", "window", "sparse"])
def test_change_attention_maps_honour_labels_windows_and_sparse(extra, tiny_cache):
    """Before: AttentionMaps showed the dense softmax of the rows whatever label mask (Regions' isolation), window
    (DiTFastAttn) or sparse transform (PLADIS) the layer carried out. Now the maps are of the attention weights the
    layer uses (sparse rows: `P + scale (entmax - P)`)."""
    name = "tiny-flux"
    pipe = tiny_cache(name)
    probe = SpecProbe(extra)
    options = dict(CALL_DEFAULTS[name])
    with attnctl.apply(pipe, [probe, AttentionMaps(WORDS)]) as handle:
        pipe(PROMPTS, num_inference_steps=1, guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0), **options)
        result = handle.outputs["attention_maps"]
    expected, plain = 0, 0
    for record in probe.log:
        q, k, spec = record["q"], record["k"], record["spec"]
        n_q, n_k = q.shape[2], k.shape[2]
        text_keys, image_rows, _ = layout(name, n_q, n_k)
        weights = _dense_weights(q, k, spec)[:, :, image_rows].sum(1)
        dense = _dense_weights(q, k, AttentionSpec())[:, :, image_rows].sum(1)
        side = int(round((image_rows.stop - image_rows.start) ** 0.5))
        maps = torch.zeros(2, 2, len(WORDS), side, side, dtype=torch.float64)
        for i, row in enumerate(record["rows"].rows):
            if row.branch != "cond":
                continue
            for w, word in enumerate(WORDS):
                keys = [text_keys.start + p for p in text_positions(pipe, name, PROMPTS[row.prompt], word)]
                maps[0, row.prompt, w] = weights[i][:, keys].sum(-1).reshape(side, side)
                maps[1, row.prompt, w] = dense[i][:, keys].sum(-1).reshape(side, side)
        expected, plain = expected + maps[0], plain + maps[1]
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(result.grid_maps.double(), plain, rtol=1e-4, atol=1e-5)


def test_block_logits_is_the_reference_logits():
    torch.manual_seed(4)
    q, k = torch.randn(2, 2, 12, 4), torch.randn(2, 2, 12, 4)
    spec = _full_spec(2, 12, 3)
    logits = block_logits(q, k, spec, slice(0, 12), slice(0, 12))
    want = q.double() @ k.double().transpose(-1, -2) / 2.0 + _dense_bias(spec, 2, 12)
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-5)


def test_change_one_dimensional_masks_and_bad_key_bias_shapes():
    """Before: `bias_block` / `bias_pairs` indexed `mask.shape[-2]` (IndexError on a 1-D model mask) and Regions'
    `sub_spec` refused a 1-D mask as a per-query mask; a 1-D mask is per key, as in the reference's broadcasting.
    A key bias of the wrong shape is a ConfigError (it was a torch shape error)."""
    mask = torch.tensor([0.0, INF, 0.0, -1.0])
    spec = AttentionSpec(attn_mask=mask)
    torch.testing.assert_close(block_bias(spec, slice(0, 3), slice(1, 4)).expand(3, 3), mask[1:4].expand(3, 3))
    torch.testing.assert_close(pair_bias(spec, slice(0, 4), slice(0, 4))[0, 0, :, 0], mask)
    sub = spec_tokens(spec, ((0, 2),), ((2, 4),), torch.tensor([2, 3]))
    torch.testing.assert_close(sub.attn_mask, mask[2:])
    with pytest.raises(ConfigError, match="key_bias"):
        block_bias(AttentionSpec(key_bias=torch.zeros(1, 1, 1, 4)), slice(0, 2), slice(0, 4))


def test_change_sub_attention_query_range_message():
    """The refusal of a query range that is not contiguous among a sub-attention's queries is now worded for any
    sub-attention (it named Regions)."""
    spec = AttentionSpec(key_bias=torch.zeros(1, 6), query_range=(1, 5))
    with pytest.raises(ConfigError, match="cannot map another control's query range"):
        spec_tokens(spec, ((4, 6), (0, 2)), ((0, 6),), torch.arange(6), where="layer x")


def test_restricted_label_masks_are_the_same_object_at_every_attention_call():
    """`spec_rows` / `spec_queries` give the same derived LabelMask for the same restriction, so the backends' caches
    per LabelMask (dense masks, kernel layouts and their host checks) hit instead of rebuilding at every call; an
    in-place change of the labels, another index tensor or other query rows give a new one."""
    from attnctl.kernels.semantics import spec_queries, spec_rows
    from attnctl.kernels.spec import AttentionSpec, LabelMask

    labels = LabelMask(torch.tensor([[0, 1, 1, 0]] * 3), torch.tensor([[0, 1, 1, 0]] * 3), torch.zeros(1, 2, 2))
    spec = AttentionSpec(labels=labels)
    index, other = torch.tensor([0, 2]), torch.tensor([0, 2])
    first = spec_rows(spec, index, 3).labels
    assert spec_rows(spec, index, 3).labels is first
    assert torch.equal(first.q_labels, labels.q_labels[[0, 2]])
    assert spec_rows(spec, other, 3).labels is not first
    assert spec_queries(spec, 1, 3).labels is spec_queries(spec, 1, 3).labels is not spec_queries(spec, 0, 2).labels
    labels.q_labels[1, 0] = 1  # in place: the derived masks follow
    changed = spec_rows(spec, index, 3).labels
    assert changed is not first and torch.equal(changed.q_labels, labels.q_labels[[0, 2]])
    # an index made afresh at every call keeps nothing alive once it is gone
    kept = len(labels.derived)
    for _ in range(5):
        spec_rows(spec, torch.tensor([1, 2]), 3)
    assert len(labels.derived) == kept
    # and a mask that goes before a long-lived index takes its derived masks with it
    import gc
    import weakref

    gone = []
    for _ in range(3):
        short = LabelMask(labels.q_labels.clone(), labels.k_labels.clone(), labels.table)
        gone.append(weakref.ref(spec_rows(AttentionSpec(labels=short), index, 3).labels))
        del short
    gc.collect()
    assert all(ref() is None for ref in gone)
