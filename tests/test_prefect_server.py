"""`gsr run` against a real Prefect server on loopback (PREFECT_API_URL), as a user watching the UI would run it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import chain_spec, loopback_prefect_server, node_statuses, run_gsr, write_spec


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own home and database; yields the API URL."""
    with loopback_prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


def test_runs_are_recorded_on_a_loopback_server(tmp_path: Path, views_folder: Path, prefect_server: str):
    path = write_spec(tmp_path / "spec.yaml", chain_spec(views_folder, name="on-server"))
    env = {"PREFECT_API_URL": prefect_server}
    first = run_gsr("run", str(path), "--store", str(tmp_path / "store"), env=env)
    assert first.returncode == 0, first.stderr
    assert set(node_statuses(first.stdout).values()) == {"ran"}
    second = run_gsr("run", str(path), "--store", str(tmp_path / "store"), env=env)
    assert set(node_statuses(second.stdout).values()) == {"cached"}

    flow_runs = httpx.post(f"{prefect_server}/flow_runs/filter", json={}, timeout=10).json()
    ours = [run for run in flow_runs if run["name"] == "on-server"]
    assert len(ours) == 2 and all(run["state_type"] == "COMPLETED" for run in ours)
    task_runs = httpx.post(f"{prefect_server}/task_runs/filter", json={}, timeout=10).json()
    names = sorted(run["name"] for run in task_runs)
    assert names == sorted(["scene", "lowres", "bicubic", "report"] * 2)
    assert sum(run["state_name"] == "Cached" for run in task_runs) == 4
