"""Independent eager references for Reweight and AttentionMaps, written from docs/methods.md, not from attnctl's code.

Token positions come straight from the tokenizers' input ids; the token layout of each family is spelled
out here ([image; text] for SD3, [text; image] for Flux, text-only keys for cross-attention); the
attention is an explicit float64 softmax. The only attnctl machinery used is the processors' q / k / v
(held bitwise to stock by the identity tests) and the row layout (held by the call-protocol tests). The model's
text padding mask comes from the pipeline itself (`PipelineMask`), not from the spec attnctl's processor builds, so
an edit path that drops or changes that mask cannot hide behind a reference that shares it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from attnctl.control import Bound, Control
from attnctl.processors.edit import Edit, LayerHook

FAMILY = {"tiny-sd": "unet", "tiny-sdxl": "unet", "tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-pixart": "pixart"}
CLIP_LEN = 77
#: text sequence length each tiny pipeline's denoiser sees with CALL_DEFAULTS
TEXT_LEN = {"tiny-sd": 77, "tiny-sdxl": 77, "tiny-sd3": 77 + 256, "tiny-flux": 32, "tiny-pixart": 32}


def _find(ids: list[int], pattern: list[int]) -> list[int]:
    hits = [i for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern]
    return [i + j for i in hits for j in range(len(pattern))]


def text_positions(pipe: Any, name: str, prompt: str, word: str) -> list[int]:
    """Positions of `word` in the text sequence the denoiser of `name` sees, from the tokenizers' ids."""
    family = FAMILY[name]
    positions: set[int] = set()
    if family in ("unet", "sd3"):
        for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
            if tok is not None:
                positions.update(_find(tok(prompt).input_ids, tok(word, add_special_tokens=False).input_ids))
    t5 = {"sd3": "tokenizer_3", "flux": "tokenizer_2", "pixart": "tokenizer"}.get(family)
    if t5 is not None and getattr(pipe, t5, None) is not None:
        tok = getattr(pipe, t5)
        offset = CLIP_LEN if family == "sd3" else 0
        positions.update(offset + p for p in _find(tok(prompt).input_ids, tok(" " + word, add_special_tokens=False).input_ids))
    return sorted(positions)


#: The keyword by which a tiny model's pipeline hands its denoiser the text padding mask (the others pass none).
PADDING_KWARG = {"tiny-pixart": "encoder_attention_mask", "tiny-chroma": "attention_mask",
                 "tiny-qwenimage": "encoder_hidden_states_mask"}


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


class PipelineMask:
    """The padding mask the pipeline hands its denoiser in the call in progress, caught by a forward pre-hook of the
    test's own (`with PipelineMask(pipe, name) as mask:`), and `bias`, the additive mask each family's attention
    makes of it. The references take the model's mask from here, not from attnctl's spec."""

    def __init__(self, pipe: Any, name: str):
        self.name, self.kwarg = name, PADDING_KWARG.get(name)
        self.denoiser = _denoiser(pipe)
        self.current: torch.Tensor | None = None
        self.calls = 0  # denoiser calls that passed a mask
        self._handle: Any = None

    def __enter__(self) -> PipelineMask:
        self._handle = self.denoiser.register_forward_pre_hook(self._catch, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _catch(self, module: Any, args: Any, kwargs: dict) -> None:
        self.current = kwargs.get(self.kwarg) if self.kwarg is not None else None
        self.calls += self.current is not None

    def bias(self, n_q: int, n_k: int) -> torch.Tensor | None:
        """float64 additive mask (B, 1, 1 | n_q, n_k) of an attention call of the current denoiser call: PixArt's
        cross-attention and Qwen-Image's joint `[text; image]` keys drop the padded text keys (-inf; PixArt's -10000
        gives the same zero weight in float64); Chroma adds the outer product of its 0/1 mask over `[text; image]`
        (diffusers' ChromaTransformer2DModel turns the pipeline's float mask into `m_i * m_j` and passes it to SDPA,
        which adds a float mask)."""
        padding = self.current
        if padding is None:
            return None
        if self.name == "tiny-chroma":
            m = padding.double()
            assert m.shape[1] == n_k == n_q, (m.shape, n_q, n_k)
            return m[:, None, None, :] * m[:, None, :, None]
        keep = padding.bool()
        if self.name == "tiny-qwenimage":
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], n_k - keep.shape[1])], 1)
        assert keep.shape[1] == n_k, (keep.shape, n_k)
        zero = torch.zeros(keep.shape, dtype=torch.float64)
        return zero.masked_fill(~keep, float("-inf"))[:, None, None, :]


# weights(branch, prompt_row, step_index) -> {text position: factor}
WeightsFn = Callable[[str, int, int], dict[int, float]]


class _EagerHook(LayerHook):
    def __init__(self, control: EagerReference):
        self.control = control

    def attend(self, call, q, k, v, spec, compute):
        c = self.control
        batch, heads, n_q, d = q.shape
        n_k = k.shape[2]
        text_len = c.text_len
        if c.family in ("unet", "pixart"):
            text_keys, image_rows = slice(0, n_k), slice(0, n_q)
        elif c.family == "sd3":  # [image; text]
            image = n_q - text_len
            text_keys, image_rows = slice(image, n_k), slice(0, image)
        else:  # flux: [text; image]
            text_keys, image_rows = slice(0, text_len), slice(text_len, n_q)
        logits = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
        assert spec.attn_mask is None or c.padding is not None, "the model has a mask: give the reference its PipelineMask"
        mask = c.padding.bias(n_q, n_k) if c.padding is not None else None
        if mask is not None:
            logits = logits + mask
        w = torch.ones(batch, n_k, dtype=torch.float64)
        for b, row in enumerate(call.rows.rows):
            for position, factor in c.weights(row.branch, row.prompt, call.step.index).items():
                w[b, text_keys.start + position] *= factor
        if c.capture is not None:
            c.capture.append((call.layer.name, call.step.index, call.rows, logits, text_keys, image_rows))
        if c.normalize:
            bias = torch.zeros(batch, 1, n_q, n_k, dtype=torch.float64)
            bias[:, :, image_rows, :] = torch.log(w)[:, None, None, :]
            probs = torch.softmax(logits + bias, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            probs[:, :, image_rows, :] = probs[:, :, image_rows, :] * w[:, None, None, :]
        return (probs @ v.double()).to(v.dtype), None


@dataclass(frozen=True)
class EagerReference(Control, type_name="test-eager-reweight-reference"):
    """Explicit softmax, A * w (or softmax(logits + log w)) on the image-query rows, per the weights function."""

    family: str = "unet"
    text_len: int = 77
    weights: Any = None  # WeightsFn
    normalize: bool = False
    layers: Any = None
    capture: list | None = field(default=None, compare=False, hash=False)
    padding: PipelineMask | None = field(default=None, compare=False, hash=False)  # the model's mask, from the pipeline

    def default_layers(self, adapter):
        return "joint" if adapter.family in ("sd3", "flux") else "cross"

    def bind(self, context):
        return _EagerBound(self, context.layers, (0.0, 1.0))


class _EagerBound(Bound):
    def __init__(self, control, layers, steps):
        super().__init__(control, layers, steps)
        self._edit = Edit(hooks=(_EagerHook(control),))

    def edit(self, layer, frame):
        return self._edit


def reference_for(name: str, weights: WeightsFn, normalize: bool = False, capture: list | None = None, layers: Any = None,
                  padding: PipelineMask | None = None) -> EagerReference:
    return EagerReference(family=FAMILY[name], text_len=TEXT_LEN[name], weights=weights, normalize=normalize, capture=capture,
                          layers=layers, padding=padding)


def word_weights(pipe: Any, name: str, prompts: list[str], table: dict[str, float], branch: str = "cond",
                 per_prompt: int = 1) -> WeightsFn:
    """A weights function: `table` {word: factor} on the rows of `branch`; prompts listed once per prompt."""
    expanded = [p for p in prompts for _ in range(per_prompt)]
    resolved = []
    for prompt in expanded:
        found: dict[int, float] = {}
        for word, factor in table.items():
            positions = text_positions(pipe, name, prompt, word)
            assert positions, (word, prompt)
            for p in positions:
                found[p] = found.get(p, 1.0) * factor
        resolved.append(found)

    def weights(row_branch: str, prompt_row: int, step: int) -> dict[int, float]:
        return resolved[prompt_row] if row_branch == branch or branch == "both" else {}

    return weights


class _SpyHook(LayerHook):
    def __init__(self, log: list, padding: PipelineMask | None):
        self.log, self.padding = log, padding

    def attend(self, call, q, k, v, spec, compute):
        out, lse = compute(q, k, v, spec)
        model_mask = self.padding.bias(q.shape[2], k.shape[2]) if self.padding is not None else None
        self.log.append({"layer": call.layer, "rows": call.rows, "step": call.step.index, "q": q, "k": k, "v": v,
                         "mask": spec.attn_mask, "model_mask": model_mask, "out": out})
        return out, lse


@dataclass(frozen=True)
class Spy(Control, type_name="test-attention-spy"):
    """Records q, k, v and the output of every attention call of its layers (the op of the other controls); with
    `padding`, also the model's additive mask of the call made from the pipeline's own padding mask ("model_mask")."""

    log: list = field(default_factory=list, compare=False, hash=False)
    layers: Any = None
    padding: PipelineMask | None = field(default=None, compare=False, hash=False)

    def default_layers(self, adapter):
        return "joint" if adapter.family in ("sd3", "flux") else "cross"

    def bind(self, context):
        bound = Bound(self, context.layers, (0.0, 1.0))
        edit = Edit(hooks=(_SpyHook(self.log, self.padding),))
        bound.edit = lambda layer, frame: edit
        return bound


def layout(name: str, n_q: int, n_k: int) -> tuple[slice, slice, slice]:
    """(text keys, image query rows, text query rows) of one attention call of the tiny model `name`."""
    family, text_len = FAMILY[name], TEXT_LEN[name]
    if family in ("unet", "pixart"):
        return slice(0, n_k), slice(0, n_q), slice(0, 0)
    if family == "sd3":
        image = n_q - text_len
        return slice(image, n_k), slice(0, image), slice(image, n_q)
    return slice(0, text_len), slice(text_len, n_q), slice(0, text_len)


def eager_call(name: str, record: dict, weights: WeightsFn, normalize: bool) -> torch.Tensor:
    """The reweighted output of one recorded attention call, by the formula; the model's mask is the record's
    "model_mask" (from the pipeline: a `Spy` with `padding`)."""
    q, k, v = (record[x].double() for x in ("q", "k", "v"))
    batch, _, n_q, d = q.shape
    n_k = k.shape[2]
    text_keys, image_rows, _ = layout(name, n_q, n_k)
    logits = q @ k.transpose(-1, -2) / d**0.5
    assert record["mask"] is None or record["model_mask"] is not None, "the model has a mask: give the Spy its PipelineMask"
    if record["model_mask"] is not None:
        logits = logits + record["model_mask"]
    w = torch.ones(batch, n_k, dtype=torch.float64)
    for b, row in enumerate(record["rows"].rows):
        for position, factor in weights(row.branch, row.prompt, record["step"]).items():
            w[b, text_keys.start + position] *= factor
    if normalize:
        bias = torch.zeros(batch, 1, n_q, n_k, dtype=torch.float64)
        bias[:, :, image_rows] = torch.log(w)[:, None, None, :]
        return torch.softmax(logits + bias, -1) @ v
    probs = torch.softmax(logits, -1)
    probs[:, :, image_rows] = probs[:, :, image_rows] * w[:, None, None, :]
    return probs @ v


class RefQwenJoint:
    """Qwen-Image's double-stream attention over `[text; image]` (qk-norms, separate RoPE, the text padding mask),
    written out densely with the allowed (query, key) pairs of `allowed`: subclasses say which."""

    def allowed(self, batch: int, text: int, total: int) -> torch.Tensor:
        """(batch, 1, total, total) bool over the joint sequence `[text; image...]`; every pair by default."""
        return torch.ones(batch, 1, total, total, dtype=torch.bool)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        def split(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        img_freqs, txt_freqs = image_rotary_emb
        q, k = apply_rotary_emb_qwen(q, img_freqs, use_real=False), apply_rotary_emb_qwen(k, img_freqs, use_real=False)
        eq, ek = apply_rotary_emb_qwen(eq, txt_freqs, use_real=False), apply_rotary_emb_qwen(ek, txt_freqs, use_real=False)
        text, total = eq.shape[1], eq.shape[1] + q.shape[1]
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        allowed = self.allowed(q.shape[0], text, total)
        if encoder_hidden_states_mask is not None:
            allowed[:, :, :, :text] &= encoder_hidden_states_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
        out = out.transpose(1, 2).flatten(2, 3)
        context, image = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(context)


class RefQwenPAG(RefQwenJoint):
    """docs/methods.md "PAG" for the generated image's queries (itself and the text) in Qwen-Image's joint attention
    over `[text; image; references]`; text and reference queries attend to every key. `image_tokens`: the generated
    image's tokens (None: every image token, no references)."""

    def __init__(self, image_tokens: int | None = None):
        self.image_tokens = image_tokens

    def allowed(self, batch: int, text: int, total: int) -> torch.Tensor:
        allowed = super().allowed(batch, text, total)
        n = total - text if self.image_tokens is None else self.image_tokens
        allowed[:, :, text : text + n, text:] = False
        allowed[:, :, text : text + n, text : text + n] |= torch.eye(n, dtype=torch.bool)
        return allowed


class RefQwenIsolation(RefQwenJoint):
    """docs/methods.md "Regions", isolation in Qwen-Image's joint attention: image tokens of two different subject
    regions (labels > 0, one per image token) do not see each other; text and background keep every key, whatever
    the call's text length."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def allowed(self, batch: int, text: int, total: int) -> torch.Tensor:
        allowed = super().allowed(batch, text, total)
        a, b = self.labels[:, None], self.labels[None, :]
        allowed[:, :, text:, text:] &= ~((a > 0) & (b > 0) & (a != b))
        return allowed
