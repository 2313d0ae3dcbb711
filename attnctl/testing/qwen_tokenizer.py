"""An offline byte-level BPE tokenizer in the Qwen2 format (`Qwen2Tokenizer`) whose vocabulary holds whole words.

The nearest honest substitute of Qwen2.5-VL's tokenizer that can be built without the hub: the same byte-level
alphabet and pre-tokenizer, the chat special tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`), and a
vocabulary in which every word of `attnctl.testing.WORDS` is one token with or without its leading space
(`Ġcat` and `cat`); any other text splits into smaller pieces, down to single bytes.
"""

from __future__ import annotations

from functools import lru_cache

from ..tokens import bytes_to_unicode
from .tokenizers import learn_merges
from .vocabulary import WORDS

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@lru_cache(maxsize=2)
def qwen_vocabulary(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """vocab and merges (pairs) of a byte-level BPE in which each of `words`, bare or after a space, is one token."""
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    space = bytes_to_unicode()[ord(" ")]
    merges = learn_merges([list(form) for word in words for form in (word, space + word)], vocab)
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
