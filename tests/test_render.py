"""`attnctl render` and the wrapped-generation API: job files, dry runs, resume, atomicity, fault isolation,
PNG parameters, sharding over processes (issue #8)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl.control import Bound, Control
from attnctl.errors import ConfigError
from attnctl.render import cli
from attnctl.render.generate import Model, default_model, generate
from attnctl.render.jobs import check_job_id, load_job_file
from attnctl.render.outputs import read_png_params
from attnctl.render.runner import (
    MANIFEST,
    FolderLock,
    RenderError,
    RenderOptions,
    compact,
    iter_images,
    plan,
    read_records,
    render,
    shard,
)
from attnctl.testing import CALL_DEFAULTS
from attnctl.validation import number, set_field

ROOT = Path(__file__).resolve().parents[1]


# -- test-only controls -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskProbe(Control, type_name="test-render-mask"):
    """Takes a mask file path (resolved by the job reader) and a number; changes nothing."""

    mask: str = ""
    strength: float = 1.0

    def __post_init__(self):
        set_field(self, "strength", number(self.strength, "MaskProbe.strength", minimum=0))
        if not isinstance(self.mask, str) or not os.path.isabs(self.mask):
            raise ConfigError(f"MaskProbe.mask must be an absolute path after resolution, got {self.mask!r}")

    def bind(self, context):
        return Bound(self, context.layers, (0.0, 1.0))


@dataclass(frozen=True)
class NeedsWord(Control, type_name="test-render-word"):
    """Resolves a word in the prompt at bind time: an unknown word raises TokenError, like Reweight."""

    word: str = "cat"
    needs_words = True

    def bind(self, context):
        context.require_tokens("NeedsWord").positions(self.word, 0)
        return Bound(self, context.layers, (0.0, 1.0))


class _Maps:
    def __init__(self):
        self.saved = []

    def save(self, folder, images=None):
        Image.new("L", (4, 4), 255).save(os.path.join(folder, "map.png"))
        self.saved.append(images)


@dataclass(frozen=True)
class PublishesMaps(Control, type_name="test-render-maps"):
    """Publishes an object with `save(folder)` in handle.outputs, as AttentionMaps does."""

    def bind(self, context):
        context.outputs["attention_maps"] = _Maps()
        return Bound(self, context.layers, (0.0, 1.0))


# -- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model(tiny_cache):
    model = Model(tiny_cache("tiny-sd"), "tiny-sd")
    yield model
    model.release()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jsonl(path: Path, *lines: dict) -> Path:
    return write(path, "".join(json.dumps(line) + "\n" for line in lines))


def manifest(out: Path) -> list[dict]:
    text = (out / MANIFEST).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line is valid JSON


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_images(a: Path, b: Path) -> None:
    names_a = sorted(os.path.relpath(p, a) for p in iter_images(str(a)))
    names_b = sorted(os.path.relpath(p, b) for p in iter_images(str(b)))
    assert names_a == names_b and names_a
    for name in names_a:
        assert np.abs(pixels(a / name) - pixels(b / name)).max() <= 1, name  # within 1/255


def options(out: Path, **kwargs) -> RenderOptions:
    return RenderOptions(out=str(out), progress="none", **kwargs)


SMALL = {"steps": 2, "guidance_scale": 5.0}


# -- job files ----------------------------------------------------------------------------------------------------
def test_toml_and_jsonl_describe_the_same_jobs(tmp_path):
    toml = write(tmp_path / "jobs.toml", """
model = "tiny-sd"
[defaults]
steps = 2
seeds = [0, 1]

[[jobs]]
id = "cat"
prompt = "a photo of a cat"
controls = [{ type = "test-render-mask", mask = "masks/m.png", strength = 2 }]

[[jobs]]
id = "car"
prompt = "a red car"
seeds = { start = 10, count = 3 }
options = { eta = 0.5 }
""")
    (tmp_path / "masks").mkdir()
    Image.new("L", (8, 8), 255).save(tmp_path / "masks" / "m.png")
    line = jsonl(tmp_path / "jobs.jsonl",
                 {"model": "tiny-sd", "defaults": {"steps": 2, "seeds": [0, 1]}},
                 {"id": "cat", "prompt": "a photo of a cat", "controls": [{"type": "test-render-mask", "mask": "masks/m.png", "strength": 2}]},
                 {"id": "car", "prompt": "a red car", "seeds": {"start": 10, "count": 3}, "options": {"eta": 0.5}})
    a, b = load_job_file(toml), load_job_file(line)
    assert a.ok and b.ok, (a.problems, b.problems)
    assert a.model == b.model == "tiny-sd"
    assert [(j.id, j.seeds, j.steps, j.request, j.controls, dict(j.options)) for j in a.jobs] == \
           [(j.id, j.seeds, j.steps, j.request, j.controls, dict(j.options)) for j in b.jobs]
    cat = a.jobs[0]
    assert cat.seeds == (0, 1) and a.jobs[1].seeds == (10, 11, 12)
    assert cat.controls[0].mask == str(tmp_path / "masks" / "m.png")  # resolved against the job file's folder
    assert cat.controls[0].strength == 2.0
    assert [j.place for j in a.jobs] == ["jobs.toml:7", "jobs.toml:12"] and [j.place for j in b.jobs] == ["jobs.jsonl:2", "jobs.jsonl:3"]


def test_json_documents_and_empty_files(tmp_path):
    document = write(tmp_path / "jobs.json", json.dumps({"defaults": {"steps": 3}, "jobs": [{"id": "a", "prompt": "x"}]}))
    jobs = load_job_file(document)
    assert jobs.ok and jobs.format == "json" and jobs.jobs[0].steps == 3 and jobs.jobs[0].place == "jobs.json jobs[0]"
    empty = load_job_file(write(tmp_path / "empty.jsonl", "# nothing yet\n"))
    assert [p.message for p in empty.problems] == ["no jobs in this file"]
    with pytest.raises(ConfigError, match="unknown format"):
        load_job_file(write(tmp_path / "jobs.yaml", "jobs: []"))


def test_control_type_names_are_forgiving_but_unique():
    from attnctl.control import canonical_type_name

    assert canonical_type_name("test-render-mask") == "test-render-mask"
    assert canonical_type_name("MaskProbe") == "test-render-mask"  # the class name
    assert canonical_type_name("Test_Render_Mask") == "test-render-mask"
    assert canonical_type_name("no-such-thing") == "no-such-thing"
    # Control.from_dict accepts what job files accept
    assert isinstance(attnctl.Control.from_dict({"type": "MASKPROBE", "mask": os.path.abspath("m.png")}), MaskProbe)
    with pytest.raises(ConfigError, match="unknown control type 'no-such-thing'"):
        attnctl.Control.from_dict({"type": "no-such-thing"})


BAD_JSONL = [
    {"id": "good", "prompt": "a photo of a cat", "steps": 2},
    "not json",
    {"id": "steps", "prompt": "a cat", "steps": 0},
    {"id": "typo", "prompt": "a cat", "guidance": 3},
    {"id": "seed", "prompt": "a cat", "seeds": [1, 1]},
    {"id": "mask", "prompt": "a cat", "controls": [{"type": "test-render-mask", "mask": "missing.png"}]},
    {"id": "notimage", "prompt": "a cat", "controls": [{"type": "test-render-mask", "mask": "text.png"}]},
    {"id": "value", "prompt": "a cat", "controls": [{"type": "test-render-mask", "mask": "m.png", "strength": -1}]},
    {"id": "kind", "prompt": "a cat", "controls": [{"type": "no-such-control"}]},
    {"id": "good", "prompt": "a duplicate"},
    {"id": "../escape", "prompt": "a cat"},
    {"id": "size", "prompt": "a cat", "width": 30},
    {"id": "opt", "prompt": "a cat", "options": {"generator": 1}},
    {"prompt": ""},
    {"id": "linked", "prompt": "a cat", "controls": [{"type": "consistent-subjects"}]},
]


def test_dry_run_reports_every_problem_with_its_place(tmp_path, capsys, monkeypatch):
    Image.new("L", (8, 8)).save(tmp_path / "m.png")
    (tmp_path / "text.png").write_text("not an image")
    lines = [json.dumps(entry) if isinstance(entry, dict) else entry for entry in BAD_JSONL]
    path = write(tmp_path / "bad.jsonl", "# a comment\n" + "\n".join(lines) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(Model, "load", no_model)
    monkeypatch.setattr(attnctl.render.loading, "load_pipeline", no_model)
    code = cli.main(["render", str(path), "--dry-run", "--model", "tiny-sd"])
    out = capsys.readouterr().out
    assert code == 2
    expected = {
        3: "not valid JSON",
        4: "(job 'steps'): steps must be >= 1",
        5: "(job 'typo'): unknown key 'guidance' (did you mean 'guidance_scale'?)",
        6: "(job 'seed'): seed 1 appears twice",
        7: "(job 'mask'): controls[0] (test-render-mask): mask file 'missing.png' not found",
        8: "(job 'notimage'): controls[0] (test-render-mask): mask file 'text.png' is not a readable image",
        9: "(job 'value'): controls[0] (test-render-mask): MaskProbe.strength must be >= 0",
        10: "(job 'kind'): controls[0] (no-such-control): unknown control type 'no-such-control'",
        11: "(job 'good'): duplicate job id 'good' (first at bad.jsonl:2)",
        12: "id '../escape' is not allowed",
        13: "(job 'size'): width must be a multiple of 8",
        14: "(job 'opt'): options.generator is set by the renderer",
        15: "prompt must be a non-empty string",
        16: "(job 'linked'): controls: ConsistentSubjects links the images of one pipeline call",
    }
    problem_lines = [line for line in out.splitlines() if "problem " in line]
    for line_number, text in expected.items():
        assert any(f"bad.jsonl:{line_number}" in line and text in line for line in problem_lines), (line_number, text, out)
    assert len(problem_lines) == len(expected)
    assert "ok  bad.jsonl:2 job 'good'" in out and f"{len(expected)} problem(s)" in out
    with pytest.raises(SystemExit):  # a backend typo: refused by the command line before anything runs
        cli.main(["render", str(path), "--dry-run", "--backend", "tritonn"])
    assert "invalid choice: 'tritonn'" in capsys.readouterr().err


def test_dry_run_of_a_good_file_is_clean_and_reports_resume_state(tmp_path, capsys, tiny_model):
    path = jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [0, 1], **SMALL})
    out = tmp_path / "out"
    assert cli.main(["render", str(path), "--dry-run"]) == 0
    assert "no problems" in capsys.readouterr().out
    logger = logging.getLogger("attnctl")
    assert logger.propagate and not logger.handlers  # the command line put the logger back as it was
    render(str(path), options(out), model=tiny_model)
    (out / "a" / "1.png").unlink()
    assert cli.main(["render", str(path), "--dry-run", "--out", str(out), "--model", "tiny-sd"]) == 0
    assert "1 image(s) already done, 1 to render" in capsys.readouterr().out


def test_toml_places_are_line_numbers_and_syntax_errors_stop_early(tmp_path, capsys):
    path = write(tmp_path / "jobs.toml", '[[jobs]]\nid = "a"\nprompt = "x"\n\n[[jobs]]\nid = "b"\nprompt = "y"\nsteps = "many"\n')
    assert cli.main(["render", str(path), "--dry-run", "--model", "tiny-sd"]) == 2
    assert "jobs.toml:5 (job 'b'): steps must be an integer, got 'many'" in capsys.readouterr().out
    broken = write(tmp_path / "broken.toml", "[[jobs]\nprompt = 'x'\n")
    assert cli.main(["render", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "a\\b", "/abs", ".hidden", "a/../../b", "", 3.5, None])
def test_job_ids_that_could_leave_the_output_folder_are_rejected(bad):
    _, error = check_job_id(bad)
    assert error is not None


def test_job_ids_are_sanitised_and_collisions_are_duplicates(tmp_path):
    assert check_job_id("a cat!") == ("a_cat_", None)
    assert check_job_id(7) == ("7", None)
    jobs = load_job_file(jsonl(tmp_path / "j.jsonl", {"id": "a cat", "prompt": "x"}, {"id": "a?cat", "prompt": "y"}))
    assert [j.id for j in jobs.jobs] == ["a_cat"]
    assert "duplicate job id 'a_cat'" in str(jobs.problems[0])


def test_symlinked_job_folder_outside_the_output_is_refused(tmp_path, tiny_model):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "a")
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", **SMALL}, {"id": "b", "prompt": "a photo of a cat", **SMALL})
    summary = render(str(path), options(out), model=tiny_model)
    assert summary.exit_code == 1 and summary.rendered == 1
    assert "outside the output folder" in summary.failed[0]["error"]
    assert not list(elsewhere.iterdir())


# -- generation API -----------------------------------------------------------------------------------------------
def test_generate_is_the_plain_call_and_independent_of_order(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stock = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(7), **CALL_DEFAULTS["tiny-sd"]).images[0]
    model = Model(pipe, "tiny-sd")
    first = [model.generate("a photo of a cat", seed=s, steps=2).image for s in (7, 8)]
    second = [model.generate("a photo of a cat", seed=s, steps=2).image for s in (8, 7)]
    assert np.array_equal(np.asarray(first[0]), np.asarray(stock))
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[1])) and np.array_equal(np.asarray(first[1]), np.asarray(second[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    result = generate(pipe, "a photo of a cat", seed=7, steps=2, **CALL_DEFAULTS["tiny-sd"])
    assert np.array_equal(np.asarray(result.image), np.asarray(stock))
    assert result.params["seed"] == 7 and result.params["steps"] == 2 and result.params["width"] == 32


def test_generate_passes_the_prompt_by_name(tiny_cache):
    """Flux2KleinPipeline's first argument is `image`: generate passed the prompt there and failed."""
    from attnctl.testing.new_families import available

    if not available("tiny-flux2"):
        pytest.skip("diffusers lacks tiny-flux2")
    pipe = tiny_cache("tiny-flux2")
    options = dict(CALL_DEFAULTS["tiny-flux2"])
    stock = pipe(prompt="a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(7), **options).images[0]
    result = generate(pipe, "a photo of a cat", seed=7, steps=2, **options)
    assert np.array_equal(np.asarray(result.image), np.asarray(stock))


def test_model_keeps_one_handle_per_control_objects_and_restores(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    before = dict(pipe.unet.attn_processors)
    controls = (NeedsWord("cat"),)
    with Model(pipe, "tiny-sd") as model:
        model.generate("a photo of a cat", seed=0, steps=2, controls=controls)
        handle = model.handle
        model.generate("a photo of a cat", seed=1, steps=2, controls=controls)
        assert model.handle is handle and handle.live  # same control objects: applied once
        model.generate("a photo of a cat", seed=1, steps=2, controls=(NeedsWord("cat"),))
        assert model.handle is not handle and not handle.live
        model.generate("a photo of a cat", seed=1, steps=2)
        assert model.handle is None
    after = pipe.unet.attn_processors
    assert all(after[name] is proc for name, proc in before.items())


def test_default_model_is_toy_shapes_when_shipped():
    import importlib.util

    expected = "toy-shapes" if importlib.util.find_spec("attnctl.toy") else "tiny-sd"
    assert default_model() == expected


# -- rendering ----------------------------------------------------------------------------------------------------
def test_png_parameters_round_trip(tmp_path, tiny_model, capsys):
    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
    control = {"type": "test-render-mask", "mask": "m.png", "strength": 0.5}
    path = jsonl(tmp_path / "j.jsonl", {"id": "ü cat", "prompt": "a photo of a cat ünïcode", "negative_prompt": "blurry",
                                        "seeds": [3], "steps": 2, "guidance_scale": 4.5, "controls": [control]})
    out = tmp_path / "out"
    summary = render(str(path), options(out), model=tiny_model)
    assert summary.exit_code == 0, summary.format()
    params = read_png_params(out / "__cat" / "3.png")
    job = load_job_file(path).jobs[0]
    assert params["prompt"] == "a photo of a cat ünïcode" and params["negative_prompt"] == "blurry"
    assert (params["seed"], params["steps"], params["width"], params["height"]) == (3, 2, 32, 32)
    assert params["guidance_scale"] == 4.5 and params["model"] == "tiny-sd" and params["attnctl"] == attnctl.__version__
    assert params["job"] == "__cat" and params["dtype"] == "float32"
    assert [Control.from_dict(c) for c in params["controls"]] == list(job.controls)
    # the same parameters generate the same image
    again = tiny_model.generate(params["prompt"], seed=params["seed"], steps=params["steps"], width=params["width"],
                                height=params["height"], guidance_scale=params["guidance_scale"],
                                negative_prompt=params["negative_prompt"],
                                controls=[Control.from_dict(c) for c in params["controls"]])
    assert np.abs(np.asarray(again.image, dtype=np.int16) - pixels(out / "__cat" / "3.png")).max() <= 1
    assert again.params == {k: v for k, v in params.items() if k != "job"}
    with Image.open(out / "__cat" / "3.png") as image:
        assert image.text["parameters"].startswith("a photo of a cat ünïcode\nNegative prompt: blurry\nSteps: 2")
    assert cli.main(["params", str(out / "__cat" / "3.png")]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3


def test_a_failing_job_does_not_stop_the_others(tmp_path, tiny_model, capsys):
    path = jsonl(tmp_path / "j.jsonl",
                 {"id": "first", "prompt": "a photo of a cat", "seeds": [0, 1], **SMALL},
                 {"id": "unknown-word", "prompt": "a photo of a cat", "seeds": [0, 1], **SMALL,
                  "controls": [{"type": "test-render-word", "word": "zebra"}]},
                 {"id": "invalid", "prompt": "a cat", "seeds": [0], "controls": [{"type": "test-render-mask", "mask": "nope.png"}]},
                 {"id": "bad-option", "prompt": "a cat", "seeds": [0], **SMALL, "options": {"no_such_argument": 1}},
                 {"id": "last", "prompt": "a red car on the street", "seeds": [2], **SMALL,
                  "controls": [{"type": "test-render-word", "word": "car"}]})
    out = tmp_path / "out"
    # issue 8: "a failing job (a bad mask, an unknown word, out of memory) is recorded with its error and the rest go
    # on"; what the model knows (an unknown word, an argument the pipeline does not take) is found before the first
    # image, and those jobs are recorded as failed as any other
    summary = render(str(path), options(out), model=tiny_model)
    assert summary.exit_code == 1
    assert summary.rendered == 3 and len(summary.failed) == 4 and summary.images == 7
    records = {(r["job"], r["seed"]): r for r in manifest(out)}
    assert len(records) == 7 and len(manifest(out)) == 7
    assert {k for k, r in records.items() if r["status"] == "ok"} == {("first", 0), ("first", 1), ("last", 2)}
    assert records[("unknown-word", 0)]["error_type"] == "TokenError" and "'zebra'" in records[("unknown-word", 0)]["error"]
    assert records[("invalid", 0)]["error"].startswith("invalid job:") and records[("invalid", 0)]["place"] == "j.jsonl:3"
    assert "no_such_argument" in records[("bad-option", 0)]["error"]
    assert sorted(os.path.relpath(p, out) for p in iter_images(str(out))) == ["first/0.png", "first/1.png", "last/2.png"]
    text = summary.format()
    assert "7 image(s)" in text and "3 rendered" in text and "4 failed" in text and "job 'unknown-word' seed 0: TokenError" in text
    assert "j.jsonl:3 (job 'invalid')" in text
    # the command line says the same, with exit status 1
    assert cli.main(["render", str(path), "--out", str(out), "--model", "tiny-sd", "--progress", "none", "-q"]) == 1
    printed = capsys.readouterr().out
    assert "3 skipped (already done), 4 failed" in printed


def test_resume_skips_done_images_and_renders_changed_or_missing_ones(tmp_path, tiny_model):
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [0, 1, 2], **SMALL})
    out = tmp_path / "out"
    first = render(str(path), options(out), model=tiny_model)
    assert (first.rendered, first.skipped) == (3, 0)
    stamps = {p: os.stat(p).st_mtime_ns for p in iter_images(str(out))}
    again = render(str(path), options(out), model=tiny_model)
    assert (again.rendered, again.skipped, again.exit_code) == (0, 3, 0)
    assert stamps == {p: os.stat(p).st_mtime_ns for p in iter_images(str(out))}
    (out / "a" / "1.png").unlink()
    missing = render(str(path), options(out), model=tiny_model)
    assert (missing.rendered, missing.skipped) == (1, 2)
    jsonl(path, {"id": "a", "prompt": "a photo of a dog", "seeds": [0, 1, 2], **SMALL})  # the request changed
    changed = render(str(path), options(out), model=tiny_model)
    assert (changed.rendered, changed.skipped) == (3, 0)
    assert read_png_params(out / "a" / "0.png")["prompt"] == "a photo of a dog"
    forced = render(str(path), options(out, resume=False), model=tiny_model)
    assert forced.rendered == 3
    assert len(manifest(out)) == 3


def test_leftovers_of_a_killed_run_are_cleaned_and_merged(tmp_path, tiny_model):
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [0, 1, 2], **SMALL})
    out = tmp_path / "out"
    render(str(path), options(out), model=tiny_model)
    records = manifest(out)
    # a killed run: seed 1 recorded only in a journal, seed 2's record torn mid-line, a half-written PNG temporary
    (out / MANIFEST).write_text(json.dumps(records[0]) + "\n")
    state = out / ".attnctl"
    (state / "journal-00001.jsonl").write_text(json.dumps(records[1]) + "\n" + json.dumps(records[2])[:40])
    (out / "a" / ".2.png.999.tmp").write_bytes(b"\x89PNG half")
    assert read_records(str(state / "journal-00001.jsonl"))[1] == 1
    summary = render(str(path), options(out), model=tiny_model)
    assert (summary.rendered, summary.skipped) == (1, 2)  # seed 2 is rendered again, its old file replaced
    assert not (out / "a" / ".2.png.999.tmp").exists() and not list(state.glob("journal-*"))
    assert sorted((r["job"], r["seed"], r["status"]) for r in manifest(out)) == [("a", 0, "ok"), ("a", 1, "ok"), ("a", 2, "ok")]


def test_outputs_with_save_are_written_beside_the_image(tmp_path, tiny_model):
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [4], **SMALL,
                                        "controls": [{"type": "test-render-maps"}]})
    out = tmp_path / "out"
    assert render(str(path), options(out), model=tiny_model).exit_code == 0
    assert (out / "a" / "4.attention_maps" / "map.png").is_file()
    assert manifest(out)[0]["outputs"] == ["a/4.attention_maps"]
    assert sorted(os.path.relpath(p, out) for p in iter_images(str(out))) == ["a/4.png"]
    import shutil

    shutil.rmtree(out / "a" / "4.attention_maps")  # an output removed since: the image is rendered again on resume
    summary = render(str(path), options(out), model=tiny_model)
    assert (summary.rendered, summary.skipped) == (1, 0) and (out / "a" / "4.attention_maps" / "map.png").is_file()


def test_a_locked_folder_is_refused(tmp_path, tiny_model):
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", **SMALL})
    out = tmp_path / "out"
    (out / ".attnctl").mkdir(parents=True)
    lock = FolderLock(str(out))
    lock.acquire()
    try:
        with pytest.raises(RenderError, match="another attnctl render is writing"):
            render(str(path), options(out), model=tiny_model)
    finally:
        lock.release()
    assert render(str(path), options(out), model=tiny_model).exit_code == 0


def test_sharding_covers_every_pending_image_exactly_once(tmp_path):
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "x", "seeds": list(range(5))}, {"id": "b", "prompt": "y", "seeds": [9, 3]})
    jobs = load_job_file(path)
    every, pending = plan(jobs, str(tmp_path), "tiny-sd", "float32", records={})
    assert every == pending and len(every) == 7
    for world in (1, 2, 3, 8):
        parts = [shard(pending, rank, world) for rank in range(world)]
        keys = [image.key for part in parts for image in part]
        assert sorted(keys) == sorted(image.key for image in every) and len(set(keys)) == 7


def test_compact_keeps_the_latest_record_per_image_in_file_order(tmp_path):
    out = tmp_path
    (out / ".attnctl").mkdir()
    old = {"job": "b", "seed": 1, "status": "failed", "finished": "2024-01-01T00:00:00.000000+00:00"}
    new = {"job": "b", "seed": 1, "status": "ok", "finished": "2024-01-02T00:00:00.000000+00:00"}
    other = {"job": "a", "seed": 0, "status": "ok", "finished": "2024-01-01T00:00:00.000000+00:00"}
    (out / MANIFEST).write_text(json.dumps(new) + "\n")
    (out / ".attnctl" / "journal-00000.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(other) + "\n")
    jobs = load_job_file(jsonl(tmp_path / "j.jsonl", {"id": "b", "prompt": "x", "seeds": [1]}, {"id": "a", "prompt": "y"}))
    compact(str(out), jobs, delete_journals=True)
    assert [(r["job"], r["status"]) for r in manifest(out)] == [("b", "ok"), ("a", "ok")]
    assert not list((out / ".attnctl").glob("journal-*"))


# -- processes ----------------------------------------------------------------------------------------------------
def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_a_killed_run_resumes_with_every_image_exactly_once(tmp_path, tiny_model):
    seeds = list(range(10))
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": seeds, "steps": 4},
                 {"id": "b", "prompt": "a red car on the street", "seeds": [0, 1], "steps": 4})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "attnctl", "render", str(path), "--out", str(out), "--model", "tiny-sd",
               "--device", "cpu", "--threads", "1", "--progress", "none"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / ".attnctl" / "journal-00000.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 2:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    recorded = len(read_records(str(journal))[0])
    assert 2 <= recorded < 12
    summary = render(str(path), options(out), model=tiny_model)
    assert summary.exit_code == 0 and summary.skipped >= 2 and summary.rendered + summary.skipped == 12
    records = manifest(out)
    assert sorted((r["job"], r["seed"]) for r in records) == sorted([("a", s) for s in seeds] + [("b", 0), ("b", 1)])
    assert all(r["status"] == "ok" for r in records)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("journal-")]
    assert not leftovers
    for record in records:  # every PNG is whole, and the image its parameters say
        with Image.open(out / record["path"]) as image:
            image.load()
        params = read_png_params(out / record["path"])
        expected = tiny_model.generate(params["prompt"], seed=params["seed"], steps=4).image
        assert np.abs(np.asarray(expected, dtype=np.int16) - pixels(out / record["path"])).max() <= 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*args: object, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of CPU processes: `args` are the script (or `-m attnctl`) and its arguments."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *map(str, args)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)


# the end of a wrapper around the command line: each rank writes `<out>.rank-<r>.json` with the status main() returned,
# whether the run's gallery (written by rank 0 after the final merge) was there when it returned, and whether the
# process group was still up (gloo left to the interpreter's exit can abort it: SIGABRT, launcher status 1)
RECORDS_ITS_EXIT = """
import torch.distributed

code = main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
with open(f"{out}.rank-{os.environ['RANK']}.json", "w") as handle:
    json.dump({"code": code, "gallery": os.path.exists(os.path.join(out, "index.html")),
               "group": torch.distributed.is_initialized()}, handle)
sys.exit(code)
"""

# rank 0's final merge and gallery take a while (a large manifest, a slow file system): before the fix rank 1 exited
# (status 1: it had failed images) meanwhile, and the launcher stopped rank 0 before it wrote them
RANK_ZERO_FINISHES_LATE = """
import json, os, sys, time
import attnctl.render.runner as runner
from attnctl.render.cli import main

write_gallery = runner._write_gallery


def slow(*args, **kwargs):
    time.sleep(1.5)
    return write_gallery(*args, **kwargs)


runner._write_gallery = slow
""" + RECORDS_ITS_EXIT


def _rank_exits(out: Path, processes: int = 2) -> list[dict]:
    return [json.loads(Path(f"{out}.rank-{rank}.json").read_text()) for rank in range(processes)]


@pytest.mark.slow
def test_two_processes_render_the_same_images_as_one_each_once(tmp_path, tiny_model):
    path = jsonl(tmp_path / "j.jsonl",
                 {"id": "a", "prompt": "a photo of a cat", "seeds": [0, 1, 2], **SMALL},
                 {"id": "b", "prompt": "a red car on the street", "seeds": [5, 6], **SMALL},
                 {"id": "c", "prompt": "a photo of a dog", "seeds": [1], **SMALL},
                 # jobs the model cannot run (issue 8: recorded as failed, the others render): pending images 6-8 and 9,
                 # so `word` is on both ranks and `option` on rank 1 only
                 {"id": "word", "prompt": "a photo of a dog", "seeds": [3, 4, 5], **SMALL,
                  "controls": [{"type": "reweight", "weights": {"zebra": 2}}]},
                 {"id": "option", "prompt": "a photo of a dog", "seeds": [8], **SMALL, "options": {"etaa": 0.0}},
                 {"id": "invalid", "prompt": "x", "seeds": [0], "steps": 0})  # a job-file problem: rank 0 records it
    one, two = tmp_path / "one", tmp_path / "two"
    assert render(str(path), options(one), model=tiny_model).exit_code == 1
    wrapper = write(tmp_path / "finishes_late.py", RANK_ZERO_FINISHES_LATE)
    result = _launch(wrapper, "render", path, "--out", two, "--model", "tiny-sd", "--device", "cpu", "--threads", "1",
                     "--progress", "none")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "across 2 processes: 6 rendered, 0 skipped (already done), 5 failed" in result.stdout
    # rank 1 had failures (status 1) but waited for rank 0's merge and gallery; every rank exits with the run's status
    assert _rank_exits(two) == [{"code": 1, "gallery": True, "group": False}] * 2
    # rank 1 reports its own share only; the run's failures and the job file's problems are listed once, by rank 0
    assert "rank 1 of 2: 5 image(s) of its share, 3 rendered, 2 failed" in result.stderr
    output = result.stdout + result.stderr
    assert output.count("  job 'option' seed 8: ConfigError") == 1 and output.count("job file problem:") == 1
    # rank 0 reports, before the first image, every job that cannot run, also the one only rank 1 resolved
    assert result.stderr.count("cannot run on tiny-sd") == 1 and "2 job(s) cannot run on tiny-sd" in result.stderr
    assert "(job 'word'): TokenError" in result.stderr and "(job 'option'): ConfigError" in result.stderr
    assert_same_images(one, two)
    records = manifest(two)
    keys = [(r["job"], r["seed"]) for r in records]
    assert keys == [(r["job"], r["seed"]) for r in manifest(one)] and len(set(keys)) == 11
    failed = {(r["job"], r["seed"]): r for r in records if r["status"] == "failed"}
    assert sorted(failed) == [("invalid", 0), ("option", 8), ("word", 3), ("word", 4), ("word", 5)]
    assert {failed[("word", seed)]["rank"] for seed in (3, 4, 5)} == {0, 1} and failed[("option", 8)]["rank"] == 1
    assert failed[("invalid", 0)]["rank"] == 0
    assert len({failed[("word", seed)]["error"] for seed in (3, 4, 5)}) == 1
    # the same errors as one process records
    assert {(r["job"], r["seed"]): r["error"] for r in manifest(one) if r["status"] == "failed"} == {
        key: record["error"] for key, record in failed.items()}
    jobs = load_job_file(path)
    _, pending = plan(jobs, str(two), "tiny-sd", "float32", records={})
    by_rank = {rank: {image.key for image in shard(pending, rank, 2)} for rank in (0, 1)}
    assert {(r["job"], r["seed"]) for r in records if r["rank"] == 0} == by_rank[0] | {("invalid", 0)}
    assert {(r["job"], r["seed"]) for r in records if r["rank"] == 1} == by_rank[1]
    assert not list((two / ".attnctl").glob("journal-*"))


RANK_ONE_STARTS_LATE = """
import json, os, sys, time
import torch
import attnctl.render.runner as runner
from attnctl.render.cli import main

gather = runner.Ranks.gather


def late(self, value):
    # rank 1 goes on only once rank 0 has recorded two images of this run (a slow process, a busy file system); the
    # wait follows the last collective before rendering (the jobs' up-front check), which rank 0 cannot pass alone
    value = gather(self, value)
    if self.rank == 1:
        journal = os.path.join(sys.argv[sys.argv.index("--out") + 1], runner.STATE, "journal-00000.jsonl")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(journal) and open(journal).read().count("\\n") >= 2:
                break
            time.sleep(0.01)
    return value


runner.Ranks.gather = late
""" + RECORDS_ITS_EXIT


@pytest.mark.slow
def test_a_rank_that_starts_late_renders_its_share_of_the_same_plan(tmp_path):
    """Every rank shards rank 0's plan: rank 1 planning on its own after rank 0 had recorded images saw a shorter
    pending list, so `pending[1::2]` skipped some images (never rendered, exit status 0) and repeated others."""
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": list(range(6)), **SMALL},
                 # a job the model cannot run, its one image (pending image 6) on rank 0
                 {"id": "option", "prompt": "a photo of a cat", "seeds": [0], **SMALL, "options": {"etaa": 0.0}})
    wrapper = write(tmp_path / "late.py", RANK_ONE_STARTS_LATE)
    out = tmp_path / "out"
    result = _launch(wrapper, "render", path, "--out", out, "--model", "tiny-sd", "--device", "cpu", "--threads", "1",
                     "--progress", "none")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "across 2 processes: 6 rendered, 0 skipped (already done), 1 failed" in result.stdout
    # rank 1 rendered its share without a failure; it exits with the run's status all the same (it exited 0)
    assert _rank_exits(out) == [{"code": 1, "gallery": True, "group": False}] * 2
    records = [r for r in manifest(out) if r["job"] == "a"]
    assert sorted(r["seed"] for r in records) == list(range(6)) and all(r["status"] == "ok" for r in records)
    # rank r rendered seeds r, r + 2, r + 4: the shares of the one list, each image once
    assert {r["seed"]: r["rank"] for r in records} == {seed: seed % 2 for seed in range(6)}
    assert sorted(p.name for p in (out / "a").glob("*.png")) == [f"{seed}.png" for seed in range(6)]


@pytest.mark.slow
def test_check_under_a_launcher_runs_on_rank_0_only(tmp_path):
    """`--check` under `accelerate launch`: one report and one model loaded, by rank 0 (every rank loaded the model,
    on a GPU machine all on the first GPU, and printed the whole report); the other processes exit 0."""
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", **SMALL})
    result = _launch("-m", "attnctl", "render", path, "--check", "--model", "tiny-sd", "--device", "cpu",
                     "--threads", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("j.jsonl: 1 job(s), 1 image(s), model tiny-sd") == 1
    assert result.stdout.count("check: loaded tiny-sd") == 1 and result.stdout.count("check: every job resolves") == 1


def test_an_image_no_rank_recorded_is_missing_and_fails_the_run(tmp_path, tiny_model, monkeypatch):
    """Rank 0 counts the pending images with no record of this run (a rank that skipped its share): they are
    reported missing and the exit status is 1, never a clean summary."""
    import attnctl.render.runner as runner

    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [0, 1, 2], **SMALL})
    monkeypatch.setattr(runner, "shard", lambda pending, rank, world: pending[1:])
    summary = render(str(path), options(tmp_path / "out"), model=tiny_model)
    assert (summary.rendered, summary.skipped, len(summary.failed)) == (2, 0, 0)
    assert summary.missing == [("a", 0)] and summary.exit_code == 1
    assert "1 image(s) missing" in summary.format() and "job 'a' seed 0" in summary.format()


class _OneRankOfTwo:
    """Rank `rank` of a two-process run inside this process: what it sends is kept in `sent`; what rank 0 sends to
    it comes from `replies` (rank 0 gets its own values back)."""

    def __init__(self, rank: int, replies: tuple = ()):
        import attnctl.render.runner as runner

        self.ranks = runner.Ranks(rank, 2, torch.device("cpu"))
        self.sent: list = []
        replies = list(replies)

        def broadcast(value):
            self.sent.append(value)
            return value if rank == 0 else replies.pop(0)

        self.ranks.barrier = lambda: None
        self.ranks.broadcast = broadcast
        self.ranks.gather = list


def test_rank_0_sends_the_runs_status_and_its_failure_to_every_rank(tmp_path, tiny_model, monkeypatch):
    """Every rank exits with the run's status, which rank 0 sends once its final merge and gallery are written; when
    they fail, rank 0 sends that too, so that the others fail with it instead of waiting for it or exiting 0."""
    import attnctl.render.runner as runner

    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [0, 1], **SMALL})
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(runner, "_write_gallery", full)
        zero = _OneRankOfTwo(0)
        with pytest.raises(RenderError, match="No space left on device"):
            render(str(path), options(out), model=tiny_model, ranks=zero.ranks)
    assert zero.sent[-1] == (2, "OSError: [Errno 28] No space left on device")
    assert [r["seed"] for r in manifest(out)] == [0]  # rank 0's share, merged before the gallery failed
    plan_of_rank_0 = ("run-x", 2, [0, 1])  # run id, images, positions of the pending ones
    one = _OneRankOfTwo(1, (plan_of_rank_0, zero.sent[-1]))
    with pytest.raises(RenderError, match=r"rank 0 could not finish the run \(OSError: \[Errno 28\] No space left"):
        render(str(path), options(out), model=tiny_model, ranks=one.ranks)
    # rank 1's share rendered without a failure; rank 0 found the run's status 1 (a failed image): rank 1's too
    one = _OneRankOfTwo(1, (plan_of_rank_0, (1, None)))
    summary = render(str(path), options(out), model=tiny_model, ranks=one.ranks)
    assert (summary.rendered, summary.failed, summary.exit_code) == (1, [], 1)
    assert summary.format().startswith("attnctl render: rank 1 of 2: 1 image(s) of its share, 1 rendered, 0 failed")


# -- examples -----------------------------------------------------------------------------------------------------
EXAMPLES = sorted((ROOT / "examples" / "jobs").glob("*.toml")) + sorted((ROOT / "examples" / "jobs").glob("*.jsonl"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_job_files_are_valid(path):
    """Every problem of an example file is a control type not registered in this build (the controls of other
    packages); with every control registered, the example files must be clean."""
    jobs = load_job_file(path)
    registered = attnctl.control.registered_controls()
    for problem in jobs.problems:
        assert "unknown control type" in problem.message, str(problem)
        kind = problem.message.split("unknown control type ")[1].split("'")[1]
        assert kind not in registered, str(problem)
    assert jobs.jobs or jobs.invalid


def test_quickstart_renders_on_the_default_embedded_model(tmp_path, tiny_cache):
    path = ROOT / "examples" / "jobs" / "quickstart.toml"
    jobs = load_job_file(path)
    assert jobs.jobs
    # one seed and two steps per job: this checks that the file runs, not what it shows; jobs whose controls
    # are not in this build are left out (test_example_job_files_are_valid says which)
    jobs = dataclasses.replace(jobs, invalid=(), problems=(),
                               jobs=tuple(dataclasses.replace(job, seeds=job.seeds[:1], steps=2) for job in jobs.jobs))
    name = default_model()
    model = Model(tiny_cache(name), name) if name.startswith("tiny-") else Model.load(name, device="cpu")
    with model:
        summary = render(jobs, options(tmp_path / "out"), model=model)
    assert summary.exit_code == 0, summary.format()
    assert summary.rendered == len(jobs.jobs)


def test_reference_example_job_renders_the_generated_row(tmp_path, tiny_cache):
    """examples/jobs/reference.toml: its reference path resolves against the job file, and each job renders (one
    seed, two steps); the ReferenceAttention image is row 1 of [prompt, prompt], not the reference's reconstruction."""
    jobs = load_job_file(ROOT / "examples" / "jobs" / "reference.toml")
    assert not jobs.problems and {job.id for job in jobs.jobs} == {"stock", "reference", "reference-adain"}
    jobs = dataclasses.replace(jobs, jobs=tuple(dataclasses.replace(job, seeds=job.seeds[:1], steps=2) for job in jobs.jobs))
    name = default_model()
    model = Model(tiny_cache(name), name) if name.startswith("tiny-") else Model.load(name, device="cpu")
    with model:
        summary = render(jobs, options(tmp_path / "out"), model=model)
    assert summary.exit_code == 0, summary.format()
    assert summary.rendered == 3
    assert read_png_params(str(tmp_path / "out" / "reference-adain" / "0.png"))["controls"][0]["adain"] is True


def test_reference_generation_publishes_the_maps_of_the_kept_row_only(tmp_path, tiny_cache):
    """A ReferenceAttention image is row 1 of [prompt, prompt]: its attention maps are row 1's of that call (the
    maps, grid maps, contributions, picture and masks), so the saved `image0_*` files are the image's, not those of
    the discarded reconstruction of the reference in row 0."""
    from attnctl.render.runner import save_outputs

    pipe = tiny_cache("tiny-sd")
    reference = Image.new("RGB", (32, 32), (0, 200, 0))
    model = Model(pipe, "tiny-sd")
    with model:
        kept = model.generate("a red cat", seed=0, steps=2, controls=[attnctl.ReferenceAttention(reference),
                                                                       attnctl.AttentionMaps(["cat"])])
    maps = kept.outputs["attention_maps"]
    # the call by hand: both rows seeded with the seed, the reference in row 0
    with attnctl.apply(pipe, [attnctl.ReferenceAttention(reference), attnctl.AttentionMaps(["cat"])]) as handle:
        pipe(["a red cat"] * 2, generator=[torch.Generator().manual_seed(0) for _ in range(2)], num_inference_steps=2,
             **CALL_DEFAULTS["tiny-sd"])
        both = handle.outputs["attention_maps"]
    assert len(both) == 2 and len(maps) == 1
    assert torch.equal(maps.maps, both.maps[1:]) and torch.equal(maps.grid_maps, both.grid_maps[1:])
    assert maps.contributions == both.contributions[1:] and maps.prompts == both.prompts[1:]
    assert torch.equal(maps.masks("cat"), both.masks("cat")[1:])
    assert np.array_equal(np.asarray(maps.images[0]), np.asarray(kept.image))
    assert np.array_equal(np.asarray(both.images[1]), np.asarray(kept.image))
    save_outputs(kept.outputs, str(tmp_path / "kept"), 0, kept.image)
    both.save(str(tmp_path / "both"))
    assert sorted(os.listdir(tmp_path / "kept" / "0.attention_maps")) == ["image0_cat.png", "image0_grid.png"]
    assert np.array_equal(pixels(tmp_path / "kept" / "0.attention_maps" / "image0_cat.png"),
                          pixels(tmp_path / "both" / "image1_cat.png"))


def test_select_images_checks_its_indices(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, attnctl.AttentionMaps(["cat"])) as handle:
        pipe(["a red cat", "a blue cat"], generator=[torch.Generator().manual_seed(0) for _ in range(2)],
             num_inference_steps=1, **CALL_DEFAULTS["tiny-sd"])
        result = handle.outputs["attention_maps"]
    swapped = result.select_images([1, 0])
    assert torch.equal(swapped.maps, result.maps.flip(0)) and swapped.prompts == ("a blue cat", "a red cat")
    for bad in (2, -1, True, "0"):
        with pytest.raises(ConfigError, match=r"image positions in \[0, 2\)"):
            result.select_images([bad])


@pytest.mark.parametrize("name", ["gallery.toml", "interpolate.toml", "quickstart.toml", "reference.toml", "sweep.jsonl"])
def test_example_job_files_on_the_embedded_model_pass_check(name, tmp_path, capsys):
    """`attnctl render FILE --check` resolves each job with the rows its image's call will have (an interpolation
    sequence, P2P's edits, ReferenceAttention's reference row), not one prompt: the shipped files are clean."""
    assert cli.main(["render", str(ROOT / "examples" / "jobs" / name), "--check", "--out", str(tmp_path / "out"),
                     "--progress", "none"]) == 0, capsys.readouterr().out


def test_generate_refuses_two_controls_that_each_lay_out_the_rows(tiny_cache):
    reference = Image.new("RGB", (32, 32), (0, 200, 0))
    pairs = [(attnctl.ReferenceAttention(reference), attnctl.PromptToPrompt(edits=["a blue cat"])),
             (attnctl.ReferenceAttention(reference), attnctl.AttentionInterpolation(to="a blue cat")),
             (attnctl.PromptToPrompt(edits=["a blue cat"]), attnctl.AttentionInterpolation(to="a blue cat"))]
    model = Model(tiny_cache("tiny-sd"), "tiny-sd")
    with model:
        for pair in pairs:
            with pytest.raises(ConfigError, match="each lay out the rows"):
                model.generate("a red cat", seed=0, steps=1, controls=pair)
            assert model.handle is None


def test_summary_and_exit_code():
    from attnctl.render.runner import Summary

    ok = Summary(images=2, rendered=2)
    assert ok.exit_code == 0 and "2 rendered" in ok.format()
    failed = Summary(images=2, rendered=1, failed=[{"job": "a", "seed": 0, "error": "TokenError: x"}])
    assert failed.exit_code == 1 and "job 'a' seed 0: TokenError: x" in failed.format()


def test_the_request_digest_holds_the_contents_of_referenced_files(tmp_path):
    """Editing a reference image or mask file a job names changes its request, so resume renders it again (the
    digest held only the path)."""
    from PIL import Image

    reference = tmp_path / "reference.png"
    Image.new("RGB", (32, 32), (0, 200, 0)).save(reference)
    path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a photo of a cat", "seeds": [0], **SMALL,
                                        "controls": [{"type": "reference-attention", "image": "reference.png"}]})
    before = load_job_file(path).jobs[0].request
    assert load_job_file(path).jobs[0].request == before  # the same file: the same request
    Image.new("RGB", (32, 32), (200, 0, 0)).save(reference)
    assert load_job_file(path).jobs[0].request != before


def test_the_request_digest_is_the_parsed_controls_in_their_order(tmp_path):
    """The digest hashed the controls as written with sorted keys: PromptToPrompt's per-word windows, where a later
    word overrides an earlier one, gave the same request in either order (toy model: a different image, kept on
    resume as done), and the same mask named by a relative or an absolute path, or a field written 3 or 3.0, gave
    different ones."""
    from PIL import Image

    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")

    def request(*controls):
        path = jsonl(tmp_path / "j.jsonl", {"id": "a", "prompt": "a red square", "seeds": [0], **SMALL, "controls": list(controls)})
        found = load_job_file(path)
        assert found.ok, found.problems
        return found.jobs[0].request

    windows = [("red square", [0.0, 0.0]), ("square", [0.0, 1.0])]
    p2p = [{"type": "prompt-to-prompt", "edits": ["a blue square"], "cross_steps": dict(order)} for order in (windows, windows[::-1])]
    assert request(p2p[0]) != request(p2p[1])
    region = {"type": "regions", "regions": [{"prompt": "a cat", "mask": "m.png"}]}
    absolute = {"type": "regions", "regions": [{"prompt": "a cat", "mask": str(tmp_path / "m.png")}]}
    assert request(region) == request(absolute)
    assert request({"type": "pag", "scale": 3}) == request({"type": "PAG", "scale": 3.0})


def test_generate_refuses_a_size_the_pipeline_does_not_take(tiny_cache):
    """StableDiffusionImg2ImgPipeline takes its size from the image: width / height were dropped silently."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**tiny_cache("tiny-sd").components)
    img2img.set_progress_bar_config(disable=True)
    with pytest.raises(ConfigError, match="takes no width=, height="):
        Model(img2img, "tiny-sd").generate("a cat", width=64, height=64, image=Image.new("RGB", (32, 32)))


def test_generate_records_options_json_cannot_hold_and_saves_the_image(tiny_cache, tmp_path):
    """Call options diffusers takes but JSON cannot hold (a latents tensor, a callback, a numpy eta) and a region's
    in-memory mask are recorded (numbers as numbers, the rest described): `Generation.save` raised TypeError (or
    ConfigError for the mask, before the Generation was returned) after the image was rendered."""
    model = Model(tiny_cache("tiny-sd"), "tiny-sd")
    calls = []

    def on_step(pipe, i, t, kwargs):
        calls.append(i)
        return kwargs

    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    g = model.generate("a cat", steps=2, latents=latents, callback_on_step_end=on_step, eta=np.float32(0.5))
    assert calls == [0, 1]
    assert g.save(str(tmp_path / "a.png")) > 0
    options = read_png_params(str(tmp_path / "a.png"))["options"]
    assert options["eta"] == 0.5 and type(options["eta"]) is float
    assert options["latents"] == "<Tensor float32 (1, 4, 4, 4), not saved>"
    assert "on_step" in options["callback_on_step_end"] and "not saved" in options["callback_on_step_end"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(g.image.convert("RGB")))

    regions = attnctl.Regions([attnctl.Region("a cat", mask=np.ones((8, 8))), attnctl.Region("a dog", box=(0.5, 0, 1, 1))])
    g = model.generate("a cat and a dog", steps=2, controls=[regions])
    model.release()
    g.save(str(tmp_path / "b.png"))
    recorded = read_png_params(str(tmp_path / "b.png"))["controls"][0]["regions"]
    assert recorded == [{"prompt": "a cat", "mask": "<in-memory mask, not saved>", "subject": True},
                        {"prompt": "a dog", "box": [0.5, 0.0, 1.0, 1.0], "subject": True}]


def test_generate_refuses_more_than_one_image_per_prompt(tiny_cache):
    """num_images_per_prompt=2 rendered two images and kept the first."""
    model = Model(tiny_cache("tiny-sd"), "tiny-sd")
    with pytest.raises(ConfigError, match=r"one image per call, got num_images_per_prompt=2"):
        model.generate("a cat", steps=2, num_images_per_prompt=2)
    assert model.generate("a cat", steps=1, num_images_per_prompt=1).image.size == (32, 32)


# -- rows of different prompts (PromptToPrompt edits, an interpolation sequence): a second encoder's prompt -------
def test_generate_refuses_one_prompt_2_for_rows_of_different_prompts(tiny_cache):
    """Flux's prompt_2 is the T5 text, the only text its transformer attends to: spread to every row, the base and
    the edit had the same T5 text and the edit reached only the pooled vector, silently. One string is refused (by
    generate and resolve, nothing attached); a list of one string per row reaches its row."""
    from attnctl.handle import denoiser_of

    pipe = tiny_cache("tiny-flux")
    model = Model(pipe, "tiny-flux")
    processors = dict(denoiser_of(pipe)[1].attn_processors)
    p2p = attnctl.PromptToPrompt("replace", edits=["a blue car"])
    for call in (model.generate, model.resolve):
        with pytest.raises(ConfigError, match=r"prompt_2='a red car on a street' is one string, .*a list of 2 strings"):
            call("a red car", steps=1, controls=[p2p], prompt_2="a red car on a street", **CALL_DEFAULTS["tiny-flux"])
        assert model.handle is None and dict(denoiser_of(pipe)[1].attn_processors) == processors
    seen = []

    def t5(*args, **kwargs):  # Flux encodes prompt_2 with T5 here
        seen.append(kwargs.get("prompt"))
        return type(pipe)._get_t5_prompt_embeds(pipe, *args, **kwargs)

    pipe._get_t5_prompt_embeds = t5
    try:
        texts = ["a red car on a street", "a blue car on a street"]
        g = model.generate("a red car", steps=1, controls=[p2p], prompt_2=texts, **CALL_DEFAULTS["tiny-flux"])
    finally:
        model.release()
        del pipe._get_t5_prompt_embeds
    assert seen == [texts] and len(g.frames) == 2 and g.params["options"]["prompt_2"] == texts


# --- attnctl.generate on an embedded model takes its call defaults ---------------------------------------------------


def test_generate_on_an_embedded_pipeline_takes_its_call_defaults():
    """`attnctl.generate(pipe, ...)` applies an embedded model's call defaults as `interpolate` and `Model.load` do:
    the toy model's guidance 4 and 10 steps (it passed diffusers' 7.5 and 50), and the tiny PixArt's arguments (without
    them the call failed inside diffusers: "Invalid sample size")."""
    import attnctl
    from attnctl.toy import CALL_DEFAULTS

    toy = attnctl.load_pipeline("toy-shapes")
    generation = attnctl.generate(toy, "a red circle", seed=3)
    assert generation.params["guidance_scale"] == CALL_DEFAULTS["guidance_scale"]
    assert generation.params["steps"] == CALL_DEFAULTS["num_inference_steps"]
    pixart = attnctl.load_pipeline("tiny-pixart")
    assert attnctl.generate(pixart, "a photo of a cat", steps=1).image.size == (32, 32)


def test_a_reference_attention_mask_region_is_a_path_relative_to_the_job_file(tmp_path):
    """ReferenceAttention's `region` may be a mask file: like its `image`, resolved against the job file's folder."""
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "ref.png")
    Image.fromarray(np.tile(np.array([0, 255], dtype=np.uint8).repeat(4), (8, 1))).save(tmp_path / "masks" / "r.png")
    (tmp_path / "jobs.toml").write_text(
        'model = "tiny-sd"\n[[jobs]]\nid = "ref"\nprompt = "a cat"\n'
        '[[jobs.controls]]\ntype = "reference-attention"\nimage = "ref.png"\nregion = "masks/r.png"\n'
    )
    loaded = load_job_file(tmp_path / "jobs.toml")
    assert loaded.ok, loaded.problems
    control = loaded.jobs[0].controls[0]
    assert control.image == str(tmp_path / "ref.png") and control.region == str(tmp_path / "masks" / "r.png")


def test_a_magnets_job_renders_on_a_text_to_image_model(tmp_path, capsys):
    """`AttentionMaps(magnets=True)` reads a text-to-image call's images after it: the renderer's check of each job
    (`Model.resolve`) called the pipeline with output_type='latent', which the magnets refuse, so every magnets job
    failed before it rendered."""
    path = jsonl(tmp_path / "j.jsonl", {"id": "m", "prompt": "a red circle", "seeds": [0], **SMALL, "controls": [
        {"type": "AttentionMaps", "words": ["circle"], "magnets": True}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the check's stopped call left the magnets nothing to read
        assert cli.main(["render", str(path), "--out", str(tmp_path / "out"), "--model", "toy-shapes",
                         "--progress", "none"]) == 0, capsys.readouterr().out
    assert (tmp_path / "out" / "m" / "0.png").is_file()


def test_magnets_after_a_failed_call_add_no_warning_of_their_own(tiny_cache):
    """A call that raises before its images exist leaves the magnets nothing to read: its own error is raised, and
    no "could not finish" warning follows it (at the call's end or at the next call)."""
    pipe = tiny_cache("tiny-sd")

    def fail(*_):
        raise KeyError("stop")

    with attnctl.apply(pipe, attnctl.AttentionMaps(words=["cat"], magnets=True)) as handle:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(KeyError, match="stop"):
                pipe("a cat", num_inference_steps=2, callback_on_step_end=fail, output_type="pil")
            pipe("a cat", num_inference_steps=2, output_type="pil", generator=torch.Generator().manual_seed(0))
        assert handle.outputs["attention_maps"] is not None
