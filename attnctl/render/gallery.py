"""`DIR/index.html`: a static page over a render's output folder, written (atomically) at the end of every run.

No network and no external assets: one HTML file with inline CSS, the images referenced by relative paths
(`<job-id>/<seed>.png`), so the folder can be copied or served as it is. It shows:

- the run: model, images rendered / skipped / failed, and its timings;
- per job: its prompt, settings and controls, and a grid of thumbnails (seed under each image, the image's
  own parameters in its tooltip); the attention-map overlays a control saved beside an image are shown next to it
  (a video's or sequence's own frames are not: its `<seed>.mp4` / `<seed>.gif` is linked under the image);
  images that failed show their error instead;
- A/B rows: jobs that differ only by their controls (same prompt, settings and seeds) side by side, one row
  per seed, one column per job.
"""

from __future__ import annotations

import datetime
import html
import json
import os
from typing import Any
from urllib.parse import quote

from . import outputs

GALLERY = "index.html"
THUMBNAIL = 160  # CSS pixels; small images are scaled up without smoothing

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.6em 0 .3em}
table.run td{padding:.1em .8em .1em 0}
.meta{font-size:.85em;color:#444;margin:.2em 0 .6em}
.meta code{background:#eee;padding:0 .25em;border-radius:3px}
.grid{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:.4em}
figure .row{display:flex;gap:.3em;align-items:flex-start}
img{width:%Tpx;height:auto;image-rendering:pixelated;display:block}
img.map{width:%Mpx}
figcaption{font-size:.8em;color:#444;margin-top:.2em;max-width:%Cpx;overflow-wrap:anywhere}
.failed{width:%Tpx;min-height:%Tpx;background:#fee;color:#900;font-size:.75em;padding:.3em;box-sizing:border-box;
overflow-wrap:anywhere}
table.ab{border-collapse:collapse}table.ab td,table.ab th{border:1px solid #ddd;padding:.3em;vertical-align:top;
font-size:.8em;background:#fff}
""".replace("%T", str(THUMBNAIL)).replace("%M", str(THUMBNAIL // 2)).replace("%C", str(THUMBNAIL * 2))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _src(path: str) -> str:
    return quote(path.replace(os.sep, "/"), safe="/")


def _controls_text(controls: list[dict[str, Any]]) -> str:
    if not controls:
        return "no controls"
    return "; ".join(json.dumps(control, sort_keys=True, default=str) for control in controls)


def _job_settings(job: Any) -> dict[str, Any]:
    return {
        "prompt": job.prompt, "negative_prompt": job.negative_prompt, "steps": job.steps, "width": job.width,
        "height": job.height, "guidance_scale": job.guidance_scale, "options": dict(job.options),
    }


def _maps(out: str, record: dict[str, Any]) -> list[str]:
    """Relative paths of the PNGs a control saved beside this image (attention-map overlays first). The frames
    folder of a video or sequence (`<seed>.frames/`) is the image's own frames, not a control's: not listed."""
    found: list[str] = []
    frames = f"{record.get('seed')}.frames"
    for folder in record.get("outputs") or ():
        full = os.path.join(out, folder)
        if os.path.basename(os.path.normpath(str(folder))) == frames or not os.path.isdir(full):
            continue
        names = sorted(name for name in os.listdir(full) if name.lower().endswith(".png") and not name.startswith("."))
        names.sort(key=lambda name: (name.endswith("_grid.png"), name))  # overlays before grids
        found.extend(f"{folder}/{name}" for name in names)
    return found


def _videos(out: str, record: dict[str, Any]) -> list[str]:
    """Relative paths of the video (`<seed>.mp4` or `<seed>.gif`) of a video or sequence image, when present."""
    return [str(path) for path in record.get("outputs") or ()
            if str(path).lower().endswith((".mp4", ".gif")) and os.path.isfile(os.path.join(out, str(path)))]


def _image_cell(out: str, job: Any, seed: int, record: dict[str, Any] | None, with_maps: bool = True) -> str:
    title = f"seed {seed}\n{job.prompt}"
    if job.negative_prompt:
        title += f"\nnegative: {job.negative_prompt}"
    title += f"\ncontrols: {_controls_text([c.to_dict() for c in job.controls]) if _serialisable(job) else 'see job'}"
    videos: list[str] = []
    if record is None:
        body = '<div class="failed">not rendered yet</div>'
    elif record.get("status") != "ok" or not os.path.isfile(os.path.join(out, str(record.get("path", "")))):
        body = f'<div class="failed">failed: {_e(record.get("error") or "missing file")}</div>'
    else:
        parts = [f'<img src="{_src(record["path"])}" alt="{_e(job.id)} seed {seed}" title="{_e(title)}">']
        if with_maps:
            for path in _maps(out, record):
                label = os.path.splitext(os.path.basename(path))[0]
                parts.append(f'<img class="map" src="{_src(path)}" alt="{_e(label)}" title="{_e(label)}">')
        body = f'<div class="row">{"".join(parts)}</div>'
        videos = _videos(out, record)
    seconds = (record or {}).get("seconds") or {}
    timing = f" · {seconds['total']:.2f} s" if isinstance(seconds.get("total"), (int, float)) else ""
    links = "".join(f' · <a href="{_src(path)}">{_e(os.path.basename(path))}</a>' for path in videos)
    return f"<figure>{body}<figcaption>seed {seed}{timing}{links}</figcaption></figure>"


def _serialisable(job: Any) -> bool:
    try:
        for control in job.controls:
            control.to_dict()
    except Exception:  # noqa: BLE001 - an in-memory mask: the tooltip says so
        return False
    return True


def ab_groups(jobs: Any) -> list[list[Any]]:
    """Groups of two or more jobs that differ only by their controls (same prompt, settings and seeds)."""
    groups: dict[str, list[Any]] = {}
    for job in jobs:
        key = json.dumps({**_job_settings(job), "seeds": list(job.seeds)}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(job)
    return [group for group in groups.values() if len(group) > 1]


def render_html(out: str, jobs: Any, records: dict[tuple[str, int], dict[str, Any]], *, summary: Any = None,
                model: str = "") -> str:
    """The page as a string (see the module docstring)."""
    job_list = list(jobs.jobs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>attnctl render: {_e(os.path.basename(jobs.path))}</title><style>{_CSS}</style></head><body>",
             f"<h1>attnctl render: {_e(os.path.basename(jobs.path))}</h1>"]
    rows = [("model", model), ("written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))]
    if summary is not None:
        rows += [
            ("images", f"{summary.images}: {summary.rendered} rendered, {summary.skipped} skipped (already done), "
                       f"{len(summary.failed)} failed"),
            ("run", f"{summary.seconds:.1f} s (model load {summary.load_seconds:.1f} s)"),
        ]
        timings = getattr(summary, "timings", None) or {}
        if timings.get("images"):
            n = timings["images"]
            rows.append(("per image", f"generate {timings['generate'] / n:.2f} s, save {timings['save'] / n:.3f} s "
                                      f"(mean over {n} image(s) rendered by this process)"))
    parts.append('<table class="run">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>")

    groups = ab_groups(job_list)
    if groups:
        parts.append("<h2>A/B: jobs that differ only by their controls</h2>")
        for group in groups:
            first = group[0]
            parts.append(f'<p class="meta">prompt <code>{_e(first.prompt)}</code></p><table class="ab"><tr><th>seed</th>')
            parts.extend(f"<th>{_e(job.id)}<br>{_e(', '.join(c.type_name for c in job.controls) or 'no controls')}</th>"
                         for job in group)
            parts.append("</tr>")
            for seed in first.seeds:
                parts.append(f"<tr><td>{seed}</td>")
                parts.extend(f"<td>{_image_cell(out, job, seed, records.get((job.id, seed)), with_maps=False)}</td>"
                             for job in group)
                parts.append("</tr>")
            parts.append("</table>")

    for job in job_list:
        settings = ", ".join(f"{k} {v}" for k, v in (("steps", job.steps), ("size", f"{job.width}x{job.height}" if job.width else None),
                                                     ("guidance", job.guidance_scale)) if v is not None)
        controls = _controls_text([c.to_dict() for c in job.controls]) if _serialisable(job) else "(controls with in-memory data)"
        parts.append(f'<h2 id="{_e(job.id)}">{_e(job.id)}</h2>')
        parts.append(f'<div class="meta">prompt <code>{_e(job.prompt)}</code>'
                     + (f" · negative <code>{_e(job.negative_prompt)}</code>" if job.negative_prompt else "")
                     + (f" · {_e(settings)}" if settings else "")
                     + (f" · options <code>{_e(json.dumps(dict(job.options), sort_keys=True))}</code>" if job.options else "")
                     + f"<br>controls <code>{_e(controls)}</code> · {_e(job.place)}</div>")
        parts.append('<div class="grid">' + "".join(_image_cell(out, job, seed, records.get((job.id, seed)))
                                                    for seed in job.seeds) + "</div>")
    if jobs.invalid:
        parts.append("<h2>Invalid jobs</h2><ul>")
        parts.extend(f"<li>{_e(job.place)} {_e(job.id or '')}: {_e('; '.join(p.message for p in job.problems))}</li>"
                     for job in jobs.invalid)
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_gallery(out: str, jobs: Any, records: dict[tuple[str, int], dict[str, Any]], *, summary: Any = None,
                  model: str = "", fsync: bool = False) -> str:
    """Write `out/index.html` atomically; returns its path."""
    path = os.path.join(out, GALLERY)
    outputs.atomic_write(path, render_html(out, jobs, records, summary=summary, model=model).encode("utf-8"), fsync=fsync)
    return path
