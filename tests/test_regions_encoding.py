"""Region prompts are encoded once per handle (`attnctl.pipelines.prompts.PromptCache`): a later call reuses the
embeddings and runs no text-encoder forward for them, and whatever changes what the pipeline's `encode_prompt` would
give (its arguments, the text encoder's weights, another text encoder, its LoRA adapters) encodes them again.

The expectation is a fresh handle's first call, which encodes the region prompts as every call did before the cache.
Qwen-Image: its Qwen2.5-VL encoding reads the padding mask on the host, a host synchronisation per encoding."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import attnctl
from attnctl import Region, Regions

from .helpers import generate

NAME = "tiny-qwenimage"
PROMPT = "a red cat and a blue dog"


def regions() -> Regions:
    return Regions([Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)), Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))],
                   base_ratio=0.2, isolate=True)


@contextlib.contextmanager
def forwards(module: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of each forward of `module` inside the block."""
    seen: list[int] = []
    hook = module.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(int((args[0] if args else kwargs["input_ids"]).shape[0])), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


@contextlib.contextmanager
def own_text_encoder(pipe: Any) -> Iterator[None]:
    """A copy of the shared pipeline's text encoder, for a test that changes it; the original is put back."""
    original = pipe.text_encoder
    pipe.text_encoder = copy.deepcopy(original)
    try:
        yield
    finally:
        pipe.text_encoder = original


def test_a_later_call_runs_no_text_encoder_forward_for_the_region_prompts(tiny_cache):
    pipe = tiny_cache(NAME)
    with forwards(pipe.text_encoder) as stock:
        generate(pipe, NAME, prompt=PROMPT)
    with attnctl.apply(pipe, [regions()]):
        with forwards(pipe.text_encoder) as first:
            encoded = generate(pipe, NAME, prompt=PROMPT)
        with forwards(pipe.text_encoder) as second:
            reused = generate(pipe, NAME, prompt=PROMPT)
        with forwards(pipe.text_encoder) as other_prompt:
            generate(pipe, NAME, prompt="a cat")
    assert stock == [1, 1]  # the prompt and the negative prompt (true CFG), one call each
    assert first == stock + [2]  # the two region prompts, as one batch
    assert second == stock and other_prompt == stock  # the region prompts do not depend on the user's prompt
    assert torch.equal(reused, encoded)


def _scale_one_weight(pipe: Any) -> None:
    with torch.no_grad():
        pipe.text_encoder.model.language_model.layers[0].self_attn.v_proj.weight.mul_(3.0)


def _replace_one_weight(pipe: Any) -> None:  # as `module.to(...)` does: a new tensor behind the same parameter
    weight = pipe.text_encoder.model.language_model.layers[0].self_attn.v_proj.weight
    weight.data = weight.data * 3.0


def _another_text_encoder(pipe: Any) -> None:
    _scale_one_weight(pipe)  # on the copy `own_text_encoder` made
    pipe.text_encoder = copy.deepcopy(pipe.text_encoder)


def _lora(pipe: Any) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, pipe.text_encoder, adapter_name="test")


def _lora_layers(pipe: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    layers = [module for module in pipe.text_encoder.modules() if isinstance(module, LoraLayer)]
    assert layers
    return layers


def _lora_scaled(pipe: Any) -> None:  # what diffusers' `scale_lora_layers` does
    for layer in _lora_layers(pipe):
        layer.scale_layer(4.0)


def _lora_off(pipe: Any) -> None:
    for layer in _lora_layers(pipe):
        layer.enable_adapters(False)


CHANGES: dict[str, tuple[Callable[[Any], None] | None, Callable[[Any], None]]] = {
    # name: (before the handle's first call, between its first and second call)
    "weight in place": (None, _scale_one_weight),
    "weight replaced": (None, _replace_one_weight),
    "another text encoder": (None, _another_text_encoder),
    "LoRA added": (None, _lora),
    "LoRA scale": (_lora, _lora_scaled),
    "LoRA disabled": (_lora, _lora_off),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_text_encoder_encodes_the_region_prompts_again(change, tiny_cache):
    pipe = tiny_cache(NAME)
    setup, between = CHANGES[change]
    with own_text_encoder(pipe):
        if setup is not None:
            setup(pipe)
        with attnctl.apply(pipe, [regions()]):
            before = generate(pipe, NAME, prompt=PROMPT)
            between(pipe)
            with forwards(pipe.text_encoder) as seen:
                after = generate(pipe, NAME, prompt=PROMPT)
        with attnctl.apply(pipe, [regions()]):  # a fresh handle: the region prompts encoded by this text encoder
            expected = generate(pipe, NAME, prompt=PROMPT)
    assert seen == [1, 1, 2]
    assert not torch.equal(expected, before)  # the change reaches the output
    assert torch.equal(after, expected)


def test_changed_encode_arguments_encode_the_region_prompts_again(tiny_cache):
    pipe = tiny_cache(NAME)
    with attnctl.apply(pipe, [regions()]):
        generate(pipe, NAME, prompt=PROMPT)
        with forwards(pipe.text_encoder) as longer:
            generate(pipe, NAME, prompt=PROMPT, max_sequence_length=256)
        with forwards(pipe.text_encoder) as again:
            generate(pipe, NAME, prompt=PROMPT, max_sequence_length=256)
    assert longer == [1, 1, 2] and again == [1, 1]


def test_region_prompts_encoded_in_inference_mode_are_encoded_again_outside_it(tiny_cache):
    """An inference tensor cannot be saved for backward (a latent optimiser's loss pass): embeddings made under
    `torch.inference_mode()` are not reused by a call outside it."""
    pipe = tiny_cache(NAME)
    with attnctl.apply(pipe, [regions()]):
        with torch.inference_mode():
            generate(pipe, NAME, prompt=PROMPT)
        with forwards(pipe.text_encoder) as seen:
            generate(pipe, NAME, prompt=PROMPT)
        with forwards(pipe.text_encoder) as reused:
            generate(pipe, NAME, prompt=PROMPT)
    assert seen == [1, 1, 2] and reused == [1, 1]


def test_structured_guidance_reuses_its_encoded_phrases(tiny_cache):
    """StructuredGuidance's noun phrases go through the same encoding (`BindContext.encode_prompts`)."""
    pipe = tiny_cache("tiny-sd")
    with forwards(pipe.text_encoder) as stock:
        generate(pipe, "tiny-sd", prompt=PROMPT)
    with attnctl.apply(pipe, [attnctl.StructuredGuidance(phrases=["a red cat", "a blue dog"])]):
        with forwards(pipe.text_encoder) as first:
            encoded = generate(pipe, "tiny-sd", prompt=PROMPT)
        with forwards(pipe.text_encoder) as second:
            reused = generate(pipe, "tiny-sd", prompt=PROMPT)
    assert first == stock + [2] and second == stock
    assert torch.equal(reused, encoded)
