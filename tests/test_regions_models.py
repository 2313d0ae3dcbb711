"""Regions on the tiny models: identities, the independent eager reference, backends, 32 regions, rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnctl
from attnctl import Region, Regions
from attnctl.errors import BackendError
from attnctl.testing import make_tiny_pipeline

from . import regions_reference as ref
from .helpers import Probe, generate

pytestmark = pytest.mark.parity

HEIGHT, WIDTH = 32, 48  # a 2:3 canvas: non-square grids everywhere
PROMPT = "a red circle and a blue square"


def soft_mask() -> np.ndarray:
    """A soft mask over the lower part of the canvas (64 x 96: divides every tiny grid)."""
    rows = np.linspace(0, 1, 64, dtype=np.float32)[:, None]
    cols = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, 96, dtype=np.float32))[None, :]
    return np.clip(rows * 1.5 - 0.5, 0, 1) * cols


def layout() -> list[Region]:
    """Two overlapping subject boxes (edges on 1/64 steps, some cutting cells) and a soft background region."""
    return [
        Region("a red circle", box=(0.0, 0.0, 35 / 64, 1.0)),
        Region("a blue square", box=(22 / 64, 8 / 64, 1.0, 48 / 64)),
        Region("a green tree", mask=soft_mask(), subject=False),
    ]


def _shapes(regions):
    return [r.box if r.box is not None else r.shape.double() for r in regions]


def run(pipe, name, controls=(), backend="auto", prompt=PROMPT, **kwargs):
    if controls is None:
        return generate(pipe, name, prompt=prompt, height=HEIGHT, width=WIDTH, **kwargs)
    with attnctl.apply(pipe, list(controls), backend=backend):
        return generate(pipe, name, prompt=prompt, height=HEIGHT, width=WIDTH, **kwargs)


# -- identities ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_one_full_region_with_the_base_prompt_is_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name, None)
    controlled = run(pipe, name, [Regions([Region(PROMPT, box=(0, 0, 1, 1))], base_ratio=0.0)])
    torch.testing.assert_close(controlled, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(pipe, name, None), stock)  # removed cleanly


@pytest.mark.parametrize("name", ["tiny-chroma", "tiny-qwenimage"])
def test_region_prompts_keep_their_padding_masked_on_families_that_mask_it(name, tiny_cache):
    """Chroma and Qwen-Image mask the padding of the prompt's text: a region prompt's padding is masked too (it was
    attended). Chroma: one full region with the base prompt, after a longer region, is the stock image; Qwen-Image:
    the text mask the transformer receives is 0 at exactly the shorter region's padding (its region tokens take
    later text RoPE positions, so its output is not bitwise stock: docs/methods.md)."""
    from attnctl.testing.new_families import available

    if not available(name):
        pytest.skip(f"{name} needs a newer diffusers")
    pipe = tiny_cache(name)
    prompt = "a red circle"
    regions = [Region("a very very long and detailed description of a big blue square", box=(0, 0, 1, 1)),
               Region(prompt, box=(0, 0, 1, 1))]
    stock = generate(pipe, name, prompt=prompt)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        with attnctl.apply(pipe, [Regions(regions, base_ratio=0.0)]):
            controlled = generate(pipe, name, prompt=prompt)
    finally:
        hook.remove()
    if name == "tiny-chroma":
        torch.testing.assert_close(controlled, stock, rtol=1e-5, atol=1e-5)
        return
    texts = pipe.encode_prompt([r.prompt for r in regions], device="cpu")[1]  # the regions' own padding mask
    mask = seen[0]["encoder_hidden_states_mask"]
    base = mask.shape[1] - texts.numel()
    assert texts is not None and not bool(texts.all())
    assert torch.equal(mask[:, base:].bool(), texts.reshape(1, -1).expand(mask.shape[0], -1).bool())


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_base_ratio_one_is_bitwise_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name, None)
    assert torch.equal(run(pipe, name, [Regions(layout(), base_ratio=1.0)]), stock)


def test_outside_the_step_window_nothing_changes(tiny_cache):
    pipe = tiny_cache("tiny-flux")
    stock = run(pipe, "tiny-flux", None, steps=1)
    assert torch.equal(run(pipe, "tiny-flux", [Regions(layout(), steps=(0.5, 1.0))], steps=1), stock)
    assert not torch.equal(run(pipe, "tiny-flux", [Regions(layout(), steps=(0.0, 0.5))], steps=1), stock)


# -- the independent reference -------------------------------------------------------------------------------------
def _cross_state(pipe, name, regions, base_ratio, isolate, strength):
    if name == "tiny-sd":
        grids = {16 * 24: (16, 24), 8 * 12: (8, 12)}
        context = pipe.encode_prompt([r.prompt for r in regions], "cpu", 1, False)[0]
        bias = None
    else:
        grids = {8 * 12: (8, 12)}
        embeds, mask, _, _ = pipe.encode_prompt([r.prompt for r in regions], do_classifier_free_guidance=False,
                                                num_images_per_prompt=1, device="cpu", clean_caption=False, max_sequence_length=32)
        with torch.no_grad():
            context = pipe.transformer.caption_projection(embeds)
        bias = (1 - mask.double()) * -10000.0
    return ref.RefState(_shapes(regions), [r.subject for r in regions], base_ratio, isolate, strength, grids,
                        region_context=context.detach(), region_bias=bias, cond_rows=[1])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart"])
@pytest.mark.parametrize("base_ratio, isolate, strength", [(0.0, False, float("inf")), (0.3, True, float("inf")), (0.2, True, 2.5)])
def test_cross_attention_matches_the_reference(name, base_ratio, isolate, strength):
    pipe = make_tiny_pipeline(name)
    regions = layout()
    control = Regions(regions, base_ratio=base_ratio, isolate=isolate, isolation_strength=strength)
    got = run(pipe, name, [control])
    state = _cross_state(pipe, name, regions, base_ratio, isolate, strength)
    denoiser = pipe.unet if name == "tiny-sd" else pipe.transformer
    saved = dict(denoiser.attn_processors)
    denoiser.set_attn_processor({
        key: ref.RefClassicProcessor(state, cross=denoiser.get_submodule(key[: -len(".processor")]).is_cross_attention, isolate_here=True)
        for key in saved
    })
    try:
        expected = run(pipe, name, None)
    finally:
        denoiser.set_attn_processor(saved)
    stock = run(pipe, name, None)
    assert (got - stock).abs().max() > 1e-3  # the layout does something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _joint_reference(pipe, name, regions, base_ratio, isolate, strength, rule="open", **call):
    prompts = [r.prompt for r in regions]
    if name == "tiny-flux":
        embeds = pipe.encode_prompt(prompts, None, device="cpu", num_images_per_prompt=1, max_sequence_length=32)[0]
        negative, grids, base_len, cfg = None, {8 * 12: (8, 12)}, 32, False
    else:
        def encode(texts):
            return pipe.encode_prompt(texts, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                      max_sequence_length=16)[0]

        embeds, negative = encode(prompts), encode([""] * len(prompts))
        grids, base_len, cfg = {16 * 24: (16, 24)}, 77 + 16, True
    state = ref.RefState(_shapes(regions), [r.subject for r in regions], base_ratio, isolate, strength, grids,
                         base_len=base_len, region_len=embeds.shape[1], text_first=name == "tiny-flux", rule=rule)
    undo = ref.install_joint_reference(pipe, state, embeds.detach(), None if negative is None else negative.detach(), cfg)
    try:
        return run(pipe, name, None, **call)
    finally:
        undo()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("base_ratio, isolate, strength, rule", [(0.0, False, float("inf"), "open"), (0.3, True, float("inf"), "open"),
                                                                 (0.2, True, 2.5, "open"), (0.3, False, float("inf"), "chen"),
                                                                 (0.0, True, 2.5, "chen")])
def test_joint_attention_matches_the_reference(name, base_ratio, isolate, strength, rule):
    pipe = make_tiny_pipeline(name)
    regions = layout()
    call = {"max_sequence_length": 16} if name == "tiny-sd3" else {}
    got = run(pipe, name, [Regions(regions, base_ratio=base_ratio, isolate=isolate, isolation_strength=strength, joint_rule=rule)], **call)
    expected = _joint_reference(pipe, name, regions, base_ratio, isolate, strength, rule, **call)
    stock = run(pipe, name, None, **call)
    assert (got - stock).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- backends, rows, scale -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_sdpa_and_reference_backends_agree(name, tiny_cache):
    pipe = tiny_cache(name)
    control = Regions(layout(), base_ratio=0.2, isolate=True)
    call = {"max_sequence_length": 16} if name == "tiny-sd3" else {}
    sdpa = run(pipe, name, [control], backend="sdpa", **call)
    reference = run(pipe, name, [control], backend="reference", **call)
    torch.testing.assert_close(sdpa, reference, rtol=1e-4, atol=1e-4)


def _first_predictions(pipe, name, variants, **call):
    """The denoiser's outputs of a one-step call (every denoiser call of it), per variant of controls."""
    seen = {}
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer

    def capture(key):
        def hook(module, args, kwargs, output):
            seen.setdefault(key, []).append(output[0].detach().clone())
        return hook

    for key, controls in variants.items():
        handle = denoiser.register_forward_hook(capture(key), with_kwargs=True)
        try:
            run(pipe, name, controls, steps=1, **call)
        finally:
            handle.remove()
    return seen


def test_uncond_rows_keep_the_negative_prompt_and_get_isolation(tiny_cache):
    """With CFG the uncond rows keep the negative prompt everywhere: without isolation their prediction is the stock
    one. Isolation applies to every row (docs/methods.md does not restrict it): the uncond rows then equal those of
    isolation alone (base_ratio 1, no region prompts)."""
    pipe = tiny_cache("tiny-sd3")
    seen = _first_predictions(pipe, "tiny-sd3", {
        "stock": None,
        "regions": [Regions(layout(), base_ratio=0.0)],
        "isolated": [Regions(layout(), base_ratio=0.0, isolate=True)],
        "isolation only": [Regions(layout(), base_ratio=1.0, isolate=True)],
    }, max_sequence_length=16)
    stock, regions, isolated, only = (seen[key][0] for key in ("stock", "regions", "isolated", "isolation only"))
    torch.testing.assert_close(regions[0], stock[0], rtol=1e-5, atol=1e-5)
    assert (regions[1] - stock[1]).abs().max() > 1e-3
    assert (isolated[0] - stock[0]).abs().max() > 1e-3  # the uncond row is isolated too
    torch.testing.assert_close(isolated[0], only[0], rtol=1e-5, atol=1e-5)  # ... and gets nothing else


def test_isolation_applies_to_the_uncond_rows_of_a_unet(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    seen = _first_predictions(pipe, "tiny-sd", {"stock": None, "isolated": [Regions(layout(), base_ratio=1.0, isolate=True)]})
    stock, isolated = seen["stock"][0], seen["isolated"][0]
    assert (isolated[0] - stock[0]).abs().max() > 1e-4  # the uncond row (row 0 of [uncond, cond])
    assert (isolated[1] - stock[1]).abs().max() > 1e-4


def test_thirty_two_regions_on_tiny_sd():
    pipe = make_tiny_pipeline("tiny-sd")
    boxes = [Region(f"a {colour} {shape}", box=(col / 8, row / 4, (col + 1) / 8, (row + 1) / 4))
             for row, colour in enumerate(("red", "green", "blue", "yellow")) for col, shape in enumerate(
                 ("cat", "dog", "bird", "car", "tree", "house", "boat", "star"))]
    control = Regions(boxes, base_ratio=0.1, isolate=True)
    got = run(pipe, "tiny-sd", [control])
    assert torch.isfinite(got).all()
    state = _cross_state(pipe, "tiny-sd", boxes, 0.1, True, float("inf"))
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({
        key: ref.RefClassicProcessor(state, cross=pipe.unet.get_submodule(key[: -len(".processor")]).is_cross_attention, isolate_here=True)
        for key in saved
    })
    try:
        expected = run(pipe, "tiny-sd", None)
    finally:
        pipe.unet.set_attn_processor(saved)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_region_attention_memory_is_chunked():
    """Chunks bound the gathered queries (C * S) by the budget, whatever the number of regions."""
    from attnctl.controls.regions.attention import region_chunks
    from attnctl.controls.regions.masks import grid_layout

    boxes = tuple((c / 8, r / 4, (c + 1) / 8, (r + 1) / 4) for r in range(4) for c in range(8))
    weights = grid_layout(boxes, (16, 24)).weights
    chunks = region_chunks(weights, budget=2 * 16 * 24)
    assert sum(c.stop - c.start for c in chunks) == 32
    assert all(c.index.numel() <= 2 * 16 * 24 for c in chunks)
    for chunk in chunks:  # each region's cells, and only those, with their weights
        for row, r in enumerate(range(chunk.start, chunk.stop)):
            cells = torch.nonzero(weights[r] > 0).flatten()
            assert torch.equal(chunk.index[row, : len(cells)], cells)
            assert torch.equal(chunk.weight[row, : len(cells)], weights[r, cells])
            assert torch.all(chunk.weight[row, len(cells):] == 0)


def test_overlapping_regions_average_their_prompts(tiny_cache):
    """Two regions over the whole canvas share every cell: each weighs 1/2 (docs/methods.md: normalised to sum 1)."""
    pipe = tiny_cache("tiny-sd")
    both = Regions([Region("a red cat", box=(0, 0, 1, 1)), Region("a blue dog", box=(0, 0, 1, 1))], base_ratio=0.0)
    got = run(pipe, "tiny-sd", [both])
    state = _cross_state(pipe, "tiny-sd", list(both.regions), 0.0, False, float("inf"))
    # the same as the reference with soft masks of 1/2 each, which is not normalised further
    state.shapes = [torch.full((64, 96), 0.5, dtype=torch.float64)] * 2
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({
        key: ref.RefClassicProcessor(state, cross=pipe.unet.get_submodule(key[: -len(".processor")]).is_cross_attention, isolate_here=False)
        for key in saved
    })
    try:
        expected = run(pipe, "tiny-sd", None)
    finally:
        pipe.unet.set_attn_processor(saved)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_joint_overlap_goes_to_the_later_region(tiny_cache):
    """In joint attention a cell shared by two regions takes the later region's text (documented)."""
    pipe = tiny_cache("tiny-flux")
    first_wins = Regions([Region("a blue dog", box=(0, 0, 1, 1)), Region("a red cat", box=(0, 0, 1, 1))], base_ratio=0.0)
    only_cat = Regions([Region("a red cat", box=(0, 0, 1, 1))], base_ratio=0.0)
    torch.testing.assert_close(run(pipe, "tiny-flux", [first_wins]), run(pipe, "tiny-flux", [only_cat]), rtol=1e-4, atol=1e-4)


def test_regions_apply_to_perturbed_cond_rows(tiny_cache):
    """Perturbed copies of the cond rows are cond rows: region edits see them (tagged rows in the layout)."""
    from tests.test_guidance_wrapper import ConstantGuidance

    pipe = tiny_cache("tiny-sd")
    probe = Probe()
    control = Regions(layout(), base_ratio=0.0)
    plain = run(pipe, "tiny-sd", [control])
    guided = run(pipe, "tiny-sd", [probe, control, ConstantGuidance(value=0.0)])
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)  # perturbed rows got the same regions
    assert any(("cond", 0, "const") in entry[3] for entry in probe.log if entry[0] != "bind")


def test_region_prompts_are_not_recorded_as_the_users_prompt(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    probe = Probe()
    with attnctl.apply(pipe, [probe, Regions(layout())]) as handle:
        generate(pipe, "tiny-sd", prompt=PROMPT, height=HEIGHT, width=WIDTH)
        calls = handle.runtime.last_call.encode_calls
    assert len(calls) == 1 and calls[0]["prompt"] == PROMPT


def test_describe_and_default_layers(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    def regions_section(text):
        return text.split("- Regions")[1].split("- no control")[0]

    with attnctl.apply(pipe, [Regions(layout(), isolate=True)]) as handle:
        text = regions_section(handle.describe())
    assert "attn2 (cross)" in text and "attn1 (self)" in text
    with attnctl.apply(pipe, [Regions(layout())]) as handle:
        text = regions_section(handle.describe())
    assert "attn2 (cross)" in text and "attn1" not in text


def test_sdpa_dense_limit_is_reported(tiny_cache, monkeypatch):
    from attnctl.kernels import sdpa

    pipe = tiny_cache("tiny-sd")
    monkeypatch.setattr(sdpa, "DENSE_MASK_LIMIT", 10)
    with pytest.raises(BackendError, match="flex"):
        run(pipe, "tiny-sd", [Regions(layout(), isolate=True)], backend="sdpa")


# -- layer selections, batches, families' particular calls ----------------------------------------------------------
def _install_classic_reference(denoiser, state, regions_here=lambda name: True, isolate_here=lambda name: True):
    saved = dict(denoiser.attn_processors)
    processors = {}
    for key in saved:
        name = key[: -len(".processor")]
        module = denoiser.get_submodule(name)
        processors[key] = ref.RefClassicProcessor(state, cross=module.is_cross_attention, isolate_here=isolate_here(name),
                                                  regions_here=regions_here(name))
    denoiser.set_attn_processor(processors)
    return lambda: denoiser.set_attn_processor(saved)


def test_sdxl_matches_the_reference():
    pipe = make_tiny_pipeline("tiny-sdxl")
    regions = layout()
    got = run(pipe, "tiny-sdxl", [Regions(regions, base_ratio=0.2, isolate=True)])
    context = pipe.encode_prompt([r.prompt for r in regions], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    state = ref.RefState(_shapes(regions), [r.subject for r in regions], 0.2, True, float("inf"), {8 * 12: (8, 12)},
                         region_context=context.detach(), cond_rows=[1])
    undo = _install_classic_reference(pipe.unet, state)
    try:
        expected = run(pipe, "tiny-sdxl", None)
    finally:
        undo()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_layer_selection_and_prompt_batches_on_sd():
    """Regions on the up blocks only, isolation in the mid block only; two prompts, two images each."""
    pipe = make_tiny_pipeline("tiny-sd")
    regions = layout()
    control = Regions(regions, base_ratio=0.1, isolate=True, layers=("up & cross", "mid & self"))
    prompts = [PROMPT, "a photo of a cat"]
    got = run(pipe, "tiny-sd", [control], prompt=prompts, num_images_per_prompt=2)
    state = _cross_state(pipe, "tiny-sd", regions, 0.1, True, float("inf"))
    state.cond_rows = [4, 5, 6, 7]
    undo = _install_classic_reference(pipe.unet, state, regions_here=lambda name: name.startswith("up_blocks"),
                                      isolate_here=lambda name: name.startswith("mid_block"))
    try:
        expected = generate(pipe, "tiny-sd", prompt=prompts, height=HEIGHT, width=WIDTH, num_images_per_prompt=2)
    finally:
        undo()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    got_all = run(pipe, "tiny-sd", [Regions(regions, base_ratio=0.1, isolate=True)], prompt=prompts, num_images_per_prompt=2)
    assert (got_all - got).abs().max() > 1e-4  # the selection matters


@pytest.mark.parametrize("name, layers, active", [
    ("tiny-flux", "double", lambda n: n.startswith("transformer_blocks")),
    ("tiny-flux", "single_transformer_blocks.1", lambda n: n.startswith("single_transformer_blocks.1")),
    ("tiny-sd3", "transformer_blocks.1", lambda n: n.startswith("transformer_blocks.1")),
])
def test_joint_layers_outside_the_selection_hide_region_tokens(name, layers, active):
    pipe = make_tiny_pipeline(name)
    regions = layout()
    call = {"max_sequence_length": 16} if name == "tiny-sd3" else {}
    got = run(pipe, name, [Regions(regions, base_ratio=0.2, isolate=True, layers=layers)], **call)
    prompts = [r.prompt for r in regions]
    if name == "tiny-flux":
        embeds = pipe.encode_prompt(prompts, None, device="cpu", num_images_per_prompt=1, max_sequence_length=32)[0]
        negative, grids, base_len, cfg = None, {8 * 12: (8, 12)}, 32, False
    else:
        def encode(texts):
            return pipe.encode_prompt(texts, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                      max_sequence_length=16)[0]
        embeds, negative, grids, base_len, cfg = encode(prompts), encode([""] * 3), {16 * 24: (16, 24)}, 93, True
    state = ref.RefState(_shapes(regions), [r.subject for r in regions], 0.2, True, float("inf"), grids,
                         base_len=base_len, region_len=embeds.shape[1], text_first=name == "tiny-flux")
    undo = ref.install_joint_reference(pipe, state, embeds.detach(), None if negative is None else negative.detach(), cfg,
                                       active=lambda key: active(key[: -len(".processor")]))
    try:
        expected = run(pipe, name, None, **call)
    finally:
        undo()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_isolation_only_in_joint_attention(name):
    """base_ratio 1 with isolation: no region tokens are appended, only image x image isolation applies."""
    pipe = make_tiny_pipeline(name)
    regions = layout()
    call = {"max_sequence_length": 16} if name == "tiny-sd3" else {}
    got = run(pipe, name, [Regions(regions, base_ratio=1.0, isolate=True)], **call)
    expected = _joint_reference(pipe, name, regions, 1.0, True, float("inf"), **call)
    assert (got - run(pipe, name, None, **call)).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sd35_dual_attention_layers_get_isolation():
    pipe = make_tiny_pipeline("tiny-sd3", qk_norm="rms_norm", dual_attention_layers=(0,))
    regions = layout()
    control = Regions(regions, base_ratio=0.2, isolate=True)
    with attnctl.apply(pipe, [control]) as handle:
        section = handle.describe().split("- Regions")[1]
    assert "transformer_blocks.0.attn2 (self)" in section
    got = run(pipe, "tiny-sd3", [control], max_sequence_length=16)
    expected = _joint_reference(pipe, "tiny-sd3", regions, 0.2, True, float("inf"), max_sequence_length=16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_flux_true_cfg_uncond_call_is_stock(tiny_cache):
    pipe = tiny_cache("tiny-flux")
    extra = {"negative_prompt": "a dog", "true_cfg_scale": 3.0}
    seen = _first_predictions(pipe, "tiny-flux", {
        "stock": None,
        "regions": [Regions(layout(), base_ratio=0.0)],
        "isolated": [Regions(layout(), base_ratio=0.0, isolate=True)],
        "isolation only": [Regions(layout(), base_ratio=1.0, isolate=True)],
    }, **extra)
    stock_cond, stock_uncond = seen["stock"]
    cond, uncond = seen["regions"]
    assert torch.equal(uncond, stock_uncond)  # bitwise: no region tokens (not even hidden ones) in the uncond call
    assert (cond - stock_cond).abs().max() > 1e-3
    # isolation acts in the uncond call too (without region tokens there): as isolation alone does
    _, isolated_uncond = seen["isolated"]
    _, only_uncond = seen["isolation only"]
    assert (isolated_uncond - stock_uncond).abs().max() > 1e-4
    torch.testing.assert_close(isolated_uncond, only_uncond, rtol=1e-5, atol=1e-5)


def test_prompt_embeds_work(tiny_cache):
    """Region prompts are encoded by attnctl even when the base prompt comes as embeddings."""
    pipe = tiny_cache("tiny-sd")
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    control = Regions(layout(), base_ratio=0.2)
    with attnctl.apply(pipe, [control]):
        from_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, guidance_scale=5.0,
                           height=HEIGHT, width=WIDTH, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(from_embeds, run(pipe, "tiny-sd", [control]), rtol=1e-5, atol=1e-5)


def test_two_region_controls_conflict(tiny_cache):
    from attnctl.errors import ConfigError

    pipe = tiny_cache("tiny-flux")
    with pytest.raises(ConfigError, match="two sets of region text tokens"):
        attnctl.apply(pipe, [Regions(layout(), layers="double"), Regions(layout(), layers="single")])
    assert "forward" not in pipe.transformer.__dict__  # nothing was installed


# -- composition with other controls' edits on joint layers -----------------------------------------------------------
from dataclasses import dataclass  # noqa: E402

from attnctl.control import Bound, Control  # noqa: E402
from attnctl.kernels.spec import Window  # noqa: E402
from attnctl.processors.edit import Edit  # noqa: E402


@dataclass(frozen=True)
class KeyBias(Control, type_name="test-regions-key-bias"):
    """A per-key bias on the base text's first token for image queries (as Reweight would set), or a window."""

    value: float = 0.0
    window: bool = False
    layers: object = None

    def bind(self, context):
        return _KeyBiasBound(self, context.layers, (0.0, 1.0))


class _KeyBiasBound(Bound):
    def edit(self, layer, frame):
        geometry = frame.geometry(layer)
        if self.control.window:
            return Edit(window=Window(geometry.image_hw, radius=(1, 1), text_len=geometry.text_len, text_first=layer.text == "first"))
        bias = torch.zeros(len(frame.rows), geometry.query_len)
        bias[:, geometry.text_slice.start] = self.control.value
        image = geometry.image_slice
        return Edit(key_bias=bias, query_range=(image.start, image.stop))


@pytest.mark.parametrize("layers", [None, "double"])
def test_other_controls_key_bias_goes_through_region_attention(layers, tiny_cache):
    pipe = tiny_cache("tiny-flux")
    regions = Regions(layout(), base_ratio=0.3, layers=layers)
    alone = run(pipe, "tiny-flux", [regions])
    torch.testing.assert_close(run(pipe, "tiny-flux", [regions, KeyBias(0.0)]), alone, rtol=1e-5, atol=1e-5)
    biased = run(pipe, "tiny-flux", [regions, KeyBias(-30.0)])
    assert (biased - alone).abs().max() > 1e-4
    assert torch.isfinite(biased).all()


def test_window_edits_cannot_share_a_region_layer(tiny_cache):
    from attnctl.errors import ConfigError

    pipe = tiny_cache("tiny-flux")
    with pytest.raises(ConfigError, match="window"):
        run(pipe, "tiny-flux", [Regions(layout(), base_ratio=0.3, layers="double"), KeyBias(window=True, layers="double")])


def test_window_edits_run_on_joint_layers_that_only_carry_region_tokens(tiny_cache):
    """Behaviour change (#22 semantics): a window on a joint layer outside Regions' layers, where the region tokens
    are only carried along (`HiddenHook`), was refused; the window is now restricted to the image and base-text
    tokens of the base attention (`kernels.semantics.spec_tokens`)."""
    pipe = tiny_cache("tiny-flux")
    regions = Regions(layout(), base_ratio=0.3, layers="double")
    alone = run(pipe, "tiny-flux", [regions])
    windowed = run(pipe, "tiny-flux", [regions, KeyBias(window=True, layers="single")])
    assert torch.isfinite(windowed).all()
    assert (windowed - alone).abs().max() > 1e-4
