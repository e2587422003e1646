"""Multi-view consistency of a set of views: photometric error between views warped into each other by depth.

The figure applies to anything that produces images at known cameras, 3D methods and per-view 2D SR alike,
because the correspondences come from a separate geometry (depth and opacity rendered from one 3DGS at the
evaluated cameras), never from the images under test.

For a pair of views (i, j), every pixel centre p of view i (continuous coordinates ``(x + 0.5, y + 0.5)``,
see ``gsr_core.cameras``) is back-projected with its depth ``D_i(p)`` (camera-space z) to a world point X,
which is projected into view j at ``q`` with depth ``z_j(X)``. Pixel p is **co-visible** in j when

* ``q`` lies within the hull of j's pixel centres (``0.5 <= q_x <= W - 0.5``, same for y) and ``z_j(X) > 0``;
* the geometry covers both ends: ``A_i(p) >= min_alpha`` and ``A_j(q) >= min_alpha`` (A: accumulated opacity);
* X is what j sees at q (the occlusion test): ``|D_j(q) - z_j(X)| <= depth_tolerance * z_j(X)``.

``A_j(q)``, ``D_j(q)`` and ``I_j(q)`` are bilinear samples of j's opacity, depth and image. The pair's error is
the mean absolute RGB difference ``|I_i(p) - I_j(q)|`` (averaged over the three channels, images in [0, 1])
over the co-visible pixels of both directions, i -> j and j -> i, pooled; NaN when no pixel is co-visible. The
views' ``error`` is the mean over the pairs that have co-visible pixels. Views rendered from one 3DGS with its own
depth score close to 0 (not exactly: bilinear resampling of j, and the expected depth of alpha-blended Gaussians
is not exactly the surface behind every colour); independent noise per view raises it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from gsr_core.cameras import Camera

DEFAULT_DEPTH_TOLERANCE = 0.02
DEFAULT_MIN_ALPHA = 0.5


def nearest_pairs(cameras: Sequence[Camera]) -> list[tuple[int, int]]:
    """``(i, j)`` for every view i, with j the other view whose camera centre is closest (lowest index on ties).

    Args:
        cameras: C >= 2 cameras.

    Returns:
        C index pairs, in view order.
    """
    if len(cameras) < 2:
        raise ValueError(f"`cameras` must hold at least two cameras to pair views, got {len(cameras)}")
    centres = torch.stack([camera.center for camera in cameras])  # [C, 3]
    distances = torch.cdist(centres, centres)
    distances.fill_diagonal_(float("inf"))
    return [(i, int(j)) for i, j in enumerate(distances.argmin(dim=1).tolist())]


def _check_inputs(images, cameras, depths, alphas) -> tuple[int, int, int]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a tensor of shape [C, H, W, 3], got {got}")
    count, height, width = images.shape[:3]
    for name, tensor in (("depths", depths), ("alphas", alphas)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (count, height, width):
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"`{name}` must have shape [C, H, W] = {[count, height, width]} (from `images`), "
                             f"got {got}")
    if len(cameras) != count:
        raise ValueError(f"`cameras` must hold one camera per image ({count}), got {len(cameras)}")
    sizes = sorted({(camera.width, camera.height) for camera in cameras})
    if sizes != [(width, height)]:
        raise ValueError(f"`cameras` must all be {width}x{height} (the images' size), got sizes {sizes}")
    return count, height, width


def _check_pairs(pairs: Sequence[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    checked = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(k, int) and 0 <= k < count for k in pair) or pair[0] == pair[1]:
            raise ValueError(f"`pairs` must hold (i, j) pairs of distinct view indices in [0, {count}), got {pair!r}")
        checked.append((int(pair[0]), int(pair[1])))
    if not checked:
        raise ValueError("`pairs` must hold at least one pair")
    return checked


def _pixel_rays(camera: Camera, height: int, width: int) -> torch.Tensor:
    """[H * W, 3] camera-space directions with z = 1 through the pixel centres, float64."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    pixels = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)
    return pixels @ torch.linalg.inv(camera.K).T


def _warp_errors(images, cameras, depths, alphas, source: int, target: int, depth_tolerance: float,
                 min_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed mean-over-channels |I_source(p) - I_target(q)| over the co-visible pixels p, and their count."""
    height, width = images.shape[1:3]
    points = _pixel_rays(cameras[source], height, width) * depths[source].reshape(-1, 1).double()  # [P, 3]
    relative = cameras[target].world_to_camera @ cameras[source].camera_to_world  # source camera -> target camera
    in_target = points @ relative[:3, :3].T + relative[:3, 3]
    z = in_target[:, 2]
    projected = in_target @ cameras[target].K.T
    in_front = z > 0
    uv = projected[:, :2] / torch.where(in_front, z, torch.ones_like(z))[:, None]
    inside = (in_front & (uv[:, 0] >= 0.5) & (uv[:, 0] <= width - 0.5)
              & (uv[:, 1] >= 0.5) & (uv[:, 1] <= height - 0.5))
    # Normalised grid_sample coordinates: -1 and 1 are the image's outer edges (align_corners=False), which is
    # the corners-on-integers convention of gsr_core.cameras scaled by 2 / size.
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64)
    grid = torch.where(inside[:, None], uv * scale - 1.0, torch.zeros_like(uv))
    stacked = torch.cat([images[target], depths[target][..., None], alphas[target][..., None]], dim=-1)
    sampled = F.grid_sample(stacked.permute(2, 0, 1)[None].float(), grid.reshape(1, height, width, 2).float(),
                            mode="bilinear", padding_mode="border", align_corners=False)[0]  # [5, H, W]
    sampled = sampled.reshape(5, -1)
    covisible = (inside & (alphas[source].reshape(-1) >= min_alpha) & (sampled[4] >= min_alpha)
                 & ((sampled[3].double() - z).abs() <= depth_tolerance * z))
    difference = (images[source].reshape(-1, 3).float() - sampled[:3].T).abs().mean(dim=1)
    return difference[covisible].double().sum(), covisible.sum()


@torch.no_grad()
def multiview_consistency(
    images: torch.Tensor,
    cameras: Sequence[Camera],
    depths: torch.Tensor,
    alphas: torch.Tensor,
    pairs: Sequence[tuple[int, int]] | None = None,
    depth_tolerance: float = DEFAULT_DEPTH_TOLERANCE,
    min_alpha: float = DEFAULT_MIN_ALPHA,
) -> dict:
    """Photometric error between views warped into each other with a geometry's depth (see the module docstring).

    Args:
        images: [C, H, W, 3] float views under test, in [0, 1].
        cameras: their C cameras (all H x W).
        depths: [C, H, W] camera-space depth (z) of the geometry at those cameras (e.g. a 3DGS's expected depth).
        alphas: [C, H, W] the geometry's accumulated opacity there.
        pairs: (i, j) view index pairs, each scored both ways; default ``nearest_pairs(cameras)``.
        depth_tolerance: relative depth difference up to which a warped point counts as visible in the other view.
        min_alpha: opacity both ends of a correspondence need.

    Returns:
        ``{"error": float, "covisible_fraction": float, "per_pair": [{"views": [i, j], "error": float,
        "covisible_fraction": float}, ...]}``: a pair's ``covisible_fraction`` is its co-visible pixels over
        2 H W (both directions); the top-level figures are means over pairs (``error`` over the pairs with
        co-visible pixels, NaN when none has any).
    """
    count, height, width = _check_inputs(images, cameras, depths, alphas)
    if not depth_tolerance > 0:
        raise ValueError(f"`depth_tolerance` must be positive, got {depth_tolerance}")
    if not 0 <= min_alpha <= 1:
        raise ValueError(f"`min_alpha` must be in [0, 1], got {min_alpha}")
    pairs = nearest_pairs(cameras) if pairs is None else _check_pairs(pairs, count)
    per_pair = []
    for i, j in pairs:
        forward = _warp_errors(images, cameras, depths, alphas, i, j, depth_tolerance, min_alpha)
        backward = _warp_errors(images, cameras, depths, alphas, j, i, depth_tolerance, min_alpha)
        total, covisible = forward[0] + backward[0], int(forward[1] + backward[1])
        per_pair.append({"views": [i, j], "error": float(total / covisible) if covisible else float("nan"),
                         "covisible_fraction": covisible / (2 * height * width)})
    errors = torch.tensor([entry["error"] for entry in per_pair], dtype=torch.float64)
    return {"error": float(errors.nanmean()),
            "covisible_fraction": sum(entry["covisible_fraction"] for entry in per_pair) / len(per_pair),
            "per_pair": per_pair}
