"""Regions(trim_prompts=True): Flux's region prompts appended up to their last token, not padded to the call's
`max_sequence_length`; the kept positions are exactly as encoded, and the result is the reference's with those
positions only."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl import Regions
from attnctl.testing import make_tiny_pipeline
from attnctl.testing.new_families import available

from . import regions_reference as ref
from .test_regions_models import _shapes, layout, run

pytestmark = pytest.mark.parity


def _longest(pipe, prompts) -> int:
    """The longest prompt's token count with Flux's T5 tokenizer, its end-of-sequence token included."""
    return max(len(pipe.tokenizer_2(prompt).input_ids) for prompt in prompts)


@pytest.mark.parametrize("isolate", [False, True])
def test_trimmed_region_prompts_match_the_reference_with_the_kept_positions(isolate):
    pipe = make_tiny_pipeline("tiny-flux")
    regions = layout()
    prompts = [r.prompt for r in regions]
    got = run(pipe, "tiny-flux", [Regions(regions, base_ratio=0.2, isolate=isolate, trim_prompts=True)])
    full = pipe.encode_prompt(prompts, None, device="cpu", num_images_per_prompt=1, max_sequence_length=32)[0].detach()
    kept = _longest(pipe, prompts)
    assert kept < full.shape[1]
    state = ref.RefState(_shapes(regions), [r.subject for r in regions], 0.2, isolate, float("inf"), {8 * 12: (8, 12)},
                         base_len=32, region_len=kept, text_first=True)
    undo = ref.install_joint_reference(pipe, state, full[:, :kept], None, False)
    try:
        expected = run(pipe, "tiny-flux", None)
    finally:
        undo()
    untrimmed = run(pipe, "tiny-flux", [Regions(regions, base_ratio=0.2, isolate=isolate)])
    assert (got - untrimmed).abs().max() > 1e-4  # the padding positions were attended before
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_denoiser_sees_the_base_text_and_the_trimmed_region_tokens(tiny_cache):
    pipe = tiny_cache("tiny-flux")
    regions = layout()
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        run(pipe, "tiny-flux", [Regions(regions, trim_prompts=True)], steps=1)
        run(pipe, "tiny-flux", [Regions(regions)], steps=1)
    finally:
        hook.remove()
    kept = _longest(pipe, [r.prompt for r in regions])
    assert seen[0] == 32 + len(regions) * kept and seen[-1] == 32 + len(regions) * 32


@pytest.mark.parametrize("name", [
    "tiny-sd", "tiny-sd3", "tiny-pixart",
    pytest.param("tiny-chroma", marks=pytest.mark.skipif(not available("tiny-chroma"), reason="tiny-chroma needs diffusers >= 0.42")),
    pytest.param("tiny-flux2", marks=pytest.mark.skipif(not available("tiny-flux2"), reason="tiny-flux2 needs diffusers >= 0.42")),
])
def test_trim_prompts_is_refused_where_the_text_is_not_one_padded_sequence(name, tiny_cache):
    pipe = tiny_cache(name)
    with pytest.raises(attnctl.UnsupportedError, match="trim_prompts"):
        attnctl.apply(pipe, [Regions(layout(), trim_prompts=True)])
    assert all(type(p).__module__.startswith("diffusers") for p in (pipe.unet if name == "tiny-sd" else pipe.transformer).attn_processors.values())


def test_trim_prompts_must_be_a_bool_and_survives_a_job_file():
    with pytest.raises(attnctl.ConfigError, match="trim_prompts"):
        Regions(layout()[:1], trim_prompts="yes")
    control = Regions(layout()[:1], trim_prompts=True)
    assert Regions.from_dict(control.to_dict()).trim_prompts is True
