"""Token-grounding losses for training the toy-shapes model (optional, ``--ground-token-weight`` / ``--ground-pixel-weight``).

TokenCompose (Wang et al., CVPR 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision") adds
two losses on the UNet's cross-attention maps to the denoising loss, for every caption word with a known object mask:

- token loss: ``(1 - sum_{u in M} A[u] / sum_u A[u])^2``, the squared share of the word's attention mass outside its object;
- pixel loss: the binary cross-entropy between the word's attention probability at each query position ``A[u]``
  and the object mask ``M[u]``.

``A`` is the softmax probability of the word's key column for each image query, averaged over the heads. Here
the mask is the object's coverage area-averaged to each attention grid (8x8, 4x4), so the pixel loss takes soft
targets; the grounded words are each named object's colour and shape words. Only training uses this: the
exported model is a standard ``UNet2DConditionModel`` and runs with any attention processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data as toy_data

#: Objects a caption names at most (two-object captions).
MAX_OBJECTS = 2


def grounding_targets(samples: list[toy_data.Sample], grid: int = 8,
                      kinds: tuple[str, ...] = tuple(toy_data.KIND_WEIGHTS)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the token indices of each named object's colour and shape words and the object's coverage.

    Returns ``tokens`` (n, MAX_OBJECTS, 2) long, -1 where a caption names fewer objects or its sample's kind is
    not in ``kinds``, and ``masks`` (n, MAX_OBJECTS, grid, grid) float, the object's pixel coverage area-averaged
    to ``grid`` (coarser grids are area averages of it).
    """
    size = toy_data.IMAGE_SIZE
    if size % grid:
        raise ValueError(f"grid {grid} must divide the image size {size}")
    unknown = sorted(set(kinds) - set(toy_data.KIND_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown sample kinds {unknown}; expected some of {tuple(toy_data.KIND_WEIGHTS)}")
    tokens = torch.full((len(samples), MAX_OBJECTS, 2), -1, dtype=torch.long)
    masks = torch.zeros(len(samples), MAX_OBJECTS, grid, grid)
    for i, sample in enumerate(samples):
        if sample.kind not in kinds:
            continue
        for k, (shape, color_word, shape_word) in enumerate(toy_data.named_objects(sample)):
            half = shape.size / 2
            box = (shape.cx - half, shape.cy - half, shape.cx + half, shape.cy + half)
            alpha = toy_data.render_alpha(shape.shape, box)
            tokens[i, k] = torch.tensor([color_word + 1, shape_word + 1])  # + the start token
            masks[i, k] = torch.from_numpy(alpha.reshape(grid, size // grid, grid, size // grid).mean(axis=(1, 3)))
    return tokens, masks


class RecordingCrossAttnProcessor:
    """Eager cross-attention that keeps its head-averaged probabilities (batch, queries, keys) for the losses."""

    def __init__(self, sink: list[torch.Tensor]) -> None:
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        extras = (attn.norm_cross, attn.group_norm, attn.spatial_norm, attn.residual_connection, attn.rescale_output_factor != 1)
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3 or any(extras):
            raise ValueError("the recording processor handles the toy UNet's plain, unmasked cross-attention only "
                             "(no norms, residual or output rescaling in the Attention module)")
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        self.sink.append(probs.unflatten(0, (-1, attn.heads)).mean(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def record_cross_attention(unet) -> list[torch.Tensor]:
    """Give every cross-attention layer of ``unet`` a recording processor; returns the list they append to."""
    sink: list[torch.Tensor] = []
    processors = {name: (RecordingCrossAttnProcessor(sink) if name.endswith("attn2.processor") else proc)
                  for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    return sink


def grounding_losses(maps: list[torch.Tensor], tokens: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and pixel losses, averaged over every recorded layer and grounded word.

    ``maps``: (batch, side * side, keys) per layer; ``tokens`` (batch, MAX_OBJECTS, 2); ``masks``
    (batch, MAX_OBJECTS, grid, grid) with every layer's side dividing ``grid``.
    """
    valid = tokens >= 0  # (b, o, 2)
    if not bool(valid.any()):
        zero = maps[0].sum() * 0
        return zero, zero
    b_idx, o_idx, w_idx = valid.nonzero(as_tuple=True)
    token_terms, pixel_terms = [], []
    for probs in maps:
        side = int(round(probs.shape[1] ** 0.5))
        level_masks = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (b, o, side * side)
        word_maps = probs[b_idx, :, tokens[b_idx, o_idx, w_idx]]  # (words, side * side)
        target = level_masks[b_idx, o_idx]
        inside = (word_maps * target).sum(-1) / word_maps.sum(-1).clamp_min(1e-8)
        token_terms.append((1.0 - inside).pow(2).mean())
        pixel_terms.append(F.binary_cross_entropy(word_maps.clamp(1e-6, 1 - 1e-6), target))
    return torch.stack(token_terms).mean(), torch.stack(pixel_terms).mean()

