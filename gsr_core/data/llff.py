"""LLFF datasets: cameras from ``poses_bounds.npy``, images from one of the ``images*`` folders.

``poses_bounds.npy`` is an [N, 17] float array, one row per image in sorted file-name order. Each row is a
3x5 matrix flattened row by row, ``[R | c | hwf]``, then the near and far depth bounds: ``R``'s columns are the
camera's axes in world coordinates in LLFF's order (down, right, backwards), ``c`` is the camera centre and
``hwf`` holds height, width and focal length (pixels) of the full-resolution images. The principal point is
the image centre. In OpenCV axes (right, down, forward) the camera-to-world rotation is
``[R[:, 1], R[:, 0], -R[:, 2]]``. The world frame is the one of the COLMAP model the poses came from, kept
as is (no recentring or rescaling), so the 3D points of that model line up with the cameras.

Views are named by their position in sorted order (``000``, ``001``, ...) because the image folders of one
release name the same photo differently (fern: ``images_4/image000.png`` vs ``images_16/IMG_4026.png``).

Initial points: ``sparse/0/points3D.bin`` (or ``.txt``) when present, read on its own (public LLFF copies lack
``images.bin``). Its tracks name COLMAP image ids; COLMAP numbers images from 1 in the order it imported them,
which is sorted file-name order, the order of ``poses_bounds.npy``: image id ``k`` is view ``k - 1``
(``track_view_index``). The LLFF cameras are pinholes (LLFF ignores COLMAP's small radial distortion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gsr_core.cameras import Camera
from gsr_core.data.colmap import read_points3d_file
from gsr_core.data.datasets import Dataset, SourceView, camera_for_image, image_files, world_to_camera_from_pose
from gsr_core.images import image_size

POSES_FILE = "poses_bounds.npy"


def read_poses_bounds(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read ``poses_bounds.npy``.

    Returns:
        camera_to_world: [N, 4, 4] float64 in OpenCV axes.
        hwf: [N, 3] float64 full-resolution height, width, focal length.
        bounds: [N, 2] float64 near and far depth.

    Raises:
        ValueError naming the file (and row) when it is unreadable, has the wrong shape or non-finite values.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} cannot be read as a NumPy array ({error}); the file is truncated or "
                         f"corrupt") from None
    if array.ndim != 2 or array.shape[1] != 17 or array.shape[0] == 0:
        raise ValueError(f"{path} must hold an [N, 17] array (3x5 pose + 2 bounds per image), got shape {array.shape}")
    array = torch.from_numpy(array.astype(np.float64))
    bad_rows = (~torch.isfinite(array).all(dim=1)).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(f"{path}: rows {bad_rows} (views in sorted file order) hold non-finite poses or bounds; "
                         f"re-run LLFF's imgs2poses or remove those images and rows")
    matrices = array[:, :15].reshape(-1, 3, 5)
    down, right, backwards, centre = (matrices[:, :, k] for k in range(4))
    camera_to_world = torch.eye(4, dtype=torch.float64).repeat(len(array), 1, 1)
    camera_to_world[:, :3, :3] = torch.stack([right, down, -backwards], dim=-1)
    camera_to_world[:, :3, 3] = centre
    return camera_to_world, matrices[:, :, 4], array[:, 15:17]


def track_view_index(image_ids: np.ndarray) -> np.ndarray:
    """View index (position in sorted file order) of COLMAP image ids of an LLFF model (see the module docstring)."""
    return np.asarray(image_ids) - 1


def points_file(root: Path) -> Path | None:
    """``sparse/0/points3D.bin`` (or ``.txt``) of an LLFF folder, None when absent."""
    for suffix in (".bin", ".txt"):
        path = root / "sparse" / "0" / f"points3D{suffix}"
        if path.is_file():
            return path
    return None


def read_llff(root: Path, images: str = "images") -> Dataset:
    """An LLFF dataset folder as views named ``000``, ``001``, ... in sorted file order, and its 3D points.

    Args:
        root: folder with ``poses_bounds.npy`` and the image folder.
        images: image folder relative to ``root`` (``images``, ``images_4``, ...); intrinsics are scaled from the
            full-resolution ``hwf`` to its images' size.

    Raises:
        ValueError naming the file: unreadable poses, non-finite poses, an image count that differs from the
        number of poses, images of another aspect ratio.
    """
    root = Path(root)
    poses_path = root / POSES_FILE
    camera_to_world, hwf, bounds = read_poses_bounds(poses_path)
    folder = root / images
    files = image_files(folder)
    if len(files) != len(camera_to_world):
        raise ValueError(f"{poses_path} holds {len(camera_to_world)} poses but image folder {folder} has {len(files)} "
                         f"images ({', '.join(p.name for p in files[:5])}{', ...' if len(files) > 5 else ''}); "
                         f"poses map to images in sorted file order, so the folder must hold exactly those images")
    digits = max(3, len(str(len(files) - 1)))
    views = []
    for index, (path, pose, (height, width, focal)) in enumerate(zip(files, camera_to_world, hwf.tolist())):
        where = f"{poses_path} row {index} ({path.name})"
        if min(height, width, focal) <= 0 or height != round(height) or width != round(width):
            raise ValueError(f"{where}: height, width, focal must be positive (whole sizes), "
                             f"got {height, width, focal}")
        K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
        camera = Camera(K, world_to_camera_from_pose(pose, where), int(round(width)), int(round(height)))
        file_width, file_height = image_size(path)
        views.append(SourceView(f"{index:0{digits}d}", path, camera_for_image(camera, file_width, file_height, where)))
    points_path = points_file(root)
    points = read_points3d_file(points_path).point_cloud() if points_path else None
    metadata = {"images": images, "near": float(bounds[:, 0].min()), "far": float(bounds[:, 1].max()),
                "image_files": [path.name for path in files]}
    model = (poses_path,) + ((points_path,) if points_path else ())
    return Dataset("llff", root, tuple(views), points, model, metadata)
