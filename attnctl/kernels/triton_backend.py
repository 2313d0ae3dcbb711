"""The `triton` backend: which of attnctl's Triton kernels a call runs (registered in `kernels/__init__.py`).

- `triton_attention.py`: flash attention (FlashAttention-2, Dao 2023) with per-key bias and value scale on a
  query range, label masks, 2-D windows or a 1-D band, log-sum-exp output;
- `triton_labels.py`: label masks with the tokens grouped by label, skipping fully masked tiles;
- `triton_sparse.py`: PLADIS's dense and alpha-entmax outputs of the same logits.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from . import sdpa, triton_attention, triton_labels, triton_sparse
from .semantics import labels_for_batch
from .spec import AttentionSpec


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered `triton` backend: plain calls (no control, or only the model's own mask) are torch
    SDPA's, which is what the kernels would compute and the fastest way to do it; label masks without a
    window or PLADIS go to the grouped label kernel (`triton_labels`); the rest runs here."""
    launcher = launcher_for(spec)
    if launcher is None:
        return sdpa.attention(q, k, v, spec)
    if spec.labels is not None:  # labels every row shares (one row): per batch row, as the kernels read them
        spec = dataclasses.replace(spec, labels=labels_for_batch(spec.labels, q.shape[0]))
    return launcher.attention(q, k, v, spec)


def launcher_for(spec: AttentionSpec) -> ModuleType | None:
    """The launcher module whose `attention` (and `launch`) computes `spec`; None for SDPA's plain path."""
    if spec.is_plain and not spec.return_lse:
        return None
    if triton_labels.supports(spec):
        return triton_labels
    if spec.sparse is not None:
        return triton_sparse
    return triton_attention


def kernel_for(features: tuple[str, ...]) -> str | None:
    """The kernel `attention` runs for a call with `features` (None: SDPA's plain path)."""
    wanted = set(features)
    if "sparse" in wanted:
        return "_sparse_attn_fwd"
    if not wanted - {"attn_mask"}:
        return None
    if "labels" in wanted and "window" not in wanted:
        return "_label_attn_fwd"
    return "_attn_fwd"
