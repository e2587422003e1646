"""Running a pipeline spec as one Prefect flow: one task run per node, references between them.

Every node task is submitted at once, with its upstream nodes' futures as inputs, so independent branches run
concurrently (on the spec's runner: Prefect's thread pool, or a Dask cluster; ``flows.runners``). Each finished
node is reported as ``cached`` (Prefect's cache or the store already had its output) or ``ran`` with its wall
time; a failed node stops only its dependents.

Each run gets a folder ``<store>/runs/<UTC stamp>-<name>/`` with the resolved spec (``spec.yaml``, overrides
applied), ``summary.json``, ``nodes/<node>`` links to every node's output folder and the HTML report
(``report.html``); the flow run gets Prefect artifacts with the metrics (``flows.artifacts``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.exceptions import UnfinishedRun
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed

from flows.artifacts import publish_artifacts, write_report
from flows.runners import node_submitter
from flows.spec import Pipeline, validate
from gsr_core.store import NODE_FILE, Store


@dataclass
class NodeReport:
    node: str
    task: str
    status: str  # "cached", "ran", "failed", "skipped"
    seconds: float
    key: str | None = None
    path: str | None = None
    error: str | None = None
    computed_seconds: float | None = None  # for cached nodes: how long the node took when it was computed


class PipelineFailed(RuntimeError):
    """Some nodes failed; the message names each with its error. Finished nodes stay cached."""


class PipelineAlert(RuntimeError):
    """Every node finished, but some flagged a problem in their own output (e.g. ``record_history`` found a
    metric regression); the message has one line per alert. Outputs stay cached; `gsr run` exits with 3."""


def _alerts(pipeline: Pipeline, reports: list[NodeReport], store: Store) -> list[str]:
    """What finished nodes flagged in their outputs (node types with an ``alerts`` hook), one line each."""
    return [f"node {planned.name!r} ({planned.node_type.name}): {line}"
            for planned, report in zip(pipeline.nodes, reports)
            if report.status in ("cached", "ran") and planned.node_type.alerts
            for line in planned.node_type.alerts(store.root / report.path)]


def _task_inputs(planned, futures: dict[str, PrefectFuture]) -> dict[str, Any]:
    return {port: [futures[name] for name in value] if isinstance(value, list) else futures[value]
            for port, value in planned.inputs.items()}


def _start_run_folder(store: Store, pipeline: Pipeline) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = store.root / "runs" / f"{stamp}-{pipeline.name}"
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(pipeline.spec, sort_keys=False))
    return folder


def _finish_run_folder(folder: Path, reports: list[NodeReport]) -> None:
    links = folder / "nodes"
    links.mkdir(exist_ok=True)
    for report in reports:
        if report.path:
            (links / report.node).symlink_to(Path("..") / ".." / ".." / report.path)
    (folder / "summary.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))


def _report(planned, future: PrefectFuture, store: Store, started: float) -> NodeReport:
    try:
        outcome = future.result(raise_on_failure=False)  # waits for the final state
    except UnfinishedRun:  # Prefect leaves a node whose upstream failed pending
        return NodeReport(planned.name, planned.node_type.name, "skipped", 0.0, error="an upstream node failed")
    state = future.state
    if state.is_completed():
        ref = outcome["ref"]
        if state.name == "Cached" or not outcome["computed"]:
            node_file = store.root / ref["path"] / NODE_FILE
            computed = json.loads(node_file.read_text()).get("seconds") if node_file.is_file() else None
            return NodeReport(planned.name, planned.node_type.name, "cached", 0.0, ref["key"], ref["path"],
                              computed_seconds=computed)
        return NodeReport(planned.name, planned.node_type.name, "ran", outcome["seconds"], ref["key"], ref["path"])
    return NodeReport(planned.name, planned.node_type.name, "failed", time.perf_counter() - started,
                      error=f"{type(outcome).__name__}: {outcome}")


def _print_line(report: NodeReport, width: int) -> None:
    seconds = f"{report.seconds:8.1f} s"
    detail = report.path or report.error or ""
    if report.computed_seconds is not None:
        detail += f"  (computed in {report.computed_seconds:.1f} s)"
    print(f"  {report.node.ljust(width)}  {report.task:<16} {report.status:<8}{seconds}  {detail}", flush=True)


@flow(name="gsr-pipeline", flow_run_name="{spec[name]}", validate_parameters=False)
def run_pipeline(spec: dict[str, Any], store: str, force: list[str] | None = None) -> list[dict[str, Any]]:
    """Run a pipeline spec (already loaded, overrides applied) against the store at ``store``.

    Args:
        spec: the spec as a dict (it is validated again here, so a deployment gets the same checks).
        store: store root folder.
        force: node names to recompute even when cached (their dependents rerun only if the output changes).

    Returns:
        One report dict per node (node, task, status, seconds, key, path, error).

    Raises:
        PipelineFailed naming every failed node; everything that finished stays in the store.
        PipelineAlert when every node finished but some flagged their output (e.g. a metric regression).
    """
    pipeline = validate(spec, source=f"pipeline {spec.get('name')!r}")
    forced = set(force or [])
    unknown = forced - {planned.name for planned in pipeline.nodes}
    if unknown:
        raise ValueError(f"--force names unknown node(s) {sorted(unknown)}; nodes: {[n.name for n in pipeline.nodes]}")
    the_store = Store(store)
    run_folder = _start_run_folder(the_store, pipeline)
    records = the_store.root / "records"  # Prefect's result records live in the store, one file per cache key
    width = max(len(planned.name) for planned in pipeline.nodes)
    print(f"gsr run {pipeline.name}: {len(pipeline.nodes)} nodes, store {the_store.root}", flush=True)
    started = time.perf_counter()
    futures: dict[str, PrefectFuture] = {}
    planned_by_future: dict[str, Any] = {}
    reports: dict[str, NodeReport] = {}
    with node_submitter(pipeline.runner, pipeline.nodes) as submit:  # threads, or a Dask cluster for this block
        for planned in pipeline.nodes:
            task = planned.node_type.task.with_options(result_storage=records, refresh_cache=planned.name in forced)
            request = {"node": planned.name, "type": planned.node_type.name, "params": planned.params,
                       "inputs": _task_inputs(planned, futures), "upstream": planned.inputs,
                       "store": str(the_store.root),
                       "force": planned.name in forced}
            futures[planned.name] = submit(planned, task, request)
            planned_by_future[futures[planned.name].task_run_id] = planned
        for future in as_completed(list(futures.values())):
            planned = planned_by_future[future.task_run_id]
            reports[planned.name] = _report(planned, future, the_store, started)
            _print_line(reports[planned.name], width)
    ordered = [reports[planned.name] for planned in pipeline.nodes]
    _finish_run_folder(run_folder, ordered)
    report_page = write_report(pipeline, run_folder)
    publish_artifacts(pipeline, [asdict(r) for r in ordered], the_store.root, report_page)
    for planned, report in zip(pipeline.nodes, ordered):
        if report.status in ("cached", "ran") and planned.node_type.summary:
            print(f"\n{planned.name} ({planned.node_type.name}):\n{planned.node_type.summary(the_store.root / report.path)}")
    print(f"\nrun folder: {run_folder}\nreport: {report_page}", flush=True)
    failed = [r for r in ordered if r.status == "failed"]
    if failed:
        message = "; ".join(f"node {r.node!r} ({r.task}) failed: {r.error}" for r in failed)
        print(f"\n{message}", file=sys.stderr, flush=True)
        raise PipelineFailed(message)
    alerts = _alerts(pipeline, ordered, the_store)
    if alerts:
        message = "\n".join(alerts)
        print(f"\nalerts:\n{message}", file=sys.stderr, flush=True)
        # A Failed final state rather than a raise: the flow run reads Failed with the alerts as its message
        # (no crash traceback in the log), and a caller of the flow still gets PipelineAlert raised.
        return Failed(message=message, data=PipelineAlert(message))
    return [asdict(r) for r in ordered]
