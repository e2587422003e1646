"""Blender (NeRF-synthetic) datasets: ``transforms_{train,test}.json`` with ``camera_angle_x`` and RGBA images.

A transforms file holds ``camera_angle_x`` (horizontal field of view, radians) and ``frames``, each with a
``file_path`` relative to the file's folder (``./train/r_0``: ``.png`` is appended when it has no extension)
and a ``transform_matrix``: the 4x4 camera-to-world in OpenGL/Blender camera axes (x right, y up, z backwards).
Right-multiplying by diag(1, -1, -1, 1) gives OpenCV axes (x right, y down, z forward). Intrinsics: square
pixels, ``fx = fy = W / (2 tan(camera_angle_x / 2))``, principal point at the image centre (W/2, H/2).

Views are named by ``file_path`` relative to the dataset without extension, folders joined by ``_``
(``train_r_0``), so train and test views of the same frame number stay distinct. The scene has no point cloud.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from gsr_core.cameras import Camera
from gsr_core.data.datasets import Dataset, SourceView, missing_files_error, view_name, world_to_camera_from_pose
from gsr_core.images import image_size

OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
SPLIT_FILES = {"train": "transforms_train.json", "test": "transforms_test.json"}


def read_transforms(path: Path) -> dict[str, Any]:
    """A transforms file as a dict with a non-empty ``frames`` list.

    Raises:
        ValueError naming the file when it is missing, not JSON, or has no frames.
    """
    if not path.is_file():
        raise ValueError(f"transforms file {path} does not exist")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"transforms file {path} is not valid JSON ({error}); it may be truncated") from None
    if not isinstance(document, dict) or not isinstance(document.get("frames"), list) or not document["frames"]:
        raise ValueError(f"transforms file {path} must be an object with a non-empty `frames` list")
    return document


def frame_image(path: Path, frame: Any, index: int) -> tuple[str, Path]:
    """(``file_path`` as written, the image file it names) of frame ``index`` of transforms file ``path``.

    The file is ``file_path`` relative to the transforms file's folder, with ``.png`` appended when
    ``file_path`` has no extension and no such file exists (the NeRF-synthetic convention).
    """
    if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
        raise ValueError(f"{path}: frames[{index}] must be an object with a `file_path` string, got {frame!r:.120}")
    file_path = frame["file_path"]
    image = path.parent / file_path
    if not image.is_file() and not Path(file_path).suffix:
        image = image.with_name(image.name + ".png")
    return file_path, image


def frame_world_to_camera(path: Path, frame: dict, index: int) -> torch.Tensor:
    """[4, 4] world-to-camera (OpenCV axes) of a frame's OpenGL camera-to-world ``transform_matrix``."""
    where = f"{path}: frames[{index}] ({frame.get('file_path')})"
    try:
        matrix = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: `transform_matrix` must be a 4x4 list of numbers, got "
                         f"{frame.get('transform_matrix')!r:.120}") from None
    if matrix.shape != (4, 4):
        raise ValueError(f"{where}: `transform_matrix` must be 4x4, got shape {list(matrix.shape)}")
    return world_to_camera_from_pose(matrix @ OPENGL_TO_OPENCV, where)


def read_blender(root: Path, splits: tuple[str, ...] = ("train",)) -> Dataset:
    """A Blender dataset folder as views (frame order, train then test) with their own split.

    Args:
        root: folder with ``transforms_train.json`` (and ``transforms_test.json`` for the test split).
        splits: which transforms files to read, from ``SPLIT_FILES``.

    Raises:
        ValueError naming the file: missing or malformed transforms file, missing ``camera_angle_x``,
        frames whose images are missing (all named), non-finite poses.
    """
    root = Path(root)
    views, missing, model = [], [], []
    for split in splits:
        path = root / SPLIT_FILES[split]
        document = read_transforms(path)
        model.append(path)
        angle = document.get("camera_angle_x")
        if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 < angle < math.pi:
            raise ValueError(f"{path}: `camera_angle_x` must be the horizontal field of view in radians "
                             f"(0 < angle < pi), got {angle!r}")
        for index, frame in enumerate(document["frames"]):
            file_path, image = frame_image(path, frame, index)
            if not image.is_file():
                missing.append(f"{file_path} ({os.path.relpath(image, root)})")
                continue
            world_to_camera = frame_world_to_camera(path, frame, index)
            width, height = image_size(image)
            focal = width / (2.0 * math.tan(angle / 2.0))
            K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
            name = view_name(os.path.relpath(image, root))
            views.append(SourceView(name, image, Camera(K, world_to_camera, width, height), split))
    if missing:
        raise missing_files_error(", ".join(str(p) for p in model), missing,
                                  "restore the images or remove their frames from the transforms file")
    return Dataset("blender", root, tuple(views), None, tuple(model), {"transforms": [p.name for p in model]})
