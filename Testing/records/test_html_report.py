"""`ctxai report` in a real headless Chromium: a run's page and a batch's page load without console errors, their
pictures decode, a screenshot is not blank, the batch table sorts, and the embedded tri-planar picture shows the map
at the defect (and does not on a control map moved away from it)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from records_testing import PORE_IJK, ctxai

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of a page: once it has loaded, say in the DOM whether every picture decoded, and sort the
# table (when there is one) by its mean-confidence column.
PROBE = """<script>window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-decoded', images.filter(function (i) {
    return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; }).length);
  var th = Array.prototype.slice.call(document.querySelectorAll('th.sort')).filter(function (t) {
    return t.textContent === 'mean_confidence'; })[0];
  if (th) { th.click(); document.body.setAttribute('data-sorted', Array.prototype.map.call(
    document.querySelectorAll('#defects tbody tr'), function (r) { return r.cells[4].getAttribute('data-v'); }
  ).join('|')); }
});</script>"""


def chromium(page: Path, *mode: str) -> tuple[str, list[str]]:
    """Open ``page`` in headless Chromium with ``mode`` (``--dump-dom`` or ``--screenshot=PATH``); its stdout and
    the console lines it logged (messages, errors, refused loads)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed and could not be (Utilities/bootstrap.sh installs it as root)")
    with tempfile.TemporaryDirectory(prefix="ctxai-chromium-") as profile:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                              "--window-size=1000,1400", *mode, page.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]


def probed(page: Path, *mode: str) -> tuple[dict[str, str], list[str]]:
    """The probe's findings (the ``data-`` attributes it set on the body) and the console lines of ``page``."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom, console = chromium(copy, "--dump-dom", *mode)
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1))), console


@pytest.fixture(scope="module")
def reports(tmp_path_factory, recorded_run):
    from CTXAILib.records.html import write_report

    out = tmp_path_factory.mktemp("reports")
    done = ctxai("report", recorded_run["run"], "--out", out / "run.html")
    assert done.returncode == 0, done.stderr
    batch = out / "batch"
    shutil.copytree(recorded_run["run"], batch / "part-1" / "d1-saliency")
    base = {"part_id": "part-1", "volume": str(recorded_run["volume"]), "input_sha256": "0" * 64, "class": "defect",
            "centre_ijk": list(PORE_IJK), "bbox_ijk": [7, 17, 10, 14, 24, 17], "method": "saliency",
            "checks": {}, "error": None}
    rows = [dict(base, defect_id=1, voxels=123, mean_confidence=0.62, max_confidence=0.91, selected_by="all",
                 status="done", run_dir="part-1/d1-saliency", verdict="unchecked", seconds=2.5),
            dict(base, defect_id=2, voxels=40, mean_confidence=0.97, max_confidence=0.99, selected_by=None,
                 status="not_selected", run_dir=None, verdict=None, seconds=None),
            dict(base, defect_id=3, voxels=9, mean_confidence=0.31, max_confidence=0.4, selected_by="low_confidence",
                 status="failed", run_dir=None, verdict=None, error="InputError: <script>alert(1)</script>",
                 seconds=0.1)]
    (batch / "batch.json").write_text(json.dumps({
        "format": "ctxai-batch/1", "model": {"name": "unet", "sha256": "1" * 64, "path": "unet.json"},
        "policy": {"below": 0.9, "sample": 0.25, "seed": 1}, "methods": ["saliency"], "checks": [],
        "engine": "local", "started": "2026-12-01T10:00:00+00:00", "finished": "2026-12-01T10:01:00+00:00",
        "counts": {"items": 3, "done": 1, "failed": 1, "skipped": 1}, "rows": rows}))
    write_report(batch, out / "batch.html")
    return out


@pytest.fixture(scope="module")
def run_in_browser(reports):
    """The run report opened once: the probe's findings, the console lines and a screenshot."""
    attributes, console = probed(reports / "run.html", f"--screenshot={reports / 'run.png'}")
    return attributes, console, reports / "run.png"


def _varied(screenshot: Path) -> tuple[float, int]:
    """The spread of a screenshot's grey levels and how many colours it has."""
    from matplotlib.image import imread

    pixels = imread(screenshot)[..., :3]
    return float(pixels.std()), len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))


def test_the_measures_fail_on_a_blank_page_with_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    _, console = chromium(page, f"--screenshot={tmp_path / 'blank.png'}")
    assert any("undefinedFunction" in line for line in console)
    spread, colours = _varied(tmp_path / "blank.png")
    assert spread < 0.01 and colours < 5


def test_the_run_report_loads_cleanly_and_its_pictures_decode(reports, run_in_browser):
    html = (reports / "run.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "the page refers to nothing outside itself"
    attributes, console, _ = run_in_browser
    assert console == []
    assert attributes["data-images"] == attributes["data-decoded"] == "2"  # tri-planar and 3-D rendering


def test_a_screenshot_of_the_run_report_is_not_blank(run_in_browser):
    spread, colours = _varied(run_in_browser[2])
    assert spread > 0.05 and colours > 200, (spread, colours)


def _heat_centres(page: str) -> tuple[list[tuple[float, float]], list[int]]:
    """Per panel of the page's tri-planar picture: the (row, column) voxel where its map's colour is centred, and
    how many pixels of the green ground-truth outline it shows."""
    from matplotlib.image import imread

    tag = re.search(r'<img id="triplanar"[^>]*data-layout="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    layout = json.loads(tag.group(1).replace("&quot;", '"'))
    pixels = imread(io.BytesIO(base64.b64decode(tag.group(2))))[..., :3]
    assert [pixels.shape[1], pixels.shape[0]] == layout["size"]
    centres, outline = [], []
    for panel in layout["panels"]:
        x0, y0, x1, y1 = panel["bbox_px"]
        crop = pixels[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))]
        r, g, b = crop[..., 0], crop[..., 1], crop[..., 2]
        green = (g > 0.6) & (r < 0.4) & (b < 0.4)
        heat = np.where(green, 0.0, crop.max(axis=-1) - crop.min(axis=-1))  # grey CT has no saturation
        heat[heat < 0.25] = 0
        rows, cols = np.indices(heat.shape)
        weight = heat.sum()
        assert weight > 0, f"no map colour in the {panel['plane']} panel"
        (r0, r1), (c0, c1) = panel["rows"], panel["columns"]
        centres.append((r0 + ((rows * heat).sum() / weight + 0.5) * (r1 - r0) / heat.shape[0] - 0.5,
                        c0 + ((cols * heat).sum() / weight + 0.5) * (c1 - c0) / heat.shape[1] - 0.5))
        outline.append(int(green.sum()))
    return centres, outline


def test_the_tri_planar_picture_shows_the_map_at_the_defect(reports, recorded_run):
    from CTXAILib import read_volume
    from CTXAILib.records.html import record_page

    i, j, k = PORE_IJK
    expected = [(j, i), (k, i), (k, j)]  # axial (rows j, columns i), coronal (k, i), sagittal (k, j)
    centres, outline = _heat_centres((reports / "run.html").read_text(encoding="utf-8"))
    for plane, centre, where in zip(("axial", "coronal", "sagittal"), centres, expected):
        assert np.hypot(centre[0] - where[0], centre[1] - where[1]) < 2.5, (plane, centre, where)
    assert min(outline) > 10, "the ground-truth outline is drawn in every panel"
    # The control: the same run with its map moved 8 voxels along i is not found at the defect.
    record = json.loads((recorded_run["run"] / "run.json").read_text())
    ct = read_volume(recorded_run["volume"])
    attribution = read_volume(recorded_run["run"] / "attribution.nrrd")
    moved = attribution.with_array(np.roll(attribution.array, 8, axis=2))
    centres, _ = _heat_centres(record_page(record, ct, moved))
    assert np.hypot(centres[0][0] - j, centres[0][1] - i) > 5


def test_the_batch_report_sorts_and_links_its_runs(reports):
    html = (reports / "batch.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    links = re.findall(r'<a href="([^"]+)">report</a>', html)
    assert links == ["batch.runs/part-1_d1-saliency.html"]
    attributes, console = probed(reports / "batch.html")
    assert console == []
    assert attributes["data-sorted"] == "0.31|0.62|0.97"
    run_page = (reports / links[0]).read_text(encoding="utf-8")
    assert '<a href="../batch.html">batch report</a>' in run_page and 'id="triplanar"' in run_page
