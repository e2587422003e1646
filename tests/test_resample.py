"""Downsampling and upsampling of images and views folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsr_core.data.resample import downsample_image, resample_views, upsample_image
from gsr_core.data.views import Views
from tests.conftest import write_views


def test_area_filter_is_the_block_mean():
    image = torch.rand(8, 12, 3, generator=torch.Generator().manual_seed(1))
    small = downsample_image(image, 4)
    assert small.shape == (2, 3, 3)
    assert torch.allclose(small[1, 2], image[4:8, 8:12].mean(dim=(0, 1)))


def test_bicubic_filter_is_antialiased_and_keeps_constants():
    assert torch.allclose(downsample_image(torch.full((16, 16, 3), 0.3), 4, "bicubic"), torch.full((4, 4, 3), 0.3))
    stripes = torch.zeros(64, 64, 3)
    stripes[:, ::2] = 1.0  # Nyquist stripes: an antialiased filter averages them to grey, point sampling would not
    assert torch.allclose(downsample_image(stripes, 4, "bicubic")[4:-4, 4:-4], torch.tensor(0.5), atol=0.02)


def test_upsample_then_area_downsample_of_smooth_image_is_close():
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    image = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")[0].permute(1, 2, 0)
    assert upsample_image(image, 4).shape == (128, 128, 3)
    assert (downsample_image(upsample_image(image, 4), 4) - image).abs().max() < 0.02


def test_alpha_is_resampled_premultiplied():
    image = torch.zeros(4, 4, 4)
    image[:, :2] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # opaque red half; the other half transparent (colour 0)
    small = downsample_image(image, 4)
    assert torch.allclose(small[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.5]))  # still pure red, half covered


def test_views_folder_downsample_scales_cameras_and_names_bad_sizes(tmp_path: Path):
    views = Views.read(write_views(tmp_path / "v", count=4, size=32))
    small = Views.read(resample_views(views, tmp_path / "small", 4, "down"))
    assert (small.width, small.height) == (8, 8)
    assert [r.name for r in small] == [r.name for r in views] and [r.split for r in small] == [r.split for r in views]
    assert torch.allclose(small.records[0].camera.K[:2], views.records[0].camera.K[:2] / 4)
    assert len(small.points()) == len(views.points())
    with pytest.raises(ValueError, match=r"v000.png: image size 32x32 is not divisible by the downsampling factor 3"):
        resample_views(views, tmp_path / "odd", 3, "down")
    big = Views.read(resample_views(small, tmp_path / "big", 4, "up"))
    assert (big.width, big.height) == (32, 32) and torch.allclose(big.records[0].camera.K, views.records[0].camera.K)
