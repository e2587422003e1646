"""What a finished run leaves for people to look at: the HTML report in its run folder, and Prefect artifacts.

* ``report.html`` in the run folder (``gsr_core.report_html``), with the history of the pipeline's series from
  the store's history (``gsr_core.history``): the series of its ``record_history`` nodes, else the pipeline's name.
* For the Prefect UI, on the flow run: a table artifact per evaluation (key ``gsr-metrics-<pipeline>-<node>``,
  one row per method with its mean metrics), and a markdown artifact summarising the run (key
  ``gsr-run-<pipeline>``: each node's status and time, and where the report is). Keys make the UI's Artifacts page
  keep each one's versions across runs. (Long nodes report progress artifacts themselves: ``tasks.progress``.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.spec import Pipeline, load_pipeline, validate
from gsr_core.history import History
from gsr_core.report_html import write_run_report

HISTORY_NODE = "record_history"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from names such as a pipeline's and a node's."""
    return "-".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") or "x" for part in parts)


def history_series(pipeline: Pipeline) -> list[str]:
    """The history series a pipeline's runs are recorded under: its ``record_history`` nodes' series (their
    ``series`` param, by default the pipeline's name), or the pipeline's name when it has no such node."""
    series = [planned.params.get("series") or pipeline.name for planned in pipeline.nodes
              if planned.node_type.name == HISTORY_NODE]
    return list(dict.fromkeys(series)) or [pipeline.name]


def write_report(pipeline: Pipeline, run_folder: Path) -> Path:
    """Write (or rewrite) the run folder's ``report.html`` with the history of the pipeline's series."""
    history = History.for_store(run_folder.parent.parent)
    rows = [row for series in history_series(pipeline) for row in history.rows(spec=series)]
    return write_run_report(run_folder, history=rows)


def _metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"method": name, **{metric: values["mean"][metric] for metric in report["metrics"]}}
            for name, values in report["candidates"].items()]


def publish_artifacts(pipeline: Pipeline, reports: list[dict[str, Any]], store_root: Path, report_page: Path) -> None:
    """Inside the flow run: a table artifact per evaluation output and a markdown summary of the run.

    Args:
        reports: the run's node reports (``node``, ``task``, ``status``, ``seconds``, ``path``, ...), in order.
        report_page: the run's ``report.html``.
    """
    for node in reports:
        metrics_file = store_root / node["path"] / "metrics.json" if node.get("path") else None
        if metrics_file is None or not metrics_file.is_file():
            continue
        report = json.loads(metrics_file.read_text())
        create_table_artifact(
            table=_metrics_table(report), key=artifact_key("gsr-metrics", pipeline.name, node["node"]),
            description=f"{pipeline.name} / {node['node']}: mean {', '.join(report['metrics'])} of each method on "
                        f"{len(report['views'])} {report['split']} views")
    lines = [f"# gsr run: {pipeline.name}", "", f"Report: `{report_page}`", "",
             "| node | type | status | seconds |", "|---|---|---|---:|"]
    for node in reports:
        seconds = f"{node['seconds']:.1f}" if node["status"] != "cached" else "cached"
        lines.append(f"| {node['node']} | {node['task']} | {node['status']} | {seconds} |")
    create_markdown_artifact(markdown="\n".join(lines) + "\n", key=artifact_key("gsr-run", pipeline.name),
                             description=f"{pipeline.name}: nodes, their status and time, and the report's path")


def rewrite_report(target: str | Path, store: str | Path) -> Path:
    """``gsr report``: rewrite the report of a run folder, or of the latest run of a spec in ``store`` (e.g. to
    show history recorded since). Returns the page's path.

    Raises:
        SpecError for an invalid spec; ValueError when ``target`` is neither a run folder nor a spec with a run.
    """
    target = Path(target)
    if (target / "summary.json").is_file():
        run_folder = target.resolve()
    else:
        name = load_pipeline(target).name
        runs = sorted(folder for folder in (Path(store) / "runs").glob("*-*") if folder.name.split("-", 1)[1] == name)
        if not runs:
            raise ValueError(f"{target}: the store {store} has no run of pipeline {name!r} yet "
                             f"(gsr run {target} --store {store})")
        run_folder = runs[-1].resolve()
    pipeline = validate(yaml.safe_load((run_folder / "spec.yaml").read_text()), source=str(run_folder / "spec.yaml"))
    return write_report(pipeline, run_folder)
