"""The losses of test-time latent optimisation on attention maps, as pure functions of the maps.

Every function takes head- and layer-averaged cross-attention maps of the image tokens, one row per image:
`maps` (n, W, h, w) are attention probabilities of the W token columns the control reads, and a `selector`
(n, S, W) sums the columns of each subject (a word of several tokens sums its tokens). They return one loss per
image, shape (n,), differentiable in `maps`. Definitions: docs/methods.md, "Latent optimisation on attention maps".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def smoothing_kernel(kernel_size: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """The (k, k) smoothing kernel of Attend-and-Excite's code: weights proportional to `exp(-(d / (2 sigma))^2)`
    per axis (a Gaussian of standard deviation `sigma * sqrt(2)`), normalised to sum 1. Made once per size, sigma,
    device and inference mode (the loss passes read it many times); do not modify the tensor returned."""
    return _smoothing_kernel(kernel_size, float(sigma), None if device is None else torch.device(device), torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=32)
def _smoothing_kernel(kernel_size: int, sigma: float, device: torch.device | None, inference: bool) -> torch.Tensor:
    centre = (kernel_size - 1) / 2
    d = torch.arange(kernel_size, dtype=torch.float32, device=device) - centre
    line = torch.exp(-((d / (2 * sigma)) ** 2))
    kernel = line[:, None] * line[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5, padding: int | None = None) -> torch.Tensor:
    """`maps` (..., h, w) convolved with `smoothing_kernel` after reflect padding by `padding` cells (replicate where
    the map is too small to reflect), without padding in the convolution. `padding` None: `kernel_size // 2`, same
    size out; Attend-and-Excite's code pads by 1 whatever the kernel size (the same for its kernel of 3)."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1])
    pad = kernel_size // 2 if padding is None else padding
    mode = "reflect" if min(shape[-2:]) > pad else "replicate"
    padded = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    kernel = smoothing_kernel(kernel_size, sigma, maps.device).to(maps.dtype)
    out = F.conv2d(padded, kernel[None, None])
    return out.reshape(*shape[:-2], *out.shape[-2:])


def excite_maps(maps: torch.Tensor, selector: torch.Tensor, temperature: float = 100.0, kernel_size: int = 3,
                sigma: float = 0.5, padding: int | None = None) -> torch.Tensor:
    """Attend-and-Excite's subject maps (n, S, h, w): the token probabilities renormalised over the W columns by a
    softmax of `temperature` times them, each subject's columns summed, then smoothed (`kernel_size` 1: not;
    `padding` as `smooth`). A cell where all W columns have zero probability (hidden from them, as Regions hides the
    base text inside its regions on joint attention) stays 0: the softmax would spread it evenly, 1/W a column,
    which can exceed a neglected subject's real peak and leave its loss without a gradient."""
    seen = (maps.sum(dim=1, keepdim=True) > 0).to(maps.dtype)
    renormalised = torch.softmax(maps * temperature, dim=1) * seen
    subjects = torch.einsum("nsw,nwhk->nshk", selector.to(maps.dtype), renormalised)
    return smooth(subjects, kernel_size, sigma, padding) if kernel_size > 1 else subjects


def attend_excite_loss(subject_maps: torch.Tensor) -> torch.Tensor:
    """Chefer et al. 2023, eq. 1: the most neglected subject's `max(0, 1 - max_x A_s(x))`, per image (n,)."""
    peaks = subject_maps.flatten(2).amax(dim=2)  # (n, S)
    return (1.0 - peaks).clamp(min=0.0).amax(dim=1)


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A-STAR's overlap of two maps, `sum min(a, b) / sum (a + b)` over the last two dimensions (the paper's eqs. 2-3;
    in [0, 1/2], 1/2 for equal maps)."""
    return torch.minimum(a, b).flatten(-2).sum(-1) / (a + b).flatten(-2).sum(-1).clamp(min=1e-12)


def segregation_loss(subject_maps: torch.Tensor) -> torch.Tensor:
    """A-STAR's attention segregation (Agarwal et al. 2023, eq. 2): the overlap of the maps of every pair of
    subjects, summed over the pairs; per image (n,)."""
    n, s = subject_maps.shape[:2]
    total = subject_maps.new_zeros(n)
    for i in range(s):
        for j in range(i + 1, s):
            total = total + overlap(subject_maps[:, i], subject_maps[:, j])
    return total


def binarize(subject_maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Each map cut at `threshold` times its maximum: 1.0 where it reaches it, else 0.0 (no gradient)."""
    detached = subject_maps.detach()
    peaks = detached.flatten(2).amax(dim=2)[..., None, None].clamp(min=1e-12)
    return (detached >= threshold * peaks).to(subject_maps.dtype)


def retention_loss(subject_maps: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """A-STAR's attention retention (eq. 3): `1 - overlap` of each subject's map with its binarised map of the
    previous step `previous` (n, S, h, w), summed over the subjects; per image (n,)."""
    return (1.0 - overlap(subject_maps, previous)).sum(dim=1)


def hard_box(box: tuple[float, float, float, float], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) 0/1 mask of a relative box (x0, y0, x1, y1) as Chen et al.'s code makes it at a map's grid:
    `mask[int(y0 h):int(y1 h), int(x0 w):int(x1 w)] = 1`."""
    h, w = grid
    x0, y0, x1, y1 = box
    mask = torch.zeros(h, w)
    mask[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = 1.0
    return mask


def layout_loss(per_layer: tuple[torch.Tensor, ...], masks: tuple[torch.Tensor, ...], selector: torch.Tensor) -> torch.Tensor:
    """Backward guidance of Chen, Laina, Vedaldi 2023 ("Training-Free Layout Control with Cross-Attention Guidance",
    WACV 2024; its code's `compute_ca_loss`): at each map layer, for each word and each of its tokens, the share of the
    token's attention inside the word's box per head, `act_h = sum_box A_h / sum A_h`; the token's term is
    `mean_h (1 - act_h)^2`, a word's the mean over its tokens; the loss sums the words and layers and divides by
    (words x layers). `per_layer`: each layer's (n, H, W, h, w) maps of the W columns read; `masks`: each layer's
    (S, h, w) word boxes at its grid; `selector` (n, S, W): the columns of each word. Per image (n,)."""
    total = None
    for maps, boxes in zip(per_layer, masks):
        inside = torch.einsum("nhwxy,sxy->nhws", maps, boxes.to(maps.dtype))
        mass = maps.flatten(-2).sum(-1).clamp(min=1e-12)  # (n, H, W)
        terms = ((1.0 - inside / mass[..., None]) ** 2).mean(dim=1)  # (n, W, S)
        chosen = selector.to(maps.dtype)
        per_word = torch.einsum("nsw,nws->ns", chosen, terms) / chosen.sum(-1).clamp(min=1.0)
        layer = per_word.sum(dim=1)
        total = layer if total is None else total + layer
    return total / (selector.shape[1] * len(per_layer))


def box_cells(boxes: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Per word, the flat indices of the cells of its box `boxes` (S, h, w) (a cell at least 1/2 is inside) and of
    the cells outside it, on the boxes' device. Reads the boxes on the host: make them once per call."""
    hard = (boxes >= 0.5).flatten(1).cpu()
    inside = tuple(torch.nonzero(row).flatten().to(boxes.device) for row in hard)
    outside = tuple(torch.nonzero(~row).flatten().to(boxes.device) for row in hard)
    return inside, outside


def _topk_mean(values: torch.Tensor, cells: tuple[torch.Tensor, ...], fraction: float) -> torch.Tensor:
    """Mean of the top `fraction` of `values` (n, S, P) among each word's positions `cells[s]`: the top
    `floor(fraction * count)` of them (at least one), as BoxDiff's code takes them; 0 where a word has none."""
    out = []
    for s, positions in enumerate(cells):
        if positions.numel() == 0:
            out.append(values.new_zeros(values.shape[0]))
            continue
        k = max(1, int(fraction * positions.numel()))
        out.append(values[:, s].index_select(1, positions).topk(k, dim=1).values.mean(dim=1))
    return torch.stack(out, dim=1)


def edge_bands(inside: torch.Tensor, width: int) -> torch.Tensor:
    """(S, L) float: 1 within `width` cells of each word's box edges on one axis, else 0. `inside` (S, L) is the
    box's indicator on that axis; its edges are the first cell inside and the first cell past the last one (the
    indices of BoxDiff's box corners), each widened by `width` on both sides and clipped to the axis."""
    bands = torch.zeros_like(inside)
    length = inside.shape[1]
    for s in range(inside.shape[0]):
        cells = torch.nonzero(inside[s] > 0.5).flatten().tolist()
        if not cells:
            continue
        for edge in (cells[0], cells[-1] + 1):
            bands[s, max(edge - width, 0) : min(edge + width + 1, length)] = 1.0
    return bands


def boxdiff_loss(subject_maps: torch.Tensor, boxes: torch.Tensor, constraints: tuple[str, ...], fraction: float = 0.2,
                 corner_width: int = 1, bands: tuple[torch.Tensor, torch.Tensor] | None = None,
                 cells: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """BoxDiff's constraints (Xie et al. 2023, "BoxDiff: Text-to-Image Synthesis with Training-Free Box-Constrained
    Diffusion", ICCV), on Attend-and-Excite's subject maps (`excite_maps`: renormalised over the text tokens,
    smoothed) and each word's box `boxes` (S, h, w) (0 / 1: BoxGuidance gives BoxDiff's rectangle; a soft box counts a
    cell inside where it is at least 1/2):

    - `inner`: `max(0, 1 - mean of the top fraction of the map inside the box)`;
    - `outer`: the mean of the top fraction of the map outside the box;
    - `corner`: the map's maximum over rows (its projection onto x) against the box's projection, absolute
      differences kept within `corner_width` cells of the box's left and right edges and averaged over the whole
      axis; the same on y.

    Summed over the constraints and words; per image (n,). `bands` (`edge_bands` of the boxes on x and y) and
    `cells` (`box_cells(boxes)`): when the caller made them once (they are constant for a control; `box_cells` reads
    the boxes on the host)."""
    flat = subject_maps.flatten(2)
    hard = (boxes >= 0.5).to(subject_maps.dtype)
    total = subject_maps.new_zeros(subject_maps.shape[0], subject_maps.shape[1])
    inside, outside = cells if cells is not None else box_cells(boxes)
    if "inner" in constraints:
        total = total + (1.0 - _topk_mean(flat, inside, fraction)).clamp(min=0.0)
    if "outer" in constraints:
        total = total + _topk_mean(flat, outside, fraction)
    if "corner" in constraints:
        on_x, on_y = hard.amax(dim=1), hard.amax(dim=2)  # (S, w), (S, h)
        band_x, band_y = bands if bands is not None else (edge_bands(on_x, corner_width), edge_bands(on_y, corner_width))
        total = total + ((subject_maps.amax(dim=2) - on_x).abs() * band_x).mean(-1)
        total = total + ((subject_maps.amax(dim=3) - on_y).abs() * band_y).mean(-1)
    return total.sum(dim=1)
