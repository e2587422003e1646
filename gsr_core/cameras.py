"""Pinhole cameras: OpenCV axes, world-to-camera extrinsics, and resolution scaling.

Conventions (used everywhere in gsr, the same as COLMAP and gsplat):

* Camera axes are OpenCV's: x right, y down, z forward (points in front have z > 0).
* ``world_to_camera`` is a 4x4 rigid transform, ``x_cam = R @ x_world + t``.
* ``K`` is the 3x3 intrinsic matrix ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in *continuous* image
  coordinates whose integer values lie on pixel **corners**: pixel (row i, column j) covers
  ``[j, j+1) x [i, i+1)`` and its centre is at ``(j + 0.5, i + 0.5)``.

With corners on integers, resizing an image by a factor ``s`` (``W' = W * s``) maps every continuous
coordinate ``u`` to ``u * s`` exactly, so the intrinsics scale as ``fx, fy, cx, cy -> * s`` with no half-pixel
shift. ``Camera.scaled`` implements that; a 3D point then projects to the same place in the resized image, up
to the factor (tested in ``tests/test_cameras.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _as_matrix(value: Any, shape: tuple[int, int], name: str) -> torch.Tensor:
    matrix = torch.as_tensor(value, dtype=torch.float64)
    if matrix.shape != shape:
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"`{name}` must be finite, got {matrix.tolist()}")
    return matrix


@dataclass(frozen=True)
class Camera:
    """One pinhole camera.

    Attributes:
        K: [3, 3] float64 intrinsics (see the module docstring for the pixel convention).
        world_to_camera: [4, 4] float64 rigid transform from world to OpenCV camera coordinates.
        width: image width in pixels.
        height: image height in pixels.
    """

    K: torch.Tensor
    world_to_camera: torch.Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", _as_matrix(self.K, (3, 3), "K"))
        object.__setattr__(self, "world_to_camera", _as_matrix(self.world_to_camera, (4, 4), "world_to_camera"))
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.K[0, 0] <= 0 or self.K[1, 1] <= 0:
            raise ValueError(f"`K` must have positive focal lengths, got fx={self.K[0, 0]}, fy={self.K[1, 1]}")

    @property
    def camera_to_world(self) -> torch.Tensor:
        """[4, 4] inverse of ``world_to_camera``."""
        return torch.linalg.inv(self.world_to_camera)

    @property
    def center(self) -> torch.Tensor:
        """[3] camera centre in world coordinates."""
        rotation, translation = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -rotation.T @ translation

    def scaled(self, factor: float) -> "Camera":
        """The same camera for an image resized by ``factor`` (e.g. 0.25 for a x4 downsample).

        ``width * factor`` and ``height * factor`` must be whole numbers.
        """
        if factor <= 0:
            raise ValueError(f"`factor` must be positive, got {factor}")
        width, height = self.width * factor, self.height * factor
        if abs(width - round(width)) > 1e-9 or abs(height - round(height)) > 1e-9:
            raise ValueError(
                f"scaling a {self.width}x{self.height} camera by {factor} gives a non-integer size {width}x{height}"
            )
        scale = torch.diag(torch.tensor([factor, factor, 1.0], dtype=torch.float64))
        return Camera(scale @ self.K, self.world_to_camera.clone(), int(round(width)), int(round(height)))

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points into the image.

        Args:
            points: [P, 3] world coordinates.

        Returns:
            uv: [P, 2] continuous pixel coordinates (corners on integers).
            depth: [P] camera-space z (positive in front of the camera).
        """
        points = torch.as_tensor(points, dtype=torch.float64)
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"`points` must have shape [P, 3], got {list(points.shape)}")
        camera_points = points @ self.world_to_camera[:3, :3].T + self.world_to_camera[:3, 3]
        depth = camera_points[:, 2]
        pixels = camera_points @ self.K.T
        return pixels[:, :2] / depth[:, None], depth

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists of floats), the one stored in a views folder's ``cameras.json``."""
        return {
            "width": self.width,
            "height": self.height,
            "K": self.K.tolist(),
            "world_to_camera": self.world_to_camera.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Camera":
        missing = {"width", "height", "K", "world_to_camera"} - set(data)
        if missing:
            raise ValueError(f"camera entry lacks {sorted(missing)}; it has {sorted(data)}")
        return cls(data["K"], data["world_to_camera"], data["width"], data["height"])


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[4, 4] world-to-camera transform (OpenCV axes) of a camera at ``eye`` looking at ``target``.

    Args:
        eye: [3] camera centre. target: [3] point the optical axis goes through. up: [3] world up direction
        (image rows go down, i.e. against ``up``).
    """
    eye, target, up = (torch.as_tensor(v, dtype=torch.float64) for v in (eye, target, up))
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    if right.norm() < 1e-9:
        raise ValueError(f"`up` {up.tolist()} is parallel to the viewing direction {forward.tolist()}")
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward])
    world_to_camera = torch.eye(4, dtype=torch.float64)
    world_to_camera[:3, :3] = rotation
    world_to_camera[:3, 3] = -rotation @ eye
    return world_to_camera


def intrinsics_from_fov(width: int, height: int, fov_x_degrees: float) -> torch.Tensor:
    """[3, 3] K of a centred pinhole with square pixels and the given horizontal field of view."""
    focal = 0.5 * width / torch.tan(torch.deg2rad(torch.tensor(fov_x_degrees, dtype=torch.float64)) / 2)
    return torch.tensor(
        [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
