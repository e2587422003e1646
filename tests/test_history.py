"""The metric history (gsr_core.history): appending, reading, comparing with earlier runs, concurrent writers;
how the record_history node turns evaluate outputs into history rows; `gsr history` and `gsr show`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from flows.history import print_history
from flows.inspect import format_graph
from flows.spec import validate
from gsr_core.history import History, format_history, higher_is_better, plot_history, with_deltas, write_csv
from gsr_core.store import Store
from tasks.history import RecordHistoryParams, metric_rows
from tests.conftest import REPO, chain_spec


def row(metric: str, value: float, scene: str = "tiles", method: str = "lr_3dgs") -> dict:
    return {"scene": scene, "method": method, "metric": metric, "value": value}


def test_append_then_read_back(tmp_path: Path):
    history = History.for_store(tmp_path)
    before = datetime.now(timezone.utc)
    stamp = history.append("run-1", "nightly", [row("psnr", 20.1), row("ssim", 0.81, method="bicubic")])
    history.append("run-2", "nightly", [row("psnr", 20.4)])
    assert history.path == tmp_path / "history.sqlite"
    when = datetime.fromisoformat(stamp)
    assert when.utcoffset() == timedelta(0) and before - timedelta(seconds=1) <= when <= datetime.now(timezone.utc)
    rows = history.rows()
    assert [(r["run_id"], r["spec"], r["scene"], r["method"], r["metric"], r["value"]) for r in rows] == [
        ("run-1", "nightly", "tiles", "lr_3dgs", "psnr", 20.1), ("run-1", "nightly", "tiles", "bicubic", "ssim", 0.81),
        ("run-2", "nightly", "tiles", "lr_3dgs", "psnr", 20.4)]
    assert rows[0]["time"] == stamp
    assert [(run["run_id"], run["rows"]) for run in history.runs()] == [("run-1", 2), ("run-2", 1)]
    assert [r["value"] for r in history.rows(metric="psnr")] == [20.1, 20.4]
    assert history.rows(spec="other") == []


def test_a_missing_history_reads_empty_and_is_not_created(tmp_path: Path):
    history = History.for_store(tmp_path / "nowhere")
    assert history.rows() == [] and history.runs() == []
    assert not history.path.exists()


def test_direction_rule():
    assert higher_is_better("psnr") and higher_is_better("ssim")
    assert not higher_is_better("lpips")
    assert not higher_is_better("consistency") and not higher_is_better("reprojection_error")
    with pytest.raises(ValueError, match="metric 'niqe': unknown direction"):
        higher_is_better("niqe")


def test_compare_with_previous_run_and_best_so_far(tmp_path: Path):
    history = History(tmp_path / "h.sqlite")
    history.append("r1", "nightly", [row("psnr", 20.10), row("lpips", 0.20), row("consistency", 0.05)])
    history.append("r2", "nightly", [row("psnr", 21.00), row("lpips", 0.15), row("consistency", 0.05)])
    history.append("r3", "nightly", [row("psnr", 20.80), row("lpips", 0.16), row("consistency", 0.05)])
    thresholds = {"psnr": 0.5, "lpips": 0.02, "*": 0.01}
    assert history.compare("r3", thresholds) == []  # small changes stay under the thresholds
    history.append("r4", "nightly", [row("psnr", 18.87), row("lpips", 0.12), row("consistency", 0.09)])
    found = {(r.metric, r.baseline): r for r in history.compare("r4", thresholds)}
    assert set(found) == {("psnr", "previous run"), ("psnr", "best so far"), ("consistency", "previous run")}
    assert found["psnr", "previous run"].describe() == \
        "psnr of scene tiles / method lr_3dgs dropped 1.93 dB vs previous run (20.80 -> 18.87)"
    assert found["psnr", "best so far"].describe() == \
        "psnr of scene tiles / method lr_3dgs dropped 2.13 dB vs best so far (21.00 -> 18.87)"
    assert found["psnr", "best so far"].baseline_run == "r2"
    assert found["consistency", "previous run"].describe() == (
        "consistency of scene tiles / method lr_3dgs rose 0.0400 (lower is better) vs previous run "
        "(0.0500 -> 0.0900)")
    assert found["psnr", "previous run"].drop == pytest.approx(1.93)
    # LPIPS improved (0.16 -> 0.12): lower is better, so no regression; a rise is one
    history.append("r5", "nightly", [row("psnr", 18.87), row("lpips", 0.20), row("consistency", 0.09)])
    (lpips,) = [r for r in history.compare("r5", thresholds) if r.metric == "lpips"]
    assert (lpips.baseline, lpips.baseline_value, lpips.value) == ("previous run", 0.12, 0.20)
    assert lpips.describe().startswith("lpips of scene tiles / method lr_3dgs rose 0.0800 (lower is better)")


def test_best_equal_to_previous_is_reported_once_and_series_are_separate(tmp_path: Path):
    history = History(tmp_path / "h.sqlite")
    history.append("r1", "nightly", [row("psnr", 22.0)])
    history.append("x1", "other", [row("psnr", 30.0)])  # another series: never a baseline for "nightly"
    history.append("r2", "nightly", [row("psnr", 21.0)])
    (regression,) = history.compare("r2", 0.5)
    assert (regression.baseline, regression.baseline_value, regression.baseline_run) == ("previous run", 22.0, "r1")
    assert history.compare("r1", 0.5) == []  # nothing before the first run
    (first,) = history.comparisons("r1")
    assert first.previous is None and first.best is None


def test_thresholds_must_cover_every_metric(tmp_path: Path):
    history = History(tmp_path / "h.sqlite")
    history.append("r1", "nightly", [row("ssim", 0.9)])
    history.append("r2", "nightly", [row("ssim", 0.8)])
    with pytest.raises(ValueError, match="no value for metric 'ssim'"):
        history.compare("r2", {"psnr": 0.5})
    with pytest.raises(ValueError, match="run 'r9' is not in the history"):
        history.compare("r9", 0.5)


@pytest.mark.parametrize("rows, message", [
    ([], "non-empty list"),
    ([{"scene": "tiles", "method": "m", "metric": "psnr"}], r"rows\[0\]: expected a dict with exactly the keys"),
    ([row("psnr", float("nan"))], r"rows\[0\].value: expected a number"),
    ([row("psnr", "20")], r"rows\[0\].value: expected a number"),
    ([row("niqe", 3.0)], "metric 'niqe': unknown direction"),
    ([row("psnr", 20.0), row("psnr", 21.0)], r"rows\[1\]: \(tiles, lr_3dgs, psnr\) is listed twice"),
    ([row("psnr", 20.0, scene="")], r"rows\[0\].scene: expected a non-empty string"),
])
def test_bad_rows_are_rejected_and_nothing_is_written(tmp_path: Path, rows, message):
    history = History(tmp_path / "h.sqlite")
    with pytest.raises(ValueError, match=message):
        history.append("r1", "nightly", rows)
    assert history.rows() == []


def test_a_run_is_recorded_once(tmp_path: Path):
    history = History(tmp_path / "h.sqlite")
    history.append("r1", "nightly", [row("psnr", 20.0)])
    with pytest.raises(ValueError, match="run 'r1' of 'nightly' is already in the history"):
        history.append("r1", "nightly", [row("ssim", 0.9)])
    assert len(history.rows()) == 1


_WRITER = """
import sys
from gsr_core.history import History
path, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
history = History(path)
for index in range(count):
    history.append(f"w{writer}-{index}", "nightly", [
        {"scene": "tiles", "method": "lr_3dgs", "metric": "psnr", "value": 20.0 + index},
        {"scene": "tiles", "method": "lr_3dgs", "metric": "ssim", "value": 0.5},
        {"scene": "tiles", "method": "bicubic", "metric": "psnr", "value": 18.0}])
"""


def test_concurrent_writers_lose_nothing_and_keep_runs_whole(tmp_path: Path):
    path = str(tmp_path / "h.sqlite")
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(writer), "15"], cwd=REPO)
               for writer in range(4)]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0, 0]
    rows = History(path).rows()
    assert len(rows) == 4 * 15 * 3
    runs = History(path).runs()
    assert sorted(run["run_id"] for run in runs) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))
    ids = {}
    for item in rows:
        ids.setdefault(item["run_id"], []).append(item["id"])
    assert all(max(run_ids) - min(run_ids) == 2 for run_ids in ids.values())  # each run's rows are contiguous


def test_table_csv_and_plot(tmp_path: Path):
    history = History(tmp_path / "h.sqlite")
    history.append("aaaaaaaa-1", "nightly", [row("psnr", 20.0), row("lpips", 0.2)])
    history.append("bbbbbbbb-2", "nightly", [row("psnr", 19.5), row("lpips", 0.25)])
    rows = history.rows()
    assert [r["delta"] for r in with_deltas(rows)] == [None, None, pytest.approx(-0.5), pytest.approx(0.05)]
    table = format_history(rows).splitlines()
    assert table[0].split() == ["time", "(UTC)", "run", "spec", "scene", "method", "metric", "value", "delta"]
    assert table[3].split()[1:] == ["bbbbbbbb", "nightly", "tiles", "lr_3dgs", "psnr", "19.50", "-0.50"]
    assert table[4].split()[-2:] == ["0.2500", "+0.0500"]
    write_csv(rows, tmp_path / "history.csv")
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "time,run_id,spec,scene,method,metric,value,delta" and lines[3].endswith(",19.5,-0.5")
    plot_history(rows, tmp_path / "history.png")
    with Image.open(tmp_path / "history.png") as picture:
        assert picture.format == "PNG" and picture.height > picture.width / 2  # one panel per metric, stacked


def _metrics_folder(folder: Path, candidates: dict[str, dict[str, float]]) -> Path:
    folder.mkdir()
    metrics = list(next(iter(candidates.values())))
    (folder / "metrics.json").write_text(json.dumps({
        "split": "test", "views": ["v0"], "metrics": metrics,
        "lpips": {"requested": False, "available": True, "reason": ""},
        "candidates": {name: {"mean": mean, "per_view": {"v0": mean}} for name, mean in candidates.items()}}))
    return folder


def test_record_history_labels_rows_by_scene_and_method(tmp_path: Path):
    reports = {
        "tiles": _metrics_folder(tmp_path / "a", {"tiles_bicubic": {"psnr": 20.0, "ssim": 0.6},
                                                  "tiles_lr_3dgs": {"psnr": 17.0, "ssim": 0.5}}),
        "eval_b": _metrics_folder(tmp_path / "b", {"b_up": {"psnr": 19.0, "ssim": 0.7, "consistency": math.nan}}),
    }  # an undefined mean (NaN) is left out
    params = RecordHistoryParams(scenes={"eval_b": "glyphs"}, methods={"b_up": "bicubic"})
    assert [(r["scene"], r["method"], r["metric"], r["value"]) for r in metric_rows(params, reports)] == [
        ("tiles", "bicubic", "psnr", 20.0), ("tiles", "bicubic", "ssim", 0.6),
        ("tiles", "lr_3dgs", "psnr", 17.0), ("tiles", "lr_3dgs", "ssim", 0.5),
        ("glyphs", "bicubic", "psnr", 19.0), ("glyphs", "bicubic", "ssim", 0.7)]
    with pytest.raises(ValueError, match=r"params.scenes names \['eval_c'\], which are not metrics inputs"):
        metric_rows(RecordHistoryParams(scenes={"eval_c": "x"}), reports)
    with pytest.raises(ValueError, match=r"params.methods names \['nope'\], which are not candidates"):
        metric_rows(RecordHistoryParams(methods={"nope": "x"}), reports)


def test_gsr_history_prints_the_table_with_filters(tmp_path: Path, capsys):
    print_history(str(tmp_path))
    assert "no history yet" in capsys.readouterr().out
    History.for_store(tmp_path).append("run-1", "nightly", [row("psnr", 20.0), row("ssim", 0.6)])
    History.for_store(tmp_path).append("run-2", "nightly", [row("psnr", 21.25), row("ssim", 0.6)])
    assert main(["history", "--store", str(tmp_path), "--metric", "psnr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[1:] == ["run-2", "nightly", "tiles", "lr_3dgs", "psnr", "21.25", "+1.25"]
    assert lines[-1].startswith("(2 runs, metric 'psnr';") and len(lines) == 4
    print_history(str(tmp_path), spec="weekly")
    assert "no rows for spec 'weekly'" in capsys.readouterr().out


def test_show_lists_record_history_as_always_running(tmp_path: Path, views_folder: Path):
    spec = chain_spec(views_folder, name="shown")
    spec["nodes"]["history"] = {"task": "record_history", "inputs": {"metrics": ["report"]}}
    (line,) = [text for text in format_graph(validate(spec), Store(tmp_path / "store")).splitlines()
               if text.strip().startswith("history")]
    assert line.split()[1:4] == ["record_history", "always", "runs"]
