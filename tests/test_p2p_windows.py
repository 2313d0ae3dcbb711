"""PromptToPrompt's step windows in the forms of the authors' code (Hertz et al. 2022, google/prompt-to-prompt):
`cross_steps` a float, a (start, end) pair or a {word: window, "default_": window} mapping, `self_steps` a float or a
pair (docs/methods.md "Prompt-to-Prompt editing").

The references here are transcribed from the authors' `ptp_utils.update_alpha_time_word` /
`get_time_words_attention_alpha` (cross-attention time-word alphas over n + 1 entries), `AttentionControlEdit`'s
`num_self_replace` and its blend `A_new alpha + (1 - alpha) A_edit`, not from the control's code."""

from __future__ import annotations

import json

import pytest
import torch

import attnctl
from attnctl.controls.cross_image.p2p import cross_step_range, self_step_range
from attnctl.controls.cross_image.p2p_align import refinement_mapper
from attnctl.denoiser_call import DenoiserCall
from attnctl.steps import StepInfo
from attnctl.testing import CALL_DEFAULTS

BASE, EDIT = "a red cat on the street", "a blue cat on the street"


# -- the authors' window functions, transcribed ---------------------------------------------------------------------
def authors_alpha(num_steps: int, cross_replace_steps, word_columns: dict, edited: int, tokens: int = 77) -> torch.Tensor:
    """(num_steps + 1, edited prompts, tokens) P2P's `get_time_words_attention_alpha`: `word_columns[word][i]` are the
    token positions of `word` in edited prompt i (P2P's `get_word_inds`), empty where the prompt lacks it."""
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps = {**cross_replace_steps, "default_": (0.0, 1.0)}
    alpha = torch.zeros(num_steps + 1, edited, tokens)

    def update(bounds, prompt, inds=None):  # update_alpha_time_word
        if type(bounds) is float:
            bounds = 0, bounds
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        inds = torch.arange(tokens) if inds is None else torch.tensor(inds)
        alpha[:start, prompt, inds] = 0
        alpha[start:end, prompt, inds] = 1
        alpha[end:, prompt, inds] = 0

    for prompt in range(edited):
        update(cross_replace_steps["default_"], prompt)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            for prompt, inds in enumerate(word_columns[key]):
                if len(inds) > 0:
                    update(item, prompt, inds)
    return alpha


def authors_self_steps(num_steps: int, self_replace_steps) -> set[int]:
    """`AttentionControlEdit.num_self_replace` and its test `num_self_replace[0] <= cur_step < num_self_replace[1]`."""
    if type(self_replace_steps) is float:
        self_replace_steps = 0, self_replace_steps
    first, last = int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])
    return {step for step in range(num_steps) if first <= step < last}


def authors_cross_steps(num_steps: int, window) -> set[int]:
    alpha = authors_alpha(num_steps, window, {}, 1, tokens=1)
    return {step for step in range(num_steps) if alpha[step, 0, 0] == 1}


COUNTS = (1, 2, 3, 4, 7, 10, 20, 25, 49, 50, 51, 100)
FLOATS = (0.0, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
PAIRS = ((0.0, 1.0), (0.1, 0.3), (0.2, 0.8), (0.3, 0.95), (0.5, 0.5), (0.0, 0.0), (0.7, 1.0), (1 / 3, 2 / 3))


def test_window_step_sets_are_the_authors():
    for n in COUNTS:
        for f in FLOATS:
            # the float form: the authors' counts, which are main's `i < int(f (n+1))` / `i < int(f n)`
            assert set(cross_step_range(f, n)) & set(range(n)) == authors_cross_steps(n, f) == {i for i in range(n) if i < int(f * (n + 1))}
            assert set(self_step_range(f, n)) == authors_self_steps(n, f) == {i for i in range(n) if i < int(f * n)}
        for pair in PAIRS:
            assert set(cross_step_range(pair, n)) & set(range(n)) == authors_cross_steps(n, pair)
            assert set(self_step_range(pair, n)) == authors_self_steps(n, pair)


def _generate(pipe, prompts, *, seed=0, steps=3, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=generator, **CALL_DEFAULTS["tiny-sd"], **kwargs).images


def _bound(pipe, control, prompts):
    with attnctl.apply(pipe, [control]) as handle:
        _generate(pipe, prompts, steps=2)
        return handle.runtime.last_call.bound[0]


def _position(tokenizer, prompt, word):
    return tokenizer(prompt)["input_ids"].index(tokenizer.convert_tokens_to_ids(word + "</w>"))


@pytest.mark.parametrize("cross, self_", [(0.8, 0.4), ((0.2, 0.7), (0.1, 0.5)), (0.35, (0.3, 0.9))])
def test_the_bound_edits_exactly_in_the_authors_steps(cross, self_, tiny_cache):
    """The hooks the bound control installs per layer and step (not only the window functions) on several n."""
    pipe = tiny_cache("tiny-sd")
    bound = _bound(pipe, attnctl.PromptToPrompt(cross_steps=cross, self_steps=self_), [BASE, EDIT])
    text = next(layer for layer in bound.layers if layer.kind == "cross")
    selfs = next(layer for layer in bound.layers if layer.index in bound.self_layers and layer.kind == "self")
    for n in (3, 7, 10, 50):
        for layer, expected in ((text, authors_cross_steps(n, cross)), (selfs, authors_self_steps(n, self_))):
            fired = set()
            for i in range(n):
                edit = bound.edit(layer, DenoiserCall(StepInfo(i, n), None, None))
                hook = edit.hooks[0] if edit is not None else None
                if hook is not None and (hook.cross if layer is text else hook.self_):
                    fired.add(i)
            assert fired == expected, (layer.kind, n)


def test_word_windows_are_the_authors_time_word_alphas(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    prompts = [BASE, EDIT, "a blue dog on the street"]
    windows = {"blue": (0.2, 0.7), "street": 0.3, "default_": (0.1, 0.9), "dog": (0.5, 1.0)}
    bound = _bound(pipe, attnctl.PromptToPrompt(cross_steps=windows), prompts)
    tokenizer = pipe.tokenizer
    columns = {word: [[_position(tokenizer, p, word)] if word in p.split() else [] for p in prompts[1:]]
               for word in ("blue", "street", "dog")}
    for n in (2, 5, 10, 31):
        reference = authors_alpha(n, windows, columns, 2, tokens=bound.text_len)
        for i in range(n):
            alpha = bound._alpha(i, n)
            assert torch.equal(alpha[1:].float(), reference[i]), (n, i)  # rows: base, edit 1, edit 2
            assert not alpha[0].any()


def test_float_pair_and_default_only_forms_are_bitwise_the_float_form(tiny_cache):
    """cross_steps f == (0, f) == {"default_": f} == {"default_": f, word: f}; self_steps f == (0, f): the same
    images, bit for bit (the float form itself is main's: `test_the_bound_edits_exactly_in_the_authors_steps` pins its
    steps, and it was compared bitwise with main's code on tiny SD / SD3 / Flux for this change)."""
    pipe = tiny_cache("tiny-sd")
    outputs = []
    for cross, self_ in [(0.6, 0.4), ((0.0, 0.6), (0.0, 0.4)), ({"default_": 0.6}, 0.4), ({"default_": 0.6, "cat": (0.0, 0.6)}, 0.4)]:
        with attnctl.apply(pipe, [attnctl.PromptToPrompt("replace", cross_steps=cross, self_steps=self_, reweight={"cat": 2.0})]):
            outputs.append(_generate(pipe, [BASE, EDIT], steps=4))
    stock = _generate(pipe, [BASE, EDIT], steps=4)
    assert not torch.equal(outputs[0][1], stock[1])
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])


# -- the per-word windows end to end, against P2P on materialised probabilities -------------------------------------
class _EagerWindowsP2P:
    """P2P's `AttentionControlEdit.forward` on diffusers' eager attention, with the authors' time-word alphas:
    cross-attention of edited row e (base b) is `replace_cross_attention(P_b, P_e) * alpha + (1 - alpha) P_e`, where
    replace is `P_b` at the token swapped one for one (the word-swap mapper is the identity here), refine
    `P_b[:, mapper] a + P_e (1 - a)`, and the equalizer multiplies the replaced maps (AttentionReweight wraps the
    refinement); self-attention is `P_b` in its window. The cond half is edited (the code edits `attn[h // 2:]`), the
    uncond half too with `halves="both"`, its text being the shared negative prompt (identity, the default window)."""

    def __init__(self, is_cross: bool, clock: dict):
        self.is_cross, self.clock = is_cross, clock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        probs = attn.get_attention_scores(q, k, attention_mask)
        probs = probs.view(batch, attn.heads, *probs.shape[1:]).clone()
        clock, step = self.clock, self.clock["step"]
        n, half = clock["n"], batch // 2
        for start in (0, half) if clock["halves"] == "both" else (half,):
            cond = start == half
            for r in range(n):
                b, e = start + r, start + n + r
                base, own = probs[b], probs[e]
                if self.is_cross:
                    alpha = clock["alpha"][step, 0] if cond else clock["default_alpha"][step, 0]
                    if cond and clock["refine"] is not None:
                        mapper, a = clock["refine"]
                        replaced = base[..., mapper] * a + own * (1 - a)
                    else:
                        replaced = base
                    if cond:
                        replaced = replaced * clock["equalizer"]
                    probs[e] = replaced * alpha + (1 - alpha) * own
                elif step in clock["self"]:
                    probs[e] = base
        out = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1), v))
        return attn.to_out[1](attn.to_out[0](out))


CASES = {  # windows whose ends differ between n + 1 and n alpha entries at 10 steps
    "replace-words": dict(prompts=("a red circle", "a blue circle"), mode="replace", branch="cond",
                          cross={"default_": (0.0, 0.28), "blue": (0.19, 0.64)}, self_=(0.1, 0.5), reweight=None),
    "refine-reweight": dict(prompts=("a red circle", "a red circle on the left"), mode="refine", branch="cond",
                            cross={"default_": (0.0, 0.64), "left": (0.19, 1.0), "circle": 0.46}, self_=0.4,
                            reweight={"left": 2.0}),
    # P2P's notebook: the same prompt, the equalizer (-1) on a word ("pink bear riding a bicycle"; the toy has colours)
    "negative-reweight": dict(prompts=("a red circle", "a red circle"), mode="replace", branch="cond",
                              cross={"default_": 0.8}, self_=0.4, reweight={"red": -1.0}),
    "no-default-both-branches": dict(prompts=("a red circle", "a blue circle"), mode="replace", branch="both",
                                     cross={"blue": (0.46, 0.82)}, self_=0.2, reweight=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_toy_word_windows_match_p2p_on_eager_attention(case):
    """End to end on the toy model (every attention layer of it at <= 16x16 tokens, so P2P edits all of them)."""
    from attnctl.toy import CALL_DEFAULTS as TOY_DEFAULTS
    from attnctl.toy import load_toy_shapes

    spec = CASES[case]
    seeds = [1000, 1001]
    pipe = load_toy_shapes()
    steps = TOY_DEFAULTS["num_inference_steps"]
    base_prompt, edit_prompt = spec["prompts"]

    def call(**extra):
        generators = [torch.Generator().manual_seed(s) for s in seeds + seeds]  # the same noise for both prompts
        kwargs = dict(TOY_DEFAULTS, num_images_per_prompt=len(seeds), generator=generators, output_type="np")
        return pipe([base_prompt, edit_prompt], **kwargs, **extra).images

    control = attnctl.PromptToPrompt(spec["mode"], cross_steps=spec["cross"], self_steps=spec["self_"],
                                     reweight=spec["reweight"], branch=spec["branch"])
    with attnctl.apply(pipe, [control]):
        controlled = call()

    tokenizer = pipe.tokenizer
    ids = [tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length)["input_ids"] for p in spec["prompts"]]
    columns = {word: [[ids[1].index(tokenizer.convert_tokens_to_ids(word + "</w>"))]] for word in spec["cross"] if word != "default_"}
    equalizer = torch.ones(len(ids[1]))
    for word, factor in (spec["reweight"] or {}).items():
        equalizer[ids[1].index(tokenizer.convert_tokens_to_ids(word + "</w>"))] = factor
    refine = None
    if spec["mode"] == "refine":
        base_len = ids[0].index(tokenizer.eos_token_id) + 1
        edit_len = ids[1].index(tokenizer.eos_token_id) + 1
        mapping, a = refinement_mapper(ids[0][:base_len], ids[1][:edit_len], len(ids[1]))
        refine = (torch.tensor([max(m, 0) for m in mapping]), torch.tensor(a))
    default = spec["cross"].get("default_", (0.0, 1.0))
    clock = {"step": 0, "n": len(seeds), "halves": spec["branch"], "refine": refine, "equalizer": equalizer,
             "alpha": authors_alpha(steps, dict(spec["cross"]), columns, 1),
             "default_alpha": authors_alpha(steps, default, {}, 1),
             "self": authors_self_steps(steps, spec["self_"])}
    pipe.unet.set_attn_processor({name: _EagerWindowsP2P(name.endswith("attn2.processor"), clock) for name in pipe.unet.attn_processors})

    def tick(pipeline, i, t, kwargs):
        clock["step"] = i + 1
        return {}

    reference = call(callback_on_step_end=tick)
    assert abs(reference[:2] - reference[2:]).max() > 0.05  # the edit changes the image
    assert abs(controlled - reference).max() < 1e-3


def test_word_windows_change_the_edit_only_through_their_words(tiny_cache):
    """A word's window differing from the default changes the edited row; a word window equal to the default does not."""
    pipe = tiny_cache("tiny-sd")
    images = {}
    for name, cross in {"default": 0.8, "same": {"default_": 0.8, "blue": 0.8}, "blue-late": {"default_": 0.8, "blue": (0.5, 1.0)}}.items():
        with attnctl.apply(pipe, [attnctl.PromptToPrompt(cross_steps=cross, self_steps=0.0)]):
            images[name] = _generate(pipe, [BASE, EDIT], steps=4)
    assert torch.equal(images["same"], images["default"])
    assert torch.equal(images["blue-late"][0], images["default"][0])  # the base row is never changed
    assert not torch.equal(images["blue-late"][1], images["default"][1])


# -- validation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("cross_steps", 1.5, r"cross_steps must be <= 1"),
    ("cross_steps", -0.1, r"cross_steps must be >= 0"),
    ("cross_steps", "0.8", r"cross_steps must be a fraction .* or a \(start, end\) pair"),
    ("cross_steps", True, r"cross_steps must be a fraction"),
    ("cross_steps", (0.1, 0.5, 0.9), r"cross_steps must be a fraction .* got \(0.1, 0.5, 0.9\)"),
    ("cross_steps", (0.7, 0.2), r"cross_steps = \(0.7, 0.2\) starts after it ends"),
    ("cross_steps", (0.0, 1.2), r"cross_steps\[1\] \(the window's end\) must be <= 1"),
    ("cross_steps", {}, r"cross_steps is an empty mapping"),
    ("cross_steps", {"cat": (0.5, 0.1)}, r"cross_steps\['cat'\] = \(0.5, 0.1\) starts after it ends"),
    ("cross_steps", {"cat": "all"}, r"cross_steps\['cat'\] must be a fraction"),
    ("cross_steps", {3: 0.5}, r"keys are words or 'default_', got 3"),
    ("cross_steps", {" ": 0.5}, r"cross_steps: empty word"),
    ("cross_steps", {"cat": 0.5, " cat ": 0.2}, r"names the word 'cat' twice"),
    ("self_steps", (0.4, 0.2), r"self_steps = \(0.4, 0.2\) starts after it ends"),
    ("self_steps", {"default_": 0.4}, r"self_steps must be a fraction"),
    ("self_steps", [0.1], r"self_steps must be a fraction"),
])
def test_windows_are_validated(field, value, match):
    with pytest.raises(attnctl.ConfigError, match=match):
        attnctl.PromptToPrompt(**{field: value})


def test_reweight_needs_a_cross_window_and_words_must_be_in_the_edits(tiny_cache):
    for empty in (0.0, (0.5, 0.5), {"default_": 0.0, "cat": (0.3, 0.3)}):
        with pytest.raises(attnctl.ConfigError, match="leaves no step"):
            attnctl.PromptToPrompt(cross_steps=empty, reweight={"cat": 2.0})
    assert attnctl.PromptToPrompt(cross_steps=(0.5, 0.5), self_steps=(0.2, 0.2)).idle
    assert not attnctl.PromptToPrompt(cross_steps={"cat": 0.5}, self_steps=0.0).idle
    assert not attnctl.PromptToPrompt(cross_steps={"default_": 0.0, "cat": 0.5}, self_steps=0.0).idle  # (0, 1) unnamed
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [attnctl.PromptToPrompt(cross_steps={"red": 0.5})]):  # in the base prompt only
        with pytest.raises(attnctl.TokenError, match=r"cross_steps words \['red'\] are in none of the edited prompts"):
            _generate(pipe, [BASE, EDIT], steps=2)
    never = attnctl.PromptToPrompt(cross_steps={"default_": 0.0, "street": 0.5}, reweight={"cat": 2.0})
    with attnctl.apply(pipe, [never]):
        with pytest.raises(attnctl.ConfigError, match=r"tokens of \['cat'\] are inside no window"):
            _generate(pipe, [BASE, EDIT], steps=2)


# -- serialisation and render jobs ------------------------------------------------------------------------------------
def test_windows_round_trip_hash_and_drive_a_render_job(tiny_cache, tmp_path):
    from attnctl.render.jobs import load_job_file
    from attnctl.render.runner import RenderOptions, render

    control = attnctl.PromptToPrompt(cross_steps={"blue": [0.2, 0.7], "default_": 0.8}, self_steps=[0.1, 0.4], edits=[EDIT])
    assert control.cross_steps == {"default_": 0.8, "blue": (0.2, 0.7)} and list(control.cross_steps) == ["default_", "blue"]
    assert control.self_steps == (0.1, 0.4)
    data = json.loads(json.dumps(control.to_dict()))
    assert data["cross_steps"] == {"default_": 0.8, "blue": [0.2, 0.7]} and data["self_steps"] == [0.1, 0.4]
    again = attnctl.Control.from_dict(data)
    assert again == control and hash(again) == hash(control)
    assert hash(attnctl.PromptToPrompt(cross_steps=(0.0, 0.5))) == hash(attnctl.PromptToPrompt(cross_steps=[0.0, 0.5]))
    job = {"id": "words", "prompt": BASE, "seeds": [1], "steps": 2, "controls": [data]}
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(json.dumps(job) + "\n")
    toml = tmp_path / "jobs.toml"
    toml.write_text(f'[[jobs]]\nid = "words"\nprompt = "{BASE}"\nseeds = [1]\nsteps = 2\n[[jobs.controls]]\n'
                    f'type = "prompt-to-prompt"\nedits = ["{EDIT}"]\ncross_steps = {{ default_ = 0.8, blue = [0.2, 0.7] }}\n'
                    'self_steps = [0.1, 0.4]\n')
    for path in (jsonl, toml):
        loaded = load_job_file(path)
        assert loaded.ok and loaded.jobs[0].controls == (control,), loaded.problems
    model = attnctl.Model(tiny_cache("tiny-sd"), "tiny-sd")
    try:
        assert render(str(jsonl), RenderOptions(out=str(tmp_path / "out"), progress="none"), model=model).exit_code == 0
    finally:
        model.release()
    assert len(list((tmp_path / "out" / "words" / "1.frames").iterdir())) == 2


PROTOCOLS = [  # (tiny model, guidance, extra call arguments, branch): batched CFG, no CFG, joint attention, true CFG
    ("tiny-sd", 5.0, {}, "both"),
    ("tiny-sd3", 5.0, {}, "cond"),
    ("tiny-pixart", 5.0, {}, "both"),
    ("tiny-flux", 1.0, {"negative_prompt": "a dog", "true_cfg_scale": 3.0}, "both"),
]


@pytest.mark.parametrize("name, guidance, extra, branch", PROTOCOLS, ids=["sd-both", "sd3", "pixart-both", "flux-true-cfg-both"])
def test_word_windows_on_every_call_protocol(name, guidance, extra, branch, tiny_cache):
    """Per-word windows on joint attention and separate CFG calls: the base row untouched, a same-prompt edit the base
    image (columns outside their window keep the edited row's own maps, which are then the base's)."""
    pipe = tiny_cache(name)

    def run(prompts):
        options = dict(CALL_DEFAULTS[name], **extra)
        generator = torch.Generator().manual_seed(0)
        out = pipe(prompt=list(prompts), num_inference_steps=4, guidance_scale=guidance, output_type="latent",
                   generator=generator, **options)
        return out.images

    stock = run([BASE, EDIT])
    control = attnctl.PromptToPrompt(cross_steps={"default_": (0.0, 0.5), "cat": (0.2, 1.0)}, self_steps=(0.25, 0.75), branch=branch)
    with attnctl.apply(pipe, [control]):
        edited = run([BASE, EDIT])
        same = run([BASE, BASE])
    assert torch.equal(edited[0], stock[0]) and not torch.equal(edited[1], stock[1])
    # the columns outside their window are a second fused attention added to the first: float32 rounding, relative to
    # the latents' scale (tiny PixArt's reach ~800; in float64 the two rows agree to 1e-12)
    torch.testing.assert_close(same[1], same[0], atol=1e-5 + 1e-6 * float(same.abs().max()), rtol=1e-5)
