"""Extra prompts (region prompts, ...) encoded with the pipeline's own text encoders (`pipe.encode_prompt`).

Shared by every control that encodes text; controls reach it as `BindContext.encode_prompts`. The call
mirrors the user's own `encode_prompt` call of the same pipeline call (clip_skip, lora_scale,
max_sequence_length, clean_caption, ...), with the extra prompts as a batch, one image per prompt, no
classifier-free guidance and no precomputed embeddings. It runs inside the runtime's `internal_calls()`, so
attnctl's own call is not recorded as the user's prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..control import EncodedText
from ..errors import CallLayoutError
from ..families.base import ModelAdapter

_NONE_SUFFIXES = ("_embeds", "_attention_mask")


def _prompt_arguments(signature: inspect.Signature, recorded: dict[str, Any], prompts: list[str], device: Any) -> inspect.BoundArguments:
    arguments: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = recorded.get(name)
            if extra:
                arguments[name] = dict(extra)
            continue
        if name == "prompt":
            value: Any = list(prompts)
        elif name.startswith("prompt_") and name[len("prompt_"):].isdigit():
            value = None  # prompt_2 / prompt_3 default to `prompt`
        elif name.startswith("negative_prompt"):
            value = None
        elif name.endswith(_NONE_SUFFIXES):
            value = None
        elif name == "num_images_per_prompt":
            value = 1
        elif name == "do_classifier_free_guidance":
            value = False
        elif name == "device":
            value = device
        elif name in recorded:
            value = recorded[name]
        elif parameter.default is not inspect.Parameter.empty:
            value = parameter.default
        else:
            raise CallLayoutError(f"attnctl: cannot encode extra prompts: encode_prompt needs {name!r}, which attnctl does not know")
        arguments[name] = value
    return inspect.BoundArguments(signature, arguments)  # type: ignore[arg-type]


def encode_prompts(
    pipe: Any, adapter: ModelAdapter, recorded: dict[str, Any], device: Any, internal: Callable[[], AbstractContextManager[None]],
    prompts: list[str], *, trim: bool = False,
) -> EncodedText:
    """Encode `prompts` as the pipeline encodes its prompt in this call (`recorded`: the arguments of the
    call's first `encode_prompt`; see the module docstring). `trim`: on a family whose text is one padded
    sequence without a mask (`ModelAdapter.padded_text_tokenizer`), keep the positions up to the longest
    prompt's last token (its end-of-sequence token included); the kept positions are exactly as encoded."""
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)
    bound = _prompt_arguments(signature, recorded, prompts, device)
    with internal(), torch.no_grad():
        out = encode(*bound.args, **bound.kwargs)
    embeds = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != len(prompts):
        raise CallLayoutError(
            f"attnctl: {type(pipe).__name__}.encode_prompt returned {type(embeds).__name__} for {len(prompts)} extra prompts; "
            "expected (prompts, tokens, channels) embeddings first"
        )
    mask = None
    index = adapter.prompt_mask_index
    if index is not None:  # the padding mask the denoiser applies (None: nothing padded, Qwen-Image)
        mask = out[index] if isinstance(out, (tuple, list)) and len(out) > index else None
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
            raise CallLayoutError(f"attnctl: {type(pipe).__name__}.encode_prompt did not return an attention mask for the extra prompts")
    if trim:
        embeds = embeds[:, : _token_count(pipe, adapter, prompts, embeds.shape[1])]
    return EncodedText(embeds.detach(), None if mask is None else mask.detach())


def _token_count(pipe: Any, adapter: ModelAdapter, prompts: list[str], limit: int) -> int:
    """The most tokens any of `prompts` has with the family's padded-text tokenizer (special tokens included),
    at most `limit` (the padded length)."""
    attribute = adapter.padded_text_tokenizer
    tokenizer = getattr(pipe, attribute, None) if attribute is not None else None
    if tokenizer is None:
        raise CallLayoutError(
            f"attnctl: cannot trim extra prompts on {type(pipe).__name__}: the {adapter.family} family's text is not one "
            f"padded sequence of a tokenizer the pipeline holds ({attribute or 'none declared'})"
        )
    texts = list(prompts)
    convert = getattr(pipe, "maybe_convert_prompt", None)  # textual inversion: as the pipeline tokenizes them
    if callable(convert):
        texts = convert(texts, tokenizer)
    ids = tokenizer(texts, truncation=True, max_length=limit, padding=False).input_ids
    return max(1, min(limit, max(len(row) for row in ids)))
