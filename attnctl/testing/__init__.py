"""Offline test fixtures and embedded demo models: tiny pipelines with whole-word tokenizers."""

from __future__ import annotations

from .new_families import NEW_TINY_MODELS
from .pipelines import (
    CALL_DEFAULTS,
    TINY_MODELS,
    make_tiny_pipeline,
    tiny_flux,
    tiny_pixart,
    tiny_sd,
    tiny_sd3,
    tiny_sd_controlnet,
    tiny_sdxl,
)
from .tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer, write_clip_tokenizer
from .vocabulary import MULTI_TOKEN_WORD, WORDS

__all__ = [
    "CALL_DEFAULTS", "MULTI_TOKEN_WORD", "NEW_TINY_MODELS", "TINY_MODELS", "WORDS", "make_tiny_pipeline", "tiny_clip_tokenizer",
    "tiny_flux", "tiny_pixart", "tiny_sd", "tiny_sd3", "tiny_sd_controlnet", "tiny_sdxl", "tiny_t5_tokenizer", "write_clip_tokenizer",
]
