"""Node `synthetic_scene`: a procedural scene ray-traced analytically, with exact cameras and a point cloud."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from gsr_core.data.synthetic import write_synthetic_scene
from tasks.base import NodeContext, NodeParams, node


class SyntheticSceneParams(NodeParams):
    name: Literal["tiles", "glyphs", "stripes"] = Field("tiles", description="which procedural scene")
    resolution: int = Field(256, ge=8, description="image width and height in pixels")
    views: int = Field(32, ge=2, description="number of cameras on the orbit")
    seed: int = Field(0, description="seeds layout, textures and camera jitter; same seed, same images")
    test_every: int = Field(8, ge=2, description="every n-th view is held out as a test view")
    supersample: int = Field(4, ge=1, description="anti-aliasing: supersample x supersample rays per pixel")
    num_points: int = Field(20000, ge=0, description="points sampled on visible surfaces, for initialising Gaussians")


@node("synthetic_scene", inputs={}, output="views", version=1)
def synthetic_scene(params: SyntheticSceneParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Ground-truth views of a procedural scene of textured planes, boxes and spheres, ray-traced analytically.

    Cameras are exact pinholes on an orbit; the images never come from the Gaussian renderer under test.
    """
    with ctx.progress(params.views, unit="view") as bar:
        write_synthetic_scene(out, params.name, resolution=params.resolution, views=params.views, seed=params.seed,
                              test_every=params.test_every, supersample=params.supersample,
                              num_points=params.num_points, progress=lambda done, total: bar.update(done - bar.n))
