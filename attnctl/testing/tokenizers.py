"""Offline tokenizers whose vocabulary holds whole English words (see `vocabulary.py`)."""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache

from ..tokens import bytes_to_unicode
from .vocabulary import WORDS


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(pieces)
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), 1 << 30))
        if (parts[best], parts[best + 1]) not in ranks:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def learn_merges(forms: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that make each form (its initial pieces) one token, added to `vocab` as they are
    made. A merge joins the first two pieces a form still splits into, so forms already whole are never split."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for pieces in forms:
        while True:
            parts = _bpe(pieces, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    return merges


def clip_vocabulary(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges for a CLIP BPE tokenizer in which every word of `words` is one token.

    Merges are added until every word is a single token: a merge joins the first two pieces a word still
    splits into, so words already whole are never split again.
    """
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    merges = learn_merges([list(word[:-1]) + [word[-1] + "</w>"] for word in words], vocab)
    return vocab, merges


def write_clip_tokenizer(directory: str, words: tuple[str, ...] = WORDS, pad_token: str = "<|endoftext|>") -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json of a tiny CLIP tokenizer to `directory`."""
    vocab, merges = clip_vocabulary(words)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


@lru_cache(maxsize=4)
def _clip_files(words: tuple[str, ...], pad_token: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as directory:
        write_clip_tokenizer(directory, words, pad_token)
        return {name: open(os.path.join(directory, name), encoding="utf-8").read() for name in os.listdir(directory)}


def tiny_clip_tokenizer(words: tuple[str, ...] = WORDS, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer built offline (model_max_length 77) whose vocabulary holds `words` as single tokens."""
    from transformers import CLIPTokenizer

    files = _clip_files(tuple(words), pad_token)
    with tempfile.TemporaryDirectory() as directory:
        for name, text in files.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(text)
        return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def tiny_t5_tokenizer(words: tuple[str, ...] = WORDS, model_max_length: int = 512):
    """A T5Tokenizer (unigram) built offline: every word of `words` is one piece; others split into pieces."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -1.0) for word in words]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?:;'\"()[]-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def clip_vocab_size(words: tuple[str, ...] = WORDS) -> int:
    return len(clip_vocabulary(words)[0])


def t5_vocab_size(words: tuple[str, ...] = WORDS) -> int:
    return 4 + len(words) + len("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?:;'\"()[]-")
