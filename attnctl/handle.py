"""`attnctl.apply(pipe, controls)` and the `Handle` it returns.

apply() installs one controlled processor per attention layer of the pipeline's denoiser (through the
public `set_processor` of each attention module), registers a forward pre-hook and a forward hook on the
denoiser, and wraps, at instance level only, the other hook points of docs/architecture.md: the pipeline's
`check_inputs`, `encode_prompt` and
`maybe_free_model_hooks`, the scheduler's `step`, and Flux's `cache_context`. `Handle.remove()` puts
everything back exactly; it is idempotent, and `with attnctl.apply(...)` calls it on exit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .control import Control, VideoFrames
from .errors import BackendError, ConfigError, HandleError, PipelineChangedError, UnsupportedError
from .families import adapter_for, adapter_for_experts  # noqa: F401 - adapter_for: read by tests and tools
from .families.base import LayerInfo, ModelAdapter
from .foreign_patches import (
    Snapshot,
    attention_caches,
    cache_removal_hint,
    compiled_parts,
    diffusers_caches,
    foreign_patches,
    module_list,
    refuse_batch_splitting_cache,
    refuse_cache_conflicts,
    refuse_context_parallel,
    refuse_stateful_forward_compiled,
    refuse_uncompilable,
    summarize,
    uncompiled,
)
from .instance import Wrapped, describe_callable, wrap_method
from .kernels import TRACEABLE_BACKENDS, check_features, choose_backend, clear_caches, validate_backend
from .pipelines.denoiser import DenoiserHooks, hook_device, placement_devices, reference_refusal
from .pipelines.protocol import protocol_for
from .pipelines.runtime import CallOwner, Runtime
from .processors import processor_for
from .processors.base import ControlledProcessor, make_processor
from .processors.edit import CALL_EFFECTS, EFFECTS, HELD_BY_CACHE, call_conflict, effect_conflict
from .selection import describe_layers

# The live handle of each controlled denoiser, both held weakly: a pipeline dropped without handle.remove() (a notebook
# cell run again, a Model never released) is freed with its handle; while the pipeline lives, its wrappers hold the
# handle.
_LIVE: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ReferenceType[Handle]] = weakref.WeakKeyDictionary()
# The live handle of each controlled pipeline, likewise: a pipeline whose denoiser was swapped after apply still holds
# that handle's wrappers, and is refused another apply until it is removed.
_LIVE_PIPELINES: weakref.WeakKeyDictionary[Any, weakref.ReferenceType[Handle]] = weakref.WeakKeyDictionary()


def _live_handle(denoiser: torch.nn.Module) -> Handle | None:
    found = _LIVE.get(denoiser)
    return found() if found is not None else None


def _any_live() -> bool:
    """Whether any handle is live (on any denoiser or pipeline)."""
    return any((handle := ref()) is not None and handle.live for live in (_LIVE, _LIVE_PIPELINES) for ref in list(live.values()))


def _live_pipeline_handle(pipe: Any) -> Handle | None:
    found = _LIVE_PIPELINES.get(pipe)
    return found() if found is not None else None

CHANGE_HINT = (
    "calls such as load_ip_adapter, fuse_qkv_projections, set_attn_processor or set_attention_backend replace or "
    "reconfigure processors; make them before attnctl.apply, or call handle.remove() first and apply again afterwards "
    "(set_default_attn_processor installs diffusers' AttnProcessor, which attnctl does not reproduce: keep "
    "AttnProcessor2_0)"
)


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, torch.nn.Module):
            return attribute, module
    if isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module):  # Wan 2.2's low-noise expert alone
        raise UnsupportedError(
            f"attnctl: {type(pipe).__name__} holds a `transformer_2` but no `transformer` (transformer=None); attnctl "
            "controls transformer_2 only as the second expert beside a transformer. Pass that expert as `transformer` "
            f"instead (e.g. {type(pipe).__name__}(..., transformer=pipe.transformer_2) with no boundary_ratio: it runs "
            "every step, with guidance_scale in place of guidance_scale_2)"
        )
    raise UnsupportedError(
        f"attnctl: {type(pipe).__name__} holds neither a `unet` nor a `transformer`; attnctl.apply needs a diffusers "
        "pipeline whose denoiser is one of those"
    )


def _image_projection(denoiser: torch.nn.Module) -> tuple[Any, Any, Any]:
    """The denoiser's projections as diffusers' IP-Adapter unloading changes them, by identity and value: the image
    projection, the config's `encoder_hid_dim_type`, and the text projection an IP-Adapter moved aside (Kolors)."""
    config = getattr(denoiser, "config", None)
    return (getattr(denoiser, "encoder_hid_proj", None), getattr(config, "encoder_hid_dim_type", None),
            getattr(denoiser, "text_encoder_hid_proj", None))


def _has_ip_adapter(denoiser: torch.nn.Module) -> bool:
    """Whether an IP-Adapter is loaded into `denoiser` (its image projection: UNets also say so in their config; SD3
    keeps it in `image_proj`)."""
    projection, kind, _ = _image_projection(denoiser)
    return (kind == "ip_image_proj" or "ImageProjection" in type(projection).__name__
            or getattr(denoiser, "image_proj", None) is not None)


def _restore_image_projection(denoiser: torch.nn.Module, saved: tuple[Any, Any, Any]) -> None:
    """Put back what an IP-Adapter unload changed before attnctl refused it (it rebuilds the processors last)."""
    denoiser.encoder_hid_proj, denoiser.config.encoder_hid_dim_type, text = saved
    if hasattr(denoiser, "text_encoder_hid_proj"):
        denoiser.text_encoder_hid_proj = text


def _refuse_modular(pipe: Any) -> None:
    """diffusers' modular pipelines run blocks that encode the prompt and call the denoiser from a shared state,
    without the pipeline-object methods (`check_inputs`, `encode_prompt`, `maybe_free_model_hooks`) where attnctl
    reads a call's prompts and boundaries: refused with what is missing (README, "what differs per family")."""
    if any(klass.__name__ == "ModularPipeline" for klass in type(pipe).__mro__):
        raise UnsupportedError(
            f"attnctl: {type(pipe).__name__} is a diffusers modular pipeline; its blocks encode the prompt and call the "
            "denoiser without the pipeline methods attnctl reads a call from (check_inputs, encode_prompt, "
            "maybe_free_model_hooks). Missing: the call's prompt text (it enters a PipelineState inside "
            "ModularPipeline.__call__ and reaches the text-encoder block through type-level calls no instance hook "
            "sees) and the call's end; the CFG rows and steps would be readable from the `guider` component "
            "(prepare_inputs / set_state), but not the words. Modular pipelines are not supported yet; use the family's "
            "classic pipeline (e.g. Flux2KleinPipeline, QwenImagePipeline, WanPipeline)"
        )


def _refuse_pag_pipeline(pipe: Any) -> None:
    """diffusers' PAG pipelines (PAGMixin; Ahn et al. 2024, arXiv:2403.17377) swap their own processors into the PAG
    layers after `check_inputs`, batch a third, perturbed row group that no call protocol of attnctl's knows, and put
    the processors back only when the call completes: refused, pointing to attnctl's own PAG on the plain pipeline."""
    mixin = any(klass.__name__ == "PAGMixin" for klass in type(pipe).__mro__)
    if mixin or hasattr(pipe, "_pag_attn_processors") or hasattr(pipe, "pag_applied_layers"):
        raise UnsupportedError(
            f"attnctl: {type(pipe).__name__} is a diffusers PAG pipeline: it swaps its own PAG attention processors in "
            "during each call and adds perturbed rows to the batch, which attnctl's processors cannot compose with. "
            "Apply attnctl.PAG(scale=..., layers=...) to the plain pipeline instead (the AutoPipelineFor* class's "
            "from_pipe(pipe, enable_pag=False) makes it, sharing the components), e.g. "
            "attnctl.apply(AutoPipelineForText2Image.from_pipe(pipe, enable_pag=False), [attnctl.PAG(scale=3.0)])"
        )


def _left_by_pag_call(processor: Any) -> bool:
    """Whether `processor` is one of diffusers' PAG processors (PAGIdentitySelfAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0, ...). A PAG pipeline sets them on its layers for one call, over the processors it
    found, and sets those back only when the call completes; with a live handle such a call always fails (a PAG
    pipeline is refused at apply, and a denoiser shared through from_pipe refuses a call of another pipeline), so one
    found where attnctl's processor was is a failed call's leftover, standing where that call would have put attnctl's."""
    klass = type(processor)
    return klass.__name__.startswith("PAG") and klass.__module__.startswith("diffusers.")


def _refuse_uncomposable(
    entry: torch.nn.Module, denoiser: torch.nn.Module, attribute: str, controls: tuple[Control, ...], adapter: ModelAdapter
) -> list[str]:
    """What attnctl refuses to compose with, with the reason (attnctl/foreign_patches.py): a control not verified to run
    in a compiled denoiser (torch.compile(m), m.compile(), compiled blocks), a control that would cache or
    capture what a diffusers cache skips, and context parallelism. Returns how the denoiser is compiled
    (`compiled_parts`). One walk of the module tree serves every check."""
    modules = module_list(denoiser)
    parts = compiled_parts(entry, denoiser, modules)
    refuse_uncompilable(controls, parts, attribute, adapter)
    refuse_stateful_forward_compiled(controls, parts, denoiser, attribute)
    refuse_cache_conflicts(controls, diffusers_caches(denoiser, modules), attribute, denoiser)  # diffusers' caches and context
    refuse_batch_splitting_cache(controls, denoiser, attribute)  # after: its advice (the distilled form) suits the rest
    refuse_context_parallel(denoiser, attribute, modules)  # parallelism: checked at the same times (apply, every call)
    return parts


def apply(pipe: Any, controls: Control | Iterable[Control] = (), *, backend: str = "auto") -> Handle:
    """Attach `controls` (one control or several) to the attention layers of `pipe`'s denoiser and return a
    removable handle.

    Works on any diffusers pipeline object holding a `unet` (SD 1.x/2.x, SDXL) or a `transformer` (SD3,
    Flux, PixArt, and the families of `attnctl.families`), including img2img, inpaint and ControlNet variants; a
    pipeline with a second expert (Wan 2.2's `transformer_2`) is controlled on both. The pipeline is never forked or
    subclassed and no class is patched. `backend` is "auto", "reference", "sdpa", "flex" or "triton"; an
    explicit backend must run on the device the denoiser runs on now (checked here, and again per call).
    Everything is checked before anything is installed: a refused apply leaves the pipeline untouched.
    """
    backend = validate_backend(backend)
    controls = _control_tuple(controls)
    for position, control in enumerate(controls):
        if not isinstance(control, Control):
            raise ConfigError(f"attnctl.apply takes attnctl controls, got {control!r} ({type(control).__name__})")
        if any(_same_control(control, earlier) for earlier in controls[:position]):
            raise ConfigError(
                f"attnctl.apply got the same control twice: {control!r}. Give it once: twice, its effect would apply "
                "twice (weights multiplied, guidance terms added); to strengthen it, raise its scale or factor"
            )
    _refuse_modular(pipe)
    _refuse_pag_pipeline(pipe)
    if CallOwner.find(pipe) is not None:
        raise HandleError(
            f"attnctl.apply was called during a call of this {type(pipe).__name__} (from a callback?): the call's prompts "
            "and steps are already under way; apply before calling the pipeline"
        )
    attribute, entry = denoiser_of(pipe)
    entries = _experts(pipe, attribute, entry)
    denoisers = {name: uncompiled(module) for name, module in entries.items()}  # torch.compile(m): attnctl hooks m
    denoiser = denoisers[attribute]  # itself, dynamo traces through the hooks' calls
    for name, module in denoisers.items():
        live = _live_handle(module)
        if live is not None and live.live:
            raise HandleError(
                f"attnctl: pipe.{name} already has a live attnctl handle (applied to a {type(live.pipeline).__name__}); "
                "pipelines made with from_pipe share the denoiser. Call handle.remove() before applying again (a handle "
                "no longer at hand: error.handle.remove())", handle=live,
            )
    live = _live_pipeline_handle(pipe)
    if live is not None and live.live:  # its denoiser was replaced since (the check above found none on the new one)
        raise HandleError(
            f"attnctl: this {type(pipe).__name__} still has a live attnctl handle, applied to the pipe.{live.attribute} it "
            f"held before pipe.{live.attribute} was replaced; remove it first: handle.remove() (a handle no longer at "
            "hand: error.handle.remove()), then apply again", handle=live,
        )
    _refuse_split_placement(denoisers)
    adapter = adapter_for_experts(denoisers)  # first: an unsupported denoiser's error lists the supported ones
    for method in ("encode_prompt",):
        if not callable(getattr(pipe, method, None)):
            raise UnsupportedError(f"attnctl: {type(pipe).__name__} has no {method}(); attnctl reads the prompts there")
    compiled = [part for name, module in entries.items() for part in _refuse_uncomposable(module, denoisers[name], name, controls, adapter)]
    problems = [found for module in denoisers.values() for found in foreign_patches(module, adapter.modules if module is denoiser else {})]
    if problems:
        raise PipelineChangedError(
            f"attnctl: cannot apply to pipe.{attribute}: {summarize(problems)}. Undo the other library's patch before "
            "attnctl.apply (tomesd.remove_patch(pipe), tgate's cleanup), or use attnctl's own ToMe / TGate"
        )
    lineage = [klass.__name__ for klass in type(pipe).__mro__]  # a subclass of a refused pipeline does what it does
    refused = next((adapter.refused_pipelines[name] for name in lineage if name in adapter.refused_pipelines), None)
    if refused is not None:
        raise UnsupportedError(f"attnctl: {type(pipe).__name__} is not supported: it {refused}")
    protocol = protocol_for(adapter.family)
    resolved = _resolve(controls, adapter)
    if any(name in adapter.reference_pipelines for name in lineage):
        reason = reference_refusal(controls, resolved, adapter, f"every {type(pipe).__name__} call holds its image's tokens as a reference")
        if reason is not None:
            raise UnsupportedError(reason)
    _refuse_windows_under_attention_caches(controls, resolved, adapter, attribute)
    features = tuple(control.kernel_features(adapter, resolved[position]) for position, control in enumerate(controls))
    for control, needed in zip(controls, features):
        check_features(backend, needed, type(control).__name__)
    _check_backend_device(backend, denoiser, controls, features)
    if compiled:
        _check_traced_backend(backend, controls, features)
    _refuse_readout(pipe, controls, bool(compiled))
    processor_cls, supported = processor_for(adapter.family)
    originals = {name: _stock_processor(module.processor) for name, module in adapter.modules.items()}
    unsupported = sorted({type(p).__name__ for p in originals.values() if type(p).__name__ not in supported})
    if unsupported:
        default = (
            f"; set_default_attn_processor() installs AttnProcessor: set AttnProcessor2_0 back with "
            f"pipe.{attribute}.set_attn_processor(AttnProcessor2_0())"
            if "AttnProcessor" in unsupported and "AttnProcessor2_0" in supported else ""
        )
        raise UnsupportedError(
            f"attnctl: {type(denoiser).__name__} has attention processor(s) {', '.join(unsupported)}, which attnctl "
            f"cannot reproduce; supported for this family: {', '.join(supported)}{default}"
        )
    runtime = Runtime(pipe, adapter, protocol, controls, resolved, backend)
    handle = Handle(pipe, attribute, adapter, runtime, originals)
    try:
        handle._install(processor_cls)
    except BaseException:
        handle.remove()
        raise
    return handle


def _on_top(record: Wrapped) -> bool:
    """Whether attnctl's wrapper is still what `record.obj.<name>` holds (or what accelerate's hook calls)."""
    held = record.obj.__dict__
    return held.get(record.name) is record.wrapper or held.get("_old_forward") is record.wrapper


def _refuse_readout(pipe: Any, controls: tuple[Control, ...], compiled: bool) -> None:
    """A control that reads the call's result after it (`Control.reads_after_call`) needs an img2img pass of the
    pipeline, which video pipelines do not have, and steps the handle aside for it, which would recompile a compiled
    denoiser at every call (its hooks come off and on): refused at apply and at every call, before the generation.
    Magnets on a pipeline none of whose calls can be their readout pass (an inpainting call; Flux Kontext's, with no
    img2img pipeline) are refused here too (`magnets_refusal`)."""
    from .controls.maps.capture import AttentionMaps, magnets_refusal

    if any(isinstance(control, AttentionMaps) and control.magnets for control in controls):
        refused = magnets_refusal(pipe)
        if refused is not None:
            raise UnsupportedError(refused)
    readers = [control for control in controls if control.reads_after_call(pipe)]
    if not readers:
        return
    from .families import img2img_name
    from .pipelines.readout import refuse_unreadable

    what = f"{type(readers[0]).__name__}(magnets=...) on a text-to-image pipeline"
    refuse_unreadable(pipe, owner=what)
    conditions = [name for name in ("controlnet", "adapter") if getattr(pipe, name, None) is not None]
    conditions += [name for name in ("control_image",) if name in inspect.signature(type(pipe).__call__).parameters]
    conditions += [f"the IP-Adapter of pipe.{name}" for name, module in _experts(pipe, *denoiser_of(pipe)).items()
                   if _has_ip_adapter(module)]
    if conditions:
        raise UnsupportedError(
            f"attnctl: {what} reads the call's images in an img2img pass after it, which would not get this call's "
            f"conditions ({', '.join(conditions)}); generate without magnets, then read the images with "
            "attnctl.read_maps on an img2img pipeline given the same conditions"
        )
    import diffusers

    if not hasattr(diffusers, img2img_name(pipe)):
        raise UnsupportedError(
            f"attnctl: {what} reads the call's images in an img2img pass after it, and diffusers has no "
            f"{img2img_name(pipe)} to make of {type(pipe).__name__}; generate without magnets and read the images with "
            "attnctl.read_maps(img2img_pipe, images, prompt, words) on an img2img pipeline of the model"
        )
    if compiled:
        raise UnsupportedError(
            f"attnctl: {what} runs its readout pass after each call with attnctl's hooks taken off the denoiser and put "
            "back, which makes a compiled denoiser recompile at every call; apply to the uncompiled denoiser, or generate "
            "with the compiled one and read the images with attnctl.read_maps after handle.remove()"
        )


def _stock_processor(processor: Any) -> Any:
    """The processor to reproduce and restore: a processor of a removed handle (no live handle holds this denoiser,
    checked before) that diffusers put back, e.g. `unfuse_qkv_projections` restoring the processors saved at fuse
    time, stands for the stock processor it wrapped."""
    while isinstance(processor, ControlledProcessor):
        processor = processor.original
    return processor


def _same_control(a: Control, b: Control) -> bool:
    """The same object, or an equal control of the same class (a field holding a tensor, such as an in-memory region
    mask, cannot be compared by value: such controls count as the same only when they are one object)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def _experts(pipe: Any, attribute: str, entry: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The pipeline's denoiser and its second expert where it has one (Wan 2.2 A14B's `transformer_2`, which runs the
    low-noise steps below the pipeline's `boundary_ratio`), by attribute: one handle controls both."""
    experts = {attribute: entry}
    second = getattr(pipe, f"{attribute}_2", None)
    if isinstance(second, torch.nn.Module):
        experts[f"{attribute}_2"] = second
    return experts


def _control_tuple(controls: Any) -> tuple[Control, ...]:
    """`controls` as a tuple: one control, or an iterable of controls (anything else: ConfigError)."""
    if isinstance(controls, Control):
        return (controls,)
    if isinstance(controls, (str, bytes, Mapping)) or not isinstance(controls, Iterable):
        raise ConfigError(
            f"attnctl.apply takes one attnctl control or a list of them, got {controls!r} ({type(controls).__name__})"
        )
    return tuple(controls)


def execution_device(denoiser: torch.nn.Module) -> torch.device:
    """The device the denoiser runs on: the execution device of its accelerate hooks (model or sequential CPU
    offload), else the device of its parameters."""
    for module in denoiser.modules():
        device = hook_device(module)
        if device is not None:
            return device
    parameter = next(denoiser.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _refuse_split_placement(denoisers: dict[str, torch.nn.Module]) -> None:
    """A denoiser (with its experts) must run whole on one device: the controls make their tensors for a call once, on
    the device its layers run on (`Runtime.layer_device`); a denoiser split over devices (`from_pretrained(...,
    device_map="auto")`: layers on several devices) would need them on each layer's."""
    found = {name: placement_devices(module) for name, module in denoisers.items()}
    devices = set().union(*found.values())
    if len(devices) > 1:
        where = "; ".join(f"pipe.{name} on {', '.join(sorted(map(str, placed)))}" for name, placed in found.items())
        raise UnsupportedError(
            f"attnctl: the denoiser runs on several devices ({where}), and attnctl's controls make their tensors for one "
            "device per call. Supported: the denoiser whole on one device (with its second expert), the other components "
            "anywhere: a pipeline-level device_map='balanced', enable_model_cpu_offload, sequential CPU offload and group "
            "offload to one device. Load the denoiser on one device (no device_map='auto' / 'balanced' on the model itself)"
        )


def _check_backend_device(
    backend: str, denoiser: torch.nn.Module, controls: tuple[Control, ...], features: tuple[tuple[str, ...], ...]
) -> None:
    """An explicit backend must run on the denoiser's current device, for plain layers and every control
    (calls check again: the pipeline may move later)."""
    if backend == "auto":
        return
    device = execution_device(denoiser)
    for owner, needed in (("attnctl's layers", ()),) + tuple((type(c).__name__, f) for c, f in zip(controls, features)):
        try:
            choose_backend(backend, device, needed)
        except BackendError as error:
            raise BackendError(
                f"attnctl: backend {backend!r} cannot run {owner} on the denoiser's device ({device}): {error}"
            ) from None


def _check_traced_backend(backend: str, controls: tuple[Control, ...], features: tuple[tuple[str, ...], ...]) -> None:
    """In a compiled denoiser, label masks run on a backend that builds them inside the graph (`choose_traced_backend`):
    an explicit fused backend is refused for a control that needs them."""
    for control, needed in zip(controls, features):
        if "labels" in needed and backend not in ("auto", *TRACEABLE_BACKENDS):
            raise BackendError(
                f"attnctl: {type(control).__name__} needs label masks, which backend {backend!r} builds on the host "
                "(torch.compile cannot trace that) and the denoiser is compiled; use backend='auto' or 'sdpa' (label "
                "masks then run on sdpa in the graph), or apply to the uncompiled denoiser"
            )


def _resolve(controls: tuple[Control, ...], adapter: ModelAdapter) -> dict[int, tuple[LayerInfo, ...]]:
    resolved: dict[int, tuple[LayerInfo, ...]] = {}
    for position, control in enumerate(controls):
        control.validate_traits(adapter)
        control.validate_for(adapter)
        resolved[position] = control.select(adapter)
    _check_call_effects(controls, adapter)  # first: disjoint layers would not lift a call-wide conflict
    _check_effects(controls, resolved, adapter)
    _check_output_keys(controls)
    return resolved


def _check_call_effects(controls: tuple[Control, ...], adapter: ModelAdapter) -> None:
    """Refuse two controls whose effects on the call as a whole cannot go together (`processors.edit.CALL_CONFLICTS`)."""
    declared = []
    for control in controls:
        effects = tuple(control.call_effects(adapter))
        unknown = [effect for effect in effects if effect not in CALL_EFFECTS]
        if unknown:
            raise ConfigError(
                f"attnctl: {type(control).__name__}.call_effects gave unknown effect(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(CALL_EFFECTS)}"
            )
        declared.append((control, effects))
    for i, (first, first_effects) in enumerate(declared):
        for second, second_effects in declared[i + 1 :]:
            for a in first_effects:
                for b in second_effects:
                    why = call_conflict(a, b)
                    if why is not None:
                        raise ConfigError(
                            f"attnctl: {type(first).__name__} ({a}) and {type(second).__name__} ({b}) cannot be applied "
                            f"together: {why}; run them in separate calls"
                        )


def _check_effects(controls: tuple[Control, ...], resolved: dict[int, tuple[LayerInfo, ...]], adapter: ModelAdapter) -> None:
    """Refuse two controls whose effects on a layer they share cannot go together (`processors.edit.CONFLICTS`)."""
    per_layer: dict[int, list[tuple[Control, tuple[str, ...]]]] = {}
    for position, control in enumerate(controls):
        for layer in resolved[position]:
            effects = tuple(control.layer_effects(adapter, layer))
            unknown = [effect for effect in effects if effect not in EFFECTS]
            if unknown:
                raise ConfigError(
                    f"attnctl: {type(control).__name__}.layer_effects gave unknown effect(s) {', '.join(map(repr, unknown))} "
                    f"for layer {layer.name}; known: {', '.join(EFFECTS)}"
                )
            if effects:
                per_layer.setdefault(layer.index, []).append((control, effects))
    for layer in adapter.layers:
        entries = per_layer.get(layer.index, [])
        for i, (first, first_effects) in enumerate(entries):
            for second, second_effects in entries[i + 1 :]:
                for a in first_effects:
                    for b in second_effects:
                        why = effect_conflict(a, b) or _windowed_under_cache(first, a, second, b)
                        if why is not None:
                            raise ConfigError(
                                f"attnctl: {type(first).__name__} ({a}) and {type(second).__name__} ({b}) cannot share "
                                f"layer {layer.name}: {why}; give them disjoint layers (their `layers` argument)"
                            )


def _windowed_under_cache(first: Control, first_effect: str, second: Control, second_effect: str) -> str | None:
    """Why an edit limited to some steps cannot share a layer with a cache, or None: the cache reuses outputs made at
    other steps, so the edit would be skipped where it should act, or kept where it should not."""
    for cache, edit, effect in ((first_effect, second, second_effect), (second_effect, first, first_effect)):
        if cache == "cache":
            why = _held_by_cache(edit, effect)
            if why is not None:
                return why
    return None


def _held_by_cache(edit: Control, effect: str) -> str | None:
    """Why `edit`'s `effect` cannot hold on a layer whose output a cache reuses across steps, or None."""
    if effect not in HELD_BY_CACHE:
        return None
    start, stop = edit.step_window
    if (float(start), float(stop)) != (0.0, 1.0):
        return (
            f"the cache reuses this layer's output from other steps, so {type(edit).__name__}'s step window "
            f"steps=({float(start):g}, {float(stop):g}) cannot hold there (the edit would be skipped on reused steps "
            "inside it, or carried on past it); give it every step (steps=(0, 1)) to compose"
        )
    if edit.varies_by_step:
        return (
            f"the cache reuses this layer's output from other steps, so {type(edit).__name__}'s weights that change "
            "per step (a ramp or a callable of the step) would stay at the stored step's values; give constant "
            "weights to compose"
        )
    return None


def _refuse_windows_under_attention_caches(
    controls: tuple[Control, ...], resolved: dict[int, tuple[LayerInfo, ...]], adapter: ModelAdapter, attribute: str
) -> None:
    """diffusers' attention-output caches (PyramidAttentionBroadcast, FasterCache, TaylorSeer) reuse a layer's output
    by schedule, as TGate does: an edit there must act at every step with constant weights (`_held_by_cache`).
    Checked at apply and at every call (a cache may be enabled after apply)."""
    cached = attention_caches(adapter.modules)
    if not cached:
        return
    for position, control in enumerate(controls):
        for layer in resolved[position]:
            cache = cached.get(layer.name)
            if cache is None:
                continue
            for effect in control.layer_effects(adapter, layer):
                why = _held_by_cache(control, effect)
                if why is not None:
                    raise UnsupportedError(
                        f"attnctl: {type(control).__name__} ({effect}) cannot act on layer {layer.name} under diffusers' "
                        f"{cache}: {why}, or {cache_removal_hint(adapter.expert_of(layer), adapter.expert_name(adapter.expert_of(layer)) or attribute)}"
                    )


def _check_output_keys(controls: tuple[Control, ...]) -> None:
    """Refuse two controls that would publish under the same `handle.outputs` key."""
    publishers: dict[str, Control] = {}
    for control in controls:
        key = getattr(control, "output_key", None)
        if key is None:
            continue
        other = publishers.get(key)
        if other is not None:
            raise ConfigError(
                f"attnctl: {type(other).__name__} and {type(control).__name__} would both publish handle.outputs[{key!r}]; "
                "one output key per control"
            )
        publishers[key] = control


class Handle:
    """A live attachment of controls to one pipeline's denoiser. Use `remove()` or a `with` block."""

    def __init__(self, pipe: Any, attribute: str, adapter: ModelAdapter, runtime: Runtime, originals: dict[str, Any]):
        self.pipeline = pipe
        self.attribute = attribute
        self.adapter = adapter
        self.runtime = runtime
        self._originals = originals
        self._processors: dict[str, ControlledProcessor] = {}
        self._wrapped: list[Wrapped] = []
        self._hooks: DenoiserHooks | None = None
        self._snapshots: list[Snapshot] = []
        self._scheduler_wraps: list[Wrapped] = []
        self._image_projections: dict[str, tuple[Any, Any, Any]] = {}
        self.live = False

    # -- installation -----------------------------------------------------------------------------------------
    def _install(self, processor_cls: type[ControlledProcessor]) -> None:
        for layer in self.adapter.layers:
            self._processors[layer.name] = make_processor(processor_cls, layer, self.runtime, self._originals[layer.name])
        self.live = True
        self._attach()

    def _attach(self) -> None:
        """Put this handle's processors, denoiser hooks and wraps in place (at apply, and again after a readout)."""
        pipe, runtime = self.pipeline, self.runtime
        denoiser = self.adapter.denoiser
        for layer in self.adapter.layers:
            self.adapter.modules[layer.name].set_processor(self._processors[layer.name])
        experts = self.denoisers()
        reuse_calls = any(control.reuses_calls(self.adapter) for control in self.controls)
        self._hooks = DenoiserHooks(
            runtime, denoiser, self._processors, tuple(m for m in experts.values() if m is not denoiser), reuse_calls=reuse_calls
        )
        self._snapshots = [Snapshot.take(m, self.adapter.modules if m is denoiser else {}) for m in experts.values()]
        if callable(getattr(pipe, "check_inputs", None)):
            self._wrapped.append(wrap_method(pipe, "check_inputs", self._make_call_start))
        self._wrapped.append(wrap_method(pipe, "encode_prompt", self._make_encode_prompt))
        if callable(getattr(pipe, "maybe_free_model_hooks", None)):
            self._wrapped.append(wrap_method(pipe, "maybe_free_model_hooks", self._make_call_end))
        if callable(getattr(pipe, "set_ip_adapter_scale", None)):
            self._wrapped.append(wrap_method(pipe, "set_ip_adapter_scale", self._make_on_stock_processors))
        for name in ("load_ip_adapter", "unload_ip_adapter"):
            if callable(getattr(pipe, name, None)):
                self._wrapped.append(wrap_method(pipe, name, functools.partial(self._make_refusal, f"pipe.{name}")))
        # reached by the IP-Adapter loading of any pipeline sharing the denoiser (from_pipe), not only this one's
        for attribute, expert in experts.items():
            if callable(getattr(expert, "_load_ip_adapter_weights", None)):
                label = f"pipe.{attribute}._load_ip_adapter_weights (load_ip_adapter, on any pipeline sharing it)"
                self._wrapped.append(wrap_method(expert, "_load_ip_adapter_weights", functools.partial(self._make_refusal, label)))
        self._image_projections = {attribute: _image_projection(expert) for attribute, expert in experts.items()}
        for expert in experts.values():
            if callable(getattr(expert, "cache_context", None)):
                self._wrapped.append(wrap_method(expert, "cache_context", self._make_cache_context))
        images = getattr(pipe, "image_processor", None)
        if any(control.needs_images for control in self.runtime.controls) and callable(getattr(images, "postprocess", None)):
            self._wrapped.append(wrap_method(images, "postprocess", self._make_postprocess))
        video = getattr(pipe, "video_processor", None)  # video pipelines (Wan): postprocess_video's result, per video
        if any(control.needs_images for control in self.runtime.controls) and callable(getattr(video, "postprocess_video", None)):
            self._wrapped.append(wrap_method(video, "postprocess_video", self._make_postprocess_video))
        self._wrap_scheduler()
        for expert in experts.values():
            _LIVE[expert] = weakref.ref(self)
        _LIVE_PIPELINES[pipe] = weakref.ref(self)

    def _wrap_scheduler(self) -> None:
        scheduler = getattr(self.pipeline, "scheduler", None)
        if scheduler is None or not callable(getattr(scheduler, "step", None)):
            return
        if any(w.obj is scheduler and w.active for w in self._scheduler_wraps):
            return
        runtime = self.runtime

        def make(original):
            def step(*args: Any, **kwargs: Any) -> Any:
                runtime.before_step()
                result = original(*args, **kwargs)
                runtime.scheduler_stepped()
                return result

            return step

        self._scheduler_wraps.append(wrap_method(scheduler, "step", make))

    def _make_call_start(self, original):
        signature = inspect.signature(original)

        def check_inputs(*args: Any, **kwargs: Any) -> Any:
            if self.runtime.internal:
                return original(*args, **kwargs)
            self.verify()
            try:  # the image size, when check_inputs names it (a hint: Flux reads its grid without a host sync)
                arguments = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                arguments = {}
            self.runtime.begin_call((arguments.get("height"), arguments.get("width")))
            return original(*args, **kwargs)

        return check_inputs

    def _make_encode_prompt(self, original):
        method = getattr(type(self.pipeline), "encode_prompt", None)  # the class's signature: another library's
        signature = inspect.signature(method.__get__(self.pipeline) if method is not None else original)  # wrapper may take *a, **k

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            if self.runtime.internal:
                return original(*args, **kwargs)
            if self.runtime.call is None or self.runtime.call.frames:
                self.verify()
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            index = self.runtime.record_encode(dict(bound.arguments))
            if index is None:  # inside the denoising loop (a callback): the call's record stays as it is
                with self.runtime.internal_calls():
                    return original(*args, **kwargs)
            out = original(*args, **kwargs)
            self.runtime.record_encoded(index, out)  # its text length (a separately encoded negative prompt's own)
            return out

        return encode_prompt

    def _make_on_stock_processors(self, original):
        """diffusers' `set_ip_adapter_scale` finds the IP-Adapter processors by class (SD / SDXL) or sets `scale` on
        whatever processor a layer holds (Flux): it runs with the stock processors in place, so that the scale
        reaches them, which attnctl's processors read and `remove()` puts back."""

        def on_stock_processors(*args: Any, **kwargs: Any) -> Any:
            modules = self.adapter.modules
            installed = [name for name, proc in self._processors.items() if modules[name].processor is proc]
            for name in installed:
                modules[name].set_processor(self._originals[name])
            try:
                return original(*args, **kwargs)
            finally:
                for name in installed:
                    modules[name].set_processor(self._processors[name])

        return on_stock_processors

    def _make_refusal(self, label: str, original):
        """diffusers' IP-Adapter loading and unloading rebuild every attention processor and change the denoiser's
        image projection: refused while applied, before anything changes."""

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PipelineChangedError(
                f"attnctl: {label} rebuilds the attention processors, which an applied attnctl handle holds; call "
                f"handle.remove() first, then that call, then attnctl.apply again (nothing was changed)"
            )

        return refuse

    def _make_call_end(self, original):
        def maybe_free_model_hooks(*args: Any, **kwargs: Any) -> Any:
            if self.runtime.internal:
                return original(*args, **kwargs)
            self.runtime.end_call()
            try:
                self._run_readouts()  # before the pipeline's own model offload, which then runs last as without attnctl
            except BaseException:
                original(*args, **kwargs)  # the offload and cache reset still happen; the readout's error goes on
                raise
            return original(*args, **kwargs)

        return maybe_free_model_hooks

    # -- readouts after a call ----------------------------------------------------------------------------------
    def _run_readouts(self) -> None:
        """The readout passes the ended call's controls left (`Bound.readout`: `AttentionMaps(magnets=...)` on a
        text-to-image pipeline), each run once, never inside the denoising loop. The pass applies its own handle to an
        img2img pipeline sharing the denoiser and the scheduler, so this handle steps aside for it: the stock
        processors, hooks and methods are put back and it is no longer registered as live; afterwards it is installed
        again as it was, also when a pass raises (its error then reaches the caller)."""
        call = self.runtime.last_call
        bound = [each for each in (call.bound or ()) if each.readout is not None] if call is not None else []
        if not bound or not self.live:
            return
        requests = [each.readout for each in bound]
        for each in bound:
            each.readout = None
        from .pipelines.readout import read_request

        self._step_aside()
        try:
            for request in requests:
                self.runtime.outputs[request.control.key] = read_request(apply, self.pipeline, request)
        finally:
            self._attach()

    def _refuse_stacked_wraps(self) -> None:
        """A readout needs attnctl's wraps taken off and put back: not possible where another library stacked on one."""
        stacked = [record for record in (*self._wrapped, *self._scheduler_wraps) if not _on_top(record)]
        if stacked:
            names = ", ".join(f"{type(record.obj).__name__}.{record.name}" for record in stacked)
            raise PipelineChangedError(
                f"attnctl: the readout pass after this call needs the stock pipeline, but another library stacked on "
                f"attnctl's wrapper(s) of {names} after attnctl.apply; read the images with attnctl.read_maps after "
                "handle.remove() instead"
            )

    def _step_aside(self) -> None:
        """Restore the stock pipeline for a readout pass (as `remove()` does, keeping this handle's state). Refused,
        with nothing changed, where another library stacked on one of attnctl's wrappers (it could not be re-stacked)."""
        self._refuse_stacked_wraps()
        for name, proc in self._processors.items():
            module = self.adapter.modules[name]
            if module.processor is proc:
                module.set_processor(self._originals[name])
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for record in reversed(self._scheduler_wraps + self._wrapped):
            record.unwrap()
        self._wrapped.clear()
        self._scheduler_wraps.clear()
        self._snapshots = []
        for denoiser in self.denoisers().values():
            if _live_handle(denoiser) is self:
                del _LIVE[denoiser]
        if _live_pipeline_handle(self.pipeline) is self:
            del _LIVE_PIPELINES[self.pipeline]

    def _make_cache_context(self, original):
        runtime = self.runtime

        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
            previous, runtime.context = runtime.context, name
            try:
                with original(name, *args, **kwargs) as value:
                    yield value
            finally:
                runtime.context = previous

        return cache_context

    def _make_postprocess(self, original):
        runtime = self.runtime

        def postprocess(image: Any, output_type: str = "pil", *args: Any, **kwargs: Any) -> Any:
            result = original(image, output_type, *args, **kwargs)
            if output_type != "latent":
                runtime.record_images(result)
            return result

        return postprocess

    def _make_postprocess_video(self, original):
        runtime = self.runtime

        def postprocess_video(video: Any, output_type: str = "np", *args: Any, **kwargs: Any) -> Any:
            with runtime.internal_calls():  # its per-video `postprocess` calls are not the call's images
                result = original(video, output_type, *args, **kwargs)
            if output_type != "latent":
                runtime.record_images(VideoFrames(result))
            return result

        return postprocess_video

    def internal(self) -> contextlib.AbstractContextManager[None]:
        """Calls of pipeline methods made by attnctl itself inside this block are not recorded."""
        return self.runtime.internal_calls()

    def denoisers(self) -> dict[str, torch.nn.Module]:
        """The controlled denoiser(s) by pipeline attribute: one, or Wan 2.2's two experts."""
        return dict(self.adapter.experts) or {self.attribute: self.adapter.denoiser}

    # -- checks -----------------------------------------------------------------------------------------------
    def verify(self) -> None:
        """Raise PipelineChangedError if processors or wrappers were replaced since apply()."""
        if not self.live:
            return
        compiled = False
        for attribute, denoiser in self.denoisers().items():
            current = getattr(self.pipeline, attribute, None)
            if current is None or uncompiled(current) is not denoiser:
                raise PipelineChangedError(
                    f"attnctl: pipe.{attribute} was replaced after attnctl.apply; call handle.remove() and apply again "
                    "(a handle no longer at hand: error.handle.remove())", handle=self,
                )
            compiled = bool(_refuse_uncomposable(current, denoiser, attribute, self.controls, self.adapter)) or compiled
        _refuse_windows_under_attention_caches(self.controls, self.runtime.resolved, self.adapter, self.attribute)
        _refuse_readout(self.pipeline, self.controls, compiled)
        if any(control.reads_after_call(self.pipeline) for control in self.controls):
            self._refuse_stacked_wraps()  # now, not after the generation
        if self._hooks is not None:
            self._hooks.compiled = compiled
        if compiled and self.runtime.backend not in ("auto", *TRACEABLE_BACKENDS):  # compiled after apply
            features = tuple(c.kernel_features(self.adapter, self.runtime.resolved[i]) for i, c in enumerate(self.controls))
            _check_traced_backend(self.runtime.backend, self.controls, features)
        changed = [name for name, proc in self._processors.items() if self.adapter.modules[name].processor is not proc]
        if changed:
            found = sorted({type(self.adapter.modules[n].processor).__name__ for n in changed})
            raise PipelineChangedError(
                f"attnctl: the processors of {len(changed)} layer(s) ({describe_layers(tuple(self.adapter.layer(n) for n in changed), 200)}) "
                f"were replaced by {', '.join(found)} after attnctl.apply; {CHANGE_HINT}"
            )
        moved = [name for name, proc in self._processors.items() if proc._attention_backend != proc.installed_backend]
        if moved:
            raise PipelineChangedError(
                f"attnctl: the attention backend of {len(moved)} layer(s) changed after attnctl.apply "
                f"(now {self._processors[moved[0]]._attention_backend!r}); {CHANGE_HINT}"
            )
        if self._hooks is None or not self._hooks.installed:
            raise PipelineChangedError(
                f"attnctl: attnctl's forward hooks on pipe.{self.attribute} were removed after attnctl.apply (e.g. by "
                "clearing _forward_pre_hooks / _forward_hooks); call handle.remove() and apply again"
            )
        changes = [change for snapshot in self._snapshots for change in snapshot.changes()]
        if changes:
            raise PipelineChangedError(f"attnctl: {summarize(changes)}; call handle.remove(), undo that change, and apply again")
        moved = [attribute for attribute, expert in self.denoisers().items()
                 if attribute in self._image_projections and _image_projection(expert) != self._image_projections[attribute]]
        if moved:
            raise PipelineChangedError(
                f"attnctl: the IP-Adapter image projection of pipe.{moved[0]} (encoder_hid_proj) changed after "
                "attnctl.apply: an IP-Adapter unload through a pipeline sharing the denoiser (from_pipe) that attnctl "
                "refused half-way; call handle.remove(), which puts it back, then unload the IP-Adapter, then apply again"
            )
        self._wrap_scheduler()

    # -- removal ----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore processors and wrapped methods exactly as they were. Safe to call more than once. A layer where
        another library replaced attnctl's processor keeps that library's, except diffusers' PAG processors left by
        a failed PAG pipeline call (`_left_by_pag_call`), replaced with the stock one."""
        if not self.live and not self._wrapped and not self._scheduler_wraps:
            return
        self._refuse_during_call()
        self.live = False
        unfinished: Exception | None = None
        if self.runtime.call_failed():  # that call's own error was raised already: its controls' errors are warnings
            self.runtime.end_call_quietly()
        elif self.runtime.call is not None:
            try:
                self.runtime.end_call()
            except Exception as error:  # noqa: BLE001 - a control's finish failed: everything is restored first, then raised
                unfinished = error
        for name, proc in self._processors.items():
            module = self.adapter.modules[name]
            if module.processor is proc or _left_by_pag_call(module.processor):
                module.set_processor(self._originals[name])
            proc.inert = True  # wherever it is still held (another library, a dict of processors saved while applied)
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for attribute, expert in self.denoisers().items():  # undo what a refused IP-Adapter unload changed first
            if attribute in self._image_projections and _image_projection(expert) != self._image_projections[attribute]:
                _restore_image_projection(expert, self._image_projections[attribute])
        stuck = []
        for record in reversed(self._scheduler_wraps + self._wrapped):
            if not record.unwrap():  # another library stacked on attnctl's wrapper: it stays, as a pass-through
                owner = "pipe" if record.obj is self.pipeline else type(record.obj).__name__
                now = record.obj.__dict__.get(record.name)
                stuck.append(f"{owner}.{record.name} (now {describe_callable(now) if now is not None else 'the class method'})")
        self._wrapped.clear()
        self._scheduler_wraps.clear()
        for denoiser in self.denoisers().values():
            if _live_handle(denoiser) is self:
                del _LIVE[denoiser]
        if _live_pipeline_handle(self.pipeline) is self:
            del _LIVE_PIPELINES[self.pipeline]
        self.runtime.drop_handle_caches()
        if not _any_live():
            clear_caches()  # the backends' module caches (up to 32 dense N x N window masks) serve live handles only
        if stuck:
            raise PipelineChangedError(
                f"attnctl: handle.remove() restored everything except its wrapper(s) of {', '.join(stuck)}: another "
                "library re-bound or stacked on them after attnctl.apply, so attnctl cannot take them out without "
                "breaking that library. They are inert pure pass-throughs now (the pipeline generates its stock "
                "output); undo the other library's patch to drop them"
            ) from unfinished
        if unfinished is not None:  # the pipeline is stock again; the control's error still reaches the caller
            raise unfinished

    def __enter__(self) -> Handle:
        if not self.live:
            raise HandleError("attnctl: this handle was removed; the pipeline is stock again. Call attnctl.apply again")
        return self

    def _refuse_during_call(self) -> None:
        """`remove()` while the pipeline's call runs (from a callback, or another thread) would end that call mid-loop,
        publish its partial results and let the rest run stock: refused, as `apply` is, before anything changes."""
        if self.runtime.call_running():
            raise HandleError(
                f"attnctl: handle.remove() was called during a call of this {type(self.pipeline).__name__} (from a "
                "callback, or another thread): the call's controls are under way and the handle cannot be taken off "
                "mid-loop; remove it after the call returns (to stop a call early, set pipe._interrupt = True in a "
                "callback, or raise)"
            )

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None and (self.live or self._wrapped or self._scheduler_wraps):
            self._refuse_during_call()
            # the block's own error goes on: a control's error on finishing becomes a warning
            self.runtime.end_call_quietly()
        self.remove()

    # -- reporting --------------------------------------------------------------------------------------------
    @property
    def controls(self) -> tuple[Control, ...]:
        return self.runtime.controls

    @property
    def outputs(self) -> dict[str, Any]:
        """What controls published during the last pipeline call (attention maps, reports), by key. A key that is
        not there raises a KeyError (also a HandleError) that says why: no call yet, or no control publishes it."""
        published = tuple(key for key in (getattr(c, "output_key", None) for c in self.controls) if key is not None)
        if self.runtime.call_returned():  # a pipeline that returned before maybe_free_model_hooks: its call ends here
            self.runtime.end_call()
            self._run_readouts()
        if self.runtime.call_failed():  # what the failed call published (reports at bind) is not a finished call's
            return _Outputs({}, published)
        return _Outputs(self.runtime.outputs, published)

    def describe(self) -> str:
        """Per control: the layers it resolved to, its step window and the backend of each layer, and why."""
        device = execution_device(self.adapter.denoiser)
        lines = [
            f"attnctl handle on {type(self.pipeline).__name__} ({self.adapter.family}, "
            f"{len(self.adapter.layers)} attention layers), backend={self.runtime.backend!r}"
            + ("" if self.live else " [removed]")
        ]
        if not self.controls:
            lines.append("  no controls: every layer runs the stock attention through attnctl's processors")
        for position, control in enumerate(self.controls):
            layers = self.runtime.resolved[position]
            start, stop = control.step_window
            lines.append(f"- {type(control).__name__}: steps {start:g} <= i/n < {stop:g}, {len(layers)} layer(s)")
            features = control.kernel_features(self.adapter, layers)
            try:
                name, why = choose_backend(self.runtime.backend, device, features)
            except Exception as error:  # noqa: BLE001 - describe must report, not raise
                name, why = "none", str(error)
            for layer in layers:
                used = self.runtime.backend_log.get(layer.name)
                seen = f"; last call used {used[0]}" if used else ""
                lines.append(f"    {layer.name} ({layer.kind}): {name} ({why}){seen}")
        untouched = [l for l in self.adapter.layers if all(l not in self.runtime.resolved[p] for p in range(len(self.controls)))]
        if untouched and self.controls:
            lines.append(f"- no control: {len(untouched)} layer(s) run the stock SDPA call: {describe_layers(tuple(untouched), 300)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "live" if self.live else "removed"
        return f"<attnctl.Handle {state} on {type(self.pipeline).__name__} with {len(self.controls)} control(s)>"


class MissingOutputError(HandleError, KeyError):
    """`handle.outputs[key]` for a key that is not there (a KeyError, so `except KeyError` still catches it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Outputs(dict):
    """`handle.outputs`: a plain dict whose missing keys say why they are missing."""

    def __init__(self, outputs: Mapping[str, Any], published: tuple[str, ...]):
        # a slot a control fills when the call finishes (None until then) is missing after a call that failed
        super().__init__({key: value for key, value in outputs.items() if value is not None})
        self.published = published

    def __missing__(self, key: Any) -> Any:
        if key in self.published:
            raise MissingOutputError(
                f"attnctl: handle.outputs[{key!r}] is published during a pipeline call, and no call has finished since "
                "attnctl.apply (or the last one failed); call the pipeline first, inside the with block"
            )
        listed = ", ".join(map(repr, self.published)) or "nothing (none of its controls publishes an output)"
        raise MissingOutputError(f"attnctl: no control of this handle publishes handle.outputs[{key!r}]; they publish {listed}")
