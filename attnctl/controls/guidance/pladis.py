"""PLADIS (Kim et al. 2025, "PLADIS: Pushing the Limits of Attention in Diffusion Models at Inference Time by
Leveraging Sparsity", arXiv:2503.07677).

On cross-attention, the dense softmax and a sparse alpha-entmax (Peters et al. 2019; sparsemax at alpha 2)
of the same logits are combined as `dense + lambda (sparse - dense)`. No extra rows and no extra model
evaluation. In joint attention (SD3, Flux) the image-query rows are transformed, each normalised over its
full row (image and text keys); text-query rows stay dense.

Rows: every row of the batch (uncond, cond and perturbed copies). PLADIS changes the attention operator of
the model rather than adding a guidance direction; the authors replace the cross-attention processor,
which serves the whole CFG batch, so both CFG branches see the sparse-extrapolated attention.

The backend carries it out (`Edit.sparse`): the eager reference and the Triton kernel can; sdpa cannot,
so `backend="auto"` routes these layers to a backend that can and says so in `handle.describe()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...control import Bound, Control
from ...denoiser_call import DenoiserCall
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.spec import Sparse
from ...processors.edit import Edit, image_queries
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from ..common import TEXT_KINDS, select_kinds, text_layers


@dataclass(frozen=True)
class PLADIS(Control, type_name="pladis"):
    """Sparse-extrapolated cross-attention (Kim et al. 2025).

    scale: lambda in `dense + lambda (sparse - dense)` (0: off, stock attention; 1: pure entmax). alpha: the
    entmax exponent, > 1 (1.5 default; 2 is sparsemax). layers: cross- or joint-attention layers (default, as
    Reweight's and AttentionMaps': every cross-attention on SD / SDXL / PixArt, every joint attention on SD3 /
    Flux). steps: the step window.
    """

    scale: float = 2.0
    alpha: float = 1.5
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)


    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None

    def __post_init__(self) -> None:
        set_field(self, "scale", number(self.scale, "PLADIS.scale", minimum=0))
        set_field(self, "alpha", number(self.alpha, "PLADIS.alpha", minimum=1, exclusive_minimum=True))
        set_field(self, "layers", validate_layers(self.layers, name="PLADIS.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="PLADIS.steps"))

    def default_layers(self, adapter: ModelAdapter) -> str:
        return text_layers(adapter)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return select_kinds(self, adapter, TEXT_KINDS, "cross- or joint-attention")

    def bind(self, context) -> _PLADISBound:
        return _PLADISBound(self, context.layers)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"sparse": the attention operator of the layer changes (none while scale is 0)."""
        return ("sparse",) if self.scale > 0 else ()


class _PLADISBound(Bound):
    layers_only = True

    def __init__(self, control: PLADIS, layers: tuple[LayerInfo, ...]):
        super().__init__(control, layers, control.steps)
        self.sparse = Sparse(alpha=control.alpha, scale=control.scale)
        self._edits: dict[tuple[int, int, int], Edit] = {}

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if self.control.scale == 0:
            return None
        if layer.kind == "cross":
            key = (layer.index, 0, 0)
            if key not in self._edits:
                self._edits[key] = Edit(sparse=self.sparse)
            return self._edits[key]
        image = frame.geometry(layer).image_slice  # joint attention: the image-query rows only
        key = (layer.index, image.start, image.stop)
        if key not in self._edits:
            self._edits[key] = Edit(sparse=self.sparse, query_range=image_queries(image, frame))
        return self._edits[key]
