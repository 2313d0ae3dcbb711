"""Extra prompts (region prompts, ...) encoded with the pipeline's own text encoders (`pipe.encode_prompt`).

Shared by every control that encodes text; controls reach it as `BindContext.encode_prompts`. The call
mirrors the user's own `encode_prompt` call of the same pipeline call (clip_skip, lora_scale,
max_sequence_length, clean_caption, ...), with the extra prompts as a batch, one image per prompt, no
classifier-free guidance and no precomputed embeddings. It runs inside the runtime's `internal_calls()`, so
attnctl's own call is not recorded as the user's prompt.

The prompts are constant, so a handle encodes them once (`PromptCache`) and later calls reuse the embeddings while
what the encoding depends on is unchanged: the prompts, `trim`, the arguments `encode_prompt` gets, and the
pipeline's text encoders (see `encoder_state`). An encoding is a text-encoder forward per call otherwise, and on
Qwen-Image (Qwen2.5-VL's attention mask, read on the host) or Chroma (its T5 mask) host synchronisations per call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..control import EncodedText
from ..errors import CallLayoutError
from ..families.base import ModelAdapter

_NONE_SUFFIXES = ("_embeds", "_attention_mask")


def _prompt_arguments(
    signature: inspect.Signature, recorded: dict[str, Any], prompts: list[str], device: Any,
    others: Mapping[str, Sequence[str]] | None = None,
) -> inspect.BoundArguments:
    others = dict(others or {})
    for name, texts in others.items():
        if not (name.startswith("prompt_") and name[len("prompt_"):].isdigit()) or name not in signature.parameters:
            takes = [n for n in signature.parameters if n.startswith("prompt_") and n[len("prompt_"):].isdigit()]
            raise CallLayoutError(
                f"attnctl: cannot encode extra prompts with {name!r}: this encode_prompt takes {', '.join(takes) or 'no second prompt'}"
            )
        if len(texts) != len(prompts):
            raise CallLayoutError(f"attnctl: {len(texts)} texts for {name!r}, {len(prompts)} extra prompts")
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
            value = list(others[name]) if name in others else None  # None: prompt_2 / prompt_3 default to `prompt`
        elif name.startswith("negative_prompt"):
            value = None
        elif name.endswith(_NONE_SUFFIXES):
            value = None
        elif name in ("num_images_per_prompt", "num_videos_per_prompt"):
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


class _Unhashable(Exception):
    """A value the cache cannot compare by value (an image, a tensor, another object): encode, do not reuse."""


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype)


def _value_key(value: Any) -> Hashable:
    """`value` as a key compared by value: plain values, and tuples, lists and dicts of them."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_value_key(item) for item in value))
    if isinstance(value, dict):
        return (dict, tuple(sorted(((repr(k), _value_key(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    raise _Unhashable(type(value).__name__)


def _tensor_state(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What changes when a parameter does: another tensor or storage (`module.to()`, a new weight), another dtype or
    device, an in-place write (its version counter; an inference tensor has none)."""
    try:
        pointer = tensor.data_ptr()
    except RuntimeError:  # a wrapper subclass without storage (quantised weights)
        pointer = None
    return (id(tensor), pointer, tensor.dtype, tensor.device, None if tensor.is_inference() else tensor._version)


def _module_state(module: torch.nn.Module) -> tuple[Any, ...]:
    """Every parameter and buffer of `module` (`_tensor_state`) and the state of its PEFT adapter layers (active,
    merged, disabled adapters and their scales: `set_adapters`, a LoRA scale, `fuse_lora`)."""
    state: list[Any] = [id(module)]
    for child in module.modules():
        for tensors in (child._parameters, child._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    state.append(_tensor_state(tensor))
        merged = vars(child).get("merged_adapters")  # not getattr: a missing module attribute raises, slowly
        if merged is not None:  # a PEFT tuner layer (BaseTunerLayer)
            state.append(_value_key((
                list(getattr(child, "active_adapters", ())), list(merged), bool(getattr(child, "disable_adapters", False)),
                dict(getattr(child, "scaling", {}) or {}),
            )))
    return tuple(state)


def encoder_state(pipe: Any, skip: tuple[torch.nn.Module, ...] = ()) -> Hashable:
    """The state of what `pipe.encode_prompt` reads besides its arguments: every component of the pipeline but
    `skip` (its denoisers), the VAE and the scheduler; modules by `_module_state`, other components (tokenizers,
    processors) by identity. Raises `_Unhashable` where a PEFT scale is not a plain value. A weight written through
    `.data` in place bumps no version counter and is not seen."""
    config = getattr(pipe, "config", None)
    names = [name for name in (config.keys() if config is not None else vars(pipe)) if not name.startswith("_")]
    state: list[Any] = [id(pipe)]
    for name in names:
        if name in ("vae", "scheduler"):
            continue
        component = vars(pipe).get(name)  # not getattr: diffusers warns on a config value read as an attribute
        if component is None or any(component is module for module in skip):
            continue
        if isinstance(component, torch.nn.Module):
            state.append((name, _module_state(component)))
        elif not isinstance(component, _PLAIN):
            state.append((name, id(component)))
    return tuple(state)


class PromptCache:
    """The extra prompts a handle encoded, reused by its later calls (`encode_prompts(..., cache=)`).

    An encoding is reused when the prompts, `trim`, the arguments `encode_prompt` would get and `encoder_state` are
    all equal, and, for one made under `torch.inference_mode()`, when the call runs in inference mode too (an
    inference tensor cannot be saved for backward); otherwise the prompts are encoded again. An encoding no call used in a whole pipeline
    call is dropped (`begin_call`): what is kept is at most what the last call used."""

    def __init__(self, skip: tuple[torch.nn.Module, ...] = ()):
        self.skip = skip  # the denoisers: not read by encode_prompt, and not to walk at every call
        self._current: dict[Hashable, EncodedText] = {}
        self._previous: dict[Hashable, EncodedText] = {}
        self._state: Hashable | None = None

    def begin_call(self) -> None:
        """A new pipeline call: the encoders are read again (once), and what the last call did not use goes."""
        self._previous, self._current, self._state = self._current, {}, None

    def state(self, pipe: Any) -> Hashable:
        if self._state is None:
            self._state = encoder_state(pipe, self.skip)
        return self._state

    def get(self, key: Hashable) -> EncodedText | None:
        found = self._current.get(key)
        if found is None:
            found = self._previous.pop(key, None)
        if found is not None and found.embeds.is_inference() and not torch.is_inference_mode_enabled():
            return None
        if found is not None:
            self._current[key] = found
        return found

    def put(self, key: Hashable, encoded: EncodedText) -> None:
        self._current[key] = encoded


def encode_prompts(
    pipe: Any, adapter: ModelAdapter, recorded: dict[str, Any], device: Any, internal: Callable[[], AbstractContextManager[None]],
    prompts: list[str], *, trim: bool = False, cache: PromptCache | None = None, others: Mapping[str, Sequence[str]] | None = None,
) -> EncodedText:
    """Encode `prompts` as the pipeline encodes its prompt in this call (`recorded`: the arguments of the
    call's first `encode_prompt`; see the module docstring). `trim`: on a family whose text is one padded
    sequence without a mask (`ModelAdapter.padded_text_tokenizer`), keep the positions up to the longest
    prompt's last token (its end-of-sequence token included); the kept positions are exactly as encoded.
    `cache`: the handle's encodings, reused where nothing they depend on changed (`PromptCache`). `others`: the
    texts of `prompt_2` / `prompt_3` (one per prompt) for the encoders that read their own prompt (SDXL's CLIP-G,
    SD3's T5); an argument left out is None, so that encoder reads `prompts` too."""
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)
    bound = _prompt_arguments(signature, recorded, prompts, device, others)
    key: Hashable | None = None
    if cache is not None:
        try:
            key = (tuple(prompts), trim, _value_key(dict(bound.arguments)), cache.state(pipe))
        except _Unhashable:  # an argument compared by identity only (an image): encoded at every call
            key = None
        found = cache.get(key) if key is not None else None
        if found is not None:
            return found
    encoded = _encode(pipe, adapter, encode, bound, internal, prompts, trim)
    if cache is not None and key is not None:
        cache.put(key, encoded)
    return encoded


def _encode(
    pipe: Any, adapter: ModelAdapter, encode: Callable[..., Any], bound: inspect.BoundArguments,
    internal: Callable[[], AbstractContextManager[None]], prompts: list[str], trim: bool,
) -> EncodedText:
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
