"""Node `evaluate`: PSNR, SSIM and LPIPS of one or more candidates against reference views."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from gsr_core.evaluation import evaluate_views, format_table, write_report
from gsr_core.lpips import lpips_status
from tasks.base import NodeContext, NodeParams, Port, node


class EvaluateParams(NodeParams):
    metrics: list[Literal["psnr", "ssim", "lpips"]] = Field(
        ["psnr", "ssim", "lpips"], min_length=1, description="metrics to report")
    split: Literal["train", "test"] = Field("test", description="which views of the reference are scored")
    lpips_weights: str | None = Field(
        None, description="torchvision AlexNet checkpoint (alexnet-owt-7be5be79.pth) for LPIPS; "
                          "default: the torch hub cache (torch.hub.get_dir()/checkpoints)")
    comparison_views: int = Field(2, ge=1, description="how many views the comparison picture shows")


def _lpips_weights_identity(params: EvaluateParams) -> dict:
    """LPIPS results depend on which backbone weights exist: adding them later must rerun the node."""
    if "lpips" not in params.metrics:
        return {}
    available, _, identity = lpips_status(params.lpips_weights)
    return {"lpips_weights": identity if available else None}


def _summary(folder: Path) -> str:
    return format_table(json.loads((folder / "metrics.json").read_text()))


@node("evaluate", inputs={"reference": Port(("views",), description="ground-truth views"),
                          "candidates": Port(("views",), many=True, description="views to score, named by node")},
      output="metrics", version=1, extra_key=_lpips_weights_identity, summary=_summary)
def evaluate(params: EvaluateParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Scores candidates against the reference's held-out views: metrics.json, metrics.csv, comparison.png.

    Candidates are labelled by the name of the node that produced them and matched to the reference by view
    name. LPIPS is AlexNet LPIPS (v0.1); without the backbone weights the report says it is unavailable.
    """
    reference, candidates = inputs["reference"], inputs["candidates"]
    with ctx.progress(len(candidates) * len(reference.split(params.split)), unit="view") as bar:
        evaluation = evaluate_views(reference, candidates, list(params.metrics), params.split,
                                    params.lpips_weights, progress=bar.update)
    write_report(evaluation, reference, candidates, out, params.comparison_views)
