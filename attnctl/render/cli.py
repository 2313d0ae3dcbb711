"""The `attnctl` command line.

    attnctl render JOBS --out DIR [--model M] [--device D] [--dtype T] [--dry-run] ...
    attnctl params IMAGE.png              # the generation parameters stored in a rendered PNG (or .gif / .mp4)
    python -m attnctl render ...          # the same; `accelerate launch -m attnctl render ...` for many processes

Exit status: 0 everything rendered (or a clean dry run); 1 some images failed, some jobs were invalid or could not
run on the model (reported before the first image, recorded failed, the others rendered); 2 the command could not
run (usage, unreadable job file, problems of the whole job file (top-level, header or [defaults] keys), problems
found by --dry-run or --check, folder locked, an output folder that is a file, read-only or full: one line on
stderr, nothing recorded is lost);
130 interrupted. Under a launcher every process exits with the run's status (rank 0's, sent once it has written the
manifest), and --dry-run / --check run on rank 0 only (the other processes exit 0 at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence

from .._version import __version__
from ..errors import AttnctlError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnctl", description="Training-free attention control for diffusers pipelines.")
    parser.add_argument("--version", action="version", version=f"attnctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    render = commands.add_parser(
        "render", help="render the images of a job file (TOML or JSONL)",
        description="Render every image of a job file into DIR/<job-id>/<seed>.png with DIR/manifest.jsonl. "
                    "Resumes by default: images already recorded and present are skipped. Run under "
                    "`accelerate launch -m attnctl render ...` to shard the images over several processes.",
    )
    render.add_argument("jobs", metavar="JOBS", help="job file (.toml, .json or .jsonl)")
    render.add_argument("--out", metavar="DIR", help="output folder (required unless --dry-run)")
    render.add_argument("--model", help="embedded model (toy-shapes, toy-shapes-grounded, tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, "
                                        "tiny-pixart; with a diffusers that has them tiny-chroma, tiny-qwenimage, "
                                        "tiny-zimage, tiny-flux2, tiny-wan), a local diffusers folder or a hub id; "
                                        "default: the job file's `model`, else the embedded default. Video pipelines "
                                        "(Wan) write <seed>.png (first frame), <seed>.mp4 (with imageio-ffmpeg installed; "
                                        "else <seed>.gif) and <seed>.frames/")
    render.add_argument("--device", default="auto", help="auto (default: the process's GPU, else CPU), cpu, cuda, cuda:N, mps")
    render.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default=None,
                        help="default: the job file's `dtype`, else auto (float32 on CPU, bfloat16/float16 on GPU)")
    render.add_argument("--backend", choices=("auto", "reference", "sdpa", "flex", "triton"), default=None,
                        help="attention backend for controlled layers; default: the job file's, else auto")
    render.add_argument("--dry-run", action="store_true", help="validate the job file and report every problem with its "
                                                               "place; load no model, write nothing")
    render.add_argument("--check", action="store_true", help="--dry-run, then load the model once and resolve every valid "
                                                             "job's words, layers and options on it (prompt encoding "
                                                             "only: no image is generated, nothing is written)")
    render.add_argument("--overwrite", action="store_true", help="render every image again (no resume)")
    render.add_argument("--fsync", action="store_true", help="flush every image and record to disk (safe against power "
                                                             "loss; renames already make a killed run safe)")
    render.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload() instead of moving the "
                                                                   "whole pipeline to the device")
    render.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    render.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                        help="auto: a progress bar on a terminal, log lines otherwise")
    render.add_argument("--manifest-interval", type=_seconds, default=60.0, metavar="SECONDS",
                        help="refresh DIR/manifest.jsonl this often during the run (default 60)")
    render.add_argument("--log-file", default=None, help="also append the log to this file")
    render.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    render.add_argument("-q", "--quiet", action="store_true", help="warnings and the summary only")

    params = commands.add_parser("params", help="print the generation parameters stored in rendered files (PNG; GIF and "
                                                "MP4 by their comment; the format chosen by the suffix)")
    params.add_argument("images", nargs="+", metavar="IMAGE")
    return parser


def _seconds(text: str) -> float:
    """--manifest-interval: a finite number of seconds >= 0 (0: refresh after every image)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0 (0: after every image), got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "render":
        return _render(args, parser)
    if args.command == "params":
        return _params(args)
    parser.print_help()
    return 2


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _CannotRun(Exception):
    """The command cannot start (exit status 2); the message is its one line on stderr."""


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """Log lines with a timestamp to stderr (and --log-file) for the command's duration; the `attnctl` logger
    is put back as it was afterwards (main() may run inside another program or a test). A --log-file that cannot
    be opened raises _CannotRun before anything runs."""
    logger = logging.getLogger("attnctl")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_StderrHandler()]
    if args.log_file:
        try:
            handlers.append(logging.FileHandler(args.log_file, encoding="utf-8"))
        except OSError as error:
            raise _CannotRun(f"cannot open --log-file {args.log_file}: {error.strerror or error}") from None
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _render(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        with _logging(args):
            return _render_logged(args, parser)
    except _CannotRun as error:
        print(f"attnctl render: {error}", file=sys.stderr)
        return 2


def _render_logged(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.dry_run and not args.check and not args.out:
        parser.error("render needs --out DIR (or --dry-run / --check)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from .runner import launcher_rank

    if (args.dry_run or args.check) and launcher_rank() != 0:
        # under a launcher, rank 0 alone checks and reports: one report, one model loaded (not one per process, all on
        # the first GPU); the others have nothing to do
        return 0
    from .jobs import load_job_file
    from .runner import Ranks, RenderOptions, dry_run, refuse_file_problems, render

    try:
        jobs = load_job_file(args.jobs)
    except AttnctlError as error:
        print(f"attnctl render: {error}", file=sys.stderr)
        return 2
    if args.dry_run or args.check:
        try:
            lines, problems = dry_run(jobs, args.out, args.model, device=args.device, dtype=args.dtype,
                                      backend=args.backend)
        except AttnctlError as error:
            print(f"attnctl render: {error}", file=sys.stderr)
            return 2
        print("\n".join(lines), flush=True)
        if args.check:
            from .runner import check_jobs, setup_problems

            setup = setup_problems(jobs, args.model, args.device)
            if setup:
                print(f"check: model check skipped: fix the {len(setup)} --model / --device problem(s) above first")
            elif jobs.jobs or not problems:  # valid jobs are resolved beside the file's problems: one pass reports all
                try:
                    lines, found = check_jobs(jobs, args.model, device=args.device, dtype=args.dtype, backend=args.backend)
                except AttnctlError as error:
                    print(f"attnctl render: {error}", file=sys.stderr)
                    return 2
                print("\n".join(lines))
                problems += found
            else:
                print("check: model check skipped: no valid job to resolve")
        return 2 if problems else 0
    try:
        refuse_file_problems(jobs)  # before the model loads: every image would be rendered without what was meant
    except AttnctlError as error:
        print(f"attnctl render: {error}", file=sys.stderr)
        return 2
    options = RenderOptions(
        out=args.out, model=args.model, device=args.device, dtype=args.dtype, backend=args.backend,
        resume=not args.overwrite, fsync=args.fsync, cpu_offload=args.cpu_offload, progress=args.progress,
        manifest_interval=args.manifest_interval,
    )
    ranks: Ranks | None = None
    finished = False
    try:
        ranks = Ranks.from_env(args.device)
        if ranks.main:
            for problem in jobs.problems:
                logging.getLogger("attnctl.render").warning("job file problem: %s", problem)
        summary = render(jobs, options, ranks=ranks)
        if summary.rank == 0 or summary.failed:
            print(summary.format(), file=sys.stderr if summary.rank else sys.stdout, flush=True)
        finished = True
        return summary.exit_code  # the run's, on every rank
    except KeyboardInterrupt:
        print("attnctl render: interrupted", file=sys.stderr)
        return 130
    except AttnctlError as error:
        print(f"attnctl render: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a fault of the output folder the renderer did not foresee: still one line
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"attnctl render: cannot write the output{where}: {error.strerror or error}", file=sys.stderr)
        return 2
    finally:
        if ranks is not None:  # after the summary: every rank waits for rank 0's, then the group ends
            ranks.close(wait=finished)


def _params(args: argparse.Namespace) -> int:
    from .outputs import read_gif_params, read_mp4_params, read_png_params

    status = 0
    for path in args.images:
        suffix = os.path.splitext(path)[1].lower()
        read = read_gif_params if suffix == ".gif" else read_mp4_params if suffix == ".mp4" else read_png_params
        try:
            params = read(path)
        except ImportError:  # an MP4 without imageio-ffmpeg
            print(f"{path}: reading an MP4's parameters needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                  "the PNG beside it (<seed>.png) holds the same parameters", file=sys.stderr)
            status = 1
            continue
        except (OSError, ValueError) as error:
            print(f"{path}: {error}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"file": path, **params}, indent=2, sort_keys=True))
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
