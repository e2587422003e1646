"""Node `evaluate`: PSNR, SSIM, LPIPS and multi-view consistency of candidates against reference views, ranked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from gsr_core.evaluation import evaluate_views, format_table, write_report
from gsr_core.lpips import lpips_status
from tasks.base import NodeContext, NodeParams, Port, node


class EvaluateParams(NodeParams):
    metrics: list[Literal["psnr", "ssim", "lpips", "consistency"]] = Field(
        ["psnr", "ssim", "lpips"], min_length=1,
        description="metrics to report; 'consistency' needs the geometry input and is added whenever it is given")
    split: Literal["train", "test"] = Field("test", description="which views of the reference are scored")
    lpips_weights: str | None = Field(
        None, description="torchvision AlexNet checkpoint (alexnet-owt-7be5be79.pth) for LPIPS; "
                          "default: the torch hub cache (torch.hub.get_dir()/checkpoints)")
    comparison_views: int = Field(2, ge=1, description="how many views the comparison picture shows")
    baseline: str | None = Field(
        "bicubic", description="candidate where gap closure is 0 (used when upper_bound is set)")
    upper_bound: str | None = Field(
        None, description="candidate where gap closure is 1 (e.g. a 3DGS fitted to the HR views); with baseline, "
                          "each candidate gets (PSNR - PSNR_baseline) / (PSNR_upper_bound - PSNR_baseline)")
    device: str = Field("auto", description="torch device the geometry is rendered on; 'auto' picks CUDA")


def _lpips_weights_identity(params: EvaluateParams) -> dict:
    """LPIPS results depend on which backbone weights exist: adding them later must rerun the node."""
    if "lpips" not in params.metrics:
        return {}
    available, _, identity = lpips_status(params.lpips_weights)
    return {"lpips_weights": identity if available else None}


def _summary(folder: Path) -> str:
    return format_table(json.loads((folder / "metrics.json").read_text()))


@node("evaluate", inputs={
    "reference": Port(("views",), description="ground-truth views"),
    "candidates": Port(("views",), many=True, description="views to score, named by node"),
    "geometry": Port(("gaussians",), optional=True,
                     description="a 3DGS of the scene (e.g. fitted to the HR views) whose depth, rendered at the "
                                 "reference's cameras, pairs pixels across views for the consistency metric"),
}, output="metrics", version=2, extra_key=_lpips_weights_identity, summary=_summary)
def evaluate(params: EvaluateParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Scores and ranks candidates against the reference's held-out views: metrics.json, metrics.csv, comparison.png.

    Candidates are labelled by the name of the node that produced them and matched to the reference by view
    name. LPIPS is AlexNet LPIPS (v0.1); without the backbone weights the report says it is unavailable. With a
    geometry, every candidate also gets a multi-view consistency error (docs/evaluation.md). Each candidate's
    Gaussian count and producing wall time come from its views' metadata; gap closure runs from `baseline` to
    `upper_bound`.
    """
    reference, candidates, geometry = inputs["reference"], inputs["candidates"], inputs.get("geometry")
    metrics = list(params.metrics)
    if "consistency" in metrics and geometry is None:
        raise ValueError("params.metrics lists 'consistency', which needs inputs.geometry (a gaussians node "
                         "whose depth pairs pixels across views); connect one or drop 'consistency'")
    if geometry is not None and "consistency" not in metrics:
        metrics.append("consistency")
    with ctx.progress(len(candidates) * len(reference.split(params.split)), unit="view") as bar:
        evaluation = evaluate_views(reference, candidates, metrics, params.split, params.lpips_weights,
                                    progress=bar.update, geometry=geometry, baseline=params.baseline,
                                    upper_bound=params.upper_bound, device=params.device)
    write_report(evaluation, reference, candidates, out, params.comparison_views)
