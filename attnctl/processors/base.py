"""What the per-family controlled processors share: the attention op with hooks and a backend.

A controlled processor is a plain object (not an nn.Module, so it never enters a state_dict), one instance
per layer; where the stock processor holds weights (IP-Adapter) it is an nn.Module holding those same
weights under the same names, so the state_dict is the stock one (`make_processor`). It recomputes q, k, v exactly as the stock processor it replaces, asks the runtime for the
layer's edit, and calls one attention op. With no edit it makes the stock processor's exact SDPA call, so
outputs are bitwise identical to stock (but on the `reference` backend, which computes every layer explicitly).
"""

from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import PipelineChangedError, UnsupportedError
from ..kernels.spec import AttentionSpec, IdentityCache, version
from .edit import AttentionCall, Edit

if TYPE_CHECKING:
    from ..families.base import LayerInfo, ModelAdapter


#: The first layer's mask of a forward, by the denoiser input it is made from (`ControlledProcessor.layer_mask`); an
#: entry goes with that input.
_LAYER_MASKS = IdentityCache(4)


class Runtime(Protocol):
    """What a controlled processor asks of the handle's per-call state (`attnctl.pipelines.runtime.Runtime`)."""

    backend: str
    adapter: ModelAdapter
    prefilled: bool  # a compiled forward: the processors read the edits prefilled before it (`edit_now`)

    def edit_for(self, layer: LayerInfo) -> Edit | None: ...

    def layer_call(self, layer: LayerInfo, module: torch.nn.Module, edit: Edit) -> AttentionCall: ...

    def backend_for(
        self, layer: LayerInfo, device: torch.device, features: tuple[str, ...], dense_elements: int = 0,
        shape: tuple[int, int] | None = None,
    ) -> str: ...


class ControlledProcessor:
    """Base class; subclasses implement `__call__` for one family of attention modules.

    Build one with `make_processor`: a stock processor that holds weights (IP-Adapter) gets the
    `nn.Module` variant of the class, whose children are the stock processor's own, so that the weights
    stay in the denoiser's module tree while attnctl is applied (`.to()`, state_dict, offload hooks see
    them exactly as before, under the same names).
    """

    # Kept so that diffusers' set_attention_backend / enable_parallelism find what they look for; a change
    # after apply is detected at the next pipeline call.
    _attention_backend = None
    _parallel_config = None
    edit_now = None  # this layer's edit, computed before a compiled forward (`Runtime.prefill_edits`)
    inert = False  # set by Handle.remove(): a processor still held somewhere is a pass-through to the stock one

    def __init__(self, layer: LayerInfo | None = None, runtime: Runtime | None = None, original: Any = None):
        if layer is None or runtime is None or original is None:  # diffusers rebuilds processors as `type(p)()`
            raise PipelineChangedError(
                f"attnctl: {type(self).__name__} is made by attnctl.apply only: something rebuilt the attention "
                "processors by class while an attnctl handle was applied (diffusers' IP-Adapter loading and unloading "
                "do); call handle.remove() before such calls and apply again afterwards"
            )
        if isinstance(self, torch.nn.Module):
            torch.nn.Module.__init__(self)
            for name, child in original.named_children():
                self.add_module(name, child)  # the same module objects: moved and cast together with ours
            for name, parameter in original.named_parameters(recurse=False):
                self.register_parameter(name, parameter)
            for name, buffer in original.named_buffers(recurse=False):
                self.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
            self.__dict__["original"] = original  # not a child: its weights are registered above
        else:
            self.original = original
        self.layer = layer
        self.runtime = runtime
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.installed_backend = self._attention_backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layer.name!r}, wraps {type(self.original).__name__})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        """It copies and pickles as the stock processor it stands for, rebuilt as `(original,)[0]`: a copy shares the
        copied original, a pickle needs no attnctl. Live, e.g. diffusers' ComponentsManager deep-copying
        `attn_processors` for its report; once its handle is removed (inert), e.g. after `unfuse_qkv_projections` put
        back the processors `fuse_qkv_projections` saved while the handle was live. A copy or pickle of the denoiser or
        pipeline with a live handle is still refused, by the runtime its hooks reach."""
        return operator.getitem, ((self.original,), 0)

    def stock_sdpa(self) -> bool:
        """Whether a layer without edits makes the stock SDPA call (auto or sdpa backend)."""
        return self.runtime.backend in ("auto", "sdpa")

    def plain_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention without edits, (B, H, N, D) layout."""
        if self.stock_sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        backend = self.runtime.backend_for(self.layer, q.device, ("attn_mask",) if attn_mask is not None else ())
        out, _ = kernels.BACKENDS[backend].fn(q, k, v, AttentionSpec(attn_mask=attn_mask))
        return out

    def attention(
        self, call: AttentionCall | None, edit: Edit | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The layer's attention, (B, H, N, D) layout: the edit's when there is one, else the plain one."""
        if edit is None:
            return self.plain_attention(q, k, v, attn_mask)
        return self.edited_attention(call, edit, q, k, v, attn_mask)

    def edited_attention(
        self, call: AttentionCall, edit: Edit, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention with the edit's spec on the chosen backend, wrapped by the edit's hooks, (B, H, N, D)."""
        spec = edit.spec(attn_mask=self.layer_mask(call, attn_mask), geometry=call.geometry)
        fn = self.compute
        for hook in reversed(edit.hooks):
            fn = _bind_hook(hook, call, fn)
        out, _ = fn(q, k, v, spec)
        return out

    def layer_mask(self, call: AttentionCall, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The model's mask of this layer as the first layer of the forward got it, where the family makes every layer's
        mask the same way from one denoiser input (`ModelAdapter.layer_mask_input`): the layers then pass one tensor,
        so that the backends' caches per mask tensor hold (the mask plus a label mask, a sub-attention's part of it)
        and make those once per denoiser call. Inside a graph, or with autograd on (the tensor of a pass without it
        must not reach one with it), the layer's own mask."""
        name = self.runtime.adapter.layer_mask_input
        if attn_mask is None or name is None or torch.compiler.is_compiling() or torch.is_grad_enabled():
            return attn_mask
        source = (call.frame.inputs or {}).get(name)
        if not isinstance(source, torch.Tensor):
            return attn_mask
        extra = (version(source), tuple(attn_mask.shape), attn_mask.dtype, attn_mask.device)
        found = _LAYER_MASKS.get((source,), extra)
        return _LAYER_MASKS.put((source,), extra, attn_mask) if found is None else found

    def compute(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One attention op with `spec` on the backend the runtime picks for it (hooks call it through `attend`)."""
        features = spec.features()
        if (not features or features == ("attn_mask",)) and self.stock_sdpa():
            return kernels.sdpa.attention(q, k, v, spec)
        dense = kernels.sdpa.mask_elements(spec, q.shape[0], q.shape[2], k.shape[2])
        backend = self.runtime.backend_for(self.layer, q.device, features, dense, (q.shape[2], q.shape[3]))
        return kernels.BACKENDS[backend].fn(q, k, v, spec)

    def query_hooks(self, call: AttentionCall | None, edit: Edit | None, q_proj: torch.Tensor) -> torch.Tensor:
        if edit is not None:
            for hook in edit.hooks:
                q_proj = hook.query(call, q_proj)
        return q_proj

    def begin(self, attn: torch.nn.Module, hidden: torch.Tensor, context: Any) -> tuple[Edit | None, AttentionCall | None, Any, torch.Tensor]:
        """Look up the edit; returns (edit, call, reused result or None, hidden after token hooks)."""
        return self.begin_edit(self.lookup_edit(), attn, hidden, context)

    def lookup_edit(self) -> Edit | None:
        """This layer's edit in the denoiser call in progress (None: the stock op)."""
        return self.edit_now if self.runtime.prefilled else self.runtime.edit_for(self.layer)  # compiled: prefilled

    def begin_edit(
        self, edit: Edit | None, attn: torch.nn.Module, hidden: torch.Tensor, context: Any,
    ) -> tuple[Edit | None, AttentionCall | None, Any, torch.Tensor]:
        """`begin` with the edit already looked up (`lookup_edit`): for a processor that hands the controls other
        tokens than its input only when there is an edit (Z-Image's image padding)."""
        if edit is None:
            return None, None, None, hidden
        call = self.runtime.layer_call(self.layer, attn, edit)
        check_tokens(call, hidden)
        for hook in edit.hooks:
            reused = hook.reuse(call, hidden, context)
            if reused is not None:
                return edit, call, reused, hidden
        for hook in edit.hooks:
            hidden = hook.tokens_in(call, hidden)
        return edit, call, None, hidden

    def project_queries(self, attn: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Queries (B, H, N, D) of image tokens `hidden` (B, N, C) as this processor computes them (projection,
        heads, qk-norm; no RoPE): for controls that attend with other queries (agent tokens)."""
        raise UnsupportedError(f"attnctl: {type(self).__name__} cannot project other queries for {self.layer.name}")

    def project_context(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (R, H, T, D) of a text `context` (R, T, C) as this processor computes them for a
        cross-attention layer: for controls that attend to other prompts (regions)."""
        raise UnsupportedError(f"attnctl: {type(self).__name__} has no separate text keys at {self.layer.name}")

    def finish(self, call: AttentionCall | None, edit: Edit | None, result: Any) -> Any:
        if edit is not None:
            for hook in reversed(edit.hooks):
                result = hook.result(call, result)
        return result


def check_tokens(call: AttentionCall, hidden: torch.Tensor) -> None:
    """The layer's query tokens must be the ones the adapter's geometry describes: another library's token
    merging (tomesd) or a changed resolution inside the denoiser would otherwise reach the controls as a raw
    size mismatch, or silently edit the wrong tokens."""
    geometry = call.geometry
    expected = geometry.query_len if call.layer.concatenated else geometry.image_len
    found = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
    if found != expected:
        from ..errors import CallLayoutError

        raise CallLayoutError(
            f"attnctl: attention layer {call.layer.name} got {found} query tokens, but the denoiser's inputs give "
            f"{expected} ({'text + ' if call.layer.concatenated else ''}image grid {geometry.image_hw[0]}x{geometry.image_hw[1]}"
            f"{f', text {geometry.text_len}' if call.layer.concatenated else ''}); something inside the denoiser changed the "
            "token count (token merging such as tomesd?). attnctl's controls need the layer's own tokens; use attnctl.ToMe "
            "for token merging"
        )


def make_processor(cls: type[ControlledProcessor], layer: LayerInfo, runtime: Runtime, original: Any) -> ControlledProcessor:
    """The controlled processor of `cls` replacing `original` at `layer`: the `nn.Module` variant when the
    original processor holds weights (IP-Adapter), a plain object otherwise (it never enters a state_dict)."""
    holds_weights = isinstance(original, torch.nn.Module) and (
        next(original.parameters(), None) is not None or next(original.buffers(), None) is not None
    )
    return (_module_variant(cls) if holds_weights else cls)(layer, runtime, original)


@functools.cache
def _module_variant(cls: type[ControlledProcessor]) -> type[ControlledProcessor]:
    """`cls` as an `nn.Module` (its own `__call__`, as diffusers' processor modules have)."""
    return type(cls.__name__, (cls, torch.nn.Module), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _bind_hook(hook, call, inner):
    def fn(q, k, v, spec):
        return hook.attend(call, q, k, v, spec, inner)

    return fn
