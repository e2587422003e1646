"""The `gsr` command: validate, run and inspect pipeline specs; list node types.

    gsr validate SPEC [--set KEY=VALUE ...]
    gsr run SPEC [--set KEY=VALUE ...] [--force NODE ...] [--store DIR] [--verbose] [--runner RUNNER]
    gsr show SPEC [--set KEY=VALUE ...] [--store DIR]
    gsr nodes
    gsr serve SPEC [--cron EXPR | --interval SECONDS] [--timezone TZ] [--name NAME] [--store DIR] [--set ...]
    gsr server [--port PORT]
    gsr history [--store DIR] [--spec NAME] [--metric METRIC]
    gsr report RUN_FOLDER_OR_SPEC [--store DIR]

Exit status: 0 success, 1 a node failed, 2 the spec or the command line is invalid (or `gsr serve` finds no
Prefect server), 3 every node finished but some flagged their output (e.g. a metric regression).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_STORE = "gsr-store"


def _prefect_defaults(verbose: bool) -> None:
    """Quiet, offline-friendly Prefect defaults; a user's own environment settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        # Only the console is quieted: runs still send full logs to the API (and the Prefect UI).
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsr", description="3D super-resolution pipelines on cached Prefect tasks.")
    commands = parser.add_subparsers(dest="command", required=True)

    def spec_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("spec", help="pipeline spec (YAML), e.g. pipelines/demo.yaml")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a spec value, e.g. nodes.lowres.params.factor=2 (repeatable)")
        return command

    spec_command("validate", "check a spec (tasks, params, ports, cycles) without running anything")
    run = spec_command("run", "run a spec; finished nodes are reused from the store")
    run.add_argument("--force", action="append", default=[], metavar="NODE",
                     help="recompute NODE even if cached (repeatable)")
    run.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store folder (default: ./{DEFAULT_STORE})")
    run.add_argument("--verbose", action="store_true", help="show Prefect's own log lines on the console")
    run.add_argument("--runner", type=_runner, metavar="RUNNER",
                     help="where nodes run, replacing the spec's runner: threads, dask (a local cluster) or "
                          "dask://HOST:PORT (an existing Dask scheduler)")
    show = spec_command("show", "print the graph and which nodes are cached")
    show.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store folder (default: ./{DEFAULT_STORE})")
    commands.add_parser("nodes", help="list node types with their ports and params")
    serve = spec_command("serve", "serve a spec as a Prefect deployment on a schedule (needs a Prefect server)")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help="cron schedule, e.g. '0 3 * * *' (wins over the spec's schedule)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS (wins over the spec's)")
    serve.add_argument("--timezone", metavar="TZ",
                       help="IANA time zone of the schedule (default: the spec's, else UTC)")
    serve.add_argument("--name", help="deployment name (default: the spec's name)")
    serve.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store folder (default: ./{DEFAULT_STORE})")
    serve.add_argument("--verbose", action="store_true", help="show Prefect's own log lines on the console")
    server = commands.add_parser("server", help="start a Prefect server on 127.0.0.1 (for the UI and gsr serve)")
    server.add_argument("--port", type=int, default=4200, help="port (default: 4200)")
    history = commands.add_parser("history", help="print the metric history recorded by record_history nodes")
    history.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store folder (default: ./{DEFAULT_STORE})")
    history.add_argument("--spec", help="only this series (the pipeline's name, or record_history's series)")
    history.add_argument("--metric", help="only this metric (e.g. psnr)")
    report = commands.add_parser("report", help="rewrite the HTML report of a run (e.g. with newer history)")
    report.add_argument("target", help="a run folder (<store>/runs/<stamp>-<name>), or a spec: its latest run")
    report.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store folder (default: ./{DEFAULT_STORE})")
    return parser


def _runner(text: str) -> dict:
    """``--runner`` as the spec's ``runner`` mapping (an argparse type: a bad value exits with status 2)."""
    from flows.runners import runner_option

    try:
        return runner_option(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _prefect_defaults(getattr(args, "verbose", False))
    if args.command == "server":
        from flows.serve import start_server

        start_server(args.port)  # replaces this process with the server
    if args.command == "history":
        from flows.history import print_history

        print_history(args.store, args.spec, args.metric)
        return 0

    from flows.spec import SpecError, load_pipeline

    if args.command == "report":
        from flows.artifacts import rewrite_report

        try:
            print(f"report: {rewrite_report(args.target, args.store)}")
        except ValueError as error:  # SpecError included
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "nodes":
        from flows.inspect import format_catalogue

        print(format_catalogue())
        return 0
    try:
        pipeline = load_pipeline(args.spec, args.overrides)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.spec}: pipeline {pipeline.name!r} is valid ({len(pipeline.nodes)} nodes: "
              f"{', '.join(planned.name for planned in pipeline.nodes)})")
        return 0
    if args.command == "show":
        from flows.inspect import format_graph
        from gsr_core.store import Store

        print(format_graph(pipeline, Store(args.store)))
        return 0
    if args.command == "serve":
        from flows.serve import ServeError, check_server, resolve_schedule, serve

        try:
            schedule = resolve_schedule(pipeline.spec.get("schedule"), args.cron, args.interval, args.timezone)
            check_server()
        except ServeError as error:
            print(f"error: gsr serve: {error}", file=sys.stderr)
            return 2
        serve(pipeline, args.store, schedule, args.name)
        return 0
    from flows.pipeline import PipelineAlert, PipelineFailed, run_pipeline

    try:
        for name in args.force:
            pipeline.node(name)
    except SpecError as error:
        print(f"error: --force: {error}", file=sys.stderr)
        return 2
    try:
        spec = pipeline.spec if args.runner is None else {**pipeline.spec, "runner": args.runner}
        run_pipeline(spec=spec, store=args.store, force=args.force)
    except PipelineFailed:
        return 1
    except PipelineAlert:  # every node finished; some flagged their output (e.g. a metric regression)
        return 3
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
