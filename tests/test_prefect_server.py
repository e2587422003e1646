"""`gsr run` against a real Prefect server on loopback (PREFECT_API_URL), as a user watching the UI would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import chain_spec, node_statuses, run_gsr, write_spec


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own home and database; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up on port {port} (exit {server.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


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
