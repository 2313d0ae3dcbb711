"""Other libraries' patches of the denoiser: what attnctl checks so that it composes with them or refuses clearly.

- Foreign patches of the denoiser's modules: an attention module whose `forward` another library replaced
  (tgate leaves such forwards installed) never reaches attnctl's processor, and a block whose class was
  swapped (tomesd's `module.__class__ = ToMeBlock`) changes the token count the processors see. Both are
  found at `apply` and at the start of every pipeline call (`Snapshot.changes`) and raise
  `PipelineChangedError` naming the module and the change. Stacking that is known to keep calling the
  processor is allowed: accelerate's offload hooks (`_hf_hook`), diffusers' hook registry
  (`_diffusers_hook`: group offload, caches) and attnctl's own instance wraps.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .instance import describe_callable, is_attnctl_wrapper

_STACKERS = (
    ("_hf_hook", "accelerate's hook"),
    ("_diffusers_hook", "diffusers' hook registry"),
)


def known_forward(module: torch.nn.Module, fn: Any) -> bool:
    """Whether an instance-level `forward` of `module` is one that keeps calling the class's forward (and so
    the attention processor): attnctl's own wraps, accelerate's hooks, diffusers' hook registry."""
    if fn is None or is_attnctl_wrapper(fn):
        return True
    return any(attribute in module.__dict__ for attribute, _ in _STACKERS)


def swapped_class(cls: type) -> type | None:
    """The diffusers class that `cls` was made from outside diffusers (tomesd's `ToMeBlock`), else None."""
    if cls.__module__.startswith(("diffusers.", "torch.", "attnctl.")):
        return None
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("diffusers."):
            return base
    return None


def _attention_forward_problem(name: str, module: torch.nn.Module) -> str | None:
    fn = module.__dict__.get("forward")
    if known_forward(module, fn):
        return None
    return (
        f"the forward of attention module {name} ({type(module).__name__}) is an instance attribute "
        f"({describe_callable(fn)}) set by another library: it would bypass attnctl's processor"
    )


def _class_problem(name: str, module: torch.nn.Module, base: type) -> str:
    cls = type(module)
    return (
        f"module {name or '<denoiser>'} has class {cls.__module__}.{cls.__qualname__}, swapped in by another library "
        f"for diffusers' {base.__name__} (token merging such as tomesd changes the token count attnctl's controls see)"
    )


@dataclass
class Snapshot:
    """The classes of every module of the denoiser and the instance `forward` of each attention module, as
    they were at `apply`."""

    classes: list[tuple[str, weakref.ref, type]] = field(default_factory=list)
    forwards: dict[str, tuple[torch.nn.Module, Any]] = field(default_factory=dict)

    @classmethod
    def take(cls, denoiser: torch.nn.Module, attention: dict[str, torch.nn.Module]) -> Snapshot:
        snapshot = cls()
        for name, module in denoiser.named_modules():
            snapshot.classes.append((name, weakref.ref(module), type(module)))
        for name, module in attention.items():
            snapshot.forwards[name] = (module, module.__dict__.get("forward"))
        return snapshot

    def changes(self) -> Iterator[str]:
        """What changed since the snapshot, one sentence each (modules no longer alive are skipped: a LoRA
        or quantisation replaces child modules, which is not a patch of a module attnctl depends on)."""
        for name, ref, cls in self.classes:
            module = ref()
            if module is not None and type(module) is not cls:
                yield (
                    f"module {name or '<denoiser>'} changed class from {cls.__qualname__} to "
                    f"{type(module).__module__}.{type(module).__qualname__} after attnctl.apply (tomesd-style class swap)"
                )
        for name, (module, before) in self.forwards.items():
            now = module.__dict__.get("forward")
            if now is not before and not known_forward(module, now):
                yield (
                    f"the forward of attention module {name} was replaced by {describe_callable(now)} after "
                    "attnctl.apply: attnctl's processor would be bypassed"
                )


def foreign_patches(denoiser: torch.nn.Module, attention: dict[str, torch.nn.Module]) -> list[str]:
    """Patches found at `apply` that attnctl cannot compose with (swapped classes, replaced attention forwards)."""
    problems = []
    for name, module in denoiser.named_modules():
        base = swapped_class(type(module))
        if base is not None:
            problems.append(_class_problem(name, module, base))
    for name, module in attention.items():
        problem = _attention_forward_problem(name, module)
        if problem is not None:
            problems.append(problem)
    return problems


#: Libraries whose wrap of the denoiser's `forward` keeps state across the pipeline's calls (block caches: features of
#: one step reused at the next, and blocks skipped meanwhile), by the wrapper function's module.
STATEFUL_FORWARDS: tuple[tuple[str, str], ...] = (("DeepCache", "DeepCache"), ("cache_dit", "cache-dit"))


def stateful_forward(module: torch.nn.Module) -> str | None:
    """The instance-level `forward` of `module` (or the one accelerate's hook keeps as `_old_forward`) when it is a
    block cache's (`STATEFUL_FORWARDS`), described; None otherwise. Other wrappers are taken as stateless."""
    for attribute in ("forward", "_old_forward"):
        fn = module.__dict__.get(attribute)
        inner = getattr(fn, "func", fn)  # functools.partial
        inner = getattr(inner, "__func__", inner)  # a bound method
        origin = getattr(inner, "__module__", None) or ""
        for prefix, library in STATEFUL_FORWARDS:
            if origin == prefix or origin.startswith(prefix + "."):
                return f"{library}'s {describe_callable(fn)}"
    return None


def refuse_stateful_forward_compiled(controls: tuple[Any, ...], parts: list[str], module: torch.nn.Module, attribute: str) -> None:
    """In a compiled denoiser the edits are made before the forward, so attnctl cannot see which layers a block cache
    skipped (`Runtime.skipped_layers` is eager only): a control that needs its layers at every step is refused."""
    if not parts:
        return
    wrapper = stateful_forward(module)
    if wrapper is None:
        return
    for control in controls:
        why = control.step_cache_refusal
        if why is not None:
            from .errors import UnsupportedError

            name = type(control).__name__
            raise UnsupportedError(
                f"attnctl: {name} cannot run in the compiled pipe.{attribute}, whose forward is {wrapper}: in a compiled "
                f"forward attnctl cannot see which blocks the cache skips at a step, and {name} needs its layers at "
                f"every step ({why}). Disable the cache, run uncompiled (a step whose layers were skipped is then "
                f"refused), or leave {name} out"
            )


def summarize(problems: list[str], limit: int = 3) -> str:
    shown = "; ".join(problems[:limit])
    more = len(problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


# -- torch.compile ----------------------------------------------------------------------------------------------
# Each control declares whether it runs in a compiled denoiser (`Control.compile_refusal`): no graph break inside
# attnctl's processors, at most one recompilation per (control set, active layers, shapes), compiled output =
# eager output within the stock compiled-vs-eager tolerance (tests/test_compose_compile.py).


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a `torch.compile(module)` wrapper (OptimizedModule), else the module itself."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(module).__name__ == "OptimizedModule" else module


def module_list(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module under `root` (itself first), depth first in registration order, each once: one cheap walk
    over `_modules` that the per-call checks share (`named_modules` builds a name per module, and each check
    walking the tree again cost milliseconds per pipeline call on Flux's 1,300 modules)."""
    found: list[torch.nn.Module] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


def compiled_parts(entry: torch.nn.Module, denoiser: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> list[str]:
    """How the denoiser is compiled: `torch.compile(m)` (an OptimizedModule in the pipeline), `m.compile()`,
    compiled blocks (`compile_repeated_blocks`, `block.compile()`), or nothing (an empty list). `modules`:
    `module_list(denoiser)`, when the caller has it."""
    parts = []
    if entry is not denoiser:
        parts.append("torch.compile(denoiser)")
    if getattr(denoiser, "_compiled_call_impl", None) is not None:
        parts.append("denoiser.compile()")
    blocks = sum(
        1 for module in (module_list(denoiser) if modules is None else modules)
        if module is not denoiser
        and (module.__dict__.get("_compiled_call_impl") is not None or type(module).__name__ == "OptimizedModule")
    )
    if blocks:
        parts.append(f"{blocks} compiled block(s) (compile_repeated_blocks or block.compile())")
    return parts


def refuse_uncompilable(controls: tuple[Any, ...], parts: list[str], attribute: str, adapter: Any) -> None:
    if not parts:
        return
    for control in controls:
        why = control.compile_refusal(adapter)
        if why is not None:
            from .errors import UnsupportedError

            ready = [type(c).__name__ for c in controls if c.compile_refusal(adapter) is None]
            raise UnsupportedError(
                f"attnctl: {type(control).__name__} cannot run in the torch.compile'd pipe.{attribute} ({', '.join(parts)}): "
                f"{why}. Apply {type(control).__name__} to an uncompiled denoiser"
                + (f", or keep only the controls given that run compiled ({', '.join(ready)})" if ready else "") + "."
            )


# -- diffusers' caches ------------------------------------------------------------------------------------------
# diffusers' cache hooks, by the name they register under (`module._diffusers_hook`): attention-output caches sit
# on attention modules and return a cached output instead of calling the processor on some steps; block caches
# skip whole blocks (or the model's uncond rows) on some steps.
ATTENTION_CACHES = {
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "faster_cache_block": "FasterCache (attention cache)",
    "taylorseer_cache": "TaylorSeerCache",
}
BLOCK_CACHES = {
    "fbc_leader_block_hook": "FirstBlockCache",
    "fbc_block_hook": "FirstBlockCache",
    "mag_cache_leader_block_hook": "MagCache",
    "mag_cache_block_hook": "MagCache",
    "faster_cache_denoiser": "FasterCache (unconditional-batch skip)",
    "sea_cache_root": "SeaCache",
    "sea_cache_leader_block": "SeaCache",
    "sea_cache_block": "SeaCache",
    "sea_cache_post_norm": "SeaCache",
}
#: The context a cache hook opens itself on its first forward where the pipeline opens none (MagCache on a denoiser
#: without `enable_cache`: diffusers/hooks/mag_cache.py sets `CacheContext("inference")`).
DEFAULT_CONTEXTS = {"mag_cache_leader_block_hook": "inference", "mag_cache_block_hook": "inference"}
#: Hooks whose state counts its context's denoiser calls as the pipeline's step (MagCache's `step_index`: it indexes
#: the calibrated ratios and the retention steps, and the state resets when it reaches the call's steps).
STEP_COUNTERS = ("mag_cache_leader_block_hook", "mag_cache_block_hook")
#: The suffix of the cache contexts attnctl opens for its own batches.
KEYED = "|attnctl:"
#: Stateful diffusers hooks that reuse nothing across steps a control could miss (text K/V projections, computed once
#: per prompt: exact).
LOSSLESS_HOOKS = ("text_kv_cache_transformer", "text_kv_cache_block")


def cache_name(hook_name: str, hook: Any) -> str | None:
    """The cache a diffusers hook belongs to, or None: a known cache by the name it registers under, and any other
    stateful hook (a cache of a diffusers release newer than this list) by its own name."""
    if hook_name == "faster_cache_denoiser" and getattr(hook, "is_guidance_distilled", False):
        return None  # registered on a guidance-distilled model too, where it never skips a row: nothing is cached
    name = ATTENTION_CACHES.get(hook_name) or BLOCK_CACHES.get(hook_name)
    if name is None and getattr(hook, "_is_stateful", False) and hook_name not in LOSSLESS_HOOKS:
        name = f"{hook_name!r} (a stateful diffusers hook, taken for a cache)"
    return name


def diffusers_caches(denoiser: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> list[str]:
    """The diffusers caches installed on the denoiser's modules, by name (deduplicated, in module order)."""
    found: list[str] = []
    for module in module_list(denoiser) if modules is None else modules:
        registry = module.__dict__.get("_diffusers_hook")
        for hook_name, hook in (getattr(registry, "hooks", {}) or {}).items():
            name = cache_name(hook_name, hook)
            if name is not None and name not in found:
                found.append(name)
    return found


def attention_caches(modules: dict[str, torch.nn.Module]) -> dict[str, str]:
    """{attention module name: the diffusers attention-output cache on it} for those of `modules` that carry one
    (PyramidAttentionBroadcast, FasterCache's attention part, TaylorSeer: they return a stored output instead of
    running the attention module on some steps, by schedule)."""
    found: dict[str, str] = {}
    for name, module in modules.items():
        registry = module.__dict__.get("_diffusers_hook")
        for hook_name in getattr(registry, "hooks", {}) or {}:
            if hook_name in ATTENTION_CACHES:
                found[name] = ATTENTION_CACHES[hook_name]
    return found


def _hooks(module: torch.nn.Module) -> dict[str, Any]:
    registry = module.__dict__.get("_diffusers_hook")
    return dict(getattr(registry, "hooks", {}) or {})


#: Block-cache hooks on the first block of the stack they cache: the block's output over the whole batch decides for
#: every later block, and on a cached step the hook returns the stack's cached residual added to it.
LEADER_HOOKS = ("fbc_leader_block_hook", "mag_cache_leader_block_hook", "sea_cache_leader_block")


def block_cache_boundary(block: torch.nn.Module) -> str | None:
    """The diffusers block cache whose state spans `block` and the blocks after it, described, or None: its first-block
    hook (FirstBlockCache, MagCache, SeaCache: the block's residual over the whole batch decides whether the later
    blocks run, and a cached step returns the stack's residual added to the block's output), its last-block hook
    (`is_tail`: the stack's residual, the block's output less the first block's, over the whole batch), SeaCache's
    post-norm hook, or a stateful hook attnctl does not know (taken for a cache)."""
    for hook_name, hook in _hooks(block).items():
        name = cache_name(hook_name, hook)
        if name is None or hook_name in ATTENTION_CACHES:
            continue
        if hook_name in LEADER_HOOKS:
            return f"{name} (its first-block hook, which decides for the later blocks from this block's output)"
        if getattr(hook, "is_tail", False) or hook_name == "sea_cache_post_norm":
            return f"{name} (its last-block hook, which stores the stack's residual from this block's output)"
        if hook_name not in BLOCK_CACHES:
            return name
    return None


def layer_cache(root: torch.nn.Module, path: str) -> str | None:
    """The diffusers cache that can leave the attention layer at `path` under `root` unrun at some step of a call,
    described, or None: an attention-output cache on it (PyramidAttentionBroadcast, FasterCache, TaylorSeer reuse
    its output by schedule), a block cache that can skip a block holding it (FirstBlockCache's later blocks; MagCache
    and SeaCache, whose first block is skipped too), FasterCache's skip of the unconditional rows (models with CFG in
    one batch), or a stateful hook attnctl does not know. FirstBlockCache's first block always runs: None there."""
    module, chain = root, [("", root)]
    for part in path.split("."):
        module = module._modules.get(part) if module is not None else None
        if module is None:
            break
        chain.append((f"{chain[-1][0]}.{part}".lstrip("."), module))
    for where, module in chain:
        for hook_name, hook in _hooks(module).items():
            name = cache_name(hook_name, hook)
            if name is None or hook_name == "fbc_leader_block_hook":
                continue
            if hook_name == "faster_cache_denoiser":
                if getattr(hook, "is_guidance_distilled", False):
                    continue  # a guidance-distilled model has no unconditional rows to skip
                return f"{name}, which runs the denoiser on its conditional rows alone on some steps"
            if hook_name in ATTENTION_CACHES:
                return f"{name}, which reuses the output of {where or 'the denoiser'} on some steps instead of running it"
            return f"{name}, which skips {where or 'the denoiser'} on some steps"
    return None


@dataclass
class OwnState:
    """A plain hook state attnctl gave a batch of its own for one pipeline call, and its schedule counter when made."""

    state: Any
    start: int | None  # None: not counted into the pipeline's state (no counter, or an extra pass)


def keyed_cache_context(
    denoiser: torch.nn.Module, key: str, plain_states: dict[Any, Any] | None = None, replaces_call: bool = True
) -> Any:
    """Give diffusers' cache hooks a context of their own for a denoiser call whose batch is attnctl's, not the
    pipeline's (perturbed rows added by PAG / SEG / SAG, or attnctl's extra passes).

    The hooks keep their state (FirstBlockCache's residuals, FasterCache's outputs, ...) per context name, which the
    pipeline sets (`cache_context("cond")`). A control whose rows come and go with its step window (PAG with
    steps=(0, 0.4)) would otherwise leave the state of a wider batch under the pipeline's name: the next narrow call
    adds a cached residual of the wrong batch (broadcast silently). Each call layout gets its own name
    (`"cond|attnctl:<key>"`; where the pipeline opens no context, the one the hook would open itself,
    `DEFAULT_CONTEXTS`), so a cache reuses only what was computed on the same rows; a hook that counts the steps per
    context (`STEP_COUNTERS`) counts them across the contexts, so each sees the pipeline's step, where the batch
    replaces the pipeline's call of the step (`replaces_call`; an extra pass runs beside it and counts on its own). A
    hook that keeps one
    plain `state` for every call of the denoiser (PyramidAttentionBroadcast) gets a state of its own per key instead,
    kept in `plain_states` (the caller's, one per pipeline call; `settle_plain_states` at its end). The hooks are found
    once per pipeline call, by a walk over the denoiser's modules (diffusers' own list of child registries is kept
    from its first use and misses hooks added later, on denoisers without `enable_cache`). Returns a function that
    puts the pipeline's context and states back, or None where no stateful hook has a context or a state (no cache,
    or an old diffusers)."""
    if plain_states is not None:
        registries = plain_states.get(denoiser)
        if registries is None:
            found = (module.__dict__.get("_diffusers_hook") for module in module_list(denoiser))
            registries = plain_states[denoiser] = tuple(r for r in found if r is not None)
    else:  # a denoiser call outside a pipeline call
        registry = denoiser.__dict__.get("_diffusers_hook")
        if registry is None:
            return None
        children = getattr(registry, "_get_child_registries", None)
        registries = (registry, *(children() if children is not None else ()))
    changed: list[tuple[Any, Any]] = []
    swapped: list[tuple[Any, Any]] = []
    counted: list[tuple[Any, Any, Any]] = []  # (state manager, the pipeline's context, attnctl's state)
    for child in registries:
        for name, hook in getattr(child, "hooks", {}).items():
            if not getattr(hook, "_is_stateful", False):
                continue
            plain = vars(hook).get("state")
            if plain_states is not None and hasattr(plain, "reset") and not any(hasattr(m, "set_context") for m in vars(hook).values()):
                entry = plain_states.get((hook, key))
                if entry is None:
                    try:
                        own = type(plain)()
                    except TypeError:
                        from .errors import UnsupportedError

                        raise UnsupportedError(
                            f"attnctl: diffusers' {name!r} hook keeps one state for every call of the denoiser, and attnctl "
                            f"cannot give it a state of its own for a batch of attnctl's ({key}: PAG / SEG rows, SAG's "
                            "degraded pass); disable that cache or leave the control out"
                        ) from None
                    computes_first(name, hook, own)
                    start = getattr(own, "iteration", None)
                    counted_in = replaces_call and isinstance(start, int)
                    entry = plain_states[(hook, key)] = OwnState(own, start if counted_in else None)
                computes_first(name, hook, plain)  # its first call may come after attnctl's batches (PAG's window at step 0)
                hook.state = entry.state
                swapped.append((hook, plain))
                continue
            for manager in vars(hook).values():
                if not hasattr(manager, "set_context"):
                    continue
                old = getattr(manager, "_context", None)
                pipelines = _cache_context(DEFAULT_CONTEXTS[name]) if old is None and name in DEFAULT_CONTEXTS else old
                if pipelines is None or not hasattr(pipelines, "name"):
                    continue
                context = dataclasses.replace(pipelines, name=f"{pipelines.name}{KEYED}{key}")
                manager.set_context(context)
                changed.append((manager, old))
                if replaces_call and name in STEP_COUNTERS and all(manager is not m for m, _, _ in counted):
                    mine = manager.get_state()
                    mine.step_index = _state_under(manager, pipelines, context).step_index
                    counted.append((manager, pipelines, mine))
    if not changed and not swapped:
        return None

    def restore() -> None:
        for manager, pipelines, mine in counted:
            theirs = _state_under(manager, pipelines, None)
            if mine.step_index == 0:  # attnctl's batch ran the call's last step: the hook reset its state at the end, as
                theirs.reset()  # it resets the pipeline's
            else:
                theirs.step_index = mine.step_index
        for manager, old in changed:
            manager.set_context(old)
        for hook, state in swapped:
            hook.state = state

    return restore


def _state_under(manager: Any, context: Any, then: Any) -> Any:
    """The state a diffusers `StateManager` keeps for `context` (made where it has none yet, as the hook would at its
    next call under it), with `then` set as the manager's context afterwards."""
    manager.set_context(context)
    try:
        return manager.get_state()
    finally:
        manager.set_context(then)


def _cache_context(name: str) -> Any:
    """diffusers' `CacheContext` named `name`, or None in a diffusers without it (whose caches open no context)."""
    try:
        from diffusers.hooks.hooks import CacheContext
    except ImportError:
        return None
    return CacheContext(name=name)


def settle_plain_states(plain_states: dict[Any, Any]) -> None:
    """At the end of a pipeline call: the states of the contexts attnctl opened are dropped (diffusers resets every
    state after a call only on denoisers with `enable_cache`), and each plain hook state of the pipeline
    (PyramidAttentionBroadcast's, on a denoiser whose pipeline never resets it) counts the denoiser calls the states
    attnctl gave the batches that replaced its calls ran (not extra passes, which run beside them), as if it had run
    them. Its schedule (`iteration % block_skip_range`) then keeps the
    phase it has without attnctl from one call to the next: with a control whose rows come for some steps only
    (`PAG(steps=(0, 0.4))`), it counted part of the calls, two equal calls gave different images, and the cache-only
    output after `remove()` was not the one before `apply`."""
    for key, entry in plain_states.items():
        if isinstance(entry, tuple):  # a denoiser's registries: attnctl's own contexts last one call, as its states do
            for registry in entry:
                for hook in getattr(registry, "hooks", {}).values():
                    for manager in vars(hook).values():
                        for name in [n for n in getattr(manager, "_state_cache", {}) if isinstance(n, str) and KEYED in n]:
                            manager._state_cache.pop(name)
        if not isinstance(entry, OwnState) or entry.start is None:
            continue
        plain = vars(key[0]).get("state")
        ran = getattr(entry.state, "iteration", None)
        if isinstance(getattr(plain, "iteration", None), int) and isinstance(ran, int):
            plain.iteration += ran - entry.start


def computes_first(name: str, hook: Any, state: Any) -> None:
    """Make the next call under `state` compute where the hook registered as `name` would otherwise read an empty
    cache: FasterCache's attention hook (Lv et al. 2024, "FasterCache: Training-Free Video Diffusion Model Acceleration
    with High Quality", arXiv:2410.19355) reuses the layer's output inside its timestep range unless `iteration > 0
    and iteration % block_skip_range == 0`, and its first call normally falls outside that range (the first, noisiest
    step). A state attnctl gives a batch of its own, or the pipeline's state first used after such a batch (PAG's rows
    from step 0), starts inside it, and the hook read `state.cache[-1]` of None (TypeError). An unused state (`cache` None, `iteration` 0) gets `iteration =
    block_skip_range`: the call computes and the schedule keeps its phase (the same iterations modulo the range).
    Other hooks' states are left as they are (PyramidAttentionBroadcast computes on an empty cache itself)."""
    if name != "faster_cache_block":
        return
    skip_range = getattr(hook, "block_skip_range", None)
    if not isinstance(skip_range, int) or skip_range < 1 or not hasattr(state, "cache") or not hasattr(state, "iteration"):
        return
    if state.cache is None and state.iteration == 0:
        state.iteration = skip_range


def refuse_batch_splitting_cache(controls: tuple[Any, ...], denoiser: torch.nn.Module, attribute: str) -> None:
    """Refuse every control under FasterCache's unconditional-batch skip (a model that is not guidance-distilled, with
    CFG in one batch: PixArt): on the steps it skips, its hook around the denoiser's forward keeps the second half of
    the batch (`chunk(2)`), after attnctl has laid out the call's rows. Every per-row edit then meets a batch it was not
    built for: PAG's and SEG's perturbed rows were taken for the cond rows (a 1e-4 PAG moved the output 0.73), Reweight
    and Regions failed on a batch of the wrong size."""
    if not controls:
        return
    registry = denoiser.__dict__.get("_diffusers_hook")
    hook = (getattr(registry, "hooks", {}) or {}).get("faster_cache_denoiser")
    if hook is None or getattr(hook, "is_guidance_distilled", True):
        return
    from .errors import UnsupportedError

    raise UnsupportedError(
        f"attnctl: diffusers' FasterCache on pipe.{attribute} skips the unconditional rows on some steps "
        "(is_guidance_distilled=False): it runs the denoiser on the second half of the batch, after attnctl has laid "
        "out the call's rows, so the controls' per-row edits would act on the wrong rows. Use FasterCacheConfig("
        "is_guidance_distilled=True) (its attention cache alone composes) or another cache, or leave the controls out. "
        f"Or {cache_removal_hint(denoiser, attribute)}"
    )


def cache_removal_hint(denoiser: torch.nn.Module, attribute: str | None = None) -> str:
    """How to take diffusers' caches off the denoiser (`pipe.<attribute>`): `disable_cache()` where the cache came from
    `enable_cache` (CacheMixin keeps its config), else the hooks' registry, by the names of the cache hooks found (hooks
    applied with `diffusers.hooks.apply_*`: `disable_cache()` does nothing for them, and UNet, SD3 and PixArt models
    have no `disable_cache`)."""
    where = f"pipe.{attribute}" if attribute else "the denoiser (pipe.unet / pipe.transformer)"
    if callable(getattr(denoiser, "disable_cache", None)) and getattr(denoiser, "_cache_config", None) is not None:
        return f"disable the cache with {where}.disable_cache()"
    names: list[str] = []
    for module in module_list(denoiser):
        for hook_name, hook in _hooks(module).items():
            if cache_name(hook_name, hook) is not None and hook_name not in names:
                names.append(hook_name)
    model = f"pipe.{attribute}" if attribute else "<the denoiser>"
    return (f"remove its hooks from {where}: for name in {tuple(names)!r}: diffusers.hooks.HookRegistry."
            f"check_if_exists_or_initialize({model}).remove_hook(name, recurse=True)")


def refuse_cache_conflicts(controls: tuple[Any, ...], caches: list[str], attribute: str, denoiser: torch.nn.Module) -> None:
    if not caches:
        return
    for control in controls:
        why = control.step_cache_refusal  # a class declaration of the control: why it cannot share with a cache
        if why is not None:
            from .errors import UnsupportedError

            raise UnsupportedError(
                f"attnctl: {type(control).__name__} cannot run with diffusers' {', '.join(caches)} on pipe.{attribute}: "
                f"{why}. Leave {type(control).__name__} out, or take the cache off: {cache_removal_hint(denoiser, attribute)}"
            )


# -- context parallelism ----------------------------------------------------------------------------------------
CONTEXT_PARALLEL_WHY = (
    "under ring or Ulysses attention each rank holds a shard of the sequence (or of the heads), while attnctl's "
    "edits are built for the whole token grid and its hooks (caches, token reduction, maps) see whole layers; "
    "docs/context-parallel.md says how controls would run sharded. Data parallelism (one prompt per GPU, "
    "`attnctl render` through accelerate) works"
)


def parallel_config(denoiser: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> Any:
    """diffusers' context-parallel config of the denoiser (`enable_parallelism`), or None."""
    config = getattr(denoiser, "_parallel_config", None)
    if config is not None:
        return config
    for module in module_list(denoiser) if modules is None else modules:
        processor = module.__dict__.get("processor") or module._modules.get("processor")
        if getattr(processor, "_parallel_config", None) is not None and not getattr(processor, "inert", False):
            return processor._parallel_config
    return None


def refuse_context_parallel(denoiser: torch.nn.Module, attribute: str, modules: list[torch.nn.Module] | None = None) -> None:
    config = parallel_config(denoiser, modules)
    if config is not None:
        from .errors import UnsupportedError

        raise UnsupportedError(
            f"attnctl: pipe.{attribute} runs context parallelism ({type(config).__name__}, enable_parallelism); attnctl "
            f"refuses it: {CONTEXT_PARALLEL_WHY}"
        )
