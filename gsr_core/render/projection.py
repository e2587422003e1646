"""EWA projection of 3D Gaussians into pinhole cameras, with gsplat 1.5.3's culling and radii rules.

Conventions: OpenCV camera axes, ``viewmats`` world-to-camera, pixel corners on integers (a pixel centre is at
``j + 0.5``), quaternions wxyz (normalised here), ``scales`` already activated (not log).

Per camera c and Gaussian n (the formulas of gsplat's ``fully_fused_projection``, ``packed=False``):

* ``t = R x + T``; ``Sigma_cam = R Sigma R^T`` with ``Sigma = (Rq diag(s)) (Rq diag(s))^T``.
* ``J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]`` where ``tx, ty`` are ``x, y`` clamped to 1.3x the
  field of view (the usual guard against huge off-screen Jacobians); ``Sigma_2d = J Sigma_cam J^T + eps2d I``.
* ``means2d = (fx x/z + cx, fy y/z + cy)``; ``conics = Sigma_2d^-1`` as (a, b, c) of ``[[a, b], [b, c]]``.
* radii (opacity-aware bounding box, https://arxiv.org/abs/2402.00525): ``extend = min(3.33, sqrt(2 ln(255 o)))``,
  ``radius = ceil(extend * sqrt(diag Sigma_2d))``.
* A Gaussian is culled (radii 0) when its depth is outside [near_plane, far_plane], ``det Sigma_2d <= 0``,
  ``o < 1/255`` or its box lies outside the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_EXTEND = 3.33


def quaternion_to_rotation(quats: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] rotation matrices of [N, 4] wxyz quaternions (normalised first, any length)."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariances(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] world covariances ``(R S)(R S)^T`` of [N, 4] quaternions and [N, 3] scales."""
    factor = quaternion_to_rotation(quats) * scales[:, None, :]
    return factor @ factor.transpose(-1, -2)


@dataclass
class Projection:
    """Projected Gaussians for C cameras (entries of culled Gaussians are zero).

    Attributes:
        radii: [C, N, 2] int32 pixel half-extents (x, y) of the bounding box; 0 where culled.
        means2d: [C, N, 2] pixel coordinates of the centres.
        depths: [C, N] camera-space z.
        conics: [C, N, 3] inverse 2D covariance (a, b, c) of ``[[a, b], [b, c]]``.
    """

    radii: torch.Tensor
    means2d: torch.Tensor
    depths: torch.Tensor
    conics: torch.Tensor


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
    far_plane: float,
) -> Projection:
    """Project N Gaussians into C cameras, differentiably w.r.t. means, quats and scales.

    Args:
        means: [N, 3]. quats: [N, 4] wxyz. scales: [N, 3]. opacities: [N] in [0, 1] (only for radii).
        viewmats: [C, 4, 4] world-to-camera. Ks: [C, 3, 3]. width, height: image size in pixels.
    """
    rotation, translation = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # [C, 1, 3, 3], [C, 1, 3]
    means_cam = (rotation @ means[None, :, :, None]).squeeze(-1) + translation  # [C, N, 3]
    covars_cam = rotation @ covariances(quats, scales)[None] @ rotation.transpose(-1, -2)  # [C, N, 3, 3]

    x, y, z = means_cam.unbind(-1)
    in_depth = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keeps culled entries finite (and their gradients zero)
    fx, fy, cx, cy = (Ks[:, i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))  # [C, 1] each
    limit_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    limit_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    limit_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    limit_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx = z * torch.minimum(torch.maximum(x / z, -limit_x_neg), limit_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -limit_y_neg), limit_y_pos)
    zeros = torch.zeros_like(z)
    jacobian = torch.stack(
        [fx / z, zeros, -fx * tx / (z * z), zeros, fy / z, -fy * ty / (z * z)], dim=-1
    ).reshape(z.shape + (2, 3))
    covars2d = jacobian @ covars_cam @ jacobian.transpose(-1, -2)  # [C, N, 2, 2]
    cov_a = covars2d[..., 0, 0] + eps2d
    cov_b = 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0])
    cov_c = covars2d[..., 1, 1] + eps2d
    det = cov_a * cov_c - cov_b * cov_b
    positive = det > 0
    det = torch.where(positive, det, torch.ones_like(det))
    conics = torch.stack([cov_c / det, -cov_b / det, cov_a / det], dim=-1)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    with torch.no_grad():
        opacity = opacities.detach().to(means.dtype).expand_as(z)
        visible_enough = opacity >= ALPHA_THRESHOLD
        extend = torch.sqrt(2.0 * torch.log(opacity.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = extend.clamp_max(MAX_EXTEND)
        radius_x = torch.ceil(extend * torch.sqrt(cov_a.detach().clamp_min(0)))
        radius_y = torch.ceil(extend * torch.sqrt(cov_c.detach().clamp_min(0)))
        u, v = means2d.detach().unbind(-1)
        on_image = (u + radius_x > 0) & (u - radius_x < width) & (v + radius_y > 0) & (v - radius_y < height)
        valid = in_depth & positive & visible_enough & on_image
        radii = (torch.stack([radius_x, radius_y], dim=-1) * valid[..., None]).to(torch.int32)

    keep = valid[..., None]
    return Projection(
        radii=radii,
        means2d=torch.where(keep, means2d, torch.zeros_like(means2d)),
        depths=torch.where(valid, means_cam[..., 2], torch.zeros_like(z)),
        conics=torch.where(keep, conics, torch.zeros_like(conics)),
    )
