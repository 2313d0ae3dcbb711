"""`Regions`: regional prompts, soft masks and subject isolation (docs/methods.md "Regions").

The base-ratio blend of per-region cross-attention is the "attention mode" of Regional Prompter (hako-mikan,
2023) and RPG's complementary regional diffusion (Yang et al., ICML 2024, "Mastering Text-to-Image Diffusion:
Recaptioning, Planning, and Generating with Multimodal LLMs"). The joint-attention rules for MMDiT models follow
the project's specification, after Chen et al. 2024, "Training-free Regional Prompting for Diffusion Transformers",
whose code masks harder (docs/methods.md says where). Subject isolation is
the self-attention masking of Dahary et al., ECCV 2024, "Be Yourself: Bounded Attention for Multi-Subject T2I
Generation" (without its guidance). Soft masks and per-cell overlap normalisation are ours (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...control import BindContext, Bound, Control, _plain
from ...errors import ConfigError, IdleControlWarning, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import choice, number, refuse_unused, set_field
from ..common import keep_kinds
from .bound import RegionsBound
from .layout import draw_layout, layout_fields, save_layout, save_mask
from .region import Region


@dataclass(frozen=True)
class Regions(Control, type_name="regions"):
    """Each region of the canvas gets its own prompt; optionally, subjects are kept apart.

    - `regions`: `Region`s (or dicts with `prompt` and `box` or `mask`), at least one. The base prompt is the
      pipeline's prompt; it applies wherever the regions leave room.
    - `base_ratio` b in [0, 1]: how much of the base prompt stays inside the regions (0: only the region's
      prompt; 1: regions change nothing, apart from isolation).
    - `isolate`: image tokens of two different subject regions get a bias of `-isolation_strength` between
      them (infinite by default: they do not see each other) in self-attention (UNet, PixArt, SD3.5's image-only
      layers) and joint attention (SD3, Flux); background tokens and `Region(subject=False)` stay shared.
    - `layers`: cross-attention layers (UNet, PixArt) and joint layers (SD3, Flux) get the regional prompts;
      with `isolate`, self-attention layers get isolation. Default: every cross / joint layer, plus every
      self-attention layer with `isolate`.
    - `steps=(start, stop)`: the window of steps it acts in.
    - `trim_prompts`: Flux only (its joint text is T5 padded to `max_sequence_length`, no mask). Each region
      prompt's tokens are appended up to the longest region prompt's end-of-sequence token instead of all
      `max_sequence_length` positions: the same embeddings at the kept positions, without the padding
      positions the images would also attend to. At 1024x1024 with 512 text tokens, two regions add 1,024
      tokens to the 4,608 of every joint layer untrimmed, about 30 with it. Refused on other families.
    - `joint_rule` (joint attention only): `"open"` (default, the project's rules: every image token sees every
      image token, background tokens see the base text, the blend keeps background tokens stock) or `"chen"` (the
      masking of Chen et al.'s code, instantX's Regional-Prompting-FLUX: an image token sees only its own region's
      image tokens and text, background only background and no text, and every image token is blended
      `(1 - b) masked + b base`); docs/methods.md "Regions".

    The regional prompts apply to the cond rows (and perturbed copies of them); unconditional rows keep the
    negative prompt everywhere. Isolation applies to every row, unconditional rows included (docs/methods.md does not
    restrict it): the subjects are kept apart in both CFG branches. Region prompts are encoded by the pipeline's own text encoders with the
    options of the call (`clip_skip`, `max_sequence_length`, ...); the pooled embedding stays the base prompt's.
    The same layout applies to every prompt of a batch.

    Video denoisers (Wan: cross-attention to umT5 over a frames x height x width token grid): each region is a tube,
    its box or mask on every token frame of its `Region.frames` range (all by default), or one shape per frame; the
    weights `m_r` and labels are per token over (frames x h x w), and the cross-attention blend is the one above.
    """

    #: images and video (regions as spatio-temporal tubes over the frames x height x width token grid)
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)
    needs: ClassVar[tuple[str, ...]] = ("appended_text",)  # region prompts join a joint text sequence

    regions: tuple[Region, ...]
    base_ratio: float = 0.2
    isolate: bool = False
    isolation_strength: float = math.inf
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)
    trim_prompts: bool = False
    joint_rule: str = "open"

    JOINT_RULES: ClassVar[tuple[str, ...]] = ("open", "chen")

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        # its edits carry each layer's constants, made before the forward (region keys, RegionsBound.cross_edit; the
        # joint blend's plan, RegionsBound.joint_edit_hook); label masks run on sdpa in a graph (choose_traced_backend)
        return None

    def __post_init__(self) -> None:
        regions = self.regions
        if isinstance(regions, (Region, Mapping, str, bytes)) or not isinstance(regions, Sequence):
            raise ConfigError(f"Regions.regions must be a list of Region (or dicts), got {regions!r}")
        items = []
        for position, item in enumerate(regions):
            if isinstance(item, Mapping):
                item = Region.from_dict(item)
            if not isinstance(item, Region):
                raise ConfigError(f"Regions.regions[{position}] must be an attnctl.Region or a dict, got {item!r}")
            items.append(item)
        if not items:
            raise ConfigError("Regions needs at least one region")
        set_field(self, "regions", tuple(items))
        set_field(self, "base_ratio", number(self.base_ratio, "Regions.base_ratio", minimum=0.0, maximum=1.0))
        if not isinstance(self.isolate, bool):
            raise ConfigError(f"Regions.isolate must be True or False, got {self.isolate!r}")
        strength = self.isolation_strength
        if isinstance(strength, str) and strength.strip().lower() in ("inf", "infinity", "+inf"):
            strength = math.inf
        set_field(self, "isolation_strength", number(strength, "Regions.isolation_strength", minimum=0.0, exclusive_minimum=True, allow_inf=True))
        if not self.isolate:
            refuse_unused(self, "isolation_strength", "with isolate=False (it is the bias between subject regions that isolate=True adds)")
        set_field(self, "layers", validate_layers(self.layers, name="Regions.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="Regions.steps"))
        if not isinstance(self.trim_prompts, bool):
            raise ConfigError(f"Regions.trim_prompts must be True or False, got {self.trim_prompts!r}")
        choice(self.joint_rule, "Regions.joint_rule", self.JOINT_RULES)
        if self.base_ratio == 1.0 and self.isolate and not self.isolating:
            raise ConfigError(
                "Regions(base_ratio=1, isolate=True) acts only by keeping subject regions apart, and it has "
                f"{sum(region.subject for region in self.regions)} subject region(s): give at least two regions with "
                "subject=True, or a base_ratio below 1 for the region prompts to act"
            )
        if self.isolate and not self.isolating:
            warnings.warn(
                f"attnctl: Regions(isolate=True) keeps subject regions apart, and it has "
                f"{sum(region.subject for region in self.regions)} subject region(s): isolation does nothing (the region "
                "prompts still act); give at least two regions with subject=True, or isolate=False",
                IdleControlWarning,
                stacklevel=3,
            )

    def validate_for(self, adapter: ModelAdapter) -> None:
        if self.trim_prompts and (adapter.padded_text_tokenizer is None or adapter.text_attention != "joint"):
            raise UnsupportedError(
                f"Regions(trim_prompts=True) is for families whose region prompts join a joint text sequence padded "
                f"without a mask (Flux); the {adapter.family} family's text is "
                + ("separate cross-attention keys" if adapter.text_attention != "joint" else "several segments or masked")
                + ": leave trim_prompts=False"
            )
        if adapter.grid_dims != 3:
            for region in self.regions:
                if region.video:
                    raise ConfigError(
                        f"{region!r} has a frame range or per-frame shapes, which need a video denoiser (a frames x "
                        f"height x width token grid); the {adapter.family} family generates images: give one box or "
                        "2-D mask and no frames"
                    )

    # -- layers --------------------------------------------------------------------------------------------------
    def default_layers(self, adapter: ModelAdapter) -> tuple[str, ...]:
        kinds = [adapter.text_attention]
        if self.isolate:
            kinds.append("self")
        present = {layer.kind for layer in adapter.layers}
        return tuple(kind for kind in kinds if kind in present)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        """The selected layers, plus (SD3, Flux) every joint layer: region tokens must be hidden where not selected.
        A selection with no layer where the regions act (region prompts: cross / joint; isolation: self / joint)
        raises, unless nothing is asked of them (`base_ratio=1` without isolation: the documented identity)."""
        chosen = super().select(adapter)
        if self.base_ratio < 1.0:
            keep_kinds(chosen, ("cross", "joint"), "Regions", "cross- or joint-attention (region prompts)", self.layers)
        if self.isolating:
            keep_kinds(chosen, ("self", "joint"), "Regions", "self- or joint-attention (isolation)", self.layers)
        if adapter.text_attention != "joint":
            return chosen
        indices = {layer.index for layer in chosen}
        return tuple(layer for layer in adapter.layers if layer.index in indices or layer.kind == "joint")

    @property
    def isolating(self) -> bool:
        """Whether isolation acts: `isolate` and at least two subject regions."""
        return self.isolate and sum(region.subject for region in self.regions) >= 2

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """"regions_hide_base_text" on joint attention while region prompts act: an image token inside a region
        reads the region's prompt there, not the base prompt."""
        return ("regions_hide_base_text",) if adapter.text_attention == "joint" and self.base_ratio < 1.0 else ()

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """What Regions does at `layer` (the roles of `RegionsBound`): on SD3 / Flux "region_tokens" on every
        joint layer while region prompts act (their tokens are in the sequence there), "labels" on the joint
        layers it selects (the masked joint softmax, or isolation); "labels" on the self-attention layers it
        isolates; "region_prompts" on the cross-attention layers where region prompts act (separate attentions in a
        hook)."""
        prompts_act = self.base_ratio < 1.0
        selected = {info.index for info in Control.select(self, adapter)}
        here = layer.index in selected
        effects: list[str] = []
        if layer.kind == "joint":
            tokens = adapter.text_attention == "joint" and prompts_act and any(
                info.kind == "joint" and info.index in selected for info in adapter.layers
            )
            if here and (prompts_act or self.isolating):
                effects.append("labels")
            if tokens:
                effects.append("region_tokens")
        elif layer.kind == "self" and here and self.isolating:
            effects.append("labels")
        elif layer.kind == "cross" and here and prompts_act:
            effects.append("region_prompts")
        return tuple(effects)

    def bind(self, context: BindContext) -> Bound:
        selected = Control.select(self, context.adapter)
        bound = RegionsBound(self, context, selected)
        return bound if bound.roles else Bound(self, (), self.steps)

    # -- serialisation and layouts ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict; regions as `{"prompt", "box" | "mask", "subject"}` (in-memory masks raise, see `with_mask_files`)."""
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [r.to_dict() for r in value] if f.name == "regions" else _plain(value)
        return out

    def to_record(self) -> dict[str, Any]:
        """`to_dict` with in-memory masks described instead of refused (a record beside a rendered image, not replayable)."""
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [_region_record(r) for r in value] if f.name == "regions" else _plain(value)
        return out

    @classmethod
    def from_layout(cls, source: str | os.PathLike | Mapping[str, Any] | Sequence[Any], **overrides: Any) -> Regions:
        """Regions from a JSON or TOML layout file (or the same data): see `attnctl.controls.regions.layout`."""
        fields = layout_fields(source, **overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"a layout has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(known))}")
        return cls(**fields)

    def save_layout(self, path: str | os.PathLike) -> str:
        """Write this layout as JSON (`to_dict` without the type); returns the path."""
        return save_layout(self, path)

    def with_mask_files(self, directory: str | os.PathLike) -> Regions:
        """A copy whose in-memory masks are saved as 16-bit PNGs in `directory` and referenced by path."""
        if isinstance(directory, bytes) or not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ConfigError(f"Regions.with_mask_files: directory must be a folder path (str or os.PathLike), got {directory!r}")
        for region in self.regions:
            if region.box is None and region.mask_path is None and region.per_frame is not None:
                raise ConfigError(
                    f"{region!r} has per-frame masks, which cannot be saved as one mask file; use per-frame boxes "
                    "or serialise the layout without it"
                )
        os.makedirs(directory, exist_ok=True)
        regions = []
        for position, region in enumerate(self.regions):
            if region.box is None and region.mask_path is None:
                path = save_mask(region.shape, os.path.join(os.fspath(directory), f"region_{position:02d}.png"))
                region = dataclasses.replace(region, mask=path)  # every other field (frames, subject) kept
            regions.append(region)
        return dataclasses.replace(self, regions=tuple(regions))

    def picture(self, size: tuple[int, int] = (512, 512), background: Any = None):
        """A PIL picture of the layout: each region's box or mask in its colour, with its prompt."""
        return draw_layout(self, size=size, background=background)


def _region_record(region: Region) -> dict[str, Any]:
    if region.box is not None or region.mask_path is not None:
        return region.to_dict()
    frames = {} if region.frames is None else {"frames": list(region.frames)}
    return {"prompt": region.prompt, "mask": "<in-memory mask, not saved>", "subject": region.subject, **frames}
