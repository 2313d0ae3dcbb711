"""Job files of `attnctl render`: TOML or JSONL, read as data and validated with the place of every problem.

A job file is data: it is parsed with `tomllib` / `json`, never evaluated, and nothing in it is unpickled.
Every control is built with `attnctl.Control.from_dict`, so constructing it runs its own validation.

TOML::

    model = "tiny-sd"                 # optional: the model this file is written for (--model overrides)
    dtype = "float32"                 # optional: auto | float32 | float16 | bfloat16 (--dtype overrides)

    [defaults]                        # optional: values every job starts from (a job's own key replaces it)
    steps = 20
    seeds = [0, 1, 2, 3]

    [[jobs]]
    id = "cat"                        # the output folder: DIR/cat/<seed>.png
    prompt = "a photo of a cat"
    negative_prompt = "blurry"
    guidance_scale = 7.5
    width = 512
    height = 512
    controls = [{ type = "reweight", weights = { cat = 1.5 } }]
    options = { clip_skip = 1 }        # extra keyword arguments of the pipeline call

JSONL: one job object per line. An optional first line with a key among `model`, `dtype`, `backend`,
`defaults` (or a near miss, `modle`) and no job key is the file's header. Blank lines and lines starting with `#` are ignored.
JSON (`.json`): one object with the layout of the TOML file (`{"defaults": {...}, "jobs": [...]}`).

Seeds are a list of integers, one integer (`seed = 3`), or a range `{ start = 0, count = 100 }`.

File paths inside controls (region masks, saved plans, reference images) are resolved relative to the job file's
folder: a string is a path when its key is one of `PATH_KEYS` or ends with one of `PATH_SUFFIXES`, at any depth
(`regions = [{ prompt = "...", mask = "masks/left.png" }]`). Mask and image paths must name readable images.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..control import Control, canonical_type_name, registered_controls
from ..errors import AttnctlError, ConfigError
from ..validation import SEED_MAX
from .outputs import output_key_problems

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HEADER_KEYS: tuple[str, ...] = ("model", "dtype", "backend", "defaults")
JOB_KEYS: tuple[str, ...] = (
    "id", "prompt", "negative_prompt", "seeds", "seed", "steps", "width", "height", "guidance_scale", "controls", "options",
)
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: Keys whose string values (at any depth of a control) are file paths, resolved against the job file's folder.
PATH_KEYS: tuple[str, ...] = ("mask", "masks", "plan", "path", "image", "region")  # image, region: ReferenceAttention's
PATH_SUFFIXES: tuple[str, ...] = ("_mask", "_masks", "_path", "_file")
#: Keyword arguments of the pipeline call the renderer sets itself (or that cannot come from a data file).
RESERVED_OPTIONS: tuple[str, ...] = (
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "generator", "output_type",
    "num_images_per_prompt", "latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds", "callback", "callback_steps", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs", "return_dict", "cross_attention_kwargs", "joint_attention_kwargs",
    "attention_kwargs", "ip_adapter_image", "ip_adapter_image_embeds",
)
#: The largest seed: `Model.generate`'s (what `torch.Generator.manual_seed` takes), so that a job file and the Python
#: API accept the same seeds (issue #18). JSON carries such integers; TOML's spec stops at 2**63 - 1, but Python's
#: `tomllib` reads larger ones, and the bound is the same whatever the format.
MAX_SEED = SEED_MAX
#: The most seeds (images) one job may have: a bound that keeps a typo (`count = 10**12`) a clear error.
MAX_SEEDS_PER_JOB = 100_000
#: Names in the output folder the renderer writes itself (compared case-insensitively): never job ids.
RESERVED_IDS: tuple[str, ...] = ("manifest.jsonl", ".attnctl", "index.html")
MAX_ID_LENGTH = 100
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Problem:
    """Something wrong in a job file, with its place (`file:line`, and the job id when known)."""

    place: str
    message: str
    job: str | None = None

    def __str__(self) -> str:
        return f"{self.place}: {self.message}"


@dataclass(frozen=True)
class Job:
    """One validated job: a prompt, its settings and controls, rendered once per seed."""

    id: str
    prompt: str
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    controls: tuple[Control, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    place: str = ""
    index: int = 0
    #: Digest of the request as written (prompt, settings, controls, options; not the seed): resume re-renders
    #: an image whose request changed since it was recorded.
    request: str = ""

    def image_path(self, seed: int) -> str:
        """The image's path relative to the output folder (`<job-id>/<seed>.png`)."""
        return f"{self.id}/{seed}.png"


@dataclass(frozen=True)
class InvalidJob:
    """A job that could not be validated; its images are recorded as failed when its id and seeds are known."""

    id: str | None
    seeds: tuple[int, ...]
    place: str
    problems: tuple[Problem, ...]
    index: int = 0


@dataclass(frozen=True)
class JobFile:
    path: str
    format: str  # "toml" | "jsonl" | "json"
    jobs: tuple[Job, ...]
    invalid: tuple[InvalidJob, ...] = ()
    problems: tuple[Problem, ...] = ()  # every problem, in file order (those of invalid jobs included)
    model: str | None = None
    dtype: str | None = None
    backend: str | None = None
    #: The problems of the file as a whole (unknown top-level or header keys, the header's values, unknown keys in
    #: [defaults], a misplaced header, no jobs), also in `problems`: they change what every job asks for, so the
    #: renderer refuses to start while there is one.
    file_problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def images(self) -> int:
        return sum(len(job.seeds) for job in self.jobs)


def load_job_file(path: str | os.PathLike[str]) -> JobFile:
    """Read and validate a job file (`.toml`, or `.jsonl` / `.json`). File-level errors raise ConfigError;
    problems of single jobs are collected in `JobFile.problems` (those jobs go to `JobFile.invalid`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read job file {path!r}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"job file {path!r} is not UTF-8 text: {error}") from error
    lowered = path.lower()
    if lowered.endswith(".toml"):
        return _parse_toml(path, text)
    if lowered.endswith((".jsonl", ".ndjson")):
        return _parse_jsonl(path, text)
    if lowered.endswith(".json"):
        return _parse_json(path, text)
    raise ConfigError(f"job file {path!r}: unknown format; use a .toml, .jsonl or .json file")


# -- the formats --------------------------------------------------------------------------------------------------
def _parse_toml(path: str, text: str) -> JobFile:
    name = os.path.basename(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{name}: not valid TOML: {error}") from error
    return _parse_document(path, text, data)


def _parse_json(path: str, text: str) -> JobFile:
    """A .json file: one document with the layout of the TOML files (`model`, `defaults`, `jobs`: [...])."""
    name = os.path.basename(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: a .json job file holds one object with 'jobs' (and optional 'model', 'defaults'); "
                          "for one job per line use .jsonl")
    return _parse_document(path, text, data)


def _parse_document(path: str, text: str, data: dict[str, Any]) -> JobFile:
    name = os.path.basename(path)
    fmt = "json" if path.lower().endswith(".json") else "toml"
    file_problems: list[Problem] = []
    unknown = [key for key in data if key not in HEADER_KEYS + ("jobs",)]
    for key in unknown:  # `[[job.controls]]` for `[[jobs.controls]]` lands here: a control that would be dropped
        file_problems.append(Problem(name, f"unknown top-level key {key!r}{_suggest(key, HEADER_KEYS + ('jobs',))}; "
                                           f"allowed: {', '.join(HEADER_KEYS + ('jobs',))}"))
    jobs = data.get("jobs", [])
    if not isinstance(jobs, list):
        raise ConfigError(f"{name}: 'jobs' must be an array of tables ([[jobs]] sections), got {type(jobs).__name__}")
    lines = _toml_job_lines(text, len(jobs)) if fmt == "toml" else None
    places = [f"{name}:{lines[i]}" if lines else f"{name} jobs[{i}]" for i in range(len(jobs))]
    header = {key: data[key] for key in HEADER_KEYS if key in data}
    return _build(path, fmt, header, name, list(zip(places, jobs)), [], file_problems)


def _toml_job_lines(text: str, count: int) -> list[int] | None:
    """Line numbers of the `[[jobs]]` headers, when every job is written as one (not as an inline array)."""
    found = [number for number, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*jobs\s*\]\]", line)]
    return found if len(found) == count else None


def _parse_jsonl(path: str, text: str) -> JobFile:
    name = os.path.basename(path)
    problems: list[Problem] = []
    file_problems: list[Problem] = []
    header: dict[str, Any] = {}
    entries: list[tuple[str, Any]] = []
    header_place = name
    first = True
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        place = f"{name}:{number}"
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as error:
            problems.append(Problem(place, f"not valid JSON: {error.msg} (column {error.colno})"))
            first = False
            continue
        if first and _is_header(value):
            # unknown keys of a header line (`modle`) are reported, not the cause of reading it as a job, which would
            # lose its defaults for every job
            for key in value:
                if key not in HEADER_KEYS:
                    file_problems.append(Problem(place, f"unknown header key {key!r}{_suggest(key, HEADER_KEYS)}; "
                                                        f"allowed: {', '.join(HEADER_KEYS)}"))
            header, header_place = {key: item for key, item in value.items() if key in HEADER_KEYS}, place
            first = False
            continue
        if isinstance(value, dict) and value and all(key in HEADER_KEYS for key in value):
            file_problems.append(Problem(place, "a header line (model / dtype / backend / defaults) must be the first line"))
            first = False
            continue
        first = False
        entries.append((place, value))
    return _build(path, "jsonl", header, header_place, entries, problems, file_problems)


def _is_header(value: Any) -> bool:
    """Whether the first line of a JSONL file is its header: an object with no job key and a header key, or a key
    close to one (`modle`)."""
    if not isinstance(value, dict) or not value or any(key in JOB_KEYS for key in value):
        return False
    return any(key in HEADER_KEYS or difflib.get_close_matches(str(key), HEADER_KEYS, n=1) for key in value)


# -- validation ---------------------------------------------------------------------------------------------------
def _build(path: str, fmt: str, header: dict[str, Any], header_place: str, entries: list[tuple[str, Any]],
           problems: list[Problem], file_problems: list[Problem]) -> JobFile:
    """`problems`: those found so far of single lines (not valid JSON); `file_problems`: of the file as a whole
    (JobFile.file_problems), to which the header's and [defaults]' are added here."""
    base = os.path.dirname(os.path.abspath(path))
    model = _header_string(header, "model", header_place, file_problems)
    dtype = _header_string(header, "dtype", header_place, file_problems)
    if dtype is not None and dtype not in DTYPES:
        file_problems.append(Problem(header_place, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"))
        dtype = None
    backend = _header_string(header, "backend", header_place, file_problems)
    if backend is not None:
        from ..kernels import validate_backend

        try:
            validate_backend(backend)
        except AttnctlError as error:
            file_problems.append(Problem(header_place, str(error)))
            backend = None
    defaults = header.get("defaults", {})
    defaults_place = f"{header_place} [defaults]"
    if not isinstance(defaults, dict):
        file_problems.append(Problem(defaults_place, f"defaults must be a table, got {type(defaults).__name__}"))
        defaults = {}
    for key in defaults:
        if key not in JOB_KEYS or key == "id":
            allowed = tuple(k for k in JOB_KEYS if k != "id")
            file_problems.append(Problem(defaults_place, f"unknown key {key!r}{_suggest(key, allowed)}; allowed: {', '.join(allowed)}"))
    defaults = {key: value for key, value in defaults.items() if key in JOB_KEYS and key != "id"}
    seeds_conflict = None  # as inside a job: which of the two was meant is not guessed
    if "seed" in defaults and "seeds" in defaults:
        seeds_conflict = Problem(defaults_place, "give either 'seed' or 'seeds', not both (the jobs that take their "
                                                 "seeds from [defaults] are not rendered)")
        problems.append(seeds_conflict)

    if not entries:
        file_problems.append(Problem(os.path.basename(path), "no jobs in this file"))
    problems[:0] = file_problems
    jobs: list[Job] = []
    invalid: list[InvalidJob] = []
    seen: dict[str, str] = {}
    for index, (place, entry) in enumerate(entries):
        job, job_problems, job_id, seeds = _job(entry, defaults, index, place, base)
        inherits = seeds_conflict is not None and isinstance(entry, dict) and "seed" not in entry and "seeds" not in entry
        if job_id is not None:
            folder = job_id.lower()  # one folder on case-insensitive file systems (macOS, Windows)
            if folder in seen:
                job_problems.append(Problem(_where(place, job_id), f"duplicate job id {job_id!r} (first at {seen[folder]})", job_id))
                job_id = None  # its images belong to the first job of that id: record nothing under it
            else:
                seen[folder] = place
        if job_problems or job is None or inherits:
            # a job whose seeds are unknown (the defaults' conflict) records nothing: no seeds to record under
            known = seeds if job_id is not None and not inherits else ()
            invalid.append(InvalidJob(job_id, known, place, tuple(job_problems) + ((seeds_conflict,) if inherits else ()),
                                      index))
            problems.extend(job_problems)  # the defaults' conflict is listed once, above
        else:
            jobs.append(job)
    return JobFile(path=os.path.abspath(path), format=fmt, jobs=tuple(jobs), invalid=tuple(invalid),
                   problems=tuple(problems), model=model, dtype=dtype, backend=backend, file_problems=tuple(file_problems))


def _header_string(header: dict[str, Any], key: str, place: str, problems: list[Problem]) -> str | None:
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append(Problem(place, f"{key} must be a non-empty string, got {value!r}"))
        return None
    return value


def _where(place: str, job_id: str | None) -> str:
    return f"{place} (job {job_id!r})" if job_id else place


def _job(entry: Any, defaults: dict[str, Any], index: int, place: str, base: str
         ) -> tuple[Job | None, list[Problem], str | None, tuple[int, ...]]:
    problems: list[Problem] = []
    if not isinstance(entry, dict):
        return None, [Problem(place, f"a job must be an object/table, got {type(entry).__name__}")], None, ()
    raw_id = entry.get("id", f"job-{index:04d}")
    job_id, id_error = check_job_id(raw_id)
    where = _where(place, job_id if id_error is None else None)

    def problem(message: str) -> None:
        problems.append(Problem(where, message, job_id))

    if id_error:
        problem(id_error)
    for key in entry:
        if key not in JOB_KEYS:
            hint = " (one model per run: use the file's top-level `model` or --model)" if key == "model" else ""
            problem(f"unknown key {key!r}{_suggest(key, JOB_KEYS)}{hint}; allowed: {', '.join(JOB_KEYS)}")
    values = {**defaults, **{key: value for key, value in entry.items() if key in JOB_KEYS}}
    if "seed" in entry and "seeds" in entry:
        problem("give either 'seed' or 'seeds', not both")
    if "seed" in entry or "seeds" in entry:  # the job's own seed(s) replace the defaults' either way
        values.pop("seeds" if "seed" in entry else "seed", None)

    seeds = _seeds(values, problem)
    prompt = values.get("prompt")
    if prompt is None:
        problem("missing 'prompt'")
    elif not isinstance(prompt, str) or not prompt.strip():
        problem(f"prompt must be a non-empty string, got {prompt!r}")
    negative = values.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        problem(f"negative_prompt must be a string, got {negative!r}")
    steps = _checked(values, "steps", problem, lambda v, n: _integer(v, n, minimum=1))
    width = _checked(values, "width", problem, _size)
    height = _checked(values, "height", problem, _size)
    guidance = _checked(values, "guidance_scale", problem, lambda v, n: _number(v, n, minimum=0.0))
    options = _options(values.get("options", {}), problem)
    raw_controls = values.get("controls", [])
    controls: list[Control] = []
    requested: list[Any] = []  # the controls as parsed, for the request digest
    if not isinstance(raw_controls, list):
        problem(f"controls must be a list of control tables, got {type(raw_controls).__name__}")
        raw_controls = []
    published: list[tuple[Any, str]] = []  # (output key, label) of the controls that publish into handle.outputs
    for position, raw in enumerate(raw_controls):
        control, written = _control(raw, position, base, problem)
        if control is not None:
            controls.append(control)
            requested.append(_files_as_contents(control.to_dict()))
            key = getattr(control, "output_key", None)
            if key is not None:
                published.append((key, f"controls[{position}] ({written['type']})"))
    # what a control publishes with save() goes to DIR/<job-id>/<seed>.<key>/, beside the renderer's own files
    for message in output_key_problems(published):
        problem(message)
    if controls:  # cross-image controls whose rows one image per call cannot give: refused at --dry-run already
        from .generate import reference_row_needed

        try:
            reference_row_needed(tuple(controls))
        except ConfigError as error:
            problem(f"controls: {error}")

    valid_id = job_id if id_error is None else None
    if problems:
        return None, problems, valid_id, seeds
    request = _digest({
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "width": width, "height": height,
        "guidance_scale": guidance, "options": options,
        # in the controls' own order (dataclass fields, mappings as given): a later P2P word window overrides an
        # earlier one, so sorting their keys would give two different requests one digest
        "controls": json.dumps(requested, ensure_ascii=True, separators=(",", ":"), default=str),
    })
    job = Job(id=job_id, prompt=prompt, seeds=seeds, negative_prompt=negative, steps=steps, width=width, height=height,
              guidance_scale=guidance, controls=tuple(controls), options=options, place=place, index=index, request=request)
    return job, problems, valid_id, seeds


def check_job_id(value: Any) -> tuple[str, str | None]:
    """The folder name of a job id and an error message (None when usable).

    Ids that could leave the output folder are rejected: path separators, `..`, a leading dot, absolute
    paths. Other characters outside `[A-Za-z0-9._-]` are replaced by `_` (ids that then collide are reported
    as duplicates)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return str(value), f"id must be a string, got {value!r}"
    text = str(value)
    if not text.strip():
        return text, f"id must be non-empty, got {value!r}"
    if "/" in text or "\\" in text or ".." in text or text.startswith(".") or os.path.isabs(text) or "\x00" in text:
        return text, (f"id {text!r} is not allowed: job ids name a folder inside the output folder, so they cannot "
                      "contain '/', '\\' or '..', or start with '.'")
    if text.strip().lower() in RESERVED_IDS:
        return text, (f"id {text!r} is reserved: the renderer writes {', '.join(RESERVED_IDS)} in the output folder "
                      "itself; choose another id")
    if len(text) > MAX_ID_LENGTH:
        return text, f"id {text[:20]!r}... is longer than {MAX_ID_LENGTH} characters"
    return _ID_CHARS.sub("_", text.strip()), None


def _seeds(values: dict[str, Any], problem) -> tuple[int, ...]:
    if "seed" in values:
        raw: Any = [values["seed"]]
    else:
        raw = values.get("seeds", [0])
    if isinstance(raw, dict):
        extra = sorted(set(raw) - {"start", "count"})
        start, count = raw.get("start", 0), raw.get("count")
        if extra or not _is_int(start) or not _is_int(count) or count < 1 or start < 0:
            problem(f"seeds as a table must be {{start = S, count = N}} with integers S >= 0 and N >= 1, got {raw!r}")
            return ()
        if count > MAX_SEEDS_PER_JOB:
            problem(f"seeds count {count} is more than {MAX_SEEDS_PER_JOB} images in one job; split it into several "
                    "jobs (seeds = {start, count} with count <= " f"{MAX_SEEDS_PER_JOB})")
            return ()
        if start + count - 1 > MAX_SEED:
            problem(f"seeds {{start = {start}, count = {count}}} go beyond the largest seed 2**64 - 1")
            return ()
        raw = range(start, start + count)  # distinct by construction
        return tuple(raw)
    if _is_int(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        problem(f"seeds must be a non-empty list of integers, one integer or {{start, count}}, got {raw!r}")
        return ()
    if len(raw) > MAX_SEEDS_PER_JOB:
        problem(f"{len(raw)} seeds is more than {MAX_SEEDS_PER_JOB} images in one job; split it into several jobs")
        return ()
    seeds: list[int] = []
    seen: set[int] = set()  # O(n): a list membership test made 100000 seeds take over a minute
    for seed in raw:
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            problem(f"seed {seed!r} is not an integer in [0, 2**64 - 1]")
            return ()
        if seed in seen:
            problem(f"seed {seed} appears twice")
            return ()
        seen.add(seed)
        seeds.append(seed)
    return tuple(seeds)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked(values: dict[str, Any], key: str, problem, check) -> Any:
    value = values.get(key)
    if value is None:
        return None
    try:
        return check(value, key)
    except ConfigError as error:
        problem(str(error))
        return None


def _integer(value: Any, name: str, *, minimum: int) -> int:
    from ..validation import integer

    return integer(value, name, minimum=minimum)


def _number(value: Any, name: str, *, minimum: float) -> float:
    from ..validation import number

    return number(value, name, minimum=minimum)


def _size(value: Any, name: str) -> int:
    value = _integer(value, name, minimum=8)
    if value % 8:
        raise ConfigError(f"{name} must be a multiple of 8, got {value}")
    return value


def _options(value: Any, problem) -> dict[str, Any]:
    if not isinstance(value, dict):
        problem(f"options must be a table of pipeline call arguments, got {type(value).__name__}")
        return {}
    options: dict[str, Any] = {}
    for key, item in value.items():
        if key in RESERVED_OPTIONS:
            problem(f"options.{key} is set by the renderer or cannot come from a job file; "
                    f"use the job's own keys ({', '.join(k for k in JOB_KEYS if k not in ('id', 'controls', 'options'))})")
        elif not _plain_value(item):
            problem(f"options.{key} must be a string, number, boolean or a list of them, got {item!r}")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in (item if isinstance(item, list) else [item])):
            problem(f"options.{key} must be a finite number (TOML and JSON allow nan and inf), got {item!r}")
        else:
            options[key] = item
    return options


def _plain_value(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)


# -- controls -----------------------------------------------------------------------------------------------------
def _control(raw: Any, position: int, base: str, problem) -> tuple[Control | None, Any]:
    label = f"controls[{position}]"
    if not isinstance(raw, dict):
        problem(f"{label} must be a table with a 'type' key, got {raw!r}")
        return None, raw
    if "type" not in raw or not isinstance(raw["type"], str):
        problem(f"{label} needs a 'type' (one of: {', '.join(sorted(registered_controls())) or 'none registered'})")
        return None, raw
    kind = canonical_type_name(raw["type"])
    written = {**raw, "type": kind}
    label = f"{label} ({kind})"
    registry = registered_controls()
    if kind not in registry:
        known = ", ".join(sorted(registry)) or "none in this build"
        problem(f"{label}: unknown control type {kind!r}{_suggest(kind, tuple(registry))}; registered: {known}")
        return None, written
    resolved, path_errors = resolve_paths(written, base)
    for message in path_errors:
        problem(f"{label}: {message}")
    if path_errors:
        return None, written
    if kind == "fastattn" and isinstance(resolved.get("plan"), str):
        # `plan = "plan.json"`: a file saved by FastAttnPlan.save, read with its own loader (the request digest
        # holds the plan itself)
        from ..controls.fastattn import FastAttnPlan

        try:
            loaded = FastAttnPlan.load(resolved["plan"]).to_dict()
        except (AttnctlError, OSError, TypeError, ValueError) as error:
            problem(f"{label}: plan file {written['plan']!r}: {error}")
            return None, written
        resolved = {**resolved, "plan": loaded}
    try:
        control = Control.from_dict(resolved)
    except (AttnctlError, TypeError, ValueError) as error:
        problem(f"{label}: {error}")
        return None, written
    return control, written


def is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


def resolve_paths(value: Any, base: str, key: str = "") -> tuple[Any, list[str]]:
    """A copy of `value` with the file paths under path keys made absolute against `base`, and the
    problems found (missing files, masks that are not images)."""
    errors: list[str] = []
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], found = resolve_paths(v, base, str(k))
            errors.extend(found)
        return out, errors
    if isinstance(value, list):
        out_list = []
        for v in value:
            item, found = resolve_paths(v, base, key)
            out_list.append(item)
            errors.extend(found)
        return out_list, errors
    if isinstance(value, str) and key and is_path_key(key):
        resolved = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        if not os.path.isfile(resolved):
            errors.append(f"{key} file {value!r} not found (looked for {resolved})")
        elif "mask" in key or key == "image":
            error = _image_error(resolved)
            if error:
                errors.append(f"{key} file {value!r} is not a readable image: {error}")
        return resolved, errors
    return value, errors


def _files_as_contents(value: Any, key: str = "") -> Any:
    """`value` (a control's `to_dict()`, its paths resolved by `resolve_paths`) with every file under a path key
    replaced by the SHA-256 of its bytes: editing a mask or image renders again on resume; the same file named by
    another path does not."""
    if isinstance(value, dict):
        return {k: _files_as_contents(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_files_as_contents(v, key) for v in value]
    if isinstance(value, str) and key and is_path_key(key) and os.path.isfile(value):
        digest = hashlib.sha256()
        with open(value, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return "file-sha256:" + digest.hexdigest()
    return value


def _image_error(path: str) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return str(error) or type(error).__name__
    return None


# -- small helpers ------------------------------------------------------------------------------------------------
def _suggest(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]
