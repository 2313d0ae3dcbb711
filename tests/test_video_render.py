"""Videos from `attnctl render` (issue 19): an MP4 where imageio-ffmpeg is importable, an animated GIF otherwise
(the GIF path is tests/test_families_new.py::test_render_writes_a_video_with_its_parameters). The MP4 tests skip
without imageio-ffmpeg (`pip install imageio-ffmpeg`, optional)."""

from __future__ import annotations

import json
import os

import pytest

from attnctl.render import outputs


def _frames(n: int = 9, size=(48, 64)):
    from PIL import Image

    return [Image.new("RGB", size, (20 * i, 255 - 20 * i, 128)) for i in range(n)]


def test_an_mp4_path_without_imageio_ffmpeg_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "video_format", lambda: "gif")
    with pytest.raises(ValueError, match="needs imageio-ffmpeg .*pip install imageio-ffmpeg.*gif"):
        outputs.save_video(_frames(), str(tmp_path / "a.mp4"), {})
    assert os.listdir(tmp_path) == []
    assert outputs.save_video(_frames(2), str(tmp_path / "a.gif"), {"x": 1}) > 0
    assert outputs.read_gif_params(str(tmp_path / "a.gif")) == {"x": 1}


def test_video_format_follows_imageio_ffmpeg():
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        expected = "mp4"
    except Exception:  # noqa: BLE001
        expected = "gif"
    assert outputs.video_format() == expected


def test_mp4_holds_the_frames_fps_and_parameters(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    params = {"prompt": "a = b; c # d \\ e", "seed": 3, "frames": 9, "fps": 16}
    path = str(tmp_path / "3.mp4")
    size = outputs.save_video(_frames(9, (47, 63)), path, params, fps=16)  # odd sizes: padded to even
    assert size == os.path.getsize(path) > 0
    assert sorted(os.listdir(tmp_path)) == ["3.mp4"]  # no temporary left
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    assert meta["fps"] == 16 and meta["size"] == (48, 64) and meta["codec"] == "h264"
    assert sum(1 for _ in reader) == 9
    assert outputs.read_mp4_params(path) == params


def test_render_writes_an_mp4_where_imageio_ffmpeg_is_importable(tmp_path, monkeypatch):
    pytest.importorskip("imageio_ffmpeg")
    from attnctl.render import cli
    from attnctl.render.runner import MANIFEST
    from attnctl.testing.new_families import available

    if not available("tiny-wan"):
        pytest.skip("tiny-wan needs diffusers >= 0.42")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "cat", "prompt": "a red cat", "seeds": [3], "steps": 2}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["render", str(jobs), "--out", str(out), "--model", "tiny-wan", "--device", "cpu", "--progress", "none",
                     "-q"]) == 0
    params = outputs.read_png_params(str(out / "cat" / "3.png"))
    assert outputs.read_mp4_params(str(out / "cat" / "3.mp4")) == params and params["frames"] == 9
    assert not (out / "cat" / "3.gif").exists()
    record = next(r for r in map(json.loads, (out / MANIFEST).read_text().splitlines()) if r.get("job") == "cat")
    assert {"cat/3.mp4", "cat/3.frames"} <= set(record["outputs"])
