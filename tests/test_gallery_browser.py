"""The render gallery (`DIR/index.html`) in a real headless browser (issue #18): every image loads, no console
errors, and a screenshot. Needs Chromium (Debian: `apt-get install -y chromium`); skipped, with the reason shown
(`pytest -rs`), where it is not installed. `.ci/run` installs it when it can; `make test-browser` runs this file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from attnctl.render import cli
from attnctl.render.generate import Model

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium); "
                                                         "the gallery is not checked in a browser")

#: Appended to a copy of the page in the same folder: after every image settled, the results go into the DOM,
#: which --dump-dom prints.
PROBE = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var report = images.map(function (img) {
    return {src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth};
  });
  var out = document.createElement('pre');
  out.id = 'probe-result';
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="attnctl-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def gallery(tmp_path, tiny_cache, monkeypatch):
    """A real render on tiny-sd: two jobs that differ only by their controls (an A/B row), one of them with
    attention maps (overlays beside the images), and a job with another prompt."""
    jobs = tmp_path / "jobs.jsonl"
    common = {"prompt": "a red car on the street", "seeds": [0, 1], "steps": 2, "guidance_scale": 5.0}
    lines = [{"model": "tiny-sd"}, {"id": "stock", **common},
             {"id": "maps", **common, "controls": [{"type": "attention-maps", "words": ["red", "car"]}]},
             {"id": "muted", **common, "controls": [{"type": "reweight", "weights": {"red": 0.0}}]},
             {"id": "other", "prompt": "a blue house", "seeds": [3], "steps": 2}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = Model(tiny_cache("tiny-sd"), "tiny-sd")
    monkeypatch.setattr(Model, "load", classmethod(lambda cls, *a, **k: model))
    out = tmp_path / "out"
    try:
        assert cli.main(["render", str(jobs), "--out", str(out), "--progress", "none"]) == 0
    finally:
        model.release()
    return out


def test_gallery_loads_every_image_without_console_errors(gallery, tmp_path):
    page = (gallery / "index.html").read_text()
    probe = gallery / ".probe.html"  # same folder: the same relative image paths
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    result = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stdout[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) >= 7 + 2 * 2 + 2 * 3  # 7 thumbnails, 2 overlays per maps image, A/B cells
    broken = [image for image in images if not image["complete"] or image["width"] <= 0]
    assert not broken, broken
    assert any("attention_maps" in image["src"] for image in images)
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
               or "Failed to load resource" in line]
    assert not console, console

    screenshot = tmp_path / "gallery.png"
    shot = chromium("--window-size=1200,1400", "--hide-scrollbars", f"--screenshot={screenshot}",
                    (gallery / "index.html").as_uri())
    assert shot.returncode == 0 and screenshot.stat().st_size > 1000, shot.stderr[-2000:]
    target = os.environ.get("ATTNCTL_GALLERY_SCREENSHOT")  # make gallery-screenshot: docs/images/gallery.png
    if target:
        shutil.copyfile(screenshot, target)
