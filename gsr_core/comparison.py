"""The comparison picture: reference and candidate renders side by side, with zoomed crops of detailed regions.

Layout (one block of rows per test view V, columns = reference then each candidate in the given order)::

    [ label ][ label ][ label ]        one header band with the column labels
    [  full ][  full ][  full ]        full images, each crop region outlined in its colour
    [ crops ][ crops ][ crops ]        the crop regions, nearest-neighbour enlarged, framed in the same colours

Crop regions are the non-overlapping square windows of the reference with the most detail (highest gradient
energy), chosen per view; their side is ``min(H, W) // (zoom * num_crops)`` so the enlarged crops of a column
fit under its image at any resolution. Small images (under 128 pixels on their short side) are shown enlarged
by an integer factor so that labels and crops stay legible. Everything is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REFERENCE_LABEL = "reference"
MIN_DISPLAY_SIDE = 128
CROP_COLOURS = ((230, 25, 75), (0, 130, 200), (255, 180, 0), (60, 180, 75))
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def detail_crops(reference: torch.Tensor, size: int, count: int) -> list[tuple[int, int]]:
    """The ``count`` non-overlapping ``size`` x ``size`` windows of ``reference`` with the most gradient energy.

    Energy is the sum over the window of squared forward differences (horizontal and vertical) of the grey
    image. Windows are taken greedily, best first; ties go to the top-most, then left-most window.

    Args:
        reference: [H, W, 3] float image.
        size: window side in pixels, 1 <= size <= min(H, W).
        count: number of windows, >= 1.

    Returns:
        ``count`` (top, left) pixel corners, best first.
    """
    _check_image(reference, "reference")
    height, width = reference.shape[:2]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(height, width):
        raise ValueError(
            f"`size` must be an int in [1, {min(height, width)}] for a {height} x {width} image, got {size!r}"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive int, got {count!r}")
    grey = reference.detach().to("cpu", torch.float64).mean(dim=-1)
    energy = torch.zeros_like(grey)
    energy[:, :-1] += (grey[:, 1:] - grey[:, :-1]).square()
    energy[:-1, :] += (grey[1:, :] - grey[:-1, :]).square()
    integral = torch.nn.functional.pad(energy.cumsum(0).cumsum(1), (1, 0, 1, 0))
    window_energy = (
        integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    )
    corners = []
    for _ in range(count):
        best = int(torch.argmax(window_energy))
        top, left = divmod(best, window_energy.shape[1])
        if window_energy[top, left] == -math.inf:
            raise ValueError(
                f"cannot place {count} non-overlapping {size} x {size} windows in a {height} x {width} image"
            )
        corners.append((top, left))
        window_energy[max(0, top - size + 1) : top + size, max(0, left - size + 1) : left + size] = -math.inf
    return corners


def comparison_image(
    reference: torch.Tensor,
    candidates: Mapping[str, torch.Tensor],
    num_crops: int = 2,
    zoom: int = 4,
) -> torch.Tensor:
    """Compose the comparison picture of one or a few test views.

    Args:
        reference: [H, W, 3] or [V, H, W, 3] float ground truth in [0, 1] (V test views).
        candidates: label -> image of the same shape as ``reference``; one column each, in this order.
        num_crops: detailed regions shown enlarged per view, 1 to 4.
        zoom: enlargement of the crops relative to the full images shown, >= 1.

    Returns:
        [H', W', 3] float32 picture in [0, 1], ready for ``gsr_core.images.write_image``.
    """
    _check_image(reference, "reference", allow_views=True)
    if not isinstance(candidates, Mapping):
        raise TypeError(f"`candidates` must be a mapping label -> image, got {type(candidates).__name__}")
    for label, image in candidates.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"`candidates` labels must be non-empty strings, got {label!r}")
        _check_image(image, f"candidates[{label!r}]", allow_views=True)
        if image.shape != reference.shape:
            raise ValueError(
                f"`candidates[{label!r}]` must have the shape of `reference` {list(reference.shape)}, "
                f"got {list(image.shape)}"
            )
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or not 1 <= num_crops <= len(CROP_COLOURS):
        raise ValueError(f"`num_crops` must be an int in [1, {len(CROP_COLOURS)}], got {num_crops!r}")
    if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"`zoom` must be a positive int, got {zoom!r}")

    references = reference if reference.ndim == 4 else reference[None]
    columns = [references] + [image if image.ndim == 4 else image[None] for image in candidates.values()]
    labels = [REFERENCE_LABEL, *candidates]
    height, width = references.shape[1:3]
    crop_side = min(height, width) // (zoom * num_crops)
    if crop_side < 1:
        raise ValueError(
            f"a {height} x {width} image is too small for {num_crops} crops at zoom {zoom}: "
            f"needs min(H, W) >= {zoom * num_crops}"
        )
    layout = _Layout(height, width, len(columns), references.shape[0], crop_side, zoom, num_crops)
    canvas = Image.new("RGB", (layout.canvas_width, layout.canvas_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    for column, label in enumerate(labels):
        _draw_label(draw, font, label, layout.column_left(column), layout.margin, layout.column_width)
    scale = layout.display_scale
    for view, view_reference in enumerate(references):
        corners = detail_crops(view_reference, crop_side, num_crops)
        for column, images in enumerate(columns):
            pixels = _to_uint8(images[view])
            left, top = layout.column_left(column), layout.image_top(view)
            canvas.paste(_enlarge(pixels, scale), (left, top))
            for index, (crop_top, crop_left) in enumerate(corners):
                colour = CROP_COLOURS[index]
                box = (left + crop_left * scale, top + crop_top * scale)
                _outline(draw, box, crop_side * scale, colour, layout.line_width)
                tile = pixels[crop_top : crop_top + crop_side, crop_left : crop_left + crop_side]
                tile_corner = (left + layout.tile_offset(index), layout.tiles_top(view))
                canvas.paste(_enlarge(tile, scale * zoom), tile_corner)
                _outline(draw, tile_corner, layout.tile_side, colour, layout.line_width)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


class _Layout:
    """Pixel positions of every part of the picture (all ints)."""

    def __init__(
        self, height: int, width: int, columns: int, views: int, crop_side: int, zoom: int, num_crops: int
    ) -> None:
        self.display_scale = max(1, math.ceil(MIN_DISPLAY_SIDE / min(height, width)))
        self.image_height = height * self.display_scale
        self.column_width = width * self.display_scale
        self.tile_side = crop_side * self.display_scale * zoom
        self.num_crops = num_crops
        self.margin = max(4, min(self.image_height, self.column_width) // 32)
        self.line_width = max(1, min(self.image_height, self.column_width) // 160)
        self.font_size = min(48, max(11, self.column_width // 14))
        self.header_height = self.font_size + self.margin
        self.view_height = self.image_height + self.margin + self.tile_side + self.margin
        self.canvas_width = columns * self.column_width + (columns + 1) * self.margin
        self.canvas_height = self.margin + self.header_height + views * self.view_height

    def column_left(self, column: int) -> int:
        return self.margin + column * (self.column_width + self.margin)

    def image_top(self, view: int) -> int:
        return self.margin + self.header_height + view * self.view_height

    def tiles_top(self, view: int) -> int:
        return self.image_top(view) + self.image_height + self.margin

    def tile_offset(self, index: int) -> int:
        """Left of crop tile ``index`` inside its column: tiles spread evenly over the column width."""
        spare = self.column_width - self.num_crops * self.tile_side
        return (index + 1) * spare // (self.num_crops + 1) + index * self.tile_side


def _check_image(image: torch.Tensor, name: str, allow_views: bool = False) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(image).__name__}")
    shapes = "[H, W, 3] or [V, H, W, 3]" if allow_views else "[H, W, 3]"
    if image.ndim not in ((3, 4) if allow_views else (3,)) or image.shape[-1] != 3 or min(image.shape) == 0:
        raise ValueError(f"`{name}` must have shape {shapes}, got {list(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point image in [0, 1], got dtype {image.dtype}")


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> [H, W, 3] uint8, rounded as ``write_image`` does."""
    return (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def _enlarge(pixels: np.ndarray, factor: int) -> Image.Image:
    """Nearest-neighbour enlargement of [h, w, 3] uint8 pixels by an integer factor."""
    return Image.fromarray(np.ascontiguousarray(pixels.repeat(factor, axis=0).repeat(factor, axis=1)), "RGB")


def _outline(draw: ImageDraw.ImageDraw, corner: tuple[int, int], side: int, colour, line_width: int) -> None:
    """A square frame drawn inside the ``side`` x ``side`` square at ``corner`` (x, y)."""
    x, y = corner
    draw.rectangle((x, y, x + side - 1, y + side - 1), outline=colour, width=line_width)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font at ``size`` pixels (its fixed bitmap font without FreeType or before 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, font, label: str, left: int, top: int, width: int) -> None:
    """``label`` centred over a column of ``width`` pixels, shortened with '..' when it does not fit."""
    text, kept = label, len(label)
    while kept > 1 and draw.textlength(text, font=font) > width:
        kept -= 1
        text = label[:kept] + ".."
    x = left + max(0, (width - int(draw.textlength(text, font=font))) // 2)
    draw.text((x, top), text, fill=TEXT_COLOUR, font=font)
