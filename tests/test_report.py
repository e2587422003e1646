"""The static HTML report of a run (gsr_core/report_html.py), checked in a real headless browser: Debian's chromium
driven by Playwright (never a downloaded browser). The screenshot lands in test-artifacts/report.png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from flows.pipeline import run_pipeline
from gsr_core.history import History
from gsr_core.report_html import REPORT_FILE
from tests.conftest import REPO, chain_spec, write_views

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, prefect_api) -> Path:
    """A finished run with an evaluation of two methods (one a 3DGS), earlier history of its series, and its report."""
    root = tmp_path_factory.mktemp("report")
    spec = chain_spec(write_views(root / "views", size=64), name="report-test")
    spec["nodes"]["fit"] = {"task": "fit_gaussians", "inputs": {"views": "lowres"}, "params": {"iterations": 5}}
    spec["nodes"]["rendered"] = {"task": "render_views", "inputs": {"gaussians": "fit", "views": "scene"},
                                 "params": {"split": "test"}}
    spec["nodes"]["report"]["inputs"]["candidates"] = ["bicubic", "rendered"]
    store = root / "store"
    history = History.for_store(store)
    for run, psnr in (("earlier-1", 20.5), ("earlier-2", 21.0)):
        history.append(run, "report-test", [{"scene": "report", "method": "bicubic", "metric": "psnr", "value": psnr}])
    run_pipeline(spec=spec, store=str(store))
    (folder,) = (store / "runs").iterdir()
    return folder


def test_report_is_written_with_relative_links_only(run_folder: Path):
    page = (run_folder / REPORT_FILE).read_text()
    assert 'id="metrics-report"' in page and "http" not in page  # nothing from a network
    plots = sorted(path.name for path in (run_folder / "report").iterdir())
    assert plots == ["history.png", "report-gaussians.png", "report-per-view.png"]
    summary = json.loads((run_folder / "summary.json").read_text())
    fit_key = next(node["key"] for node in summary if node["node"] == "fit")
    assert f'href="../../objects/{fit_key}/gaussians.ply"' in page
    assert "points.ply" not in page  # a views folder's point cloud is not a 3DGS scene


def test_report_in_headless_chromium(run_folder: Path):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(run_folder.parent.parent.parent / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("requestfailed", lambda request: problems.append(f"failed to load {request.url}"))
            page.goto((run_folder / REPORT_FILE).as_uri(), wait_until="load")
            methods = page.locator("#metrics-report td.method").all_inner_texts()
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
            ply = page.locator("a.ply").first.evaluate("a => a.href")
            headings = page.locator("h2").all_inner_texts()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"\nreport screenshot: {screenshot}")
    assert problems == []
    assert sorted(methods) == ["bicubic", "rendered"]
    assert len(images) == 4 and all(complete and width > 0 for _, complete, width in images), images
    assert [src.rsplit("/", 1)[-1] for src, _, _ in images] == [
        "report-per-view.png", "report-gaussians.png", "comparison.png", "history.png"]
    assert ply.startswith("file://") and Path(ply[len("file://"):]).is_file()
    assert headings == ["report", "History", "Timings", "3DGS scenes"]
    assert screenshot.stat().st_size > 10_000


def test_gsr_report_rewrites_a_run_with_newer_history(run_folder: Path, capsys):
    store = run_folder.parent.parent
    before = (run_folder / "report" / "history.png").read_bytes()
    History.for_store(store).append("later", "report-test",
                                    [{"scene": "report", "method": "bicubic", "metric": "psnr", "value": 19.0}])
    assert main(["report", str(run_folder)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run_folder / REPORT_FILE}"
    assert (run_folder / "report" / "history.png").read_bytes() != before  # the new run is in the plot
    assert main(["report", str(REPO / "pipelines" / "demo.yaml"), "--store", str(store)]) == 2
    assert "has no run of pipeline 'demo-x4' yet" in capsys.readouterr().err
