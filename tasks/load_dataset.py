"""Node `load_dataset`: a real capture (COLMAP, LLFF, Blender, instant-ngp) as a views folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gsr_core.data.datasets import check_layout, dataset_digest, read_dataset, write_dataset_views
from tasks.base import NodeContext, NodeParams, node


class LoadDatasetParams(NodeParams):
    path: str = Field(description="dataset folder; relative paths are relative to the working directory")
    format: Literal["auto", "colmap", "llff", "blender", "instant_ngp"] = Field(
        "auto", description="auto: poses_bounds.npy -> llff, transforms_train.json -> blender, "
                            "transforms.json -> instant_ngp, sparse/0 -> colmap")
    images: str | None = Field(None, description="colmap/llff: image folder inside `path` (default `images`; e.g. "
                                                 "images_4); intrinsics are scaled to its images' size")
    split: Literal["llffhold", "dataset"] = Field(
        "llffhold", description="llffhold: every `llffhold`-th view (from the first) is a test view; "
                                "dataset: the dataset's own transforms_train/test.json (blender)")
    llffhold: int = Field(8, ge=2, description="with split llffhold: hold out every n-th view for testing")
    background: Literal["white", "black"] = Field("white", description="colour RGBA images are composited on")
    max_side: int | None = Field(None, ge=8, description="resolution cap: images whose longer side exceeds it are "
                                                         "resized (antialiased bicubic), intrinsics scaled to match")
    undistort: bool = Field(False, description="undistort images of distorted cameras with COLMAP's undistorter "
                                               "(colmap, instant_ngp); when false they are refused")

    @field_validator("path")
    @classmethod
    def _is_folder(cls, path: str) -> str:
        if not Path(path).is_dir():
            raise ValueError(f"dataset folder {path} does not exist or is not a folder")
        return path

    @model_validator(mode="after")
    def _fits_the_folder(self) -> "LoadDatasetParams":
        check_layout(self.path, self.format, self.images, self.split)
        return self


def _source_digest(params: LoadDatasetParams) -> dict:
    dataset = read_dataset(params.path, params.format, params.images, params.split, params.undistort)
    return {"source": dataset_digest(dataset)}


@node("load_dataset", inputs={}, output="views", version=1, extra_key=_source_digest)
def load_dataset(params: LoadDatasetParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Views, cameras, train/test split and initial point cloud from a COLMAP, LLFF, Blender or instant-ngp folder.

    See docs/datasets.md. The content digest of the files read (model files and the images used) is part of the
    cache key, so editing the dataset reruns the node.
    """
    dataset = read_dataset(params.path, params.format, params.images, params.split, params.undistort)
    with ctx.progress(len(dataset.views), unit="view") as bar:
        write_dataset_views(dataset, out, split=params.split, llffhold=params.llffhold, max_side=params.max_side,
                            background=params.background, progress=bar.update)
