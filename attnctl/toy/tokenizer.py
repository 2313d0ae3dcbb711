"""An offline CLIP tokenizer in which every caption word is a single token.

The vocabulary follows CLIP's layout: 256 byte-level symbols, the same 256 with
the end-of-word marker ``</w>``, one entry per BPE merge, then
``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token, as in SD 1.x).

Merges are built by running BPE on each word with the merges found so far and
appending a merge of the first remaining pair until the word is one symbol.
Appending (lowest priority) never splits a word that is already whole, so the
loop ends with every word a single token, which a naive chain of whole-word
merges does not guarantee (merges learnt for ``top`` split ``bottom``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..tokens import bytes_to_unicode

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def word_symbols(word: str) -> list[str]:
    """A word as its initial BPE symbols: byte-level characters, the last one with ``</w>``."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word; returns its symbols."""
    symbols = word_symbols(word)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        best = min(r for r, _ in pairs)
        first, second = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word in ``words`` is exactly one symbol."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        while len(symbols := bpe(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP-layout vocabulary for the given merges."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def save_tokenizer_files(directory: str | Path, words: Iterable[str]) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    merges = build_merges(words)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return out


def load_tokenizer(directory: str | Path):
    """Load the saved tokenizer with the standard ``CLIPTokenizer.from_pretrained`` (offline)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


def make_tokenizer(directory: str | Path, words: Iterable[str] | None = None):
    """Write the tokenizer files for ``words`` (default: the toy vocabulary), load and verify them."""
    if words is None:
        from .data import VOCAB_WORDS

        words = VOCAB_WORDS
    words = list(words)
    save_tokenizer_files(directory, words)
    tok = load_tokenizer(directory)
    bad = single_token_violations(tok, words)
    if bad:
        raise RuntimeError(f"words that are not a single token: {bad}")
    return tok


def single_token_violations(tokenizer, words: Iterable[str]) -> dict[str, list[int]]:
    """Words whose tokenization (without specials) is not exactly one id, with the ids they got."""
    bad: dict[str, list[int]] = {}
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            bad[w] = list(ids)
    return bad
