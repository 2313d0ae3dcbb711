"""Words to token positions (docs/methods.md "Words to tokens"), shared by every control that takes words.

A query is a word or phrase (`"red car"`: every occurrence), a word with an occurrence (`("cat", 1)`: the
second "cat", counting from 0), or an explicit position in the text sequence (`5`). Positions are resolved
per prompt row and per text encoder: CLIP-L and CLIP-G share their positions (SDXL, SD3), SD3's T5 span
follows the CLIP span, Flux and PixArt attend to T5 tokens only. A word found by none of the encoders of a
row raises `TokenError` showing how the prompt was tokenized.

`bytes_to_unicode` is the byte-level alphabet of CLIP's BPE, shared by the offline tokenizers this package builds
(`attnctl.testing`, `attnctl.toy`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import ConfigError, TokenError
from .validation import plain_scalar

WordQuery = str | int | tuple[str, int]


def validate_word_query(query: object, *, owner: str) -> WordQuery:
    query = plain_scalar(query)
    if isinstance(query, (tuple, list)) and len(query) == 2:
        query = (query[0], plain_scalar(query[1]))
    if isinstance(query, bool):
        raise ConfigError(f"{owner}: {query!r} is not a word, phrase, (word, occurrence) pair or token position")
    if isinstance(query, int):
        if query < 0:
            raise ConfigError(f"{owner}: token position must be >= 0, got {query}")
        return query
    if isinstance(query, str):
        if not query.strip():
            raise ConfigError(f"{owner}: empty word {query!r}")
        return query.strip()
    if isinstance(query, (tuple, list)) and len(query) == 2 and isinstance(query[0], str) and isinstance(query[1], int) and not isinstance(query[1], bool):
        if query[1] < 0 or not query[0].strip():
            raise ConfigError(f"{owner}: occurrence must be >= 0 and the word non-empty, got {tuple(query)!r}")
        return (query[0].strip(), int(query[1]))
    raise ConfigError(f"{owner}: {query!r} is not a word, phrase, (word, occurrence) pair or token position")


def has_duplicates(queries: Sequence[WordQuery]) -> bool:
    """Whether two queries find the same tokens: words match whatever their case and the whitespace between them
    ("red car" and "RED  car" are one phrase)."""
    folded = [_folded(q) if isinstance(q, str) else (_folded(q[0]), q[1]) if isinstance(q, tuple) else q for q in queries]
    return len(set(folded)) != len(folded)


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Where `phrase` is in a prompt: whole words, any case, its words separated by any whitespace ("red car" is in
    "a red  car" and "a Red\ncar": the tokenizer gives them the same tokens)."""
    words = r"\s+".join(re.escape(word) for word in phrase.split())
    return re.compile(r"(?<!\w)" + words + r"(?!\w)", re.IGNORECASE)


def _folded(phrase: str) -> str:
    return " ".join(phrase.casefold().split())


def explicit_position(query: int, text_len: int) -> tuple[int, ...]:
    """An explicit token position, resolved without the prompt's text (it may have come as `prompt_embeds`)."""
    if query >= text_len:
        raise TokenError(f"attnctl: token position {query} is outside the text sequence of {text_len} tokens")
    return (query,)


def describe_query(query: WordQuery) -> str:
    if isinstance(query, tuple):
        return f"{query[0]!r} (occurrence {query[1]})"
    if isinstance(query, int):
        return f"token position {query}"
    return repr(query)


@dataclass(frozen=True)
class EncoderPrompts:
    """One text encoder's part of a call: its tokenizers, each row's prompt per tokenizer, and its span.

    `prompts[t][r]` is the text tokenizer `t` saw for row `r` (e.g. `prompt` for CLIP-L, `prompt_2` for
    CLIP-G), as the pipeline encoded it (caption preprocessing and textual-inversion expansion applied).
    `limit` is the number of positions the encoder has (77 for CLIP, `max_sequence_length` for T5).
    `convert[t]`, when given, rewrites a queried phrase as the prompts were rewritten for tokenizer `t`
    (textual inversion: a multi-vector token `<x>` becomes `<x> <x>_1 ...`, so a query for `<x>` finds
    every vector). `prepare[t]`, when given, rewrites any text as the pipeline rewrites its prompts for tokenizer `t`
    (caption preprocessing, then textual inversion): for text the pipeline encodes besides the prompt (a phrase
    encoded alone).
    """

    name: str
    tokenizers: tuple[Any, ...]
    prompts: tuple[tuple[str, ...], ...]
    offset: int
    limit: int
    convert: tuple[Callable[[str], str] | None, ...] = ()
    prepare: tuple[Callable[[str], str] | None, ...] = ()


class _Tokenized:
    """One prompt tokenized by one tokenizer, with the character span of each token in the prompt: the tokenizer's
    own offsets, or (a slow tokenizer: transformers 4.x's CLIPTokenizer / T5Tokenizer give none) offsets rebuilt by
    `_rebuilt_offsets`, so that words are matched in the text the same way either way."""

    def __init__(self, tokenizer: Any, text: str, limit: int, encoder: str):
        self.text = text
        try:
            encoding = tokenizer(text, truncation=False, add_special_tokens=True, return_offsets_mapping=True)
            offsets: list[tuple[int, int]] | None = [tuple(o) for o in encoding["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError, KeyError):
            encoding = tokenizer(text, truncation=False, add_special_tokens=True)
            offsets = None
        self.ids: list[int] = list(encoding["input_ids"])
        self.offsets: list[tuple[int, int]] = offsets if offsets is not None else _rebuilt_offsets(tokenizer, text, self.ids)
        self.tokens: list[str] = list(tokenizer.convert_ids_to_tokens(self.ids))
        self.tokenizer = tokenizer
        self.limit, self.encoder = limit, encoder
        # Longer than the encoder takes: the pipeline truncates it (diffusers warns), and the encoder gets what the
        # tokenizer keeps at `max_length=limit`: CLIP's start token, 75 tokens and its end token in 77, T5's L - 1
        # pieces and </s> in L. `kept` positions are the prompt's own; a word only past them raises in
        # `PromptTokens.positions`.
        self.truncated = len(self.ids) > limit
        self.encoded_ids: list[int] = self.ids
        self.kept = len(self.ids)
        if self.truncated:
            self.encoded_ids = list(tokenizer(text, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"])
            self.kept = next((i for i, (a, b) in enumerate(zip(self.ids, self.encoded_ids)) if a != b), len(self.encoded_ids))

    def word_ids(self) -> list[int]:
        """The index of the word each token comes from (-1: a special token): the whitespace-separated word its
        characters fall in."""
        words = [m.span() for m in re.finditer(r"\S+", self.text)]
        return [next((k for k, (start, stop) in enumerate(words) if b > a and a < stop and b > start), -1) for a, b in self.offsets]

    def show(self) -> str:
        return " ".join(f"{i}:{tok}" for i, tok in enumerate(self.tokens))

    def find(self, phrase: str, occurrence: int | None) -> list[int]:
        spans = [m.span() for m in phrase_pattern(phrase).finditer(self.text)]
        if occurrence is not None:
            spans = spans[occurrence : occurrence + 1]
        positions: list[int] = []
        for start, stop in spans:
            positions.extend(i for i, (a, b) in enumerate(self.offsets) if b > a and a < stop and b > start)
        return positions


def _rebuilt_offsets(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character spans of `ids` in `text` for a tokenizer that gives no offsets, as a fast tokenizer gives them: each
    token is decoded alone and found in the text from where the previous one ended, ignoring case (CLIP lower-cases
    the prompt). A token that decodes to nothing (SentencePiece's lone `▁`) or to part of a character (U+FFFD: a
    byte-level piece) is decoded with the tokens after it until that gives text, and they all get its span. An unknown
    token gets the text between its neighbours; special tokens, and tokens not found (text the tokenizer normalized),
    get (0, 0): no word."""
    folded = text.lower()
    if len(folded) != len(text):  # a character whose lower case is longer: keep the text's indices
        folded = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    specials = set(getattr(tokenizer, "all_special_ids", ()) or ())
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    offsets: list[tuple[int, int]] = [(0, 0)] * len(ids)
    cursor, group, unknown = 0, [], []
    for i, token_id in enumerate(ids):
        if token_id == unknown_id or token_id in specials:
            # its own text typed in the prompt ("<|endoftext|>"): step over it, so the next token is not found inside
            literal = str(tokenizer.convert_ids_to_tokens(token_id)).lower()
            at = folded.find(literal, cursor) if literal else -1
            typed = at >= 0 and not text[cursor:at].strip() and _parsed_whole(tokenizer, text[at : at + len(literal)], token_id)
            if typed:
                offsets[i] = (at, at + len(literal))
                cursor = at + len(literal)
            if token_id == unknown_id and not typed:  # a character the vocabulary lacks: the text up to the next token
                unknown.extend(group)  # a lone SentencePiece `▁` before it shares its span, as fast tokenizers give it
                unknown.append(i)
            else:
                unknown = []
            group = []
            continue
        alone = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        if not group and alone and not alone.strip():  # a whitespace token (byte-level `Ġ`, `Ċ`): in no word
            continue
        group.append(i)
        piece = tokenizer.decode([ids[j] for j in group], clean_up_tokenization_spaces=False).strip().lower()
        if (not piece or "\ufffd" in piece) and len(group) < 8 and i + 1 < len(ids):
            continue
        members, group = group, []
        start = folded.find(piece, cursor) if piece else -1
        if start < 0:
            continue
        gap = re.search(r"\S(.*\S)?", text[cursor:start])
        for j in unknown:
            if gap is not None:
                offsets[j] = (cursor + gap.start(), cursor + gap.end())
        unknown = []
        cursor = start + len(piece)
        for j in members:
            offsets[j] = (start, cursor)
    return offsets


def _parsed_whole(tokenizer: Any, typed: str, token_id: int) -> bool:
    """Whether the tokenizer reads `typed` (a special token's text as the prompt has it) as the one token `token_id`
    (CLIP's "<|endoftext|>"), not as pieces (T5 reads a typed "<UNK>" as "<", "UNK", ">")."""
    return list(tokenizer(typed, add_special_tokens=False)["input_ids"]) == [token_id]


class PromptTokens:
    """Token positions of words in every prompt row of one call, for the cond or uncond prompts."""

    def __init__(self, encoders: Sequence[EncoderPrompts], rows: int, text_len: int, branch: str = "cond"):
        self.encoders = tuple(encoders)
        self.rows = rows
        self.text_len = text_len
        self.branch = branch
        self._cache: dict[tuple[int, int, str], _Tokenized] = {}

    def _tokenized(self, e: int, t: int, row: int) -> _Tokenized:
        encoder = self.encoders[e]
        text = encoder.prompts[t][row]
        key = (e, t, text)
        if key not in self._cache:
            self._cache[key] = _Tokenized(encoder.tokenizers[t], text, encoder.limit, encoder.name)
        return self._cache[key]

    def check_lengths(self) -> None:
        """Tokenize every prompt (raising for a tokenizer failure). A prompt longer than its encoder's limit is
        not an error by itself: the pipeline truncates it, and only a word that lies entirely past the limit
        raises (in `positions`)."""
        for e, encoder in enumerate(self.encoders):
            for t in range(len(encoder.tokenizers)):
                for row in range(self.rows):
                    self._tokenized(e, t, row)

    @property
    def tokenizer_count(self) -> int:
        """The most tokenizers an encoder has (2: SDXL's and SD3's CLIP-L and CLIP-G, which share positions)."""
        return max((len(encoder.tokenizers) for encoder in self.encoders), default=1)

    def token_ids(self, row: int, tokenizer: int = 0) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """Per text encoder: (offset, limit, token ids of prompt row `row` by the encoder's tokenizer `tokenizer` (its
        last one if it has fewer), special tokens included, as the encoder gets them: truncated to `limit` as the
        pipeline truncates, its end token last): for controls that align the tokens of two prompts (Prompt-to-Prompt)."""
        return tuple(
            (encoder.offset, encoder.limit, tuple(self._tokenized(e, min(tokenizer, len(encoder.tokenizers) - 1), row).encoded_ids))
            for e, encoder in enumerate(self.encoders)
        )

    def token_words(self, row: int, tokenizer: int = 0) -> tuple[list[int], ...]:
        """Per text encoder: the word index of each token of `token_ids(row, tokenizer)` (`_Tokenized.word_ids`; -1 for
        the end token a truncated prompt ends with)."""
        out = []
        for e, encoder in enumerate(self.encoders):
            tokenized = self._tokenized(e, min(tokenizer, len(encoder.tokenizers) - 1), row)
            out.append(tokenized.word_ids()[: tokenized.kept] + [-1] * (len(tokenized.encoded_ids) - tokenized.kept))
        return tuple(out)

    def text(self, row: int, tokenizer: int = 0) -> str:
        """The prompt of row `row` as the first encoder's tokenizer `tokenizer` (its last if it has fewer) reads it."""
        encoder = self.encoders[0]
        return encoder.prompts[min(tokenizer, len(encoder.tokenizers) - 1)][row]

    def positions(self, query: WordQuery, row: int, *, missing_ok: bool = False) -> tuple[int, ...]:
        """Positions of `query` in the text sequence of prompt row `row` (sorted, unique). `missing_ok`: a word that
        is not in this row gives () instead of a TokenError (a word truncated away by the encoder's limit still
        raises: it is in the prompt, and the pipeline drops it)."""
        if isinstance(query, int):
            return explicit_position(query, self.text_len)
        phrase, occurrence = (query if isinstance(query, tuple) else (query, None))
        found: set[int] = set()
        truncated: list[tuple[_Tokenized, list[int]]] = []
        for e, encoder in enumerate(self.encoders):
            shared: list[tuple[int, ...]] = []  # per tokenizer of this encoder: the positions they share
            for t in range(len(encoder.tokenizers)):
                tokenized = self._tokenized(e, t, row)
                convert = encoder.convert[t] if t < len(encoder.convert) else None
                form = convert(phrase) if convert is not None else phrase
                hits = tokenized.find(form, occurrence)
                shared.append(tuple(encoder.offset + p for p in hits if p < tokenized.kept))
                found.update(shared[-1])
                past = [p for p in hits if p >= tokenized.kept]
                if past:
                    truncated.append((tokenized, past))
            if len(set(shared)) > 1:
                self._warn_shared(query, row, e, shared)
        if not found and truncated:
            tokenized, past = truncated[0]
            raise TokenError(
                f"attnctl: {describe_query(query)} is at {tokenized.encoder} token position(s) {past} of the prompt "
                f"{tokenized.text!r}, which has {len(tokenized.ids)} tokens but the limit is {tokenized.limit} "
                f"(special tokens included; the encoder keeps the prompt's tokens up to position {tokenized.kept - 1}): "
                "the pipeline truncates the prompt there, so the word cannot be controlled. Shorten the prompt or "
                "move the word before the limit."
            )
        if not found:
            if missing_ok:
                return ()
            raise TokenError(self._missing_message(query, row))
        return tuple(sorted(found))

    def _warn_shared(self, query: WordQuery, row: int, e: int, shared: list[tuple[int, ...]]) -> None:
        encoder = self.encoders[e]
        where = "; ".join(
            f"at {list(positions)} in tokenizer {t + 1}'s text {encoder.prompts[t][row]!r}" for t, positions in enumerate(shared)
        )
        union = sorted(set().union(*shared))
        prompt = "prompt" if self.branch == "cond" else "negative_prompt"
        warnings.warn(
            f"attnctl: {describe_query(query)} is at different {encoder.name} positions in the {self.branch} prompts of row "
            f"{row} ({where}). Their encoders share positions (each key carries both encoders' channels), so the "
            f"control acts at {union} in both, on whatever the other text holds there too. Word {prompt} and "
            f"{prompt}_2 alike (or leave {prompt}_2 None) to control one word.",
            UserWarning,
            stacklevel=3,
        )

    def _missing_message(self, query: WordQuery, row: int) -> str:
        shown = []
        for e, encoder in enumerate(self.encoders):
            tokenized = self._tokenized(e, 0, row)
            shown.append(f"{encoder.name} (positions from {encoder.offset}): {tokenized.show()}")
        text = self.encoders[0].prompts[0][row] if self.encoders else ""
        return (
            f"attnctl: {describe_query(query)} is not in the {self.branch} prompt of row {row} ({text!r}). "
            f"It was tokenized as: " + " | ".join(shown)
        )


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))
