"""The newer families of issue #19 (Chroma, ...) on their tiny offline models: bitwise identities (apply with
no controls, after remove, img2img / inpaint), the call protocol, every control whose definition applies
against an independent reference, and the refusals of the others.

diffusers releases before these families (the oldest supported, 0.35) skip them with the reason.
"""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.processors.base import ControlledProcessor
from attnctl.testing import CALL_DEFAULTS
from attnctl.testing.new_families import NEW_TINY_MODELS, REQUIRES, available

from .helpers import Probe, generate
from .reference_attention import Spy

PROMPT = "a red cat on the street"


def _needs(name: str):
    return pytest.mark.skipif(
        not available(name), reason=f"{name} needs diffusers with {', '.join(REQUIRES[name])} (newer than the installed one)"
    )


MODELS = [pytest.param(name, marks=_needs(name)) for name in NEW_TINY_MODELS]


@pytest.fixture(scope="module")
def tiny():
    from attnctl.testing import make_tiny_pipeline

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_tiny_pipeline(name)
        return cache[name]

    return get


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


# -- identities ----------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", MODELS)
def test_empty_apply_and_remove_are_bitwise_stock(name, guidance, tiny):
    pipe = tiny(name)
    stock = generate(pipe, name, guidance=guidance)
    with attnctl.apply(pipe, []) as handle:
        processors = list(_denoiser(pipe).attn_processors.values())
        assert processors and all(isinstance(p, ControlledProcessor) for p in processors)
        controlled = generate(pipe, name, guidance=guidance)
    after = generate(pipe, name, guidance=guidance)
    assert torch.equal(stock, controlled)
    assert torch.equal(stock, after)
    assert not any(isinstance(p, ControlledProcessor) for p in _denoiser(pipe).attn_processors.values())
    assert "forward" not in _denoiser(pipe).__dict__ and not handle.live


@pytest.mark.parity
@pytest.mark.parametrize("name", MODELS)
def test_identity_edit_sees_every_layer_every_step_and_the_rows(name, tiny):
    pipe = tiny(name)
    stock = generate(pipe, name, steps=3)
    probe = Probe()
    with attnctl.apply(pipe, [probe]) as handle:
        controlled = generate(pipe, name, steps=3)
    assert torch.equal(stock, controlled)
    calls = [entry for entry in probe.log if entry[0] != "bind"]
    assert {entry[0] for entry in calls} == {layer.name for layer in handle.adapter.layers}
    assert sorted({entry[1] for entry in calls}) == [0, 1, 2]
    first = handle.adapter.layers[0].name
    rows = [entry[3] for entry in calls if entry[0] == first]
    assert rows == EXPECTED_ROWS[name] * 3


# rows of the denoiser calls of one step with CALL_DEFAULTS, two prompts, guidance 5
EXPECTED_ROWS = {
    "tiny-chroma": [(("cond", 0, None), ("cond", 1, None)), (("uncond", 0, None), ("uncond", 1, None))],
}


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["img2img", "inpaint"])
@pytest.mark.parametrize("name", [pytest.param("tiny-chroma", marks=_needs("tiny-chroma"))])
def test_img2img_and_inpaint_identity(name, variant, tiny):
    import diffusers

    classes = {("tiny-chroma", "img2img"): "ChromaImg2ImgPipeline", ("tiny-chroma", "inpaint"): "ChromaInpaintPipeline"}
    pipe = getattr(diffusers, classes[(name, variant)]).from_pipe(tiny(name))
    if name == "tiny-chroma" and variant == "inpaint" and "guidance_embeds" not in pipe.transformer.config:
        pytest.skip("ChromaInpaintPipeline reads transformer.config.guidance_embeds, which ChromaTransformer2DModel's "
                    "config does not have: the stock pipeline fails before attnctl is involved (diffusers bug)")
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    extra = {"mask_image": torch.ones(1, 1, 32, 32)} if variant == "inpaint" else {}

    def run():
        return pipe(PROMPT, image=image, strength=0.6, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                    height=32, width=32, max_sequence_length=32, generator=torch.Generator().manual_seed(0), **extra).images

    stock = run()
    with attnctl.apply(pipe, [Probe()]):
        controlled = run()
    assert torch.equal(stock, controlled)
    assert torch.equal(stock, run())


# -- controls against references -----------------------------------------------------------------------------


def _t5_positions(tokenizer, prompt: str, word: str) -> list[int]:
    ids = tokenizer(prompt).input_ids
    pattern = tokenizer(" " + word, add_special_tokens=False).input_ids
    return [i + j for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern for j in range(len(pattern))]


#: Per tiny model: the tokenizer of the text the joint sequence holds, and where that text sits in the queries.
TEXT = {"tiny-chroma": ("tokenizer", "first")}


@pytest.mark.parametrize("normalize", [False, True], ids=["p2p", "normalize"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in TEXT])
def test_reweight_matches_the_formula_call_by_call(name, normalize, tiny):
    """docs/methods.md "Reweight": the cond rows' image queries see A * w (or softmax(logits + log w)) over the
    text keys of the weighted words; uncond rows and text queries keep plain attention."""
    pipe = tiny(name)
    table = {"red": 3.0, "street": 0.0}
    spy = Spy(layers="joint")
    with attnctl.apply(pipe, [attnctl.Reweight(table, normalize=normalize), spy]) as handle:
        generate(pipe, name, prompt=PROMPT)
    tokenizer = getattr(pipe, TEXT[name][0])
    weights = {p: f for word, f in table.items() for p in _t5_positions(tokenizer, PROMPT, word)}
    assert weights
    joint = {layer.name for layer in handle.adapter.layers if layer.kind == "joint"}
    assert {record["layer"].name for record in spy.log} == joint
    for record in spy.log:
        q, k, v = (record[x].double() for x in ("q", "k", "v"))
        n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
        text_len = CALL_DEFAULTS[name]["max_sequence_length"]
        image_rows = slice(text_len, n_q) if TEXT[name][1] == "first" else slice(0, n_q - text_len)
        text_keys = slice(0, text_len) if TEXT[name][1] == "first" else slice(n_q - text_len, n_k)
        logits = q @ k.transpose(-1, -2) / d**0.5
        if record["mask"] is not None:
            mask = record["mask"]
            logits = logits + (torch.zeros_like(mask, dtype=torch.float64).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask.double())
        w = torch.ones(q.shape[0], n_k, dtype=torch.float64)
        for b, row in enumerate(record["rows"].rows):
            if row.branch == "cond":
                for position, factor in weights.items():
                    w[b, text_keys.start + position] *= factor
        if normalize:
            bias = torch.zeros(q.shape[0], 1, n_q, n_k, dtype=torch.float64)
            bias[:, :, image_rows] = torch.log(w)[:, None, None, :]
            expected = torch.softmax(logits + bias, -1) @ v
        else:
            probs = torch.softmax(logits, -1)
            probs[:, :, image_rows] = probs[:, :, image_rows] * w[:, None, None, :]
            expected = probs @ v
        torch.testing.assert_close(record["out"].double(), expected, rtol=1e-5, atol=1e-6)
