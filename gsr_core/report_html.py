"""The static HTML report of one pipeline run: one page in the run folder that works offline, from file://.

Files, next to the run's ``spec.yaml`` and ``summary.json``::

    <store>/runs/<stamp>-<name>/report.html     the page (no script, no server, nothing fetched from the network)
    <store>/runs/<stamp>-<name>/report/*.png    its plots (matplotlib, Agg)

The page shows, for each evaluation of the run (a node output with ``metrics.json``): the method table (mean of
each metric, best marked, with the Gaussian count of each 3DGS method), the metrics per view, each metric against
the Gaussian count, and the comparison picture at full resolution (one image pixel per screen pixel); then the
history of the pipeline's metrics over its runs (rows of ``gsr_core.history``, when given); the time each node
took; and links to every 3DGS scene (PLY) of the run. Every link is relative: plots in ``report/``, outputs in the
store's ``objects/`` two folders up, so a copied or moved store keeps a working report.

The method table follows the evaluation's ranking and shows what ``metrics.json`` says of each method: its mean
metrics, the size and producing time of the 3DGS (or 2D SR) that made it, and its gap closure when the evaluation
has a baseline and an upper bound.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gsr_core.evaluation import HIGHER_IS_BETTER
from gsr_core.history import plot_history
from gsr_core.ply import read_ply_header

REPORT_FILE = "report.html"
ASSETS_DIR = "report"
SCENE_PROPERTIES = {"opacity", "scale_0", "rot_0", "f_dc_0"}  # a PLY with these is a 3DGS scene (Inria layout)
_DPI = 100


@dataclass(frozen=True)
class Scene:
    """A 3DGS scene (PLY file) among a run's outputs."""

    node: str
    path: Path
    gaussians: int


def _store_root(run_folder: Path) -> Path:
    if run_folder.parent.name != "runs":
        raise ValueError(f"{run_folder} is not a run folder: expected <store>/runs/<stamp>-<name>")
    return run_folder.parent.parent


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the {what}: {error}") from None


def _scene_ply(folder: Path) -> tuple[Path, int] | None:
    """The 3DGS PLY file in an output folder and its Gaussian count, or None when it holds none."""
    for path in sorted(folder.glob("*.ply")):
        count, properties = read_ply_header(path)
        if SCENE_PROPERTIES <= set(properties):
            return path, count
    return None


def _number(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def _finite(pairs: list[tuple[Any, float]]) -> list[tuple[Any, float]]:
    return [(x, y) for x, y in pairs if math.isfinite(y)]


def plot_per_view(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: each candidate's value on every evaluated view."""
    metrics, views = report["metrics"], report["views"]
    figure = Figure(figsize=(max(6.0, 3.0 + 0.45 * len(views)), 2.6 * len(metrics)))
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for axis, metric in zip(axes, metrics):
        for candidate, values in report["candidates"].items():
            points = _finite([(index, values["per_view"][view][metric]) for index, view in enumerate(views)])
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=candidate)
        axis.set_xticks(range(len(views)), views, rotation=45 if len(views) > 8 else 0, fontsize=8)
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} per view ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)",
                       fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)


def plot_against_gaussians(report: dict[str, Any], counts: dict[str, int], path: Path) -> None:
    """One panel per metric: each candidate with a Gaussian count, its mean metric against that count."""
    metrics = report["metrics"]
    figure = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    spread = max(counts.values()) / max(1, min(counts.values()))
    for axis, metric in zip(axes, metrics):
        for candidate, count in counts.items():
            value = report["candidates"][candidate]["mean"][metric]
            if math.isfinite(value):
                axis.scatter([count], [value])
                axis.annotate(candidate, (count, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if spread > 10:
            axis.set_xscale("log")
        else:
            axis.xaxis.set_major_locator(MaxNLocator(4))
        axis.margins(x=0.25, y=0.15)  # room for the labels
        axis.set_xlabel("Gaussians")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} vs Gaussian count", fontsize=10)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8e8; }
.bar { display: inline-block; height: 10px; background: #4a90d9; vertical-align: middle; }
.note { color: #8a5a00; }
figure { margin: 12px 0; }
figure img.plot { max-width: 100%; height: auto; }
.full { overflow: auto; max-width: 100%; border: 1px solid #ddd; }
.full img { max-width: none; image-rendering: pixelated; display: block; }
figcaption { color: #555; font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: Path, run_folder: Path) -> str:
    """A relative link from the page in ``run_folder`` to ``path``, URL-quoted and HTML-escaped."""
    return html.escape(quote(Path(os.path.relpath(path, run_folder)).as_posix()), quote=True)


def _info(report: dict[str, Any], key: str) -> dict[str, Any]:
    """Candidate -> ``info[key]`` of the candidates whose ``metrics.json`` entry knows it."""
    return {name: entry["info"][key] for name, entry in report["candidates"].items()
            if (entry.get("info") or {}).get(key) is not None}


def _method_table(node: str, report: dict[str, Any]) -> str:
    """The methods in ranking order: rank, mean metrics (best in bold), Gaussians, seconds, gap closure."""
    metrics, candidates = report["metrics"], report["candidates"]
    best = {}
    for metric in metrics:
        values = [candidates[name]["mean"][metric] for name in candidates
                  if math.isfinite(candidates[name]["mean"][metric])]
        best[metric] = (max(values) if HIGHER_IS_BETTER[metric] else min(values)) if values else None
    gaussians, seconds = _info(report, "gaussians"), _info(report, "seconds")
    gaps = {name: entry["gap_closure"] for name, entry in candidates.items() if "gap_closure" in entry}
    extra = [("Gaussians", gaussians, lambda v: f"{v:,}"), ("seconds", seconds, lambda v: f"{v:.1f}"),
             ("gap closure", gaps, lambda v: "-" if v is None else f"{v:.2f}")]
    extra = [(title, values, shown) for title, values, shown in extra if values]
    header = "".join(f'<th class="num">{_e(metric.upper())} {"&uarr;" if HIGHER_IS_BETTER[metric] else "&darr;"}'
                     f"</th>" for metric in metrics) + "".join(f'<th class="num">{_e(t)}</th>' for t, _, _ in extra)
    rows = []
    for rank, name in enumerate(report.get("ranking") or list(candidates), start=1):
        cells = []
        for metric in metrics:
            value = candidates[name]["mean"][metric]
            text = _e(_number(metric, value))
            marked = len(candidates) > 1 and value == best[metric]
            cells.append(f'<td class="num">{f"<strong>{text}</strong>" if marked else text}</td>')
        cells += [f'<td class="num">{_e(shown(values[name])) if name in values else "-"}</td>'
                  for _, values, shown in extra]
        rows.append(f'<tr><td class="num">{rank}</td><td class="method">{_e(name)}</td>{"".join(cells)}</tr>')
    return (f'<table class="methods" id="metrics-{_e(node)}"><thead><tr><th class="num">#</th><th>method</th>'
            f'{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _figure(src: str, caption: str, alt: str, full: bool = False) -> str:
    image = f'<img src="{src}" alt="{_e(alt)}"' + ("" if full else ' class="plot"') + ">"
    body = f'<div class="full">{image}</div>' if full else image
    return f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>"


def _evaluation_section(node: str, folder: Path, run_folder: Path, assets: Path) -> str:
    report = _read_json(folder / "metrics.json", "evaluation")
    counts = _info(report, "gaussians")
    ranked = f"ranked by {report['ranked_by']}; " if "ranked_by" in report else ""
    parts = [f"<h2>{_e(node)}</h2>",
             f'<p class="meta">{_e(report["split"])} split, {len(report["views"])} views; {_e(ranked)}best of each '
             f"metric in bold; Gaussians and seconds: size and producing time of the 3DGS (or 2D SR) each method "
             f"comes from.</p>",
             _method_table(node, report)]
    if report["lpips"]["requested"] and not report["lpips"]["available"]:
        parts.append(f'<p class="note">LPIPS unavailable: {_e(report["lpips"]["reason"])}</p>')
    per_view = assets / f"{node}-per-view.png"
    plot_per_view(report, per_view)
    parts.append(_figure(_href(per_view, run_folder), "each metric on every evaluated view", f"{node} per view"))
    if counts:
        against = assets / f"{node}-gaussians.png"
        plot_against_gaussians(report, counts, against)
        parts.append(_figure(_href(against, run_folder), "mean metric against the number of Gaussians",
                             f"{node} metric vs Gaussians"))
    comparison = folder / "comparison.png"
    if comparison.is_file():
        parts.append(_figure(_href(comparison, run_folder), "reference and methods side by side with enlarged "
                             "crops, at full resolution (scroll sideways)", f"{node} comparison", full=True))
    return "\n".join(parts)


def _timings_section(nodes: list[dict[str, Any]], run_folder: Path) -> str:
    store_root = _store_root(run_folder)
    longest = max([node["seconds"] for node in nodes] + [node.get("computed_seconds") or 0 for node in nodes] + [1e-9])
    rows = []
    for node in nodes:
        seconds = node["seconds"] if node["status"] != "cached" else (node.get("computed_seconds") or 0.0)
        took = f"{node['seconds']:.1f}" if node["status"] != "cached" else (
            f"cached (computed in {node['computed_seconds']:.1f})" if node.get("computed_seconds") is not None
            else "cached")
        bar = f'<span class="bar" style="width:{max(1, round(160 * seconds / longest))}px"></span>'
        output = (f'<a href="{_href(store_root / node["path"], run_folder)}/">{_e(node["key"])}</a>'
                  if node.get("path") else _e(node.get("error") or ""))
        rows.append(f'<tr class="{_e(node["status"])}"><td>{_e(node["node"])}</td><td>{_e(node["task"])}</td>'
                    f'<td>{_e(node["status"])}</td><td class="num">{_e(took)}</td><td>{bar}</td><td>{output}</td></tr>')
    return ('<h2>Timings</h2><table id="timings"><thead><tr><th>node</th><th>type</th><th>status</th>'
            '<th class="num">seconds</th><th></th><th>output</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def run_scenes(nodes: list[dict[str, Any]], store_root: Path) -> list[Scene]:
    """The 3DGS scenes (PLY files in the 3DGS layout) among the outputs of a run's nodes, in node order."""
    scenes = []
    for node in nodes:
        if node.get("path"):
            found = _scene_ply(store_root / node["path"])
            if found is not None:
                scenes.append(Scene(node["node"], found[0], found[1]))
    return scenes


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def _scenes_section(scenes: list[Scene], run_folder: Path) -> str:
    rows = "".join(f'<tr><td>{_e(scene.node)}</td><td><a class="ply" href="{_href(scene.path, run_folder)}">'
                   f'{_e(scene.path.name)}</a></td><td class="num">{scene.gaussians:,}</td>'
                   f'<td class="num">{_size(scene.path.stat().st_size)}</td></tr>' for scene in scenes)
    return ('<h2>3DGS scenes</h2><p class="meta">PLY files in the Inria layout: they open in common 3DGS '
            'viewers.</p><table id="scenes"><thead><tr><th>node</th><th>file</th><th class="num">Gaussians</th>'
            f'<th class="num">size</th></tr></thead><tbody>{rows}</tbody></table>')


def write_run_report(run_folder: str | Path, history: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.html`` and its plots into a run folder (replacing earlier ones); returns the page's path.

    Args:
        run_folder: ``<store>/runs/<stamp>-<name>`` with ``spec.yaml`` and ``summary.json``.
        history: rows of ``gsr_core.history.History.rows`` for the pipeline's series (oldest first); None or
            empty leaves the history section out.
    """
    run_folder = Path(run_folder).resolve()
    store_root = _store_root(run_folder)
    spec = yaml.safe_load((run_folder / "spec.yaml").read_text()) if (run_folder / "spec.yaml").is_file() else {}
    nodes = _read_json(run_folder / "summary.json", "run summary")
    assets = run_folder / ASSETS_DIR
    shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir()
    name = spec.get("name", run_folder.name)
    counted = {status: sum(node["status"] == status for node in nodes) for status in ("ran", "cached", "failed",
                                                                                          "skipped")}
    stamp = run_folder.name.split("-", 1)[0]
    try:
        started = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        started = stamp
    parts = [f"<h1>{_e(name)}</h1>"]
    if spec.get("description"):
        parts.append(f"<p>{_e(spec['description'])}</p>")
    parts.append(f'<p class="meta">run of {_e(started)}; {len(nodes)} nodes: '
                 + ", ".join(f"{count} {status}" for status, count in counted.items() if count)
                 + f'; store {_e(store_root)}; <a href="spec.yaml">spec.yaml</a> (overrides applied), '
                 f'<a href="summary.json">summary.json</a></p>')
    evaluations = [node for node in nodes
                   if node.get("path") and (store_root / node["path"] / "metrics.json").is_file()]
    if not evaluations:
        parts.append('<p class="note">This run has no evaluation (no node wrote metrics.json).</p>')
    for node in evaluations:
        parts.append(_evaluation_section(node["node"], store_root / node["path"], run_folder, assets))
    if history:
        chart = assets / "history.png"
        plot_history(history, chart)
        parts.append("<h2>History</h2>" + _figure(_href(chart, run_folder), f"each metric over the recorded runs "
                                                  f"of {name} (oldest on the left)", "history"))
    parts.append(_timings_section(nodes, run_folder))
    scenes = run_scenes(nodes, store_root)
    if scenes:
        parts.append(_scenes_section(scenes, run_folder))
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>gsr report: {_e(name)}</title><link rel="icon" href="data:,"><style>{_STYLE}</style></head>\n'
            "<body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = run_folder / REPORT_FILE
    path.write_text(page)
    return path
