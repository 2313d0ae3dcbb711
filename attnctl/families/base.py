"""Model adapters: what attnctl knows about one denoiser class, as data.

An adapter lists the attention layers of a denoiser with their kind (self / cross / joint), group and
block, the token layout each layer sees (image-first or text-first, where the text sits), and how to find
the image-token grid of a call. Nothing here is guessed from tensor shapes: grids come from the model's
structure and the call's inputs, and a shape that disagrees with them is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..errors import CallLayoutError, UnsupportedError

LayerKind = Literal["self", "cross", "joint"]
TextPosition = Literal["none", "keys", "first", "last"]
KINDS: tuple[str, ...] = ("self", "cross", "joint")


class RowList(str):
    """The name of a batched denoiser input that is a list with one entry per row (Z-Image's `x`, `cap_feats`;
    Qwen-Image's `img_shapes`), not a tensor whose first dimension is the batch: re-batching indexes the list itself
    (a one-entry list stands for every row). A `ModelAdapter.batched_inputs` entry; it is a `str`, so it names the
    input everywhere a plain name does."""

    __slots__ = ()


class RowGroups(str):
    """The name of a batched tensor input that holds `rows` consecutive rows per batch row, which the denoiser views as
    one (Wan first-last-frame's `encoder_hidden_states_image`: each video's first- and last-frame CLIP tokens, two rows
    that `WanImageEmbedding` reshapes into one row of twice the tokens). Re-batching moves whole groups. A
    `ModelAdapter.batched_inputs` entry; it is a `str`, so it names the input everywhere a plain name does."""

    rows: int

    def __new__(cls, name: str, rows: int) -> RowGroups:
        if rows < 1:
            raise ValueError(f"attnctl: RowGroups({name!r}, rows={rows}): rows must be at least 1")
        self = super().__new__(cls, name)
        self.rows = rows
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return RowGroups, (str(self), self.rows)


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser.

    `name` is the module path without `.processor`. `level` is the number of 2x downsamplings between the
    latent and this layer's token grid (UNet levels; 0 for DiTs, whose patch size is applied separately).
    `text` says where text tokens are: `"none"` (self-attention over image tokens), `"keys"` (cross-attention:
    text only as keys), `"first"` / `"last"` (joint attention: text before or after the image tokens).
    `concatenated` is true when the text is already part of `hidden_states` (Flux single blocks).
    """

    name: str
    index: int
    kind: LayerKind
    group: str
    block: int | None
    level: int = 0
    text: TextPosition = "none"
    concatenated: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))


@dataclass(frozen=True)
class TextSpan:
    """Where one text encoder's tokens sit inside the text sequence a layer sees."""

    encoder: str  # "clip" or "t5"
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Canvas:
    """The geometry of one denoiser call: latent grid, image-token grid at patch level, text length.

    Video denoisers (Wan) have `frames` token frames of `token_hw` each, in frame-major order (frames x height x
    width); images have one.
    """

    latent_hw: tuple[int, int]
    token_hw: tuple[int, int]
    text_len: int
    frames: int = 1
    #: Reference-image tokens after the generated image's tokens in the image stream (Flux.2 klein `image=`): keys
    #: and queries of every joint layer, never part of the image grid controls edit.
    reference_len: int = 0
    #: Padding tokens right after the image tokens, before any text (Z-Image pads each row's image tokens to a multiple
    #: of 32 with a learned token that attention sees): keys and queries of every layer that sees the image, neither
    #: image nor text for controls; the processor hands the controls the sequence without them and lets them attend
    #: as stock (as reference-image tokens: `processors/references.py`).
    image_pad: int = 0

    @property
    def trailing_len(self) -> int:
        """Tokens a layer's controls find after its own in the keys, unedited (`Geometry.reference_len`): the
        reference-image tokens, and the image padding, which Z-Image's processor moves there."""
        return self.reference_len + self.image_pad

    def shape_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """A tensor with no elements whose shape holds this canvas's sizes (`from_shape` reads them back). A compiled
        forward reads the sizes from its shape rather than from this canvas's ints, which dynamo would make constants
        of the graph (a new graph for every image size and prompt length); tensor sizes that vary between calls
        become symbolic (automatic dynamic shapes), as the denoiser's own inputs' do."""
        sizes = (*self.latent_hw, *self.token_hw, self.text_len, self.frames, self.reference_len, self.image_pad)
        return torch.empty((0, *sizes), device=device)

    @staticmethod
    def from_shape(sizes: torch.Tensor) -> Canvas:
        """The canvas whose `shape_tensor` is `sizes` (in a graph, with the symbolic sizes of its shape)."""
        _, latent_h, latent_w, token_h, token_w, text_len, frames, reference_len, image_pad = sizes.shape
        return Canvas((latent_h, latent_w), (token_h, token_w), text_len, frames, reference_len, image_pad)

    def grid_at(self, level: int) -> tuple[int, int]:
        h, w = self.token_hw
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1: ceil(n / 2)
        return h, w


@dataclass(frozen=True)
class Geometry:
    """Token layout of one layer in one call: the image grid and where the text is."""

    layer: LayerInfo
    image_hw: tuple[int, int]
    text_len: int
    frames: int = 1  # token frames of `image_hw` each (video); the image tokens are frame-major
    #: Keys after the layer's own tokens that no control edits (`Canvas.trailing_len`): reference-image tokens (joint
    #: layouts), Z-Image's image padding (moved there by its processor).
    reference_len: int = 0

    @property
    def image_len(self) -> int:
        return self.frames * self.image_hw[0] * self.image_hw[1]

    @property
    def image_slice(self) -> slice:
        """Image tokens inside the query sequence."""
        if self.layer.text == "first":
            return slice(self.text_len, self.text_len + self.image_len)
        return slice(0, self.image_len)

    @property
    def text_slice(self) -> slice | None:
        """Text tokens inside the query sequence (joint layouts), or None."""
        if self.layer.text == "first":
            return slice(0, self.text_len)
        if self.layer.text == "last":
            return slice(self.image_len, self.image_len + self.text_len)
        return None

    @property
    def key_text_slice(self) -> slice | None:
        """Text tokens inside the key sequence: all keys for cross-attention, the text span for joint."""
        if self.layer.text == "keys":
            return slice(0, self.text_len)
        return self.text_slice

    @property
    def query_len(self) -> int:
        """The text and generated image tokens: the queries controls see (reference tokens are not among them)."""
        return self.image_len + (self.text_len if self.layer.text in ("first", "last") else 0)

    @property
    def key_len(self) -> int:
        """The keys of the layer: its own tokens (text keys only in cross-attention), reference tokens last."""
        if self.layer.text == "keys":
            return self.text_len
        return self.query_len + self.reference_len


@dataclass
class ModelAdapter:
    """What attnctl knows about one denoiser instance: its layers and how to read a call's geometry.

    The class attributes are the family's traits, as data: controls read them instead of testing the family
    name, so that a new family is one adapter (and, where its attention differs, one processor).
    """

    family: str
    denoiser: torch.nn.Module
    layers: tuple[LayerInfo, ...]
    modules: dict[str, torch.nn.Module] = field(repr=False)
    batched_inputs: tuple[str, ...] = ()
    dict_inputs: tuple[str, ...] = ()
    #: A pipeline with several denoiser experts of one class (Wan 2.2 A14B: `transformer` runs the high-noise steps,
    #: `transformer_2` the low-noise ones), by pipeline attribute; empty for one denoiser. With experts, every layer
    #: name starts with its expert's attribute (`transformer.blocks.0.attn1`, `transformer_2.blocks.0.attn1`) and
    #: `denoiser` is the first expert.
    experts: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)

    #: Where image queries meet the prompt: "cross" (cross-attention layers, text as keys only) or "joint"
    #: (text and image tokens in one sequence).
    text_attention: ClassVar[Literal["cross", "joint"]] = "cross"
    #: The factor from the denoiser's `timestep` input to diffusers' 0..1000 scale (Flux is called with t / 1000);
    #: `timestep_1000` reads it.
    timestep_scale: ClassVar[float] = 1.0
    #: Whether image tokens carry rotary position embeddings (merging tokens would lose their positions).
    rotary: ClassVar[bool] = False
    #: Where `pipe.encode_prompt`'s output holds the text padding mask the denoiser applies (PixArt 1, Chroma 2,
    #: Qwen-Image 1; Qwen-Image returns None when nothing is padded), so that extra prompts keep their padding
    #: masked. None: the family masks no text padding.
    prompt_mask_index: ClassVar[int | None] = None
    #: The denoiser input every attention layer's own mask is made from, the same way at every layer of one forward
    #: (Chroma: each block's outer product of `attention_mask`; Qwen-Image: the processors' `encoder_hidden_states_mask`
    #: and ones for the image tokens), so that the layers' masks are equal: a layer with an edit then reads the first
    #: layer's mask tensor (`ControlledProcessor.layer_mask`), and what the backends derive from it (a label mask
    #: added, a sub-attention's rows and keys) is made once per denoiser call. None: no such input.
    layer_mask_input: ClassVar[str | None] = None
    #: Each row's text after its prompt's last token is masked out of the attention's keys (Qwen-Image's boolean
    #: mask), so a control must not read those positions of a row as text (Prompt-to-Prompt's refine). False where the
    #: padding is attended (CLIP / T5 padding; Chroma, whose float 0/1 mask diffusers adds as a bias).
    masks_text_padding: ClassVar[bool] = False
    #: The pipeline attribute of the tokenizer whose padded output is the whole joint text sequence, with no
    #: attention mask (Flux: T5 padded to `max_sequence_length`): extra prompts appended to that sequence can
    #: be cut after their last token (`Regions(trim_prompts=True)`). None: the text has several segments or a mask.
    padded_text_tokenizer: ClassVar[str | None] = None
    #: Per transformer-block class, the forward arguments that hold one row per batch row (skip-layer guidance).
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Transformer-block classes whose forward returns `(encoder_hidden_states, hidden_states)`.
    text_stream_blocks: ClassVar[tuple[str, ...]] = ()
    #: The oldest diffusers whose attention processors of this family attnctl reproduces exactly (None: every
    #: supported version).
    min_diffusers: ClassVar[tuple[int, int] | None] = None
    #: The pipeline packs each side's `latent_packing` latent pixels into one image token itself (Flux-like 2x2
    #: patches) and resizes, with only a logged warning, an image side that is not a multiple of
    #: `latent_packing * vae_scale_factor` (`Model.generate` refuses it instead); 1: the pipeline does no such resizing.
    latent_packing: ClassVar[int] = 1
    #: The denoiser pads each row's image tokens to a multiple of this (Z-Image: 32), putting `Canvas.image_pad`
    #: padding tokens after them; 1: no padding.
    image_token_multiple: ClassVar[int] = 1
    #: Whether an integer `i` names the block `transformer_blocks.i` (no flat block list in a UNet).
    indexed_blocks: ClassVar[bool] = True
    #: The image-token grid's dimensions: 2 (height x width) or 3 (frames x height x width: video). Controls
    #: whose definition is 2-D (`Control.grid_dims`) are refused on a 3-D grid.
    grid_dims: ClassVar[int] = 2
    #: How the family's pipelines run classifier-free guidance: "batched" (uncond and cond rows in one denoiser
    #: call) or "separate" (a cond call and an uncond call per step: Flux / Chroma / Qwen-Image / Flux.2 / Wan true CFG).
    cfg_calls: ClassVar[str] = "batched"
    #: Capabilities of the call machinery this family lacks, with the reason (`Control.needs` names the ones a
    #: control relies on: "extra_rows" to batch perturbed rows into a denoiser call, "appended_text" to append
    #: tokens to the joint text sequence); a control needing one is refused at apply.
    lacks: ClassVar[dict[str, str]] = {}
    #: Pipelines of the family refused at apply (class name: what the pipeline does that attnctl cannot follow).
    refused_pipelines: ClassVar[dict[str, str]] = {}
    #: The denoiser input that holds the text embeddings: a tensor, or a list of per-row tensors (Z-Image's `cap_feats`).
    text_input: ClassVar[str] = "encoder_hidden_states"
    #: Pipelines whose every call holds reference-image tokens (`Canvas.reference_len`): the controls that are not
    #: defined over them are refused at apply, not at each call.
    reference_pipelines: ClassVar[tuple[str, ...]] = ()
    #: The sign between the denoiser's output and the prediction the pipeline hands to the scheduler (-1: Z-Image's
    #: pipeline negates the output); a second pass (SAG) sees the prediction with the scheduler's sign.
    prediction_sign: ClassVar[int] = 1
    #: Batched inputs that carry another network's residuals, added to the denoiser's features (ControlNet, T2I-Adapter):
    #: the pipeline computes them per row from that row's latent (and prompt), outside the denoiser. A row selection that
    #: relabels rows takes them from the rows of the label it gives (`RowSelect`); a row whose latent a control replaces
    #: by another image's runs without them (`without_conditioning`).
    conditioning_inputs: ClassVar[tuple[str, ...]] = ()

    def batch_size(self, inputs: dict[str, Any]) -> int:
        """The number of rows of a denoiser call (the first batched input's first dimension, or its length when it
        is a list of per-row tensors)."""
        first = self.batched_inputs[0]
        return len(inputs[first]) if isinstance(first, RowList) else int(inputs[first].shape[0])

    def without_conditioning(self, inputs: dict[str, Any], rows: torch.Tensor, batch: int) -> dict[str, Any]:
        """`inputs` with the `conditioning_inputs` of the rows `rows` (indices on the inputs' device) zeroed: the residuals
        are added to the denoiser's features, so those rows run as without the ControlNet / adapter. New tensors; the
        pipeline's are left as they are (a one-row residual for every row is expanded to `batch` rows first)."""

        def zeroed(value: Any, where: str) -> Any:
            if isinstance(value, torch.Tensor):
                if value.ndim == 0 or value.shape[0] not in (1, batch):
                    raise CallLayoutError(f"attnctl: input {where} has shape {tuple(value.shape)}, expected {batch} (or 1) rows")
                if value.shape[0] != batch:
                    value = value.expand(batch, *value.shape[1:])
                return value.index_fill(0, rows.to(value.device), 0)
            if isinstance(value, (list, tuple)):
                return type(value)(zeroed(v, f"{where}[{i}]") for i, v in enumerate(value))
            return value

        changed = dict(inputs)
        for name in self.conditioning_inputs:
            if changed.get(name) is not None:
                changed[name] = zeroed(changed[name], name)
        return changed

    def placed_weight(self, name: str) -> torch.Tensor | None:
        """The first parameter of layer `name`'s module: where and in which dtype its attention runs, for constants
        made before a (compiled) forward. None when the layer has none or it is offloaded (on the meta device)."""
        weight = next(self.modules[name].parameters(), None)
        return None if weight is None or weight.device.type == "meta" else weight

    def timestep_1000(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The denoiser call's timestep on diffusers' 0..1000 scale (the scheduler's `t`, which PAG's adaptive scale
        reads) as a 0-d float tensor, left where the input is (no host read); None when the call has no timestep.

        The `timestep` input times `timestep_scale`; a per-token timestep (Wan 2.2 TI2V, `expand_timesteps`: (B, seq),
        0 on the clean conditioning frame's tokens, `t` on the others) gives its noisy tokens', the row's maximum."""
        value = inputs.get("timestep")
        if value is None:
            return None
        value = torch.as_tensor(value)
        if value.ndim >= 2:
            value = value[0].amax()
        return value.flatten()[0].float() * self.timestep_scale

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def canvas(self, inputs: dict[str, Any]) -> Canvas:  # pragma: no cover - overridden
        raise NotImplementedError

    def groups(self) -> tuple[str, ...]:
        seen: list[str] = []
        for info in self.layers:
            if info.group not in seen:
                seen.append(info.group)
        return tuple(seen)

    def perturbed_layers(self) -> str:
        """The default selection of attention-perturbation guidance (PAG, SEG; docs/methods.md "PAG")."""
        raise UnsupportedError(f"attnctl: no default perturbed layers for model family {self.family!r}; give layers=... explicitly")

    def transformer_blocks(self) -> dict[str, torch.nn.Module]:
        """Skippable transformer blocks by module path, in model order; found once per adapter (per handle), not
        by a walk of the module tree in every pipeline call."""
        found = self.__dict__.get("_transformer_blocks")
        if found is None:
            classes = tuple(self.block_inputs)
            found = {name: module for name, module in self.denoiser.named_modules() if type(module).__name__ in classes}
            self.__dict__["_transformer_blocks"] = found
        return dict(found)

    def expert_name(self, module: torch.nn.Module) -> str | None:
        """The pipeline attribute of the expert `module` (`DenoiserCall.expert`); None with one denoiser."""
        return next((attribute for attribute, expert in self.experts.items() if expert is module), None)

    def layer_experts(self, names: Any) -> frozenset[str] | None:
        """The experts holding the layers or blocks named `names` (paths behind their expert's attribute); None with
        one denoiser."""
        if not self.experts:
            return None
        return frozenset(name.split(".")[0] for name in names)

    def expert_of(self, layer: LayerInfo | None) -> torch.nn.Module:
        """The denoiser (expert) that holds `layer`; the (first) denoiser for None."""
        if layer is not None and self.experts:
            return self.experts[layer.parts[0]]
        return self.denoiser

    def expert_schedule(self, pipeline: Any, steps: int) -> tuple[str, ...] | None:
        """The expert (pipeline attribute) that runs each of a call's `steps`, read from the pipeline's schedule once
        its timesteps are set; None for a single denoiser."""
        return None

    def expert_rule(self, pipeline: Any) -> str:
        """How `pipeline` gives the steps to its experts, in words (for messages); empty for a single denoiser."""
        return ""

    def project_text(self, embeds: torch.Tensor, layer: LayerInfo | None = None) -> torch.Tensor:
        """Prompt embeddings as the attention layers see them: after the denoiser's own projection, if any (the
        projection of the expert holding `layer`, on a pipeline with several)."""
        return embeds

    def append_text(self, inputs: dict[str, Any], block: torch.Tensor, segments: int = 1,
                    block_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """The denoiser inputs with `block` (B, T', C), `segments` prompts one after the other, appended after the
        prompt tokens (joint families); `block_mask` (B, T') 0/1: their padding (families with `prompt_mask_index`)."""
        raise UnsupportedError(f"attnctl: the {self.family} family has no joint text sequence to append tokens to")

    def latent_image(self, latents: torch.Tensor, canvas: Canvas) -> torch.Tensor:
        """The denoiser's latent input (or output) as (B, C, H, W)."""
        return latents

    def packed_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of `latent_image`."""
        return images

    def vae_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's encoding (B, C, H, W) in the space of `latent_image`, as the family's pipelines map it (img2img's
        `(z - shift_factor) * scaling_factor`)."""
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        scale = getattr(config, "scaling_factor", None) or 1.0
        return (latents - shift) * scale


def noisy_channels(denoiser: torch.nn.Module) -> int | None:
    """How many leading channels of the denoiser's input are the noisy latent, where it takes more (an inpainting
    UNet's 9 = latent 4 + mask 1 + masked image 4, FLUX.1 Fill's packed 384 = 64 + 320): its predicted channels.
    None where every input channel is the latent (a learned-sigma model predicts more channels than it reads)."""
    config = getattr(denoiser, "config", None) or {}
    given, predicted = config.get("in_channels"), config.get("out_channels")
    if not isinstance(given, int) or not isinstance(predicted, int) or predicted >= given:
        return None
    return predicted


def channel_dim(latent: torch.Tensor, batched: bool = True) -> int:
    """The channel axis of a denoiser input (`batched`: with its batch axis): last for packed tokens ((batch,) tokens,
    channels), else the first after the batch axis."""
    if latent.dim() == 2 + batched:
        return -1
    return int(batched)
