"""The machinery shared by the latent optimisers: loss passes through the denoiser and gradient steps on the latent.

At a step inside the control's window, before the denoiser call of that step (`Bound.transform_inputs`, which the
denoiser's pre-hook calls), the cond rows' latents go through a *loss pass*: an extra forward of the denoiser
(`BindContext.run_denoiser`: every attention op on a backend autograd can differentiate) under
`torch.enable_grad` (and outside inference mode, on clones of the inputs). A hook on the map layers computes the
head-averaged probabilities of the token columns the loss reads (`word_attention`: one fused SDPA call whose values
are the columns' indicators, never an N x N matrix) and, once the last map layer has been read, stops the forward
with a private exception: later layers cost nothing. The loss's gradient with respect to the latent gives the step
`x <- x - step_size * grad`. The denoiser call of the step then runs on the updated latent for every row of that
image (the uncond rows carry no loss but share the latent, as in the paper's code), and the scheduler's `step` is
given the updated latent too (an instance-level wrap owned by the handle), so that the update persists. A step of
several model calls (Heun, KDPM2, DPM-Solver-SDE: 2; PNDM's Runge-Kutta warm-up: 4) is optimised at its first call
only: the scheduler continues the step from the sample it stored then, so an update at a later call would not persist.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ...control import BindContext, Bound
from ...denoiser_call import DenoiserCall, Row, RowLayout, upload
from ...errors import CallLayoutError, IdleControlWarning, TokenError, UnsupportedError
from ...families.base import LayerInfo, channel_dim, noisy_channels
from ...kernels.semantics import block_bias
from ...kernels.spec import AttentionSpec, LabelMask
from ...processors.chain import token_layout
from ...processors.edit import AttendFn, AttentionCall, Edit, LayerHook
from ...tokens import WordQuery, explicit_position
from ..common import RowIndex
from ..maps.capture import word_attention, word_values

LOSS_PASS = "latent-optimisation"


class _MapsRead(Exception):
    """Raised by the map hook after the last map layer of a loss pass: the rest of the forward is not needed."""


class _MapHook(LayerHook):
    def __init__(self, bound: LatentOptimizerBound):
        self.bound = bound

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        if token_layout(call).sub:  # a sub-attention another control runs is not the layer's map
            return compute(q, k, v, spec)
        self.bound.record(call, q, k, spec)
        if len(self.bound.read) == len(self.bound.layers):
            raise _MapsRead
        return compute(q, k, v, spec)


def _normal(value: Any) -> Any:
    """Tensors that autograd may save (inference-mode tensors cloned), in the same containers."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_normal(item) for item in value)
    return value


def sees_columns(labels: LabelMask, image: slice, index: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: whether under `labels` some query in `image` of some batch row may attend to some key at the
    positions `index` (a long tensor on the labels' device; its label pair's bias is above -inf). Read on the labels
    (a few labels), never a dense mask."""
    rows = labels.rows
    table = labels.table.expand(rows, -1, -1) > float("-inf")  # (rows, Lq, Lk)
    device = labels.q_labels.device
    queries = torch.zeros(rows, table.shape[1], dtype=torch.bool, device=device)
    queries.scatter_(1, labels.q_labels[:, image].expand(rows, -1), True)
    keys = torch.zeros(rows, table.shape[2], dtype=torch.bool, device=labels.k_labels.device)
    keys.scatter_(1, labels.k_labels.index_select(1, index).expand(rows, -1), True)
    return (queries[:, :, None] & table.to(device) & keys.to(device)[:, None, :]).any()


def word_columns(context: BindContext, words: tuple[WordQuery, ...], owner: str) -> list[list[tuple[int, ...]]]:
    """Per prompt row, per word: its token positions in the text sequence (`PromptTokens.positions`); explicit
    positions (ints) need no text, as with `prompt_embeds`."""
    if all(isinstance(word, int) for word in words) and context.tokens is None:
        per_word = [explicit_position(word, context.canvas.text_len) for word in words if isinstance(word, int)]
        return [list(per_word) for _ in range(context.prompt_rows)]
    tokens = context.require_tokens(owner, positions=True)
    out = []
    for row in range(context.prompt_rows):
        per_word = []
        for word in words:
            positions = tokens.positions(word, row)
            if not positions:
                raise TokenError(f"attnctl: {owner}: the word {word!r} is not in prompt row {row}")
            per_word.append(tuple(positions))
        out.append(per_word)
    return out


class LatentOptimizerBound(Bound):
    """A latent optimiser bound to one pipeline call. Subclasses say which token columns the loss reads
    (`columns`, `selector`) and how a step optimises (`optimise_step`)."""

    # after every other control's input changes (Regions' appended region tokens): the loss pass runs the denoiser on
    # the inputs the step's denoiser call receives; latent optimisers among themselves stay in control order
    input_order = 1

    def __init__(self, control: Any, context: BindContext, columns: tuple[int, ...], selector: torch.Tensor):
        super().__init__(control, context.layers, control.steps)
        self.context = context
        self.steps_count = context.steps
        self.main_input = context.adapter.batched_inputs[0]
        self.columns = columns  # text positions whose maps the loss reads
        self.selector = upload(selector, context.device)  # (prompt rows, S, W): the columns of each subject / word
        self.grid = max((context.canvas.grid_at(layer.level) for layer in context.layers), key=lambda hw: hw[0] * hw[1])
        self.index = RowIndex()
        self.hook = _MapHook(self)
        self._edit = Edit(hooks=(self.hook,))
        # each optimiser's own pass: another latent optimiser of the call records nothing in it (its hook would
        # stop the forward once it had read its own layers, before this one's)
        self.loss_pass = f"{LOSS_PASS} {id(self):x}"
        self.read: dict[int, torch.Tensor] = {}  # layer index -> (n, W, h, w) maps of the loss pass in progress
        #: Keep each layer's maps per head at the layer's own grid ((n, H, W, h, w); `loss_maps` then gives them as a
        #: tuple in layer order) instead of averaging heads and layers on the finest grid (the default).
        self.keep_heads = False
        self.updates: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # step -> prompt -> (old, new)
        self._loss_log: list[tuple[int, torch.Tensor]] = []  # (step, per-image loss before its update), on the device
        self._selectors: dict[tuple[Any, ...], torch.Tensor] = {}  # (rows, keys, first text key, device) -> selector
        # (rows, keys, first text key, device, heads, head dim, dtype) -> the selector's `word_values`, for the loss pass in
        # progress: one tensor for every layer of that layout (SDPA's autograd node saves its values for the backward,
        # so a copy made per layer would be kept per layer); cleared when the pass ends
        self._values: dict[tuple[Any, ...], torch.Tensor] = {}
        # per map layer of the loss pass in progress with a label mask: whether some image query may attend to the
        # loss's columns there (`sees_columns`); over the call's passes (`_note_sight`): how many ran, how many had a
        # label mask at every map layer, and whether any of those saw a column (a device tensor: read once, at finish)
        self._sight: list[torch.Tensor] = []
        self._passes = 0
        self._masked_passes = 0
        self._seen: torch.Tensor | None = None
        self._column_index: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._scheduler_wrapped = False
        scheduler = getattr(context.pipeline, "scheduler", None)
        if scheduler is None or not callable(getattr(scheduler, "step", None)):
            raise UnsupportedError(f"attnctl: {type(control).__name__} needs the pipeline's scheduler (pipe.scheduler.step) to carry the updated latent")
        self.scheduler = scheduler
        self._signature = inspect.signature(type(scheduler).step)
        self.noisy_channels = noisy_channels(context.adapter.denoiser)
        # beneath the call's other wraps of `step`: a later optimiser's update (read against the latent the earlier
        # one left) is then added to the sample the earlier one moved, in the scale that sample and latent share
        context.wrap_method(scheduler, "step", self._wrap_step, innermost=True)

    @property
    def losses(self) -> list[tuple[int, list[float]]]:
        """(step, per-image loss before the step's update), read on the host when asked for (not during the call)."""
        return [(step, loss.tolist()) for step, loss in self._loss_log]

    @losses.setter
    def losses(self, value: list[tuple[int, Any]]) -> None:
        self._loss_log = list(value)

    def log_loss(self, step: int, loss: torch.Tensor) -> None:
        self._loss_log.append((step, loss.detach()))

    # -- the loss pass ----------------------------------------------------------------------------------------
    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        return self._edit if frame.extra_pass == self.loss_pass else None

    def record(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> None:
        geometry = call.geometry
        image = geometry.image_slice
        key_text = geometry.key_text_slice
        n_keys = k.shape[2]
        rows = q.shape[0]
        selector = self._column_selector(rows, n_keys, key_text.start, q.device)
        values_key = (rows, n_keys, key_text.start, q.device, q.shape[1], q.shape[3], q.dtype)
        values = self._values.get(values_key)
        if values is None:
            values = self._values[values_key] = word_values(selector, q, k)
        keys = slice(0, n_keys)

        def bias(lo: int, hi: int) -> torch.Tensor | None:
            return block_bias(spec, slice(image.start + lo, image.start + hi), keys, q.device)

        if spec.labels is not None:
            self._sight.append(sees_columns(spec.labels, image, self._key_columns(key_text.start, spec.labels.k_labels.device)))
        h, w = geometry.image_hw
        if self.keep_heads:
            maps = word_attention(q[:, :, image], k, selector, scale=spec.scale, bias=bias, per_head=True, values=values)  # (n, H, Ni, W)
            self.read[call.layer.index] = maps.transpose(2, 3).reshape(rows, q.shape[1], len(self.columns), h, w)
            return
        maps = word_attention(q[:, :, image], k, selector, scale=spec.scale, bias=bias, values=values)  # (n, Ni, W) float32
        maps = maps.transpose(1, 2).reshape(rows, len(self.columns), h, w)
        if (h, w) != self.grid:
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.read[call.layer.index] = maps

    def _column_selector(self, rows: int, n_keys: int, text_start: int, device: torch.device) -> torch.Tensor:
        """(rows, columns, keys) one-hot rows picking the loss's text columns among a layer's keys; made once per
        call and layout (its positions go to the device in one copy)."""
        key = (rows, n_keys, text_start, device)
        if key not in self._selectors:
            one_hot = torch.zeros(len(self.columns), n_keys, dtype=torch.float32)
            one_hot[torch.arange(len(self.columns)), torch.tensor([text_start + c for c in self.columns])] = 1.0
            self._selectors[key] = upload(one_hot, device).expand(rows, -1, -1)
        return self._selectors[key]

    def loss_maps(self, x: torch.Tensor, inputs: dict[str, Any], frame: DenoiserCall) -> Any:
        """The layer-averaged maps (n, W, h, w) of a loss pass at latent `x` (differentiable in `x`); with
        `keep_heads`, each layer's (n, H, W, h, w) maps, in layer order."""
        self.read = {}
        self._values = {}
        self._sight = []
        run = dict(inputs)
        latent = inputs[self.main_input]
        run[self.main_input] = x if x.dtype == latent.dtype else x.to(latent.dtype)  # differentiable: grads in x's dtype
        try:
            self.context.run_denoiser(run, frame)
        except _MapsRead:
            pass
        finally:
            self._values = {}
        if len(self.read) != len(self.layers):
            missing = [layer.name for layer in self.layers if layer.index not in self.read]
            raise UnsupportedError(
                f"attnctl: {type(self.control).__name__} read no attention map at {', '.join(missing)} in its loss pass "
                "(another control on those layers computes their attention itself, or the layers did not run)"
            )
        self._note_sight()
        if self.keep_heads:
            maps = tuple(self.read[layer.index] for layer in self.layers)
        else:
            maps = torch.stack(list(self.read.values())).mean(dim=0)
        self.read = {}
        return maps

    def _key_columns(self, start: int, device: torch.device) -> torch.Tensor:
        """The loss's columns as key positions (text starting at `start`), a long tensor on `device`: made once per
        call and device, not at every map layer (a host-to-device copy)."""
        key = (start, device)
        index = self._column_index.get(key)
        if index is None:
            index = self._column_index[key] = torch.tensor([start + c for c in self.columns], dtype=torch.long, device=device)
        return index

    def _note_sight(self) -> None:
        """After a loss pass: whether a label mask hid the loss's text columns from every image token at every map layer
        (no host read here; `_warn_hidden_words` reads the call's answer once)."""
        sight, self._sight = self._sight, []
        self._passes += 1
        if sight and len(sight) == len(self.layers):
            self._masked_passes += 1
            seen = torch.stack([s.to(sight[0].device) for s in sight]).any()
            self._seen = seen if self._seen is None else self._seen | seen.to(self._seen.device)

    def _warn_hidden_words(self) -> None:
        """At the call's end: warn when, at every loss pass of the call, a label mask hid the loss's text columns from
        every image token at every map layer. Regions' joint rule (SD3, Flux and the other joint-attention families)
        hides the base prompt from the image tokens inside its regions; where the regions cover the whole token grid at
        every step the optimiser ran, the words' maps were 0 everywhere, the loss had no gradient and the latent never
        moved (the output is Regions' alone). A Regions step window that leaves some of those steps to the base prompt
        lets the optimiser act there. One host read per call, only where every pass had a label mask at every layer."""
        passes, masked, seen = self._passes, self._masked_passes, self._seen
        if not passes or masked != passes or seen is None or bool(seen):
            return
        name = type(self.control).__name__
        warnings.warn(
            f"attnctl: {name} did nothing in this call: Regions' joint rule hides the base prompt from the image tokens "
            f"inside its regions, and at every step {name} optimised the regions covered every image token of its map "
            f"layers ({', '.join(layer.name for layer in self.layers)}), so the base prompt's words had no attention "
            f"there: their maps were 0, the loss had no gradient and the latent did not move (the output is Regions' "
            "alone). Leave part of the image outside every region, or end Regions' step window before "
            f"{name}'s, or run them in separate calls",
            IdleControlWarning, stacklevel=2,
        )

    def averaged(self, per_layer: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Kept per-head, per-layer maps as the default form: heads averaged, each resized to the finest grid, layers
        averaged (n, W, h, w)."""
        resized = []
        for maps in per_layer:
            mean = maps.mean(dim=1)
            if tuple(mean.shape[-2:]) != self.grid:
                mean = F.interpolate(mean, size=self.grid, mode="bilinear", align_corners=False)
            resized.append(mean)
        return torch.stack(resized).mean(dim=0)

    # -- the step -----------------------------------------------------------------------------------------------
    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        step = frame.step.index
        if frame.extra_pass is not None or self.control.scale == 0:
            return inputs
        if not frame.step.first:
            # the second call of a Heun / KDPM2 step (or a PNDM Runge-Kutta sub-call): the scheduler resumes from the
            # sample it stored at the step's first call, so a latent moved here would not persist (one update per step)
            return inputs
        if step not in self.updates:
            cond = frame.rows.indices("cond", None)
            if not cond:
                return inputs
            self.updates = {step: self._optimise(frame, inputs, cond)}
        updates = self.updates[step]
        latents = inputs[self.main_input]
        rows = [i for i, row in enumerate(frame.rows.rows) if row.prompt in updates]
        if not rows:
            return inputs
        new = latents.clone()
        for i in rows:
            new[i] = updates[frame.rows.rows[i].prompt][1].to(new.dtype)
        out = dict(inputs)
        out[self.main_input] = new
        return out

    def _optimise(self, frame: DenoiserCall, inputs: dict[str, Any], cond: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        self._warn_conditioning(inputs, frame.step.index)
        prompts = tuple(frame.rows.rows[i].prompt for i in cond)
        narrow = self.context.select_rows(inputs, cond)
        with torch.inference_mode(False), torch.enable_grad():
            narrow = _normal(narrow)
            start = narrow[self.main_input].detach().clone()
            rows = RowLayout(tuple(Row("cond", p) for p in prompts))
            loss_frame = dataclasses.replace(frame, rows=rows, inputs=narrow, extra_pass=self.loss_pass)
            selector = self.selector.index_select(0, self.index(prompts, self.selector.device))
            # the updates accumulate in float32: in a float16 / bfloat16 pipeline a step below half the latent's
            # resolution would round away (A&E's refinement moved a bf16 latent by exactly 0); cast once when used
            x = self.optimise_step(start.float(), narrow, loss_frame, selector, frame)
        if x is None:  # the step moves no latent
            return {}
        return {p: (start[j].detach(), x[j].detach()) for j, p in enumerate(prompts)}

    def _warn_conditioning(self, inputs: dict[str, Any], step: int) -> None:
        """Once per handle: the call carries ControlNet / T2I-Adapter residuals, which the pipeline computed from the
        latent before the update (docs/methods.md, latent optimisation)."""
        given = [name for name in self.context.adapter.conditioning_inputs if inputs.get(name) is not None]
        if not given or self.context.handle_cache.get("warned_conditioning"):
            return
        self.context.handle_cache["warned_conditioning"] = True
        warnings.warn(
            f"attnctl: {type(self.control).__name__} moves the latent at step {step}, but the denoiser call's "
            f"{', '.join(given)} (a ControlNet's or T2I-Adapter's residuals) were computed by the pipeline from the latent "
            "before the update: the loss pass and the step's denoiser call add them as given (the gradient does not go "
            "through the ControlNet, and it is not re-run at the moved latent). Warned once per handle",
            stacklevel=2,
        )

    def gradient(self, x: torch.Tensor, inputs: dict[str, Any], frame: DenoiserCall,
                 loss_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-image loss (n,), its gradient with respect to `x`) of one loss pass."""
        x = x.detach().requires_grad_(True)
        losses = loss_of(self.loss_maps(x, inputs, frame))
        if not losses.requires_grad:
            return losses.detach(), torch.zeros_like(x)
        (grad,) = torch.autograd.grad(losses.sum(), [x])
        if self.noisy_channels is not None:  # the condition channels (mask, masked image) are inputs, not the latent
            grad.narrow(channel_dim(grad), self.noisy_channels, grad.shape[channel_dim(grad)] - self.noisy_channels).zero_()
        return losses.detach(), grad

    def optimise_step(self, x: torch.Tensor, inputs: dict[str, Any], frame: DenoiserCall, selector: torch.Tensor,
                      outer: DenoiserCall) -> torch.Tensor | None:  # pragma: no cover - abstract
        """The latent `x` (float32, the cond rows) after the step's update; None: the step moves nothing."""
        raise NotImplementedError

    # -- the scheduler --------------------------------------------------------------------------------------------
    def _wrap_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            updates = next(iter(self.updates.values()), {})  # {}: no update pending, or a step that moved nothing
            self.updates = {}
            if updates:
                bound = self._signature.bind(self.scheduler, *args, **kwargs)
                bound.arguments["sample"] = self._updated_sample(bound.arguments["sample"], updates)
                args, kwargs = bound.args[1:], bound.kwargs
            return original(*args, **kwargs)

        return step

    def _updated_sample(self, sample: torch.Tensor, updates: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The scheduler's sample with each image's latent moved by its update. The denoiser's input may be the
        sample scaled (`scale_model_input`, Euler-type schedulers): the scale is read as the least-squares ratio of
        the input to the sample, and the update is divided by it."""
        out = sample.clone()
        for prompt, (old, new) in updates.items():
            if self.noisy_channels is not None and prompt < sample.shape[0] and sample[prompt].numel() != old.numel():
                dim = channel_dim(old, batched=False)
                old, new = old.narrow(dim, 0, self.noisy_channels), new.narrow(dim, 0, self.noisy_channels)
            if prompt >= sample.shape[0] or sample[prompt].numel() != old.numel():
                raise CallLayoutError(
                    f"attnctl: {type(self.control).__name__}: the scheduler's sample has shape {tuple(sample.shape)}, which does "
                    f"not hold the denoiser's latent of image {prompt} ({tuple(old.shape)}); this pipeline is not supported"
                )
            # in float32: the sums overflow float16 (65504) on a latent of a few hundred values scaled by Euler's sigma
            s, old, new = sample[prompt].reshape(old.shape).float(), old.float(), new.float()
            ratio = (old * s).sum() / (s * s).sum().clamp(min=1e-20)
            out[prompt] = (s + (new - old) / ratio).reshape(sample[prompt].shape).to(sample.dtype)
        return out

    def finish(self) -> None:
        try:
            self._warn_hidden_words()  # last use of the call's state; a warning turned into an error still clears it
        finally:
            self._passes, self._masked_passes, self._seen = 0, 0, None
            self.updates = {}
            self.read = {}
            self._sight = []
            self._values = {}
            self._column_index = {}
            self.index.clear()
