"""The evaluate node's report: ranking, gap closure, what made each candidate, multi-view consistency, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flows.pipeline import PipelineFailed, run_pipeline
from gsr_core.data.views import Views
from gsr_core.evaluation import Evaluation, candidate_info, format_table
from gsr_core.priors.sr3 import SR3Prior, SR3Settings, sr3_unet
from tests.conftest import write_views


def evaluation(psnrs: dict[str, float], **kwargs) -> Evaluation:
    """An evaluation of two views whose PSNRs are ``psnrs`` (candidate -> value) and SSIMs 0.5."""
    values = {name: {view: {"psnr": value, "ssim": 0.5} for view in ("a", "b")} for name, value in psnrs.items()}
    return Evaluation(split="test", metrics=["psnr", "ssim"], views=["a", "b"], values=values, **kwargs)


def test_ranking_follows_psnr_and_gap_closure_runs_from_baseline_to_upper_bound():
    result = evaluation({"bicubic": 20.0, "sr": 23.0, "hr": 26.0, "lr": 18.5}, baseline="bicubic", upper_bound="hr")
    assert result.ranking() == ["hr", "sr", "bicubic", "lr"]
    assert result.gap_closure() == {"bicubic": 0.0, "sr": 0.5, "hr": 1.0, "lr": -0.25}
    document = result.to_json()
    assert document["ranking"] == ["hr", "sr", "bicubic", "lr"] and document["ranked_by"] == "psnr"
    assert document["gap_closure"] == {"baseline": "bicubic", "upper_bound": "hr"}
    assert document["candidates"]["sr"]["gap_closure"] == 0.5
    assert evaluation({"bicubic": 20.0, "hr": 20.0}, baseline="bicubic", upper_bound="hr").gap_closure() == {
        "bicubic": None, "hr": None}  # no gap to close
    flipped = evaluation({"bicubic": 20.0, "hr": 18.0}, baseline="bicubic", upper_bound="hr").gap_closure()
    assert flipped == {"bicubic": 0.0, "hr": 1.0} and math.copysign(1.0, flipped["bicubic"]) == 1.0  # not -0.0
    assert "gap_closure" not in evaluation({"bicubic": 20.0}, baseline="bicubic").to_json()


def test_means_leave_out_views_where_a_metric_is_undefined():
    result = Evaluation(split="test", metrics=["consistency"], views=["a", "b", "c"],
                        values={"x": {"a": {"consistency": 0.1}, "b": {"consistency": math.nan},
                                      "c": {"consistency": 0.3}}})
    assert result.mean("x")["consistency"] == pytest.approx(0.2)
    assert result.ranked_by == "consistency"  # no PSNR: the first metric, lower is better


def test_candidate_info_reads_what_made_the_views(tmp_path: Path):
    folder = write_views(tmp_path / "views", count=2, size=8)
    document = json.loads((folder / "cameras.json").read_text())
    assert candidate_info(Views.read(folder)) == {"gaussians": None, "seconds": None}
    for metadata, expected in [
        ({"upscaled": {"prior": {}, "steps": 4, "seconds": 2.5}}, {"gaussians": None, "seconds": 2.5}),
        ({"upscaled": {"seconds": 2.5}, "source": {"num_gaussians": 900, "seconds": 40.0}},
         {"gaussians": 900, "seconds": 40.0}),
    ]:
        (folder / "cameras.json").write_text(json.dumps({**document, "metadata": metadata}))
        assert candidate_info(Views.read(folder)) == expected


def test_table_shows_rank_gap_and_cost_within_100_columns():
    result = evaluation({"bicubic": 20.0, "lr_3dgs_bicubic": 21.0, "hr_3dgs": 26.0},
                        baseline="bicubic", upper_bound="hr_3dgs")
    result.info = {"bicubic": {"gaussians": None, "seconds": None},
                   "lr_3dgs_bicubic": {"gaussians": 12345, "seconds": 61.25},
                   "hr_3dgs": {"gaussians": 1234567, "seconds": 3600.0}}
    table = format_table(result.to_json()).splitlines()
    assert table[0].split() == ["#", "candidate", "PSNR", "SSIM", "GAP", "GAUSSIANS", "SECONDS"]
    assert table[1].split() == ["1", "hr_3dgs", "26.0000*", "0.5000*", "1.000", "1234567", "3600.0"]
    assert table[2].split() == ["2", "lr_3dgs_bicubic", "21.0000", "0.5000*", "0.167", "12345", "61.2"]
    assert table[3].split() == ["3", "bicubic", "20.0000", "0.5000*", "0.000", "-", "-"]
    assert max(len(line) for line in table) <= 100
    assert "GAP: gap closure (PSNR - PSNR[bicubic]) / (PSNR[hr_3dgs] - PSNR[bicubic])" in table


def test_table_of_a_report_without_ranking_keeps_the_old_layout():
    document = evaluation({"bicubic": 20.0, "lr_3dgs": 19.0}).to_json()
    for key in ("ranking", "ranked_by"):
        del document[key]
    table = format_table(document).splitlines()
    assert table[0].split() == ["#", "candidate", "PSNR", "SSIM"]
    assert table[1].split() == ["bicubic", "20.0000*", "0.5000*"] and table[2].split()[0] == "lr_3dgs"


# --- the node, through the pipeline engine ------------------------------------------------------------------------


def spec(prior: Path) -> dict:
    """A 64 px synthetic scene with four test views, its x4 LR, and four candidates, scored with a geometry."""
    fit = {"iterations": 50, "sh_degree": 0, "device": "cpu", "backend": "torch"}
    return {"name": "evaluate-consistency", "nodes": {
        "scene": {"task": "synthetic_scene", "params": {"name": "tiles", "resolution": 64, "views": 8, "seed": 0,
                                                         "test_every": 2, "supersample": 1, "num_points": 2000}},
        "lowres": {"task": "downsample", "inputs": {"views": "scene"}, "params": {"factor": 4}},
        "bicubic": {"task": "upsample", "inputs": {"views": "lowres"}, "params": {"factor": 4}},
        "prior": {"task": "load_prior", "params": {"kind": "sr3", "source": str(prior)}},
        "sr": {"task": "upscale_views", "inputs": {"prior": "prior", "views": "lowres"},
               "params": {"steps": 2, "split": "test", "device": "cpu"}},
        "lr_gs": {"task": "fit_gaussians", "inputs": {"views": "lowres"}, "params": fit},
        "lr_3dgs": {"task": "render_views", "inputs": {"gaussians": "lr_gs", "views": "scene"},
                    "params": {"split": "test", "backend": "torch", "device": "cpu"}},
        "hr_gs": {"task": "fit_gaussians", "inputs": {"views": "scene"}, "params": fit},
        "hr_3dgs": {"task": "render_views", "inputs": {"gaussians": "hr_gs", "views": "scene"},
                    "params": {"split": "test", "backend": "torch", "device": "cpu"}},
        "report": {"task": "evaluate",
                   "inputs": {"reference": "scene", "candidates": ["bicubic", "sr", "lr_3dgs", "hr_3dgs"],
                              "geometry": "hr_gs"},
                   "params": {"metrics": ["psnr", "ssim"], "upper_bound": "hr_3dgs", "device": "cpu"}},
    }}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, prefect_api):
    """The spec run once: (spec, store, {node: output folder}, metrics.json of the report)."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    SR3Prior(sr3_unet((32, 32)), SR3Settings(residual=True, num_train_timesteps=20, default_steps=2)).save(
        root / "prior")
    the_spec, store = spec(root / "prior"), root / "store"
    outputs = {report["node"]: store / report["path"] for report in run_pipeline(spec=the_spec, store=str(store))}
    return the_spec, store, outputs, json.loads((outputs["report"] / "metrics.json").read_text())


def test_report_has_consistency_cost_ranking_and_gap_closure(evaluated):
    _, _, outputs, report = evaluated
    candidates = report["candidates"]
    assert report["metrics"] == ["psnr", "ssim", "consistency"]  # added because a geometry is connected
    assert report["ranking"] == sorted(candidates, key=lambda n: -candidates[n]["mean"]["psnr"])
    for name, entry in candidates.items():
        assert set(entry["per_view"]) == set(report["views"]) and len(report["views"]) == 4
        assert 0 <= entry["mean"]["consistency"] < 0.5
    # The renders of the geometry itself are the most consistent with its depth.
    assert candidates["hr_3dgs"]["mean"]["consistency"] < candidates["bicubic"]["mean"]["consistency"]
    assert candidates["hr_3dgs"]["mean"]["consistency"] < candidates["sr"]["mean"]["consistency"]
    assert [pair[0] for pair in report["consistency"]["pairs"]] == report["views"]  # each view and its neighbour
    assert all(pair[1] in report["views"] and pair[1] != pair[0] for pair in report["consistency"]["pairs"])
    assert 0 < report["consistency"]["covisible_fraction"] <= 1 and report["consistency"]["reference"] >= 0
    assert candidates["bicubic"]["gap_closure"] == 0 and candidates["hr_3dgs"]["gap_closure"] == 1
    psnr = {name: entry["mean"]["psnr"] for name, entry in candidates.items()}
    assert candidates["lr_3dgs"]["gap_closure"] == pytest.approx(
        (psnr["lr_3dgs"] - psnr["bicubic"]) / (psnr["hr_3dgs"] - psnr["bicubic"]))
    fits = {name: json.loads((outputs[name] / "fit.json").read_text()) for name in ("lr_gs", "hr_gs")}
    assert candidates["hr_3dgs"]["info"] == {"gaussians": fits["hr_gs"]["num_gaussians"],
                                             "seconds": fits["hr_gs"]["seconds"]}
    assert candidates["lr_3dgs"]["info"]["gaussians"] == fits["lr_gs"]["num_gaussians"]
    assert candidates["sr"]["info"]["gaussians"] is None and candidates["sr"]["info"]["seconds"] > 0
    assert candidates["bicubic"]["info"] == {"gaussians": None, "seconds": None}
    table = format_table(report)
    assert "CONSISTENCY" in table.splitlines()[0] and "GAP" in table.splitlines()[0]
    assert "consistency" in (outputs["report"] / "metrics.csv").read_text().splitlines()[0]


def test_consistency_without_geometry_fails_naming_the_node_and_port(evaluated):
    the_spec, store, _, _ = evaluated
    report = the_spec["nodes"]["report"]
    broken = {**the_spec, "nodes": {**the_spec["nodes"], "report": {
        **report, "inputs": {k: v for k, v in report["inputs"].items() if k != "geometry"},
        "params": {**report["params"], "metrics": ["psnr", "consistency"]}}}}
    with pytest.raises(PipelineFailed) as caught:
        run_pipeline(spec=broken, store=str(store))
    assert "node 'report' (evaluate) failed" in str(caught.value)
    assert "params.metrics lists 'consistency', which needs inputs.geometry" in str(caught.value)


def test_unknown_upper_bound_fails_naming_the_key(evaluated):
    the_spec, store, _, _ = evaluated
    report = the_spec["nodes"]["report"]
    broken = {**the_spec, "nodes": {**the_spec["nodes"], "report": {
        **report, "params": {**report["params"], "upper_bound": "hr_gs"}}}}
    with pytest.raises(PipelineFailed) as caught:
        run_pipeline(spec=broken, store=str(store))
    message = str(caught.value)
    assert "node 'report' (evaluate) failed" in message and "`upper_bound` 'hr_gs' is not a candidate" in message
