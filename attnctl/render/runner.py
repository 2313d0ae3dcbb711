"""`attnctl render`: a batch renderer over job files, resumable, atomic, fault-isolated, multi-process.

Layout of the output folder `DIR`::

    DIR/<job-id>/<seed>.png          the image, its parameters in the PNG text chunk
    DIR/<job-id>/<seed>.<output>/    what a control published with a `save(folder)` method (attention maps)
    DIR/manifest.jsonl               one record per image: status, error, timings, request digest
    DIR/.attnctl/                    run state: the lock, per-process journals of the run in progress

How a run goes:

1. The job file is read and validated (no model yet). Jobs with problems are recorded as failed.
2. Rank 0 takes the folder's lock, removes temporaries left by a killed run and merges the manifest with
   the journals a killed run left behind (`compact`). All ranks wait for it (a barrier).
3. Rank 0 lists the pending images (those not recorded `ok` with the same request digest and present on
   disk with the recorded size) and sends the list to every rank with the run id, so that every rank shards
   the same list. Rank r renders pending images r, r + W, r + 2W, ... (images, not jobs, so one long job is
   spread over every process).
4. Each image: generate (batch 1, CPU generator seeded with the seed), write the PNG through a temporary
   file and a rename, then append one whole line to the rank's journal `DIR/.attnctl/journal-<rank>.jsonl`
   with a single `write`. An error (out of memory, a failure inside the pipeline) is recorded for that
   image and the run goes on. Before the first image, every job is resolved on the model (`Model.resolve`, as
   --check does); a job that cannot run on it is reported then, and its images are recorded as failed (every
   rank knows the same failed jobs) while the other jobs render.
5. All ranks wait (a barrier); rank 0 merges the journals into `manifest.jsonl` (written to a temporary
   file and renamed, so it is never half-written), deletes them, and prints the summary; a pending image
   no rank recorded in this run is reported missing (exit status 1). Rank 0 also refreshes the manifest
   every `manifest_interval` seconds during the run.
6. Rank 0 then sends the run's exit status to every rank (the other ranks wait for it, so that none exits while
   rank 0 still writes: a launcher stops every process when one exits non-zero), and every rank exits with it
   after a last barrier and the end of the process group (`Ranks.close`).

Per-rank journals rather than appends to one shared file: appends from several machines to one file on a
network file system are not atomic, and a reader of a journal only has to drop an incomplete last line.
A killed run therefore loses at most the images in flight; the next run merges what the journals hold.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import inspect
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AttnctlError, ConfigError
from . import outputs
from .generate import Model, default_model, dtype_name, is_out_of_memory, resolve_device, resolve_dtype
from .jobs import Job, JobFile, Problem, load_job_file
from .outputs import (
    atomic_folder,
    output_folder_name,
    output_key_problems,
    remove_temporaries,
    save_frames,
    save_png,
    save_video,
)

log = logging.getLogger("attnctl.render")

MANIFEST = "manifest.jsonl"
STATE = ".attnctl"
#: Process-group timeout of multi-process runs: the last barrier waits for the slowest rank.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)
DRY_RUN_LISTED = 50
#: The keys of every manifest record (README, "Output"), in the order they are documented.
RECORD_FIELDS: tuple[str, ...] = ("job", "seed", "path", "status", "error", "error_type", "place", "seconds", "bytes",
                                  "request", "run", "rank", "finished", "outputs")
GALLERY = "index.html"
#: Write errors that stop a run at once (the folder cannot take more files): rendering on would only make
#: images that cannot be saved.
FATAL_WRITE_ERRNOS = frozenset(
    code for code in (getattr(errno, name, None) for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EFBIG", "EACCES", "EPERM"))
    if code is not None
)


class RenderError(AttnctlError, RuntimeError):
    """The run cannot start or finish (folder locked, output outside the folder, model not loadable)."""


class WriteStopped(Exception):
    """A write to the output folder failed (disk full, read-only): the run stops after recording it."""

    def __init__(self, error: OSError, path: str):
        super().__init__(str(error))
        self.error, self.path = error, path


def _os_reason(error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} (errno {errno.errorcode.get(error.errno, error.errno)})" if error.errno else reason


@dataclass(frozen=True)
class RenderOptions:
    out: str
    model: str | None = None  # None: the job file's `model`, else default_model()
    device: str = "auto"
    dtype: str | None = None  # None: the job file's `dtype`, else "auto"
    backend: str | None = None  # None: the job file's `backend`, else "auto"
    resume: bool = True
    fsync: bool = False
    cpu_offload: bool = False
    progress: str = "auto"  # auto (a bar on a terminal, log lines otherwise) | bar | log | none
    manifest_interval: float = 60.0


@dataclass
class Summary:
    """What a run did. On rank 0 of a multi-process run it covers every rank; on the other ranks, that rank's share
    (its images, rendered and failed; job-file problems and missing images are rank 0's to report), with the run's
    exit status, which rank 0 sends to every rank once it has merged the manifest and written the gallery."""

    images: int = 0
    skipped: int = 0
    rendered: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    #: (job, seed) of pending images that no rank recorded in this run (rank 0 of a multi-process run only).
    missing: list[tuple[str, int]] = field(default_factory=list)
    problems: tuple[Problem, ...] = ()
    seconds: float = 0.0
    load_seconds: float = 0.0
    rank: int = 0
    world: int = 1
    manifest: str = ""
    #: This process's time per phase over the images it rendered: {"generate": s, "save": s, "images": n}.
    timings: dict[str, float] = field(default_factory=dict)
    #: The whole run's exit status as rank 0 found it (ranks >= 1 of a multi-process run); None: this summary's own.
    run_exit_code: int | None = None

    @property
    def exit_code(self) -> int:
        if self.run_exit_code is not None:
            return self.run_exit_code
        return 1 if self.failed or self.problems or self.missing else 0

    def format(self) -> str:
        rate = self.rendered / self.seconds if self.seconds > 0 else 0.0
        if self.rank > 0:  # one rank's share: the run's totals, failures and problems are in rank 0's summary
            return (f"attnctl render: rank {self.rank} of {self.world}: {self.images} image(s) of its share, "
                    f"{self.rendered} rendered, {len(self.failed)} failed, in {self.seconds:.1f} s ({rate:.2f} images/s; "
                    f"model load {self.load_seconds:.1f} s); rank 0's summary covers the run")
        scope = "" if self.world == 1 else f" across {self.world} processes"
        lines = [
            f"attnctl render: {self.images} image(s){scope}: {self.rendered} rendered, {self.skipped} skipped (already "
            f"done), {len(self.failed)} failed, in {self.seconds:.1f} s ({rate:.2f} images/s; model load "
            f"{self.load_seconds:.1f} s)"
        ]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s) in the job file; their jobs are not rendered (their images are "
                         "recorded as failed where the job's id and seeds could be read):")
            lines.extend(f"  {p}" for p in self.problems)
        failed = [r for r in self.failed if not str(r.get("error", "")).startswith("invalid job:")]
        if failed:
            lines.append("failed:")
            for record in failed[:20]:
                lines.append(f"  job {record['job']!r} seed {record['seed']}: {record.get('error')}")
            if len(failed) > 20:
                lines.append(f"  ... and {len(failed) - 20} more (see the manifest)")
        if self.missing:
            lines.append(f"{len(self.missing)} image(s) missing: no process rendered or recorded them in this run; "
                         "run again to render them:")
            lines.extend(f"  job {job!r} seed {seed}" for job, seed in self.missing[:20])
            if len(self.missing) > 20:
                lines.append(f"  ... and {len(self.missing) - 20} more")
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


# -- processes ----------------------------------------------------------------------------------------------------
class Ranks:
    """This process's place in a multi-process run (`accelerate launch`, `torchrun`), or a single process."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, state: Any = None,
                 owns_group: bool = False):
        self.rank, self.world, self.device, self._state = rank, world, device, state
        #: The process group was started by `from_env` (not by the program that calls attnctl): `close` destroys it.
        self.owns_group = owns_group

    @classmethod
    def from_env(cls, device: str = "auto") -> Ranks:
        """The launcher's environment (WORLD_SIZE and what goes with it); RenderError naming the variable when it is
        not one a launcher sets (a stray WORLD_SIZE), instead of a traceback or a wait for processes that never come."""
        text = os.environ.get("WORLD_SIZE", "").strip()
        try:
            world = int(text) if text else 1
        except ValueError:
            world = 0
        if world < 1:
            raise RenderError(f"WORLD_SIZE={text!r} is not a number of processes >= 1: unset it for one process, or "
                              "start several with accelerate launch or torchrun (they set it)")
        if world == 1:
            return cls(0, 1, resolve_device(device))
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise RenderError(f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                              "set: start several processes with accelerate launch or torchrun (they set all of them), "
                              "or unset WORLD_SIZE for one process")
        from accelerate import PartialState

        started_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        try:
            state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
        except (ValueError, RuntimeError) as error:  # a launcher environment the process group cannot start from
            raise RenderError(f"cannot start the {world}-process group from the launcher's environment: "
                              f"{_describe(error)}") from None
        if device in ("auto", "cuda") or cpu:
            target = torch.device(state.device.type) if state.device.type == "cpu" else state.device
        else:
            target = resolve_device(device)
        return cls(state.process_index, state.num_processes, target, state, owns_group=not started_before)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self._state.wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, values: list[Any]) -> list[Any]:
        """Every rank's `values`, concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(values)
        from accelerate.utils import gather_object

        return gather_object(list(values))

    def say(self, message: str) -> str:
        return message if self.world == 1 else f"[rank {self.rank}/{self.world}] {message}"

    def close(self, *, wait: bool = True) -> None:
        """This process's last step in the group. `wait`: the run finished here, so wait for every rank first (no rank
        exits while another still works: a launcher stops every process when one exits with a non-zero status). Then
        the group `from_env` started is destroyed: gloo left to the interpreter's exit can abort it ("terminate called
        without an active exception", SIGABRT) when the ranks exit at different times. Without `wait` (an error
        path: the other ranks may never come) it is only destroyed. Idempotent; never raises."""
        if self.world == 1 or self._state is None:
            return
        try:
            if wait:
                self._state.wait_for_everyone()
        except Exception as error:  # noqa: BLE001 - a rank died after the run's end: its status is still this run's
            log.warning(self.say(f"the final barrier failed ({_describe(error)})"))
        finally:
            if self.owns_group:
                self.owns_group = False
                with contextlib.suppress(Exception):
                    self._state.destroy_process_group()


def launcher_rank() -> int:
    """This process's RANK under a launcher that started several (WORLD_SIZE > 1), read from the environment without
    starting the process group; 0 for a single process and for an incomplete launcher environment (which
    `Ranks.from_env` reports when a run needs the group)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


# -- manifest and journals ----------------------------------------------------------------------------------------
def read_records(path: str) -> tuple[list[dict[str, Any]], int]:
    """The records of a manifest or journal, and the number of lines dropped (incomplete or not JSON)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return [], 0
    except IsADirectoryError:
        raise RenderError(f"{path} is a folder, not a record file (an older attnctl allowed a job id named "
                          f"{os.path.basename(path)!r}); move that folder out of the output folder") from None
    except OSError as error:
        raise RenderError(f"cannot read {path}: {_os_reason(error)}") from None
    records, dropped = [], 0
    lines = text.split("\n")
    if lines and lines[-1] != "":
        dropped += 1  # a line without its newline was being written when the writer died (or still is)
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and "job" in record and "seed" in record:
            records.append(record)
        else:
            dropped += 1
    return records, dropped


def journal_paths(out: str) -> list[str]:
    folder = os.path.join(out, STATE)
    if not os.path.isdir(folder):
        return []
    return sorted(entry.path for entry in os.scandir(folder) if entry.name.startswith("journal-") and entry.name.endswith(".jsonl"))


def merged_records(out: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The manifest and the journals merged: per image, the record that finished last."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for path in [os.path.join(out, MANIFEST)] + journal_paths(out):
        records, dropped = read_records(path)
        if dropped:
            log.debug("%s: %d incomplete line(s) ignored", path, dropped)
        for record in records:
            key = (str(record["job"]), record["seed"])
            old = merged.get(key)
            if old is None or str(record.get("finished", "")) >= str(old.get("finished", "")):
                merged[key] = record
    return merged


def compact(out: str, jobs: JobFile | None = None, *, delete_journals: bool = False, fsync: bool = False
            ) -> dict[tuple[str, int], dict[str, Any]]:
    """Merge the journals into `DIR/manifest.jsonl` (atomically), one record per image, in job-file order."""
    journals = journal_paths(out)
    merged = merged_records(out)
    order: dict[tuple[str, int], tuple] = {}
    if jobs is not None:
        for job in jobs.jobs:
            for position, seed in enumerate(job.seeds):
                order[(job.id, seed)] = (0, job.index, position)
        for job in jobs.invalid:
            for position, seed in enumerate(job.seeds):
                order.setdefault((job.id, seed), (0, job.index, position))

    def key(item: tuple[tuple[str, int], dict[str, Any]]) -> tuple:
        (job, seed), _ = item
        return order.get((job, seed), (1, job, seed if isinstance(seed, int) else -1))

    lines = [json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for _, record in sorted(merged.items(), key=key)]
    manifest = os.path.join(out, MANIFEST)
    if lines or os.path.exists(manifest):
        outputs.atomic_write(manifest, "".join(lines).encode("utf-8"), fsync=fsync)
    if delete_journals:
        for path in journals:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return merged


class Journal:
    """Whole-line appends of records, one `write` system call per record."""

    def __init__(self, path: str, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # pragma: no cover - disk full
            raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FolderLock:
    """An exclusive lock on the output folder while a run writes to it (released when the process dies)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, STATE, "lock")
        self._handle = None

    def acquire(self) -> None:
        self._handle = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._handle.seek(0)
            holder = self._handle.read().strip()
            self._handle.close()
            self._handle = None
            raise RenderError(
                f"another attnctl render is writing to {os.path.dirname(os.path.dirname(self.path))} ({holder or 'pid unknown'}); "
                "wait for it to finish, or give another --out"
            ) from error
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()}\n")
        self._handle.flush()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# -- the plan -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    job: Job
    seed: int
    request: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.job.id, self.seed)


def request_digest(job: Job, model: str, dtype: str, backend: str = "auto") -> str:
    """What must be equal for a recorded image to count as done: the job's request, the model, the dtype, and the
    attention backend when one is named (not "auto": the digests of images rendered before the backend counted,
    all with "auto", stay valid)."""
    digest = f"{job.request}/{model}/{dtype}"
    return digest if backend in (None, "auto") else f"{digest}/{backend}"


def plan(jobs: JobFile, out: str, model: str, dtype: str, *, backend: str = "auto", resume: bool = True,
         records: dict[tuple[str, int], dict[str, Any]] | None = None) -> tuple[list[Image], list[Image]]:
    """All images of the valid jobs in file order, and those still to render."""
    if records is None:
        records = merged_records(out)
    every: list[Image] = []
    pending: list[Image] = []
    for job in jobs.jobs:
        request = request_digest(job, model, dtype, backend)
        for seed in job.seeds:
            image = Image(job, seed, request)
            every.append(image)
            if not resume or not _done(records.get(image.key), out, request):
                pending.append(image)
    return every, pending


def _done(record: dict[str, Any] | None, out: str, request: str) -> bool:
    if record is None or record.get("status") != "ok" or record.get("request") != request:
        return False
    path = os.path.join(out, str(record.get("path", "")))
    try:
        complete = os.path.getsize(path) == record.get("bytes")
    except OSError:
        return False
    # the image's other files (maps, video, frames) too: one removed since is rendered again
    return complete and all(os.path.exists(os.path.join(out, str(saved))) for saved in record.get("outputs") or ())


def shard(pending: list[Image], rank: int, world: int) -> list[Image]:
    """Rank r's images: r, r + W, r + 2W, ... of the pending list (the same list on every rank)."""
    return pending[rank::world]


# -- the run ------------------------------------------------------------------------------------------------------
def output_folder_problem(out: str) -> str | None:
    """What would stop a run from writing to `out`, found without writing anything (`--dry-run`): a file in its
    place or in the place of a folder above it or of the state folder, a folder where the manifest or the gallery
    goes, no write permission."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a folder; give a folder (it is created if missing)"
    state = os.path.join(out, STATE)
    if os.path.exists(state) and not os.path.isdir(state):
        return f"{state} is a file, not the renderer's state folder; move it away"
    for name in (MANIFEST, GALLERY):
        if os.path.isdir(os.path.join(out, name)):
            return (f"{os.path.join(out, name)} is a folder where the renderer writes its {name} (an older attnctl "
                    f"allowed a job id {name!r}); move that folder out of {out}")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the folder nearest to `out` that exists: the one a run creates it in
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot create the output folder {out}: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the output folder {out} is not writable ({existing}: permission denied)"
    return None


def job_folder_problem(out: str, job_id: str) -> str | None:
    """A file (not a folder) at `out/<job id>`, where the job's images go, found without writing anything."""
    folder = os.path.join(out, job_id)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file where job {job_id!r} writes its images; move it away or rename the job"
    return None


def image_path_problem(out: str, job_id: str, seed: int) -> str | None:
    """A folder at `out/<job id>/<seed>.png`, where the image of that seed is saved."""
    path = os.path.join(out, job_id, f"{seed}.png")
    if os.path.isdir(path):
        return f"{path} is a folder where job {job_id!r} writes its image of seed {seed}; move it away"
    return None


def job_output_problems(out: str, jobs: JobFile) -> list[Problem]:
    """`job_folder_problem` and `image_path_problem` for every valid job of `jobs` (`--dry-run`): what would fail
    those jobs' images at the run."""
    problems = []
    for job in jobs.jobs:
        problem = job_folder_problem(out, job.id)
        if problem is None and os.path.isdir(os.path.join(out, job.id)):
            problem = "; ".join(found for seed in job.seeds if (found := image_path_problem(out, job.id, seed))) or None
        if problem is not None:
            problems.append(Problem(f"{job.place} (job {job.id!r})", problem, job.id))
    return problems


def prepare_output_folder(out: str) -> None:
    """Create the output folder and its state folder, or raise RenderError with the one-line reason (a file in
    the way, a read-only folder, a renderer file replaced by a folder)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RenderError(f"--out {out} is a file, not a folder; give a folder (it is created if missing)")
    try:
        os.makedirs(os.path.join(out, STATE), exist_ok=True)
    except FileExistsError:
        raise RenderError(f"{os.path.join(out, STATE)} is a file, not the renderer's state folder; move it away") from None
    except OSError as error:
        raise RenderError(f"cannot create the output folder {out}: {_os_reason(error)}") from None
    for name in (MANIFEST, GALLERY):
        if os.path.isdir(os.path.join(out, name)):
            raise RenderError(f"{os.path.join(out, name)} is a folder where the renderer writes its {name} (an older "
                              f"attnctl allowed a job id {name!r}); move that folder out of {out}")
    probe = os.path.join(out, STATE, f".write-test.{os.getpid()}.tmp")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        os.unlink(probe)
    except OSError as error:
        raise RenderError(f"the output folder {out} is not writable: {_os_reason(error)}") from None
    if not os.access(out, os.W_OK):
        raise RenderError(f"the output folder {out} is not writable (permission denied)")


def render(jobs: JobFile | str, options: RenderOptions, *, model: Model | None = None, ranks: Ranks | None = None
           ) -> Summary:
    """Render every pending image of a job file into `options.out`; see the module docstring.

    Every fault of the output folder (a file in its place, read-only, full) raises RenderError with one line;
    after a failed write the run stops, and the manifest and journals hold every image saved so far.

    Under a launcher, every rank returns once rank 0 has written the manifest and the gallery, with the run's exit
    status in `Summary.exit_code`. Without `ranks` the process group is started here and ended before returning
    (`Ranks.close`); given `ranks`, ending it is the caller's."""
    started = time.perf_counter()
    if not isinstance(jobs, JobFile):
        jobs = load_job_file(jobs)
    refuse_file_problems(jobs)
    if ranks is not None:
        return _render(jobs, options, model, ranks, started)
    ranks = Ranks.from_env(options.device)  # the group this call starts, it ends (a caller's `ranks` are the caller's)
    finished = False
    try:
        summary = _render(jobs, options, model, ranks, started)
        finished = True
        return summary
    finally:
        ranks.close(wait=finished)


def _render(jobs: JobFile, options: RenderOptions, model: Model | None, ranks: Ranks, started: float) -> Summary:
    out = os.path.realpath(options.out)
    model_name = model.name if model is not None else (options.model or jobs.model or default_model())
    if model is None:
        from .loading import check_model_name

        check_model_name(model_name)
    device = model.device if model is not None else ranks.device
    dtype = dtype_name(model.dtype if model is not None else resolve_dtype(options.dtype or jobs.dtype or "auto", device))
    backend = model.backend if model is not None else (options.backend or jobs.backend or "auto")

    lock = FolderLock(out)
    if ranks.main:
        prepare_output_folder(out)
        try:
            lock.acquire()
        except OSError as error:
            raise RenderError(f"cannot lock the output folder {out}: {_os_reason(error)}") from None
    try:
        try:
            return _render_locked(jobs, options, model, ranks, out, model_name, device, dtype, backend, started)
        except WriteStopped as stop:
            raise RenderError(
                f"cannot write {stop.path}: {_os_reason(stop.error)}; the run stopped at the first failed write "
                f"(images saved before it are in {os.path.join(out, MANIFEST)}); free space or fix the folder, "
                "then run again to resume"
            ) from None
        except OSError as error:  # anything else the folder refused (setup, compaction)
            where = f" {error.filename}" if getattr(error, "filename", None) else ""
            raise RenderError(f"cannot write to the output folder {out}{where}: {_os_reason(error)}") from None
    finally:
        lock.release()


def refuse_file_problems(jobs: JobFile) -> None:
    """Raise ConfigError, listing them as `--dry-run` does, when the job file has problems of the file as a whole (an
    unknown top-level or [defaults] key, a header value): every job would render without what was meant."""
    if jobs.file_problems:
        listed = "".join(f"\n  problem  {problem}" for problem in jobs.file_problems)
        raise ConfigError(f"{os.path.basename(jobs.path)}: {len(jobs.file_problems)} problem(s) of the whole file (they "
                          f"change every job); nothing was rendered (--dry-run lists every problem):{listed}")


def _safe_compact(out: str, jobs: JobFile, fsync: bool) -> None:
    """The final merge after a failed write: the journals stay when the manifest cannot be written (the next
    run merges them), so nothing recorded is lost either way."""
    try:
        compact(out, jobs, delete_journals=True, fsync=fsync)
    except OSError as error:
        log.warning("could not refresh %s (%s); the journals in %s keep the records for the next run",
                    os.path.join(out, MANIFEST), _os_reason(error), os.path.join(out, STATE))


def _render_locked(jobs: JobFile, options: RenderOptions, model: Model | None, ranks: Ranks, out: str, model_name: str,
                   device: torch.device, dtype: str, backend: str, started: float) -> Summary:
    started_with = None
    if ranks.main:
        removed = remove_temporaries(out)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run", removed)
        compact(out, jobs, delete_journals=True, fsync=options.fsync)
        run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        every, pending = plan(jobs, out, model_name, dtype, backend=backend, resume=options.resume)
        positions = {image.key: position for position, image in enumerate(every)}
        started_with = (run_id, len(every), [positions[image.key] for image in pending])
    ranks.barrier()
    # rank 0 plans for every rank: a rank planning on its own once rank 0 has started rendering would see this run's
    # records, plan a shorter list, and its share would skip some images and repeat others
    run_id, count, pending_positions = ranks.broadcast(started_with)
    if not ranks.main:
        every, _ = plan(jobs, out, model_name, dtype, backend=backend, records={})
        if len(every) != count:
            raise RenderError(f"rank {ranks.rank} reads {len(every)} image(s) in {jobs.path}, rank 0 {count}: every "
                              "process must read the same job file (was it edited as the run started?)")
        pending = [every[position] for position in pending_positions]
    mine = shard(pending, ranks.rank, ranks.world)
    if ranks.main:
        invalid_images = sum(len(job.seeds) for job in jobs.invalid if job.id is not None)
        summary = Summary(images=len(every) + invalid_images, skipped=len(every) - len(pending), problems=jobs.problems,
                          rank=ranks.rank, world=ranks.world, manifest=os.path.join(out, MANIFEST))
    else:
        summary = Summary(images=len(mine), rank=ranks.rank, world=ranks.world, manifest=os.path.join(out, MANIFEST))
    log.info(ranks.say(f"{len(jobs.jobs)} job(s), {len(every)} image(s): {len(every) - len(pending)} already done, "
                       f"{len(pending)} to render, {len(mine)} on this process"))
    journal = Journal(os.path.join(out, STATE, f"journal-{ranks.rank:05d}.jsonl"), fsync=options.fsync)
    context = _RunContext(out, run_id, ranks, journal, options, jobs, summary)
    try:
        if ranks.main:
            context.record_invalid(jobs)
        if mine:
            if model is None:
                load_start = time.perf_counter()
                log.info(ranks.say(f"loading {model_name} on {device} ({dtype})"))
                try:
                    model = Model.load(model_name, device=device, dtype=dtype, backend=backend,
                                       cpu_offload=options.cpu_offload)
                except Exception as error:  # noqa: BLE001 - any loader failure ends the run with its reason
                    raise RenderError(f"cannot load model {model_name!r}: {_describe(error)}") from error
                summary.load_seconds = time.perf_counter() - load_start
            else:
                model.pipe.set_progress_bar_config(disable=True)
        # what only the model knows (its call's options, the controls' layers, their words in the prompt), for every
        # job of this run before its first image, as --check does: a typo in job 37 is reported before job 1 renders;
        # the job's images are recorded as failed and the other jobs go on (issue #8's fault isolation)
        unresolved = _unresolved_jobs(ranks.gather(_resolve_jobs(model, mine, ranks) if mine else []))
        if unresolved and ranks.main:
            log.warning(f"{len(unresolved)} job(s) cannot run on {model_name}; their images will be recorded as failed "
                        "and the other jobs render (--check finds these without rendering):"
                        + "".join(f"\n  problem  {failure.line}" for failure in unresolved.values()))
        if mine:
            context.run(model, mine, unresolved)
    except KeyboardInterrupt:
        journal.close()
        if ranks.world == 1:
            compact(out, jobs, delete_journals=True, fsync=options.fsync)
        log.warning(ranks.say("interrupted: images finished so far are recorded; run again to resume"))
        raise
    except WriteStopped:
        journal.close()
        if ranks.world == 1:
            _safe_compact(out, jobs, options.fsync)
        raise
    finally:
        journal.close()
        if model is not None:
            model.release()
    summary.rendered, summary.failed = context.ok, context.failed
    summary.timings = context.timings
    ranks.barrier()
    if not ranks.main:
        # wait for rank 0's merge and gallery: exiting before them, with status 1, would make the launcher stop rank 0
        # in the middle of writing the manifest; and every rank exits with the run's status
        summary.seconds = time.perf_counter() - started  # this rank's work, not its wait for rank 0
        summary.run_exit_code = _outcome_from_rank_0(ranks)
        return summary
    try:
        merged = compact(out, jobs, delete_journals=True, fsync=options.fsync)
        this_run = [record for record in merged.values() if record.get("run") == run_id]
        summary.rendered = sum(record.get("status") == "ok" for record in this_run)
        summary.failed = [record for record in this_run if record.get("status") != "ok"]
        summary.missing = [image.key for image in pending if merged.get(image.key, {}).get("run") != run_id]
        summary.seconds = time.perf_counter() - started
        _write_gallery(out, jobs, merged, summary, model_name)
    except BaseException as error:
        if ranks.world > 1:  # the other ranks wait for the outcome: they fail with rank 0's status too
            with contextlib.suppress(Exception):
                ranks.broadcast((130, None) if isinstance(error, KeyboardInterrupt) else (2, _describe(error)))
        raise
    if ranks.world > 1:
        ranks.broadcast((summary.exit_code, None))
    return summary


def _outcome_from_rank_0(ranks: Ranks) -> int:
    """Ranks >= 1: the run's exit status, once rank 0 has finished the run; rank 0's failure raised here as well
    (RenderError; KeyboardInterrupt when rank 0 was interrupted), so that every rank exits with the same status."""
    code, reason = ranks.broadcast(None)
    if code == 130:
        raise KeyboardInterrupt
    if reason is not None:
        raise RenderError(f"rank 0 could not finish the run ({reason}); its message says more")
    return code


@dataclass(frozen=True)
class JobFailure:
    """A job that cannot run on the model (found before the first image): what its images are recorded with."""

    job: str
    place: str
    error: str  # "<type>: <message>", as the manifest's `error`
    error_type: str

    @property
    def line(self) -> str:
        return f"{self.place} (job {self.job!r}): {self.error}"


def _resolve_jobs(model: Model, images: list[Image], ranks: Ranks) -> list[JobFailure]:
    """`Model.resolve` (prompt encoding, no denoising) for each job of these images: one failure per job that cannot
    run on this model."""
    jobs = list({image.job.id: image.job for image in images}.values())
    log.info(ranks.say(f"checking {len(jobs)} job(s) on {model.name}"))
    failures = []
    for job in jobs:
        try:
            check_output_keys(job.controls)
            model.resolve(job.prompt, controls=job.controls, negative_prompt=job.negative_prompt, steps=job.steps,
                          width=job.width, height=job.height, guidance_scale=job.guidance_scale, **job.options)
        except Exception as error:  # noqa: BLE001 - every job is checked; each problem is reported
            if is_out_of_memory(error):  # not the job's fault: its images are tried, and fail or render one by one
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning(ranks.say(f"job {job.id!r} ({job.place}): checking it ran out of memory; its images are tried"))
                continue
            failures.append(JobFailure(job.id, job.place, _describe(error), type(error).__name__))
    return failures


def _unresolved_jobs(failures: list[JobFailure]) -> dict[str, JobFailure]:
    """Every rank's failures by job id (a job whose images are spread over several ranks is resolved on each; the
    first rank's failure is kept, so that every rank records the same error)."""
    unresolved: dict[str, JobFailure] = {}
    for failure in failures:
        unresolved.setdefault(failure.job, failure)
    return unresolved


def _write_gallery(out: str, jobs: JobFile, records: dict[tuple[str, int], dict[str, Any]], summary: Summary,
                   model_name: str) -> None:
    from .gallery import write_gallery

    try:
        write_gallery(out, jobs, records, summary=summary, model=model_name)
    except OSError as error:
        raise WriteStopped(error, os.path.join(out, GALLERY)) from None


class _RunContext:
    def __init__(self, out: str, run_id: str, ranks: Ranks, journal: Journal, options: RenderOptions, jobs: JobFile,
                 summary: Summary):
        self.out, self.run_id, self.ranks, self.journal = out, run_id, ranks, journal
        self.options, self.jobs, self.summary = options, jobs, summary
        self._last_compaction = time.monotonic()
        self.failed: list[dict[str, Any]] = []
        self.ok = 0
        self.timings: dict[str, float] = {"generate": 0.0, "save": 0.0, "images": 0}

    def record(self, job_id: str, seed: int, status: str, **fields: Any) -> dict[str, Any]:
        """Journal one image's record: every key the README lists, None where it has no value (a failed image has no
        `bytes` or `outputs`; a job that never ran has no `seconds`)."""
        unknown = sorted(set(fields) - set(RECORD_FIELDS))
        if unknown:
            raise ValueError(f"not manifest fields: {', '.join(unknown)}")
        record = {
            **dict.fromkeys(RECORD_FIELDS), "job": job_id, "seed": seed, "path": f"{job_id}/{seed}.png", "status": status,
            "run": self.run_id, "rank": self.ranks.rank,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            **fields,
        }
        try:
            self.journal.append(record)
        except OSError as error:
            raise WriteStopped(error, self.journal.path) from None
        if status == "ok":
            self.ok += 1
        else:
            self.failed.append(record)
        return record

    def record_invalid(self, jobs: JobFile) -> None:
        for job in jobs.invalid:
            if job.id is None:
                continue
            error = "; ".join(problem.message for problem in job.problems)
            for seed in job.seeds:
                self.record(job.id, seed, "failed", error=f"invalid job: {error}", error_type="ConfigError", place=job.place)

    def job_folder(self, job: Job) -> str:
        folder = os.path.join(self.out, job.id)
        real = os.path.realpath(folder)
        if os.path.commonpath([real, self.out]) != self.out or real == self.out:
            raise RenderError(f"job {job.id!r}: its folder {real} is outside the output folder {self.out}")
        problem = job_folder_problem(self.out, job.id)
        if problem is not None:
            raise RenderError(problem)
        os.makedirs(folder, exist_ok=True)
        return folder

    def run(self, model: Model, images: list[Image], unresolved: dict[str, JobFailure] | None = None) -> None:
        """Render `images`; the jobs in `unresolved` (found before the first image) are not checked again: each of
        their images is recorded as failed with the job's error."""
        progress = _Progress(len(images), self.options.progress, self.ranks)
        failed_jobs: dict[str, JobFailure] = dict(unresolved or {})
        checked: set[str] = set(failed_jobs)
        try:
            for image in images:
                job = image.job
                if job.id not in checked:
                    checked.add(job.id)
                    try:
                        model.check(job.controls, job.options, job.negative_prompt)
                        check_output_keys(job.controls)
                        self.job_folder(job)
                    except Exception as error:  # noqa: BLE001 - fault isolation: the job fails, the run goes on
                        failed_jobs[job.id] = JobFailure(job.id, job.place, _describe(error), type(error).__name__)
                        log.warning(self.ranks.say(f"job {job.id!r} ({job.place}) cannot be rendered: "
                                                   f"{failed_jobs[job.id].error}"))
                if job.id in failed_jobs:
                    failure = failed_jobs[job.id]
                    self.record(job.id, image.seed, "failed", error=failure.error, request=image.request,
                                error_type=failure.error_type, place=job.place)
                    progress.update(ok=False)
                    continue
                ok = self.render_one(model, image)
                progress.update(ok=ok)
                if self.ranks.main and time.monotonic() - self._last_compaction > self.options.manifest_interval:
                    try:
                        compact(self.out, self.jobs, fsync=self.options.fsync)
                    except OSError as error:
                        raise WriteStopped(error, os.path.join(self.out, MANIFEST)) from None
                    self._last_compaction = time.monotonic()
        finally:
            progress.close()

    def render_one(self, model: Model, image: Image) -> bool:
        job, seed = image.job, image.seed
        start = time.perf_counter()
        target = os.path.join(self.out, job.id, f"{seed}.png")
        try:
            problem = image_path_problem(self.out, job.id, seed)
            if problem is not None:  # before generating: the image could not be saved
                raise RenderError(problem)
            result = model.generate(
                job.prompt, seed=seed, controls=job.controls, negative_prompt=job.negative_prompt, steps=job.steps,
                width=job.width, height=job.height, guidance_scale=job.guidance_scale, **job.options,
            )
            generated = time.perf_counter()
            folder = os.path.join(self.out, job.id)  # checked by job_folder before the job's first image
            params = {"job": job.id, **result.params}
            try:
                # the side outputs go into place first, and are removed again if a later file fails: they exist only
                # beside their image's PNG (a failed image's record lists no outputs)
                with _removed_on_failure() as placed:
                    saved_outputs = save_outputs(result.outputs, folder, seed, result.image, fsync=self.options.fsync,
                                                 params=params, placed=placed)
                    if result.frames is not None:  # a video: <seed>.mp4 (imageio-ffmpeg) or .gif, and <seed>.frames/
                        video = os.path.join(folder, f"{seed}.{outputs.video_format()}")
                        frames = os.path.join(folder, f"{seed}.frames")
                        with _naming(video):
                            save_video(result.frames, video, params, fsync=self.options.fsync,
                                       **({"fps": params["fps"]} if isinstance(params.get("fps"), int) else {}))
                        placed.append(video)
                        with _naming(frames):
                            save_frames(result.frames, frames, params, fsync=self.options.fsync)
                        placed.append(frames)
                        saved_outputs = [os.path.relpath(path, self.out) for path in (video, frames)] + saved_outputs
                    # the PNG last: resuming counts an image done by its PNG, so it exists only once every other file does
                    size = save_png(result.image, target, params, fsync=self.options.fsync)
            except OSError as error:
                if error.errno in FATAL_WRITE_ERRNOS:
                    raise WriteStopped(error, error.filename or target) from None
                raise
            done = time.perf_counter()
        except WriteStopped as stop:
            log.error(self.ranks.say(f"job {job.id!r} seed {seed}: cannot write {stop.path}: {_os_reason(stop.error)}; "
                                     "stopping the run"))
            try:
                self.record(job.id, seed, "failed", error=f"not saved: {_os_reason(stop.error)}",
                            error_type=type(stop.error).__name__, request=image.request, place=job.place,
                            seconds={"total": round(time.perf_counter() - start, 4)})
            except WriteStopped:
                pass  # the journal cannot take the line either: the image is simply not recorded (it is not on disk)
            raise
        except Exception as error:  # noqa: BLE001 - fault isolation: the image fails, the run goes on
            message = _describe(error)
            if is_out_of_memory(error) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning(self.ranks.say(f"job {job.id!r} seed {seed} failed ({job.place}): {message}"))
            self.record(job.id, seed, "failed", error=message, error_type=type(error).__name__, request=image.request,
                        place=job.place, seconds={"total": round(time.perf_counter() - start, 4)})
            return False
        self.record(job.id, seed, "ok", request=image.request, bytes=size, outputs=saved_outputs or None,
                    seconds={"generate": round(generated - start, 4), "save": round(done - generated, 4),
                             "total": round(done - start, 4)})
        self.timings["generate"] += generated - start
        self.timings["save"] += done - generated
        self.timings["images"] += 1
        return True


def check_output_keys(controls: tuple[Any, ...]) -> None:
    """Raise ConfigError when a control's output folder `<seed>.<key>/` would take a name of the renderer's own
    files or another control's folder (the job file check does this for jobs read from a file)."""
    published = [(control.output_key, f"controls[{position}] ({type(control).__name__})")
                 for position, control in enumerate(controls) if getattr(control, "output_key", None) is not None]
    problems = output_key_problems(published)
    if problems:
        raise ConfigError("; ".join(problems))


def save_outputs(outputs: dict[str, Any], folder: str, seed: int, image: Any, *, fsync: bool = False,
                 params: dict[str, Any] | None = None, placed: list[str] | None = None) -> list[str]:
    """Save what controls published with a `save(folder)` method (attention maps) to `<seed>.<key>/`; each folder's
    path is appended to `placed` as soon as it is in place (so that a caller can remove them if a later one fails)."""
    from PIL import Image as PILImage

    saving = [(key, value) for key, value in outputs.items()
              if callable(getattr(value, "save", None)) and not isinstance(value, PILImage.Image)]
    # the job check refuses such keys before the run; here for outputs no control declared as its output_key
    problems = output_key_problems((key, "a control's output") for key, _ in saving)
    if problems:
        raise ConfigError("; ".join(problems))
    saved = []
    for key, value in saving:
        save = value.save
        target = os.path.join(folder, f"{seed}.{output_folder_name(key)}")
        try:
            takes_images = "images" in inspect.signature(save).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_images = False

        def fill(path: str, save=save, takes_images=takes_images, key=key) -> None:
            save(path, images=[image]) if takes_images else save(path)
            if params is not None:
                tag_pngs(path, {**params, "output": str(key)})

        with _naming(target):
            atomic_folder(target, fill, fsync=fsync)
        if placed is not None:
            placed.append(target)
        saved.append(os.path.relpath(target, os.path.dirname(folder)))
    return saved


@contextlib.contextmanager
def _removed_on_failure() -> Iterator[list[str]]:
    """A list for the paths (files or folders) the block puts in place; if the block raises, they are removed."""
    placed: list[str] = []
    try:
        yield placed
    except BaseException:
        for path in reversed(placed):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        raise


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """Give an OSError that names no file (a failed `write`: no space, I/O error) the path being written, so the
    run's error names the file that failed, not the image's PNG."""
    try:
        yield
    except OSError as error:
        if not error.filename:
            error.filename = path
        raise


def tag_pngs(folder: str, params: dict[str, Any]) -> None:
    """Give every PNG in `folder` (heatmaps of a control's `save`) the parameters of the image they belong to,
    in the same text chunks as the image (`attnctl` JSON with `output` and `file`, and A1111 `parameters`)."""
    from PIL import Image as PILImage

    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.name.lower().endswith(".png") or not entry.is_file():
            continue
        with PILImage.open(entry.path) as picture:
            picture.load()
            data = outputs.png_bytes(picture, {**params, "file": entry.name})
        with open(entry.path, "wb") as handle:  # inside the temporary folder: renamed into place as a whole
            handle.write(data)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or repr(error)
    return f"{type(error).__name__}: {text}"


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line every 30 s (and at the end)."""

    def __init__(self, total: int, mode: str, ranks: Ranks):
        self.total, self.ranks, self.done, self.failed = total, ranks, 0, 0
        self.start = self._last = time.monotonic()
        self._first_done: float | None = None  # the first image pays for warm-up: the rate is measured after it
        self._logged_at = -1  # `done` at the last log line (the final line is not repeated)
        interactive = sys.stderr.isatty()
        self.mode = ("bar" if interactive and ranks.main else "log") if mode == "auto" else mode
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="render" if ranks.world == 1 else f"rank {ranks.rank}",
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self._first_done is None:
            self._first_done = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
        elif self.mode == "log" and time.monotonic() - self._last >= 30:
            self._log()

    def rate(self) -> float:
        """Images per second after the first image (which includes warm-up); nan before two images."""
        now = time.monotonic()
        if self._first_done is None or self.done < 2 or now <= self._first_done:
            return float("nan")
        return (self.done - 1) / (now - self._first_done)

    def _log(self) -> None:
        self._last = time.monotonic()
        self._logged_at = self.done
        rate = self.rate()
        left = self.total - self.done
        eta = "done" if left == 0 else f"about {_duration(left / rate)} left" if rate == rate and rate > 0 else "estimating"
        shown = f"{rate:.2f} images/s" if rate == rate else "first image done" if self.done else "starting"
        log.info(self.ranks.say(f"{self.done}/{self.total} images ({self.failed} failed), {shown}, {eta}"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "log" and self.done and self._logged_at != self.done:
            self._log()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# -- dry run ------------------------------------------------------------------------------------------------------
def dry_run(jobs: JobFile, out: str | None = None, model: str | None = None, *, device: str = "auto",
            dtype: str | None = None, backend: str | None = None) -> tuple[list[str], int]:
    """Report lines for `--dry-run` (no model is loaded), and the number of problems found. `device`, `dtype` and
    `backend` are those of the run (`render`'s options): the device is checked as `render` checks it, and the
    count of images already done uses the request digest the run would use (it holds the dtype and backend)."""
    lines = []
    name = model or jobs.model or default_model()
    problems = setup_problems(jobs, model, device) + list(jobs.problems)
    folder_problem = output_folder_problem(out) if out is not None else None
    if folder_problem is not None:
        problems.insert(0, Problem("--out", folder_problem))
    elif out is not None and os.path.isdir(out):
        problems += job_output_problems(out, jobs)
    target = None
    with contextlib.suppress(AttnctlError):  # a device problem is in `problems`
        target = resolve_device(device)
    images = jobs.images + sum(len(job.seeds) for job in jobs.invalid)
    lines.append(f"{os.path.basename(jobs.path)}: {len(jobs.jobs) + len(jobs.invalid)} job(s), {images} image(s), "
                 f"model {name}")
    if out is not None and os.path.isdir(out) and target is not None:
        resolved = dtype_name(resolve_dtype(dtype or jobs.dtype or "auto", target))
        every, pending = plan(jobs, os.path.realpath(out), name, resolved, backend=backend or jobs.backend or "auto")
        lines.append(f"{out}: {len(every) - len(pending)} image(s) already done, {len(pending)} to render")
    for job in jobs.jobs[:DRY_RUN_LISTED]:
        controls = ", ".join(c.type_name for c in job.controls) or "no controls"
        lines.append(f"  ok  {job.place} job {job.id!r}: {len(job.seeds)} seed(s), {controls}")
    if len(jobs.jobs) > DRY_RUN_LISTED:
        lines.append(f"  ... and {len(jobs.jobs) - DRY_RUN_LISTED} more valid job(s)")
    for problem in problems:
        lines.append(f"  problem  {problem}")
    lines.append(f"{len(problems)} problem(s)" if problems else "no problems")
    return lines, len(problems)


def setup_problems(jobs: JobFile, model: str | None = None, device: str = "auto") -> list[Problem]:
    """Problems of the run's model name and device (found without loading anything): with one, no job can be
    checked on the model."""
    problems = []
    try:
        resolve_device(device)
    except AttnctlError as error:
        problems.append(Problem("--device", str(error)))
    model_problem = _model_problem(model or jobs.model or default_model())
    if model_problem:
        problems.append(Problem("--model" if model else jobs.path, model_problem))
    return problems


def _model_problem(name: str) -> str | None:
    from .loading import embedded_models, near_miss

    if name in embedded_models() or os.path.isdir(name):
        return None
    guess = near_miss(name)
    if guess is not None:
        return f"model {name!r} is not an embedded model: did you mean {guess!r}?"
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or not all(name.split("/")):
        return (f"model {name!r} is neither an embedded model ({', '.join(embedded_models())}), an existing folder, "
                "nor a hub id ('owner/name')")
    return None


def check_jobs(jobs: JobFile, model: str | None = None, *, device: str = "auto", dtype: str | None = None,
               backend: str | None = None, loaded: Model | None = None) -> tuple[list[str], int]:
    """`--check`: load the model once and resolve every valid job on it (`Model.resolve`: the call's options,
    the controls' layers and options, their words in the job's prompt) without generating. Report lines and
    the number of problems; the model is left without controls."""
    name = loaded.name if loaded is not None else (model or jobs.model or default_model())
    lines: list[str] = []
    problems = 0
    if loaded is None:
        target = resolve_device(device)
        load_start = time.perf_counter()
        try:
            loaded = Model.load(name, device=target, dtype=dtype or jobs.dtype or "auto",
                                backend=backend or jobs.backend or "auto")
        except Exception as error:  # noqa: BLE001 - any loader failure ends the check with its reason
            raise RenderError(f"cannot load model {name!r}: {_describe(error)}") from error
        lines.append(f"check: loaded {name} ({type(loaded.pipe).__name__}) in {time.perf_counter() - load_start:.1f} s")
    try:
        for job in jobs.jobs:
            try:
                loaded.resolve(job.prompt, controls=job.controls, negative_prompt=job.negative_prompt, steps=job.steps,
                               width=job.width, height=job.height, guidance_scale=job.guidance_scale, **job.options)
            except Exception as error:  # noqa: BLE001 - every job is checked; each problem is reported
                problems += 1
                lines.append(f"  problem  {job.place} job {job.id!r}: {_describe(error)}")
            else:
                lines.append(f"  ok  {job.place} job {job.id!r} resolves on {name}")
    finally:
        loaded.release()
    every = "every valid job" if jobs.invalid else "every job"
    lines.append(f"check: {problems} problem(s) on {name}" if problems else f"check: {every} resolves on {name}")
    return lines, problems


def iter_images(out: str) -> Iterator[str]:
    """The PNG files under an output folder (for tools and tests)."""
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            for image in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if image.name.endswith(".png") and not image.name.startswith("."):
                    yield image.path


__all__ = [
    "MANIFEST", "Ranks", "RenderError", "RenderOptions", "Summary", "check_jobs", "compact", "dry_run", "launcher_rank",
    "merged_records", "output_folder_problem", "plan", "read_records", "refuse_file_problems", "render", "setup_problems",
    "shard",
]
