"""AttentionMaps: per-word maps on every family, against an eager reference, bounded memory, pictures."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl import AttentionMaps, ConfigError, Reweight, TokenError
from attnctl.control import Control
from attnctl.controls.maps.capture import AttentionMapResult, word_attention
from attnctl.testing import CALL_DEFAULTS, TINY_MODELS

from .reference_attention import PipelineMask, Spy, layout, text_positions

PROMPTS = ["a red cat on the street", "a photo of a red car"]
WORDS = ["red", "a", "street"]


def _run(pipe, name, prompt=PROMPTS, steps=2, output_type="latent", **kwargs):
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, output_type=output_type,
                generator=torch.Generator().manual_seed(0), **options).images


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from an object's attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith(("attnctl.controls", "attnctl.processors")):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("name", TINY_MODELS)
def test_one_map_per_word_per_image_and_stock_output(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = _run(pipe, name)
    with attnctl.apply(pipe, [AttentionMaps(WORDS)]) as handle:
        latents = _run(pipe, name, num_images_per_prompt=2)
        result = handle.outputs["attention_maps"]
        images = _run(pipe, name, output_type="pil")
        pictures = handle.outputs["attention_maps"]
    assert torch.equal(_run(pipe, name), stock)
    assert latents.shape[0] == 4 and result.maps.shape == (4, 3, 32, 32)  # 2 prompts x 2 images, 3 words, image size
    assert result.words == tuple(WORDS) and len(result) == 4 and set(result[0]) == set(WORDS)
    assert torch.equal(result["red"][3], result[3]["red"]) and result["red"].shape == (4, 32, 32)
    assert torch.isfinite(result.maps).all() and (result.maps >= 0).all()
    present = result.maps.flatten(2).amax(-1) > 0  # "street" is not in the second prompt (images 2, 3)
    assert present[:, :2].all() and present[:2, 2].all() and not present[2:, 2].any()
    assert result.contributions == (2 * len(handle.runtime.resolved[0]),) * 4
    assert result.images is None  # latents: nothing decoded
    assert len(pictures.images) == 2 and pictures.images[0].size == images[0].size
    assert "postprocess" not in vars(pipe.image_processor)


def test_capture_does_not_change_the_output(tiny_cache):
    for name in ("tiny-sd", "tiny-flux"):
        pipe = tiny_cache(name)
        stock = _run(pipe, name)
        with attnctl.apply(pipe, [AttentionMaps(["red"], layers=None, steps=(0.0, 1.0))]):
            assert torch.equal(_run(pipe, name), stock)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_matches_eager_reference(name, tiny_cache):
    """Explicit softmax over every key of the row (image keys too in joint attention, the model's text padding mask
    taken from the pipeline), sum over heads, the word's tokens, layers and steps, bilinear resizing; on a
    non-square image (32 x 48: rows of 48 pixels), whose token grids the reference derives from the image size."""
    height, width = 32, 48
    pipe = tiny_cache(name)
    with PipelineMask(pipe, name) as padding:
        spy = Spy(padding=padding)
        with attnctl.apply(pipe, [AttentionMaps(WORDS, resolution=(20, 24)), spy]) as handle:
            _run(pipe, name, height=height, width=width)
            result = handle.outputs["attention_maps"]
    assert (padding.calls > 0) == (name == "tiny-pixart")

    def grid(tokens: int) -> tuple[int, int]:
        """The (rows, columns) of an image's token grid: the image's size divided by one factor on both axes."""
        factor = (height * width / tokens) ** 0.5
        h, w = round(height / factor), round(width / factor)
        assert h * w == tokens and h != w
        return h, w

    finest = max(r["q"].shape[2] for r in spy.log)
    expected = None
    for record in spy.log:
        q, k = record["q"].double(), record["k"].double()
        n_q, n_k = q.shape[2], k.shape[2]
        text_keys, image_rows, _ = layout(name, n_q, n_k)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        assert (record["model_mask"] is None) == (record["mask"] is None)
        if record["model_mask"] is not None:
            logits = logits + record["model_mask"]
        probs = torch.softmax(logits, dim=-1)[:, :, image_rows].sum(1)  # (B, Ni, Nk)
        h, w = grid(image_rows.stop - image_rows.start)
        rows = [(i, row.prompt) for i, row in enumerate(record["rows"].rows) if row.branch == "cond"]
        maps = torch.zeros(len(PROMPTS), len(WORDS), h, w, dtype=torch.float64)
        for i, prompt in rows:
            for n, word in enumerate(WORDS):
                keys = [text_keys.start + p for p in text_positions(pipe, name, PROMPTS[prompt], word)]
                maps[prompt, n] = probs[i][:, keys].sum(-1).reshape(h, w)  # row-major: a row of w tokens at a time
        if h * w < finest:
            full = grid(finest) if name in ("tiny-sd", "tiny-sdxl") else (h, w)
            maps = F.interpolate(maps, size=full, mode="bilinear", align_corners=False)
        expected = maps if expected is None else expected + maps
    torch.testing.assert_close(result.grid_maps.double(), expected, rtol=1e-5, atol=1e-6)
    resized = F.interpolate(expected, size=(20, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(result.maps.double(), resized, rtol=1e-5, atol=1e-6)
    if name in ("tiny-sd3", "tiny-flux"):  # normalised over the full row: text gets a part of the mass only
        everything = [text_keys.start + p for p in range(text_keys.stop - text_keys.start)]
        assert float(torch.softmax(logits, -1)[..., image_rows, :][..., everything].sum(-1).max()) < 1.0


class _ProbabilityRecorder:
    """attention-map-diffusers' view of a cross-attention layer, written from its definition: a plain processor
    (explicit softmax, no attnctl) that records the probabilities summed over heads, (rows, h, w, text tokens)."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
                   for t in (attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)))
        probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * attn.scale, dim=-1)
        side = int(round(n**0.5))
        self.store.append((self.name, probs.sum(1).reshape(b, side, side, -1)))
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def test_maps_match_attention_map_diffusers():
    """The peer's definition (wooyeolbaek/attention-map-diffusers): per (timestep, cross-attention layer) the
    probabilities summed over heads, the cond half, each resized bilinearly to the first (finest) layer's grid,
    averaged over every (timestep, layer): `grid_maps / contributions`, on a UNet whose levels have 2 and 4 heads
    (so summing heads, not averaging them, decides how the levels weigh)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from attnctl.testing import make_tiny_pipeline

    base = make_tiny_pipeline("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=4,
    ).eval()
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    assert {m.heads for n, m in unet.named_modules() if n.endswith("attn2")} == {2, 4}
    with attnctl.apply(pipe, [AttentionMaps(WORDS)]) as handle:
        _run(pipe, "tiny-sd")
        result = handle.outputs["attention_maps"]
    store: list = []
    stock = dict(unet.attn_processors)
    unet.set_attn_processor({n: _ProbabilityRecorder(n, store) if n.endswith("attn2.processor") else p for n, p in stock.items()})
    try:
        _run(pipe, "tiny-sd")
    finally:
        unet.set_attn_processor(stock)
    grid = store[0][1].shape[1:3]
    total = 0
    for _, probs in store:
        cond = probs.chunk(2)[1].permute(0, 3, 1, 2)  # (prompts, tokens, h, w)
        total = total + F.interpolate(cond, size=grid, mode="bilinear", align_corners=False)
    total = total / len(store)
    expected = torch.stack([
        torch.stack([total[i, text_positions(pipe, "tiny-sd", prompt, word)].sum(0) for word in WORDS]) for i, prompt in enumerate(PROMPTS)
    ])
    contributions = torch.tensor(result.contributions, dtype=torch.float64)[:, None, None, None]
    torch.testing.assert_close(result.grid_maps.double() / contributions, expected, rtol=1e-4, atol=1e-5)
    with attnctl.apply(pipe, [AttentionMaps(WORDS, heads="mean")]) as handle:
        _run(pipe, "tiny-sd")
        averaged = handle.outputs["attention_maps"]
    assert not torch.allclose(averaged.normalized(), result.normalized(), atol=1e-3)  # the levels weigh differently
    with pytest.raises(ConfigError, match=r"AttentionMaps.heads must be one of 'sum', 'mean', got 'max'"):
        AttentionMaps(WORDS, heads="max")


def test_word_attention_chunks_and_per_head_selectors():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    selector = (torch.rand(2, 4, 40, generator=g) > 0.7).float()
    bias = torch.randn(2, 1, 50, 40, generator=g)
    bias[0, 0, 7] = float("-inf")  # a row with every key masked attends to nothing
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias, -1).nan_to_num(0.0)
    expected = torch.einsum("bhqk,bwk->bqw", probs, selector) / 3
    for chunk in (1 << 24, 3 * 40 * 2 * 7):  # one chunk; 7 query rows per chunk
        torch.testing.assert_close(word_attention(q, k, selector, bias=bias, chunk_elements=chunk), expected)
    per_head = selector[:, None].expand(2, 3, 4, 40) * torch.tensor([1.0, 2.0, 0.0])[None, :, None, None]
    expected = torch.einsum("bhqk,bhwk->bqw", probs, per_head) / 3
    torch.testing.assert_close(word_attention(q, k, per_head, bias=bias, chunk_elements=200), expected)


def test_stored_bytes_do_not_grow_with_steps(tiny_cache):
    name = "tiny-sd"
    pipe = tiny_cache(name)
    counted = {}
    with attnctl.apply(pipe, [AttentionMaps(WORDS)]) as handle:
        for steps in (2, 6):
            _run(pipe, name, steps=steps)
            bound = handle.runtime.last_call.bound[0]
            result = handle.outputs["attention_maps"]
            counted[steps] = (_tensor_bytes(bound), bound.stored_bytes(), result.stored_bytes, result.contributions[0])
    assert counted[2][:3] == counted[6][:3] and counted[2][0] > 0
    assert counted[6][3] == 3 * counted[2][3]  # three times the (layer, step) maps summed in the same bytes


def test_reweighted_words_show_the_reweighted_attention(tiny_cache):
    """Maps are read from the attention as edited: a muted word has an all-zero map (both reweighting modes)."""
    name = "tiny-sd3"
    pipe = tiny_cache(name)
    for normalize in (False, True):
        with attnctl.apply(pipe, [Reweight({"red": 0.0}, normalize=normalize), AttentionMaps(["red", "a"])]) as handle:
            _run(pipe, name)
            result = handle.outputs["attention_maps"]
        assert float(result.maps[:, 0].abs().max()) == 0.0 and float(result.maps[:, 1].min()) > 0


def test_word_missing_from_some_prompts_gives_zero_maps(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [AttentionMaps(["cat", "car"])]) as handle:
        _run(pipe, "tiny-sd")
        result = handle.outputs["attention_maps"]
    assert float(result.maps[0, 0].min()) > 0 and float(result.maps[1, 0].max()) == 0.0
    assert float(result.maps[0, 1].max()) == 0.0 and float(result.maps[1, 1].min()) > 0
    with attnctl.apply(pipe, [AttentionMaps(["dog"])]):
        with pytest.raises(TokenError, match="'dog' is not in the cond prompt"):
            _run(pipe, "tiny-sd")
    assert "postprocess" not in vars(pipe.image_processor)


def test_save_writes_heatmaps_and_a_grid(tiny_cache, tmp_path):
    from PIL import Image

    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [AttentionMaps(["red", ("a", 1), 4])]) as handle:
        _run(pipe, "tiny-sd", output_type="pil")
        paths = handle.outputs["attention_maps"].save(str(tmp_path / "maps"))
        _run(pipe, "tiny-sd")
        bare = handle.outputs["attention_maps"].save(str(tmp_path / "bare"), scaling="minmax")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(f"image{i}_{w}.png" for i in range(2) for w in ("red", "a_1", "token_4", "grid"))
    heat = Image.open(tmp_path / "maps" / "image0_red.png")
    assert heat.size == (32, 32)
    grid = Image.open(tmp_path / "maps" / "image0_grid.png")
    assert grid.width == 4 * 128 and grid.height > 128  # image + 3 words, tiles at least 128 px, names below
    assert len(bare) == 2 * 4 and Image.open(tmp_path / "bare" / "image1_grid.png").width == 3 * 128


def test_postprocess_is_restored_after_errors_and_shared_by_two_captures(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    processor = pipe.image_processor
    before = dict(vars(processor))
    two = [AttentionMaps(["red"]), AttentionMaps(["cat"], key="cat_maps")]
    with attnctl.apply(pipe, two) as handle:
        _run(pipe, "tiny-sd", output_type="np")
        assert len(handle.outputs["attention_maps"].images) == 2 and len(handle.outputs["cat_maps"].images) == 2
        # one wrap of postprocess, owned by the handle while it is live (controls with `needs_images`)
        assert set(vars(processor)) - set(before) == {"postprocess"}

        def explode(*args, **kwargs):
            raise RuntimeError("vae exploded")

        pipe.vae.decode = explode
        try:
            with pytest.raises(RuntimeError, match="vae exploded"):
                _run(pipe, "tiny-sd", output_type="pil")
        finally:
            del pipe.vae.decode
    assert vars(processor) == before
    # two maps publishing to one key: refused (at apply once `apply` checks output keys; before that at the call)
    with pytest.raises(ConfigError, match="attention_maps"):
        with attnctl.apply(pipe, [AttentionMaps(["red"]), AttentionMaps(["cat"])]):
            _run(pipe, "tiny-sd")
    assert vars(processor) == before
    with attnctl.apply(pipe, [AttentionMaps(["red"]), AttentionMaps(["cat"], key="cat_maps")]) as handle:
        _run(pipe, "tiny-sd")
    assert handle.outputs["attention_maps"].words == ("red",) and handle.outputs["cat_maps"].words == ("cat",)


def test_config_validation_and_round_trip():
    control = AttentionMaps(["red", ("cat", 1), 5], layers="up", steps=(0.2, 0.8), resolution=(64, 48))
    again = Control.from_dict(json.loads(json.dumps(control.to_dict())))
    assert again == control
    assert AttentionMaps("red").words == ("red",) and AttentionMaps(["red"], resolution=64).resolution == (64, 64)
    for bad, match in (([], "non-empty"), (["red", "red"], "duplicates"), (("cat", 1), "ambiguous"), ([1.5], "not a word")):
        with pytest.raises(ConfigError, match=match):
            AttentionMaps(bad)
    for resolution in (0, (32,), (32, -1), 2.5, True):
        with pytest.raises(ConfigError, match="resolution"):
            AttentionMaps(["red"], resolution=resolution)


def test_results_are_keyed_by_word_labels_and_say_so():
    """`("street", 0)` is keyed "street#0"; the query finds it too, and a missing word names the labels."""
    result = AttentionMapResult(
        words=("street#0", "red", "token 4"), maps=torch.rand(2, 3, 4, 4), grid_maps=torch.zeros(2, 3, 2, 2),
        prompts=("a", "b"), layers=(), contributions=(1, 1),
    )
    assert torch.equal(result[("street", 0)], result["street#0"]) and torch.equal(result[0][("street", 0)], result.maps[0, 0])
    assert torch.equal(result[1][4], result.maps[1, 2])
    for lookup in (lambda: result["street"], lambda: result[0]["street"]):
        with pytest.raises(KeyError, match="street#0.*'word#k'"):
            lookup()


class _CondRowsApart(attnctl.processors.edit.LayerHook):
    """Runs the rest of the chain on the cond rows only (`restricted_rows`: not a prefix of SD's [uncond; cond] batch)
    and the other rows on the plain op: the output is the layer's own."""

    def attend(self, call, q, k, v, spec, compute):
        from attnctl.kernels.semantics import spec_rows
        from attnctl.processors.chain import backend_op, restricted_rows

        cond = call.rows.indices("cond")
        other = tuple(i for i in range(q.shape[0]) if i not in cond)
        if not cond or not other:
            return compute(q, k, v, spec)
        batch, cond_index, other_index = q.shape[0], torch.tensor(cond), torch.tensor(other)
        with restricted_rows(call, cond):
            out_cond, _ = compute(q[cond_index], k[cond_index], v[cond_index], spec_rows(spec, cond_index, batch))
        out_other, _ = backend_op(call, q[other_index], k[other_index], v[other_index], spec_rows(spec, other_index, batch))
        out = out_cond.new_empty((batch, *out_cond.shape[1:]))
        out[cond_index], out[other_index] = out_cond, out_other.to(out_cond.dtype)
        return out, None


class _CondRowsApartControl(Control, type_name="test-cond-rows-apart"):
    def compile_refusal(self, adapter):
        return None  # its hook reads the row layout only (one graph per layout)

    def bind(self, context):
        hook = _CondRowsApart()

        class Bound(attnctl.control.Bound):
            def edit(self, layer, frame):
                return attnctl.processors.edit.Edit(hooks=(hook,))

        return Bound(self, context.layers, (0.0, 1.0))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_maps_under_a_hook_that_restricts_the_rows(compiled):
    """Another control's hook runs AttentionMaps' layer on the cond rows only (`processors.chain.restricted_rows`,
    positions 2 and 3 of SD's CFG batch): the maps are those of AttentionMaps alone (its rows are read among the
    restricted ones: `call.rows` eagerly, `call.row_source` in a compiled forward)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from attnctl.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline("tiny-sd")
    results = []
    for controls in ([AttentionMaps(["cat"])], [_CondRowsApartControl(), AttentionMaps(["cat"])]):
        if compiled:
            torch._dynamo.reset()
            pipe.unet.compile(backend=CompileCounterWithBackend("eager"))
        try:
            with attnctl.apply(pipe, controls) as handle:
                _run(pipe, "tiny-sd", prompt=["a photo of a cat", "a cat on the street"])
                results.append(handle.outputs["attention_maps"])
        finally:
            pipe.unet._compiled_call_impl = None
    alone, apart = results
    assert apart.contributions == alone.contributions == (8, 8)
    torch.testing.assert_close(apart.grid_maps, alone.grid_maps, rtol=1e-5, atol=1e-6)


def test_maps_count_what_they_add_beside_a_latent_optimiser(monkeypatch):
    """A latent optimiser's loss pass ends at its last map layer before that layer's attention runs: the maps of that
    layer come from the step's main pass, and `contributions` counts exactly the (layer, step) maps added."""
    from attnctl.controls.maps import capture
    from attnctl.testing import make_tiny_pipeline

    added = []
    accumulate = capture.AttentionMapsBound.accumulate

    def counting(self, call, q, k, spec, hook):
        before = self.sums.clone()
        accumulate(self, call, q, k, spec, hook)
        if not torch.equal(before, self.sums):
            added.append((call.layer.name, call.step.index))

    monkeypatch.setattr(capture.AttentionMapsBound, "accumulate", counting)
    pipe = make_tiny_pipeline("tiny-sd")
    with attnctl.apply(pipe, [attnctl.AttendExcite(["cat"]), AttentionMaps(["cat"])]) as handle:
        _run(pipe, "tiny-sd", prompt=["a photo of a cat"], steps=4)
        result = handle.outputs["attention_maps"]
    layers = len(result.layers)
    assert len(set(added)) == len(added) == layers * 4 == result.contributions[0]


def test_pixart_maps_follow_resolution_binning_to_the_image_size(tiny_cache):
    """PixArt generates at a binned size and resizes and centre-crops the image to the size asked for (diffusers'
    default `use_resolution_binning`): the maps and masks are at the image's size, cropped as the image is (they
    stayed at the binned size)."""
    pipe = tiny_cache("tiny-pixart")
    sample_size = pipe.transformer.config.sample_size
    pipe.transformer.register_to_config(sample_size=32)  # diffusers' 256 bins
    try:
        with attnctl.apply(pipe, [attnctl.AttentionMaps(["cat"])]) as handle:
            out = pipe("a red cat", num_inference_steps=1, height=200, width=300, use_resolution_binning=True,
                       max_sequence_length=32, clean_caption=False, generator=torch.Generator().manual_seed(0))
            result = handle.outputs["attention_maps"]
    finally:
        pipe.transformer.register_to_config(sample_size=sample_size)
    assert out.images[0].size == (300, 200)
    assert tuple(result.maps.shape) == (1, 1, 200, 300) and tuple(result.masks("cat").shape) == (1, 200, 300)


def test_words_that_differ_only_in_case_are_duplicates():
    """Words match case-insensitively, so "red" and "RED" would be one map twice: refused as duplicates."""
    import attnctl

    for words in (["red", "RED"], [("cat", 0), ("Cat", 0)]):
        with pytest.raises(attnctl.ConfigError, match="duplicates"):
            attnctl.AttentionMaps(words)
    attnctl.AttentionMaps([("cat", 0), ("cat", 1)])


def test_word_attention_saves_no_per_head_float_copy_for_the_backward():
    """Under autograd (latent optimisers' loss passes) the head-averaged maps keep no float32 copy of the per-head maps
    for the backward (nan_to_num saved its input: SD3 1024 2.9 GiB, Flux 10.6 GiB per loss pass); the values, fully
    masked rows zeroed, are those of `.float().nan_to_num(0.0)` on the per-head SDPA output."""
    torch.manual_seed(0)
    batch, heads, nq, nk, dim, words = 2, 3, 16, 12, 8, 5
    q = torch.randn(batch, heads, nq, dim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, heads, nk, dim, dtype=torch.bfloat16)
    selector = (torch.rand(batch, words, nk) > 0.5).float()
    bias = torch.zeros(batch, 1, nq, nk)
    bias[0, :, 3] = float("-inf")  # a fully masked row attends to nothing
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        maps = word_attention(q, k, selector, bias=bias, chunk_elements=batch * heads * nk * 5)
    assert not [tuple(t.shape) for t in saved if t.ndim == 4 and t.shape[1] == heads and t.shape[-1] == words]
    per_head = word_attention(q, k, selector, bias=bias, per_head=True)
    values = F.pad(selector.transpose(1, 2)[:, None].expand(-1, heads, -1, -1), (0, dim - words)).to(q.dtype)
    expected = F.scaled_dot_product_attention(q, k, values, attn_mask=bias.to(q.dtype))[..., :words].float().nan_to_num(0.0)
    assert torch.equal(per_head, expected) and torch.equal(maps, expected.mean(dim=1))
    assert maps[0, 3].abs().sum() == 0
    maps.sum().backward()
    assert torch.isfinite(q.grad[1]).all()


def test_word_attention_makes_no_copy_of_a_single_chunk():
    """One query chunk and one head group (the usual case, at every captured layer) are returned as computed: no
    `cat` of a single part (each one copies); several chunks are still joined."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCats(TorchDispatchMode):
        cats = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountCats.cats += func is torch.ops.aten.cat.default
            return func(*args, **(kwargs or {}))

    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 10, 8)
    selector = torch.zeros(1, 3, 10)
    selector[0, [0, 1, 2], [1, 2, 3]] = 1.0
    with CountCats():
        whole = word_attention(q, k, selector)
    assert CountCats.cats == 0
    with CountCats():
        chunked = word_attention(q, k, selector, chunk_elements=2 * 10 * 4)  # 4 rows per chunk
    assert CountCats.cats == 1
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
