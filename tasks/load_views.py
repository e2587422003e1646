"""Node `load_views`: a views folder in gsr's own format, copied into the store."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field, field_validator

from gsr_core.data.views import CAMERAS_FILE, Views
from gsr_core.store import digest_tree
from tasks.base import NodeContext, NodeParams, node


class LoadViewsParams(NodeParams):
    path: str = Field(description="views folder (images/ + cameras.json, see docs/views-format.md); "
                                  "relative paths are relative to the working directory")

    @field_validator("path")
    @classmethod
    def _is_views_folder(cls, path: str) -> str:
        if not (Path(path) / CAMERAS_FILE).is_file():
            raise ValueError(f"{path} is not a views folder: {Path(path) / CAMERAS_FILE} does not exist")
        return path


def _source_digest(params: LoadViewsParams) -> dict:
    return {"source": digest_tree(params.path)}


@node("load_views", inputs={}, output="views", version=1, extra_key=_source_digest)
def load_views(params: LoadViewsParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Views from a folder in gsr's views format (the format every views-producing node writes).

    The folder is checked (cameras, image files and sizes) and copied into the store; its content digest is
    part of the cache key, so editing the folder reruns the node.
    """
    views = Views.read(params.path)
    views.check_image_sizes()
    for record in views.records:
        views.load_image(record)  # decodes every image: a corrupt file fails here, naming it
    shutil.copytree(views.root, out, dirs_exist_ok=True)
