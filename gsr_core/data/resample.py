"""Resizing images and whole views folders by an integer factor, with cameras scaled to match.

Intrinsics follow the pixel convention of ``gsr_core.cameras`` (pixel corners on integers), under which a
resize by ``s`` scales fx, fy, cx, cy by ``s`` exactly; ``Camera.scaled`` does it.

Filters:
* ``area`` (downsampling default): each output pixel is the mean of the ``factor x factor`` block it covers.
* ``bicubic``: antialiased bicubic (PyTorch's ``interpolate(..., antialias=True)``, the filter PIL uses),
  for downsampling; plain bicubic (a = -0.75, ``align_corners=False``) for upsampling.
Images with alpha are resampled premultiplied, so transparent pixels do not bleed their colour into edges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from gsr_core.data.views import Views, ViewsWriter

DownFilter = Literal["area", "bicubic"]


def _premultiplied(image: torch.Tensor) -> torch.Tensor:
    if image.shape[-1] == 4:
        return torch.cat([image[..., :3] * image[..., 3:], image[..., 3:]], dim=-1)
    return image


def _unpremultiplied(image: torch.Tensor) -> torch.Tensor:
    if image.shape[-1] == 4:
        alpha = image[..., 3:]
        colour = torch.where(alpha > 0, image[..., :3] / alpha.clamp_min(1e-8), torch.zeros_like(image[..., :3]))
        return torch.cat([colour, alpha], dim=-1).clamp(0, 1)
    return image.clamp(0, 1)


def downsample_image(image: torch.Tensor, factor: int, filter: DownFilter = "area") -> torch.Tensor:
    """Shrink ``image`` [H, W, C] (C = 3 or 4, values in [0, 1]) by an integer ``factor``.

    Returns:
        [H / factor, W / factor, C] float32.
    """
    height, width = image.shape[:2]
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"image size {width}x{height} is not divisible by `factor` {factor}")
    planar = _premultiplied(image.float()).permute(2, 0, 1)[None]
    if filter == "area":
        small = F.avg_pool2d(planar, kernel_size=factor)
    elif filter == "bicubic":
        small = F.interpolate(planar, size=(height // factor, width // factor), mode="bicubic",
                              align_corners=False, antialias=True)
    else:
        raise ValueError(f"`filter` must be 'area' or 'bicubic', got {filter!r}")
    return _unpremultiplied(small[0].permute(1, 2, 0))


def upsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Enlarge ``image`` [H, W, C] by an integer ``factor`` with bicubic interpolation.

    Returns:
        [H * factor, W * factor, C] float32 clamped to [0, 1].
    """
    if factor < 1:
        raise ValueError(f"`factor` must be a positive integer, got {factor}")
    height, width = image.shape[:2]
    planar = _premultiplied(image.float()).permute(2, 0, 1)[None]
    large = F.interpolate(planar, size=(height * factor, width * factor), mode="bicubic", align_corners=False)
    return _unpremultiplied(large[0].permute(1, 2, 0))


def resample_views(views: Views, out: Path, factor: int, direction: Literal["down", "up"],
                   filter: DownFilter = "area", progress: Callable[[int], None] | None = None) -> Path:
    """Write ``views`` resized by ``factor`` (down or up) as a new views folder at ``out``.

    Cameras are scaled, splits, names, point cloud and metadata are kept.

    Raises:
        ValueError naming the image file when a size is not divisible by the factor (downsampling).
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"`factor` must be a positive integer, got {factor!r}")
    if direction == "down" and (views.width % factor or views.height % factor):
        first = views.image_path(views.records[0])
        raise ValueError(f"{first}: image size {views.width}x{views.height} is not divisible by the downsampling "
                         f"factor {factor}; crop the images or choose a factor that divides both sides")
    views.check_image_sizes()
    scale = 1.0 / factor if direction == "down" else float(factor)
    metadata = dict(views.metadata, resampled={"direction": direction, "factor": factor, "filter": filter})
    writer = ViewsWriter(out, metadata=metadata)
    for record in views.records:
        image = views.load_image(record)
        resized = downsample_image(image, factor, filter) if direction == "down" else upsample_image(image, factor)
        writer.add(record.name, record.split, record.camera.scaled(scale), resized)
        if progress:
            progress(1)
    writer.close(views.points())
    return out
