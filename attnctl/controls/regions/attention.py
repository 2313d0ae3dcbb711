"""What region control does inside attention layers (docs/methods.md "Regions").

Cross-attention (UNet, PixArt): a `LayerHook.attend` computes the base attention as the layer would, one
attention per region over that region's own text keys (projected with the layer's own `to_k` / `to_v`),
and blends on the cond rows

    out(x) = (1 - (1-b) M(x)) Attn(q_x, base) + (1-b) sum_r m_r(x) Attn(q_x, region r).

Region attentions are batched; each region only computes the queries where its weight is nonzero
(gathered, padded per chunk), and chunks are sized so that memory stays about that of one attention output
whatever the number of regions.

Joint attention (SD3 `[image; text]`, Flux `[text; image]`): the region prompts' tokens are appended after the
base text (`RegionsBound.transform_inputs`), and one masked softmax, expressed as token labels plus an allow
table (`LabelMask`), applies the rules of docs/methods.md; the image outputs are then blended with the unmasked base
attention (over image + base text) by the base ratio. See `joint_table` for the rules and `JointHook` for
the soft-mask semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


# -- region keys and values in a cross-attention layer ---------------------------------------------------------------
@dataclass(frozen=True)
class RegionChunk:
    """Regions `start:stop`, each with the query cells where its weight is nonzero, padded to one length."""

    start: int
    stop: int
    index: torch.Tensor  # (C, S) int64 cell indices (padding: 0)
    weight: torch.Tensor  # (C, S) float: m_r at those cells (padding: 0)


def region_chunks(weights: torch.Tensor, budget: int) -> tuple[RegionChunk, ...]:
    """Group regions into chunks whose padded query count C * S stays within `budget` (at least one region each)."""
    supports = [torch.nonzero(w > 0).flatten() for w in weights]
    chunks: list[RegionChunk] = []
    start = 0
    while start < len(supports):
        stop, longest = start + 1, len(supports[start])
        while stop < len(supports) and (stop + 1 - start) * max(longest, len(supports[stop])) <= budget:
            longest = max(longest, len(supports[stop]))
            stop += 1
        width = max(longest, 1)
        index = torch.zeros(stop - start, width, dtype=torch.long)
        weight = torch.zeros(stop - start, width, dtype=weights.dtype)
        for row, r in enumerate(range(start, stop)):
            cells = supports[r]
            index[row, : len(cells)] = cells
            weight[row, : len(cells)] = weights[r, cells]
        chunks.append(RegionChunk(start, stop, index, weight))
        start = stop
    return tuple(chunks)


@dataclass(frozen=True)
class JointSequence:
    """Token layout of a joint layer with region text appended after the base text."""

    image_len: int
    base_len: int
    region_lens: tuple[int, ...]
    text_first: bool

    @property
    def text_len(self) -> int:
        return self.base_len + sum(self.region_lens)

    @property
    def length(self) -> int:
        return self.image_len + self.text_len

    @property
    def image_slice(self) -> slice:
        start = self.text_len if self.text_first else 0
        return slice(start, start + self.image_len)

    @property
    def text_start(self) -> int:
        return 0 if self.text_first else self.image_len

    def region_slice(self, r: int) -> slice:
        start = self.text_start + self.base_len + sum(self.region_lens[:r])
        return slice(start, start + self.region_lens[r])

    def base_spans(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Image and base-text positions as (start, stop) spans, in sequence order (the stock sequence)."""
        image = (self.image_slice.start, self.image_slice.stop)
        text = (self.text_start, self.text_start + self.base_len)
        return (text, image) if self.text_first else (image, text)

    def base_positions(self) -> torch.Tensor:
        """Image and base-text positions, in sequence order (the stock sequence)."""
        return torch.cat([torch.arange(start, stop) for start, stop in self.base_spans()])

    def labels(self, image_labels: torch.Tensor, regions: int, cond: bool) -> torch.Tensor:
        """(S,) labels: image `image_labels` (0 background, r+1 region r); base text R+1; region r text R+2+r;
        hidden text 2R+2.

        Rows that are not cond rows get hidden region text (see `joint_table`); their image labels are the
        regions' only when isolation needs them (the caller passes zeros otherwise).
        """
        labels = torch.empty(self.length, dtype=torch.long)
        labels[self.image_slice] = image_labels
        labels[self.text_start : self.text_start + self.base_len] = regions + 1
        for r in range(len(self.region_lens)):
            labels[self.region_slice(r)] = regions + 2 + r if cond else 2 * regions + 2
        return labels


def isolation_table(subjects: tuple[bool, ...], strength: float) -> torch.Tensor:
    """(R+1, R+1) additive bias between image labels: -strength between two different subject regions."""
    regions = len(subjects)
    table = torch.zeros(regions + 1, regions + 1)
    for a in range(regions):
        for b in range(regions):
            if a != b and subjects[a] and subjects[b]:
                table[a + 1, b + 1] = -strength
    return table


def joint_table(subjects: tuple[bool, ...], isolate: bool, strength: float, rule: str = "open") -> torch.Tensor:
    """(2R+3, 2R+3) allow table of the masked joint softmax (0 allowed, -inf masked, -strength isolation).

    - an image token of region r (label r+1) attends to every image token and to region r's text;
    - a background image token (label 0) attends to every image token and to the base text;
    - the base text (R+1) attends to itself and every image token;
    - region r's text (R+2+r) attends to itself and to region r's image tokens;
    - hidden text (2R+2: the region tokens of uncond rows) attends only to hidden text, and nothing attends to it.

    With `isolate`, image tokens of two different subject regions get -strength between them. `rule="chen"` (Chen et
    al.'s code): an image token attends only to the image tokens of its own label (background with background), and
    a background token to no text.
    """
    regions = len(subjects)
    size = 2 * regions + 3
    table = torch.full((size, size), NEG_INF)
    image = slice(0, regions + 1)
    table[image, image] = isolation_table(subjects, strength) if isolate else 0.0
    base = regions + 1
    if rule == "chen":
        same = torch.eye(regions + 1, dtype=torch.bool)
        table[image, image] = torch.where(same, table[image, image], torch.full_like(table[image, image], NEG_INF))
    else:
        table[0, base] = 0.0
    table[base, image] = 0.0
    table[base, base] = 0.0
    for r in range(regions):
        text = regions + 2 + r
        table[r + 1, text] = 0.0
        table[text, r + 1] = 0.0
        table[text, text] = 0.0
    table[size - 1, size - 1] = 0.0
    return table


def base_table(subjects: tuple[bool, ...], isolate: bool, strength: float) -> torch.Tensor:
    """The allow table of the unmasked base attention (image + base text) in the joint label space: the blend's base
    attention, the rows that are not cond rows (their region text, if any, hidden), and isolation without region
    prompts."""
    regions = len(subjects)
    size = 2 * regions + 3
    table = torch.full((size, size), NEG_INF)
    image = slice(0, regions + 1)
    table[image, image] = isolation_table(subjects, strength) if isolate else 0.0
    table[image, regions + 1] = 0.0
    table[regions + 1, image] = 0.0
    table[regions + 1, regions + 1] = 0.0
    table[size - 1, size - 1] = 0.0
    return table


