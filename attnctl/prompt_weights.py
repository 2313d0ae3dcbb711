"""Prompt weighting syntax, turned into attention-level weights for `attnctl.Reweight`.

    >>> parse_prompt("a (red:1.6) car, (blurry:0)")
    ('a red car, blurry', {'red': 1.6, 'blurry': 0.0})

The subset of the AUTOMATIC1111 / compel syntax of docs/methods.md:

- `(text:1.5)` multiplies the weight of `text` by 1.5; `(text)` by 1.1; `[text]` by 1 / 1.1;
- nesting multiplies: `((cat))` is 1.21, `(a (red:1.5) car:1.2)` gives "red" 1.8;
- `\\(`, `\\)`, `\\[`, `\\]`, `\\:` and `\\\\` are the literal characters;
- a `:` that does not end a `(text:number)` group is plain text (`(smile: e)` is text weighted 1.1); a weight is
  what Python's `float` reads (`1.5`, `.5`, `1.5e1`).

Unbalanced or mismatched brackets, negative or malformed weights and A1111's prompt editing
(`[from:to:when]`) raise `ConfigError` naming the position. The difference that matters: A1111 and compel
scale the *text embeddings* of weighted tokens; attnctl scales the *attention* the image pays to those
tokens (Prompt-to-Prompt, Hertz et al. 2022), so the same numbers give different, usually gentler, results.

Weighted spans become keys of the weights dict: the phrase itself when every occurrence of it in the
clean prompt carries that same weight, otherwise `(phrase, occurrence)` pairs (occurrences counted from
0 in the clean prompt, case-insensitively, on whole words, exactly as `attnctl.tokens` counts them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import ConfigError
from .tokens import phrase_pattern  # how attnctl.tokens finds a phrase, so occurrences count alike

ROUND = 1.1
SQUARE = 1 / 1.1

# a weight: what looks like a number (digits, with signs, dots, exponents) or nan / inf, before the closing bracket;
# text without a digit (`(smile: e)`, `(x: -)`) is not a weight but plain text
_ANY_NUMBER_CLOSE = re.compile(r":\s*([+-]?(?:(?=[\d.eE+-]*\d)[\d.eE+-]+|nan|inf(?:inity)?))\s*([)\]])", re.IGNORECASE)
_ESCAPABLE = "()[]:\\"

Key = str | tuple[str, int]


def parse_segments(text: str) -> list[tuple[str, float]]:
    """Split `text` into `(plain text, weight)` segments, adjacent segments of equal weight merged."""
    if not isinstance(text, str):
        raise ConfigError(f"parse_prompt takes a prompt string, got {text!r}")
    chars: list[str] = []
    weights: list[float] = []
    stack: list[tuple[str, int, int]] = []  # (bracket, position in text, index into chars)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            chars.append(text[i + 1])
            weights.append(1.0)
            i += 2
            continue
        if c in "([":
            stack.append((c, i, len(chars)))
            i += 1
            continue
        if c == ":" and stack:
            close = _ANY_NUMBER_CLOSE.match(text, i)
            if close is not None:
                bracket, where, start = stack[-1]
                if bracket == "[" or close.group(2) == "]":
                    raise ConfigError(
                        f"parse_prompt: {text[where:close.end()]!r} at position {where} looks like A1111 prompt editing "
                        "or a weight in square brackets; attnctl supports (text:weight), (text) and [text] only"
                    )
                if close.group(1).lstrip("+-").lower() in ("nan", "inf", "infinity"):
                    raise ConfigError(
                        f"parse_prompt: weight {close.group(1)} at position {i + 1} must be a finite number >= 0 "
                        "(0 mutes the text)"
                    )
                try:
                    value = float(close.group(1))  # 1.5, .5, 2., 1.5e1
                except ValueError:
                    raise ConfigError(
                        f"parse_prompt: malformed weight {close.group(1)!r} at position {i + 1} in {text!r} (escape the "
                        "colon as '\\:' for plain text)"
                    ) from None
                if not math.isfinite(value) or value < 0:
                    raise ConfigError(
                        f"parse_prompt: weight {close.group(1)} at position {i + 1} must be a finite number >= 0 "
                        "(0 mutes the text)"
                    )
                stack.pop()
                for j in range(start, len(chars)):
                    weights[j] *= value
                i = close.end()
                continue
        if c in ")]":
            if not stack:
                raise ConfigError(f"parse_prompt: {c!r} at position {i} closes no bracket in {text!r} (escape it as '\\{c}')")
            bracket, where, start = stack.pop()
            if (bracket, c) not in (("(", ")"), ("[", "]")):
                raise ConfigError(f"parse_prompt: {bracket!r} at position {where} is closed by {c!r} at position {i} in {text!r}")
            factor = ROUND if c == ")" else SQUARE
            for j in range(start, len(chars)):
                weights[j] *= factor
            i += 1
            continue
        chars.append(c)
        weights.append(1.0)
        i += 1
    if stack:
        bracket, where, _ = stack[-1]
        raise ConfigError(f"parse_prompt: {bracket!r} at position {where} is never closed in {text!r} (escape it as '\\{bracket}')")
    segments: list[tuple[str, float]] = []
    for char, weight in zip(chars, weights):
        if segments and segments[-1][1] == weight:
            segments[-1] = (segments[-1][0] + char, weight)
        else:
            segments.append((char, weight))
    return segments


def parse_prompt(text: str) -> tuple[str, dict[Key, float]]:
    """`(clean prompt, weights)` from a prompt written with weighting syntax (see the module docstring).

    The weights dict goes straight into `attnctl.Reweight(weights)`; pass the clean prompt to the pipeline.
    """
    segments = parse_segments(text)
    clean = "".join(segment for segment, _ in segments)
    spans: list[tuple[str, int, float]] = []  # (phrase, start in clean, weight)
    position = 0
    for segment, weight in segments:
        if _tidy(weight) != 1.0:
            stripped = segment.strip()
            if stripped:
                spans.append((stripped, position + segment.index(stripped), _tidy(weight)))
        position += len(segment)
    weights: dict[Key, float] = {}
    by_phrase: dict[str, list[tuple[str, int, float]]] = {}
    for span in spans:
        by_phrase.setdefault(" ".join(span[0].lower().split()), []).append(span)  # as `phrase_pattern` matches
    for phrase_spans in by_phrase.values():
        phrase = phrase_spans[0][0]
        starts = [m.start() for m in phrase_pattern(phrase).finditer(clean)]
        occurrences = []
        for found, start, weight in phrase_spans:
            if start not in starts:
                raise ConfigError(
                    f"parse_prompt: the weighted text {found!r} at position {start} of {clean!r} does not start and end "
                    "at word boundaries; weight whole words"
                )
            occurrences.append((starts.index(start), weight))
        if len(occurrences) == len(starts) and len({w for _, w in occurrences}) == 1:
            weights[phrase] = occurrences[0][1]
        else:
            for occurrence, weight in occurrences:
                weights[(phrase, occurrence)] = weight
    return clean, weights


def parse_prompts(texts: str | Sequence[str]) -> tuple[str | list[str], dict[Key, float] | list[dict[Key, float]]]:
    """`parse_prompt` for one prompt or a list of them (then one weights dict per prompt, for `Reweight`)."""
    if isinstance(texts, str):
        return parse_prompt(texts)
    parsed = [parse_prompt(text) for text in texts]
    return [clean for clean, _ in parsed], [weights for _, weights in parsed]


def _tidy(weight: float) -> float:
    """Round away float noise from repeated multiplication (1.1 * 1.1 = 1.2100000000000002)."""
    return float(f"{weight:.12g}")
