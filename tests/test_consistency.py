"""Multi-view consistency (gsr_core.consistency): views warped into each other by a geometry's depth."""

from __future__ import annotations

import math

import pytest
import torch

from gsr_core.cameras import Camera, intrinsics_from_fov, look_at
from gsr_core.consistency import multiview_consistency, nearest_pairs
from gsr_core.gaussians import Gaussians, rgb_to_sh
from gsr_core.render_views import render_depths, render_views

SIZE = 64


def nearby_cameras(count: int = 4, size: int = SIZE, roll: bool = False) -> list[Camera]:
    """Cameras 2 m above the plane z = 0 on a 0.3 m circle, looking at the origin (rolled apart with ``roll``)."""
    cameras = []
    for k in range(count):
        angle = 2 * math.pi * k / count
        eye = torch.tensor([0.3 * math.cos(angle), 0.3 * math.sin(angle), 2.0], dtype=torch.float64)
        up = torch.tensor([math.cos(angle + 1), math.sin(angle + 1), 0.0]) if roll else torch.tensor([0.0, 1.0, 0.0])
        cameras.append(Camera(intrinsics_from_fov(size, size, 50.0), look_at(eye, torch.zeros(3), up), size, size))
    return cameras


def texture(xy: torch.Tensor) -> torch.Tensor:
    """[..., 3] smooth colours in [0.1, 0.9] of plane coordinates [..., 2] (periods of 2 to 4 m)."""
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([0.5 + 0.4 * torch.sin(3 * x) * torch.cos(2.5 * y), 0.5 + 0.3 * torch.cos(2 * x + 1.5 * y),
                        0.5 + 0.2 * torch.sin(3.5 * y)], dim=-1)


def analytic_plane_views(cameras: list[Camera]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact images [C, H, W, 3] and depths [C, H, W] of the textured plane z = 0, sampled at pixel centres."""
    images, depths = [], []
    for camera in cameras:
        ys, xs = torch.meshgrid(torch.arange(camera.height, dtype=torch.float64) + 0.5,
                                torch.arange(camera.width, dtype=torch.float64) + 0.5, indexing="ij")
        rays = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ torch.linalg.inv(camera.K).T  # z = 1
        world_rays = rays @ camera.world_to_camera[:3, :3]  # R^T applied to each ray
        depth = -camera.center[2] / world_rays[..., 2]  # camera-space z where the ray meets z = 0
        points = camera.center + depth[..., None] * world_rays
        images.append(texture(points[..., :2]).float())
        depths.append(depth.float())
    return torch.stack(images), torch.stack(depths)


def plane_gaussians(side: int, extent: float, height: float = 0.0, colour: tuple | None = None,
                    opacity_logit: float = -1.0) -> Gaussians:
    """side x side flat Gaussians on the square |x|, |y| <= extent at z = height, textured or of one colour."""
    coordinates = torch.linspace(-extent, extent, side)
    x, y = torch.meshgrid(coordinates, coordinates, indexing="ij")
    means = torch.stack([x, y, torch.full_like(x, height)], dim=-1).reshape(-1, 3)
    count, spacing = means.shape[0], 2 * extent / (side - 1)
    rgb = texture(means[:, :2]) if colour is None else torch.tensor(colour).expand(count, 3)
    return Gaussians(means=means, quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(count, 1),
                     scales=torch.tensor([0.8 * spacing, 0.8 * spacing, 0.04 * spacing]).log().repeat(count, 1),
                     opacities=torch.full((count,), opacity_logit), sh0=rgb_to_sh(rgb)[:, None, :],
                     shN=torch.zeros(count, 0, 3))


def merged(a: Gaussians, b: Gaussians) -> Gaussians:
    return Gaussians(**{name: torch.cat([getattr(a, name), getattr(b, name)]) for name in a.params()})


def render(gaussians: Gaussians, cameras: list[Camera]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = render_views(gaussians, cameras, backend="torch", device="cpu")
    depths, alphas = render_depths(gaussians, cameras, backend="torch", device="cpu")
    return images, depths, alphas


@pytest.fixture(scope="module")
def plane_renders():
    """Renders of a 2,500-Gaussian textured plane at four nearby cameras: (cameras, images, depths, alphas)."""
    cameras = nearby_cameras()
    return (cameras, *render(plane_gaussians(50, 1.2), cameras))


def test_nearest_pairs_pick_the_closest_other_camera():
    def camera_at(x: float) -> Camera:
        eye = torch.tensor([x, 0.0, 2.0])
        return Camera(intrinsics_from_fov(SIZE, SIZE, 50.0), look_at(eye, eye * torch.tensor([1.0, 1.0, 0.0]),
                                                                     torch.tensor([0.0, 1.0, 0.0])), SIZE, SIZE)

    assert nearest_pairs([camera_at(x) for x in (0.0, 0.1, 0.3, 5.0)]) == [(0, 1), (1, 0), (2, 1), (3, 2)]
    with pytest.raises(ValueError, match="at least two cameras"):
        nearest_pairs([camera_at(0.0)])


def test_exact_views_of_a_plane_match_up_to_bilinear_resampling():
    # Rolled cameras: a half-pixel error in the warp would not cancel between views.
    cameras = nearby_cameras(roll=True)
    images, depths = analytic_plane_views(cameras)
    result = multiview_consistency(images, cameras, depths, torch.ones_like(depths))
    assert result["error"] < 1e-3  # bilinear interpolation of a smooth texture
    assert [entry["views"] for entry in result["per_pair"]] == [[i, j] for i, j in nearest_pairs(cameras)]
    assert 0.85 < result["covisible_fraction"] < 1.0  # the borders fall outside the neighbour
    # The same views sampled with pixel centres on integers (the other common convention) are caught.
    shift = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    corner_images, _ = analytic_plane_views([Camera(c.K + shift, c.world_to_camera, SIZE, SIZE) for c in cameras])
    assert multiview_consistency(corner_images, cameras, depths, torch.ones_like(depths))["error"] > 0.01


def test_renders_of_one_3dgs_are_consistent_and_independent_noise_is_not(plane_renders):
    cameras, images, depths, alphas = plane_renders
    clean = multiview_consistency(images, cameras, depths, alphas)
    # Not exactly 0: view j is resampled bilinearly, and each camera blends overlapping splats front to back in
    # its own depth order, so the same 3DGS mixes neighbouring colours slightly differently from each viewpoint.
    assert clean["error"] < 0.01
    assert 0.85 < clean["covisible_fraction"] < 1.0
    noisy = images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert multiview_consistency(noisy, cameras, depths, alphas)["error"] > 3 * clean["error"]


def test_pairs_are_scored_both_ways(plane_renders):
    cameras, images, depths, alphas = plane_renders
    one_way = multiview_consistency(images, cameras, depths, alphas, pairs=[(0, 2)])
    other_way = multiview_consistency(images, cameras, depths, alphas, pairs=[(2, 0)])
    assert one_way["error"] == pytest.approx(other_way["error"])
    assert one_way["covisible_fraction"] == pytest.approx(other_way["covisible_fraction"])


def test_occluded_pixels_are_excluded():
    cameras = nearby_cameras()
    background = plane_gaussians(50, 1.2)
    occluder = plane_gaussians(12, 0.25, height=0.5, colour=(1.0, 0.0, 0.0), opacity_logit=4.0)  # red, 0.5 m up
    images, depths, alphas = render(merged(background, occluder), cameras)
    with_test = multiview_consistency(images, cameras, depths, alphas)
    without_test = multiview_consistency(images, cameras, depths, alphas, depth_tolerance=1e9)
    plain_images, plain_depths, plain_alphas = render(background, cameras)
    unoccluded = multiview_consistency(plain_images, cameras, plain_depths, plain_alphas)
    # Plane pixels hidden behind the red square in the neighbour would compare plane texture with red.
    assert without_test["error"] > 3 * with_test["error"]
    assert with_test["error"] == pytest.approx(unoccluded["error"], abs=3e-3)
    assert with_test["covisible_fraction"] < without_test["covisible_fraction"] - 0.05


def test_views_without_shared_surface_score_nan(plane_renders):
    cameras, images, depths, alphas = plane_renders
    empty = multiview_consistency(images, cameras, depths, torch.zeros_like(alphas), pairs=[(0, 1)])
    assert math.isnan(empty["error"]) and empty["covisible_fraction"] == 0.0
    mixed = multiview_consistency(images, cameras, depths, alphas.clone().index_fill_(0, torch.tensor([3]), 0.0),
                                  pairs=[(0, 1), (2, 3)])
    assert math.isnan(mixed["per_pair"][1]["error"])
    assert mixed["error"] == pytest.approx(mixed["per_pair"][0]["error"])  # the mean skips the empty pair


def test_arguments_are_checked(plane_renders):
    cameras, images, depths, alphas = plane_renders
    with pytest.raises(ValueError, match=r"`depths` must have shape \[C, H, W\]"):
        multiview_consistency(images, cameras, depths[:, :-1], alphas)
    with pytest.raises(ValueError, match="one camera per image"):
        multiview_consistency(images, cameras[:3], depths, alphas)
    with pytest.raises(ValueError, match="distinct view indices"):
        multiview_consistency(images, cameras, depths, alphas, pairs=[(1, 1)])
    with pytest.raises(ValueError, match="must all be 64x64"):
        multiview_consistency(images, [c.scaled(0.5) for c in cameras], depths, alphas)
