"""The evaluation history: every run's mean metrics in one SQLite file, compared with the runs before it.

The file is ``<store>/history.sqlite`` (``History.for_store``). It has one table, ``metrics``, one row per
(run, spec, scene, method, metric) with the value and the UTC time of the append. ``spec`` names a series of
runs (normally the pipeline's name): a run is compared with the earlier runs of its own series only.

Comparisons (``History.compare``): each (scene, method, metric) of a run is compared with the latest earlier run
that has it ("previous run") and with the best value of every earlier run ("best so far"); a value worse than
either by more than the metric's threshold is a ``Regression``. Which way is better is decided by
``higher_is_better``, the one place that rule is written.

Several processes may append at once: each append is one ``BEGIN IMMEDIATE`` transaction (the writers queue on
SQLite's lock, waiting up to ``TIMEOUT_S``), so a run's rows land together or not at all.
"""

from __future__ import annotations

import csv
import math
import sqlite3
from collections.abc import Mapping
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from gsr_core.evaluation import HIGHER_IS_BETTER

HISTORY_FILE = "history.sqlite"
TIMEOUT_S = 60.0
ROW_KEYS = ("scene", "method", "metric", "value")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS metrics (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id  TEXT NOT NULL,
        spec    TEXT NOT NULL,
        time    TEXT NOT NULL,
        scene   TEXT NOT NULL,
        method  TEXT NOT NULL,
        metric  TEXT NOT NULL,
        value   REAL NOT NULL,
        UNIQUE (run_id, spec, scene, method, metric))""",
    "CREATE INDEX IF NOT EXISTS metrics_series ON metrics (spec, scene, method, metric)",
)
_COLUMNS = ("id", "run_id", "spec", "time", "scene", "method", "metric", "value")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better.

    The evaluation's metrics have their own direction (``gsr_core.evaluation.HIGHER_IS_BETTER``: PSNR and SSIM
    higher, LPIPS and the consistency error lower); any other name ending in ``_error`` is lower-is-better.
    Any other name is an error: the history would not know which way a change goes.
    """
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    if metric.endswith("_error"):
        return False
    raise ValueError(f"metric {metric!r}: unknown direction; known metrics are {sorted(HIGHER_IS_BETTER)} "
                     f"and names ending in '_error' (lower is better)")


def _format_value(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def _unit(metric: str) -> str:
    return " dB" if metric == "psnr" else ""


def _cell(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return ("+" if signed and value >= 0 else "") + _format_value(metric, value)


@dataclass(frozen=True)
class Comparison:
    """One (scene, method, metric) of a run next to the series' previous run and best earlier value."""

    spec: str
    scene: str
    method: str
    metric: str
    value: float
    previous: float | None = None
    previous_run: str | None = None
    best: float | None = None
    best_run: str | None = None

    def worse_by(self, reference: float) -> float:
        """How much worse ``value`` is than ``reference`` (negative when better), in the metric's units."""
        return reference - self.value if higher_is_better(self.metric) else self.value - reference


@dataclass(frozen=True)
class Regression:
    """A metric of a run that is worse than a baseline (the previous run, or the best so far) beyond a threshold."""

    spec: str
    scene: str
    method: str
    metric: str
    value: float
    baseline: str  # "previous run" or "best so far"
    baseline_value: float
    baseline_run: str
    drop: float  # how much worse than the baseline, in the metric's units (> threshold)
    threshold: float

    def describe(self) -> str:
        """E.g. ``psnr of scene tiles / method lr_3dgs dropped 1.23 dB vs previous run (20.10 -> 18.87)``."""
        verb, note = ("dropped", "") if higher_is_better(self.metric) else ("rose", " (lower is better)")
        return (f"{self.metric} of scene {self.scene} / method {self.method} {verb} "
                f"{_format_value(self.metric, self.drop)}{_unit(self.metric)}{note} vs {self.baseline} "
                f"({_format_value(self.metric, self.baseline_value)} -> {_format_value(self.metric, self.value)})")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.describe()}


def _threshold(metric: str, threshold: float | Mapping[str, float]) -> float:
    if not isinstance(threshold, Mapping):
        return float(threshold)
    if metric in threshold:
        return float(threshold[metric])
    if "*" in threshold:
        return float(threshold["*"])
    raise ValueError(f"`threshold` gives no value for metric {metric!r} (it has {sorted(threshold)}); "
                     f"add it, or '*' for every metric not named")


def _checked_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, float]]:
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"`rows` must be a non-empty list of dicts with keys {ROW_KEYS}, got {rows!r:.200}")
    checked, seen = [], set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(ROW_KEYS):
            raise ValueError(f"rows[{index}]: expected a dict with exactly the keys {ROW_KEYS}, got {row!r:.200}")
        scene, method, metric, value = (row[key] for key in ROW_KEYS)
        for key, text in (("scene", scene), ("method", method), ("metric", metric)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"rows[{index}].{key}: expected a non-empty string, got {text!r}")
        higher_is_better(metric)  # raises for a metric whose direction is unknown
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"rows[{index}].value: expected a number (not NaN), got {value!r}")
        if (scene, method, metric) in seen:
            raise ValueError(f"rows[{index}]: ({scene}, {method}, {metric}) is listed twice")
        seen.add((scene, method, metric))
        checked.append((scene, method, metric, float(value)))
    return checked


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
    return value


class History:
    """The metric history in one SQLite file (see the module docstring). Reading a missing file gives no rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_store(cls, store_root: str | Path) -> History:
        """The history of the artifact store at ``store_root`` (``<store_root>/history.sqlite``)."""
        return cls(Path(store_root) / HISTORY_FILE)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=TIMEOUT_S, isolation_level=None)
        connection.row_factory = sqlite3.Row
        return connection

    def append(self, run_id: str, spec: str, rows: list[dict[str, Any]]) -> str:
        """Record one run's metrics, all in one transaction.

        Args:
            run_id: the run's id (e.g. the Prefect flow run id); must not be in the history yet for ``spec``.
            spec: the series the run belongs to (normally the pipeline's name).
            rows: dicts with keys ``scene``, ``method``, ``metric``, ``value``; each (scene, method, metric)
                once, metrics with a known direction (``higher_is_better``).

        Returns:
            the UTC time stamped on the rows (ISO 8601).
        """
        run_id, spec = _text(run_id, "run_id"), _text(spec, "spec")
        checked = _checked_rows(rows)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    connection.execute(statement)
                if connection.execute("SELECT 1 FROM metrics WHERE run_id = ? AND spec = ? LIMIT 1",
                                      (run_id, spec)).fetchone():
                    raise ValueError(f"run {run_id!r} of {spec!r} is already in the history {self.path}")
                connection.executemany(
                    "INSERT INTO metrics (run_id, spec, time, scene, method, metric, value) VALUES (?,?,?,?,?,?,?)",
                    [(run_id, spec, stamp, *row) for row in checked])
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return stamp

    def _select(self, where: str = "", args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with closing(self._connect()) as connection:
            if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'metrics'").fetchone():
                return []
            found = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM metrics {where} ORDER BY id", tuple(args))
            return [dict(row) for row in found]

    def rows(self, spec: str | None = None, metric: str | None = None) -> list[dict[str, Any]]:
        """Every recorded row, oldest first: ``id, run_id, spec, time, scene, method, metric, value``."""
        clauses = [(column, value) for column, value in (("spec", spec), ("metric", metric)) if value is not None]
        where = ("WHERE " + " AND ".join(f"{column} = ?" for column, _ in clauses)) if clauses else ""
        return self._select(where, [value for _, value in clauses])

    def runs(self, spec: str | None = None) -> list[dict[str, Any]]:
        """The recorded runs, oldest first: ``run_id, spec, time, rows`` (how many rows it added)."""
        runs: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.rows(spec):
            run = runs.setdefault((row["run_id"], row["spec"]), {"run_id": row["run_id"], "spec": row["spec"],
                                                                  "time": row["time"], "rows": 0})
            run["rows"] += 1
        return list(runs.values())

    def comparisons(self, run_id: str) -> list[Comparison]:
        """Each row of run ``run_id`` next to the previous run and the best earlier value of its series."""
        mine = self._select("WHERE run_id = ?", [run_id])
        if not mine:
            raise ValueError(f"run {run_id!r} is not in the history {self.path}")
        result = []
        for spec in dict.fromkeys(row["spec"] for row in mine):
            own = [row for row in mine if row["spec"] == spec]
            first = min(row["id"] for row in own)
            earlier: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
            for row in self._select("WHERE spec = ? AND id < ?", [spec, first]):
                earlier.setdefault((row["scene"], row["method"], row["metric"]), []).append(row)
            for row in own:
                before = earlier.get((row["scene"], row["method"], row["metric"]), [])
                if not before:
                    result.append(Comparison(spec, row["scene"], row["method"], row["metric"], row["value"]))
                    continue
                pick = max if higher_is_better(row["metric"]) else min
                best = pick(before, key=lambda r: r["value"])
                result.append(Comparison(spec, row["scene"], row["method"], row["metric"], row["value"],
                                         before[-1]["value"], before[-1]["run_id"], best["value"], best["run_id"]))
        return result

    def compare(self, run_id: str, threshold: float | Mapping[str, float]) -> list[Regression]:
        """The regressions of run ``run_id``: metrics worse than the previous run or the best so far by more
        than ``threshold`` (one number for every metric, or a mapping metric -> number, ``"*"`` for the rest).

        When the best so far is the previous run's value, only the comparison with the previous run is reported.
        """
        regressions = []
        for item in self.comparisons(run_id):
            if item.previous is None:
                continue
            limit = _threshold(item.metric, threshold)
            baselines = [("previous run", item.previous, item.previous_run)]
            if item.best != item.previous:
                baselines.append(("best so far", item.best, item.best_run))
            for name, value, run in baselines:
                drop = item.worse_by(value)
                if drop > limit:
                    regressions.append(Regression(item.spec, item.scene, item.method, item.metric, item.value,
                                                  name, value, run, drop, limit))
        return regressions


def with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (oldest first) each with ``delta``: value minus the previous value of the same
    (spec, scene, method, metric), or None for the first."""
    last: dict[tuple[str, str, str, str], float] = {}
    result = []
    for row in rows:
        key = (row["spec"], row["scene"], row["method"], row["metric"])
        result.append({**row, "delta": row["value"] - last[key] if key in last else None})
        last[key] = row["value"]
    return result


def format_history(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table: time, run, spec, scene, method, metric, value, delta vs previous."""
    header = ["time (UTC)", "run", "spec", "scene", "method", "metric", "value", "delta"]
    lines = [header] + [[row["time"], row["run_id"][:8], row["spec"], row["scene"], row["method"], row["metric"],
                         _cell(row["metric"], row["value"]), _cell(row["metric"], row["delta"], signed=True)]
                        for row in with_deltas(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {"value", "delta"}
    return "\n".join("  ".join(cell.rjust(widths[i]) if header[i] in numeric else cell.ljust(widths[i])
                               for i, cell in enumerate(line)).rstrip() for line in lines)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The rows with their deltas as CSV: time, run_id, spec, scene, method, metric, value, delta."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "run_id", "spec", "scene", "method", "metric", "value", "delta"])
        for row in with_deltas(rows):
            writer.writerow([row["time"], row["run_id"], row["spec"], row["scene"], row["method"], row["metric"],
                             repr(row["value"]), "" if row["delta"] is None else repr(row["delta"])])


def plot_history(rows: list[dict[str, Any]], path: str | Path) -> None:
    """A PNG with one panel per metric: each (scene, method) as a line over the runs, oldest on the left."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise ValueError("`rows` is empty: there is no history to plot")
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    runs = list(dict.fromkeys((row["spec"], row["run_id"]) for row in rows))
    figure, axes = pyplot.subplots(len(metrics), 1, figsize=(8, 2.6 * len(metrics)), squeeze=False)
    for axis, metric in zip(axes[:, 0], metrics):
        lines: dict[str, tuple[list[int], list[float]]] = {}
        for row in rows:
            if row["metric"] == metric:
                xs, ys = lines.setdefault(f"{row['scene']} / {row['method']}", ([], []))
                xs.append(runs.index((row["spec"], row["run_id"])) + 1)
                ys.append(row["value"])
        for label, (xs, ys) in lines.items():
            axis.plot(xs, ys, marker="o", label=label)
        direction = "higher" if higher_is_better(metric) else "lower"
        axis.set_ylabel(metric + (f" ({_unit(metric).strip()})" if _unit(metric) else ""))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(f"{metric} ({direction} is better)", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("run")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _comparison_cells(comparisons: list[Comparison]) -> list[list[str]]:
    """Header and one row per comparison; each delta is this run's value minus the baseline's."""
    rows = [["scene", "method", "metric", "this run", "previous", "delta", "best so far", "delta best"]]
    for item in comparisons:
        row = [item.scene, item.method, item.metric, _cell(item.metric, item.value)]
        for baseline in (item.previous, item.best):
            delta = None if baseline is None else item.value - baseline
            row += [_cell(item.metric, baseline), _cell(item.metric, delta, signed=True)]
        rows.append(row)
    return rows


def comparison_markdown(title: str, run_id: str, comparisons: list[Comparison], regressions: list[Regression],
                        thresholds: Mapping[str, float]) -> str:
    """A Markdown report of one run: its regressions, then every metric vs the previous run and the best so far."""
    lines = [f"# {title}", "",
             f"Run `{run_id}`, compared with the previous run and the best so far. Thresholds: "
             + ", ".join(f"{'other metrics' if metric == '*' else metric} {value:g}{_unit(metric)}"
                        for metric, value in thresholds.items()) + ".", ""]
    if regressions:
        lines += [f"**{len(regressions)} regression{'s' if len(regressions) > 1 else ''}:**", ""]
        lines += [f"- {regression.describe()}" for regression in regressions]
    else:
        lines.append("No regressions." if any(c.previous is not None for c in comparisons)
                     else "First run of this series: nothing to compare with yet.")
    cells = _comparison_cells(comparisons)
    lines += ["", "| " + " | ".join(cells[0]) + " |", "|" + "---|" * 3 + "---:|" * (len(cells[0]) - 3)]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines) + "\n"


def comparison_text(comparisons: list[Comparison], regressions: list[Regression]) -> str:
    """The comparison as an aligned text table, then one line per regression (or "no regressions")."""
    cells = _comparison_cells(comparisons)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    text = "\n".join("  ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip() for row in cells)
    if regressions:
        return text + "\n" + "\n".join(f"REGRESSION: {regression.describe()}" for regression in regressions)
    return text + ("\nno regressions" if any(c.previous is not None for c in comparisons)
                   else "\nfirst run of this series: nothing to compare with yet")
