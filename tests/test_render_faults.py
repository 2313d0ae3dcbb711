"""The renderer under faults and a new user's mistakes (issue #18): one-line errors with exit status 2 and
nothing lost; reserved ids, bounded seeds, plan files, model-name typos, `--check`; the Python API's
validation; PNG metadata other tools read; the gallery page."""

from __future__ import annotations

import errno
import html.parser
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

import attnctl
from attnctl.control import Bound, Control
from attnctl.errors import ConfigError
from attnctl.render import cli, outputs
from attnctl.render.generate import Model
from attnctl.render.jobs import MAX_SEEDS_PER_JOB, check_job_id, load_job_file
from attnctl.render.outputs import parameters_text, read_png_params
from attnctl.render.runner import MANIFEST, RenderError, RenderOptions, render


@dataclass(frozen=True)
class _SavesMaps(Control, type_name="test-faults-maps"):
    """Publishes an object with `save(folder)` (as AttentionMaps does): two heatmaps per image."""

    def bind(self, context):
        context.outputs["attention_maps"] = _Heatmaps()
        return Bound(self, context.layers, (0.0, 1.0))


class _Heatmaps:
    def save(self, folder, images=None):
        for word in ("red", "car"):
            Image.new("RGB", (8, 8), (200, 30, 30)).save(os.path.join(folder, f"image0_{word}.png"))


def jsonl(path: Path, *lines: dict) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def manifest(out: Path) -> list[dict]:
    text = (out / MANIFEST).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("attnctl render:")]
    assert len(errors) == 1, err
    # Python's logging reports its own failures ("--- Logging error ---" ... "Arguments: ...": diffusers logging the
    # failed import of a torchao built for another torch, through a handler an earlier test's capture closed); that
    # block is environment noise, not attnctl's output. Any other traceback fails the test.
    kept, inside = [], False
    for line in err:
        if line.startswith("--- Logging error ---"):
            inside = True
        elif inside and line.startswith("Arguments:"):
            inside = False
        elif not inside:
            kept.append(line)
    assert "Traceback" not in "\n".join(kept), err
    return errors[0]


@pytest.fixture
def tiny_model(tiny_cache):
    model = Model(tiny_cache("tiny-sd"), "tiny-sd")
    yield model
    model.release()


def run_cli(args, model=None, monkeypatch=None) -> int:
    if model is not None:  # reuse the session's tiny pipeline instead of building one per run
        monkeypatch.setattr(Model, "load", classmethod(lambda cls, *a, **k: model))
    return cli.main(["render", *map(str, args), "--progress", "none"])


SMALL = {"steps": 2, "guidance_scale": 5.0}


# -- the output folder --------------------------------------------------------------------------------------------
def test_out_that_is_a_file_is_one_line_and_rc_2(tmp_path, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL})
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert run_cli([jobs, "--out", target]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert target.read_text() == "not a folder"


def test_read_only_output_folder_is_one_line_and_rc_2(tmp_path, capsys, monkeypatch):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL})
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse writes the way a read-only mount does
        real_open = open

        def refusing_open(path, *args, **kwargs):
            if str(path).startswith(str(out)) and args and "w" in args[0]:
                raise PermissionError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refusing_open)
    else:
        out.chmod(0o555)
    try:
        assert run_cli([jobs, "--out", out]) == 2
    finally:
        out.chmod(0o755)
    line = one_line_error(capsys)
    assert str(out) in line and ("not writable" in line or "cannot" in line), line


class _DiskFull:
    """`outputs.atomic_write` that fails with ENOSPC from the `fail_at`-th call on (PNG images and the manifest
    alike), as a disk that fills up does."""

    def __init__(self, fail_at: int, sticky: bool = True):
        self.calls, self.fail_at, self.sticky = 0, fail_at, sticky
        self.real = outputs.atomic_write

    def __call__(self, path, data, *, fsync=False):
        self.calls += 1
        if self.calls >= self.fail_at and (self.sticky or self.calls == self.fail_at):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return self.real(path, data, fsync=fsync)


@pytest.mark.parametrize("sticky", [True, False], ids=["disk-stays-full", "one-failed-write"])
def test_full_disk_stops_after_the_first_failed_write_and_loses_nothing(tmp_path, capsys, monkeypatch, tiny_model, sticky):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", "seeds": [0, 1, 2, 3, 4], **SMALL})
    out = tmp_path / "out"
    calls = []
    real_generate = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: calls.append(k["seed"]) or real_generate(*a, **k))
    # an empty folder has no manifest to compact first: the writes are image 0, image 1, image 2 (fails), ...
    full = _DiskFull(fail_at=3, sticky=sticky)
    monkeypatch.setattr(outputs, "atomic_write", full)
    assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 2
    line = one_line_error(capsys)
    assert "No space left on device" in line and "run again to resume" in line
    assert calls == [0, 1, 2]  # stopped at the first failed write: no image generated that could not be saved
    # what is recorded is consistent: the manifest (or, when it could not be written, the journals) holds the
    # two saved images as ok with their sizes; the image that failed is not recorded as ok
    from attnctl.render.runner import merged_records

    records = merged_records(str(out))
    ok = sorted(seed for (job, seed), r in records.items() if r["status"] == "ok")
    assert ok == [0, 1]
    for seed in ok:
        assert os.path.getsize(out / "a" / f"{seed}.png") == records[("a", seed)]["bytes"]
    assert not (out / "a" / "2.png").exists()
    assert not [p for p in out.rglob("*.tmp")]  # no half-written file
    if not sticky:
        assert [r["seed"] for r in manifest(out) if r["status"] == "ok"] == [0, 1]
    # the disk has room again: the next run renders the rest, each image exactly once
    monkeypatch.setattr(outputs, "atomic_write", full.real)
    calls.clear()
    assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 0
    assert calls == [2, 3, 4]
    records = manifest(out)
    assert [(r["seed"], r["status"]) for r in records] == [(s, "ok") for s in range(5)]


def test_a_manifest_replaced_by_a_folder_is_a_clear_error(tmp_path, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL})
    out = tmp_path / "out"
    (out / MANIFEST).mkdir(parents=True)  # what an older attnctl did with a job id "manifest.jsonl"
    assert run_cli([jobs, "--out", out]) == 2
    assert "is a folder" in one_line_error(capsys)
    assert run_cli([jobs, "--out", out, "--dry-run"]) == 2
    assert "is a folder" in one_line_error(capsys)


# -- job files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reserved", ["manifest.jsonl", "MANIFEST.JSONL", "index.html", ".attnctl"])
def test_reserved_job_ids_are_refused(reserved):
    _, error = check_job_id(reserved)
    assert error is not None and repr(reserved) in error


def test_seed_counts_are_bounded_and_checked_in_linear_time(tmp_path):
    huge = load_job_file(jsonl(tmp_path / "huge.jsonl", {"id": "a", "prompt": "x", "seeds": {"start": 0, "count": 10**12}}))
    assert not huge.jobs and f"more than {MAX_SEEDS_PER_JOB}" in huge.problems[0].message
    many = load_job_file(jsonl(tmp_path / "many.jsonl", {"id": "a", "prompt": "x", "seeds": list(range(MAX_SEEDS_PER_JOB))},
                               {"id": "b", "prompt": "x", "seeds": {"start": 5, "count": MAX_SEEDS_PER_JOB}}))
    assert many.ok and [len(j.seeds) for j in many.jobs] == [MAX_SEEDS_PER_JOB] * 2
    duplicate = load_job_file(jsonl(tmp_path / "dup.jsonl", {"id": "a", "prompt": "x", "seeds": list(range(50)) + [7]}))
    assert duplicate.problems[0].message == "seed 7 appears twice"
    over = load_job_file(jsonl(tmp_path / "over.jsonl", {"id": "a", "prompt": "x", "seeds": {"start": 2**64 - 2, "count": 5}}))
    assert "beyond the largest seed 2**64 - 1" in over.problems[0].message
    last = load_job_file(jsonl(tmp_path / "last.jsonl", {"id": "a", "prompt": "x", "seeds": {"start": 2**64 - 2, "count": 2}}))
    assert last.ok and last.jobs[0].seeds == (2**64 - 2, 2**64 - 1)


@pytest.mark.parametrize("seed", [-1, 0, 2**63 - 1, 2**63, 2**64 - 1, 2**64])
def test_job_files_and_generate_take_the_same_seeds(tmp_path, tiny_model, monkeypatch, seed):
    """Issue 18: "the Python API's validation matches the renderer's": at the bounds of the seed range, a job file
    (TOML, JSONL, JSON) accepts a seed exactly when Model.generate does."""
    monkeypatch.setattr(tiny_model, "_render", lambda prompt, seed, *rest: seed)  # the validation only, no denoising
    try:
        api = tiny_model.generate("a cat", seed=seed) == seed
    except ConfigError as error:
        assert "seed must be an integer in" in str(error)
        api = False
    (tmp_path / "jobs.toml").write_text(f'[[jobs]]\nid = "a"\nprompt = "a cat"\nseed = {seed}\n')
    (tmp_path / "jobs.json").write_text(json.dumps({"jobs": [{"id": "a", "prompt": "a cat", "seeds": [seed]}]}))
    jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a cat", "seed": seed})
    for path in (tmp_path / "jobs.toml", tmp_path / "jobs.jsonl", tmp_path / "jobs.json"):
        jobs = load_job_file(path)
        assert jobs.ok == api, (path.name, [str(p) for p in jobs.problems])
        assert jobs.jobs[0].seeds == (seed,) if api else "is not an integer in [0, 2**64 - 1]" in jobs.problems[0].message
    assert api == (0 <= seed <= 2**64 - 1)


def test_dry_run_of_100000_seeds(tmp_path, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "x", "seeds": {"start": 0, "count": 100000}})
    assert cli.main(["render", str(jobs), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "100000 image(s)" in capsys.readouterr().out


def _plan_file(path: Path) -> Path:
    plan = attnctl.FastAttnPlan(model="PixArtTransformer2DModel", fingerprint="abc", steps=2, resolution=(32, 32),
                                window=4, threshold=0.05, methods={"transformer_blocks.0.attn1": ("full", "step_share")})
    plan.save(path)
    return path


def test_fastattn_plan_file_in_a_job_file(tmp_path):
    _plan_file(tmp_path / "plan.json")
    jobs = load_job_file(jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "x",
                                                         "controls": [{"type": "fastattn", "plan": "plan.json"}]}))
    assert jobs.ok, jobs.problems
    control = jobs.jobs[0].controls[0]
    assert isinstance(control.plan, attnctl.FastAttnPlan) and control.plan.steps == 2
    (tmp_path / "bad.json").write_text("{not json")
    bad = load_job_file(jsonl(tmp_path / "bad.jsonl", {"id": "a", "prompt": "x",
                                                       "controls": [{"type": "fastattn", "plan": "bad.json"}]}))
    assert "plan file 'bad.json'" in bad.problems[0].message and "JSON" in bad.problems[0].message


# -- model names --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a hub load was attempted")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(("typo", "meant"), [("tiny-sd2", "tiny-sd"), ("Toy-Shapes", "toy-shapes"), ("tiny_sdxl", "tiny-sdxl")])
def test_embedded_name_typos_suggest_the_name_before_any_hub_attempt(typo, meant, tmp_path, capsys, no_hub):
    hint = f"did you mean {meant!r}?"
    with pytest.raises(ConfigError, match=re.escape(hint)):
        attnctl.load_pipeline(typo)
    with pytest.raises(ConfigError, match=re.escape(hint)):
        Model.load(typo)
    jobs = jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "x", **SMALL})
    assert cli.main(["render", str(jobs), "--dry-run", "--model", typo]) == 2
    assert hint in capsys.readouterr().out
    assert cli.main(["render", str(jobs), "--out", str(tmp_path / "out"), "--model", typo, "--progress", "none"]) == 2
    assert hint in one_line_error(capsys)


def test_hub_ids_and_local_folders_are_not_taken_for_typos():
    from attnctl.render.loading import near_miss

    assert near_miss("owner/tiny-sd2") is None and near_miss("gpt2") is None and near_miss("tiny-sd") is None
    assert near_miss(os.getcwd()) is None


# -- --check ------------------------------------------------------------------------------------------------------
def test_check_resolves_words_layers_and_options_without_generating(tmp_path, capsys, monkeypatch, tiny_model):
    jobs = jsonl(
        tmp_path / "jobs.jsonl", {"model": "tiny-sd"},
        {"id": "good", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"red": 2}}], **SMALL},
        {"id": "absent", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"zebra": 2}}], **SMALL},
        {"id": "layers", "prompt": "a red car", "controls": [{"type": "pag", "layers": "transformer_blocks.99"}], **SMALL},
        {"id": "skip", "prompt": "a red car", "controls": [{"type": "skip-layer"}], **SMALL},
        {"id": "option", "prompt": "a red car", "options": {"bogus": 1}, **SMALL},
    )
    generated = []
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: generated.append(1))
    stock = {name: type(p) for name, p in tiny_model.pipe.unet.attn_processors.items()}
    assert run_cli([jobs, "--check"], tiny_model, monkeypatch) == 2
    out = capsys.readouterr().out
    lines = {name: [line for line in out.splitlines() if f"job {name!r}" in line] for name in ("good", "absent", "layers", "skip", "option")}
    assert lines["good"][-1].strip().startswith("ok") and "resolves" in lines["good"][-1]
    assert "problem" in lines["absent"][-1] and "zebra" in lines["absent"][-1]
    for name in ("layers", "skip", "option"):
        assert "problem" in lines[name][-1], (name, out)
    assert "bogus" in lines["option"][-1]
    assert generated == [] and not (tmp_path / "out").exists()
    assert tiny_model.handle is None
    assert {name: type(p) for name, p in tiny_model.pipe.unet.attn_processors.items()} == stock


def test_check_resolves_the_valid_jobs_of_a_file_with_problems(tmp_path, capsys, monkeypatch, tiny_model):
    """`--check` on a file whose dry run found problems still resolves its valid jobs on the model (README: it
    "does the same, then loads the model once and resolves every job"), so one pass reports every problem; with a
    bad --model or --device it says the model check was skipped, never lists the jobs as all right."""
    jobs = jsonl(
        tmp_path / "jobs.jsonl", {"model": "tiny-sd"},
        {"id": "good", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"red": 2}}], **SMALL},
        {"id": "invalid", "prompt": "a red car", "controls": [{"type": "pag", "scale": "big"}], **SMALL},
        {"id": "absent", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"zebra": 2}}], **SMALL},
    )
    assert run_cli([jobs, "--check"], tiny_model, monkeypatch) == 2
    out = capsys.readouterr().out
    assert any("problem" in line and "job 'invalid'" in line and "PAG.scale" in line for line in out.splitlines()), out
    assert any(line.strip().startswith("ok") and "job 'good' resolves on tiny-sd" in line for line in out.splitlines())
    assert any("problem" in line and "job 'absent'" in line and "zebra" in line for line in out.splitlines()), out
    assert "check: 1 problem(s) on tiny-sd" in out
    assert run_cli([jobs, "--check", "--model", "tiny-sd2"], tiny_model, monkeypatch) == 2
    out = capsys.readouterr().out
    assert "did you mean 'tiny-sd'?" in out
    assert "check: model check skipped: fix the 1 --model / --device problem(s) above first" in out
    assert "resolves on" not in out


# -- the Python API -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [3.7, -1, 2**64, True, "3"])
def test_generate_rejects_seeds_that_are_not_integers_in_range(tiny_model, seed):
    with pytest.raises(ConfigError, match="seed must be an integer in"):
        tiny_model.generate("a cat", seed=seed, steps=1)


@pytest.mark.parametrize(("kwargs", "match"), [({"steps": 0}, "steps must be >= 1"), ({"bogus_option": 1}, "bogus_option"),
                                               ({"width": 30}, "multiple of 8"), ({"guidance_scale": float("nan")}, "finite")])
def test_generate_rejects_what_the_renderer_rejects(tiny_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_model.generate("a cat", seed=0, **kwargs)
    assert tiny_model.handle is None


def test_generate_accepts_the_largest_seed(tiny_model):
    assert tiny_model.generate("a cat", seed=2**64 - 1, steps=1).params["seed"] == 2**64 - 1


# -- records, metadata, gallery -----------------------------------------------------------------------------------
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's own PNG-info parser


def a1111_parse(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    found = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PARAM.findall(last):
        found[key] = json.loads(value) if value.startswith('"') else value
    return found


#: The keys of a manifest record, as the README lists them ("Output"), for every record.
RECORD_KEYS = {"job", "seed", "path", "status", "error", "error_type", "place", "seconds", "bytes", "request", "run",
               "rank", "finished", "outputs"}


def test_every_manifest_record_has_every_documented_key(tmp_path, monkeypatch, tiny_model):
    """ok, invalid (found before the model loads), refused by the model (before the first image), failed while
    rendering: the same keys, null where there is no value, so that a reader can index every record alike."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = readme[readme.index("`DIR/manifest.jsonl` has one record per image"):]
    documented = documented[:documented.index("Controls that publish")]
    assert all(f"`{key}`" in documented for key in RECORD_KEYS)
    jobs = jsonl(
        tmp_path / "jobs.jsonl", {"model": "tiny-sd", "defaults": {**SMALL, "steps": 1}},
        {"id": "ok", "prompt": "a red car"},
        {"id": "invalid", "prompt": "a red car", "controls": [{"type": "regions", "regions": [{"prompt": "a car", "mask": "no.png"}]}]},
        {"id": "word", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"zebra": 2}}]},
        {"id": "oom", "prompt": "a blue car"},
    )
    generate = tiny_model.generate

    def failing(prompt, **kwargs):
        if prompt == "a blue car":
            raise RuntimeError("CUDA out of memory (a test)")
        return generate(prompt, **kwargs)

    monkeypatch.setattr(tiny_model, "generate", failing)
    out = tmp_path / "out"
    assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 1
    records = {r["job"]: r for r in manifest(out)}
    assert sorted(records) == ["invalid", "ok", "oom", "word"]
    assert all(set(record) == RECORD_KEYS for record in records.values()), {j: sorted(r) for j, r in records.items()}
    assert records["ok"]["status"] == "ok" and records["ok"]["bytes"] > 0 and records["ok"]["seconds"]["total"] > 0
    assert records["ok"]["outputs"] is None  # no control published a file
    assert [records[job]["status"] for job in ("invalid", "word", "oom")] == ["failed"] * 3
    assert all(records[job]["bytes"] is None and records[job]["outputs"] is None for job in ("invalid", "word", "oom"))
    assert records["invalid"]["seconds"] is None and records["invalid"]["request"] is None
    assert records["word"]["seconds"] is None and records["word"]["request"] not in (None, records["ok"]["request"])
    assert records["oom"]["seconds"]["total"] >= 0 and records["oom"]["error_type"] == "RuntimeError"


def test_render_records_metadata_heatmaps_and_gallery(tmp_path, monkeypatch, tiny_model, capsys):
    jobs = jsonl(
        tmp_path / "jobs.jsonl", {"model": "tiny-sd"},
        {"id": "stock", "prompt": "a red car, on a street", "negative_prompt": "blurry", "seeds": [0, 1], **SMALL},
        {"id": "maps", "prompt": "a red car, on a street", "negative_prompt": "blurry", "seeds": [0, 1], **SMALL,
         "controls": [{"type": "test-faults-maps"}]},
        {"id": "other", "prompt": "a blue car", "seeds": [0], **SMALL},
    )
    out = tmp_path / "out"
    assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 0
    records = manifest(out)
    assert all(r["status"] == "ok" and "error_type" in r and r["error_type"] is None and r["place"] is None for r in records)
    # A1111 parameters: prompt, negative prompt, then the settings line, read by A1111's own parser
    with Image.open(out / "maps" / "1.png") as image:
        parsed = a1111_parse(image.text["parameters"])
    assert parsed["Prompt"] == "a red car, on a street" and parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "2" and parsed["Seed"] == "1" and parsed["CFG scale"] == "5.0" and parsed["Model"] == "tiny-sd"
    assert parsed["Sampler"] and parsed["Schedule type"] and parsed["Size"] == "32x32"
    assert parsed["Controls"] == "test-faults-maps"
    # heatmaps carry the parameters of their image
    heatmap = out / "maps" / "1.attention_maps" / "image0_red.png"
    params = read_png_params(heatmap)
    assert params["seed"] == 1 and params["output"] == "attention_maps" and params["file"] == "image0_red.png"
    # the gallery: every image and overlay referenced exists, no external reference, an A/B table for stock vs maps
    page = (out / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert {src for src in parser.images if src.endswith(".png") and "/" in src and "attention_maps" not in src} == \
        {"stock/0.png", "stock/1.png", "maps/0.png", "maps/1.png", "other/0.png"}
    assert "maps/1.attention_maps/image0_red.png" in parser.images
    assert all((out / src).is_file() for src in parser.images)
    assert not re.search(r"(src|href)=\"(https?:|//)", page) and "@import" not in page
    assert "A/B" in page and "a blue car" in page
    assert page.count('<table class="ab">') == 1  # stock vs maps differ only by controls; "other" does not pair
    assert "per image" in page and "generate" in page  # the run's timings


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_parameters_text_quotes_separators():
    text = parameters_text({"prompt": "p", "steps": 2, "seed": 1, "model": "a, b: c", "sampler": "Euler"})
    assert a1111_parse(text)["Model"] == "a, b: c"


def test_render_api_raises_render_error_for_a_file_out(tmp_path, tiny_model):
    jobs = load_job_file(jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "x", **SMALL}))
    (tmp_path / "f").write_text("")
    with pytest.raises(RenderError, match="is a file"):
        render(jobs, RenderOptions(out=str(tmp_path / "f"), progress="none"), model=tiny_model)


@pytest.mark.parametrize("prompt", ["(red:nan)", "(red:inf)", "(red:-inf)", "a (red:NaN) car"])
def test_parse_prompt_rejects_non_finite_weights(prompt):
    with pytest.raises(ConfigError, match="must be a finite number"):
        attnctl.parse_prompt(prompt)


def test_long_prompt_with_a_word_control_raises_only_for_a_word_past_the_limit(tiny_cache):
    from attnctl.errors import TokenError

    pipe = tiny_cache("tiny-sd")
    prompt = "a red car " + "on a long road " * 30 + "with a dog"  # over 77 CLIP tokens; "dog" is past the limit
    call = {"num_inference_steps": 1, "height": 32, "width": 32, "output_type": "latent"}
    with attnctl.apply(pipe, [attnctl.Reweight({"red": 2.0})]):
        pipe(prompt, **call)  # diffusers truncates with a warning; "red" is inside the limit
    with attnctl.apply(pipe, [attnctl.Reweight({"dog": 2.0})]):
        with pytest.raises(TokenError, match="truncates the prompt"):
            pipe(prompt, **call)


def test_attnctl_toy_is_reachable_after_import_attnctl():
    import subprocess
    import sys

    code = "import attnctl; print(attnctl.toy.CALL_DEFAULTS['num_inference_steps'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0 and result.stdout.strip() == "10", result.stderr[-2000:]


def test_progress_log_has_a_sane_first_estimate_and_one_final_line(caplog, monkeypatch):
    from attnctl.render import runner

    clock = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    progress = runner._Progress(10, "log", runner.Ranks())
    with caplog.at_level("INFO", logger="attnctl.render"):
        clock[0] += 40.0  # the first image pays for warm-up
        progress.update(ok=True)
        assert "estimating" in caplog.records[-1].getMessage()  # no ETA from the warm-up image alone
        for _ in range(9):
            clock[0] += 2.0
            progress.update(ok=True)
        progress.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1].startswith("10/10 images") and messages[-1].endswith("done")
    assert sum(m.startswith("10/10") for m in messages) == 1
    assert "0.50 images/s" in messages[-1]  # 9 images in 18 s after the first


# -- review of the batch renderer: output keys, dry-run options, gallery videos, [defaults], --log-file, backend ---
@pytest.mark.parametrize("key", ["png", "PNG", "frames", "mp4", "gif", "maps.png", "x.frames"])
def test_an_output_key_that_names_a_renderer_file_is_refused_before_the_run(key, tmp_path, capsys, monkeypatch, tiny_model):
    maps = {"type": "AttentionMaps", "words": ["cat"], "key": key}
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL, "controls": [maps]},
                 {"id": "ok", "prompt": "a cat", **SMALL, "controls": [{**maps, "key": "maps"}]})
    assert cli.main(["render", str(jobs), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert f"jobs.jsonl:2 (job 'a'): controls[0] (attention-maps): output key {key!r} names <seed>." in out
    assert "a name the renderer uses for its own files" in out and "choose a key other than png, gif, mp4 or frames" in out
    assert "ok  jobs.jsonl:3 job 'ok'" in out and "1 problem(s)" in out
    # the run records the job as failed and writes no folder in the image's place
    target = tmp_path / "out"
    assert run_cli([jobs, "--out", target], tiny_model, monkeypatch) == 1
    record = next(r for r in manifest(target) if r["job"] == "a")
    assert record["status"] == "failed" and "output key" in record["error"]
    assert not (target / "a").exists() and (target / "ok" / "0.maps").is_dir() and (target / "ok" / "0.png").is_file()


@pytest.mark.parametrize("control", [{"type": "tome"}, {"type": "tgate"}, {"type": "agent-attention"}, {"type": "fastattn"}])
def test_a_report_key_that_names_a_renderer_file_is_refused_as_a_reservation(control, tmp_path):
    """A report without save() writes no folder, so its key is refused as reserved, not as a folder it would take."""
    jobs = load_job_file(jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a red cat",
                                                          "controls": [{**control, "key": "gif"}]}))
    (problem,) = jobs.problems
    assert f"controls[0] ({control['type']}): output key 'gif' names <seed>.gif/" in str(problem)
    assert "reserved for every control's key, whether or not its output is saved" in str(problem)
    assert "would be saved" not in str(problem)


def test_two_output_keys_with_one_file_safe_name_are_refused(tmp_path):
    maps = {"type": "AttentionMaps", "words": ["cat"]}
    jobs = load_job_file(jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a red cat", "controls": [
        {**maps, "key": "a/b"}, {**maps, "words": ["red"], "key": "A_b"}]}))
    assert not jobs.jobs
    (problem,) = jobs.problems
    assert ("controls[1] (attention-maps): output key 'A_b' names <seed>.A_b/, as output key 'a/b' "
            "(controls[0] (attention-maps)) does") in str(problem)


def test_output_keys_are_checked_at_the_run_and_the_save_too(tmp_path, tiny_model, monkeypatch):
    import dataclasses

    from attnctl.controls.maps.capture import AttentionMaps
    from attnctl.render import runner

    # an output no control declared (published under a key of its own): refused before anything is written
    with pytest.raises(ConfigError, match="output key 'png' names <seed>.png/"):
        runner.save_outputs({"png": _Heatmaps()}, str(tmp_path), 0, Image.new("RGB", (8, 8)))
    assert os.listdir(tmp_path) == []
    # a job built in code (not read from a file): the run's per-job check refuses it, the other job renders
    jobs = load_job_file(jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a cat", **SMALL},
                               {"id": "b", "prompt": "a cat", **SMALL}))
    bad = dataclasses.replace(jobs.jobs[0], controls=(AttentionMaps(words=("cat",), key="frames"),))
    jobs = dataclasses.replace(jobs, jobs=(bad, jobs.jobs[1]))
    # found before the first image (with the model's checks), and behind it by the run's per-job check
    for attempt, out in enumerate((tmp_path / "out", tmp_path / "out-run-check")):
        if attempt:
            monkeypatch.setattr(runner, "_resolve_jobs", lambda *args: [])
        summary = render(jobs, RenderOptions(out=str(out), progress="none"), model=tiny_model)
        assert summary.rendered == 1 and summary.exit_code == 1
        (failed,) = summary.failed
        assert failed["job"] == "a" and "controls[0] (AttentionMaps): output key 'frames'" in failed["error"]
        assert not (out / "a" / "0.frames").exists() and not (out / "a" / "0.png").exists()


def test_dry_run_and_check_count_and_check_with_the_runs_dtype_device_and_backend(tmp_path, capsys, tiny_model):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a cat", "seeds": [0, 1], **SMALL})
    out = tmp_path / "out"
    assert render(str(jobs), RenderOptions(out=str(out), progress="none"), model=tiny_model).rendered == 2  # float32
    capsys.readouterr()

    def done(*extra: str) -> str:
        assert cli.main(["render", str(jobs), "--dry-run", "--out", str(out), "--model", "tiny-sd", *extra]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "already done" in line)

    assert done("--device", "cpu").endswith("2 image(s) already done, 0 to render")
    assert done("--dtype", "float32").endswith("2 image(s) already done, 0 to render")
    assert done("--dtype", "bfloat16").endswith("0 image(s) already done, 2 to render")
    assert done("--backend", "reference").endswith("0 image(s) already done, 2 to render")
    assert done("--backend", "auto").endswith("2 image(s) already done, 0 to render")
    assert cli.main(["render", str(jobs), "--dry-run", "--out", str(out), "--device", "foo"]) == 2
    assert "problem  --device: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'foo'" in capsys.readouterr().out


def test_changing_the_backend_renders_again_and_the_default_digest_is_unchanged(tmp_path, tiny_cache):
    from attnctl.render.runner import request_digest

    jobs = jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a cat", "seeds": [0], **SMALL})
    out = tmp_path / "out"
    pipe = tiny_cache("tiny-sd")
    first = render(str(jobs), RenderOptions(out=str(out), progress="none"), model=Model(pipe, "tiny-sd"))
    assert first.rendered == 1
    job = load_job_file(jobs).jobs[0]
    assert manifest(out)[0]["request"] == f"{job.request}/tiny-sd/float32" == request_digest(job, "tiny-sd", "float32")
    reference = Model(pipe, "tiny-sd", backend="reference")
    again = render(str(jobs), RenderOptions(out=str(out), progress="none"), model=reference)
    assert (again.rendered, again.skipped) == (1, 0)
    assert read_png_params(out / "a" / "0.png")["backend"] == "reference"
    assert render(str(jobs), RenderOptions(out=str(out), progress="none"), model=reference).skipped == 1


def test_the_gallery_links_the_video_and_shows_no_frames_as_maps(tmp_path):
    from attnctl.render.gallery import render_html

    jobs = load_job_file(jsonl(tmp_path / "jobs.jsonl", {"id": "v", "prompt": "a cat walking", "seeds": [0]}))
    out = tmp_path / "out"
    (out / "v" / "0.frames").mkdir(parents=True)
    (out / "v" / "0.attention_maps").mkdir()
    for path in ("v/0.png", "v/0.frames/0000.png", "v/0.frames/0001.png", "v/0.attention_maps/image0_cat.png"):
        Image.new("RGB", (8, 8)).save(out / path)
    Image.new("RGB", (8, 8)).save(out / "v" / "0.gif")
    record = {"job": "v", "seed": 0, "path": "v/0.png", "status": "ok",
              "outputs": ["v/0.gif", "v/0.frames", "v/0.attention_maps"]}
    page = render_html(str(out), jobs, {("v", 0): record})
    parser = _Images()
    parser.feed(page)
    assert parser.images == ["v/0.png", "v/0.attention_maps/image0_cat.png"]
    assert '<a href="v/0.gif">0.gif</a>' in page


def test_defaults_with_both_seed_and_seeds_is_the_same_error_as_in_a_job(tmp_path, capsys):
    path = tmp_path / "jobs.toml"
    path.write_text('[defaults]\nseed = 7\nseeds = [0, 1]\n[[jobs]]\nid = "a"\nprompt = "x"\n'
                    '[[jobs]]\nid = "own"\nprompt = "y"\nseeds = [2]\n')
    jobs = load_job_file(path)
    assert [str(p) for p in jobs.problems] == ["jobs.toml [defaults]: give either 'seed' or 'seeds', not both (the jobs "
                                               "that take their seeds from [defaults] are not rendered)"]
    assert [(j.id, j.seeds) for j in jobs.jobs] == [("own", (2,))]
    assert [(j.id, j.seeds) for j in jobs.invalid] == [("a", ())]
    assert cli.main(["render", str(path), "--dry-run", "--model", "tiny-sd"]) == 2
    assert "jobs.toml [defaults]: give either 'seed' or 'seeds', not both" in capsys.readouterr().out


def test_a_log_file_that_cannot_be_opened_is_one_line_and_rc_2(tmp_path, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL})
    missing = tmp_path / "no" / "such" / "x.log"
    assert run_cli([jobs, "--out", tmp_path / "out", "--log-file", missing]) == 2
    assert one_line_error(capsys) == f"attnctl render: cannot open --log-file {missing}: No such file or directory"
    assert not (tmp_path / "out").exists()
    logger = logging.getLogger("attnctl")
    assert logger.propagate and not logger.handlers


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_manifest_interval_is_a_finite_number_of_seconds(value, tmp_path, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a cat"})
    with pytest.raises(SystemExit) as raised:
        cli.main(["render", str(jobs), "--dry-run", "--manifest-interval", value])
    assert raised.value.code == 2
    assert f"--manifest-interval: must be a finite number of seconds >= 0 (0: after every image), got {value!r}" in \
        capsys.readouterr().err


def test_params_reads_gif_and_mp4_by_their_suffix(tmp_path, capsys, monkeypatch):
    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
    gif = tmp_path / "0.gif"
    outputs.save_video(frames, str(gif), {"prompt": "a cat", "seed": 0})
    assert cli.main(["params", str(gif)]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(gif), "prompt": "a cat", "seed": 0}
    monkeypatch.setattr(outputs, "read_mp4_params", lambda path: {"prompt": "a dog", "from": "mp4"})
    assert cli.main(["params", str(tmp_path / "0.mp4")]) == 0
    assert json.loads(capsys.readouterr().out)["from"] == "mp4"


def test_a_failed_heatmap_write_names_the_heatmaps_not_the_image(tmp_path, capsys, monkeypatch, tiny_model):
    from attnctl.render import runner

    def no_space(folder, params):  # a failing write() names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "tag_pngs", no_space)
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"},
                 {"id": "maps", "prompt": "a red car", **SMALL, "controls": [{"type": "test-faults-maps"}]})
    out = tmp_path / "out"
    assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 2
    line = one_line_error(capsys)
    assert f"cannot write {out / 'maps' / '0.attention_maps'}: No space left on device" in line, line
    assert not (out / "maps" / "0.png").exists()


# -- review B of the renderer: whole-file problems, JSONL headers, model checks before the first image, --out, env ----
def _no_load(monkeypatch):
    def load(cls, *args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Model, "load", classmethod(load))


@pytest.mark.parametrize("text, expected", [
    ('modle = "tiny-sd"\n[defaults]\nstep = 1\n[[jobs]]\nid = "a"\nprompt = "a cat"\n',
     ["jobs.toml: unknown top-level key 'modle' (did you mean 'model'?)",
      "jobs.toml [defaults]: unknown key 'step' (did you mean 'steps'?)"]),
    # a control under `[[job.controls]]` goes to a top-level `job` table: the job would render without it
    ('[[jobs]]\nid = "pag"\nprompt = "a cat"\n[[job.controls]]\ntype = "PAG"\n',
     ["jobs.toml: unknown top-level key 'job' (did you mean 'jobs'?)"]),
])
def test_whole_file_problems_stop_the_run_before_the_model_loads(text, expected, tmp_path, capsys, monkeypatch):
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    _no_load(monkeypatch)
    out = tmp_path / "out"
    assert run_cli([path, "--out", out], None, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "attnctl render: jobs.toml: " in err and "nothing was rendered" in err, err
    for message in expected:
        assert f"  problem  {message}" in err, err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(ConfigError, match="nothing was rendered"):  # the Python API refuses them too
        render(load_job_file(path), RenderOptions(out=str(out), progress="none"))
    assert not out.exists()


def test_the_summary_says_what_happens_to_the_images_of_invalid_jobs(tmp_path, monkeypatch, tiny_model, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL},
                 {"id": "a", "prompt": "a dog", **SMALL}, {"id": "b", "prompt": "", **SMALL})
    assert run_cli([jobs, "--out", tmp_path / "out"], tiny_model, monkeypatch) == 1
    out = capsys.readouterr().out
    assert ("2 problem(s) in the job file; their jobs are not rendered (their images are recorded as failed where "
            "the job's id and seeds could be read):") in out, out
    assert [(r["job"], r["status"]) for r in manifest(tmp_path / "out")] == [("a", "ok"), ("b", "failed")]


def test_a_jsonl_header_with_a_misspelt_key_stays_the_header(tmp_path, capsys, monkeypatch):
    path = jsonl(tmp_path / "jobs.jsonl", {"modle": "tiny-sd", "defaults": {"steps": 1, "seeds": [5, 6]}},
                 {"id": "a", "prompt": "a red circle"})
    jobs = load_job_file(path)
    assert [(job.id, job.seeds, job.steps) for job in jobs.jobs] == [("a", (5, 6), 1)]  # the defaults are kept
    assert not jobs.invalid  # no phantom job from the header line
    assert [str(p) for p in jobs.file_problems] == [
        "jobs.jsonl:1: unknown header key 'modle' (did you mean 'model'?); allowed: model, dtype, backend, defaults"]
    _no_load(monkeypatch)
    assert run_cli([path, "--out", tmp_path / "out"], None, monkeypatch) == 2
    assert "  problem  jobs.jsonl:1: unknown header key 'modle' (did you mean 'model'?)" in capsys.readouterr().err
    # a first line with a job key is a job, as before
    path = jsonl(tmp_path / "job.jsonl", {"model": "tiny-sd", "id": "a", "prompt": "a cat"})
    assert [p.message.split(" (")[0] for p in load_job_file(path).problems] == ["unknown key 'model'"]


def test_jobs_that_cannot_run_on_the_model_are_reported_first_and_recorded_failed_while_the_others_render(
        tmp_path, capsys, monkeypatch, tiny_model):
    """Issue 8: "a failing job (a bad mask, an unknown word, out of memory) is recorded with its error and the rest go
    on; the exit status is non-zero if any failed". The jobs the model cannot run are found (and logged) before the
    first image, and not checked a second time."""
    jobs = jsonl(
        tmp_path / "jobs.jsonl", {"model": "tiny-sd", "defaults": {**{**SMALL, "steps": 1}, "seeds": [0, 1]}},
        {"id": "option", "prompt": "a red car", "options": {"etaa": 0.0}},
        {"id": "fine", "prompt": "a red car"},
        {"id": "word", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"carr": 2}}]},
    )
    events = []
    generate, check = tiny_model.generate, tiny_model.check
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: events.append("generate") or generate(*a, **k))
    monkeypatch.setattr(tiny_model, "check", lambda *a, **k: events.append("check") or check(*a, **k))

    class Events(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                events.append(record.getMessage())

    handler = Events()
    logging.getLogger("attnctl.render").addHandler(handler)
    out = tmp_path / "out"
    try:
        assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 1
    finally:
        logging.getLogger("attnctl.render").removeHandler(handler)
    (warning,) = [event for event in events if event not in ("check", "generate")]
    assert warning.startswith("2 job(s) cannot run on tiny-sd; their images will be recorded as failed"), events
    assert "  problem  jobs.jsonl:2 (job 'option'): ConfigError: " in warning and "(did you mean 'eta' for 'etaa'?)" in warning
    assert "  problem  jobs.jsonl:4 (job 'word'): TokenError: " in warning and "'carr'" in warning
    # reported before the first image; then only the job that resolved is checked (the run's per-job check) and rendered
    assert events[events.index(warning) + 1:] == ["check", "generate", "generate"], events
    records = {(r["job"], r["seed"]): r for r in manifest(out)}
    assert len(records) == 6 and sorted(p.name for p in out.glob("*/*.png")) == ["0.png", "1.png"]
    assert all(records[("fine", seed)]["status"] == "ok" for seed in (0, 1))
    for job, kind, words in (("option", "ConfigError", "etaa"), ("word", "TokenError", "'carr'")):
        for seed in (0, 1):
            record = records[(job, seed)]
            assert record["status"] == "failed" and record["error_type"] == kind and words in record["error"], record
            assert record["error"].startswith(f"{kind}: ") and record["place"] == f"jobs.jsonl:{2 if job == 'option' else 4}"
    printed = capsys.readouterr().out
    assert "6 image(s): 2 rendered, 0 skipped (already done), 4 failed" in printed and "job 'word' seed 1: TokenError" in printed
    assert tiny_model.handle is None


def test_running_out_of_memory_while_a_job_is_checked_does_not_fail_its_images(tmp_path, monkeypatch, tiny_model):
    """Out of memory is not the job's fault: a check that runs out of it leaves the job to its images, each of which
    renders (or fails) on its own, as an out-of-memory error while an image renders fails that image only."""
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd", "defaults": {**SMALL, "steps": 1, "seeds": [0, 1]}},
                 {"id": "big", "prompt": "a red car", "controls": [{"type": "reweight", "weights": {"car": 2}}]})
    resolve, calls = tiny_model.resolve, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return resolve(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "resolve", out_of_memory_once)
    assert run_cli([jobs, "--out", tmp_path / "out"], tiny_model, monkeypatch) == 0
    assert [(r["job"], r["status"]) for r in manifest(tmp_path / "out")] == [("big", "ok"), ("big", "ok")]


def test_dry_run_reports_an_out_the_run_could_not_write(tmp_path, capsys):
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL})
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.html").mkdir()
    for out, message in [(taken, f"--out {taken} is a file, not a folder"),
                         (taken / "out", f"cannot create the output folder {taken / 'out'}: {taken} is a file"),
                         (tmp_path / "old", f"{tmp_path / 'old' / 'index.html'} is a folder where the renderer writes")]:
        assert cli.main(["render", str(jobs), "--dry-run", "--out", str(out)]) == 2
        text = capsys.readouterr().out
        assert f"  problem  --out: {message}" in text and "1 problem(s)" in text, text
    assert cli.main(["render", str(jobs), "--dry-run", "--out", str(tmp_path / "new" / "out")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("no problems") and not (tmp_path / "new").exists()


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set: start several processes with "
                          "accelerate launch or torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "WORLD_SIZE=2 but MASTER_PORT is not set"),
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not a number of processes >= 1"),
])
def test_a_stray_launcher_environment_is_one_line_and_rc_2(env, message, tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _no_load(monkeypatch)
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd"}, {"id": "a", "prompt": "a cat", **SMALL})
    assert run_cli([jobs, "--out", tmp_path / "out"], None, monkeypatch) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize("value", ["nan", "inf", "[1.0, -inf]"])
def test_pipeline_options_must_be_finite(value, tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text(f'[[jobs]]\nid = "a"\nprompt = "a cat"\noptions = {{ eta = {value} }}\n')
    jobs = load_job_file(path)
    assert not jobs.jobs and "options.eta must be a finite number" in str(jobs.problems[0])


# --- sizes a Flux-like pipeline would resize -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-qwenimage"])
def test_a_size_the_pipeline_would_resize_is_refused(name):
    """Flux-like pipelines pack 2x2 latent pixels per token and resize a side that is not a multiple of
    2 x vae_scale_factor with only a logged warning (40 -> 32 at factor 8): the renderer refuses it before anything runs."""
    model = Model.load(name, device="cpu")
    model.pipe.vae_scale_factor = 8  # a real checkpoint's factor (the tiny VAE's is 2)
    with pytest.raises(ConfigError, match=r"width must be a multiple of 16 for \w+Pipeline \(it would resize 40 to 32 px\), got 40"):
        model.resolve("a cat", width=40, height=48)
    model.pipe.vae_scale_factor = 2
    model.resolve("a cat", width=40, height=48)  # a multiple of 4 at the tiny factor


# --- review r3 of the renderer: option values under --check, a failed image's side files, a job's folder in the way ---
def test_check_tries_the_option_values_of_a_job_without_controls(tmp_path, capsys, monkeypatch, tiny_model):
    """`Model.resolve` raises "what `generate` would raise" for the call's options, with or without controls: a value
    the pipeline refuses (diffusers' TypeError for clip_skip="x") is a ConfigError naming the option and what the
    pipeline takes for it, found by --check and before the run's first image; `generate` raises the same."""
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd", "defaults": {**SMALL, "steps": 1}},
                 {"id": "plain", "prompt": "a red car", "options": {"clip_skip": "x"}},
                 {"id": "controlled", "prompt": "a red car", "options": {"clip_skip": "x"},
                  "controls": [{"type": "reweight", "weights": {"red": 2}}]},
                 {"id": "fine", "prompt": "a red car", "options": {"eta": 0.0}})
    generated = []
    generate = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: generated.append(1) or generate(*a, **k))
    assert run_cli([jobs, "--check"], tiny_model, monkeypatch) == 2
    out = capsys.readouterr().out
    for job in ("plain", "controlled"):
        line = [line for line in out.splitlines() if f"job {job!r}" in line][-1]  # the dry run's line first
        assert line.strip().startswith("problem") and "ConfigError: " in line, out
        assert "clip_skip='x'" in line and "clip_skip: int | None = None" in line and "TypeError" in line, line
    assert "job 'fine' resolves on tiny-sd" in out and generated == [] and tiny_model.handle is None
    # the run records the job's images as failed with that error, before the first image; the others render
    out_folder = tmp_path / "out"
    assert run_cli([jobs, "--out", out_folder], tiny_model, monkeypatch) == 1
    records = {r["job"]: r for r in manifest(out_folder)}
    assert records["plain"]["error_type"] == "ConfigError" and "clip_skip='x'" in records["plain"]["error"]
    assert records["fine"]["status"] == "ok" and generated == [1]
    # the Python API: the original error is the cause, and the pipeline is stock again
    with pytest.raises(ConfigError, match=r"call with the options clip_skip='x' failed: TypeError: .*clip_skip: ") as raised:
        generate("a red car", steps=1, clip_skip="x", controls=[attnctl.Reweight(weights={"red": 2.0})])
    assert isinstance(raised.value.__cause__, TypeError) and tiny_model.handle is None
    # running out of memory or a device fault is not a value's fault: raised as it is, as is any error of a call
    # without options
    for message in ("CUDA out of memory. Tried to allocate 20.00 MiB", "CUDA error: an illegal memory access was encountered"):

        def fault(*_, message=message):
            raise RuntimeError(message)

        hook = tiny_model.pipe.unet.register_forward_pre_hook(fault)
        try:
            for options in ({"eta": 0.0}, {}):
                with pytest.raises(RuntimeError, match="CUDA"):
                    generate("a red car", steps=1, **options)
        finally:
            hook.remove()


@pytest.mark.parametrize("failure", [ValueError("simulated encoder failure"), OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_image_leaves_none_of_its_side_files(failure, tmp_path, monkeypatch, tiny_model):
    """Resuming counts an image done by its PNG, and a failed image's record lists no outputs: its maps folder, video
    and frames folder are not left at their final paths when its PNG cannot be saved."""
    from attnctl.render import runner
    from attnctl.render.generate import Generation

    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]

    def fake_generate(prompt, *, seed, **kwargs):  # a video with attention maps, without running the pipeline
        return Generation(frames[0], {"prompt": prompt, "seed": seed, "frames": 3, "fps": 16},
                          {"attention_maps": _Heatmaps()}, 0.0, frames)

    save_png = runner.save_png

    def failing_png(image, path, params, **kwargs):
        if params["seed"] == 0:
            raise failure
        return save_png(image, path, params, **kwargs)

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    monkeypatch.setattr(outputs, "video_format", lambda: "gif")
    monkeypatch.setattr(runner, "save_png", failing_png)
    jobs = jsonl(tmp_path / "jobs.jsonl", {"id": "a", "prompt": "a red car", "seeds": [1, 0, 2], **SMALL})
    out = tmp_path / "out"
    if isinstance(failure, OSError):  # a failed write stops the run
        with pytest.raises(RenderError, match="No space left on device"):
            render(str(jobs), RenderOptions(out=str(out), progress="none"), model=tiny_model)
    else:
        assert render(str(jobs), RenderOptions(out=str(out), progress="none"), model=tiny_model).exit_code == 1
    assert sorted(os.listdir(out / "a")) == ["1.attention_maps", "1.frames", "1.gif", "1.png"] + (
        [] if isinstance(failure, OSError) else ["2.attention_maps", "2.frames", "2.gif", "2.png"])
    records = {r["seed"]: r for r in manifest(out)}
    assert records[0]["status"] == "failed" and records[0]["outputs"] is None
    assert sorted(records[1]["outputs"]) == ["a/1.attention_maps", "a/1.frames", "a/1.gif"]


def test_a_file_where_a_job_folder_goes_is_reported_by_the_dry_run_and_fails_that_job_only(tmp_path, capsys, monkeypatch,
                                                                                          tiny_model):
    """A file at OUT/<job id> (or a folder at OUT/<job id>/<seed>.png) is named, with what to move, by --dry-run
    and at the run, where it fails that job's (that seed's) images and not the others; it is not the model's fault."""
    jobs = jsonl(tmp_path / "jobs.jsonl", {"model": "tiny-sd", "defaults": {**SMALL, "steps": 1, "seeds": [0, 1]}},
                 {"id": "a", "prompt": "a red car"}, {"id": "b", "prompt": "a red car"}, {"id": "c", "prompt": "a red car"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("not a folder")
    (out / "b" / "0.png").mkdir(parents=True)
    file_problem = f"{out / 'a'} is a file where job 'a' writes its images; move it away or rename the job"
    folder_problem = f"{out / 'b' / '0.png'} is a folder where job 'b' writes its image of seed 0; move it away"
    assert cli.main(["render", str(jobs), "--dry-run", "--out", str(out)]) == 2
    text = capsys.readouterr().out
    assert f"  problem  jobs.jsonl:2 (job 'a'): {file_problem}" in text and "2 problem(s)" in text, text
    assert f"  problem  jobs.jsonl:3 (job 'b'): {folder_problem}" in text
    assert run_cli([jobs, "--out", out], tiny_model, monkeypatch) == 1
    logged = capsys.readouterr().err
    assert f"job 'a' (jobs.jsonl:2) cannot be rendered: RenderError: {file_problem}" in logged and "cannot run on" not in logged
    records = {(r["job"], r["seed"]): r for r in manifest(out)}
    assert {key for key, r in records.items() if r["status"] == "ok"} == {("b", 1), ("c", 0), ("c", 1)}
    assert records[("a", 0)]["error"] == records[("a", 1)]["error"] == f"RenderError: {file_problem}"
    assert records[("b", 0)]["error"] == f"RenderError: {folder_problem}"
    assert (out / "b" / "0.png").is_dir() and not list((out / "b" / "0.png").iterdir())
