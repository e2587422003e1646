"""instant-ngp datasets: one ``transforms.json`` with pinhole (or distorted) intrinsics and per-frame image paths.

Keys read (each may also appear in a frame, overriding the file's value for that frame):

* ``w``, ``h``: the image size the intrinsics are for (default: the image file's size); image files of another
  size with the same aspect ratio get the intrinsics scaled;
* ``fl_x``, ``fl_y``, ``cx``, ``cy`` in pixels (pixel corners on integers, COLMAP's convention, which
  ``colmap2nerf.py`` copies); missing focal lengths come from ``camera_angle_x`` / ``camera_angle_y``
  (radians), ``fl_y`` defaults to ``fl_x``, the principal point to the image centre;
* distortion ``k1, k2, p1, p2`` (OpenCV model), ``k3, k4`` (full OpenCV), ``is_fisheye`` (OpenCV fisheye with
  ``k1..k4``): refused unless ``undistort=True``, which undistorts with COLMAP's undistorter;
* ``aabb_scale``: kept in the metadata (instant-ngp's scene extent hint); ``scale`` / ``offset`` place the scene
  in instant-ngp's unit cube and are not applied: cameras stay in the file's world frame.

Frames: ``file_path`` relative to the file's folder (``.png`` appended when it has no extension and no such
file exists) and ``transform_matrix``, the camera-to-world in OpenGL axes as in the Blender format. Views keep
frame order and are named by ``file_path`` without extension, folders joined by ``_`` (``images_0001``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pycolmap

from gsr_core.data.blender import frame_image, frame_world_to_camera, read_transforms
from gsr_core.data.colmap import DistortedCameraError, pinhole_view_camera
from gsr_core.data.datasets import Dataset, SourceView, missing_files_error, view_name
from gsr_core.images import image_size

TRANSFORMS_FILE = "transforms.json"
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def _number(settings: dict[str, Any], key: str, where: str, default: float | None = None) -> float | None:
    value = settings.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: `{key}` must be a finite number, got {value!r}")
    return float(value)


def frame_colmap_camera(settings: dict[str, Any], file_width: int, file_height: int, where: str) -> pycolmap.Camera:
    """The COLMAP camera a frame's intrinsics describe (PINHOLE, OPENCV, FULL_OPENCV or OPENCV_FISHEYE).

    Args:
        settings: the file's keys updated with the frame's.
        file_width, file_height: the image file's size (the default for ``w``, ``h``).
    """
    width, height = _number(settings, "w", where, file_width), _number(settings, "h", where, file_height)
    if width <= 0 or height <= 0 or width != round(width) or height != round(height):
        raise ValueError(f"{where}: `w` and `h` must be positive whole numbers, got {width}, {height}")
    fl_x = _number(settings, "fl_x", where)
    if fl_x is None:
        angle = _number(settings, "camera_angle_x", where)
        if angle is None:
            raise ValueError(f"{where}: no focal length: give `fl_x` (pixels) or `camera_angle_x` (radians)")
        fl_x = width / (2.0 * math.tan(angle / 2.0))
    fl_y = _number(settings, "fl_y", where)
    if fl_y is None:
        angle_y = _number(settings, "camera_angle_y", where)
        fl_y = fl_x if angle_y is None else height / (2.0 * math.tan(angle_y / 2.0))
    if not (fl_x > 0 and fl_y > 0):
        raise ValueError(f"{where}: focal lengths must be positive, got fl_x={fl_x}, fl_y={fl_y}")
    cx, cy = _number(settings, "cx", where, width / 2.0), _number(settings, "cy", where, height / 2.0)
    k1, k2, k3, k4, p1, p2 = (_number(settings, key, where, 0.0) for key in DISTORTION_KEYS)
    if settings.get("is_fisheye", False):
        model, params = "OPENCV_FISHEYE", [fl_x, fl_y, cx, cy, k1, k2, k3, k4]
    elif k3 or k4:
        model, params = "FULL_OPENCV", [fl_x, fl_y, cx, cy, k1, k2, p1, p2, k3, k4, 0.0, 0.0]
    elif k1 or k2 or p1 or p2:
        model, params = "OPENCV", [fl_x, fl_y, cx, cy, k1, k2, p1, p2]
    else:
        model, params = "PINHOLE", [fl_x, fl_y, cx, cy]
    return pycolmap.Camera(model=model, width=int(width), height=int(height), params=params)


def read_instant_ngp(root: Path, undistort: bool = False) -> Dataset:
    """An instant-ngp dataset folder (``transforms.json``) as views in frame order, without a split.

    Raises:
        ValueError naming the file: missing or malformed transforms file, frames whose images are missing (all
        named), missing intrinsics, distortion (when not undistorting), non-finite poses.
    """
    root = Path(root)
    path = root / TRANSFORMS_FILE
    document = read_transforms(path)
    file_settings = {key: value for key, value in document.items() if key != "frames"}
    undistorters: dict | None = {} if undistort else None
    views, missing = [], []
    for index, frame in enumerate(document["frames"]):
        file_path, image = frame_image(path, frame, index)
        if not image.is_file():
            missing.append(f"{file_path} ({os.path.relpath(image, root)})")
            continue
        where = f"{path}: frames[{index}] ({file_path})"
        world_to_camera = frame_world_to_camera(path, frame, index)
        file_width, file_height = image_size(image)
        camera = frame_colmap_camera({**file_settings, **frame}, file_width, file_height, where)
        try:
            pinhole, undistorter = pinhole_view_camera(camera, world_to_camera, file_width, file_height, where,
                                                       undistorters)
        except DistortedCameraError:
            raise ValueError(
                f"{where}: the images are distorted ({camera.model.name}: {camera.params_info} = "
                f"{[round(float(p), 6) for p in camera.params]}); gsr fits pinhole images. Set `undistort: true` to "
                f"undistort on load with COLMAP's undistorter, or undistort the images first (`colmap "
                f"image_undistorter` on the COLMAP model, then convert the undistorted model)") from None
        views.append(SourceView(view_name(os.path.relpath(image, root)), image, pinhole, None, undistorter))
    if missing:
        raise missing_files_error(str(path), missing, "restore the images or remove their frames from the file")
    metadata: dict[str, Any] = {}
    aabb_scale = _number(file_settings, "aabb_scale", str(path))
    if aabb_scale is not None:
        metadata["aabb_scale"] = aabb_scale
    return Dataset("instant_ngp", root, tuple(views), None, (path,), metadata)
