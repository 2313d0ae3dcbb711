"""An offline byte-level BPE tokenizer in the Qwen2 format (`Qwen2Tokenizer`) whose vocabulary holds whole words.

The nearest honest substitute of Qwen2.5-VL's tokenizer that can be built without the hub: the same byte-level
alphabet and pre-tokenizer, the chat special tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`), and a
vocabulary in which every word of `attnctl.testing.WORDS` is one token with or without its leading space
(`Ġcat` and `cat`); any other text splits into smaller pieces, down to single bytes.
"""

from __future__ import annotations

from functools import lru_cache

from ..tokens import bytes_to_unicode
from .vocabulary import WORDS

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(word)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), 1 << 30))
        if (parts[best], parts[best + 1]) not in ranks:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


@lru_cache(maxsize=2)
def qwen_vocabulary(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """vocab and merges (pairs) of a byte-level BPE in which each of `words`, bare or after a space, is one token."""
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    space = bytes_to_unicode()[ord(" ")]
    for word in words:
        for form in (word, space + word):
            while True:
                parts = _bpe(form, ranks)
                if len(parts) == 1:
                    break
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    return vocab, tuple(merges)


def qwen_vocab_size(words: tuple[str, ...] = WORDS) -> int:
    return len(qwen_vocabulary(tuple(words))[0])


def tiny_qwen_tokenizer(words: tuple[str, ...] = WORDS):
    """A `Qwen2Tokenizer` built offline (see the module docstring)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocabulary(tuple(words))
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer
