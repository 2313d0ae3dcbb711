"""Prompt-to-Prompt editing (docs/methods.md "Prompt-to-Prompt editing"): P2P's token alignment, the linked fused
attention against an eager reference that materialises the probabilities (written here from the paper's
definition), the identities (idle control, base row, same prompt), every call protocol and every family."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.controls.common import RowIndex
from attnctl.controls.cross_image.p2p import _LinkHook, _Plan
from attnctl.controls.cross_image.p2p_align import align, refinement_mapper, replacement_mapper
from attnctl.denoiser_call import DenoiserCall, RowLayout
from attnctl.families.base import Canvas, Geometry, LayerInfo
from attnctl.kernels.spec import AttentionSpec
from attnctl.processors.edit import AttentionCall
from attnctl.steps import StepInfo
from attnctl.testing import CALL_DEFAULTS
from attnctl.testing.new_families import NEW_TINY_MODELS, available

from .helpers import load_benchmark

BASE, EDIT = "a red cat on the street", "a blue cat on the street"


# -- token alignment (P2P's seq_aligner) ---------------------------------------------------------------------------
def test_alignment_matches_equal_tokens_and_leaves_new_ones_out():
    # BOS a red cat EOS  vs  BOS a big red cat EOS
    assert align([0, 1, 2, 3, 9], [0, 1, 7, 2, 3, 9]) == [0, 1, -1, 2, 3, 4]
    mapping, alpha = refinement_mapper([0, 1, 2, 3, 9], [0, 1, 7, 2, 3, 9], 8)
    assert mapping == [0, 1, -1, 2, 3, 4, 6, 7] and alpha == [1, 1, 0, 1, 1, 1, 1, 1]  # padding: the same position


def test_refinement_padding_reads_the_base_at_the_same_position_as_p2p():
    """P2P's `seq_aligner.get_mapper`: `mapper[len(y):] = len(y) + arange(max_len - len(y))` with alpha 1, so after a
    word is removed the edited padding reads the base's last real tokens (its EOS here), not the base's padding."""
    mapping, alpha = refinement_mapper([0, 1, 7, 2, 3, 9], [0, 1, 2, 3, 9], 8)
    assert mapping == [0, 1, 3, 4, 5, 5, 6, 7] and alpha == [1.0] * 8


def test_replacement_mapper_swaps_words_with_different_token_counts():
    m = torch.tensor(replacement_mapper([0, 1, 2, 3, 9], [0, 1, 5, 6, 3, 9], 7))  # "red" -> two tokens
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5  # the base word's map is shared by the edited word's tokens
    assert m[0, 0] == m[1, 1] == m[3, 4] == m[4, 5] == m[5, 6] == 1  # aligned tokens and padding shift by one
    assert m.sum() == 6
    with pytest.raises(attnctl.ConfigError, match="refine"):
        replacement_mapper([0, 1, 3, 9], [0, 1, 7, 3, 9], 6)  # a word added is not a swap


def _authors_replacement(x_words: list[list[int]], y_words: list[list[int]], limit: int) -> torch.Tensor:
    """P2P's `get_replacement_mapper_` on prompts given as their words' token ids (the same number of words; special
    tokens as one-token words): word i of x and y differ -> equal token counts one to one, else every source token
    to each target token at 1 / len(target); identical words one to one."""
    mapper = torch.zeros(limit, limit)
    i = j = 0
    for wx, wy in zip(x_words, y_words):
        source, target = list(range(i, i + len(wx))), list(range(j, j + len(wy)))
        if wx == wy or len(wx) == len(wy):
            for s_, t in zip(source, target):
                mapper[s_, t] = 1
        else:
            for t in target:
                mapper[source, t] = 1 / len(target)
        i, j = i + len(wx), j + len(wy)
    return mapper


@pytest.mark.parametrize("x_words, y_words", [
    ([[0], [1], [2], [3], [9]], [[0], [1], [5], [6], [9]]),  # a red cat -> a blue dog: two adjacent swaps
    ([[0], [1], [2, 3, 4], [9]], [[0], [1], [5, 6, 7], [9]]),  # a three-token word for another three-token word
    ([[0], [1], [2], [20, 21, 22], [9]], [[0], [1], [5], [30, 31], [9]]),  # a red hippo(3) -> a blue zebra(2)
    ([[0], [1], [2, 3], [8], [9]], [[0], [1], [5], [8], [9]]),  # a two-token word for one token
    # a red cat on the street -> a crimson dog on the street, CLIP splitting "crimson" as c|r|im|s|on: its last piece is
    # the token of "on" (4), which a token alignment paired with the base's "on" ("adds tokens": refused)
    ([[0], [1], [2], [3], [4], [5], [6], [9]], [[0], [1], [10, 11, 12, 13, 4], [7], [4], [5], [6], [9]]),
])
def test_replacement_mapper_pairs_swapped_words_as_p2p(x_words, y_words):
    """P2P's word-for-word pairing (seq_aligner.get_replacement_mapper_), with the tokens' word indices given."""
    x, y = [t for w in x_words for t in w], [t for w in y_words for t in w]
    x_ids = [k if len(w) > 0 and w != [0] and w != [9] else -1 for k, w in enumerate(x_words) for _ in w]
    y_ids = [k if len(w) > 0 and w != [0] and w != [9] else -1 for k, w in enumerate(y_words) for _ in w]
    limit = max(len(x), len(y))
    expected = _authors_replacement(x_words, y_words, limit)
    got = torch.tensor(replacement_mapper(x, y, limit, x_words=x_ids, y_words=y_ids))
    torch.testing.assert_close(got[: len(x), : len(y)], expected[: len(x), : len(y)])


def test_prompt_words_from_offsets_and_from_rebuilt_offsets(tiny_cache):
    from attnctl.tokens import _rebuilt_offsets, _Tokenized

    tokenizer = tiny_cache("tiny-sd").tokenizer
    text = "a red hippopotamus on the street"
    with_offsets = _Tokenized(tokenizer, text, 77, "clip")
    words = with_offsets.word_ids()
    assert words[0] == words[-1] == -1 and words[1:3] == [0, 1] and words[-2] == 5
    assert set(words[3:-4]) == {2}  # the split word is one word
    with_offsets.offsets = _rebuilt_offsets(tokenizer, text, with_offsets.ids)  # a tokenizer without offsets
    assert with_offsets.word_ids() == words
    t5 = _Tokenized(tiny_cache("tiny-flux").tokenizer_2, text + ", at night", 512, "t5")
    words = t5.word_ids()
    assert max(words) == 7 and words[-1] == -1
    t5.offsets = _rebuilt_offsets(t5.tokenizer, t5.text, t5.ids)
    assert t5.word_ids() == words


def test_config_is_validated():
    with pytest.raises(attnctl.ConfigError, match="mode"):
        attnctl.PromptToPrompt("swap")
    with pytest.raises(attnctl.ConfigError, match="cross_steps"):
        attnctl.PromptToPrompt(cross_steps=1.5)
    with pytest.raises(attnctl.ConfigError, match="cross_steps"):
        attnctl.PromptToPrompt(cross_steps=0.0, reweight={"cat": 2.0})
    with pytest.raises(attnctl.ConfigError, match="local_blend"):
        attnctl.PromptToPrompt(local_blend=[1])
    # P2P's equalizer multiplies probability columns: any finite factor (its notebook's "pink" at -1), not NaN / inf
    assert attnctl.PromptToPrompt(reweight={"pink": -1}, local_blend=("bicycle",)).reweight == {"pink": -1.0}
    for bad in (float("nan"), float("inf"), -float("inf"), "2"):
        with pytest.raises(attnctl.ConfigError, match=r"reweight\['pink'\]"):
            attnctl.PromptToPrompt(reweight={"pink": bad})
    control = attnctl.PromptToPrompt("refine", reweight={"cat": 2.0}, local_blend="cat")
    assert attnctl.Control.from_dict(control.to_dict()) == control
    # hashable like every control; equal tables in another order are one control
    same = attnctl.PromptToPrompt("refine", reweight={"dog": 0.5, "cat": 2.0}, local_blend="cat")
    other = attnctl.PromptToPrompt("refine", reweight={"cat": 2.0, "dog": 0.5}, local_blend="cat")
    assert same == other and hash(same) == hash(other) and len({same, other, control}) == 2


# -- the linked attention against the materialised probabilities --------------------------------------------------
def eager_reference(q, k, v, links, mapper, own, cross, self_, text_k, image_k, image_q):
    """docs/methods.md: edited row e with source b takes, over the text keys, `P_b M + P_e diag(own)` (cross window)
    and over the image keys `P_b` (self window); its image queries read `A' V_e`, everything else is stock."""
    probabilities = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = probabilities @ v
    for e, (target, source) in enumerate(links):
        mixed = probabilities[target].clone()
        if cross and text_k is not None:
            mixed[..., text_k] = probabilities[source][..., text_k] @ mapper[e] + probabilities[target][..., text_k] * own[e]
        if self_ and image_k is not None:
            mixed[..., image_k] = probabilities[source][..., image_k]
        out[target][:, image_q] = (mixed @ v[target])[:, image_q]
    return out


LAYOUTS = {  # kind: (text position, image tokens, text tokens)
    "self": ("none", 16, 0),
    "cross": ("keys", 16, 6),
    "joint": ("first", 16, 6),
}


# (layer kind, cross window, self window): a self-attention layer has no cross part, a cross-attention layer no self part
LINKED_PARTS = [(kind, cross, self_) for kind in LAYOUTS for cross, self_ in [(True, True), (True, False), (False, True)]
                if (kind != "self" or self_) and (kind != "cross" or cross)]


@pytest.mark.parametrize("kind, cross, self_", LINKED_PARTS)
@pytest.mark.parametrize("refine", [False, True])
def test_linked_attention_matches_the_eager_reference(kind, cross, self_, refine):
    text, image_len, text_len = LAYOUTS[kind]
    torch.manual_seed(0)
    layer = LayerInfo("layer", 0, kind, "g", 0, 0, text)
    rows = RowLayout.batched_cfg(3)  # u0 u1 u2 c0 c1 c2: u1, u2 read u0; c1, c2 read c0
    geometry = Geometry(layer, (4, 4), text_len)
    frame = DenoiserCall(StepInfo(0, 10), rows, Canvas((4, 4), (4, 4), text_len))
    call = AttentionCall(layer, geometry, frame, None, "sdpa")
    nq = geometry.query_len
    nk = nq if kind != "cross" else text_len
    q, k, v = (torch.randn(6, 2, n, 8) for n in (nq, nk, nk))
    links = [(1, 0), (2, 0), (4, 3), (5, 3)]
    mapper = torch.rand(4, text_len, text_len) if text_len else torch.zeros(4, 0, 0)
    own = torch.rand(4, text_len) if refine else torch.zeros(4, text_len)
    index = RowIndex()
    plan = _Plan((1, 2, 4, 5), (0, 0, 3, 3), index((1, 2, 4, 5)), index((0, 0, 3, 3)), (0, 0, 0, 3, 3, 3), mapper, own, not refine,
                 text_len=text_len)

    class Bound:
        text_len = LAYOUTS[kind][2]

        def __init__(self):
            self.index = RowIndex()

        def plan(self, rows, device, window="all"):
            return plan

    hook = _LinkHook(Bound(), layer, cross, self_, False)
    out, _ = hook.attend(call, q, k, v, AttentionSpec(), lambda q, k, v, spec: (torch.nn.functional.scaled_dot_product_attention(q, k, v), None))
    text_k = geometry.key_text_slice if text_len else None
    image_k = None if kind == "cross" else geometry.image_slice
    expected = eager_reference(q, k, v, links, mapper, own, cross, self_, text_k, image_k, geometry.image_slice)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("refine", [False, True])
def test_linked_rows_take_structured_guidance_values_as_their_own_in_either_order(refine):
    """Structured Diffusion Guidance's averaged values are the cond rows' own values (docs/methods.md), which P2P's
    edited rows attend with: `(P_b M_a + P_e diag(1 - a)) V_e` with `V_e` the averaged values. The hooks nested in
    control order: with [P2P, SDG] the value edit ran on P2P's mapped values and on refine's own part of the row as
    well, adding the phrases' values twice (the images of the two orders differed by 0.058 on tiny-sd, 60.5 on
    tiny-pixart latents of scale 775: the next test). The value edit now sits outside the link whatever the order."""
    from attnctl.controls.structured import _ValueHook
    from attnctl.processors.edit import Edit, merge_edits

    text, image_len, text_len = LAYOUTS["cross"]
    torch.manual_seed(0)
    layer = LayerInfo("layer", 0, "cross", "g", 0, 0, text)
    rows = RowLayout.batched_cfg(3)  # u0 u1 u2 c0 c1 c2: c1, c2 read c0 (and u1, u2 u0)
    geometry = Geometry(layer, (4, 4), text_len)
    call = AttentionCall(layer, geometry, DenoiserCall(StepInfo(0, 10), rows, Canvas((4, 4), (4, 4), text_len)), None, "sdpa")
    q, k, v = torch.randn(6, 2, image_len, 8), torch.randn(6, 2, text_len, 8), torch.randn(6, 2, text_len, 8)
    links = [(1, 0), (2, 0), (4, 3), (5, 3)]
    mapper, own = torch.rand(4, text_len, text_len), torch.rand(4, text_len) if refine else torch.zeros(4, text_len)
    index = RowIndex()
    plan = _Plan((1, 2, 4, 5), (0, 0, 3, 3), index((1, 2, 4, 5)), index((0, 0, 3, 3)), (0, 0, 0, 3, 3, 3), mapper, own, not refine,
                 text_len=text_len)
    keep, add = torch.rand(3, 1, text_len, 1), torch.randn(3, 2, text_len, 8)  # per prompt row: values `v keep + add`

    class Bound:
        def __init__(self):
            self.index = RowIndex()

        def plan(self, rows, device, window="all"):
            return plan

    link = Edit(hooks=(_LinkHook(Bound(), layer, True, False, False),))
    values = Edit(hooks=(_ValueHook(Bound(), (3, 4, 5), (0, 1, 2), (keep, add)),))
    averaged = v.clone()
    averaged[3:] = v[3:] * keep + add
    expected = eager_reference(q, k, averaged, links, mapper, own, True, False, geometry.key_text_slice, None, geometry.image_slice)
    for edits in ([link, values], [values, link]):
        attend = lambda q, k, v, spec: (torch.nn.functional.scaled_dot_product_attention(q, k, v), None)  # noqa: E731
        for hook in reversed(merge_edits(edits, "layer").hooks):
            attend = (lambda hook, inner: lambda q, k, v, spec: hook.attend(call, q, k, v, spec, inner))(hook, attend)  # noqa: B023
        torch.testing.assert_close(attend(q, k, v, AttentionSpec())[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart"])
def test_structured_guidance_with_refine_is_the_same_in_either_order(name, tiny_cache):
    """End to end on the UNet and PixArt families: both orders bitwise (they differed by 0.058 on tiny-sd and 60.5
    on tiny-pixart), and both controls act in the composition. Every row starts from the same noise (P2P's start copy
    then changes nothing), and only cross-attention is linked, on the layers SDG edits too: the edited row differs
    from SDG alone only by the link, and from P2P alone by SDG's values; the base row is SDG's alone."""
    pipe = tiny_cache(name)
    prompts = ["a red cat and a blue dog", "a green cat and a blue dog"]
    p2p = lambda: attnctl.PromptToPrompt("refine", cross_steps=1.0, self_steps=0.0)  # noqa: E731
    outs = []
    for controls in ([p2p(), attnctl.StructuredGuidance()], [attnctl.StructuredGuidance(), p2p()], [attnctl.StructuredGuidance()], [p2p()]):
        with attnctl.apply(pipe, controls):
            outs.append(generate(pipe, name, prompts, steps=2, same_noise=True))
    both, reversed_, sdg, linked = outs
    assert torch.equal(both, reversed_), (both - reversed_).abs().max()
    assert torch.equal(both[0], sdg[0])  # P2P never changes the base row
    assert (both[1] - sdg[1]).abs().max() > 1e-3 * sdg[1].abs().max()  # the link acts alongside SDG
    assert (both[1] - linked[1]).abs().max() > 1e-3 * linked[1].abs().max()  # and SDG alongside the link


def test_joint_layer_rows_reuse_one_derived_label_mask():
    """On a joint layer the linked rows' spec (another control's label mask, restricted to the rows the edit stacks)
    is derived once: the same LabelMask at every attention call, so the backends' per-mask caches hit (a row index
    made afresh per call derived a new mask, with its dense mask or kernel layout, at every call)."""
    from attnctl.kernels.spec import LabelMask

    text, image_len, text_len = LAYOUTS["joint"]
    layer = LayerInfo("layer", 0, "joint", "g", 0, 0, text)
    rows = RowLayout.batched_cfg(2)
    geometry = Geometry(layer, (4, 4), text_len)
    call = AttentionCall(layer, geometry, DenoiserCall(StepInfo(0, 10), rows, Canvas((4, 4), (4, 4), text_len)), None, "sdpa")
    n = geometry.query_len
    labels = LabelMask(torch.randint(0, 2, (4, n)), torch.randint(0, 2, (4, n)), torch.zeros(1, 2, 2))
    index = RowIndex()
    plan = _Plan((1, 3), (0, 2), index((1, 3)), index((0, 2)), (0, 0, 2, 2), torch.rand(2, text_len, text_len),
                 torch.rand(2, text_len), False, text_len=text_len)

    class Bound:
        text_len = LAYOUTS["joint"][2]

        def __init__(self):
            self.index = RowIndex()

        def plan(self, rows, device, window="all"):
            return plan

    seen = []

    def compute(q, k, v, spec):
        seen.append(spec.labels)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), None

    hook = _LinkHook(Bound(), layer, True, True, False)
    q, k, v = (torch.randn(4, 2, n, 8) for _ in range(3))
    for _ in range(3):
        hook.attend(call, q, k, v, AttentionSpec(labels=labels), compute)
    assert seen[0] is not None and seen[0] is seen[1] is seen[2]
    assert torch.equal(seen[0].q_labels, labels.q_labels[[0, 1, 2, 3, 0, 2, 1, 3]])


# -- identities and call protocols on the tiny models ---------------------------------------------------------------
def generate(pipe, name, prompts, *, seed=0, steps=3, guidance=5.0, same_noise=False, **kwargs):
    """Latents of a call; `same_noise`: every image starts from the seed's noise (one generator per image)."""
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    generator = [torch.Generator().manual_seed(seed) for _ in prompts] if same_noise else torch.Generator().manual_seed(seed)
    out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               generator=generator, **options)
    return out.frames if hasattr(out, "frames") else out.images


FULL = dict(cross_steps=1.0, self_steps=1.0)


def test_idle_control_is_bitwise_stock(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stock = generate(pipe, "tiny-sd", [BASE, EDIT])
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(cross_steps=0.0, self_steps=0.0)]):
        idle = generate(pipe, "tiny-sd", [BASE, EDIT])
    assert torch.equal(stock, idle)


PROTOCOLS = [  # (tiny model, guidance, extra call arguments): batched CFG, no CFG, Flux true CFG (separate calls)
    ("tiny-sd", 5.0, {}),
    ("tiny-sd", 1.0, {}),
    ("tiny-sd3", 5.0, {}),
    ("tiny-pixart", 5.0, {}),
    ("tiny-flux", 1.0, {}),
    ("tiny-flux", 1.0, {"negative_prompt": "a dog", "true_cfg_scale": 3.0}),
]


@pytest.mark.parametrize("name, guidance, extra", PROTOCOLS, ids=["sd-cfg", "sd-no-cfg", "sd3", "pixart", "flux", "flux-true-cfg"])
def test_base_row_is_untouched_and_a_same_prompt_edit_is_the_base(name, guidance, extra, tiny_cache):
    pipe = tiny_cache(name)
    stock = generate(pipe, name, [BASE, EDIT], guidance=guidance, **extra)
    alone = generate(pipe, name, [BASE], guidance=guidance, **extra)
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(local_blend=("cat",), **FULL)]):
        edited = generate(pipe, name, [BASE, EDIT], guidance=guidance, **extra)
        same = generate(pipe, name, [BASE, BASE], guidance=guidance, **extra)
    assert torch.equal(edited[0], stock[0])  # the base row is never modified
    # and is the base prompt alone, up to the rounding that batching changes in the stock pipeline itself (PixArt)
    torch.testing.assert_close(edited[0], alone[0], atol=1e-3, rtol=1e-3)
    assert not torch.equal(edited[1], stock[1])
    # linking and the copied start latents make an edit without a change the base image itself (uncond rows
    # read the base's uncond row, cond rows its cond row, on every protocol)
    torch.testing.assert_close(same[1], same[0], atol=1e-5, rtol=1e-5)


def _p2p_noise_warnings(pipe, generator, **kwargs):
    """(the warnings about step noise, the latents) of a P2P call editing the base prompt into itself."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attnctl.apply(pipe, [attnctl.PromptToPrompt(**FULL)]):
            out = pipe(prompt=[BASE, BASE], num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                       generator=generator, **CALL_DEFAULTS["tiny-sd"], **kwargs).images
    return [str(w.message) for w in caught if "adds noise at every step" in str(w.message)], out


def test_stochastic_schedulers_warn_unless_each_image_has_its_own_generator(tiny_cache):
    """Under a scheduler that adds noise at every step, one generator draws different noise for each image, so an
    edit identical to its base drifted from it (Euler Ancestral: by up to 15 on 4 steps) silently. P2P warns once per
    call, naming the scheduler and the remedy, unless each edited image has a generator of its own in its base
    image's state (which gives the base image itself); deterministic schedulers (DDIM), and TCD at the call's eta=0,
    need none."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, TCDScheduler

    pipe = tiny_cache("tiny-sd")
    saved = pipe.scheduler
    try:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(saved.config)
        for generator in (torch.Generator().manual_seed(0), None, [torch.Generator().manual_seed(0)] * 2,
                          [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]):
            found, out = _p2p_noise_warnings(pipe, generator)
            assert len(found) == 1 and "EulerAncestralDiscreteScheduler adds noise at every step" in found[0]
            assert "pass one generator per image" in found[0]
        found, out = _p2p_noise_warnings(pipe, [torch.Generator().manual_seed(0) for _ in range(2)])
        assert found == []
        torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)  # the remedy: the edit is the base image
        pipe.scheduler = TCDScheduler.from_config(saved.config)
        assert _p2p_noise_warnings(pipe, torch.Generator().manual_seed(0))[0] == []  # the pipeline passes its eta=0.0
        found, _ = _p2p_noise_warnings(pipe, torch.Generator().manual_seed(0), eta=0.3)
        assert len(found) == 1 and "TCDScheduler adds noise at every step (the call's eta is 0.3)" in found[0]
        pipe.scheduler = DDIMScheduler.from_config(saved.config)
        assert _p2p_noise_warnings(pipe, torch.Generator().manual_seed(0))[0] == []
        assert _p2p_noise_warnings(pipe, torch.Generator().manual_seed(0), eta=1.0)[0] != []
    finally:
        pipe.scheduler = saved


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # KDPM2 on numpy 2
def test_step_noise_names_the_stochastic_schedulers():
    """Which schedulers draw fresh noise in `step` (diffusers 0.42.1), by class or by setting; DPM-Solver-SDE draws it
    for the whole batch from its own seed (needs torchsde to build: a stand-in of that name here)."""
    import diffusers

    from attnctl.noise import batch_noise, step_noise

    for name in ("EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DDPMScheduler", "LCMScheduler"):
        assert step_noise(getattr(diffusers, name)()) == f"{name} adds noise at every step"
    for name in ("DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
                 "DPMSolverMultistepScheduler", "PNDMScheduler", "FlowMatchEulerDiscreteScheduler"):
        assert step_noise(getattr(diffusers, name)()) is None
    assert "algorithm_type='sde-dpmsolver++'" in step_noise(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    assert "stochastic_sampling=True" in step_noise(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    assert step_noise(diffusers.TCDScheduler()) == "TCDScheduler adds noise at every step (its step's default eta is 0.3)"
    assert step_noise(diffusers.TCDScheduler(), eta=0.0) is None
    sde = type("DPMSolverSDEScheduler", (), {"config": {}})()
    assert step_noise(sde) == "DPMSolverSDEScheduler adds noise at every step" and batch_noise(sde)
    assert not batch_noise(diffusers.EulerAncestralDiscreteScheduler())


def test_tables_hold_the_word_swap_and_the_equalizer(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(reweight={"street": 3.0}, branch="both")]) as handle:
        generate(pipe, "tiny-sd", [BASE, EDIT])
        bound = handle.runtime.last_call.bound[0]
    tokenizer = pipe.tokenizer
    red = tokenizer(BASE)["input_ids"].index(tokenizer.convert_tokens_to_ids("red</w>"))
    street = tokenizer(BASE)["input_ids"].index(tokenizer.convert_tokens_to_ids("street</w>"))
    mapper, own, zero = bound.tables["cond"]
    assert mapper[1, red, red] == 1.0  # "red" (base) -> "blue" (edited) at the same position
    assert mapper[1, street, street] == 3.0 and zero  # reweighted, and replace keeps none of its own map
    assert bound.tables["uncond"][0] is None  # the same negative prompt: identity


@pytest.mark.skipif(not available("tiny-qwenimage"), reason="tiny-qwenimage needs a newer diffusers")
@pytest.mark.parametrize("negatives", [("a red street", "a blue street"),
                                       ("a blurry photo of a car on a wet street", "a blurry photo of a big car on a wet street at night")],
                         ids=["shorter", "longer"])
def test_qwenimage_uncond_tables_have_the_negative_prompts_own_text_length(negatives, tiny_cache):
    """Qwen-Image encodes the negative prompts by a call of their own, padded to their own longest: with branch="both"
    and a negative prompt per row, the uncond rows' refinement tables align the negative prompts' tokens over that
    call's text length, and the uncond denoiser calls run with them. It raised CallLayoutError ("bound to 16 text
    tokens, layer ... has 13"): the tables had the prompts' length."""
    name = "tiny-qwenimage"
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, [attnctl.PromptToPrompt("refine", branch="both")]) as handle:
        edited = generate(pipe, name, [BASE, "a blue cat sitting on the street"], steps=2, negative_prompt=list(negatives))
        bound = handle.runtime.last_call.bound[0]
    assert torch.isfinite(edited).all()
    ids = [pipe.tokenizer(text)["input_ids"] for text in negatives]
    encoded = pipe.encode_prompt(list(negatives), device="cpu")[0].shape[1]  # the negative call's own text length
    assert encoded != bound.text_len and bound.text_lens["uncond"] == encoded
    mapper, own, _ = bound.tables["uncond"]
    assert mapper.shape == (2, encoded, encoded) and own.shape == (2, encoded)
    expected_mapping, expected_alpha = refinement_mapper(ids[0], ids[1], encoded, masked_padding=True)  # Qwen masks its padding
    for j, (m, a) in enumerate(zip(expected_mapping, expected_alpha)):  # P2P's refinement of row 1 from row 0
        column = torch.zeros(encoded)
        if m >= 0:
            column[m] = a
        assert torch.equal(mapper[1, :, j].cpu(), column), j
        assert own[1, j] == 1.0 - a


def test_refine_on_a_masked_family_never_reads_the_edited_rows_masked_text(tiny_cache):
    """Qwen-Image masks the text after each prompt's last token. With an edit shorter than its base, P2P's `get_mapper`
    tail (padding position j reads the base's j) would spend the base's attention on its last words on the edited
    row's masked padding values: the edited image then changed when only masked values did (0.146 on 2 steps)."""
    if not available("tiny-qwenimage"):
        pytest.skip("tiny-qwenimage needs a newer diffusers")
    assert refinement_mapper([0, 1, 7, 2, 3, 9], [0, 1, 2, 3, 9], 8, masked_padding=True)[0] == [0, 1, 3, 4, 5, -1, -1, -1]
    pipe = tiny_cache("tiny-qwenimage")
    scale = {"value": 0.0}

    def noise_on_masked_text(module, args, kwargs):
        text, mask = kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"]
        if mask is None:  # a call whose prompts fill the text (no padding)
            return args, kwargs
        noise = torch.randn(text.shape, generator=torch.Generator().manual_seed(7)) * scale["value"]
        return args, {**kwargs, "encoder_hidden_states": text + noise * (mask == 0)[..., None].to(text.dtype)}

    hook = pipe.transformer.register_forward_pre_hook(noise_on_masked_text, with_kwargs=True)
    try:
        with attnctl.apply(pipe, [attnctl.PromptToPrompt("refine")]):
            quiet = generate(pipe, "tiny-qwenimage", ["a photo of a red cat sitting on a green sofa", "a photo of a cat"], steps=2)
            scale["value"] = 5.0
            noisy = generate(pipe, "tiny-qwenimage", ["a photo of a red cat sitting on a green sofa", "a photo of a cat"], steps=2)
    finally:
        hook.remove()
    assert torch.equal(quiet, noisy)


def test_refine_on_chroma_keeps_p2ps_padding_rule_as_its_padding_is_attended(tiny_cache):
    """Chroma's T5 padding is attended (diffusers adds its float 0/1 mask as a bias): a shorter edit's padding
    positions read the base's same positions, P2P's rule, not the edited row's own map as on Qwen-Image."""
    if not available("tiny-chroma"):
        pytest.skip("tiny-chroma needs a newer diffusers")
    pipe = tiny_cache("tiny-chroma")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt("refine")]) as handle:
        generate(pipe, "tiny-chroma", ["a photo of a red cat sitting on a green sofa", "a photo of a cat"], steps=1)
        mapper, own, _ = handle.runtime.last_call.bound[0].tables["cond"]
    edit_len = len(pipe.tokenizer("a photo of a cat")["input_ids"])
    for j in range(edit_len, edit_len + 4):  # past the edited prompt's end: the base's same position, alpha 1
        assert mapper[1, j, j] == 1 and mapper[1, :, j].sum() == 1 and own[1, j] == 0, j


# -- every family ---------------------------------------------------------------------------------------------------
FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart"] + [
    pytest.param(name, marks=pytest.mark.skipif(not available(name), reason=f"{name} needs a newer diffusers")) for name in NEW_TINY_MODELS
]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_edits_or_refuses_with_the_reason(name, tiny_cache):
    pipe = tiny_cache(name)
    control = attnctl.PromptToPrompt(local_blend=("cat",))
    if name in ("tiny-zimage", "tiny-wan"):
        with pytest.raises(attnctl.UnsupportedError, match="zimage|wan"):
            attnctl.apply(pipe, [control])
        return
    stock = generate(pipe, name, [BASE, EDIT], steps=2)
    with attnctl.apply(pipe, [control]):
        edited = generate(pipe, name, [BASE, EDIT], steps=2)
    assert torch.isfinite(edited).all()
    assert torch.equal(edited[0], stock[0]) and not torch.equal(edited[1], stock[1])


def test_one_prompt_is_refused_clearly(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt()]):
        with pytest.raises(attnctl.ConfigError, match=r"\[base, edit"):
            generate(pipe, "tiny-sd", [BASE])


# -- the effect on the toy model (CI-sized benchmarks/p2p.py) --------------------------------------------------------
def test_toy_red_to_blue_circle_keeps_the_base_image_more_often_than_the_same_noise_alone():
    """benchmarks/p2p.py on 8 seeds: "a red circle" -> "a blue circle" (shape kept, centroid within 0.1 of the width,
    blue). The issue's target is 90%; the toy model reaches far less (see the note in docs/methods.md), so this pins
    what it does reach: more successes than the stock batch started from the same noise."""
    from attnctl.toy import load_toy_shapes

    bench = load_benchmark("p2p.py", "p2p_benchmark")
    pipe = load_toy_shapes()
    seeds = list(range(8))
    edited = bench.run(pipe, attnctl.PromptToPrompt("replace"), seeds, 8)
    stock = bench.run(pipe, None, seeds, 8)

    def success(results):
        return sum(all(r[key] for key in ("shape", "centroid", "color")) for r in results)

    def iou(results):
        return sum(r["iou"] for r in results) / len(results)

    print(f"p2p {success(edited)}/8 IoU {iou(edited):.3f}; stock from the same noise {success(stock)}/8 IoU {iou(stock):.3f}")
    assert success(edited) >= 3 and sum(r["color"] for r in edited) >= 6
    assert iou(edited) > iou(stock)  # the linked attention keeps more of the base layout than the shared noise alone


def test_toy_red_to_blue_circle_on_the_grounded_model():
    """benchmarks/p2p.py on 8 seeds of `toy-shapes-grounded` (word maps that locate their objects; 48 seeds: 100%
    against 39.6% for the stock batch from the same noise). Measured on these seeds: 8/8 against 5/8, the layout kept
    (object IoU with the base 0.91 against 0.52)."""
    from attnctl.toy import load_toy_shapes

    bench = load_benchmark("p2p.py", "p2p_benchmark")
    pipe = load_toy_shapes(model="toy-shapes-grounded")
    seeds = list(range(8))
    edited, stock = bench.run(pipe, attnctl.PromptToPrompt("replace"), seeds, 8), bench.run(pipe, None, seeds, 8)

    def count(results, keys=("shape", "centroid", "color")):
        return sum(all(r[key] for key in keys) for r in results)

    assert count(edited) >= 7 and count(edited, ("objects",)) >= 7 and count(edited) > count(stock)
    assert sum(r["iou"] for r in edited) > sum(r["iou"] for r in stock) + 1.0


def test_the_per_object_check_of_the_p2p_benchmark():
    """`judge_objects`: every red object of the base must come back blue, of the same shape and in place; `judge`
    fails any base image with a second object."""
    from attnctl.toy.data import Shape, render

    bench = load_benchmark("p2p.py", "p2p_benchmark")
    square = Shape("green", "square", 24, 10, 10)
    base = render([Shape("red", "circle", 9, 20, 11), square])
    assert bench.judge_objects(base, render([Shape("blue", "circle", 10, 20, 11), square]))
    assert not bench.judge(base, render([Shape("blue", "circle", 10, 20, 11), square]))["shape"]
    assert not bench.judge_objects(base, render([Shape("blue", "circle", 22, 20, 11), square]))  # moved
    assert not bench.judge_objects(base, render([Shape("blue", "triangle", 10, 20, 11), square]))  # reshaped
    assert not bench.judge_objects(base, render([Shape("blue", "circle", 10, 20, 11), Shape("red", "square", 24, 10, 10)]))
    assert not bench.judge_objects(render([square]), render([square]))  # nothing red to edit
    one = render([Shape("red", "circle", 9, 20, 11)])
    edited = render([Shape("blue", "circle", 10, 20, 11)])
    assert bench.judge_objects(one, edited) and all(bench.judge(one, edited).values())


class _EagerP2PProcessor:
    """P2P's `AttentionControlEdit` on diffusers' eager attention (Hertz et al. 2022, its ptp_utils / notebook),
    written from the paper's code, not from the control: the probabilities are materialised and, inside the
    windows, the edited rows' probabilities are the base rows' in the cond half of the CFG batch
    `[uncond base, uncond edit, cond base, cond edit]` (the code edits `attn[h // 2:]`; with `halves="both"` the
    uncond half too); one token-for-token swap: P2P's mapper is the identity. Windows: cross-attention
    `step < int(cross * (steps + 1))` (its time alphas have steps + 1 entries), self-attention `step < int(self * steps)`
    and only where it has at most 16 ** 2 tokens (`replace_self_attention`: `att_replace.shape[2] <= 16 ** 2`)."""

    def __init__(self, is_cross: bool, clock: dict):
        self.is_cross, self.clock = is_cross, clock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        probs = attn.get_attention_scores(q, k, attention_mask)
        probs = probs.view(batch, attn.heads, *probs.shape[1:]).clone()
        steps = self.clock["steps"]
        limit = int(self.clock["cross"] * (steps + 1)) if self.is_cross else int(self.clock["self"] * steps)
        if self.clock["step"] < limit and (self.is_cross or probs.shape[-1] <= 16**2):
            n, half = self.clock["n"], batch // 2
            for start in (0, half) if self.clock.get("halves") == "both" else (half,):
                probs[start + n : start + 2 * n] = probs[start : start + n]
        out = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1), v))
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("windows, branch", [((0.8, 0.4), "cond"), ((1.0, 1.0), "cond"), ((0.8, 0.4), "both")],
                         ids=["defaults", "every-step", "both-branches"])
def test_toy_end_to_end_matches_p2p_on_eager_attention(windows, branch):
    """End to end on the toy model (every cross- and self-attention layer of it is at <= 16x16 tokens): the control's
    images equal an independent P2P on materialised probabilities with the same start noise."""
    from attnctl.toy import CALL_DEFAULTS as TOY_DEFAULTS
    from attnctl.toy import load_toy_shapes

    cross, self_ = windows
    seeds = [1000, 1001]
    pipe = load_toy_shapes()

    def call(**extra):
        generators = [torch.Generator().manual_seed(s) for s in seeds] + [torch.Generator().manual_seed(s) for s in seeds]
        kwargs = dict(TOY_DEFAULTS, num_images_per_prompt=len(seeds), generator=generators, output_type="np")
        return pipe(["a red circle", "a blue circle"], **kwargs, **extra).images

    with attnctl.apply(pipe, [attnctl.PromptToPrompt(cross_steps=cross, self_steps=self_, branch=branch)]):
        controlled = call()
    clock = {"step": 0, "n": len(seeds), "cross": cross, "self": self_, "steps": TOY_DEFAULTS["num_inference_steps"], "halves": branch}
    pipe.unet.set_attn_processor({name: _EagerP2PProcessor(name.endswith("attn2.processor"), clock) for name in pipe.unet.attn_processors})

    def tick(pipeline, i, t, kwargs):
        clock["step"] = i + 1
        return {}

    reference = call(callback_on_step_end=tick)
    stock_pair = abs(reference[:2] - reference[2:]).max()
    assert stock_pair > 0.1  # the edit changes the image (the colour), so the comparison below means something
    assert abs(controlled - reference).max() < 1e-3


@pytest.mark.parametrize("height, width", [(16, 64), (16, 80), (32, 32)], ids=["8x32", "8x40", "16x16"])
def test_self_attention_is_edited_where_p2p_counts_at_most_256_tokens(height, width, tiny_cache):
    """P2P's rule is a token count (`att_replace.shape[2] <= 16 ** 2`): tiny-sd at 16x64 px has an 8x32 level (256
    tokens: edited, as a 16x16 one) and at 16x80 px an 8x40 one (320: stock). End to end against the eager P2P."""
    pipe = tiny_cache("tiny-sd")
    scale = pipe.vae_scale_factor
    latents = torch.randn(1, 4, height // scale, width // scale, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    kwargs = dict(height=height, width=width, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(cross_steps=1.0, self_steps=1.0)]):
        controlled = pipe([BASE, EDIT], latents=latents.clone(), **kwargs).images
    clock = {"step": 0, "n": 1, "cross": 1.0, "self": 1.0, "steps": 4}
    stock = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({name: _EagerP2PProcessor(name.endswith("attn2.processor"), clock) for name in stock})

    def tick(pipeline, i, t, kwargs):
        clock["step"] = i + 1
        return {}

    try:
        reference = pipe([BASE, EDIT], latents=latents.clone(), callback_on_step_end=tick, **kwargs).images
    finally:
        pipe.unet.set_attn_processor(stock)
    assert (reference[0] - reference[1]).abs().max() > 0.1
    torch.testing.assert_close(controlled, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("height, width, grid", [(16, 64, (8, 32)), (32, 32, (16, 16)), (16, 16, (8, 8))])
def test_local_blend_reads_the_level_nearest_to_256_tokens(height, width, grid, tiny_cache):
    """P2P's `LocalBlend` reads maps of 16x16 = 256 tokens: on tiny-sd's two cross-attention levels the one holding
    (nearest to) 256 tokens, a non-square 8x32 one too."""
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(local_blend=("cat",))]) as handle:
        generate(pipe, "tiny-sd", [BASE, EDIT], steps=2, height=height, width=width)
        assert handle.runtime.last_call.bound[0].blend_grid == grid


# -- local blending (P2P's LocalBlend) -------------------------------------------------------------------------------
def reference_blend_mask(maps: torch.Tensor, base: list[int], edited: list[int], size: tuple[int, int],
                         threshold: float) -> torch.Tensor:
    """P2P's `LocalBlend` mask (Hertz et al. 2022, the authors' notebook), from the definition over given maps
    (rows, h, w): each row's map max-pooled 3x3 (stride 1, padding 1), resized nearest to `size` (source index
    floor(i * in / out)), divided by its maximum and thresholded; the mask of an edited row is the union of its
    base row's and its own (`mask[:1] + mask[1:]`). (edited rows, 1, *size), bool."""
    h, w = maps.shape[-2:]
    padded = torch.nn.functional.pad(maps, (1, 1, 1, 1), value=-float("inf"))
    pooled = torch.stack([padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]).amax(0)
    rows, cols = torch.arange(size[0]) * h // size[0], torch.arange(size[1]) * w // size[1]
    resized = pooled[:, rows][:, :, cols]
    above = resized / resized.flatten(1).amax(1)[:, None, None] > threshold
    return (above[edited] | above[base])[:, None]


def test_blend_mask_is_p2ps_local_blend_over_given_maps(tiny_cache):
    """The bound control's mask over hand-made maps of three prompts with two images each (edited rows 2..5 read
    base rows 0, 1, 0, 1): equal to the reference above, and by hand on peaks: a lone peak dilates to its 3x3
    block, clipped at the border; a value under the threshold of its row's maximum is out; the edited row's mask
    also holds its base row's region."""
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(local_blend=("cat",), blend_threshold=0.3)]) as handle:
        generate(pipe, "tiny-sd", [BASE, EDIT, "a green cat on the street"], steps=1, num_images_per_prompt=2)
        bound = handle.runtime.last_call.bound[0]
    assert bound.blend_grid == (16, 16) and bound.edited == (2, 3, 4, 5)
    base, edited = [0, 1, 0, 1], [2, 3, 4, 5]
    maps = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1  # under 0.3 of every peak
    maps[0, 2, 3], maps[1, 15, 15], maps[2, 9, 9], maps[3, 0, 8], maps[4, 12, 2], maps[5, 6, 6] = 1.0, 2.0, 0.5, 3.0, 1.0, 4.0
    maps[3, 5, 5] = 0.25 * 3.0  # above 0.1 but under 0.3 of its row's maximum
    maps[5, 0, 0] = 0.5 * 4.0  # a second region, in the corner
    bound.maps = maps.flatten(1)
    for size in ((16, 16), (32, 64), (8, 8)):
        got = bound.blend_mask(torch.zeros(6, 4, *size))
        assert got.shape == (4, 1, *size) and set(got.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(got.bool(), reference_blend_mask(maps, base, edited, size, 0.3)), size
    got = bound.blend_mask(torch.zeros(6, 4, 16, 16)).bool()[:, 0]

    def block(y, x):
        region = torch.zeros(16, 16, dtype=torch.bool)
        region[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = True
        return region

    assert torch.equal(got[0], block(2, 3) | block(9, 9))  # row 2: its base row 0's peak and its own
    assert torch.equal(got[1], block(15, 15) | block(0, 8))  # row 3 (base 1): corner and border clipped; (5, 5) out
    assert torch.equal(got[2], block(2, 3) | block(12, 2))
    assert torch.equal(got[3], block(15, 15) | block(6, 6) | block(0, 0))
    packed = bound.blend_mask(torch.zeros(6, 256, 8))  # packed latents (Flux family): the image-token grid
    assert torch.equal(packed, got.flatten(1)[..., None].float())


class _EagerBlendMaps(_EagerP2PProcessor):
    """`_EagerP2PProcessor` that also adds, on the cross-attention layers of `clock["tokens"]` queries, the cond rows'
    own maps of the blend words (their probabilities at the words' tokens summed, averaged over heads) into
    `clock["maps"]`: P2P's attention store as docs/methods.md defines it for attnctl (each row's own attention,
    before the base row's is written into it)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.is_cross and hidden_states.shape[1] == self.clock["tokens"]:
            batch = hidden_states.shape[0]
            q, k = attn.head_to_batch_dim(attn.to_q(hidden_states)), attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, attention_mask).view(batch, attn.heads, hidden_states.shape[1], -1)
            self.clock["maps"] += (probs[batch // 2 :] * self.clock["words"][:, None, None, :]).sum(-1).mean(1)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def test_local_blend_keeps_the_base_latents_outside_the_mask_from_blend_start_on(tiny_cache):
    """P2P's `LocalBlend` end to end on tiny-sd against P2P on eager attention with the blend as a step callback, as
    the authors' `step_callback`: after each step i >= int(blend_start n) the edited latents become
    x_b + mask (x_e - x_b), the mask from both rows' maps of "cat" at the 16x16 level. So outside the mask the
    edited row's latents are the base row's bit for bit after each blended step and differ inside it; before
    blend_start nothing is blended. The random model's maps are nearly flat (the max-normalised maps lie above 0.84
    everywhere), hence the threshold 0.94, which leaves a partial mask with a region from the base row only."""
    pipe = tiny_cache("tiny-sd")
    steps, start, threshold = 3, 0.5, 0.94  # blended steps: 1 and 2
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    kwargs = dict(num_inference_steps=steps, guidance_scale=5.0, output_type="latent", **CALL_DEFAULTS["tiny-sd"])
    controlled = []

    def record(pipeline, i, t, callback_kwargs):
        controlled.append(callback_kwargs["latents"].clone())
        return {}

    control = attnctl.PromptToPrompt(local_blend=("cat",), blend_threshold=threshold, blend_start=start)
    with attnctl.apply(pipe, [control]):
        pipe([BASE, EDIT], latents=latents.clone(), callback_on_step_end=record, **kwargs)

    cat = pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    ids = [pipe.tokenizer(p, padding="max_length", max_length=pipe.tokenizer.model_max_length)["input_ids"] for p in (BASE, EDIT)]
    clock = {"step": 0, "n": 1, "cross": 0.8, "self": 0.4, "steps": steps, "tokens": 256,
             "words": (torch.tensor(ids) == cat).float(), "maps": torch.zeros(2, 256)}
    reference, masks, margins, base_only = [], [], [], []

    def blend(pipeline, i, t, callback_kwargs):
        clock["step"] = i + 1
        x = callback_kwargs["latents"]
        maps = clock["maps"].view(2, 16, 16)
        masks.append(reference_blend_mask(maps, [0], [1], (16, 16), threshold)[0])
        base_only.append(bool((masks[-1] & ~reference_blend_mask(maps, [1], [1], (16, 16), threshold)[0]).any()))
        pooled = torch.nn.functional.max_pool2d(maps[:, None], 3, 1, 1).flatten(1)
        margins.append((pooled / pooled.amax(1, keepdim=True) - threshold).abs().min())
        if i >= int(start * steps):
            x = torch.cat([x[:1], x[:1] + masks[-1] * (x[1:] - x[:1])])
        reference.append(x.clone())
        return {"latents": x}

    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({name: _EagerBlendMaps(name.endswith("attn2.processor"), clock) for name in saved})
    try:
        pipe([BASE, EDIT], latents=latents.clone(), callback_on_step_end=blend, **kwargs)
    finally:
        pipe.unet.set_attn_processor(saved)
    assert min(margins) > 1e-4  # no map value at the threshold: the two runs' masks cannot differ by rounding
    assert all(0 < m.float().mean() < 1 for m in masks[1:])
    assert any(base_only[int(start * steps) :])  # the base row's maps add to the mask
    for i, (c, r, m) in enumerate(zip(controlled, reference, masks)):
        torch.testing.assert_close(c, r, atol=1e-4, rtol=1e-4, msg=f"step {i}")
        outside, inside = (c[1] - c[0])[~m.expand_as(c[1])], (c[1] - c[0])[m.expand_as(c[1])]
        if i >= int(start * steps):
            assert torch.equal(outside, torch.zeros_like(outside)), i  # the base row's latents, bit for bit
            assert inside.abs().max() > 1e-2, i
        else:
            assert outside.abs().max() > 1e-2, i  # not blended yet


def test_render_job_drives_edits(tiny_cache, tmp_path):
    """A render job's PromptToPrompt(edits=[...]): one call [prompt, *edits] from one seed; the strip's first frame is
    the base, the edited frame equals a direct call; the field is validated and round-trips."""
    import json

    import numpy as np
    from PIL import Image

    from attnctl.errors import ConfigError
    from attnctl.render.runner import RenderOptions, render

    control = attnctl.PromptToPrompt(edits=[EDIT])
    assert control.edits == (EDIT,) and attnctl.PromptToPrompt.from_dict(control.to_dict()) == control
    for bad in ([], [""], [3], 5):
        with pytest.raises(ConfigError, match="edits"):
            attnctl.PromptToPrompt(edits=bad)
    pipe = tiny_cache("tiny-sd")
    job = {"id": "p2p", "prompt": BASE, "seeds": [2], "steps": 2,
           "controls": [{"type": "prompt-to-prompt", "edits": [EDIT, "a green cat on the street"]}]}
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(job) + "\n")
    model = attnctl.Model(pipe, "tiny-sd")
    try:
        assert render(str(path), RenderOptions(out=str(tmp_path / "out"), progress="none"), model=model).exit_code == 0
    finally:
        model.release()
    folder = tmp_path / "out" / "p2p"
    with Image.open(folder / "2.png") as strip_image:
        assert strip_image.size == (3 * 32, 32)
    frames = sorted((folder / "2.frames").iterdir())
    assert len(frames) == 3
    generators = [torch.Generator().manual_seed(2) for _ in range(3)]
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(edits=[EDIT, "a green cat on the street"])]):
        direct = pipe([BASE, EDIT, "a green cat on the street"], num_inference_steps=2, generator=generators,
                      **CALL_DEFAULTS["tiny-sd"]).images
        with pytest.raises(ConfigError, match="edits"):
            pipe([BASE, EDIT], num_inference_steps=2, **CALL_DEFAULTS["tiny-sd"])
    with Image.open(frames[1]) as frame:
        assert np.abs(np.asarray(frame, dtype=float) - np.asarray(direct[1], dtype=float)).max() <= 1


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart"])
def test_attention_maps_read_the_linked_rows_in_either_order(name, tiny_cache):
    """A captured map of an edited row is of the attention it runs with (P2P's link outside the capture,
    `LayerHook.links_rows`), whatever the order: the maps of the edited row differed by order (0.030 on tiny-sd, of
    maps about 0.4; 0.68 on tiny-pixart, of maps about 2). "cat" stands at the same token in both prompts (the word
    swap maps it to itself) and every step is in the cross window: the edited row attends with its base row's
    probabilities there, so its "cat" map is the base row's (docs/methods.md), which AttentionMaps alone does not give."""
    pipe = tiny_cache(name)
    prompts = ["a red cat and a blue dog", "a green cat and a blue dog"]
    p2p = lambda: attnctl.PromptToPrompt("replace", cross_steps=1.0, self_steps=0.4)  # noqa: E731
    maps = []
    for controls in ([p2p(), attnctl.AttentionMaps(["cat"])], [attnctl.AttentionMaps(["cat"]), p2p()], [attnctl.AttentionMaps(["cat"])]):
        with attnctl.apply(pipe, controls) as handle:
            generate(pipe, name, prompts, steps=2)
            maps.append(handle.outputs["attention_maps"].maps)
    both, reversed_, alone = maps
    assert torch.equal(both, reversed_), (both - reversed_).abs().max()
    assert torch.equal(both[1], both[0]) and torch.equal(both[0], alone[0])
    assert (alone[1] - alone[0]).abs().max() > 1e-2 * alone[0].abs().max()  # without the link the edit's map differs


def test_alignment_reads_the_tokens_the_encoder_gets_of_a_truncated_prompt(tiny_cache):
    """Two prompts that differ only past CLIP's truncation point are the same prompt to the encoder (start token, 75
    words, end token): refine maps every position to itself. The aligners cut the untruncated ids at 77, so "cat"
    and "dog" stood where the encoder holds its end token, and the end token was left out as a new token."""
    pipe = tiny_cache("tiny-sd")
    base, edit = (" ".join(["red"] * 75) + word for word in (" cat", " dog"))
    assert pipe.tokenizer(base, truncation=True, max_length=77)["input_ids"] == pipe.tokenizer(edit, truncation=True, max_length=77)["input_ids"]
    with attnctl.apply(pipe, [attnctl.PromptToPrompt("refine")]) as handle:
        generate(pipe, "tiny-sd", [base, edit])
        bound = handle.runtime.last_call.bound[0]
    mapper, own, zero = bound.tables["cond"]
    assert mapper is None and zero  # identity: the edited row reads the base row's maps everywhere


def test_the_reweight_table_cannot_be_changed_after_validation():
    """A frozen control's equalizer table: assigning into it raises (a dict field would take `nan` unvalidated and
    change the control's hash); it copies, pickles and serialises as the validated table."""
    import copy
    import pickle

    control = attnctl.PromptToPrompt(reweight={"dog": 2.0, "cat": 0.5})
    before = hash(control)
    with pytest.raises(TypeError):
        control.reweight["dog"] = float("nan")
    assert hash(control) == before and control.reweight == {"dog": 2.0, "cat": 0.5}
    assert pickle.loads(pickle.dumps(control)) == control == copy.deepcopy(control)
    assert type(control.to_dict()["reweight"]) is dict
