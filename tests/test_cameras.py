"""Camera conventions, and the downsampling geometry: a 3D point lands on the same place after resizing."""

from __future__ import annotations

import pytest
import torch

from gsr_core.cameras import Camera, intrinsics_from_fov, look_at
from gsr_core.data.resample import downsample_image
from tests.conftest import orbit_camera


def test_look_at_puts_the_target_on_the_principal_point_in_front():
    camera = orbit_camera(3, 8, 64)
    uv, depth = camera.project(torch.zeros(1, 3))
    assert torch.allclose(uv, torch.tensor([[32.0, 32.0]], dtype=torch.float64), atol=1e-9)
    assert depth.item() == pytest.approx(float(torch.linalg.norm(camera.center)), rel=1e-9)
    world_up_point = torch.tensor([[0.0, 0.0, 0.5]])  # above the target: smaller row (image y points down)
    assert camera.project(world_up_point)[0][0, 1] < 32.0


def test_scaled_intrinsics_keep_projections_up_to_the_factor():
    camera = Camera(torch.tensor([[300.0, 0, 131.7], [0, 310.0, 97.2], [0, 0, 1]]),
                    look_at(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, 0.2, 0.0]), torch.tensor([0, 0, 1.0])),
                    256, 192)
    points = torch.randn(100, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    uv, _ = camera.project(points)
    for factor in (2, 4, 8):
        small_uv, _ = camera.scaled(1 / factor).project(points)
        assert torch.allclose(small_uv * factor, uv, atol=1e-9)
        assert camera.scaled(1 / factor).width == 256 // factor


def test_area_downsampling_moves_a_rendered_dot_exactly_with_the_intrinsics():
    """A bright 4x4 block covering pixels [40, 44) is one pixel [10, 11) after x4 area downsampling: its
    centre 42.0 maps to 10.5, the centre of that pixel, as the convention (corners on integers) says."""
    image = torch.zeros(64, 64, 3)
    image[20:24, 40:44] = 1.0
    small = downsample_image(image, 4)
    assert small.shape == (16, 16, 3)
    ys, xs = torch.nonzero(small[..., 0] > 0.5, as_tuple=True)
    assert (ys.tolist(), xs.tolist()) == ([5], [10])
    camera = Camera(intrinsics_from_fov(64, 64, 60.0), torch.eye(4, dtype=torch.float64), 64, 64)
    k_big, k_small = camera.K, camera.scaled(0.25).K
    point = torch.linalg.solve(k_big, torch.tensor([42.0, 22.0, 1.0], dtype=torch.float64))  # ray through the centre
    uv, _ = camera.scaled(0.25).project(point[None])
    assert torch.allclose(uv, torch.tensor([[10.5, 5.5]], dtype=torch.float64))
    assert torch.allclose(k_small[:2], k_big[:2] / 4)


def test_bad_camera_arguments_are_named():
    with pytest.raises(ValueError, match="`K` must have shape"):
        Camera(torch.eye(4), torch.eye(4), 8, 8)
    with pytest.raises(ValueError, match="`width` must be a positive int"):
        Camera(torch.eye(3), torch.eye(4), 0, 8)
    with pytest.raises(ValueError, match="non-integer size"):
        Camera(torch.eye(3), torch.eye(4), 10, 10).scaled(0.25)
    with pytest.raises(ValueError, match="`up`"):
        look_at(torch.tensor([0, 0, 1.0]), torch.zeros(3), torch.tensor([0, 0, 1.0]))
