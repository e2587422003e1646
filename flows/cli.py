"""The `gsr` command: validate, run and inspect pipeline specs; list node types.

    gsr validate SPEC [--set KEY=VALUE ...]
    gsr run SPEC [--set KEY=VALUE ...] [--force NODE ...] [--store DIR] [--verbose]
    gsr show SPEC [--set KEY=VALUE ...] [--store DIR]
    gsr nodes

Exit status: 0 success, 1 a node failed, 2 the spec or the command line is invalid.
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
    show = spec_command("show", "print the graph and which nodes are cached")
    show.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store folder (default: ./{DEFAULT_STORE})")
    commands.add_parser("nodes", help="list node types with their ports and params")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _prefect_defaults(getattr(args, "verbose", False))

    from flows.spec import SpecError, load_pipeline

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
    from flows.pipeline import PipelineFailed, run_pipeline

    try:
        for name in args.force:
            pipeline.node(name)
    except SpecError as error:
        print(f"error: --force: {error}", file=sys.stderr)
        return 2
    try:
        run_pipeline(spec=pipeline.spec, store=args.store, force=args.force)
    except PipelineFailed:
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
