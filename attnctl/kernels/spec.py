"""What one attention call must compute: the changes controls ask for, as plain data a backend carries out.

Every field is optional; an empty spec is plain softmax attention. Backends read `features()` to say
whether they can honour a spec (see `attnctl.kernels.CAPABILITIES`).

Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D). Per-key tensors broadcast to (B, H, Nk).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, UnsupportedInputError


def per_key(
    tensor: torch.Tensor, name: str = "per-key tensor", *, batch: int | None = None, heads: int | None = None,
    keys: int | None = None,
) -> torch.Tensor:
    """A per-key edit, (B, Nk) or (B, H, Nk), as a (B|1, H|1, Nk) view; the sizes given are checked.

    Every backend reads `key_bias` and `value_scale` through this: the reference and sdpa backends add a
    query axis (`[..., None, :]`), flex and triton expand it to (B, H, Nk).
    """
    given = tuple(tensor.shape)
    if tensor.ndim == 2:
        tensor = tensor[:, None, :]
    ok = tensor.ndim == 3
    if ok and keys is not None:
        ok = tensor.shape[-1] == keys
    if ok and batch is not None:
        ok = tensor.shape[0] in (1, batch)
    if ok and heads is not None:
        ok = tensor.shape[1] in (1, heads)
    if not ok:
        expected = f"({batch if batch is not None else 'B'}, [{heads if heads is not None else 'H'},] {keys if keys is not None else 'Nk'})"
        raise ConfigError(f"{name} must have shape (B, Nk) or (B, H, Nk) = {expected}, got {given}")
    return tensor


#: The dtypes the fused kernels (triton, compiled flex) take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, who: str) -> None:
    """Raise UnsupportedInputError unless q, k and v share one of `KERNEL_DTYPES` (these tensors only: `auto` runs
    the call on another backend, and nothing is recorded against the backend)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        raise UnsupportedInputError(f"the {who} backend takes q, k, v of one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")


def as_additive(mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A mask as additive logits: bool (True = attend) becomes 0 / -inf, a float mask is cast to `dtype`."""
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=dtype or torch.float32, device=mask.device)
        return out.masked_fill_(~mask, float("-inf"))
    return mask if dtype is None else mask.to(dtype)


def version(tensor: torch.Tensor) -> int | None:
    """A tensor's in-place version counter, for caches keyed by tensor. Tensors made under `torch.inference_mode()`
    have none (reading it raises): None, and their in-place changes are not seen."""
    return None if tensor.is_inference() else tensor._version


def kept_tensors() -> contextlib.AbstractContextManager:
    """Where a tensor is made that outlives the attention call making it (a cache entry, a table kept for the call):
    under `torch.inference_mode()` it is made as a normal tensor without autograd history, since a later pass with
    autograd on (a latent optimiser's loss pass) may read it, and autograd refuses to save inference tensors. Inside a
    torch.compile trace nothing changes (the graph's tensors are not the caches' across calls)."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())  # after it: leaving inference mode restores the grad mode
    return stack


_MISSING = object()


class IdentityCache:
    """A few values made from tensors, by the tensors' identity (and other hashable parts of the key): at most `size`
    entries, the oldest dropped first. An entry holds its tensors weakly (a tensor made later at the same address
    does not hit it) and goes when the first of them dies, so what it holds lives no longer than what it was made
    from. Not for use inside a torch.compile trace (the callers make the value there)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[tuple, tuple[tuple[weakref.ref | None, ...], object, tuple[weakref.finalize, ...]]] = {}

    def get(self, tensors: tuple[torch.Tensor | None, ...], extra: tuple = (), default: object = None) -> object:
        found = self._entries.get((tuple(id(t) for t in tensors), extra))
        if found is None or any((ref() if ref is not None else None) is not t for ref, t in zip(found[0], tensors)):
            return default
        return found[1]

    def put(self, tensors: tuple[torch.Tensor | None, ...], extra: tuple, value: object) -> object:
        key = (tuple(id(t) for t in tensors), extra)
        self._drop(key)
        while len(self._entries) >= self.size:
            self._drop(next(iter(self._entries)))
        refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        finalizers = tuple(weakref.finalize(t, self._entries.pop, key, None) for t in dict.fromkeys(t for t in tensors if t is not None))
        self._entries[key] = (refs, value, finalizers)
        return value

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            for finalizer in entry[2]:
                finalizer.detach()

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)


#: `bounded_value_scale`'s results, by value-scale tensor: every layer of a denoiser call passes the same one.
_BOUNDED_SCALES = IdentityCache(4)


#: `additive_in`'s results, by the bool mask's storage: every layer of a denoiser call passes one mask, or a view of one.
_ADDITIVE = IdentityCache(4)


def additive_in(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as additive 0 / -inf logits in `dtype`, the queries' (a float mask: itself).

    In the queries' dtype a half-precision call's fused kernel reads half the bytes of a float32 mask, and the Triton
    kernels are compiled for that signature (`triton_aot`'s runtime matrix). Made once per mask, not at every
    attention call: cached by the mask's storage (Z-Image makes a new (B, 1, 1, S) view of the forward's (B, S) mask at
    every layer, and a view made under inference mode does not know its base), the view's geometry and the in-place
    version (an inference tensor has none: by storage alone; a model's mask is made per forward, not changed in
    place; the runtime forgets every entry at each denoiser call, `forget_mask_conversions`, so a mask changed in place
    without a version is stale for one forward at most). The entry goes with the storage. No host sync; in a
    torch.compile trace, made in the graph."""
    if mask.dtype != torch.bool:
        return mask
    if torch.compiler.is_compiling():
        return as_additive(mask, dtype)
    storage = mask.untyped_storage()  # one Python object per storage while it lives: weakly referenced by the cache
    extra = (version(mask), tuple(mask.shape), mask.stride(), mask.storage_offset(), dtype, str(mask.device))
    found = _ADDITIVE.get((storage,), extra)
    if found is None:
        with kept_tensors():
            found = _ADDITIVE.put((storage,), extra, as_additive(mask, dtype))
    return found


def forget_mask_conversions() -> None:
    """Drop `additive_in`'s entries: the runtime calls it as each denoiser call opens (a model makes its mask per
    forward; an inference tensor has no version to tell a mask changed in place since the last forward)."""
    _ADDITIVE.clear()


def bounded_value_scale(value_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A value scale for float16 attention: (value_scale / peak, peak) in `per_key`'s form, peak (B|1, H|1, 1) being
    each row's largest |scale|, at least 1. The fused backends scale V (or P) in the half dtype, where w * |v| past
    65504 is inf (mixed-sign infs then NaN) although the output, an average of the scaled values, may be finite: with
    the scale at most 1 the products stay in range, and the output times the peak (`times_peak`) is the same average.
    A scale of at most 1 everywhere has peak 1 and is returned as it is, to the bit. Made on the device, no host
    sync, once per tensor and version (in a torch.compile trace, in the graph)."""
    scale = per_key(value_scale, "value_scale")
    extra = (version(value_scale),)
    if torch.compiler.is_compiling() or value_scale.requires_grad or extra[0] is None:
        return _bounded(scale)  # an inference tensor has no version: changed in place, it would look unchanged
    found = _BOUNDED_SCALES.get((value_scale,), extra)
    if found is None:
        with kept_tensors():
            found = _BOUNDED_SCALES.put((value_scale,), extra, _bounded(scale))
    return found


def _bounded(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    peak = scale.abs().amax(-1, keepdim=True).clamp(min=1)
    return scale / peak, peak


def times_peak(out: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """`out` (B, H, rows, D) times `bounded_value_scale`'s peak (B|1, H|1, 1), multiplied in the peak's dtype and
    rounded once to `out`'s (a peak past float16's range stays exact); in place unless autograd records `out`."""
    peak = peak[..., None]
    if out.requires_grad:
        return (out * peak).to(out.dtype)
    return out.mul_(peak)


@dataclass(frozen=True, eq=False)  # identity equality and hash: backends cache per LabelMask object
class LabelMask:
    """Region / isolation masks evaluated from labels, never as a dense N x N tensor in fused kernels.

    Query i of batch row b and key j may interact with additive bias `table[b, q_labels[b, i], k_labels[b, j]]`
    (0: allowed, -inf: masked, finite: a soft penalty). Each of the three tensors has B rows or one row, which then
    stands for every batch row (broadcast): labels that every row shares (isolation) are one row, so that the sdpa
    backend builds a (1, 1, Nq, Nk) mask that SDPA broadcasts, not B identical ones. The fused backends take it
    with B rows (`semantics.labels_for_batch`).
    """

    q_labels: torch.Tensor  # (B | 1, Nq) int64
    k_labels: torch.Tensor  # (B | 1, Nk) int64
    table: torch.Tensor  # (B | 1, Lq, Lk) float
    #: Dense forms made before a compiled forward, by (device, dtype) (`sdpa.prepare_labels`): a graph reads them
    #: instead of building the mask at every attention call.
    prepared: dict = field(default_factory=dict, repr=False, compare=False)
    #: Label masks derived from this one for some batch rows or query rows (`semantics.spec_rows`,
    #: `semantics.spec_queries`), kept so that the backends' per-object caches (dense masks, kernel layouts) hit.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def versions(self) -> tuple[int | None, ...]:
        """The label tensors' version counters (`version`), so that cached masks rebuild after an in-place change."""
        return tuple(version(t) for t in (self.q_labels, self.k_labels, self.table))

    @property
    def rows(self) -> int:
        """The batch rows the label tensors hold: B, or 1 when every batch row shares them."""
        return max(self.q_labels.shape[0], self.k_labels.shape[0], self.table.shape[0])

    def dense(self) -> torch.Tensor:
        """The (rows, 1, Nq, Nk) additive mask in the table's dtype (`rows`: B, or 1 for labels every row shares); for
        reference backends and small sizes only."""
        rows = self.rows
        table = self.table.expand(rows, -1, -1)
        q_labels, k_labels = self.q_labels.expand(rows, -1), self.k_labels.expand(rows, -1)
        by_query = torch.gather(table, 1, q_labels[:, :, None].expand(-1, -1, table.shape[-1]))
        return torch.gather(by_query, 2, k_labels[:, None, :].expand(-1, by_query.shape[1], -1))[:, None]

    def fully_masked_queries(self) -> torch.Tensor:
        """(rows, Nq) bool: queries whose every key is masked (their output is defined as zeros)."""
        rows, lk = self.rows, self.table.shape[2]
        present = torch.zeros(rows, lk, dtype=torch.bool, device=self.k_labels.device)
        present.scatter_(1, self.k_labels.expand(rows, -1), True)
        table = self.table.expand(rows, -1, -1)
        open_label = ((table > float("-inf")) & present[:, None, :]).any(-1)  # (rows, Lq)
        return ~torch.gather(open_label, 1, self.q_labels.expand(rows, -1))


@dataclass(frozen=True)
class Window:
    """Local attention for image queries over the image-token grid (DiTFastAttn, Yuan et al. 2024).

    `radius=(rh, rw)`: a 2-D neighbourhood, |dr| <= rh and |dc| <= rw, on one frame. `radius=(rf, rh, rw)`: a 3-D
    neighbourhood over the frame-major frames x height x width tokens of a video, |df| <= rf and |dr| <= rh and
    |dc| <= rw (on one frame, `frames` = 1, it is the 2-D one). `band=w`: the paper's 1-D band over the flattened
    image tokens, |i - j| <= w (on video over the frame-major tokens, so a band wider than one frame reaches the
    neighbouring frames). Text tokens (before or after the image tokens) attend to and are attended by everything,
    so windows never cut image tokens off from the prompt.
    """

    grid_hw: tuple[int, int]
    radius: tuple[int, int] | tuple[int, int, int] | None = None
    band: int | None = None
    text_len: int = 0
    text_first: bool = False
    frames: int = 1  # video: `frames` token frames of `grid_hw` each, frame-major
    #: Dense forms made before a compiled forward, by (device, dtype) (`sdpa.prepare_window`): a graph reads them instead
    #: of building the mask from the grid's sizes, which dynamo would make constants of the graph (one per image size).
    #: Not an init field: `dataclasses.replace` gives the new window its own.
    prepared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.radius is None) == (self.band is None):
            raise ValueError("Window needs exactly one of radius=(rh, rw), radius=(rf, rh, rw) or band=w")
        if self.radius is not None and len(self.radius) not in (2, 3):
            raise ValueError(f"Window.radius must be (rh, rw) or (rf, rh, rw), got {self.radius!r}")
        if self.radius is not None and len(self.radius) == 2 and self.frames != 1:
            raise ValueError(
                f"a 2-D window radius is defined on one frame; this grid has {self.frames} token frames "
                "(use radius=(rf, rh, rw) or band=w)"
            )

    @property
    def n_img(self) -> int:
        """Image (video) tokens the window covers: frames x height x width."""
        return self.frames * self.grid_hw[0] * self.grid_hw[1]

    @property
    def reach(self) -> tuple[int, int, int]:
        """(rf, rh, rw) of a radius window (rf = 0 for a 2-D radius); only for `radius` windows."""
        if self.radius is None:
            raise ValueError("a band window has no radius")
        return (0, *self.radius) if len(self.radius) == 2 else tuple(self.radius)

    def allowed(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(N, N) bool over the joint sequence; for reference backends and small sizes only."""
        n_img = self.n_img
        idx = torch.arange(n_img, device=device)
        if self.band is not None:
            image = (idx[:, None] - idx[None, :]).abs() <= self.band
        else:
            h, w = self.grid_hw
            rf, rh, rw = self.reach
            frame, row, col = idx // (h * w), (idx % (h * w)) // w, idx % w
            image = (
                ((frame[:, None] - frame[None, :]).abs() <= rf)
                & ((row[:, None] - row[None, :]).abs() <= rh)
                & ((col[:, None] - col[None, :]).abs() <= rw)
            )
        n = n_img + self.text_len
        full = torch.ones(n, n, dtype=torch.bool, device=device)
        start = self.text_len if self.text_first else 0
        full[start : start + n_img, start : start + n_img] = image
        return full


@dataclass(frozen=True)
class Sparse:
    """PLADIS (Kim et al. 2025): output `dense + scale * (sparse - dense)` with sparse = alpha-entmax."""

    alpha: float = 1.5
    scale: float = 2.0


#: An edit's `query_range` meaning the layer's image queries (`Geometry.image_slice`), made a range by the processor
#: (`Edit.spec`): an edit made before a compiled forward then holds no token count, which dynamo would make a constant
#: of the graph (one graph per image size and prompt length).
IMAGE_QUERIES = "image"


@dataclass(frozen=True)
class AttentionSpec:
    """The changes to one attention call. See the module docstring for shapes.

    `key_bias` (additive logits) and `value_scale` (multiplies value rows, i.e. `A (w * V)`: Prompt-to-Prompt
    reweighting without renormalisation) act per key and apply to the query rows in `query_range`
    (None: all rows); `sparse` applies to the same rows. `attn_mask` is the model's own additive mask,
    passed through exactly as the stock processor passes it. An edit's `query_range` may be `IMAGE_QUERIES`, which
    the processor makes the layer's image rows before the op (`Edit.spec`); a backend never sees it.
    """

    scale: float | None = None
    attn_mask: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    query_range: tuple[int, int] | str | None = None
    labels: LabelMask | None = None
    window: Window | None = None
    sparse: Sparse | None = None
    return_lse: bool = False

    def dense_elements(self, batch: int, nq: int, nk: int) -> int:
        """Elements of a dense mask of the label masks and windows, rows x Nq x Nk (0 when none): B rows, or one for
        labels that every row shares (`LabelMask.rows`) alone, which SDPA broadcasts. The sdpa backend builds one
        except for a window it computes in tiles: `sdpa.mask_elements` is what it builds."""
        if self.labels is None and self.window is None:
            return 0
        shared = self.labels is not None and self.window is None and self.attn_mask is None
        return (min(self.labels.rows, batch) if shared else batch) * nq * nk

    def features(self) -> tuple[str, ...]:
        """The capability names this spec needs, in a fixed order."""
        wanted = []
        if self.attn_mask is not None:
            wanted.append("attn_mask")
        if self.key_bias is not None:
            wanted.append("key_bias")
        if self.value_scale is not None:
            wanted.append("value_scale")
        if self.query_range is not None:
            wanted.append("query_range")
        if self.labels is not None:
            wanted.append("labels")
        if self.window is not None:
            wanted.append("window")
        if self.sparse is not None:
            wanted.append("sparse")
        if self.return_lse:
            wanted.append("lse")
        return tuple(wanted)

    @property
    def is_plain(self) -> bool:
        features = self.features()
        return not features or features == ("attn_mask",)


PLAIN = AttentionSpec()
