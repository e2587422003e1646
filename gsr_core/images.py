"""Image files and tensor layouts: the one place where pixels change representation.

In memory an image is float32 in [0, 1]: one image ``[H, W, 3]`` (or ``[H, W, 4]`` with alpha), a batch in
the renderer layout ``[C, H, W, 3]``. Priors take ``[B, 3, H, W]`` in [-1, 1]: convert with
``to_model_range`` / ``from_model_range``. On disk images are 8-bit PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def read_image(path: str | Path) -> torch.Tensor:
    """Read an 8-bit RGB or RGBA image file.

    Returns:
        [H, W, 3] or [H, W, 4] float32 in [0, 1] (grey and palette images are converted to RGB/RGBA).

    Raises:
        ValueError naming the file when it is missing, unreadable or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if image.mode in ("I;16", "I;16B", "I"):
                raise ValueError(f"image file {path} is {image.mode} (16-bit grey); expected 8-bit RGB or RGBA")
            array = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image file {path} is not a readable image: {error}") from error
    return torch.from_numpy(array.astype(np.float32) / 255.0)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image file {path} is not a readable image: {error}") from error


def write_image(path: str | Path, image: torch.Tensor) -> None:
    """Write ``image`` ([H, W, 3] or [H, W, 4], float in [0, 1], clamped) as an 8-bit PNG."""
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"`image` must have shape [H, W, 3] or [H, W, 4], got {list(image.shape)}")
    array = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, "RGBA" if array.shape[-1] == 4 else "RGB").save(path, format="PNG")


def composite_over(images: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Straight-alpha images [..., H, W, 4] over ``background`` (broadcast against [..., H, W, 3], e.g. [3] or
    [C, 1, 1, 3]): colour * alpha + background * (1 - alpha), [..., H, W, 3]."""
    alpha = images[..., 3:]
    return images[..., :3] * alpha + background * (1.0 - alpha)


def to_channels_first(images: torch.Tensor) -> torch.Tensor:
    """[C, H, W, 3] -> [C, 3, H, W] (same range)."""
    return images.permute(0, 3, 1, 2)


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, H, W, 3] (same range)."""
    return images.permute(0, 2, 3, 1)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Renderer layout to prior layout: [C, H, W, 3] in [0, 1] -> [C, 3, H, W] in [-1, 1]."""
    return to_channels_first(images) * 2.0 - 1.0


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """Prior layout to renderer layout: [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] in [0, 1] (clamped)."""
    return to_channels_last((images.clamp(-1.0, 1.0) + 1.0) / 2.0)
