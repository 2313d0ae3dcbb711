"""Self-Attention Guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance", ICCV 2023, arXiv:2210.00939), as diffusers' `StableDiffusionSAGPipeline` does it.

In the first forward the self-attention map of one layer is captured for the rows SAG degrades (the uncond
rows with CFG, the cond rows without it, as the SAG pipeline). The mask is the head-averaged attention each
image token *receives* (summed over the image queries) above 1, upsampled to the latent (nearest). The
predicted x0 of those rows is blurred inside the mask (Gaussian, kernel 9, sigma 1, reflect padding),
re-noised with their own predicted noise to the current level, and the denoiser runs a second time on it
with the same rows' conditioning. `scale (pred - degraded)` is added after CFG, to every combined row.

x0 comes from epsilon, v and sample predictions (alphas_cumprod at the timestep, or a scheduler's sigma)
and from flow-matching velocity. Everything is computed in the space of the denoiser's input: for
Euler-type schedulers that input is `x / sqrt(sigma^2 + 1)` (`scale_model_input`), i.e. variance preserving
with `alpha_bar = 1 / (1 + sigma^2)`, so the scaling is undone and re-applied implicitly and exactly.

Layers: UNet `mid_block.attentions.0.transformer_blocks.0.attn1` (as the SAG pipeline); for DiTs,
which SAG predates, the layer PAG perturbs by default (SD3 `transformer_blocks.1.attn`, PixArt
`transformer_blocks.1.attn1`, Flux the middle double block). In joint attention the map is the image x
image block of the softmax, renormalised per image query over the image keys (so that "received > 1" still
means "above the average key"; the text keys' share would otherwise empty the mask). With separate cond /
uncond calls (Flux true CFG) the uncond prediction is not available during the cond call, so the cond rows
are degraded. With several denoiser experts (Wan 2.2 A14B) SAG reads one layer per expert (default: each expert's
middle `attn1`), and each step's map comes from the layer of the expert that runs it.

Video (Wan: frames x height x width tokens, frame-major): the map is the layer's own self-attention over every
video token (the attention a token receives from all queries of the video, head-averaged; "above 1" still means
above the average key, as every query row sums to 1). The mask is that map per token frame, upsampled (nearest) to
each latent frame, and the blur is SAG's 2-D Gaussian within each latent frame (no blur across frames: the paper's
degradation is spatial).

A diffusers cache that can leave the map layer unrun at a step (an attention-output cache on it, a block cache that can
skip its block) is refused at apply and at each call (`refuse_caches`); FirstBlockCache's first block always runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...control import Bound, Control
from ...denoiser_call import DenoiserCall, RowLayout, RowPlan, SecondPass
from ...errors import CallLayoutError, SelectionError, UnsupportedError
from ...families.base import Canvas, LayerInfo, ModelAdapter
from ...foreign_patches import cache_removal_hint, layer_cache
from ...kernels.chunks import row_chunks
from ...kernels.semantics import block_logits, probabilities, spec_rows
from ...noise import noise_level, require_noise_level
from ...processors.chain import own_rows, token_layout
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, select_layers, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from ..common import RowIndex, keep_kinds
from .common import PERTURBABLE_KINDS, new_tag
from .seg import gaussian_kernel1d

MASK_THRESHOLD = 1.0  # attention received above this is "salient" (the SAG pipeline's `> 1.0`)
BLUR_KERNEL = 9
BLUR_SIGMA = 1.0
QUERY_CHUNK = 1024  # query rows per chunk when measuring received attention (bounded memory)
#: At most this many elements per (B, H, rows, keys) tensor of a chunk (1 GiB in float32; several are alive at once):
#: at video sizes 1024 rows alone would be tens of GiB (Wan 14B at 720p, 81 frames: 2 x 40 x 1024 x 75,600).
CHUNK_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class SAG(Control, type_name="sag"):
    """Self-attention guidance (Hong et al. 2023).

    scale: `s_sag` (0: off; 0.75 as the SAG pipeline). layer: the one self- / joint attention layer whose map
    drives the mask (default: see the module docstring); on a pipeline with several denoiser experts (Wan 2.2 A14B)
    one layer per expert, a selector or a sequence of them (`"blocks.1.attn1"` names that layer of each expert), and the
    map is read from the layer of the expert that runs the step (an expert without one gets no SAG). steps: the
    step window.
    """

    #: images and video: on a (frames, height, width) grid the mask is per token frame and the blur per latent frame
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)
    needs: ClassVar[tuple[str, ...]] = ("extra_rows", "second_pass")  # a second forward of degraded rows

    scale: float = 0.75
    layer: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None

    def __post_init__(self) -> None:
        set_field(self, "scale", number(self.scale, "SAG.scale", minimum=0))
        blank = isinstance(self.layer, str) and not self.layer.strip()
        if blank or not (self.layer is None or isinstance(self.layer, (str, tuple, list))):
            raise SelectionError(
                "SAG.layer must be None, one layer selector such as 'mid_block.attentions.0.transformer_blocks.0.attn1', or "
                f"selectors of one layer per denoiser expert, got {self.layer!r}"
            )
        set_field(self, "layer", validate_layers(self.layer, name="SAG.layer"))
        set_field(self, "steps", validate_steps(self.steps, name="SAG.steps"))

    def default_layers(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """The first self- / joint attention layer of PAG's default layers: UNet
        `mid_block.attentions.0.transformer_blocks.0.attn1` (the SAG pipeline's), SD3 `transformer_blocks.1.attn`,
        PixArt `transformer_blocks.1.attn1`, Flux the middle double block's `attn`; with several experts (Wan 2.2
        A14B), that layer of each expert (its middle block's `attn1`)."""
        layers = select_layers(adapter.layers, None, default=adapter.perturbed_layers(), owner="SAG")
        first: dict[str | None, str] = {}
        for layer in layers:
            if layer.kind in PERTURBABLE_KINDS:
                first.setdefault(layer.parts[0] if adapter.experts else None, layer.name)
        return tuple(first.values())

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        selection = self.layer or self.default_layers(adapter)
        layers = select_layers(adapter.layers, selection, default=None, owner="SAG")
        layers = keep_kinds(layers, PERTURBABLE_KINDS, "SAG", "self- or joint attention", selection)
        per_expert: dict[str | None, list[str]] = {}
        for layer in layers:
            per_expert.setdefault(layer.parts[0] if adapter.experts else None, []).append(layer.name)
        for expert, names in per_expert.items():
            if len(names) != 1:
                where = "" if expert is None else f" of expert {expert}"
                each = "" if expert is None else " per expert"
                raise SelectionError(
                    f"SAG: layer {selection!r} matches {len(names)} self-attention layers{where}; it needs exactly one{each}: {names}"
                )
        return layers

    def validate_for(self, adapter: ModelAdapter) -> None:
        refuse_caches(self, adapter, self.select(adapter))

    def bind(self, context) -> _SAGBound:
        return _SAGBound(self, context)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"capture" on the layer whose self-attention map it reads (none while scale is 0)."""
        return ("capture",) if self.scale > 0 else ()


def refuse_caches(control: SAG, adapter: ModelAdapter, layers: tuple[LayerInfo, ...]) -> None:
    """SAG's mask is its layer's self-attention map at every step it acts on: a diffusers cache that can leave that
    layer unrun at a step (an attention-output cache on it, a block cache that can skip its block) is refused, at apply
    and at each call (a cache enabled after apply). Before, the call failed part-way ("did not run in this denoiser
    call"), not naming the cache. FirstBlockCache's first block always runs: a layer there composes."""
    if control.scale == 0:
        return
    for layer in layers:
        path = layer.name.split(".", 1)[1] if adapter.experts else layer.name  # behind the expert's attribute
        cache = layer_cache(adapter.expert_of(layer), path)
        if cache is not None:
            raise UnsupportedError(
                f"attnctl: SAG reads the self-attention map of {layer.name} at every step it acts on, and diffusers' "
                f"{cache}: the map would be missing there. Leave SAG out, or under FirstBlockCache give SAG a layer of "
                "the first transformer block (SAG(layer=...)), which always runs, or take the cache off: "
                f"{cache_removal_hint(adapter.expert_of(layer), adapter.expert_name(adapter.expert_of(layer)))}"
            )


class _SAGBound(Bound):
    layers_only = True  # its degraded pass runs only where the expert holding its layer runs

    def __init__(self, control: SAG, context):
        super().__init__(control, context.layers, control.steps)
        self.tag = new_tag("sag")
        self.adapter = context.adapter
        self.scheduler = getattr(context.pipeline, "scheduler", None)
        self._edits: dict[tuple[int, ...], Edit] = {}  # per rows SAG degrades
        self.index = RowIndex()
        self.received: torch.Tensor | None = None
        self.received_frame: int | None = None
        self.grid: tuple[int, int, int] | None = None  # (frames, height, width) of the captured map; frames 1 on images
        #: the experts whose calls get SAG (None: one denoiser), each reading its own layer's map
        self.experts = self.adapter.layer_experts(layer.name for layer in self.layers)
        if control.scale > 0:  # the degraded input is made at the call's noise level: refused here, not mid-call
            require_noise_level(self.scheduler, "attnctl: SAG")
        refuse_caches(control, self.adapter, self.layers)  # a cache enabled after apply

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if self.control.scale == 0 or frame.extra_pass is not None:
            return None
        if not frame.rows.indices("cond", None):
            # no map here: another guidance's separate pass (PAG / SEG `separate=True`) of the same frame, which must
            # not drop the map the frame's main forward left
            return None
        # the map this frame's capture will leave: asked once per frame, before the layer runs (eagerly, also when the
        # denoiser is compiled), so the hook never reads the frame number (a compiled hook would guard on it per frame)
        self.received, self.received_frame = None, frame.number
        source = degraded_rows(frame.rows)
        found = self._edits.get(source)
        if found is None:
            found = self._edits[source] = Edit(hooks=(CaptureReceived(self, source),))
        return found

    def row_plan(self, frame: DenoiserCall) -> RowPlan | None:
        if self.control.scale == 0 or (self.experts is not None and frame.expert not in self.experts):
            return None
        return RowPlan(second=(SecondPass(self.tag, self.term),))

    def term(self, first) -> torch.Tensor:
        frame = first.frame
        rows = frame.rows
        source = degraded_rows(rows)
        if self.received is None or self.received_frame != frame.number:
            layer = next((l.name for l in self.layers if self.experts is None or l.parts[0] == frame.expert), self.layers[0].name)
            raise CallLayoutError(f"SAG: layer {layer} did not run in this denoiser call; no attention map")
        received, self.received = self.received, None
        sample = first.inputs[first.main_input]
        received = received.to(sample.device)  # made on the layers' device: another one under a pipeline-level device map
        sample = sample.index_select(0, self.index(source, sample.device))
        prediction = first.prediction.index_select(0, self.index(source, first.prediction.device))
        timestep = (frame.inputs or {}).get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim >= 2:  # per token (Wan 2.2 TI2V): the rows' own
            timestep = timestep.index_select(0, self.index(source, timestep.device))
        degraded = degrade(sample, prediction, received, self.grid, frame.canvas, self.adapter, self.scheduler, timestep)
        inputs = first.select(source)
        inputs[first.main_input] = degraded.to(sample.dtype)
        again = first.forward(inputs, RowLayout(tuple(rows.rows[i] for i in source)), self.tag)
        term = self.control.scale * (prediction - again)
        return match_cond_rows(term, rows, source, self.index)

    def finish(self) -> None:
        self.received = None
        self.index.clear()


def degraded_rows(rows: RowLayout) -> tuple[int, ...]:
    """The rows SAG degrades: the uncond rows with CFG, else the (untagged) cond rows."""
    return rows.indices("uncond", None) or rows.indices("cond", None)


def match_cond_rows(term: torch.Tensor, rows: RowLayout, source: tuple[int, ...], index: RowIndex | None = None) -> torch.Tensor:
    """`term` (one per row of `source`) re-ordered to the untagged cond rows, matched by prompt row."""
    where = {rows.rows[i].prompt: n for n, i in enumerate(source)}
    order = [where[rows.rows[i].prompt] for i in rows.indices("cond", None)]
    if order == list(range(term.shape[0])):
        return term
    return term.index_select(0, (index or RowIndex())(order, term.device))


class CaptureReceived(LayerHook):
    """Measures, for the rows SAG degrades, the head-averaged attention each image token receives.

    `source`: those rows' positions in the frame's batch, found by the edit (eagerly), so that a compiled processor
    never reads the row layout; inside another hook's restricted rows they are mapped to the rows' own positions
    there (`processors.chain.own_rows`: Prompt-to-Prompt's copies of the edited rows are not the pipeline's rows)."""

    def __init__(self, bound: _SAGBound, source: tuple[int, ...] = ()):
        self.bound = bound
        self.source = source

    def attend(self, call: AttentionCall, q, k, v, spec, compute):
        out, lse = compute(q, k, v, spec)
        if token_layout(call).sub:  # a sub-attention an outer hook runs: not the layer's map
            return out, lse
        source = own_rows(call, self.source)  # inside another hook's restricted rows: their own, never its copies
        if torch.compiler.is_compiling():  # a constant of the graph: no lookup in the index cache to guard on
            index = torch.tensor(source, dtype=torch.long, device=q.device)
        else:
            index = self.bound.index(source, q.device)
        image = call.geometry.image_slice if call.layer.text in ("first", "last") else slice(0, q.shape[2])
        if image.stop > q.shape[2] or (call.layer.text == "none" and q.shape[2] != call.geometry.image_len):
            raise UnsupportedError(
                f"attnctl: SAG at {call.layer.name} got {q.shape[2]} tokens for its {call.geometry.image_hw[0]}x"
                f"{call.geometry.image_hw[1]} grid: another control on this layer changed the tokens (token reduction); "
                "give SAG another layer"
            )
        self.bound.received = received_attention(
            q.index_select(0, index), k.index_select(0, index), spec_rows(spec, index, q.shape[0]), image
        )
        self.bound.grid = (call.geometry.frames, *call.geometry.image_hw)
        return out, lse


def received_attention(q: torch.Tensor, k: torch.Tensor, spec, image: slice) -> torch.Tensor:
    """`mean_heads(A)[image queries, image keys].sum(queries)`: (B, N) in float32, A the softmax of the call's
    logits (`kernels.semantics`: every additive term of the spec, windows included), computed over query chunks
    (no B x H x N x N tensor). PLADIS's sparse combination `P + scale (entmax - P)` is deliberately left out
    (`sparse="ignore"`): it is not a distribution (it goes negative), so "received more than the average key"
    would lose its meaning.

    In joint attention each image query's row of the image x image block is renormalised to sum to 1, so
    the threshold 1 keeps SAG's meaning (a key receives more than the average key does); without that the
    text keys' share would leave the mask empty."""
    keys = slice(0, k.shape[2])
    kf = k.float()
    total = torch.zeros(q.shape[0], q.shape[1], image.stop - image.start, device=q.device)
    rows = torch.sym_max(1, torch.sym_min(QUERY_CHUNK, CHUNK_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[2])))
    # a power-of-two count of chunks (`row_chunks`): a compiled graph serves every size with the same count; an empty
    # trailing chunk adds zeros
    for queries in row_chunks(image.start, image.stop, rows):
        probs = probabilities(block_logits(q, kf, spec, queries, keys), spec, queries, sparse="ignore")
        block = probs[..., image]
        if image.stop - image.start < k.shape[2]:  # joint attention: renormalise over the image keys
            block = block / block.sum(-1, keepdim=True).clamp(min=torch.finfo(block.dtype).tiny)
        total += block.sum(dim=2)
    return total.mean(dim=1)


# -- the degraded input --------------------------------------------------------------------------------------


def gaussian_blur(images: torch.Tensor, kernel_size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """The SAG pipeline's `gaussian_blur_2d` (reflect padding; replicate on an axis too small to reflect)."""
    kernel = gaussian_kernel1d(kernel_size, sigma, images.device)  # the same float64 recipe, made once per device
    kernel2d = torch.outer(kernel, kernel).expand(images.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    height, width = images.shape[-2:]
    out = F.pad(images.float(), (pad, pad, 0, 0), mode="reflect" if pad < width else "replicate")
    out = F.pad(out, (0, 0, pad, pad), mode="reflect" if pad < height else "replicate")
    return F.conv2d(out, kernel2d, groups=images.shape[-3])


def degrade(
    sample: torch.Tensor,
    prediction: torch.Tensor,
    received: torch.Tensor,
    grid: tuple[int, int] | tuple[int, int, int],
    canvas: Canvas,
    adapter: ModelAdapter,
    scheduler: Any,
    timestep: Any,
) -> torch.Tensor:
    """SAG's degraded denoiser input for `sample` (the rows' input) and `prediction` (their output). `grid` is the
    token grid of `received`: (height, width), or (frames, height, width) with video latents (B, C, F, H, W).

    Only what is noisy is degraded: a denoiser input with more channels than its prediction (image-conditioned
    models such as Wan 2.1 image-to-video, whose noisy latent comes first) keeps the condition channels, and
    tokens whose per-token timestep is 0 (Wan 2.2 TI2V's clean first frame) are kept as they are."""
    level = noise_level(scheduler, timestep, "attnctl: SAG")
    full = adapter.latent_image(sample, canvas)
    output = adapter.latent_image(prediction, canvas)
    channels = min(full.shape[1], output.shape[1])  # learned-sigma models: the prediction's first half
    image, output = full[:, :channels], output[:, :channels]
    x0, eps = level.split(image, output)
    frames, height, width = grid if len(grid) == 3 else (1, *grid)
    salient = (received > MASK_THRESHOLD).float()
    if image.ndim == 5:  # video: the mask per token frame to every latent frame (nearest), the blur per latent frame
        mask = F.interpolate(salient.reshape(-1, 1, frames, height, width), size=image.shape[-3:])
        batch, channels, latent_frames = x0.shape[:3]
        per_frame = x0.transpose(1, 2).reshape(batch * latent_frames, channels, *x0.shape[-2:])
        blurred = gaussian_blur(per_frame).reshape(batch, latent_frames, channels, *x0.shape[-2:]).transpose(1, 2)
    else:
        if frames != 1:
            raise UnsupportedError(f"SAG: a map over {frames} token frames but latents of shape {tuple(image.shape)}")
        mask = F.interpolate(salient.reshape(-1, 1, height, width), size=image.shape[-2:])  # nearest, as the SAG pipeline
        blurred = gaussian_blur(x0)
    mixed = blurred * mask + x0 * (1 - mask)
    degraded = level.noise(mixed, eps)
    if isinstance(timestep, torch.Tensor) and timestep.ndim >= 2:
        if timestep.shape[-1] != frames * height * width:
            raise UnsupportedError(
                f"SAG: per-token timesteps of {timestep.shape[-1]} tokens for a {frames}x{height}x{width} token grid"
            )
        clean = (timestep.reshape(-1, 1, frames, height, width) == 0).float()
        clean = F.interpolate(clean, size=image.shape[-3:]) if image.ndim == 5 else F.interpolate(clean[:, :, 0], size=image.shape[-2:])
        degraded = clean * image.float() + (1 - clean) * degraded
    if full.shape[1] > channels:
        degraded = torch.cat([degraded, full[:, channels:].float()], dim=1)
    return adapter.packed_latents(degraded)
