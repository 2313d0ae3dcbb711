"""Call-protocol adapters: where the rows of a denoiser call come from, per pipeline family.

- batched `[uncond, cond]` when the pipeline's `encode_prompt` was told to do classifier-free guidance
  (SD, SDXL, SD3, PixArt), cond rows only otherwise (guidance_scale <= 1);
- Flux: cond rows only, or separate cond / uncond calls inside `transformer.cache_context("cond" / "uncond")`
  (true CFG);
- batched CFG whose uncond rows a callback dropped mid-call (diffusers' CFG-cutoff callbacks): cond rows only
  from then on, once the pipeline's `do_classifier_free_guidance` says CFG is off (or past Z-Image's own
  `cfg_truncation`, which leaves the flag on);
- SD3's own skip-layer guidance: an extra cond-only call with `skip_layers`;
- sequential true CFG (Chroma): with CFG on, each scheduler position makes a cond call, then an uncond call,
  without `cache_context` (the runtime names them by their order, `sequential_branch`); so do the pipelines of a
  "contexts" family that make their separate calls outside `cache_context` (Flux's img2img, inpaint, Kontext and
  ControlNet pipelines).

A denoiser call whose batch matches none of these raises `CallLayoutError`; nothing is guessed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..denoiser_call import RowLayout
from ..errors import CallLayoutError, UnsupportedError
from ..tokens import EncoderPrompts


@dataclass(frozen=True)
class EncoderSpec:
    """A text encoder as the pipeline uses it: tokenizer attributes and `encode_prompt` argument names."""

    name: str
    tokenizers: tuple[str, ...]
    prompt_args: tuple[str, ...]
    negative_args: tuple[str, ...]
    length: int | None  # fixed number of positions (CLIP: 77), or None: the rest of the text sequence
    # (pipeline, tokenizer, text) -> the text as the pipeline hands it to the tokenizer (a chat template), or None
    # when the pipeline's template is not known (then words cannot be placed)
    template: Callable[[Any, Any, str], str | None] | None = None
    # (pipeline, tokenizer, text, encode_prompt's arguments) -> the tokens the embeddings keep, as text (Qwen-Image
    # Edit: the reference image's vision tokens come first), or None when unknown; applied after `template`
    kept_text: Callable[[Any, Any, str, dict[str, Any]], str | None] | None = None


@dataclass(frozen=True)
class CallProtocol:
    name: str
    encoders: tuple[EncoderSpec, ...]
    cfg_source: Literal["flag", "contexts", "sequential"]
    skip_layer_kwarg: str | None = None
    #: The block list whose indices `skip_layer_kwarg` names (SD3: `transformer_blocks`).
    skip_layer_blocks: str = "transformer_blocks"
    #: Batched CFG's row order: [uncond, cond] (diffusers' usual) or "cond_first" (Z-Image: [cond, uncond]).
    cfg_order: Literal["uncond_first", "cond_first"] = "uncond_first"
    #: The pipeline attribute of its own CFG truncation (Z-Image's `cfg_truncation`): at or below 1, the steps past it
    #: run the cond rows only while `do_classifier_free_guidance` stays True.
    cfg_truncation: str | None = None


_CLIP = EncoderSpec("clip", ("tokenizer", "tokenizer_2"), ("prompt", "prompt_2"), ("negative_prompt", "negative_prompt_2"), 77)
PROTOCOLS: dict[str, CallProtocol] = {
    "unet": CallProtocol("sd", (_CLIP,), "flag"),
    "sd3": CallProtocol(
        "sd3",
        (_CLIP, EncoderSpec("t5", ("tokenizer_3",), ("prompt_3",), ("negative_prompt_3",), None)),
        "flag",
        skip_layer_kwarg="skip_layers",
    ),
    "flux": CallProtocol("flux", (EncoderSpec("t5", ("tokenizer_2",), ("prompt_2",), ("prompt_2",), None),), "contexts"),
    "pixart": CallProtocol("pixart", (EncoderSpec("t5", ("tokenizer",), ("prompt",), ("negative_prompt",), None),), "flag"),
    "chroma": CallProtocol("chroma", (EncoderSpec("t5", ("tokenizer",), ("prompt",), ("negative_prompt",), None),), "sequential"),
}


#: QwenImageEditPlusPipeline's part of the template per input image (a local constant of its `_get_qwen_prompt_embeds`
#: in diffusers 0.42)
QWEN_EDIT_PLUS_IMAGE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def _qwen_kept_text(pipeline: Any, tokenizer: Any, text: str, arguments: dict[str, Any]) -> str | None:
    """The tokens Qwen-Image keeps of its chat template, as text. QwenImagePipeline drops the template's prefix, so the
    prompt comes first (the text itself). The edit pipelines keep everything after the prefix, the reference images'
    Qwen2.5-VL vision tokens first: made by the pipeline's own processor on the pipeline's template and images,
    decoded (QwenImageEditPipeline: one image; EditPlus: "Picture i: ..." per image). Other edit pipelines: None, words
    not placed."""
    name = type(pipeline).__name__
    if "Edit" not in name:
        return text
    image = arguments.get("image")
    if image is None or name not in ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"):
        return None
    if name == "QwenImageEditPlusPipeline":
        count = len(image) if isinstance(image, list) else 1
        text = "".join(QWEN_EDIT_PLUS_IMAGE.format(i + 1) for i in range(count)) + text
    inputs = pipeline.processor(text=[pipeline.prompt_template_encode.format(text)], images=image, padding=True, return_tensors="pt")
    kept = inputs["input_ids"][0][pipeline.prompt_template_encode_start_idx :]
    return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# Qwen2.5-VL: QwenImagePipeline drops the chat template's prefix from the embeddings, so the prompt's tokens come first
PROTOCOLS["qwenimage"] = CallProtocol(
    "qwenimage", (EncoderSpec("qwen", ("tokenizer",), ("prompt",), ("prompt",), None, kept_text=_qwen_kept_text),), "contexts"
)


def sequential_branch(protocol: CallProtocol, record: PromptRecord, calls_before: int) -> str | None:
    """The branch of a denoiser call that no `cache_context` names, in a call whose CFG runs as separate cond and
    uncond calls: the first call at a scheduler position is the cond call, the second the uncond one. Chroma's true
    CFG ("sequential"), and under "contexts" the pipelines that make their two calls outside `cache_context` (Flux's
    img2img, inpaint, Kontext and ControlNet pipelines with `true_cfg_scale`, Wan's video2video). None where the call
    has no separate uncond call."""
    if protocol.cfg_source == "flag" or not has_uncond_rows(protocol, record):
        return None
    if calls_before > 1:
        raise CallLayoutError(
            f"attnctl: {calls_before + 1} denoiser calls at one scheduler position; the {protocol.name} call protocol "
            "expects a cond call, then an uncond call"
        )
    return ("cond", "uncond")[calls_before]


def has_uncond_rows(protocol: CallProtocol, record: PromptRecord) -> bool:
    """Whether the call runs rows of the negative prompt, as its layout says (not whether their text is known): batched
    or sequential CFG when `encode_prompt` was told to do it; under "contexts", the negative prompt's own
    `encode_prompt` call (Flux, Qwen-Image, Flux.2 true CFG: made with text or with `negative_prompt_embeds`), or the
    flag of the one call that encodes both (Wan)."""
    if protocol.cfg_source == "contexts" and len(record.arguments) >= 2:
        return True
    return record.cfg_flag()


_AS_EMBEDDINGS = "the negative prompt came as embeddings (negative_prompt_embeds) instead of text"


def textless_reason(protocol: CallProtocol, pipeline: Any, record: PromptRecord, branch: str) -> str | None:
    """Why the rows of `branch` have no text to find words in (`encoder_prompts` gives None for it), or None where they
    have text. The uncond rows of a call with classifier-free guidance: the negative prompt given as embeddings, or
    zeroed by SDXL's pipelines (`encode_prompt`: `zero_out_negative_prompt = negative_prompt is None and
    self.config.force_zeros_for_empty_prompt`, which then encodes no negative text, `negative_prompt_2` included)."""
    if branch == "cond":
        return None if record.has_text() else "the pipeline was called with embeddings (prompt_embeds) instead of text"
    if protocol.cfg_source == "contexts" and len(record.arguments) >= 2:
        return None if _as_list(record.arguments[1].get("prompt")) is not None else _AS_EMBEDDINGS
    args = record.first
    if args.get("negative_prompt_embeds") is not None:
        return _AS_EMBEDDINGS
    config = getattr(pipeline, "config", None)
    if args.get("negative_prompt") is None and getattr(config, "force_zeros_for_empty_prompt", False) is True:
        return (
            f"{type(pipeline).__name__} zeroes the negative embeddings when negative_prompt is None and its config's "
            "force_zeros_for_empty_prompt is True (diffusers' zero_out_negative_prompt; negative_prompt_2 alone is not "
            "encoded), so the uncond rows have no text"
        )
    return None


def _klein_chat(pipeline: Any, tokenizer: Any, text: str) -> str | None:
    """Flux.2 klein's Qwen3 chat template, as `Flux2KleinPipeline._get_qwen3_prompt_embeds` applies it (the
    embeddings keep the template's tokens, so the prompt's words sit after its prefix); None for Flux2Pipeline
    (Mistral, another template: not placed yet)."""
    if type(pipeline).__name__ not in ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"):
        return None
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


# Wan: one encode_prompt call gives both prompts; the denoiser runs cond / uncond calls in cache_context
PROTOCOLS["wan"] = CallProtocol("wan", (EncoderSpec("t5", ("tokenizer",), ("prompt",), ("negative_prompt",), None),), "contexts")
def _zimage_chat(pipeline: Any, tokenizer: Any, text: str) -> str | None:
    """Z-Image's Qwen3 chat template (`ZImagePipeline._encode_prompt`: thinking on); the embeddings keep every
    non-padding token, the template's included."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)


PROTOCOLS["zimage"] = CallProtocol(
    "zimage", (EncoderSpec("qwen3", ("tokenizer",), ("prompt",), ("negative_prompt",), None, template=_zimage_chat),), "flag",
    cfg_order="cond_first", cfg_truncation="_cfg_truncation",
)
PROTOCOLS["flux2"] = CallProtocol(
    "flux2", (EncoderSpec("qwen3", ("tokenizer",), ("prompt",), ("prompt",), None, template=_klein_chat),), "contexts"
)


def protocol_for(family: str) -> CallProtocol:
    try:
        return PROTOCOLS[family]
    except KeyError:
        raise UnsupportedError(f"attnctl: no call protocol for model family {family!r}; known: {', '.join(PROTOCOLS)}") from None


def _per_prompt(args: dict[str, Any]) -> int:
    """Outputs per prompt: `num_images_per_prompt`, or video pipelines' `num_videos_per_prompt`."""
    return int(args.get("num_images_per_prompt") or args.get("num_videos_per_prompt") or 1)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


@dataclass
class PromptRecord:
    """What `encode_prompt` told us about one call: prompts per argument, rows, CFG."""

    arguments: list[dict[str, Any]]

    @property
    def first(self) -> dict[str, Any]:
        return self.arguments[0] if self.arguments else {}

    def prompt_rows(self) -> int:
        args = self.first
        per_prompt = _per_prompt(args)
        prompts = _as_list(args.get("prompt"))
        if prompts is not None:
            return len(prompts) * per_prompt
        embeds = args.get("prompt_embeds")
        if embeds is not None:
            return int(embeds.shape[0]) * per_prompt
        raise CallLayoutError("attnctl: encode_prompt was called with neither a prompt nor prompt_embeds")

    def per_prompt(self) -> int:
        """Outputs per prompt (`num_images_per_prompt`, or `num_videos_per_prompt`)."""
        return _per_prompt(self.first)

    def one_prompt(self) -> bool:
        """Whether every row reads one prompt: a single prompt (repeated by `num_images_per_prompt`), or several whose
        texts are equal in every prompt argument. False where they are not known (`prompt_embeds` of several rows)."""
        args = self.first
        if self.prompt_rows() // _per_prompt(args) == 1:
            return True
        columns = [_as_list(args.get(name)) for name in ("prompt", "prompt_2", "prompt_3")]
        return columns[0] is not None and all(len(set(values)) == 1 for values in columns if values is not None)

    def has_text(self) -> bool:
        return _as_list(self.first.get("prompt")) is not None

    def cfg_flag(self) -> bool:
        return bool(self.first.get("do_classifier_free_guidance", False))


def _row_texts(args: dict[str, Any], names: tuple[str, ...], fallback: str | None, rows: int, per_prompt: int) -> list[str] | None:
    """The text of each row for argument `names[0]` (falling back to `fallback`), or None when unknown."""
    for name in names + ((fallback,) if fallback else ()):
        values = _as_list(args.get(name))
        if values is not None:
            break
    else:
        return None
    if len(values) == 1 and rows // per_prompt > 1:
        values = values * (rows // per_prompt)
    if len(values) * per_prompt != rows:
        raise CallLayoutError(f"attnctl: {len(values)} texts for {rows // per_prompt} prompts in argument {names[0]!r}")
    return [text for text in values for _ in range(per_prompt)]


def _without_text_encoder(pipeline: Any, tokenizer_attr: str) -> bool:
    """Whether the text encoder of `tokenizer_attr` (`tokenizer_3` -> `text_encoder_3`) was loaded as None while its
    tokenizer was kept: SD3 without T5 fills that encoder's span with zeros, so no word is there."""
    encoder = tokenizer_attr.replace("tokenizer", "text_encoder", 1)
    return hasattr(pipeline, encoder) and getattr(pipeline, encoder) is None


def encoder_prompts(
    protocol: CallProtocol, pipeline: Any, record: PromptRecord, text_len: int, branch: str
) -> list[EncoderPrompts] | None:
    """Per-encoder prompts of every row for the cond or uncond branch; None when the branch has no rows in this call
    (`has_uncond_rows`) or its prompts are not text (`textless_reason`)."""
    if branch == "uncond" and not has_uncond_rows(protocol, record):
        return None
    if textless_reason(protocol, pipeline, record, branch) is not None:
        return None
    args = record.first
    per_prompt = _per_prompt(args)
    rows = record.prompt_rows()
    # the negative prompt is the `prompt` of a second encode_prompt call (Flux, Qwen-Image, Flux.2), or the
    # negative arguments of the one call (batched CFG, and Wan / Chroma, which encode both prompts at once)
    separate_negative = protocol.cfg_source == "contexts" and len(record.arguments) >= 2
    if branch == "uncond" and separate_negative:
        args = record.arguments[1]
    encoders: list[EncoderPrompts] = []
    offset = 0
    for spec in protocol.encoders:
        length = spec.length if spec.length is not None else text_len - offset
        tokenizers, texts, converters, preparers = [], [], [], []
        for attr, prompt_arg, negative_arg in zip(spec.tokenizers, spec.prompt_args, spec.negative_args):
            tokenizer = getattr(pipeline, attr, None)
            if tokenizer is None or _without_text_encoder(pipeline, attr):
                continue
            if branch == "cond" or separate_negative:
                row_texts = _row_texts(args, (prompt_arg,), "prompt", rows, per_prompt)
            else:
                row_texts = _row_texts(args, (negative_arg,), "negative_prompt", rows, per_prompt)
                if row_texts is None:
                    row_texts = [""] * rows
            if row_texts is None:
                return None
            if spec.template is not None:
                row_texts = [spec.template(pipeline, tokenizer, text) for text in row_texts]
                if any(text is None for text in row_texts):
                    return None
            if spec.kept_text is not None:
                row_texts = [spec.kept_text(pipeline, tokenizer, text, args) for text in row_texts]
                if any(text is None for text in row_texts):
                    return None
            tokenizers.append(tokenizer)
            texts.append(tuple(encoded_texts(pipeline, tokenizer, row_texts, args)))
            converters.append(_textual_inversion(pipeline, tokenizer))
            preparers.append(functools.partial(_encoded_text, pipeline, tokenizer, args))
        if tokenizers and length > 0:
            encoders.append(
                EncoderPrompts(spec.name, tuple(tokenizers), tuple(texts), offset, length, tuple(converters), tuple(preparers))
            )
        offset += length
    return encoders


def branch_text_len(protocol: CallProtocol, record: PromptRecord, lengths: list[int | None], text_len: int, branch: str) -> int:
    """The text length of `branch`'s rows: the length of the negative prompt's own `encode_prompt` call where the
    protocol encodes it separately (Flux true CFG, Qwen-Image, Flux.2: Qwen-Image pads each call to its longest
    prompt, so the two calls' lengths differ), else `text_len` (the denoiser call the controls are bound at: one
    encoding holds both prompts, padded alike)."""
    if branch == "uncond" and protocol.cfg_source == "contexts" and len(record.arguments) >= 2 and len(lengths) >= 2:
        found = lengths[1]
        if found is not None:
            return found
    return text_len


def encoded_texts(pipeline: Any, tokenizer: Any, texts: list[str], arguments: dict[str, Any]) -> list[str]:
    """`texts` as the pipeline's `encode_prompt` hands them to `tokenizer`, so that word positions are those
    of the tokens the text encoder sees: PixArt's caption preprocessing (`_text_preprocessing(prompt,
    clean_caption)`: lower-cased and stripped, or cleaned when `clean_caption` was set and its packages are
    installed), then textual inversion's multi-vector expansion (`maybe_convert_prompt`)."""
    texts = list(texts)
    preprocess = getattr(pipeline, "_text_preprocessing", None)
    if callable(preprocess) and "clean_caption" in arguments:
        texts = list(preprocess(texts, clean_caption=bool(arguments["clean_caption"])))
    convert = _textual_inversion(pipeline, tokenizer)
    if convert is not None:
        texts = [convert(text) for text in texts]
    return texts


def _encoded_text(pipeline: Any, tokenizer: Any, arguments: dict[str, Any], text: str) -> str:
    """One text as `encoded_texts` rewrites it."""
    return encoded_texts(pipeline, tokenizer, [text], arguments)[0]


def _textual_inversion(pipeline: Any, tokenizer: Any) -> Callable[[str], str] | None:
    """The pipeline's textual-inversion prompt conversion for `tokenizer` (diffusers applies it when the
    pipeline is a `TextualInversionLoaderMixin`), or None."""
    try:
        from diffusers.loaders import TextualInversionLoaderMixin
    except ImportError:  # pragma: no cover - diffusers always has it in the supported range
        return None
    if not isinstance(pipeline, TextualInversionLoaderMixin):
        return None
    return functools.partial(pipeline.maybe_convert_prompt, tokenizer=tokenizer)


def pipeline_cfg(protocol: CallProtocol, pipeline: Any, record: PromptRecord, batch: int) -> bool | None:
    """Whether the pipeline runs CFG at this denoiser call, as it says: its `do_classifier_free_guidance` (turned False
    by a CFG-cutoff callback), and False for a call of the cond rows only past the pipeline's own CFG truncation
    (Z-Image's `cfg_truncation`, which leaves the flag True); None where the pipeline has no such flag."""
    flag = getattr(pipeline, "do_classifier_free_guidance", None)  # a property of batched-CFG pipelines
    if not isinstance(flag, bool):
        return None
    if flag and protocol.cfg_truncation is not None and batch == record.prompt_rows():
        truncation = getattr(pipeline, protocol.cfg_truncation, None)
        if isinstance(truncation, (int, float)) and not isinstance(truncation, bool) and truncation <= 1:
            return False
    return flag


def cfg_dropped(protocol: CallProtocol, record: PromptRecord, batch: int, cfg_now: bool | None) -> bool:
    """Whether a batched-CFG call dropped its uncond rows mid-call, as diffusers' CFG-cutoff callbacks
    (`SDCFGCutoffCallback`, `SDXLCFGCutoffCallback`, `SD3CFGCutoffCallback`, the "dynamic classifier-free guidance"
    recipe) and Z-Image's `cfg_truncation` do: `encode_prompt` was told to do CFG, the pipeline now runs without it
    (`cfg_now`, `pipeline_cfg`), and the denoiser gets the cond rows only."""
    return protocol.cfg_source == "flag" and record.cfg_flag() and cfg_now is False and batch == record.prompt_rows()


def base_rows(
    protocol: CallProtocol, record: PromptRecord, batch: int, context: str | None, inputs: dict[str, Any],
    cfg_now: bool | None = None,
) -> RowLayout:
    """The pipeline's own rows for a denoiser call with `batch` rows; `cfg_now`: whether the pipeline runs CFG at this
    call (`pipeline_cfg`; None where it does not say)."""
    prompt_rows = record.prompt_rows()
    if cfg_dropped(protocol, record, batch, cfg_now):
        return RowLayout.single("cond", prompt_rows)
    if protocol.skip_layer_kwarg and inputs.get(protocol.skip_layer_kwarg) is not None:
        expected, layout = prompt_rows, RowLayout.single("cond", prompt_rows)
        what = "SD3's skip-layer pass (cond rows only)"
    elif protocol.cfg_source == "contexts" or (protocol.cfg_source == "sequential" and record.cfg_flag()):
        branch = "uncond" if context == "uncond" else "cond"
        expected, layout = prompt_rows, RowLayout.single(branch, prompt_rows)
        what = f"{branch} rows of a separate {branch} call"
    elif record.cfg_flag() and protocol.cfg_order == "cond_first":
        layout = RowLayout(RowLayout.single("cond", prompt_rows).rows + RowLayout.single("uncond", prompt_rows).rows)
        expected, what = 2 * prompt_rows, "[cond, uncond] (classifier-free guidance, cond rows first)"
    elif record.cfg_flag():
        expected, layout = 2 * prompt_rows, RowLayout.batched_cfg(prompt_rows)
        what = "[uncond, cond] (classifier-free guidance)"
    else:
        expected, layout = prompt_rows, RowLayout.single("cond", prompt_rows)
        what = "cond rows only (no classifier-free guidance)"
    if batch != expected:
        raise CallLayoutError(
            f"attnctl: the denoiser was called with a batch of {batch} rows, but the {protocol.name} call protocol "
            f"expects {expected} for {what} with {prompt_rows} prompt row(s). Known layouts: batched "
            "[uncond, cond], cond only (also after a CFG-cutoff callback dropped the uncond rows), separate cond/uncond calls "
            "(Flux / Chroma true CFG), SD3 skip-layer passes."
        )
    return layout


def named_call_arguments(pipe: Any) -> tuple[str, ...]:
    """The arguments `pipe.__call__` names. diffusers pipelines swallow any other keyword (a typo such as
    `num_inference_step`) into `**kwargs` and ignore it, so callers that forward arguments check against these."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    return tuple(name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self")
