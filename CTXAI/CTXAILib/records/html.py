"""Self-contained HTML reports of a run or a batch, for a QA engineer to archive and open anywhere.

A run's page holds the tri-planar pictures at the target (CT, map, ground-truth outline), a 3-D rendering of the
map over the part (VTK offscreen), the target, prediction, method and settings, the checks with pass/fail, and the
provenance. Pictures are ``data:`` URIs, the style is inline and a content security policy forbids loading anything
else, so the file shows the same on a machine without network. A batch report adds the sortable table of every
defect (``batch.json``'s rows) and links to one page per explained run, written beside it in ``<name>.runs/``.

No torch: the Slicer panel makes reports in its own process.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine.files import regular_file, sha256_path
from ..engine.geometry import Box, Volume, atomic_output, read_volume
from ..errors import CTXAIError, InputError
from .sources import recorded_volume
from .report import triplanar_picture

__all__ = ["write_report", "write_record_page", "run_page", "record_page", "render_3d_png"]

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a;max-width:1280px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#eef0f4}th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#889}
.pass{color:#126b2e;font-weight:600}.fail{color:#a8141c;font-weight:600}.na{color:#667}
.verdict{display:inline-block;padding:2px 10px;border-radius:10px;background:#eef0f4;font-weight:600}
img{max-width:100%;border:1px solid #ccd}code{font-size:12px;word-break:break-all}.note{color:#556}
"""
_SORT_JS = """
function sortTable(th){var table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
var up=th.getAttribute('data-order')!=='asc';th.setAttribute('data-order',up?'asc':'desc');
var rows=Array.prototype.slice.call(body.rows);rows.sort(function(a,b){
var x=a.cells[col].getAttribute('data-v'),y=b.cells[col].getAttribute('data-v');
var p=parseFloat(x),q=parseFloat(y);var c=(!isNaN(p)&&!isNaN(q))?p-q:String(x).localeCompare(String(y));
return up?c:-c;});rows.forEach(function(r){body.appendChild(r);});}
document.querySelectorAll('th.sort').forEach(function(th){th.addEventListener('click',function(){sortTable(th);});});
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _page(title: str, body: str, script: bool = False) -> str:
    js = f"<script>{_SORT_JS}</script>" if script else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}{js}</body></html>\n")


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _state(passed: bool | None) -> str:
    return {True: '<span class="pass">pass</span>', False: '<span class="fail">FAIL</span>'}.get(
        passed, '<span class="na">n/a</span>')


def render_3d_png(ct: Volume, attribution: Volume, size: tuple[int, int] = (560, 420)) -> bytes:
    """A 3-D picture (VTK, offscreen) of the part's surface in translucent grey and the map's strongest voxels
    (|value| above half its 99.5th percentile) as a red surface. Raises :class:`RuntimeError` when VTK cannot
    render on this machine."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    def image(array: np.ndarray) -> vtk.vtkImageData:
        data = vtk.vtkImageData()
        data.SetDimensions(*reversed(array.shape))
        data.SetSpacing(*ct.spacing)
        data.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(array, np.float32).ravel(), deep=True))
        return data

    def surface(data: vtk.vtkImageData, level: float, colour, opacity: float) -> vtk.vtkActor:
        contour = vtk.vtkFlyingEdges3D()
        contour.SetInputData(data)
        contour.SetValue(0, level)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(contour.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*colour)
        actor.GetProperty().SetOpacity(opacity)
        return actor

    grey = np.asarray(ct.array if ct.array.ndim == 3 else ct.array[0], np.float32)
    low, high = np.percentile(grey, (5, 95))
    magnitude = np.abs(np.asarray(attribution.array, np.float32))
    top = float(np.percentile(magnitude[magnitude > 0], 99.5)) if (magnitude > 0).any() else 0.0
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(1.0, 1.0, 1.0)
    renderer.AddActor(surface(image(grey), float((low + high) / 2), (0.62, 0.64, 0.68), 0.25))
    if top > 0:
        renderer.AddActor(surface(image(magnitude), top / 2, (0.86, 0.1, 0.08), 1.0))
    # Headless, VTK tries X first and warns before it falls back to EGL: a report run is no place for that line.
    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    try:
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.SetSize(*size)
        window.AddRenderer(renderer)
        window.Render()
    finally:
        vtk.vtkLogger.SetStderrVerbosity(verbosity)
    renderer.ResetCamera()
    renderer.GetActiveCamera().Azimuth(35)
    renderer.GetActiveCamera().Elevation(25)
    renderer.ResetCameraClippingRange()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetWriteToMemory(1)
    writer.SetInputData(grab.GetOutput())
    writer.Write()
    png = bytes(memoryview(writer.GetResult()))
    window.Finalize()
    if not png.startswith(b"\x89PNG"):
        raise RuntimeError("VTK rendered no picture")
    return png


def _read_record(run_dir: Path) -> dict[str, Any]:
    path = regular_file(run_dir / "run.json", "Run record", InputError)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"Run record {path} is not valid JSON ({exc}). Restore it from the run's archive.") from None


def _run_volumes(run_dir: Path, record: dict[str, Any], reference_mask: str | Path | None
                 ) -> tuple[Volume, Volume, np.ndarray | None]:
    source = record.get("sources", {}).get("volume")
    if not source:
        raise InputError(f"Run record {run_dir / 'run.json'} does not name its volume file (written by the worker "
                         "or an older CTXAI), so the report has no CT to draw. Re-run it with `ctxai explain`.")
    path = Path(source["path"])
    if not path.exists():
        raise InputError(f"The run's volume {path} is no longer there, so the report has no CT to draw. Restore "
                         "the scanned file (or folder) where the run read it.")
    if sha256_path(path) != source["sha256"]:
        raise InputError(f"The run's volume {path} has changed since the run (sha256 differs): the report would "
                         "draw the map over another scan. Restore the scanned file.")
    ct = recorded_volume(record)
    attribution = read_volume(regular_file(run_dir / record["outputs"]["attribution"], "The run's map", InputError))
    if not attribution.same_geometry(ct):
        extent = record.get("extent_ijk", {})
        box = Box(extent.get("lo", (0, 0, 0)), extent.get("hi", (0, 0, 0)))
        if attribution.shape != box.shape or not np.allclose(ct.crop(box).ijk_to_ras, attribution.ijk_to_ras):
            raise InputError(f"The map in {run_dir} is not on its volume's grid nor on the run's extent. Re-run "
                             "the explanation.")
        attribution = ct.embed(attribution, box)
    mask_path = reference_mask or record.get("sources", {}).get("reference_mask", {}).get("path")
    outline = None
    if mask_path:
        mask = read_volume(mask_path)
        if not mask.same_geometry(ct):
            raise InputError(f"Reference mask {mask_path} does not have the geometry of volume {path} (shape and "
                             "IJK-to-RAS must match). Resample it onto the volume first.")
        outline = np.asarray(mask.array) > 0
    return ct, attribution, outline


def _prediction_rows(record: dict[str, Any]) -> list[tuple[str, Any]]:
    prediction = record.get("prediction") or {}
    if prediction.get("task") == "classification":
        probabilities = prediction.get("probabilities", {})
        return [("predicted class", _e(prediction.get("predicted_class"))),
                ("confidence (target class probability)", _e(f"{prediction.get('target_probability', 0):.4f}")),
                ("class probabilities", _e(", ".join(f"{k}: {v:.3f}" for k, v in probabilities.items())))]
    return [("predicted class in region", _e(prediction.get("class"))),
            ("predicted voxels in region", _e(f"{prediction.get('predicted_voxels_in_region')} of "
                                              f"{prediction.get('region_voxels')}")),
            ("confidence (mean / max probability in region)",
             _e(f"{prediction.get('mean_probability_in_region', 0):.4f} / "
                f"{prediction.get('max_probability_in_region', 0):.4f}"))]


def run_page(run_dir: str | Path, reference_mask: str | Path | None = None, back: str | None = None) -> str:
    """The HTML page of the run in ``run_dir`` (its ``run.json`` and map, and the volume it names); ``back`` is a
    relative link to the batch report the page belongs to."""
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    ct, attribution, outline = _run_volumes(run_dir, record, reference_mask)
    return record_page(record, ct, attribution, outline, name=run_dir.name, back=back)


def record_page(record: dict[str, Any], ct: Volume, attribution: Volume, outline: np.ndarray | None = None, *,
                name: str = "", back: str | None = None) -> str:
    """The HTML page of one run from its record (:func:`~.record.run_record`) and volumes: ``ct`` and
    ``attribution`` on the same grid, ``outline`` a boolean (k, j, i) ground-truth mask on it."""
    target = record.get("target", {})
    method = record.get("method", {})
    lo, hi = target.get("box", [[0, 0, 0], list(reversed(ct.shape))])
    centre = [(a + b - 1) // 2 for a, b in zip(lo, hi)]
    title = f"{method.get('name')} on {record.get('model', {}).get('name')}: {target.get('class')}"
    png, layout = triplanar_picture(ct, attribution, centre, sign=method.get("sign", "attribution"),
                                    title=title, outline=outline)
    try:
        render = f'<img id="render3d" alt="3-D rendering" src="{_png_uri(render_3d_png(ct, attribution))}">'
    except (ImportError, RuntimeError) as exc:  # no VTK or no OpenGL here: the rest of the report still holds
        render = f'<p class="note">No 3-D rendering: {_e(exc)}</p>'
    verdict = (record.get("verdict") or {})
    checks = record.get("checks") or {}
    check_rows = "".join(f"<tr><td>{_e(name)}</td><td>{_state(c.get('pass'))}</td><td>{_e(c.get('what'))}</td></tr>"
                         for name, c in checks.items())
    settings = method.get("settings") or {}
    sources = record.get("sources", {})
    versions = record.get("versions", {})
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Run {_e(name)}, made {_e(record.get("created"))}'
        + (f' &middot; <a href="{_e(back)}">batch report</a>' if back else "") + "</p>",
        "<h2>Where the model looked</h2>",
        f'<img id="triplanar" alt="tri-planar views at the target" data-layout="{_e(json.dumps(layout))}" '
        f'data-centre-ijk="{_e(json.dumps(centre))}" src="{_png_uri(png)}">',
        render,
        "<h2>Target and prediction</h2>",
        _table([("target class", _e(target.get("class"))), ("contrast", _e(target.get("contrast") or "none")),
                ("score", _e(target.get("score"))), ("region", _e(target.get("region"))),
                ("region box (IJK)", _e(f"{lo} - {hi}"))] + _prediction_rows(record)),
        "<h2>Method</h2>",
        _table([("method", _e(method.get("name"))), ("family", _e(method.get("family"))),
                ("sign", _e(method.get("sign"))), ("layer", _e(method.get("layer") or "none")),
                ("seed", _e(record.get("seed")))] + [(f"setting {k}", _e(v)) for k, v in settings.items()]),
        "<h2>Checks</h2>",
        f'<p>Verdict: <span class="verdict">{_e(verdict.get("verdict", "unchecked"))}</span></p>',
        (f"<table><tr><th>check</th><th>result</th><th>what it measured</th></tr>{check_rows}</table>"
         if check_rows else '<p class="note">No checks were run (ctxai explain --checks).</p>'),
        "<h2>Provenance</h2>",
        _table([("input voxels sha256", f"<code>{_e(record.get('input', {}).get('sha256'))}</code>")]
               + [(f"{name} file", f"<code>{_e(s.get('path'))}</code><br>sha256 <code>{_e(s.get('sha256'))}</code>")
                  for name, s in sources.items()]
               + [("model", _e(record.get("model", {}).get("name"))),
                  ("model weights sha256", f"<code>{_e(record.get('model', {}).get('sha256'))}</code>"),
                  ("device", _e(record.get("device"))), ("precision", _e(record.get("precision"))),
                  ("versions", _e(", ".join(f"{k} {v}" for k, v in versions.items()))),
                  ("time", _e(record.get("created"))),
                  ("timings (s)", _e(", ".join(f"{k} {v}" for k, v in (record.get("timings_s") or {}).items())))]
               + [("warning", _e(w)) for w in record.get("warnings", [])]),
    ]
    return _page(title, "".join(body))


def _cell(value: Any, text: str | None = None) -> str:
    shown = _e(value) if text is None else text
    return f'<td data-v="{_e("" if value is None else value)}">{shown}</td>'


def _batch_page(batch_dir: Path, out: Path, reference_mask: str | Path | None) -> str:
    path = regular_file(batch_dir / "batch.json", "Batch table", InputError)
    try:
        batch = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"Batch table {path} is not valid JSON ({exc}). Re-run `ctxai batch` to rewrite it.") from None
    pages = out.with_name(out.stem + ".runs")
    columns = ("part_id", "defect_id", "class", "voxels", "mean_confidence", "max_confidence", "selected_by",
               "method", "status", "verdict", "checks", "error", "seconds", "run")
    rows = []
    for row in batch.get("rows", []):
        link, note = "", None
        if row.get("run_dir") and row.get("status") == "done":
            name = str(row["run_dir"]).replace("/", "_").replace("\\", "_") + ".html"
            try:
                page = run_page(batch_dir / row["run_dir"], reference_mask, back=os.path.relpath(out, pages))
                with atomic_output(pages / name) as tmp:
                    tmp.write_text(page, encoding="utf-8")
                link = f'<a href="{_e(os.path.relpath(pages / name, out.parent))}">report</a>'
            except CTXAIError as exc:  # one run's files gone: the table still reports the batch
                note = f"no page: {exc}"
        checks = "; ".join(f"{k}:{'pass' if v else 'FAIL' if v is False else 'n/a'}"
                           for k, v in (row.get("checks") or {}).items())
        confidence = {k: (None if row.get(k) is None else f"{row[k]:.3f}") for k in ("mean_confidence",
                                                                                      "max_confidence")}
        rows.append("<tr>" + "".join([
            _cell(row.get("part_id")), _cell(row.get("defect_id")), _cell(row.get("class")), _cell(row.get("voxels")),
            _cell(row.get("mean_confidence"), _e(confidence["mean_confidence"])),
            _cell(row.get("max_confidence"), _e(confidence["max_confidence"])),
            _cell(row.get("selected_by")), _cell(row.get("method")), _cell(row.get("status")),
            _cell(row.get("verdict")), _cell(checks), _cell(row.get("error") or note), _cell(row.get("seconds")),
            _cell(row.get("run_dir"), link or "-")]) + "</tr>")
    counts = batch.get("counts", {})
    model = batch.get("model", {})
    header = "".join(f'<th class="sort">{_e(c)}</th>' for c in columns)
    body = [
        f"<h1>Batch report: {_e(batch_dir.name)}</h1>",
        _table([("model", _e(model.get("name"))), ("model sha256", f"<code>{_e(model.get('sha256'))}</code>"),
                ("policy", f"<code>{_e(json.dumps(batch.get('policy')))}</code>"),
                ("methods", _e(", ".join(map(str, batch.get("methods", []))))),
                ("checks", _e(", ".join(map(str, batch.get("checks", []))))),
                ("engine", _e(batch.get("engine"))), ("started", _e(batch.get("started"))),
                ("finished", _e(batch.get("finished"))),
                ("counts", _e(", ".join(f"{k} {v}" for k, v in counts.items())))]),
        "<h2>Defects</h2><p class=\"note\">Click a column heading to sort.</p>",
        f'<table id="defects"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>',
    ]
    return _page(f"Batch report {batch_dir.name}", "".join(body), script=True)


def write_record_page(record: dict[str, Any], ct: Volume, attribution: Volume, out: str | Path, *,
                      name: str = "") -> Path:
    """Write :func:`record_page` of a run to ``out`` (atomically); the Slicer panel's Report button."""
    with atomic_output(out) as tmp:
        tmp.write_text(record_page(record, ct, attribution, name=name), encoding="utf-8")
    return Path(out)


def write_report(source: str | Path, out: str | Path, reference_mask: str | Path | None = None) -> Path:
    """Write the report of ``source`` (a run folder with ``run.json``, or a batch folder with ``batch.json``) to
    ``out``; a batch's run pages go to ``<out stem>.runs/`` beside it. Returns ``out``."""
    source, out = Path(source), Path(out)
    if (source / "batch.json").is_file():
        page = _batch_page(source, out, reference_mask)
    elif (source / "run.json").is_file():
        page = run_page(source, reference_mask)
    else:
        raise InputError(f"{source} holds neither run.json (a run of `ctxai explain`) nor batch.json (a `ctxai "
                         "batch` folder). Give one of those folders.")
    with atomic_output(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
