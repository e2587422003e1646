"""Nodes `fit_gaussians` and `render_views`: a 3DGS fitted to views, and views rendered from a 3DGS."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from gsr_core.data.views import ViewsWriter
from gsr_core.fit import FitConfig, fit
from gsr_core.render_views import render_views as render_gaussians
from tasks.base import NodeContext, NodeParams, Port, node
from tasks.kinds import GAUSSIANS_FILE, StoredGaussians


def _render_background(choice, metadata: dict) -> tuple[float, float, float]:
    """'auto': the scene's own background colour when its views say (synthetic scenes do), else black."""
    return tuple(metadata.get("background", (0.0, 0.0, 0.0))) if choice == "auto" else choice


class FitGaussiansParams(FitConfig):
    iterations: int = Field(2000, ge=1, description="optimisation steps (30000 in the 3DGS papers)")


@node("fit_gaussians", inputs={"views": Port(("views",), description="train views to fit (test views are ignored)")},
      output="gaussians", version=2)
def fit_gaussians(params: FitGaussiansParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """A 3D Gaussian Splatting scene fitted to the train views (gsplat's recipe; gaussians.ply, fit.json).

    Checkpoints go to the node's scratch folder; a crashed fit resumes from the last one.
    """
    views = inputs["views"]
    with ctx.progress(params.iterations, unit="step") as bar:
        def report(state: dict) -> None:
            bar.update(state["step"] - bar.n)
            bar.set_postfix(loss=f"{state['loss']:.4f}", psnr=f"{state['psnr']:.2f}", n=state["num_gaussians"],
                            refresh=False)

        result = fit(views, params, checkpoint_dir=ctx.scratch / "fit", progress=report)
    result.gaussians.save_ply(out / GAUSSIANS_FILE)
    (out / "fit.json").write_text(json.dumps(result.stats(), indent=1))
    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "psnr", "num_gaussians"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.history)


class RenderViewsParams(NodeParams):
    scale: float = Field(1.0, gt=0, description="render at this multiple of the cameras' resolution (e.g. 4)")
    split: Literal["all", "train", "test"] = Field("all", description="which views' cameras to render")
    background: Literal["auto"] | tuple[float, float, float] = Field(
        "auto", description="'auto': the views' background colour (synthetic scenes), else black; or three numbers")
    backend: Literal["auto", "torch", "gsplat"] = Field("auto", description="rasterizer backend")
    device: str = Field("auto", description="torch device; 'auto' picks CUDA when available")


def _source_stats(gaussians: StoredGaussians) -> dict:
    """What evaluation reports about a rendered candidate's 3DGS: its size and the wall time that made it."""
    return {"num_gaussians": len(gaussians), "seconds": gaussians.stats.get("seconds")}


@node("render_views", inputs={"gaussians": Port(("gaussians",)),
                              "views": Port(("views",), description="whose cameras (names, splits) to render")},
      output="views", version=2)
def render_views(params: RenderViewsParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Views rendered from a 3DGS at the cameras of other views, at any resolution scale.

    The output's metadata says which 3DGS made it: ``source`` = ``{"num_gaussians", "seconds"}`` (the fit's or
    distillation's wall time from the gaussians folder's fit.json; null when it has none).
    """
    gaussians, views = inputs["gaussians"], inputs["views"]
    background = _render_background(params.background, views.metadata)
    records = views.split(None if params.split == "all" else params.split)
    writer = ViewsWriter(out, metadata=dict(views.metadata, rendered={"scale": params.scale},
                                            source=_source_stats(gaussians)))
    with ctx.progress(len(records), unit="view") as bar:
        for record in records:
            camera = record.camera.scaled(params.scale)
            image = render_gaussians(gaussians, [camera], background=background, backend=params.backend,
                                     device=params.device)[0]
            writer.add(record.name, record.split, camera, image)
            bar.update(1)
    writer.close(views.points())
