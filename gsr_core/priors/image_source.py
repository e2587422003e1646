"""HR training images for super-resolution priors: procedural textures or a folder of images.

``image_pool`` returns a list of [H,W,3] float32 images in [0,1]; ``random_crops`` draws a batch of augmented
crops (random position, flips and 90-degree turns) from it with a caller-owned generator, so a resumed training
run draws the same crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from gsr_core.data.textures import TEXTURE_KINDS, texture_image
from gsr_core.images import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TRAIN_SEED_BASE = 1_000_000  # texture seeds of training images; held-out images use HELD_OUT_SEED_BASE
HELD_OUT_SEED_BASE = 2_000_000


def texture_pool(count: int, resolution: int, kinds: Sequence[str] = TEXTURE_KINDS, *, seed_base: int = TRAIN_SEED_BASE,
                 cells: tuple[float, float] = (3.0, 12.0)) -> list[torch.Tensor]:
    """``count`` flat procedural texture images [R,R,3], kinds in turn, pattern scale drawn from ``cells``.

    Image i uses texture seed ``seed_base + i``: the training and held-out pools never share a texture.
    """
    unknown = set(kinds) - set(TEXTURE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be a non-empty subset of {TEXTURE_KINDS}, got {list(kinds)}")
    generator = torch.Generator().manual_seed(seed_base)
    images = []
    for index in range(count):
        scale = cells[0] + (cells[1] - cells[0]) * float(torch.rand((), generator=generator))
        images.append(texture_image(kinds[index % len(kinds)], resolution, resolution, seed_base + index, cells=scale))
    return images


def folder_pool(folder: str | Path, min_size: int) -> list[torch.Tensor]:
    """Every image in ``folder`` (RGB, alpha dropped) at least ``min_size`` pixels on each side."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        image = read_image(path)[..., :3]
        if min(image.shape[:2]) < min_size:
            raise ValueError(f"{path}: {image.shape[1]}x{image.shape[0]} is smaller than the crop size {min_size}")
        images.append(image)
    return images


def random_crops(pool: list[torch.Tensor], batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[B,size,size,3] crops from random pool images with random flips and 90-degree turns."""
    crops = []
    for _ in range(batch):
        image = pool[int(torch.randint(len(pool), (), generator=generator))]
        top = int(torch.randint(image.shape[0] - size + 1, (), generator=generator))
        left = int(torch.randint(image.shape[1] - size + 1, (), generator=generator))
        crop = image[top:top + size, left:left + size]
        turns, flip = torch.randint(4, (), generator=generator), torch.randint(2, (), generator=generator)
        crop = torch.rot90(crop, int(turns), dims=(0, 1))
        crops.append(crop.flip(1) if flip else crop)
    return torch.stack(crops)
