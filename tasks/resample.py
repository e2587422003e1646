"""Nodes `downsample` and `upsample`: resize every view by an integer factor, cameras scaled to match."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from gsr_core.data.resample import resample_views
from tasks.base import NodeContext, NodeParams, Port, node


class DownsampleParams(NodeParams):
    factor: int = Field(4, ge=1, description="integer factor; image sides must be divisible by it")
    filter: Literal["area", "bicubic"] = Field(
        "area", description="area: mean of each factor x factor block; bicubic: antialiased bicubic")


class UpsampleParams(NodeParams):
    factor: int = Field(4, ge=1, description="integer factor")


@node("downsample", inputs={"views": Port(("views",))}, output="views", version=1)
def downsample(params: DownsampleParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Views shrunk by an integer factor (the low-resolution input of 3D super-resolution)."""
    views = inputs["views"]
    with ctx.progress(len(views), unit="view") as bar:
        resample_views(views, out, params.factor, "down", params.filter, progress=bar.update)


@node("upsample", inputs={"views": Port(("views",))}, output="views", version=1)
def upsample(params: UpsampleParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Views enlarged by an integer factor with bicubic interpolation (the trivial super-resolution baseline)."""
    views = inputs["views"]
    with ctx.progress(len(views), unit="view") as bar:
        resample_views(views, out, params.factor, "up", progress=bar.update)
