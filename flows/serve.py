"""Scheduled pipelines: `gsr serve` (a spec as a Prefect deployment on a schedule) and `gsr server`.

`gsr serve SPEC --cron "0 3 * * *"` registers the pipeline flow (``flows.pipeline.run_pipeline``) as a
deployment named after the spec, with the resolved spec and the store as its parameters and the schedule from
the command line or the spec's ``schedule:`` key, then polls for its runs and executes each in a subprocess
until stopped (Ctrl-C pauses the schedule). Runs can also be triggered at once from the UI or with
``prefect deployment run 'gsr-pipeline/NAME'``.

Schedules are kept and fired by a Prefect *server*: Prefect's ephemeral in-process API (what ``gsr run`` uses
when ``PREFECT_API_URL`` is unset) lives only as long as one command and cannot schedule anything, so
``gsr serve`` refuses to start without a server that answers. ``gsr server`` starts one on loopback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from flows.spec import Pipeline, ScheduleSpec

DEFAULT_PORT = 4200
FLOW_NAME = "gsr-pipeline"  # the name of flows.pipeline.run_pipeline's flow


class ServeError(RuntimeError):
    """`gsr serve` cannot start (no Prefect server, or a bad schedule); the message says what to do."""


def how_to_start_a_server(port: int = DEFAULT_PORT) -> str:
    return ("Start a Prefect server on loopback in another shell, and point gsr at it:\n"
            "    gsr server                  (or: prefect server start --host 127.0.0.1 --port "
            f"{port})\n"
            f"    export PREFECT_API_URL=http://127.0.0.1:{port}/api")


def check_server() -> str:
    """The URL of the Prefect API that will keep the schedule; ``ServeError`` when there is no real server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServeError("scheduling needs a Prefect server, and PREFECT_API_URL is not set: Prefect would use "
                         "its ephemeral in-process API, which lives only as long as one command and does not "
                         "run schedules.\n" + how_to_start_a_server())
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ServeError(f"no Prefect server answers at PREFECT_API_URL={url} "
                         f"({type(problem).__name__}: {problem}).\n" + how_to_start_a_server())
    return url


def resolve_schedule(spec_schedule: dict | None, cron: str | None, interval: float | None,
                     timezone: str | None) -> ScheduleSpec | None:
    """The schedule to serve with: ``--cron``/``--interval`` win over the spec's ``schedule:``; ``--timezone``
    sets the time zone of either (default: the spec's, else UTC). None when there is no schedule at all."""
    if cron is not None or interval is not None:
        fields = {"cron": cron, "interval": interval}
    elif spec_schedule is not None:
        fields = {key: value for key, value in spec_schedule.items() if key != "timezone"}
    elif timezone is not None:
        raise ServeError("--timezone needs a schedule: give --cron or --interval, or a `schedule:` in the spec")
    else:
        return None
    zone = timezone or (spec_schedule or {}).get("timezone")
    try:
        return ScheduleSpec.model_validate({**fields, **({"timezone": zone} if zone else {})})
    except ValidationError as error:
        # the spec's own schedule was validated with the spec: what fails here came from the flags
        problems = [f"--{'.'.join(str(part) for part in item['loc'])}: {item['msg'].removeprefix('Value error, ')}"
                    for item in error.errors()]
        raise ServeError("invalid schedule: " + "; ".join(problems)) from None


def serve(pipeline: Pipeline, store: str | Path, schedule: ScheduleSpec | None, name: str | None = None) -> None:
    """Serve ``pipeline`` as deployment ``gsr-pipeline/<name or spec name>`` until interrupted.

    The deployment's parameters are the resolved spec (its ``schedule`` key set to the one served) and the
    absolute store path, so every run, scheduled or triggered, runs exactly this spec against this store.
    """
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import run_pipeline

    deployment = name or pipeline.name
    spec = {key: value for key, value in pipeline.spec.items() if key != "schedule"}
    if schedule is not None:
        spec["schedule"] = schedule.model_dump(exclude_none=True)
    store_root = str(Path(store).resolve())
    print(f"gsr serve: deployment '{FLOW_NAME}/{deployment}' ({len(pipeline.nodes)} nodes), store {store_root}\n"
          f"  schedule: {schedule.describe() if schedule else 'none (runs only when triggered)'}\n"
          f"  trigger a run now: prefect deployment run '{FLOW_NAME}/{deployment}'\n"
          f"  Ctrl-C stops serving and pauses the schedule", flush=True)
    try:
        run_pipeline.serve(
            name=deployment, schedules=[schedule.to_prefect()] if schedule else None,
            parameters={"spec": spec, "store": store_root}, description=pipeline.spec.get("description") or None,
            tags=["gsr"], pause_on_shutdown=False, print_starting_message=False,
            entrypoint_type=EntrypointType.MODULE_PATH)
    finally:  # Ctrl-C or SIGTERM: runs must not pile up while nobody serves them
        _pause(f"{FLOW_NAME}/{deployment}")


def _pause(name: str) -> None:
    """Pause deployment ``name`` (the server drops its scheduled runs); serving it again resumes it.

    Done here rather than by Prefect's runner, whose own pause on shutdown races the signal that stops it.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.pause_deployment(client.read_deployment_by_name(name).id)
        except ObjectNotFound:  # stopped before the deployment was created
            return
    print(f"gsr serve: stopped; '{name}' is paused until it is served again", flush=True)


def start_server(port: int = DEFAULT_PORT) -> NoReturn:
    """Become ``prefect server start --host 127.0.0.1 --port PORT`` (the process is replaced, so Ctrl-C and
    SIGTERM reach the server itself), after printing the ``export PREFECT_API_URL=...`` line.

    Analytics are off unless the environment says otherwise (``PREFECT_SERVER_ANALYTICS_ENABLED``).
    """
    url = f"http://127.0.0.1:{port}/api"
    print(f"gsr server: Prefect server on loopback, UI http://127.0.0.1:{port}, API {url}\n"
          f"In the shell where you run gsr (gsr serve needs it):\n"
          f"    export PREFECT_API_URL={url}\n", flush=True)
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ}
    os.execve(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env)
