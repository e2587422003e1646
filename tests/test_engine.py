"""The pipeline engine's caching and resuming, on the real Prefect API.

In-process runs share one temporary Prefect API (``prefect_api``); the cross-process behaviours run the `gsr`
command in new processes, each with Prefect's ephemeral API, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import PipelineFailed, run_pipeline
from tests.conftest import REPO, chain_spec, node_statuses, run_gsr, write_spec, write_views


def statuses(reports: list[dict]) -> dict[str, str]:
    return {report["node"]: report["status"] for report in reports}


def object_of(store: Path, reports: list[dict], node: str) -> Path:
    return store / next(r["path"] for r in reports if r["node"] == node)


@pytest.fixture
def cached_chain(tmp_path: Path, views_folder: Path, prefect_api):
    """A chain spec run once: (spec, store, reports of the first run)."""
    spec, store = chain_spec(views_folder), tmp_path / "store"
    first = run_pipeline(spec=spec, store=str(store))
    assert set(statuses(first).values()) == {"ran"}
    return spec, store, first


def test_rerun_runs_nothing_and_keeps_prefect_records(cached_chain):
    spec, store, first = cached_chain
    second = run_pipeline(spec=spec, store=str(store))
    assert statuses(second) == {"scene": "cached", "lowres": "cached", "bicubic": "cached", "report": "cached"}
    assert [r["key"] for r in second] == [r["key"] for r in first]
    assert {p.name for p in (store / "records").iterdir()} == {r["key"] for r in first}
    metrics = json.loads((object_of(store, second, "report") / "metrics.json").read_text())
    assert metrics["candidates"]["bicubic"]["mean"]["psnr"] > 20  # smooth images survive x4 down/up well


def test_param_change_reruns_that_node_and_its_dependents_only(cached_chain):
    spec, store, _ = cached_chain
    spec["nodes"]["lowres"]["params"]["filter"] = "bicubic"
    assert statuses(run_pipeline(spec=spec, store=str(store))) == {
        "scene": "cached", "lowres": "ran", "bicubic": "ran", "report": "ran"}
    spec["nodes"]["report"]["params"]["metrics"] = ["psnr"]
    assert statuses(run_pipeline(spec=spec, store=str(store))) == {
        "scene": "cached", "lowres": "cached", "bicubic": "cached", "report": "ran"}


def test_deleted_output_folder_recomputes_that_node_only(cached_chain):
    spec, store, first = cached_chain
    shutil.rmtree(object_of(store, first, "lowres"))
    # The rerun writes the same bytes, so the content digest is unchanged and the dependents stay cached.
    assert statuses(run_pipeline(spec=spec, store=str(store))) == {
        "scene": "cached", "lowres": "ran", "bicubic": "cached", "report": "cached"}


def test_corrupted_output_recomputes_instead_of_crashing(cached_chain):
    spec, store, first = cached_chain
    image = next((object_of(store, first, "bicubic") / "images").glob("*.png"))
    image.write_bytes(image.read_bytes()[:100])  # truncated
    again = run_pipeline(spec=spec, store=str(store))
    assert statuses(again)["bicubic"] == "ran" and statuses(again)["scene"] == "cached"
    assert len(image.read_bytes()) > 100


def test_force_recomputes_the_node_and_keeps_identical_dependents(cached_chain):
    spec, store, _ = cached_chain
    assert statuses(run_pipeline(spec=spec, store=str(store), force=["lowres"])) == {
        "scene": "cached", "lowres": "ran", "bicubic": "cached", "report": "cached"}


def test_failed_node_stops_its_dependents_and_deletes_nothing(cached_chain, tmp_path: Path):
    spec, store, first = cached_chain
    before = {p.name for p in (store / "objects").iterdir()}
    spec["nodes"]["odd"] = {"task": "downsample", "inputs": {"views": "scene"}, "params": {"factor": 3}}
    spec["nodes"]["odd_up"] = {"task": "upsample", "inputs": {"views": "odd"}, "params": {"factor": 3}}
    spec["nodes"]["lowres"]["params"]["filter"] = "bicubic"  # an independent branch that must still run
    with pytest.raises(PipelineFailed) as caught:
        run_pipeline(spec=spec, store=str(store))
    message = str(caught.value)
    assert "node 'odd' (downsample) failed" in message and "not divisible" in message and "v000.png" in message
    assert before <= {p.name for p in (store / "objects").iterdir()}  # everything cached before is still there
    summary = json.loads(sorted((store / "runs").iterdir())[-1].joinpath("summary.json").read_text())
    assert statuses(summary) == {"scene": "cached", "lowres": "ran", "bicubic": "ran", "report": "ran",
                                 "odd": "failed", "odd_up": "skipped"}
    assert not list((store / "tmp").iterdir())  # the failed node's partial output was cleaned up


def test_run_folder_holds_the_resolved_spec_and_links_to_outputs(cached_chain):
    spec, store, first = cached_chain
    run_folder = sorted((store / "runs").iterdir())[-1]
    assert yaml.safe_load((run_folder / "spec.yaml").read_text()) == spec
    link = run_folder / "nodes" / "report"
    assert link.is_symlink() and (link / "metrics.json").is_file()
    assert (link / "_node.json").is_file() and json.loads((link / "_node.json").read_text())["node_type"] == "evaluate"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_node_then_rerun_recomputes_only_unfinished_nodes(tmp_path: Path):
    views = write_views(tmp_path / "views", count=12, size=128)
    spec = chain_spec(views, factor=4)
    # A slow branch: 12 images enlarged to 2048x2048; the kill lands while it writes them.
    spec["nodes"]["huge"] = {"task": "upsample", "inputs": {"views": "lowres"}, "params": {"factor": 64}}
    path, store = write_spec(tmp_path / "spec.yaml", spec), tmp_path / "store"
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--store", str(store)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        _wait_for(lambda: any(len(list(d.glob("images/*.png"))) >= 2 for d in (store / "tmp").glob("upsample-*")),
                  timeout=180, what="the slow node to be half-written")
        finished_at_kill = {d.name for d in (store / "objects").iterdir()}
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert any(name.startswith("load_views-") for name in finished_at_kill)
    assert not any(len(list(d.glob("images/*.png"))) == 12 for d in (store / "objects").glob("upsample-*")
                   if d.name not in finished_at_kill)

    rerun = run_gsr("run", str(path), "--store", str(store))
    assert rerun.returncode == 0, rerun.stderr
    after = node_statuses(rerun.stdout)
    node_lines = [line.split() for line in rerun.stdout.splitlines() if line.startswith("  ") and "objects/" in line]
    keys = {words[0]: next(w for w in words if w.startswith("objects/")).split("/")[1] for words in node_lines}
    for node, key in keys.items():
        assert after[node] == ("cached" if key in finished_at_kill else "ran"), (node, rerun.stdout)
    assert after["huge"] == "ran" and after["scene"] == "cached"

    third = run_gsr("run", str(path), "--store", str(store))
    assert third.returncode == 0, third.stderr
    assert set(node_statuses(third.stdout).values()) == {"cached"} and len(node_statuses(third.stdout)) == 5
    assert "candidate" in third.stdout and "PSNR" in third.stdout  # the metrics table is printed again
