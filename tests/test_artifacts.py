"""Prefect artifacts of a run (flows/artifacts.py, tasks/progress.py), read back from the test Prefect API."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

import tasks.progress
from flows.artifacts import artifact_key
from flows.pipeline import run_pipeline
from tasks.progress import NodeProgress
from tests.conftest import chain_spec


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert artifact_key("gsr-metrics", "Demo_x4.v2", "lr_3dgs") == "gsr-metrics-demo-x4-v2-lr-3dgs"


def _artifacts(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_run_publishes_metrics_table_run_summary_and_progress_of_long_nodes(tmp_path: Path, views_folder: Path,
                                                                           prefect_api, monkeypatch):
    monkeypatch.setattr(tasks.progress, "ARTIFACT_EVERY_S", 0.0)  # every bar counts as long work here
    spec = chain_spec(views_folder, name="Art_run")
    spec["nodes"]["fit"] = {"task": "fit_gaussians", "inputs": {"views": "lowres"}, "params": {"iterations": 4}}
    state = run_pipeline(spec=spec, store=str(tmp_path / "store"), return_state=True)
    assert state.is_completed()
    reports = state.result()
    flow_run_id = state.state_details.flow_run_id
    artifacts = _artifacts(flow_run_id)

    tables = [a for a in artifacts if a.type == "table"]
    assert [a.key for a in tables] == ["gsr-metrics-art-run-report"]
    metrics = json.loads((tmp_path / "store" / next(r["path"] for r in reports if r["node"] == "report")
                          / "metrics.json").read_text())
    bicubic = metrics["candidates"]["bicubic"]["mean"]
    assert json.loads(tables[0].data) == [{"method": "bicubic", "psnr": bicubic["psnr"], "ssim": bicubic["ssim"]}]

    summary = next(a for a in artifacts if a.type == "markdown" and a.key == "gsr-run-art-run")
    assert "| fit | fit_gaussians | ran |" in summary.data and "report.html" in summary.data

    with get_client(sync_client=True) as client:
        task_runs = {run.id: run.name for run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
    progress = {task_runs[a.task_run_id]: a for a in artifacts if a.type == "progress"}
    assert "fit" in progress and float(progress["fit"].data) == 100.0
    assert progress["fit"].description == "fit: 4 of 4 step"

    rerun = run_pipeline(spec=spec, store=str(tmp_path / "store"), return_state=True)
    again = _artifacts(rerun.state_details.flow_run_id)
    assert {a.key for a in again if a.type == "table"} == {"gsr-metrics-art-run-report"}  # a cached run too
    assert not [a for a in again if a.type == "progress"]  # nothing ran, nothing to report progress of


def test_progress_outside_a_run_is_a_plain_bar(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks.progress, "ARTIFACT_EVERY_S", 0.0)
    monkeypatch.setattr(tasks.progress, "create_progress_artifact", lambda **kwargs: calls.append(kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Prefect's warning about artifacts outside a run
        with NodeProgress(total=3, node="n", file=io.StringIO()) as bar:
            bar.update(3)
    assert bar.n == 3 and calls == []


def test_an_unreachable_api_never_fails_the_node(prefect_api, monkeypatch, caplog):
    def refuse(**kwargs):
        raise ConnectionError("API down")

    monkeypatch.setattr(tasks.progress, "ARTIFACT_EVERY_S", 0.0)
    monkeypatch.setattr(tasks.progress, "create_progress_artifact", refuse)

    @task
    def long_work() -> int:
        with NodeProgress(total=5, node="slow", file=io.StringIO()) as bar:
            for _ in range(5):
                bar.update(1)
        return bar.n

    @flow
    def one_node() -> int:
        return long_work()

    with caplog.at_level(logging.WARNING, logger="tasks.progress"):
        assert one_node() == 5
    warned = [r.getMessage() for r in caplog.records if r.name == "tasks.progress"]
    assert warned == ["node 'slow': stopped reporting progress to Prefect: ConnectionError: API down"]
