"""Controls together: what each control does to a layer (`layer_effects`), the combinations that cannot share a
layer (refused at `apply` once it checks effects; a clear attnctl error at the first call before that), Reweight
with Regions on joint models, guidance computing only what it needs, no host syncs in the hot path, output keys.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnctl
from attnctl.control import Bound, Control
from attnctl.controls.guidance.pag import IdentityAttention as PAGIdentity
from attnctl.denoiser_call import DenoiserCall, RowLayout
from attnctl.errors import AttnctlError, ConfigError, UnsupportedError
from attnctl.families import adapter_for
from attnctl.families.base import Canvas
from attnctl.handle import denoiser_of
from attnctl.processors.edit import Edit, LayerHook, merge_edits
from attnctl.steps import StepInfo
from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline

from . import regions_reference as regions_ref
from .helpers import generate

EFFECTS = (
    "tokens", "labels", "region_prompts", "region_tokens", "window", "sparse", "query", "capture", "cache", "perturb", "value_scale",
    "key_bias", "joint_perturb",
)


def regions(isolate: bool = False, base_ratio: float = 0.2) -> attnctl.Regions:
    return attnctl.Regions(
        [attnctl.Region("a red car", box=(0, 0, 0.5, 1)), attnctl.Region("a cat", box=(0.5, 0, 1, 1))],
        isolate=isolate, base_ratio=base_ratio,
    )


def adapter(pipe):
    return adapter_for(denoiser_of(pipe)[1])


def needs_apply_checks() -> None:
    if not hasattr(Control, "layer_effects"):
        pytest.skip("needs Control.layer_effects checks in apply (fix-core)")


# -- what each control does to a layer ------------------------------------------------------------------------------
def _effects(control, pipe) -> dict[str, tuple[str, ...]]:
    info = adapter(pipe)
    return {layer.name: control.layer_effects(info, layer) for layer in control.select(info)}


def test_every_control_states_its_effects_in_the_shared_vocabulary(tiny_cache):
    sd, sd3 = tiny_cache("tiny-sd"), tiny_cache("tiny-sd3")
    cases = [
        (sd, attnctl.Reweight({"cat": 2.0}), {"value_scale"}),
        (sd3, attnctl.Reweight({"cat": 2.0}), {"value_scale"}),
        (sd, attnctl.AttentionMaps(["cat"]), {"capture"}),
        (sd, attnctl.PAG(), {"perturb"}),
        (sd3, attnctl.SEG(), {"query"}),
        (sd, attnctl.SAG(), {"capture"}),
        (sd, attnctl.PLADIS(), {"sparse"}),
        (sd3, attnctl.PLADIS(), {"sparse"}),
        (sd, attnctl.ToMe(), {"tokens"}),
        (sd3, attnctl.ToMe(), {"tokens"}),
        (sd, attnctl.AgentAttention(), {"tokens"}),
        (sd, attnctl.TGate(), {"cache"}),
        (tiny_cache("tiny-pixart"), attnctl.FastAttn(), {"cache", "window"}),
    ]
    for pipe, control, expected in cases:
        found = _effects(control, pipe)
        assert found and all(set(effects) == expected for effects in found.values()), (control, found)
    # identities have no effect
    for control in (attnctl.PAG(scale=0.0), attnctl.SEG(scale=0.0), attnctl.PLADIS(scale=0.0), attnctl.ToMe(ratio=0.0),
                    attnctl.FastAttn(threshold=0.0)):
        pipe = sd3 if isinstance(control, attnctl.SEG) else sd
        assert set(_effects(control, pipe).values()) == {()}, control
    # skip-layer guidance replaces whole blocks for its own rows only
    assert set(_effects(attnctl.SkipLayer(blocks=(1,)), sd3).values()) == {()}
    # FastAttn on cross-attention layers: caches, no window
    pixart = tiny_cache("tiny-pixart")
    cross = _effects(attnctl.FastAttn(layers="cross"), pixart)
    assert set(cross.values()) == {("cache",)}


def test_regions_effects_depend_on_family_layer_and_isolation(tiny_cache):
    sd, sd3 = tiny_cache("tiny-sd"), tiny_cache("tiny-sd3")
    info = adapter(sd)
    plain = {layer.kind: regions().layer_effects(info, layer) for layer in info.layers}
    assert plain == {"cross": ("region_prompts",), "self": ()}  # separate attentions inside a cross-attention hook
    isolated = {layer.kind: regions(isolate=True).layer_effects(info, layer) for layer in info.layers}
    assert isolated == {"cross": ("region_prompts",), "self": ("labels",)}
    info = adapter(sd3)
    joint = [layer for layer in info.layers if layer.kind == "joint"]
    assert {regions().layer_effects(info, layer) for layer in joint} == {("labels", "region_tokens")}
    only_first = attnctl.Regions(regions().regions, layers="transformer_blocks.0")
    effects = {layer.name: only_first.layer_effects(info, layer) for layer in joint}
    assert effects["transformer_blocks.0.attn"] == ("labels", "region_tokens")
    assert effects["transformer_blocks.1.attn"] == ("region_tokens",)  # region text hidden there, still in the sequence
    isolation_only = regions(isolate=True, base_ratio=1.0)
    assert {isolation_only.layer_effects(info, layer) for layer in joint} == {("labels",)}  # no region tokens


def test_every_registered_control_of_the_library_states_its_effects(tiny_cache):
    sd = tiny_cache("tiny-sd")
    info = adapter(sd)
    owned = ("reweight", "attention-maps", "pag", "seg", "sag", "pladis", "skip-layer", "regions", "tgate", "fastattn",
             "tome", "agent-attention")
    registry = attnctl.control.registered_controls()
    for name in owned:
        cls = registry[name]
        assert "layer_effects" in vars(cls) or any("layer_effects" in vars(base) for base in cls.__mro__[1:] if base is not Control
                                                   and base is not object), name
    for layer in info.layers:
        for control in (regions(isolate=True), attnctl.FastAttn(), attnctl.TGate(sp_interval=2)):
            assert set(control.layer_effects(info, layer)) <= set(EFFECTS)


# -- combinations that cannot share a layer ----------------------------------------------------------------------
CONFLICTS = [
    ("tiny-sd3", lambda: [attnctl.PLADIS(), regions()]),
    ("tiny-sd", lambda: [attnctl.ToMe(), regions(isolate=True)]),
    ("tiny-sd", lambda: [attnctl.AgentAttention(), regions(isolate=True)]),
    ("tiny-sd3", lambda: [attnctl.ToMe(), regions()]),
    ("tiny-sd3", lambda: [attnctl.SEG(), attnctl.ToMe()]),
    ("tiny-sd3", lambda: [attnctl.ToMe(), attnctl.AttentionMaps(["cat"])]),
    ("tiny-sd", lambda: [attnctl.TGate(gate_step=1), attnctl.AttentionMaps(["cat"])]),  # reused steps: no maps
    ("tiny-sd", lambda: [attnctl.TGate(gate_step=1, sp_interval=2), attnctl.SAG()]),  # SAG reads a self-attention map
    ("tiny-sd3", lambda: [attnctl.ToMe(), attnctl.PAG()]),  # PAG's joint identity: the image block's diagonal
    ("tiny-sd3", lambda: [attnctl.PAG(separate=True), attnctl.ToMe()]),
]
CONFLICT_IDS = ["pladis+regions-sd3", "tome+isolation-sd", "agent+isolation-sd", "tome+regions-sd3", "seg+tome-sd3",
                "tome+maps-sd3", "tgate+maps-sd", "tgate+sag-sd", "tome+pag-sd3", "pag-separate+tome-sd3"]


@pytest.mark.parametrize("name, make", CONFLICTS, ids=CONFLICT_IDS)
def test_conflicting_controls_are_refused_at_apply(name, make, tiny_cache):
    needs_apply_checks()
    pipe = tiny_cache(name)
    denoiser = denoiser_of(pipe)[1]
    processors = {key: type(p) for key, p in denoiser.attn_processors.items()}
    with pytest.raises((ConfigError, UnsupportedError)):
        attnctl.apply(pipe, make())
    assert "forward" not in denoiser.__dict__  # nothing was installed
    assert {key: type(p) for key, p in denoiser.attn_processors.items()} == processors
    for control in make():  # each alone is fine
        attnctl.apply(pipe, [control]).remove()


@pytest.mark.parametrize("name, make", CONFLICTS, ids=CONFLICT_IDS)
def test_conflicting_controls_fail_with_an_attnctl_error(name, make, tiny_cache):
    """The backstop: whichever way a conflict is met (at apply, or at the first layer call without the apply-time
    check), the error is an attnctl error naming what cannot be combined, never a raw shape error."""
    pipe = tiny_cache(name)
    try:
        handle = attnctl.apply(pipe, make())
    except AttnctlError:
        return
    with handle, pytest.raises(AttnctlError) as caught:
        generate(pipe, name, prompt="a photo of a cat", steps=1)
    assert "layer" in str(caught.value) or "share" in str(caught.value)


def test_pag_on_a_joint_layer_token_reduction_merges_is_refused_at_apply_naming_both(tiny_cache):
    """PAG's joint-attention perturbation masks the image x image block to its diagonal over the layer's own image
    tokens (diffusers' PAGCFGJointAttnProcessor2_0); ToMe hands it merged ones. It was accepted and failed at the
    first call; it is a layer conflict at apply, in both orders, and ToMe on other layers still composes."""
    pipe = tiny_cache("tiny-sd3")
    for controls in ([attnctl.ToMe(), attnctl.PAG()], [attnctl.PAG(), attnctl.ToMe()]):
        with pytest.raises(ConfigError) as caught:
            attnctl.apply(pipe, controls)
        message = str(caught.value)
        assert "ToMe (tokens)" in message and "PAG (joint_perturb)" in message and "transformer_blocks.1.attn" in message
    info = adapter(pipe)
    assert {layer.name: attnctl.PAG().layer_effects(info, layer) for layer in attnctl.PAG().select(info)} == {
        "transformer_blocks.1.attn": ("perturb", "joint_perturb")
    }
    stock = generate(pipe, "tiny-sd3", prompt="a photo of a cat", steps=2)
    with attnctl.apply(pipe, [attnctl.ToMe(layers="transformer_blocks.0"), attnctl.PAG()]):
        out = generate(pipe, "tiny-sd3", prompt="a photo of a cat", steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_pag_perturbed_rows_get_the_other_controls_row_edits_in_either_order(name, tiny_cache):
    """Region prompts act on PAG's perturbed rows (copies of the cond rows) and Prompt-to-Prompt links a perturbed
    copy to the base's copy (docs/methods.md). PAG's identity took its rows out of the chain before the hooks of
    controls listed after it, so on joint layers [PAG, Regions] skipped the region blend for them (0.0069 tiny-flux,
    0.0078 tiny-sd3 from [Regions, PAG]) and [PAG, P2P] the links (0.028 tiny-flux). Its hook now sits inside the
    others' whatever the order: both orders give the documented result, bitwise."""
    pipe = tiny_cache(name)
    prompts = ["a red cat and a blue dog", "a green cat and a blue dog"]
    p2p = lambda: attnctl.PromptToPrompt("replace", cross_steps=0.8, self_steps=0.4)  # noqa: E731
    for make in (regions, p2p):
        outs = []
        for controls in ([make(), attnctl.PAG(scale=3.0)], [attnctl.PAG(scale=3.0), make()]):
            with attnctl.apply(pipe, controls):
                outs.append(generate(pipe, name, prompt=prompts, steps=3))
        assert torch.equal(outs[0], outs[1]), (make, (outs[0] - outs[1]).abs().max())
    merged = merge_edits([Edit(hooks=(PAGIdentity((1,), 2),)), Edit(hooks=(LayerHook(),))], "a layer")
    assert type(merged.hooks[-1]).__name__ == "IdentityAttention"


class _EagerRegionsP2P:
    """Regions on cross-attention (docs/methods.md "Regions") with Prompt-to-Prompt's cross window over every step
    (docs/methods.md "Prompt-to-Prompt editing") on diffusers' eager attention, probabilities materialised in float64,
    written from the definitions, not from the controls. The edited cond row takes its base cond row's probabilities
    over the base prompt's keys (one swapped token of one token: P2P's mapper is the identity; refine: the swapped
    token is a new one, `a_j = 0`, and keeps the edited row's own column) and over each region prompt's keys (the
    region prompts are the same for every row, all aligned), times its own values:
    `out_e(x) = (1 - (1-b) M(x)) P'(x) V_e + (1-b) sum_r m_r(x) P_b^r(x) V_r`."""

    def __init__(self, state, links: dict[int, int], new_token: int | None):
        self.state, self.links, self.new_token = state, links, new_token

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        state = self.state
        batch, n, _ = hidden_states.shape
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q, k, v = (regions_ref._heads(proj(x), attn.heads) for proj, x in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        scale = q.shape[-1] ** -0.5

        def probabilities(row, keys, bias):
            logits = (q[row].double() @ keys.double().transpose(-1, -2)) * scale
            return torch.softmax(logits if bias is None else logits + bias, -1)

        out = torch.empty(batch, attn.heads, n, v.shape[-1], dtype=torch.float64)
        for row in range(batch):
            if not cross:
                out[row] = probabilities(row, k[row], None) @ v[row].double()
                continue
        if cross:
            bias = [None if attention_mask is None else attention_mask[row].double() for row in range(batch)]
            layout = state.layout(n)
            b = state.base_ratio
            for row in range(batch):
                source = self.links.get(row, row)  # the row whose probabilities this row takes
                base = probabilities(source, k[source], bias[source])
                if self.new_token is not None and source != row:
                    base[..., self.new_token] = probabilities(row, k[row], bias[row])[..., self.new_token]
                result = base @ v[row].double()
                if row in state.cond_rows:
                    result = (1 - (1 - b) * layout.total)[None, :, None] * result
                    for r in range(state.regions):
                        context_r = state.region_context[r : r + 1].to(hidden_states.dtype)
                        rk = regions_ref._heads(attn.to_k(context_r), attn.heads)[0]
                        rv = regions_ref._heads(attn.to_v(context_r), attn.heads)[0]
                        rbias = None if state.region_bias is None else state.region_bias[r].double()[None, :]
                        region = probabilities(source, rk, rbias) @ rv.double()
                        result = result + (1 - b) * layout.weights[r][None, :, None] * region
                out[row] = result
        hidden = attn.to_out[0](regions_ref._merge(out).to(hidden_states.dtype))
        return attn.to_out[1](hidden)


def _region_state(pipe, name: str, layout: attnctl.Regions, grids: dict[int, tuple[int, int]]):
    prompts = [region.prompt for region in layout.regions]
    if name == "tiny-pixart":
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                device="cpu", clean_caption=False, max_sequence_length=32)
        with torch.no_grad():
            context = pipe.transformer.caption_projection(embeds)
        bias = (1 - mask.double()) * -10000.0
    else:
        context, bias = pipe.encode_prompt(prompts, "cpu", 1, False)[0], None
    return regions_ref.RefState([region.box for region in layout.regions], [region.subject for region in layout.regions],
                                layout.base_ratio, False, float("inf"), grids, region_context=context.detach(),
                                region_bias=bias, cond_rows=[2, 3])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart"])
@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_p2p_links_the_region_prompts_attention_in_either_order(name, mode, tiny_cache):
    """Prompt-to-Prompt's edited rows take the base row's cross-attention probabilities in its cross window, and with
    Regions a row's cross-attention includes its attention to the region prompts, so the edited row attends to them
    with the base row's probabilities as well. The hooks nested in control order: [Regions, P2P] took the region
    prompts' attention with the edited row's own queries (here 0.0021 from the reference on tiny-sd, 0.012 on
    tiny-pixart, where [P2P, Regions] matched it), and with refine [P2P, Regions] added it twice to the edited row,
    once per part of the row (3.4 from the reference on tiny-sd, 247 on tiny-pixart latents of scale 775). P2P's link
    now sits outside Regions whatever the order and Regions adds a row's region attention once: both orders equal
    each other bitwise and an eager reference written from the definitions."""
    pipe = tiny_cache(name)
    prompts = ["a red cat and a blue dog", "a green cat and a blue dog"]
    ids = [pipe.tokenizer(prompt).input_ids for prompt in prompts]
    swapped = [j for j, (a, b) in enumerate(zip(*ids)) if a != b]
    assert len(ids[0]) == len(ids[1]) and len(swapped) == 1  # one word of one token swapped: P2P's mapper is the identity
    layout = regions(base_ratio=0.2)

    def call():
        generators = [torch.Generator().manual_seed(0) for _ in prompts]  # one start noise for both prompts
        return pipe(prompts, num_inference_steps=2, guidance_scale=5.0, output_type="latent", generator=generators,
                    **CALL_DEFAULTS[name]).images

    def run(controls):
        with attnctl.apply(pipe, controls):
            return call()

    p2p = lambda: attnctl.PromptToPrompt(mode, cross_steps=1.0, self_steps=0.0)  # noqa: E731
    outs = [run([p2p(), layout]), run([layout, p2p()])]
    assert torch.equal(outs[0], outs[1]), (outs[0] - outs[1]).abs().max()
    assert torch.equal(run([attnctl.PromptToPrompt(mode, cross_steps=0.8, self_steps=0.4), layout]),
                       run([layout, attnctl.PromptToPrompt(mode, cross_steps=0.8, self_steps=0.4)]))
    denoiser = denoiser_of(pipe)[1]
    state = _region_state(pipe, name, layout, {side * side: (side, side) for side in (4, 8, 16)})  # square canvases
    saved = dict(denoiser.attn_processors)
    denoiser.set_attn_processor(_EagerRegionsP2P(state, {3: 2}, swapped[0] if mode == "refine" else None))
    try:
        expected = call()
    finally:
        denoiser.set_attn_processor(saved)
    torch.testing.assert_close(outs[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, make", [
    ("tiny-flux", lambda: [attnctl.PAG(), regions(isolate=True)]),
    ("tiny-sd3", lambda: [attnctl.PAG(), attnctl.PLADIS()]),
    ("tiny-sd3", lambda: [attnctl.SkipLayer(blocks=(1,), steps=(0.0, 1.0)), regions()]),
    ("tiny-sd", lambda: [attnctl.ToMe(layers="mid & self"), attnctl.PAG()]),  # identity over merged tokens
    # a threshold that lets calibration share steps: at 0.5 FastAttn's change on the tiny model is an ulp or two
    ("tiny-pixart", lambda: [attnctl.FastAttn(threshold=5.0), attnctl.PAG()]),
    # three controls on disjoint layers of one call (TGate's up cross, PAG's mid self, the maps' down layers)
    ("tiny-sd", lambda: [attnctl.TGate(gate_step=1, layers="up_blocks & cross"), attnctl.PAG(), attnctl.AttentionMaps(["cat"], layers="down_blocks")]),
], ids=["pag+isolation-flux", "pag+pladis-sd3", "skip+regions-sd3", "tome+pag-sd", "fastattn+pag-pixart", "tgate+pag+maps-sd"])
def test_compatible_controls_share_layers(name, make, tiny_cache):
    """Every control acts in the combination: its output differs from each control's alone by far more than
    rounding (a runtime that kept one control's edit per layer gives that control's output). README names no order
    dependence for these controls (its exception is the latent optimisers' loss passes, run in control order), so
    both orders give the same output and the same maps, bitwise."""
    pipe = tiny_cache(name)

    def call():
        return generate(pipe, name, prompt="a photo of a cat", steps=2)

    stock = call()
    floor = 1e-5 * stock.abs().max()  # rounding: a dropped edit left 1.4e-7 of the scale on tiny-flux (other batch shape)
    alone = {}
    for control in make():
        with attnctl.apply(pipe, [control]):
            alone[type(control).__name__] = call()
    outs, maps = [], []
    for controls in (make(), list(reversed(make()))):
        with attnctl.apply(pipe, controls) as handle:
            outs.append(call())
            if any(isinstance(control, attnctl.AttentionMaps) for control in controls):
                maps.append(handle.outputs["attention_maps"].maps)
        assert torch.isfinite(outs[-1]).all()
        for label, out in alone.items():  # a capture (AttentionMaps) alone is stock
            assert (outs[-1] - out).abs().max() > floor, (label, [type(c).__name__ for c in controls])
    assert torch.equal(outs[0], outs[1]), (outs[0] - outs[1]).abs().max()
    assert not maps or torch.equal(maps[0], maps[1])


# -- Reweight with Regions on joint models -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_reweight_with_regions_on_joint_models(name, tiny_cache):
    pipe = tiny_cache(name)
    prompt = "a photo of a cat"
    layout = regions()
    with attnctl.apply(pipe, [layout]):
        alone = generate(pipe, name, prompt=prompt)
    with attnctl.apply(pipe, [attnctl.Reweight({"cat": 1.0}), layout]):  # weight 1: nothing changes
        assert torch.equal(generate(pipe, name, prompt=prompt), alone)
    for controls in ([attnctl.Reweight({"cat": 3.0}), layout], [layout, attnctl.Reweight({"cat": 3.0})]):
        with attnctl.apply(pipe, controls) as handle:
            both = generate(pipe, name, prompt=prompt)
            bound = next(b for b in handle.runtime.last_call.bound if type(b).__name__ == "ReweightBound")
        assert torch.isfinite(both).all() and (both - alone).abs().max() > 1e-4
    # the edit at a joint layer of a call with region tokens (two regions of 7 tokens): weights on the base text only
    layer = next(layer for layer in adapter(pipe).layers if layer.kind == "joint")
    base_len, region_len = bound.text_len, 7
    canvas = Canvas(latent_hw=(8, 8), token_hw=(4, 4), text_len=base_len + 2 * region_len)
    rows = RowLayout.batched_cfg(1) if name == "tiny-sd3" else RowLayout.single("cond", 1)
    frame = DenoiserCall(step=StepInfo(0, 2), rows=rows, canvas=canvas)
    edit = bound.edit(layer, frame)
    geometry = frame.geometry(layer)
    scale = edit.value_scale[-1]  # the cond row
    assert scale.shape == (geometry.image_len + base_len + 2 * region_len,)
    text = geometry.key_text_slice
    weighted = torch.nonzero(scale != 1).flatten().tolist()
    assert weighted and all(text.start <= p < text.start + base_len for p in weighted)  # base text only
    assert torch.all(scale[text.start + base_len : text.stop] == 1)  # region tokens keep weight 1
    assert edit.query_range == (geometry.image_slice.start, geometry.image_slice.stop)


# -- guidance computes only what it needs -------------------------------------------------------------------------
@dataclass(frozen=True)
class AttendRecorder(Control, type_name="test-combinations-attend-recorder"):
    """Records, per attention call it wraps, the layer, the batch rows and the tags of the rows it sees."""

    layers: Any = None
    log: list = field(default_factory=list, compare=False, hash=False)
    at_op: bool = False  # the hook nearest the attention op (`LayerHook.innermost`): what the op itself is given

    def bind(self, context):
        return _RecorderBound(self, context.layers, (0.0, 1.0))


class _RecorderBound(Bound):
    def edit(self, layer, frame):
        return Edit(hooks=((_OpRecorder if self.control.at_op else _Recorder)(self.control.log),))


class _Recorder(LayerHook):
    def __init__(self, log):
        self.log = log

    def attend(self, call, q, k, v, spec, compute):
        assert q.shape[0] == len(call.rows)
        self.log.append((call.layer.name, q.shape[0], tuple(row.tag for row in call.rows.rows)))
        return compute(q, k, v, spec)


class _OpRecorder(_Recorder):
    innermost = True


@pytest.mark.parametrize("name, layers", [("tiny-sd", "mid & self"), ("tiny-sd3", "transformer_blocks.1")])
def test_pag_runs_no_attention_for_the_perturbed_rows(name, layers, tiny_cache):
    pipe = tiny_cache(name)
    pag = attnctl.PAG(scale=3.0, layers=layers)
    with attnctl.apply(pipe, [pag]):
        alone = generate(pipe, name)
    at_op = AttendRecorder(layers=layers, at_op=True)
    with attnctl.apply(pipe, [pag, at_op]):
        got = generate(pipe, name)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    assert at_op.log and all(rows == 4 and set(tags) == {None} for _, rows, tags in at_op.log)  # 2 prompts x CFG
    for order in ("first", "last"):  # another control's hook sees the perturbed rows too, whatever the order
        other = AttendRecorder(layers=layers)
        with attnctl.apply(pipe, [other, pag] if order == "first" else [pag, other]):
            generate(pipe, name)
        assert other.log and all(rows == 6 for _, rows, _ in other.log), order


@pytest.mark.parametrize("separate", [False, True])
def test_skip_layer_does_not_run_the_blocks_it_skips(separate, tiny_cache):
    pipe = tiny_cache("tiny-sd3")
    skip = attnctl.SkipLayer(blocks=(1,), steps=(0.0, 1.0), separate=separate)
    recorder = AttendRecorder(layers=None)
    with attnctl.apply(pipe, [skip, recorder]):
        generate(pipe, "tiny-sd3")
    skipped = [entry for entry in recorder.log if entry[0].startswith("transformer_blocks.1.")]
    kept = [entry for entry in recorder.log if entry[0].startswith("transformer_blocks.0.")]
    assert skipped and all(rows == 4 and set(tags) == {None} for _, rows, tags in skipped)
    assert any(tag is not None for _, _, tags in kept for tag in tags)  # the perturbed rows do run block 0


# -- no host syncs and no per-call index copies in the hot path -----------------------------------------------------
class SyncWatch:
    """Counts host syncs (`item`, `cpu`, `tolist`, `bool`, `nonzero`) and host-made tensors (`torch.tensor`) called
    from attnctl's attention path (`attnctl/processors/`, `attnctl/kernels/`) and controls (`attnctl/controls/`)
    after the first steps of a pipeline call."""

    WATCHED = ("/attnctl/processors/", "/attnctl/kernels/", "/attnctl/controls/")

    def __init__(self, monkeypatch, runtime, from_step: int):
        self.runtime, self.from_step, self.calls = runtime, from_step, []
        for owner, name in ((torch, "tensor"), (torch, "nonzero"), (torch, "equal"), (torch, "allclose"), (torch.Tensor, "nonzero"),
                            (torch.Tensor, "item"), (torch.Tensor, "cpu"), (torch.Tensor, "tolist"), (torch.Tensor, "numpy"),
                            (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"), (torch.Tensor, "__int__")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    #: Functions that work on the CPU by construction: ToMe's destinations are drawn from a private CPU generator
    #: once per layer and step (then moved to the device once).
    CPU_ONLY = ("cell_destinations",)

    def _wrap(self, original, name):
        def wrapper(*args, **kwargs):
            code = sys._getframe(1).f_code
            caller = code.co_filename.replace("\\", "/")
            frame = self.runtime.frame
            if (any(part in caller for part in self.WATCHED) and code.co_name not in self.CPU_ONLY and frame is not None
                    and frame.step.index >= self.from_step):
                self.calls.append((name, caller.rsplit("/attnctl/", 1)[1], sys._getframe(1).f_lineno))
            return original(*args, **kwargs)

        return wrapper


#: Prompt rows for the controls that link the images of a call: a base and two one-word edits (PromptToPrompt's
#: replace), row 0 the reference / source, rows 0 and 2 AttentionInterpolation's endpoints.
ROWS = ["a photo of a red cat and a blue dog", "a photo of a red cat and a green dog", "a photo of a red fox and a blue dog"]


def _reference_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


@pytest.mark.parametrize("name, make, prompt", [
    ("tiny-sd3", lambda: [attnctl.PAG(), regions(isolate=True), attnctl.AttentionMaps(["cat"]), attnctl.Reweight({"cat": 2.0}),
                          attnctl.SEG(layers="transformer_blocks.0"), attnctl.SkipLayer(blocks=(1,), steps=(0.0, 1.0))], "a photo of a cat"),
    ("tiny-flux", lambda: [attnctl.PAG(), regions(isolate=True), attnctl.Reweight({"cat": 2.0})], "a photo of a cat"),
    ("tiny-sd", lambda: [attnctl.PAG(), attnctl.SAG(), regions(), attnctl.AttentionMaps(["cat"]), attnctl.ToMe()], "a photo of a cat"),
    ("tiny-sd", lambda: [attnctl.ToMe(layers="mid & self"), attnctl.PAG(), regions(base_ratio=0.0)], "a photo of a cat"),
    ("tiny-sd", lambda: [attnctl.TGate(gate_step=1, sp_interval=1, fi_interval=1), attnctl.PAG()], "a photo of a cat"),
    ("tiny-sd", lambda: [attnctl.PromptToPrompt(mode="refine", local_blend=["cat", "dog"], reweight={"dog": 2.0})], ROWS),
    ("tiny-flux", lambda: [attnctl.PromptToPrompt(local_blend=["dog"])], ROWS),
    ("tiny-sd", lambda: [attnctl.ConsistentSubjects(subject=["cat", "dog"], isolate=True)], ROWS),
    ("tiny-flux", lambda: [attnctl.ConsistentSubjects(sample_rate=0.5)], ROWS),
    ("tiny-sd", lambda: [attnctl.ReferenceAttention(_reference_image(), adain=True, style_fidelity=0.5)], ROWS),
    ("tiny-flux", lambda: [attnctl.ReferenceAttention(_reference_image(), region=(0.0, 0.0, 0.5, 1.0))], ROWS),
    ("tiny-sd", lambda: [attnctl.AttentionInterpolation(self_attention=True)], ROWS),
    ("tiny-flux", lambda: [attnctl.AttentionInterpolation(mode="inner")], ROWS),
], ids=["sd3", "flux", "sd", "sd-tome-pag", "tgate", "sd-p2p", "flux-p2p", "sd-consistent", "flux-consistent", "sd-reference",
        "flux-reference", "sd-interpolation", "flux-interpolation"])
def test_no_host_syncs_in_the_hot_path(name, make, prompt, monkeypatch, tiny_cache):
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, make()) as handle:
        watch = SyncWatch(monkeypatch, handle.runtime, from_step=2)
        generate(pipe, name, prompt=prompt, steps=4)
    assert watch.calls == []


def test_no_host_syncs_with_a_fastattn_plan(monkeypatch):
    pipe = make_tiny_pipeline("tiny-pixart")
    plan = attnctl.calibrate(attnctl.FastAttn(threshold=0.5), pipe, ["a photo of a cat"], num_inference_steps=4, guidance_scale=5.0,
                                                   **attnctl.testing.CALL_DEFAULTS["tiny-pixart"])
    assert any(method != "full" for _, methods in plan.methods for method in methods)
    with attnctl.apply(pipe, [attnctl.FastAttn(plan=plan), attnctl.PAG()]) as handle:
        watch = SyncWatch(monkeypatch, handle.runtime, from_step=2)
        generate(pipe, "tiny-pixart", prompt="a photo of a cat", steps=4)
    assert watch.calls == []


# -- output keys ------------------------------------------------------------------------------------------------------
PUBLISHERS = [
    (attnctl.AttentionMaps, {"words": ["cat"]}, "attention_maps"),
    (attnctl.TGate, {}, "tgate"),
    (attnctl.FastAttn, {}, "fastattn"),
    (attnctl.ToMe, {}, "tome"),
    (attnctl.AgentAttention, {}, "agent_attention"),
]


@pytest.mark.parametrize("cls, fields, key", PUBLISHERS, ids=[p[2] for p in PUBLISHERS])
def test_every_publishing_control_has_a_key(cls, fields, key):
    control = cls(**fields)
    assert control.key == key and control.output_key == key
    other = cls(**fields, key="mine")
    assert other.output_key == "mine" and Control.from_dict(other.to_dict()) == other
    for bad in ("", "  ", 3, None):
        with pytest.raises(ConfigError, match="key"):
            cls(**fields, key=bad)


def test_one_output_key_per_control(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    twice = [attnctl.ToMe(layers="down_blocks.0 & self"), attnctl.ToMe(layers="up_blocks.1 & self")]
    with pytest.raises(ConfigError, match="tome"):  # refused at apply once it checks keys, else at the call
        with attnctl.apply(pipe, twice):
            generate(pipe, "tiny-sd")
    keyed = [twice[0], attnctl.ToMe(layers="up_blocks.1 & self", key="tome_up")]
    with attnctl.apply(pipe, keyed) as handle:
        generate(pipe, "tiny-sd")
        down, up = handle.outputs["tome"], handle.outputs["tome_up"]
    assert {r.layer.split(".")[0] for r in down.records} == {"down_blocks"}
    assert {r.layer.split(".")[0] for r in up.records} == {"up_blocks"}
    layers = [down.records[0].layer]
    # the same report API as the cache controls': methods with an optional list of layers
    assert 0 < down.flops_ratio() < 1 and down.flops_ratio(layers) == pytest.approx(down.flops(layers) / down.full_flops(layers))
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=1, layers="down & cross"), attnctl.TGate(gate_step=1, layers="up & cross", key="tgate_up")]) as handle:
        generate(pipe, "tiny-sd", steps=3)
        assert handle.outputs["tgate"].flops_ratio() < 1 and handle.outputs["tgate_up"].flops_ratio() < 1
