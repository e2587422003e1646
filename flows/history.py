"""`gsr history`: the store's metric history (written by `record_history` nodes) as a table."""

from __future__ import annotations

from gsr_core.history import History, format_history


def print_history(store: str, spec: str | None = None, metric: str | None = None) -> None:
    """Print every recorded row (oldest first) with its change vs the previous run of its series."""
    history = History.for_store(store)
    if not history.path.is_file():
        print(f"no history yet: {history.path} does not exist (a pipeline with a record_history node writes it, "
              f"e.g. pipelines/nightly_eval.yaml)")
        return
    rows = history.rows(spec=spec, metric=metric)
    chosen = ", ".join(f"{key} {value!r}" for key, value in (("spec", spec), ("metric", metric)) if value)
    if not rows:
        specs = sorted({run["spec"] for run in history.runs()})
        print(f"no rows{' for ' + chosen if chosen else ''} in {history.path}; specs recorded: {specs}")
        return
    print(format_history(rows))
    runs = {(row["spec"], row["run_id"]) for row in rows}
    print(f"({len(runs)} run{'s' if len(runs) != 1 else ''}{', ' + chosen if chosen else ''}; {history.path})")
