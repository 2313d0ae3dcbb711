"""What a new user met in a first hour with the README, the examples and the public API (notes/firsthour.md):
each test holds one fix. Tiny pipelines only; a few seconds in all."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import attnctl
from attnctl import PAG, AttnctlError, ConfigError, ReferenceAttention
from attnctl.testing import make_tiny_pipeline


@pytest.fixture(scope="module")
def sd():
    return make_tiny_pipeline("tiny-sd")


def _processors(pipe) -> dict[str, str]:
    return {name: type(p).__name__ for name, p in pipe.unet.attn_processors.items()}


# -- read_maps ------------------------------------------------------------------------------------------------------
def test_read_maps_leaves_a_half_precision_pipeline_in_its_dtype(capfd):
    """diffusers' `from_pipe` casts every shared component to float32 (its default dtype), and the components are the
    user's own: read_maps turned a bf16 pipeline into a float32 one (and printed diffusers' "modules that should be
    kept in float32: []" notice twice). The img2img reader shares the modules and casts nothing."""
    from attnctl.render.readout import img2img_of

    pipe = make_tiny_pipeline("tiny-sd")
    pipe.unet.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)  # the VAE stays float32: a mixed pipeline, as an upcast VAE is
    capfd.readouterr()
    reader = img2img_of(pipe)
    assert reader.unet is pipe.unet and reader.vae is pipe.vae
    # the scheduler is its own copy: the img2img constructor's config fix-ups must not reach the user's
    assert reader.scheduler is not pipe.scheduler and dict(reader.scheduler.config) == dict(pipe.scheduler.config)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    assert type(reader).__name__ == "StableDiffusionImg2ImgPipeline"
    assert "kept in float32" not in capfd.readouterr().err


@pytest.mark.parametrize("images, seed, match", [
    ([], 0, "read_maps: images is empty"),
    ("image", 1.5, "read_maps: seed must be an integer, got 1.5"),
    ("image", "x", "read_maps: seed must be an integer, got 'x'"),
    ("image", -1, "read_maps: seed must be >= 0, got -1"),
], ids=["no-image", "float-seed", "str-seed", "negative-seed"])
def test_read_maps_refuses_no_image_and_a_bad_seed_before_building_the_reader(sd, images, seed, match):
    """An empty list failed with IndexError; seed=1.5 or "x" with torch's RuntimeError from manual_seed after the
    img2img pipeline was built; seed=-1 was accepted (torch wraps it)."""
    images = Image.new("RGB", (32, 32)) if images == "image" else images
    before = _processors(sd)
    with pytest.raises(ConfigError, match=match):
        attnctl.read_maps(sd, images, "a red cat", "red", seed=seed, num_inference_steps=2)
    assert _processors(sd) == before


def test_read_maps_takes_one_word_as_a_string_and_refuses_a_non_image(sd):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    result = attnctl.read_maps(sd, image, "a red cat", "red", num_inference_steps=2, magnets=False)
    assert result.words == ("red",)  # not ('r', 'e', 'd')
    for bad in (None, "missing.png", 3):
        with pytest.raises(ConfigError, match="read_maps: images"):
            attnctl.read_maps(sd, bad, "a red cat", ["red"], num_inference_steps=2)
    with pytest.raises(ConfigError, match="read_maps: prompt"):
        attnctl.read_maps(sd, image, 3, ["red"], num_inference_steps=2)
    again = attnctl.read_maps(sd, image, "a red cat", "red", num_inference_steps=2, magnets=False, height=32, width=32)
    assert torch.equal(again.maps, result.maps)  # height / width (documented call options) are the image's here
    with pytest.raises(ConfigError, match="num_inference_step'"):  # a typo, silently ignored by diffusers before
        attnctl.read_maps(sd, image, "a red cat", ["red"], num_inference_step=2)
    with pytest.raises(ConfigError, match="'output_type'.*from read_maps itself"):
        attnctl.read_maps(sd, image, "a red cat", ["red"], strength=0.5, **{"output_type": "pil"})
    with pytest.raises(ConfigError, match=r"runs no denoising step \(img2img runs int\(steps \* strength\) = 0\)"):
        attnctl.read_maps(sd, image, "a red cat", ["red"], strength=0.3, num_inference_steps=2)  # was "call the pipeline first"
    assert set(_processors(sd).values()) == {"AttnProcessor2_0"}


def test_read_maps_of_arrays_and_tensors_saves_and_refuses_several_images_per_prompt(sd, tmp_path):
    """numpy / torch images (read_maps takes them as the pipeline does) are pictures in the result, so `save` draws the
    heatmaps (it failed: 'ndarray' object has no attribute 'convert'); a word "grid" keeps its own heatmap file beside
    the grid picture; num_images_per_prompt (maps rows without an image) is read_maps' own argument."""
    import numpy as np

    picture = Image.new("RGB", (48, 32), (200, 30, 30))
    array = np.asarray(picture).astype("float32") / 255
    for image in (array, array[None], torch.from_numpy(array).permute(2, 0, 1)[None]):
        result = attnctl.read_maps(sd, image, "a red grid", ["red", "grid"], num_inference_steps=2, magnets=False)
        assert len(result.images) == 1 and result.images[0].size == (48, 32)
        written = result.save(str(tmp_path / type(image).__name__))
        assert len(written) == len(set(written)) == 3, written  # two heatmaps and the grid picture
    with pytest.raises(ConfigError, match="'num_images_per_prompt'.*from read_maps itself"):
        attnctl.read_maps(sd, picture, "a red cat", ["red"], num_inference_steps=2, num_images_per_prompt=2)


# -- ReferenceAttention's image: a path checked when made, and relative to the job file ------------------------------
def test_reference_attention_missing_image_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ConfigError, match="nope.png"):
        ReferenceAttention(str(missing))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ConfigError, match="not an image"):
        ReferenceAttention(str(text))


def test_job_file_reference_image_is_relative_to_the_job_file(tmp_path, monkeypatch):
    from attnctl.render.jobs import load_job_file

    folder = tmp_path / "jobs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(folder / "ref.png")
    (folder / "notes.txt").write_text("not an image")
    jobs = folder / "jobs.jsonl"
    lines = [
        {"id": "ok", "prompt": "a cat", "seeds": [0], "controls": [{"type": "reference-attention", "image": "ref.png"}]},
        {"id": "missing", "prompt": "a cat", "seeds": [0], "controls": [{"type": "reference-attention", "image": "nope.png"}]},
        {"id": "text", "prompt": "a cat", "seeds": [0], "controls": [{"type": "reference-attention", "image": "notes.txt"}]},
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    monkeypatch.chdir(tmp_path)  # another folder than the job file's
    loaded = load_job_file(str(jobs))
    ok = next(job for job in loaded.jobs if job.id == "ok")
    assert ok.controls[0].image == str(folder / "ref.png")
    problems = " | ".join(problem.message for problem in loaded.problems)
    assert "nope.png" in problems and "notes.txt" in problems


# -- Model.generate / attnctl.generate -----------------------------------------------------------------------------
def test_generate_takes_one_control_as_apply_does_and_checks_the_prompt(sd):
    model = attnctl.Model(sd, "tiny-sd")
    with model:
        result = model.generate("a red cat", seed=0, steps=1, controls=PAG(scale=1.0))
        assert result.params["controls"][0]["type"] == "pag"
        for bad in (None, 3, ["a", "b"]):
            with pytest.raises(ConfigError, match="prompt"):
                model.generate(bad, steps=1)
    assert set(_processors(sd).values()) == {"AttnProcessor2_0"}


def test_generation_save_names_a_bad_path(sd, tmp_path):
    result = attnctl.generate(sd, "a red cat", seed=0, steps=1)
    with pytest.raises(ConfigError, match="missing"):
        result.save(str(tmp_path / "missing" / "cat.png"))
    with pytest.raises(ConfigError, match=r"\.png"):
        result.save(str(tmp_path / "cat.jpg"))
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left
    assert result.save(tmp_path / "cat.png") > 0
    video = attnctl.Generation(result.image, result.params, frames=[result.image, result.image])
    with pytest.raises(ConfigError, match=r"\.mp4 or \.gif"):
        video.save_video(str(tmp_path / "cat.webm"))
    with pytest.raises(ConfigError, match="missing"):
        video.save_video(str(tmp_path / "missing" / "cat.gif"))
    assert video.save_video(str(tmp_path / "cat.gif")) > 0


# -- interpolate: an argument the pipeline does not take is an error, not silently dropped -----------------------------
def test_interpolate_refuses_an_argument_the_pipeline_does_not_take(sd):
    with pytest.raises(ConfigError, match="num_inference_step'"):
        attnctl.interpolate(sd, "a red cat", "a blue cat", n=3, num_inference_step=2)
    images = attnctl.interpolate(sd, "a red cat", "a blue cat", n=3, num_inference_steps=1, self_attention=False,
                                 controls=PAG(scale=1.0))
    assert len(images) == 3  # one extra control, as apply takes it
    assert set(_processors(sd).values()) == {"AttnProcessor2_0"}


# -- describe(): layer lists are cut between layers, and a layer without kernel features says so -----------------------
def test_describe_cuts_layer_lists_between_names(sd):
    from attnctl.selection import describe_layers

    with attnctl.apply(sd, [PAG(scale=1.0)]) as handle:
        text = handle.describe()
        layers = handle.adapter.layers
    assert "that can do no control" not in text
    short = describe_layers(layers, 120)
    shown = short.split(", ... (")[0].split(", ")
    names = {f"{layer.name} ({layer.kind})" for layer in layers}
    assert shown and all(entry in names for entry in shown), short
    assert short.endswith(f"({len(layers)} layers in all)")


def test_errors_above_are_attnctl_errors():
    assert issubclass(ConfigError, AttnctlError)


# -- handle.outputs and a removed handle ----------------------------------------------------------------------------
def test_outputs_say_why_a_key_is_missing_and_a_removed_handle_cannot_be_entered(sd):
    from attnctl import HandleError

    handle = attnctl.apply(sd, [attnctl.AttentionMaps(["cat"])])
    try:
        with pytest.raises(KeyError, match="no call has finished"):
            handle.outputs["attention_maps"]
        with pytest.raises(HandleError, match="they publish 'attention_maps'"):
            handle.outputs["attention-maps"]
        assert handle.outputs.get("attention_maps") is None and "attention_maps" not in handle.outputs
    finally:
        handle.remove()
    with pytest.raises(HandleError, match="removed"):
        with handle:
            pass


# -- FastAttnPlan files ---------------------------------------------------------------------------------------------
def test_fastattn_plan_load_names_a_missing_file_and_save_never_leaves_half_a_plan(tmp_path, monkeypatch):
    from attnctl import FastAttnPlan

    with pytest.raises(ConfigError, match="nope.json"):
        FastAttnPlan.load(tmp_path / "nope.json")
    plan = FastAttnPlan(model="UNet2DConditionModel", fingerprint="f", steps=2, resolution=(32, 32), window=4, threshold=0.1,
                        methods=(("down.attn1", ("full", "step_share")),))
    path = tmp_path / "plan.json"
    plan.save(path)
    before = path.read_text()
    assert FastAttnPlan.load(path) == plan

    def fail(self):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(FastAttnPlan, "to_json", fail)
    with pytest.raises(RuntimeError):
        plan.save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


# -- examples/generate.py: a bad --control is a usage error, not a traceback ----------------------------------------
@pytest.mark.parametrize("control", ["notjson", '{"type": "pagg"}'])
def test_generate_example_reports_a_bad_control_as_usage(control, tmp_path):
    from .test_examples_smoke import run

    result = run("examples/generate.py", ["--control", control], tmp_path, out=True)
    assert result.returncode == 2 and "--control" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# -- one control given twice ----------------------------------------------------------------------------------------
def test_apply_refuses_the_same_control_twice_and_leaves_the_pipeline_stock(sd):
    import numpy as np

    rw = attnctl.Reweight({"cat": 2.0})
    for controls in ([rw, rw], [PAG(scale=1.0), PAG(scale=1.0)], [attnctl.Reweight({"cat": 2.0}), rw]):
        with pytest.raises(ConfigError, match="same control twice"):
            attnctl.apply(sd, controls)
        assert set(_processors(sd).values()) == {"AttnProcessor2_0"}
    attnctl.apply(sd, [PAG(scale=1.0), PAG(scale=2.0, layers="down")]).remove()  # different controls: fine
    mask = np.ones((8, 8), dtype=np.float32)
    regions = [attnctl.Regions([attnctl.Region("a cat", mask=mask)]), attnctl.Regions([attnctl.Region("a cat", mask=mask)])]
    assert attnctl.handle._same_control(*regions)  # mask fields compare without error
    other = attnctl.Regions([attnctl.Region("a cat", mask=np.eye(8, dtype=np.float32) + 0.0)])
    assert not attnctl.handle._same_control(regions[0], other)


# -- AttentionMapResult: a word it did not capture --------------------------------------------------------------------
def test_attention_map_result_missing_word_is_an_attnctl_error_and_a_key_error(sd):
    from attnctl import TokenError

    with attnctl.apply(sd, [attnctl.AttentionMaps(["cat"])]) as handle:
        sd("a red cat", num_inference_steps=1, height=32, width=32, generator=torch.Generator().manual_seed(0))
        result = handle.outputs["attention_maps"]
    for query in (lambda: result.masks("dog"), lambda: result["dog"], lambda: result[0]["dog"]):
        with pytest.raises(TokenError, match="'dog' is not one of the captured words") as caught:
            query()
        assert isinstance(caught.value, KeyError) and not str(caught.value).startswith('"')
    with pytest.raises(ConfigError, match="masks: word"):
        result.masks(None)


# -- files the controls save: never half-written ------------------------------------------------------------------
def test_saved_maps_and_layouts_are_never_half_written(sd, tmp_path, monkeypatch):
    import numpy as np

    from attnctl.controls.maps import heatmap
    from attnctl.controls.regions import layout

    with attnctl.apply(sd, [attnctl.AttentionMaps(["cat"])]) as handle:
        sd("a red cat", num_inference_steps=1, height=32, width=32, generator=torch.Generator().manual_seed(0))
        result = handle.outputs["attention_maps"]

    class Broken:
        def save(self, fp, *args, **kwargs):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError("No space left on device")

    monkeypatch.setattr(heatmap, "grid", lambda tiles: Broken())
    with pytest.raises(OSError, match="No space"):
        result.save(str(tmp_path / "maps"))
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["image0_cat.png"]  # whole, and no temporary
    assert Image.open(tmp_path / "maps" / "image0_cat.png").size == (32, 32)

    regions = attnctl.Regions([attnctl.Region("a cat", box=(0, 0, 0.5, 1))])
    monkeypatch.setattr(layout, "draw_layout", lambda *a, **k: Broken())
    with pytest.raises(OSError, match="No space"):
        layout.save_picture(regions, tmp_path / "layout.png")
    with pytest.raises(OSError, match="No space"):
        monkeypatch.setattr(Image.Image, "save", Broken.save)
        layout.save_mask(torch.from_numpy(np.ones((4, 4))), str(tmp_path / "mask.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]
    with pytest.raises(ConfigError, match="nodir' does not exist"):  # names the folder, not a temporary file
        layout.save_layout(regions, tmp_path / "nodir" / "layout.json")


# -- devices and dtypes a loader is given -------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
def test_loaders_refuse_a_device_torch_cannot_use_before_loading():
    from attnctl.render.generate import resolve_device

    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            attnctl.load_pipeline("tiny-sd", device=device)
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device(device)  # Model.load and `attnctl render --device`
    with pytest.raises(ConfigError, match="'gpu'"):
        attnctl.load_pipeline("tiny-sd", device="gpu")


def test_load_pipeline_takes_a_dtype_name_and_names_a_bad_one():
    pipe = attnctl.load_pipeline("tiny-sd", torch_dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        attnctl.load_pipeline("tiny-sd", torch_dtype="fp16")


# -- examples: a bad argument ends with its attnctl message, not a traceback ------------------------------------------
@pytest.mark.parametrize(("script", "args", "message"), [
    ("examples/regions.py", ["--region", "a cat", "0.8", "0", "0.2", "1"], "needs x0 < x1"),
    ("examples/attention_maps.py", ["--words", "dog"], "'dog' is not in the cond prompt"),
])
def test_examples_report_an_attnctl_error_in_one_line(script, args, message, tmp_path):
    from .test_examples_smoke import run

    result = run(script, args, tmp_path, out=True)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# -- cross-image controls need the rows they link ----------------------------------------------------------------
def _latents(pipe, prompts, seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=2, output_type="latent", generator=generators, height=32, width=32).images


@pytest.mark.parametrize("control", [attnctl.ConsistentSubjects(), ReferenceAttention(Image.new("RGB", (32, 32), (0, 200, 0))),
                                     attnctl.AttentionInterpolation()], ids=["consistent", "reference", "interpolation"])
def test_a_one_image_call_is_refused_not_silently_stock(sd, control):
    """One image per call links nothing: the control raises naming the rows it needs (it used to return the stock
    image, or for ReferenceAttention the reconstruction of the reference), and the pipeline stays stock."""
    stock = _latents(sd, ["a red cat"], [0])
    with attnctl.apply(sd, [control]):
        with pytest.raises(ConfigError, match="1 image"):
            _latents(sd, ["a red cat"], [0])
    assert torch.equal(_latents(sd, ["a red cat"], [0]), stock)


def test_generate_with_reference_attention_keeps_the_generated_row(sd):
    """Model.generate / attnctl render: row 0 carries the reference with the same prompt, row 1 is the image; a PIL
    reference is described in the parameters; the controls that one image per call cannot feed raise before
    anything is installed."""
    reference = Image.new("RGB", (32, 32), (0, 200, 0))
    control = ReferenceAttention(reference, strength=2.0)
    with attnctl.apply(sd, [control]):
        generators = [torch.Generator().manual_seed(0) for _ in range(2)]
        expected = sd(["a red cat"] * 2, num_inference_steps=2, generator=generators, height=32, width=32).images[1]
    model = attnctl.Model(sd, "tiny-sd")
    with model:
        result = model.generate("a red cat", seed=0, steps=2, width=32, height=32, controls=control)
        assert result.image.tobytes() == expected.tobytes()
        assert result.params["controls"][0]["image"] == "<PIL image 32x32, not saved>"
        for bad, words in ((attnctl.ConsistentSubjects(), "list of prompts"), (attnctl.AttentionInterpolation(), "`to`"),
                           (ReferenceAttention(reference, reference_row=1), "row 0")):
            model.release()
            with pytest.raises(ConfigError, match=words):
                model.generate("a red cat", seed=0, steps=2, controls=bad)
            assert set(_processors(sd).values()) == {"AttnProcessor2_0"}


@pytest.mark.parametrize("control", [attnctl.ConsistentSubjects(strength=0.0),
                                     ReferenceAttention(Image.new("RGB", (32, 32), (0, 200, 0)), strength=0.0)],
                         ids=["consistent", "reference"])
def test_a_one_image_call_with_the_control_switched_off_stays_stock(sd, control):
    stock = _latents(sd, ["a red cat"], [0])
    with attnctl.apply(sd, [control]):
        assert torch.equal(_latents(sd, ["a red cat"], [0]), stock)


@pytest.mark.parametrize("control", [attnctl.AttentionInterpolation(to="a blue dog", n=3),
                                     attnctl.PromptToPrompt(edits=["a red dog"]),
                                     ReferenceAttention(Image.new("RGB", (32, 32), (0, 200, 0)))],
                         ids=["interpolation", "p2p", "reference"])
def test_a_multi_row_generation_takes_a_negative_prompt(sd, control):
    """The calls of several rows (a sequence, edits, a reference row) give the negative prompt to every row
    (diffusers refuses one string beside a list of prompts); `resolve` (attnctl render --check) as well."""
    model = attnctl.Model(sd, "tiny-sd")
    with model:
        model.resolve("a red cat", controls=control, negative_prompt="blurry", steps=2, width=32, height=32)
        result = model.generate("a red cat", seed=0, steps=2, width=32, height=32, negative_prompt="blurry", controls=control)
    assert result.params["negative_prompt"] == "blurry"
    assert (result.params["width"], result.params["height"]) == (32, 32)  # each image's size (a sequence's strip is wider)


def test_an_image_sequence_of_a_video_model_is_refused_before_it_runs():
    """attnctl render --check and Model.generate refuse an interpolation (or P2P) job on a video model before the
    pipeline is called (it was found after the whole video had been generated)."""
    from attnctl.testing.new_families import available

    if not available("tiny-wan"):
        pytest.skip("tiny-wan needs a newer diffusers")
    wan = make_tiny_pipeline("tiny-wan")
    calls = []
    wan.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    model = attnctl.Model(wan, "tiny-wan")
    with model:
        for run in (lambda: model.resolve("a cat", controls=attnctl.AttentionInterpolation(to="a dog", n=3)),
                    lambda: model.generate("a cat", seed=0, steps=2, controls=attnctl.AttentionInterpolation(to="a dog", n=3))):
            with pytest.raises(ConfigError, match="makes videos"):
                run()
    assert not calls


def test_region_prompts_add_no_diffusers_deprecation_warning(sd):
    """Encoding region prompts read every config key of the pipeline as an attribute: diffusers' FutureWarning about
    `requires_safety_checker` appeared in the demo's and the renderer's output, never in a stock call."""
    import warnings

    regions = attnctl.Regions([attnctl.Region("a red car", box=(0, 0, 0.5, 1))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with attnctl.apply(sd, [regions]):
            sd("a photo of a cat", num_inference_steps=1, height=32, width=32, output_type="latent")
