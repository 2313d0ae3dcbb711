"""The embedded ``toy-shapes`` demo model: a tiny text-to-image model of coloured shapes trained by the project.

``load_toy_shapes()`` returns a standard ``StableDiffusionPipeline`` (32x32 images; the model was trained at
that size only, so pass ``height=32, width=32``).  Submodules: :mod:`.data` (synthetic data),
:mod:`.tokenizer` (offline single-token-word CLIP tokenizer), :mod:`.analysis` (pixel analysis),
:mod:`.train` (the training script).  Importing this package does not import diffusers.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionPipeline

__all__ = [
    "BINDING_REGION_LAYERS", "CALL_DEFAULTS", "DEFAULT_GUIDANCE_SCALE", "DEFAULT_NUM_INFERENCE_STEPS", "IMAGE_SIZE", "MAP_LAYERS", "BOX_GUIDANCE", "MODEL_NAMES", "load_toy_shapes",
    "toy_shapes_path",
]

#: The embedded models: `toy-shapes`, the shipped demo model, and `toy-shapes-grounded`, the same training (same
#: seed and steps) with TokenCompose's grounding losses and without the one-of-two captions (docs/toy-shapes.md,
#: "Run 10"). On the grounded model every word's attention map locates its object, as on large models, so the
#: map-reading methods work at their defaults; it binds colours by itself, so it has no binding failure for Regions to fix. The constants below
#: (MAP_LAYERS, BOX_GUIDANCE, BINDING_REGION_LAYERS) were chosen for `toy-shapes`; on `toy-shapes-grounded` use the
#: methods' defaults.
MODEL_NAMES = ("toy-shapes", "toy-shapes-grounded")

#: Settings the models were evaluated with (see docs/toy-shapes.md).
DEFAULT_NUM_INFERENCE_STEPS = 10
DEFAULT_GUIDANCE_SCALE = 4.0
IMAGE_SIZE = 32
#: Layers for `attnctl.Regions(..., layers=BINDING_REGION_LAYERS, isolate=True)` when the regions hold one object
#: each: the region prompts act in the cross-attention of the 8x8 level, isolation in every self-attention layer.
#: At the 4x4 level the base prompt keeps laying out two objects; one-object region prompts there make the model
#: draw one object (docs/toy-shapes.md, "Regions").
BINDING_REGION_LAYERS = ("down_blocks.1", "up_blocks.1", "self")
#: Layers for `attnctl.AttentionMaps(..., layers=MAP_LAYERS)` and `attnctl.read_maps(..., layers=MAP_LAYERS)`: the
#: cross-attention of the 4x4 down level, the one layer whose word maps locate the objects on this model. The up
#: path's maps are anti-correlated with the objects, so the default (every cross layer) sums them away: Pearson
#: correlation of a word's soft mask with its object's pixels, two-object prompts on 16 held-out seeds (1000-1015,
#: not the benchmark's), generation maps: down_blocks.2 +0.15, down_blocks.1 -0.30, mid -0.12, up path -0.23,
#: every layer -0.25 (mean IoU at threshold 0.5: 0.165 against 0.056). docs/toy-shapes.md, "Attention maps".
MAP_LAYERS = ("down_blocks.2",)
#: Settings for `attnctl.BoxGuidance(boxes, **BOX_GUIDANCE)` at this model's 10 steps: Chen et al.'s ratio loss read
#: at MAP_LAYERS (the default layers, the mid and first up block, push the object *out* of its box here), every one of
#: the 5 iterations taken (`loss_threshold` 0), over the first half of the steps (the paper guides 10 of 50) at a third
#: of the paper's scale. Chosen on held-out seeds 1000-1095 (docs/methods.md, "Box layout guidance"): 86/96 of the
#: objects in their box against 81/96 with the paper's settings on MAP_LAYERS and 53/96 stock.
BOX_GUIDANCE = MappingProxyType({"layers": MAP_LAYERS, "scale": 10.0, "steps": (0.0, 0.5), "loss_threshold": 0.0})
#: Pipeline call arguments `attnctl render` and `attnctl.Model` use for this model unless a job sets them.
CALL_DEFAULTS = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS,
                 "guidance_scale": DEFAULT_GUIDANCE_SCALE}


def toy_shapes_path(model: str = "toy-shapes") -> Path:
    """Directory of an embedded model, `model` one of MODEL_NAMES (standard diffusers layout, fp16 safetensors)."""
    if model not in MODEL_NAMES:
        raise ConfigError(f"toy model {model!r}: the embedded toy models are {', '.join(MODEL_NAMES)}")
    path = Path(__file__).resolve().parent.parent / "assets" / model
    if not (path / "model_index.json").is_file():
        grounding = (" --ground-token-weight 0.02 --ground-pixel-weight 0.005 --kind-weights one=0.35,one_pos=0.3,two_pos=0.3,two=0.05"
                     if model == "toy-shapes-grounded" else "")
        raise FileNotFoundError(
            f"the {model} model is missing from {path}; train it with "
            f"`python -m attnctl.toy.train --out RUN_DIR{grounding} --export attnctl/assets/{model}`"
        )
    return path


def load_toy_shapes(torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    path: str | Path | None = None, *, model: str = "toy-shapes", **kwargs: Any) -> StableDiffusionPipeline:
    """Load an embedded toy ``StableDiffusionPipeline`` offline: ``model`` one of MODEL_NAMES (``"toy-shapes"``, the
    default, or ``"toy-shapes-grounded"``).

    The weights ship as fp16; they are loaded as ``torch_dtype`` (default float32; fp16 is upcast to
    float32 on CPU, where half precision is slow).  ``path`` loads another directory of the same kind
    (e.g. a training snapshot) instead of an embedded one.  Extra ``kwargs`` go to ``from_pretrained``.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float32 if torch_dtype is None else torch_dtype
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 on CPU is slow and partly unsupported: upcast
    options = {"safety_checker": None, "requires_safety_checker": False, "local_files_only": True, **kwargs}
    pipe = StableDiffusionPipeline.from_pretrained(str(toy_shapes_path(model) if path is None else path), **options)
    # diffusers loads its models as fp32 and transformers keeps the saved fp16: cast only what differs
    # (casting works on every supported diffusers version, unlike the renamed torch_dtype / dtype argument)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        if component.dtype != dtype:
            component.to(dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
