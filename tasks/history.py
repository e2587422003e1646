"""Node `record_history`: appends a run's evaluation metrics to the store's history and flags regressions.

The node is never cached (``cache=False``): every run appends its rows, even when every evaluation upstream came
from the store. Its output folder holds ``regressions.json`` (the comparison with the previous run and the
best so far, and the regressions beyond the thresholds), ``history.csv`` and ``history.png`` (the whole series),
and ``comparison.md``, which is also published as a Prefect markdown artifact (key ``gsr-history-<series>``).
A regression is not a node failure: the node completes, and the pipeline reports it afterwards through the
node's ``alerts`` (``gsr run`` exits with status 3; a deployment's flow run ends Failed with the message).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field

from gsr_core.history import History, comparison_markdown, comparison_text, plot_history, write_csv
from tasks.base import NodeContext, NodeParams, Port, node

REGRESSIONS_FILE = "regressions.json"


class RecordHistoryParams(NodeParams):
    series: str | None = Field(
        None, min_length=1, description="history series the run belongs to (runs are compared within their "
                                        "series); default: the pipeline's name")
    scenes: dict[str, str] = Field(
        default_factory=dict, description="metrics input (evaluate node name) -> scene label; default: the node's name")
    methods: dict[str, str] = Field(
        default_factory=dict, description="candidate (node name) -> method label; default: the candidate's name "
                                          "without a leading '<scene>_' (tiles_bicubic in scene tiles -> bicubic)")
    threshold_db: float = Field(0.5, ge=0, description="flag a PSNR drop larger than this many dB")
    threshold_ssim: float = Field(0.01, ge=0, description="flag an SSIM drop larger than this")
    threshold_lpips: float = Field(0.01, ge=0, description="flag an LPIPS rise larger than this")
    threshold_error: float = Field(0.01, ge=0, description="flag a rise larger than this of a consistency error "
                                                           "(metrics named consistency or *_error)")

    def thresholds(self) -> dict[str, float]:
        """Per metric, the worsening that counts as a regression (``*``: consistency errors)."""
        return {"psnr": self.threshold_db, "ssim": self.threshold_ssim, "lpips": self.threshold_lpips,
                "*": self.threshold_error}


def _method_label(candidate: str, scene: str, methods: dict[str, str]) -> str:
    if candidate in methods:
        return methods[candidate]
    prefix = f"{scene}_"
    return candidate[len(prefix):] if candidate.startswith(prefix) and len(candidate) > len(prefix) else candidate


def metric_rows(params: RecordHistoryParams, reports: dict[str, Path]) -> list[dict]:
    """History rows (scene, method, metric, value) from the mean metrics in each evaluate output's metrics.json.

    A mean that is undefined (NaN, e.g. a consistency error with no co-visible pixels) is not recorded.

    Args:
        reports: evaluate node name -> its output folder, in spec order.
    """
    loaded = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in reports.items()}
    candidates = {candidate for report in loaded.values() for candidate in report["candidates"]}
    for key, known, what in (("scenes", set(loaded), "metrics inputs"), ("methods", candidates, "candidates")):
        unknown = sorted(set(getattr(params, key)) - known)
        if unknown:
            raise ValueError(f"params.{key} names {unknown}, which are not {what} of this node ({sorted(known)})")
    rows = []
    for name, report in loaded.items():
        scene = params.scenes.get(name, name)
        for candidate, values in report["candidates"].items():
            method = _method_label(candidate, scene, params.methods)
            rows += [{"scene": scene, "method": method, "metric": metric, "value": values["mean"][metric]}
                     for metric in report["metrics"] if not math.isnan(values["mean"][metric])]
    return rows


def _artifact_key(series: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    return "gsr-history-" + (re.sub(r"[^a-z0-9]+", "-", series.lower()).strip("-") or "series")


def _summary(folder: Path) -> str:
    return (folder / "summary.txt").read_text()


def _alerts(folder: Path) -> list[str]:
    return [item["message"] for item in json.loads((folder / REGRESSIONS_FILE).read_text())["regressions"]]


@node("record_history", inputs={"metrics": Port(("metrics",), many=True, description="evaluate nodes, one per scene")},
      output="history", version=1, summary=_summary, cache=False, alerts=_alerts)
def record_history(params: RecordHistoryParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Appends the run's mean metrics to the store's history, flags regressions vs previous/best runs. Never cached.

    A regression (a metric worse than the previous run or the best so far by more than its threshold) makes the
    run end with exit status 3.

    Rows are (scene, method, metric): the scene is the evaluate node's name (or params.scenes), the method the
    candidate's node name (or params.methods). The run is the Prefect flow run; the series defaults to the
    pipeline's name. Writes regressions.json, history.csv, history.png, comparison.md (also a Prefect artifact).
    """
    run_id = flow_run.get_id()
    if run_id is None:
        raise RuntimeError("record_history must run inside a Prefect flow run (gsr run, or a served deployment)")
    series = params.series or flow_run.get_parameters()["spec"]["name"]
    history = History.for_store(ctx.store.root)
    stamp = history.append(run_id, series, metric_rows(params, inputs["metrics"]))
    thresholds = params.thresholds()
    comparisons = history.comparisons(run_id)
    regressions = history.compare(run_id, thresholds)
    (out / REGRESSIONS_FILE).write_text(json.dumps({
        "run_id": run_id, "series": series, "time": stamp, "thresholds": thresholds,
        "regressions": [regression.to_json() for regression in regressions],
        "comparisons": [asdict(item) for item in comparisons]}, indent=1))
    series_rows = history.rows(spec=series)
    write_csv(series_rows, out / "history.csv")
    plot_history(series_rows, out / "history.png")
    (out / "summary.txt").write_text(f"series {series}, run {run_id} ({stamp}), history {history.path}\n"
                                     + comparison_text(comparisons, regressions))
    markdown = comparison_markdown(f"gsr history: {series}", run_id, comparisons, regressions, thresholds)
    (out / "comparison.md").write_text(markdown)
    create_markdown_artifact(markdown=markdown, key=_artifact_key(series),
                             description=f"{series}: {len(regressions)} regression(s) vs previous run / best so far")
