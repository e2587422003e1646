"""Scheduled evaluation against a real Prefect server on loopback, started with `gsr server`: `gsr serve`
creates the deployment with its schedule, the server schedules the right fire times, a run triggered now
completes and lands in the history, a planted regression is flagged (exit status 3, a Failed flow run, a
markdown artifact); without a server `gsr serve` refuses with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main
from flows.serve import ServeError, resolve_schedule
from flows.spec import SpecError, validate
from gsr_core.history import History
from tests.conftest import (REPO, chain_spec, free_port, loopback_prefect_server, node_statuses, run_gsr,
                            write_spec)


def history_spec(views: Path, name: str, schedule: dict | None = None) -> dict:
    """load_views -> downsample -> upsample -> evaluate -> record_history (scene label 'test')."""
    spec = chain_spec(views, name=name)
    spec["nodes"]["history"] = {"task": "record_history", "inputs": {"metrics": ["report"]},
                                "params": {"scenes": {"report": "test"}, "threshold_db": 0.5}}
    if schedule:
        spec["schedule"] = schedule
    return spec


def plant_better_run(store: Path, series: str, by_db: float = 3.0) -> float:
    """Append a fake run whose PSNR beats the last recorded one by ``by_db``; returns that PSNR."""
    history = History.for_store(store)
    last = [row for row in history.rows(spec=series) if row["metric"] == "psnr"][-1]
    history.append("planted-better-run", series, [{"scene": last["scene"], "method": last["method"],
                                                   "metric": "psnr", "value": last["value"] + by_db}])
    return last["value"] + by_db


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A loopback Prefect server started by `gsr server`; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    with loopback_prefect_server(home, command=lambda port: [sys.executable, "-m", "flows.cli", "server",
                                                             "--port", str(port)]) as url:
        assert f"export PREFECT_API_URL={url}" in (home / "server.log").read_text()
        yield url


# ---- schedule validation (no server) ----

@pytest.mark.parametrize("schedule, message", [
    ({"cron": "0 3 * *"}, "spec.schedule.cron: Value error, not a valid cron expression: '0 3 * *'"),
    ({"cron": "61 3 * * *"}, "spec.schedule.cron: Value error, not a valid cron expression"),
    ({"cron": "0 3 * * *", "interval": 60}, "spec.schedule: Value error, give exactly one of `cron`"),
    ({"timezone": "UTC"}, "spec.schedule: Value error, give exactly one of `cron`"),
    ({"interval": 0}, "spec.schedule.interval: Input should be greater than 0"),
    ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "spec.schedule.timezone: Value error, not an IANA time zone"),
    ({"cron": "0 3 * * *", "tz": "UTC"}, "spec.schedule.tz: unknown key"),
])
def test_bad_schedules_fail_validation_naming_the_key(views_folder: Path, schedule: dict, message: str):
    with pytest.raises(SpecError) as caught:
        validate(history_spec(views_folder, "bad", schedule), source="spec.yaml")
    assert message in str(caught.value)


def test_command_line_schedule_wins_over_the_spec():
    spec_schedule = {"interval": 3600, "timezone": "Europe/Paris"}
    assert resolve_schedule(None, None, None, None) is None
    from_spec = resolve_schedule(spec_schedule, None, None, None)
    assert (from_spec.interval, from_spec.timezone) == (3600, "Europe/Paris")
    flagged = resolve_schedule(spec_schedule, "0 3 * * *", None, None)  # the spec's time zone is kept
    assert (flagged.cron, flagged.interval, flagged.timezone) == ("0 3 * * *", None, "Europe/Paris")
    moved = resolve_schedule(spec_schedule, None, None, "America/New_York")
    assert (moved.interval, moved.timezone) == (3600, "America/New_York")
    assert resolve_schedule(None, None, 90, None).describe() == "every 90 s, time zone UTC"
    with pytest.raises(ServeError, match="--timezone needs a schedule"):
        resolve_schedule(None, None, None, "UTC")
    with pytest.raises(ServeError, match="--cron: not a valid cron expression: '0 3'"):
        resolve_schedule(spec_schedule, "0 3", None, None)


def test_serve_without_a_server_says_how_to_start_one(tmp_path: Path, views_folder: Path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", history_spec(views_folder, "no-server"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", str(spec), "--cron", "0 3 * * *", "--store", str(tmp_path / "store")]) == 2
    message = capsys.readouterr().err
    assert "scheduling needs a Prefect server" in message and "ephemeral" in message
    assert "gsr server" in message and "prefect server start --host 127.0.0.1" in message
    assert "export PREFECT_API_URL=http://127.0.0.1:4200/api" in message
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert main(["serve", str(spec), "--cron", "0 3 * * *", "--store", str(tmp_path / "store")]) == 2
    assert "no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


# ---- against the loopback server ----

def test_gsr_run_appends_every_run_and_exits_3_on_a_regression(tmp_path: Path, views_folder: Path, server: str):
    spec = write_spec(tmp_path / "spec.yaml", history_spec(views_folder, "run-history"))
    store = tmp_path / "store"
    env = {"PREFECT_API_URL": server}
    first = run_gsr("run", str(spec), "--store", str(store), env=env)
    assert first.returncode == 0, first.stderr
    assert "first run of this series" in first.stdout
    best = plant_better_run(store, "run-history")
    second = run_gsr("run", str(spec), "--store", str(store), env=env)
    assert second.returncode == 3, second.stderr
    statuses = node_statuses(second.stdout)
    assert statuses.pop("history") == "ran" and set(statuses.values()) == {"cached"}  # only the history reran
    runs = History.for_store(store).runs(spec="run-history")
    assert [run["run_id"] for run in runs][1] == "planted-better-run" and len(runs) == 3
    measured = History.for_store(store).rows(spec="run-history", metric="psnr")[-1]["value"]
    expected = (f"psnr of scene test / method bicubic dropped {best - measured:.2f} dB vs previous run "
                f"({best:.2f} -> {measured:.2f})")
    assert expected in second.stderr and "node 'history' (record_history)" in second.stderr
    run_folder = Path(second.stdout.split("run folder: ")[1].split()[0])
    flagged = json.loads((run_folder / "nodes" / "history" / "regressions.json").read_text())
    assert [item["message"] for item in flagged["regressions"]] == [expected]
    assert flagged["run_id"] == runs[-1]["run_id"]
    assert (run_folder / "nodes" / "history" / "history.csv").read_text().count("\n") == 1 + 2 + 1 + 2
    with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["gsr-history-run-history"])), limit=1, sort="CREATED_DESC")
        assert artifact.type == "markdown" and expected in artifact.data
        assert str(artifact.flow_run_id) == runs[-1]["run_id"]
        flow_run = client.read_flow_run(artifact.flow_run_id)
        assert flow_run.state.type == StateType.FAILED and expected in flow_run.state.message


def _next_fire_times(hour: int, zone: str, count: int) -> list[datetime]:
    """The next ``count`` times the clock in ``zone`` reads hour:00, in UTC (written without cron)."""
    now = datetime.now(timezone.utc)
    day = now.astimezone(ZoneInfo(zone)).date()
    times = []
    while len(times) < count:
        fire = datetime(day.year, day.month, day.day, hour, tzinfo=ZoneInfo(zone)).astimezone(timezone.utc)
        if fire > now:
            times.append(fire)
        day += timedelta(days=1)
    return times


def _wait_for(what: str, probe, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; gsr serve said:\n{log.read_text()[-3000:]}")


def test_served_spec_is_scheduled_runs_on_demand_and_flags_regressions(tmp_path: Path, views_folder: Path,
                                                                        server: str):
    schedule = {"cron": "0 3 * * *", "timezone": "Europe/Paris"}
    spec = write_spec(tmp_path / "spec.yaml", history_spec(views_folder, "served", schedule))
    store = tmp_path / "store"
    log = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with open(log, "w") as output:
        serving = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(spec), "--store", str(store)],
                                   cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as client:
            def deployment():
                try:
                    return client.read_deployment_by_name("gsr-pipeline/served")
                except Exception:  # not created yet (ObjectNotFound)
                    return None

            found = _wait_for("the deployment", deployment, 90, log)
            (attached,) = found.schedules
            assert (attached.schedule.cron, attached.schedule.timezone, attached.active) == \
                ("0 3 * * *", "Europe/Paris", True)
            assert found.parameters["store"] == str(store.resolve()) and found.parameters["spec"]["name"] == "served"

            def scheduled():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))
                return sorted(run.expected_start_time for run in runs if run.state.type == StateType.SCHEDULED)

            fire_times = _wait_for("the server to schedule runs", lambda: (times := scheduled())[2:] and times,
                                   60, log)
            assert fire_times[:3] == _next_fire_times(3, "Europe/Paris", 3)

            first = run_deployment("gsr-pipeline/served", timeout=180, poll_interval=1)
            assert first.state.type == StateType.COMPLETED, f"{first.state}\n{log.read_text()[-3000:]}"
            (recorded,) = History.for_store(store).runs(spec="served")
            assert recorded["run_id"] == str(first.id) and recorded["rows"] == 2

            best = plant_better_run(store, "served")
            second = run_deployment("gsr-pipeline/served", timeout=180, poll_interval=1)
            assert second.state.type == StateType.FAILED
            assert "psnr of scene test / method bicubic dropped" in second.state.message
            assert f"vs previous run ({best:.2f} ->" in second.state.message
            assert [run["run_id"] for run in History.for_store(store).runs(spec="served")] == \
                [str(first.id), "planted-better-run", str(second.id)]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gsr-history-served"])))
            assert {str(a.flow_run_id) for a in artifacts} == {str(first.id), str(second.id)}
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        serving.wait(timeout=60)
    with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("gsr-pipeline/served").paused  # stopping serve pauses the schedule
