"""Tile binning: which Gaussians touch which screen tiles, sorted front to back within each tile.

One vectorised pass, one sort. Every (camera, Gaussian) with non-zero radii is listed in each tile its
bounding box ``[means2d - radii, means2d + radii]`` overlaps (gsplat's ``isect_tiles`` rule: tile range
``[floor((u - r) / s), ceil((u + r) / s))`` clamped to the grid). Each intersection gets gsplat's 64-bit key
``camera << (32 + tile_bits) | tile << 32 | float32 bits of the depth``; one stable sort orders the keys by
camera, tile and depth (depths are positive, so their float bits sort like the floats), ties by Gaussian index.
Intersections are enumerated in chunks of whole Gaussians, so temporaries stay bounded however many there are.

``drop_invisible_pairs`` then removes, for compositing only, the pairs whose Gaussian is below the 1/255 alpha
threshold on its whole tile (a box covers more tiles than the ellipse inside it); ``info`` keeps gsplat's lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsr_core.render.projection import ALPHA_THRESHOLD


@dataclass
class TileBins:
    """Intersections of Gaussians with the tiles of C images of ``tile_height x tile_width`` tiles.

    Attributes:
        tile_size: tile side in pixels.
        tile_width, tile_height: number of tiles across and down.
        tiles_per_gauss: [C, N] int32 number of tiles each Gaussian's bounding box touches.
        isect_ids: [M] int64 sorted keys (camera | tile | depth), M intersections.
        flatten_ids: [M] int32 index ``c * N + n`` of the Gaussian of each sorted intersection.
        isect_offsets: [C, tile_height, tile_width] int32 start of each tile's run in ``flatten_ids``.
        tile_counts: [C * tile_height * tile_width] int64 length of each tile's run.
        tile_starts: [C * tile_height * tile_width] int64 start of each tile's run (``isect_offsets`` flat).
    """

    tile_size: int
    tile_width: int
    tile_height: int
    tiles_per_gauss: torch.Tensor
    isect_ids: torch.Tensor
    flatten_ids: torch.Tensor
    isect_offsets: torch.Tensor
    tile_counts: torch.Tensor
    tile_starts: torch.Tensor


# Intersections enumerated (or culled) per chunk: bounds the int64 temporaries to a few hundred MB.
CHUNK_ISECTS = 1 << 22


@torch.no_grad()
def bin_gaussians(
    means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, width: int, height: int, tile_size: int
) -> TileBins:
    """Bin projected Gaussians into ``tile_size`` square tiles.

    Args:
        means2d: [C, N, 2] pixel coordinates. radii: [C, N, 2] int32 (0 = culled). depths: [C, N].
        width, height: image size in pixels. tile_size: tile side in pixels.
    """
    n_cameras, n_gaussians = depths.shape
    device = means2d.device
    tile_width, tile_height = -(-width // tile_size), -(-height // tile_size)
    n_tiles = tile_width * tile_height
    tile_bits = n_tiles.bit_length()

    visible = (radii > 0).all(dim=-1)  # [C, N]
    tile_xy = means2d.detach().float() / tile_size  # [C, N, 2]
    tile_radii = radii.float() / tile_size
    grid = torch.tensor([tile_width, tile_height], device=device)
    tile_min = torch.minimum(torch.floor(tile_xy - tile_radii).clamp_min(0), grid).long().reshape(-1, 2)
    tile_max = torch.minimum(torch.ceil(tile_xy + tile_radii).clamp_min(0), grid).long().reshape(-1, 2)
    spans = (tile_max - tile_min) * visible.reshape(-1, 1)  # [C * N, 2]
    counts = spans[:, 0] * spans[:, 1]  # [C * N]
    depth_bits = depths.detach().float().reshape(-1).view(torch.int32).long() & 0xFFFFFFFF

    touching = torch.nonzero(counts).squeeze(1)  # flat (c * N + n) ids with at least one tile
    touching_counts = counts[touching]
    ends = torch.cumsum(touching_counts, 0)
    n_isects = int(ends[-1]) if ends.numel() else 0
    keys = torch.empty(n_isects, dtype=torch.int64, device=device)
    owners = torch.empty(n_isects, dtype=torch.int32, device=device)
    tile_counts = torch.zeros(n_cameras * n_tiles, dtype=torch.int64, device=device)
    # Chunks of whole Gaussians holding about CHUNK_ISECTS intersections each.
    thresholds = torch.arange(CHUNK_ISECTS, max(n_isects, CHUNK_ISECTS), CHUNK_ISECTS, device=device)
    boundaries = torch.searchsorted(ends, thresholds)
    starts = [0] + (boundaries + 1).tolist()
    for first, last in zip(starts, starts[1:] + [touching.numel()]):
        if first >= last:
            continue
        begin = int(ends[first - 1]) if first > 0 else 0
        end = int(ends[last - 1])
        chunk_counts = touching_counts[first:last]
        owner = torch.repeat_interleave(touching[first:last], chunk_counts)  # flat Gaussian id per intersection
        local = torch.arange(end - begin, device=device) - torch.repeat_interleave(
            ends[first:last] - chunk_counts - begin, chunk_counts
        )
        span_x = spans[owner, 0]
        tile_id = (tile_min[owner, 1] + local // span_x) * tile_width + tile_min[owner, 0] + local % span_x
        del local, span_x
        camera = owner // n_gaussians
        keys[begin:end] = (camera << (32 + tile_bits)) | (tile_id << 32) | depth_bits[owner]
        owners[begin:end] = owner
        tile_counts += torch.bincount(camera * n_tiles + tile_id, minlength=n_cameras * n_tiles)

    isect_ids, order = torch.sort(keys, stable=True)
    del keys
    flatten_ids = owners[order]
    offsets = torch.cumsum(tile_counts, 0) - tile_counts
    return TileBins(
        tile_size=tile_size,
        tile_width=tile_width,
        tile_height=tile_height,
        tiles_per_gauss=counts.reshape(n_cameras, n_gaussians).int(),
        isect_ids=isect_ids,
        flatten_ids=flatten_ids,
        isect_offsets=offsets.reshape(n_cameras, tile_height, tile_width).int(),
        tile_counts=tile_counts,
        tile_starts=offsets,
    )


# Pairs are dropped only when even the best pixel of the tile stays this far below the 1/255 alpha threshold,
# so rounding in the compositor can never bring a dropped pair back above it.
_CULL_MARGIN = 0.99


@torch.no_grad()
def drop_invisible_pairs(
    bins: TileBins, means2d: torch.Tensor, conics: torch.Tensor, opacities: torch.Tensor
) -> TileBins:
    """The same bins without the (Gaussian, tile) pairs whose alpha is below 1/255 at every pixel of the tile.

    A bounding box overlaps more tiles than the ellipse it bounds does. For each pair, the smallest
    ``sigma = 0.5 d^T conic d`` over the rectangle spanned by the tile's pixel centres is exact: zero when the
    centre lies inside, else the minimum over the four edges (a clamped 1D quadratic each). If even there
    ``o exp(-sigma) < 1/255``, no pixel of the tile would use the Gaussian, so the rendering is unchanged.

    Args:
        bins: output of ``bin_gaussians``. means2d: [C, N, 2]. conics: [C, N, 3]. opacities: [C, N].
    """
    if bins.flatten_ids.numel() == 0:
        return bins
    size, n_cameras = bins.tile_size, bins.isect_offsets.shape[0]
    n_tiles = bins.tile_width * bins.tile_height
    tile_mask = (1 << n_tiles.bit_length()) - 1
    flat_means2d, flat_conics = means2d.detach().reshape(-1, 2), conics.detach().reshape(-1, 3)
    flat_opacities = opacities.detach().reshape(-1)
    n_gaussians = bins.tiles_per_gauss.shape[1]
    keep = torch.empty(bins.flatten_ids.numel(), dtype=torch.bool, device=means2d.device)
    tile_counts = torch.zeros_like(bins.tile_counts)
    for begin in range(0, keep.numel(), CHUNK_ISECTS):
        ids = bins.flatten_ids[begin : begin + CHUNK_ISECTS].long()
        tile = (bins.isect_ids[begin : begin + CHUNK_ISECTS] >> 32) & tile_mask
        low_x = ((tile % bins.tile_width) * size).to(means2d.dtype) + 0.5
        low_y = ((tile // bins.tile_width) * size).to(means2d.dtype) + 0.5
        high_x, high_y = low_x + (size - 1), low_y + (size - 1)
        u, v = flat_means2d[ids].unbind(-1)
        a, b, c = flat_conics[ids].unbind(-1)

        def sigma(dx, dy):
            return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy

        smallest = torch.full_like(u, torch.inf)
        for edge_x in (low_x, high_x):  # vertical edges: best y = v + b dx / c
            dx = u - edge_x
            smallest = torch.minimum(smallest, sigma(dx, v - (v + b * dx / c).clamp(low_y, high_y)))
        for edge_y in (low_y, high_y):  # horizontal edges: best x = u + b dy / a
            dy = v - edge_y
            smallest = torch.minimum(smallest, sigma(u - (u + b * dy / a).clamp(low_x, high_x), dy))
        inside = (u >= low_x) & (u <= high_x) & (v >= low_y) & (v <= high_y)
        smallest.masked_fill_(inside, 0.0)
        chunk_keep = flat_opacities[ids] * torch.exp(-smallest) >= _CULL_MARGIN * ALPHA_THRESHOLD
        keep[begin : begin + CHUNK_ISECTS] = chunk_keep
        global_tile = (ids // n_gaussians) * n_tiles + tile
        tile_counts += torch.bincount(global_tile[chunk_keep], minlength=n_cameras * n_tiles)
    offsets = torch.cumsum(tile_counts, 0) - tile_counts
    return TileBins(
        tile_size=size,
        tile_width=bins.tile_width,
        tile_height=bins.tile_height,
        tiles_per_gauss=bins.tiles_per_gauss,
        isect_ids=bins.isect_ids[keep],
        flatten_ids=bins.flatten_ids[keep],
        isect_offsets=offsets.reshape(bins.isect_offsets.shape).int(),
        tile_counts=tile_counts,
        tile_starts=offsets,
    )
