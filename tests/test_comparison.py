"""The comparison picture: columns in order with labels, crops of the most detailed region, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsr_core.comparison import comparison_image, detail_crops
from gsr_core.images import read_image, write_image

RED = (0.9, 0.1, 0.1)
BLUE = (0.1, 0.1, 0.9)


def textured_reference(views: int, height: int, width: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """Flat grey views with one random-noise square (top, left, side): the only detail in the image."""
    top, left, side = patch
    generator = torch.Generator().manual_seed(0)
    images = torch.full((views, height, width, 3), 0.5)
    images[:, top : top + side, left : left + side] = torch.rand(views, side, side, 3, generator=generator)
    return images


def constant(like: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(colour).expand(like.shape).clone()


def colour_mask(picture: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """[H', W'] pixels of ``colour`` after 8-bit rounding."""
    return (np.abs(picture - np.round(np.array(colour) * 255) / 255) < 1e-3).all(axis=-1)


def test_detail_crops_find_the_textured_region_without_overlap():
    reference = textured_reference(1, 80, 120, patch=(40, 70, 24))[0]
    first, second = detail_crops(reference, size=10, count=2)
    assert 40 - 1 <= first[0] <= 40 + 24 - 10 + 1 and 70 - 1 <= first[1] <= 70 + 24 - 10 + 1
    assert abs(first[0] - second[0]) >= 10 or abs(first[1] - second[1]) >= 10
    flat = torch.full((16, 16, 3), 0.3)
    assert detail_crops(flat, size=4, count=2) == [(0, 0), (0, 4)]  # ties: top-most, then left-most
    with pytest.raises(ValueError, match="cannot place 2 non-overlapping"):
        detail_crops(flat, size=9, count=2)
    with pytest.raises(ValueError, match="`size` must be an int in \\[1, 16\\]"):
        detail_crops(flat, size=17, count=1)


@pytest.mark.parametrize("height, width", [(64, 64), (90, 150), (320, 200)])
def test_columns_are_reference_then_candidates_with_labels(height, width):
    reference = textured_reference(1, height, width, patch=(height // 3, width // 3, min(height, width) // 4))
    picture = comparison_image(reference, {"red": constant(reference, RED), "blue": constant(reference, BLUE)}).numpy()
    assert picture.dtype == np.float32 and picture.ndim == 3 and picture.shape[-1] == 3
    assert picture.min() >= 0 and picture.max() <= 1
    np.testing.assert_array_equal(np.round(picture * 255) / 255, picture)  # exact 8-bit values, PNG-ready

    first_image_row = np.flatnonzero(colour_mask(picture, RED).any(axis=1)).min()
    below_labels = picture[first_image_row:]
    spans = []
    for colour in ((0.5, 0.5, 0.5), RED, BLUE):
        columns = np.flatnonzero(colour_mask(below_labels, colour).any(axis=0))
        spans.append((columns.min(), columns.max()))
    # Three columns of equal width, at least as wide as the image, left to right: reference, red, blue.
    widths = [right - left + 1 for left, right in spans]
    assert widths[0] == widths[1] == widths[2] >= width
    assert spans[0][1] < spans[1][0] and spans[1][1] < spans[2][0]

    # Each column's label is drawn (dark text pixels) in the band above the images, and nowhere between them.
    dark = (picture[:first_image_row] < 0.35).all(axis=-1)
    for left, right in spans:
        assert dark[:, left : right + 1].any()
    assert not dark[:, spans[0][1] + 1 : spans[1][0]].any() and not dark[:, spans[1][1] + 1 : spans[2][0]].any()


def test_crops_show_the_detailed_region_enlarged():
    reference = textured_reference(1, 64, 64, patch=(8, 40, 16))
    picture = comparison_image(reference, {"red": constant(reference, RED)}, num_crops=1, zoom=4).numpy()
    # A 64-pixel image is shown at twice its size (128) and its one crop, 64 // 4 = 16 pixels, at 4 x 2 = 8 times.
    (top, left), = detail_crops(reference[0], size=16, count=1)
    expected_tile = reference[0, top : top + 16, left : left + 16].numpy().repeat(8, axis=0).repeat(8, axis=1)
    red_rows = np.flatnonzero(colour_mask(picture, RED).any(axis=1))
    image_rows = red_rows[red_rows < red_rows.min() + 128]
    tile_rows = red_rows[red_rows > image_rows.max() + 1]
    assert image_rows.size == 128 and 126 <= tile_rows.size <= 128  # the tile minus its thin coloured frame
    tile_top = tile_rows.max() + 1 - 128 + (128 - tile_rows.size) // 2
    reference_left = np.flatnonzero(colour_mask(picture[image_rows], (0.5, 0.5, 0.5)).any(axis=0)).min()
    shown = picture[tile_top : tile_top + 128, reference_left : reference_left + 128]
    inner = slice(2, -2)  # inside the frame
    np.testing.assert_allclose(shown[inner, inner], expected_tile[inner, inner], atol=0.5 / 255)


def test_more_views_add_rows_and_the_picture_is_deterministic(tmp_path):
    reference = textured_reference(2, 48, 72, patch=(10, 20, 12))
    candidates = {"bicubic": (reference * 0.8 + 0.1), "sr_gs": reference.flip(2)}
    picture = comparison_image(reference, candidates)
    one_view = comparison_image(reference[0], {label: image[0] for label, image in candidates.items()})
    assert picture.shape[1] == one_view.shape[1] and picture.shape[0] > one_view.shape[0] + 48
    torch.testing.assert_close(picture, comparison_image(reference, candidates), rtol=0, atol=0)
    write_image(tmp_path / "comparison.png", picture)
    torch.testing.assert_close(read_image(tmp_path / "comparison.png"), picture, rtol=0, atol=0)


def test_large_images_keep_their_resolution():
    reference = textured_reference(1, 600, 400, patch=(100, 300, 64))
    picture = comparison_image(reference, {"candidate": reference.clone()}, num_crops=2)
    assert picture.shape[0] > 600 + 400 // 8 * 4 and 2 * 400 <= picture.shape[1] < 2 * 400 + 200


def test_bad_arguments_name_what_is_wrong():
    reference = torch.rand(32, 32, 3)
    with pytest.raises(ValueError, match=r"`candidates\['x'\]` must have the shape of `reference`"):
        comparison_image(reference, {"x": torch.rand(16, 16, 3)})
    with pytest.raises(ValueError, match="`num_crops` must be an int in \\[1, 4\\]"):
        comparison_image(reference, {}, num_crops=5)
    with pytest.raises(ValueError, match="too small for 2 crops at zoom 4"):
        comparison_image(torch.rand(6, 6, 3), {})
    with pytest.raises(TypeError, match="`candidates` must be a mapping"):
        comparison_image(reference, [reference])
    with pytest.raises(ValueError, match="`reference` must have shape"):
        comparison_image(torch.rand(32, 32), {})
