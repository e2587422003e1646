"""Front-to-back alpha compositing of binned 2D Gaussians, with a custom backward (pure PyTorch).

The rule is gsplat's ``rasterize_to_pixels``: for each pixel centre ``p`` and each Gaussian of its tile in depth
order, ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``d = means2d - p``, ``alpha = min(0.999, o exp(-sigma))``;
Gaussians with ``alpha < 1/255`` are skipped; ``w = alpha T`` with ``T`` the transmittance in front; a pixel stops
(exclusively) at the first Gaussian that would take ``T`` to ``<= 1e-4``. Outputs ``sum w c`` and ``1 - T_final``.

How it runs fast on a CPU:

* Work is done on *rows*: one row is B consecutive slots of one tile's depth-sorted list, evaluated densely at the
  tile's P pixels as ``[R, B, P]`` tensors. The forward goes in waves: each wave takes the next B slots of every
  tile still open, carrying each pixel's transmittance to the next wave. Tiles whose pixels have all stopped, or
  whose lists are exhausted, leave, so saturated regions cost nothing further (gsplat's early stop). B is
  ``block`` while many tiles are open and grows when few remain (long lists of background tiles), so that a
  batch always holds about ``MAX_BATCH_ELEMENTS`` elements and the number of waves stays small.
* ``log(o) - sigma`` is a quadratic in tile-centred pixel coordinates, so it comes from one matrix product of
  per-slot coefficients ``[R * B, 6]`` with a fixed basis ``[6, P]`` of ``(1, x, y, x^2, xy, y^2)``; colour sums
  are a batched product ``[P, B] @ [B, D]``; the backward reduces over pixels with the same basis.
* The running transmittance is a scan over the B slots (two in-place operations per slot on ``[R, P]``, or one
  cumulative product for long rows). It is the raw product of ``1 - alpha``, which also counts the Gaussian
  that stops a pixel, so "a slot contributes iff the raw product after it is ``> 1e-4``" is exactly the
  sequential rule, and the mask is only built for batches where some pixel actually stops. Likewise the 0.999
  clamp is only handled where an opacity exceeds 0.999.
* The backward never replays the scan across waves: the forward stores, per batch, the transmittance and colour
  in front of it, so every batch differentiates on its own (memory stays bounded by the batch size).
* Large temporaries live in reused workspaces (fresh multi-megabyte tensors cost page faults on every call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gsr_core.render.binning import TileBins
from gsr_core.render.projection import ALPHA_THRESHOLD

MAX_ALPHA = 0.999
MIN_TRANSMITTANCE = 1e-4
LOG2_E = 1.0 / math.log(2.0)
# Elements of one [R, B, P] tensor per batch of rows: 4 MB in float32, so a batch's buffers stay in cache.
MAX_BATCH_ELEMENTS = 1 << 20
# Rows of at most this many slots are scanned slot by slot; longer ones with one cumulative product.
LOOP_SCAN_SLOTS = 64


@dataclass(frozen=True)
class CompositingPlan:
    """Non-differentiable layout of one compositing call.

    Attributes:
        bins: the tile binning (depth-sorted Gaussian ids per tile).
        width, height: image size in pixels. block: slots per row (B).
    """

    bins: TileBins
    width: int
    height: int
    block: int


def _pixel_basis(tile_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[P, 6] ``(1, x, y, x^2, xy, y^2)`` at the P = tile_size^2 pixel centres, relative to the tile centre."""
    offsets = torch.arange(tile_size, dtype=dtype, device=device) + 0.5 - 0.5 * tile_size
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=-1)


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value`` (so that ``x > result`` means ``x >= value``)."""
    value_in_dtype = torch.tensor(value, dtype=dtype)
    return torch.nextafter(value_in_dtype, torch.tensor(-math.inf, dtype=dtype)).item()


class _Workspace:
    """Reused flat buffers viewed as [R, B, P]; they grow to the largest batch seen."""

    def __init__(self, count: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty(0, dtype=dtype, device=device) for _ in range(count)]

    def get(self, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
        size = shape[0] * shape[1] * shape[2]
        if self.buffers[index].numel() < size:
            self.buffers[index] = torch.empty(size, dtype=self.buffers[index].dtype, device=self.buffers[index].device)
        return self.buffers[index][:size].view(shape)


class _Gaussians2D:
    """Per-(camera, Gaussian) parameters packed in one table [C*N + 1, 6 + D + 1] for single-gather lookups:
    ``(u, v, a, b, c, log o, colour..., 1)``; the last entry (index C*N) is an inert padding Gaussian."""

    def __init__(self, means2d, conics, colors, opacities):
        dtype = means2d.dtype
        opacities = opacities.reshape(-1)
        flat = opacities.numel()
        log_opacities = torch.log(opacities.clamp_min(torch.finfo(dtype).tiny))
        table = torch.cat(
            [means2d.reshape(flat, 2), conics.reshape(flat, 3), log_opacities[:, None],
             colors.reshape(flat, -1), torch.ones_like(log_opacities)[:, None]], dim=1,
        )  # fmt: skip
        padding = torch.zeros_like(table[:1])
        padding[0, 5] = -1e4  # log opacity: alpha = 0 at every pixel
        self.table = torch.cat([table, padding])
        self.channels = colors.shape[-1]
        self.can_clamp = torch.cat([opacities > MAX_ALPHA, torch.zeros(1, dtype=torch.bool, device=opacities.device)])
        self.padding = flat


@dataclass
class _Batch:
    """R rows sharing one slot range: tiles [R], first slot, slot count B, and (for backward) the transmittance
    [R, P] and colour [R, P, D] in front of the first slot."""

    tiles: torch.Tensor
    first_slot: int
    slots: int
    transmittance: torch.Tensor
    colour: torch.Tensor | None = None


class _Rows:
    """Slot ids [R, B] of one batch, their offsets to the tile centre and conics, and alphas [R, B, P]."""

    def __init__(self, bins: TileBins, gaussians: _Gaussians2D, sorted_ids, batch: _Batch, basis, alphas_out):
        tiles = batch.tiles
        slots = batch.first_slot + torch.arange(batch.slots, device=tiles.device)  # [B]
        in_list = slots[None, :] < bins.tile_counts[tiles, None]  # [R, B]
        index = (bins.tile_starts[tiles, None] + slots).clamp_max(max(sorted_ids.numel() - 1, 0))
        self.ids = torch.where(in_list, sorted_ids[index], gaussians.padding)  # [R, B]
        self.may_clamp = bool(gaussians.can_clamp[self.ids].any())
        rows = self.ids.shape[0]
        values = gaussians.table.index_select(0, self.ids.reshape(-1)).reshape(rows, batch.slots, -1)
        self.features = values[..., 6:]  # [R, B, D + 1]: colour and a 1 (for the alpha sum)

        local_tile = tiles % (bins.tile_width * bins.tile_height)
        half = 0.5 * bins.tile_size
        centre_x = ((local_tile % bins.tile_width) * bins.tile_size + half).to(basis.dtype)
        centre_y = ((local_tile // bins.tile_width) * bins.tile_size + half).to(basis.dtype)
        self.ex = values[..., 0] - centre_x[:, None]  # [R, B]
        self.ey = values[..., 1] - centre_y[:, None]
        self.ca, self.cb, self.cc = values[..., 2], values[..., 3], values[..., 4]
        ex, ey, ca, cb, cc = self.ex, self.ey, self.ca, self.cb, self.cc
        constant = values[..., 5] - (0.5 * ca * ex * ex + cb * ex * ey + 0.5 * cc * ey * ey)
        coefficients = torch.stack([constant, ca * ex + cb * ey, cb * ex + cc * ey, -0.5 * ca, -cb, -0.5 * cc], -1)
        # alpha = min(0.999, o exp(-sigma)), zero below 1/255: [R * B, 6] @ [6, P], then in place. exp2 of the
        # exponent in base 2 is several times cheaper than exp on CPUs.
        self.alphas = alphas_out
        torch.mm(coefficients.reshape(-1, 6).mul_(LOG2_E), basis.T, out=alphas_out.view(-1, basis.shape[0]))
        alphas_out.exp2_()
        if self.may_clamp:
            alphas_out.clamp_max_(MAX_ALPHA)
        torch.nn.functional.threshold_(alphas_out, _below(ALPHA_THRESHOLD, alphas_out.dtype), 0.0)

    def scan(self, transmittance_start, weights_out, after_out, mask_out):
        """Front-to-back scan over the B slots.

        Fills ``weights_out`` [R, B, P] with ``alpha T`` (zero past each pixel's stop) and ``after_out`` with the
        raw transmittance after each slot (zero once a pixel has stopped, which keeps it stopped); the start
        transmittance [R, P] is left as it is. Returns
        ``mask_out`` [R, B, P] as 1 where a slot counts and 0 past the stop, or None when no pixel stops here.
        """
        alphas = self.alphas
        if alphas.shape[1] <= LOOP_SCAN_SLOTS:  # a few cheap in-place operations per slot
            transmittance = transmittance_start
            for slot in range(alphas.shape[1]):
                weight = weights_out[:, slot]
                torch.mul(alphas[:, slot], transmittance, out=weight)
                transmittance = torch.sub(transmittance, weight, out=after_out[:, slot])
        else:  # long rows: one cumulative product instead of thousands of small operations
            torch.sub(alphas.new_ones(()), alphas, out=mask_out)
            torch.cumprod(mask_out, dim=1, out=after_out).mul_(transmittance_start[:, None, :])
            torch.mul(alphas[:, 0], transmittance_start, out=weights_out[:, 0])
            torch.mul(alphas[:, 1:], after_out[:, :-1], out=weights_out[:, 1:])
            transmittance = after_out[:, -1]
        if not bool((transmittance <= MIN_TRANSMITTANCE).any()):
            return None
        # The raw product only decreases, so "after <= 1e-4" marks the stopping slot and every later one.
        torch.nn.functional.threshold_(after_out, MIN_TRANSMITTANCE, 0.0)
        counts = torch.sign(after_out, out=mask_out)
        weights_out.mul_(counts)
        return counts


def _wave_batches(n_rows: int, remaining_slots: int, block: int, pixels: int) -> tuple[int, list[tuple[int, int]]]:
    """Slots per row and row ranges for one wave: B = ``block`` while rows are many; when few tiles remain
    (long lists, e.g. unsaturated background tiles), B grows so one batch still holds about
    ``MAX_BATCH_ELEMENTS`` elements, up to the longest remaining list."""
    slots = block
    if n_rows * block * pixels < MAX_BATCH_ELEMENTS:
        slots = min(max(block, MAX_BATCH_ELEMENTS // (n_rows * pixels)), max(block, remaining_slots))
    step = max(1, MAX_BATCH_ELEMENTS // (slots * pixels))
    return slots, [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class CompositeGaussians(torch.autograd.Function):
    """autograd Function: (means2d, conics, colors, opacities) of C cameras -> colour sums and alphas."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, plan: CompositingPlan, absgrad: bool):
        bins = plan.bins
        n_cameras, channels = means2d.shape[0], colors.shape[-1]
        dtype, device = means2d.dtype, means2d.device
        pixels = bins.tile_size**2
        gaussians = _Gaussians2D(means2d.detach(), conics.detach(), colors.detach(), opacities.detach())
        sorted_ids = bins.flatten_ids
        basis = _pixel_basis(bins.tile_size, dtype, device)
        n_tiles = bins.tile_counts.numel()

        # Per-tile running state; pixels beyond the image border start (and stay) stopped.
        inside = _inside_pixels(bins, plan.width, plan.height, device)  # [tiles per image, P]
        transmittance = inside.to(dtype).repeat(n_cameras, 1)  # [n_tiles, P]
        accumulated = torch.zeros(n_tiles, pixels, channels + 1, dtype=dtype, device=device)
        saving = any(ctx.needs_input_grad[:4])
        saved: list[_Batch] = []
        workspace = _Workspace(4, dtype, device)

        active = torch.nonzero(bins.tile_counts).squeeze(1)
        consumed = 0  # slots done by every active tile
        while active.numel() > 0:
            remaining = int(bins.tile_counts[active].max()) - consumed
            slots, row_ranges = _wave_batches(active.numel(), remaining, plan.block, pixels)
            for start, stop in row_ranges:
                tiles = active[start:stop]
                batch = _Batch(tiles, consumed, slots, transmittance.index_select(0, tiles))
                shape = (tiles.numel(), slots, pixels)
                rows = _Rows(bins, gaussians, sorted_ids, batch, basis, workspace.get(0, shape))
                if saving:
                    batch.colour = accumulated.index_select(0, tiles)[..., :channels]
                    saved.append(batch)
                weights, after = workspace.get(1, shape), workspace.get(2, shape)
                rows.scan(batch.transmittance, weights, after, workspace.get(3, shape))
                accumulated.index_add_(0, tiles, torch.bmm(weights.transpose(1, 2), rows.features))  # [R, P, D + 1]
                transmittance.index_copy_(0, tiles, after[:, -1])
            consumed += slots
            still_open = (transmittance.index_select(0, active) > MIN_TRANSMITTANCE).any(dim=-1)
            active = active[still_open & (bins.tile_counts[active] > consumed)]

        colour = _untile(accumulated[..., :channels], bins, n_cameras, plan.width, plan.height)
        alpha = _untile(accumulated[..., channels:], bins, n_cameras, plan.width, plan.height)
        if saving:
            ctx.plan, ctx.absgrad, ctx.batches = plan, absgrad, saved
            ctx.save_for_backward(means2d, conics, colors, opacities, colour, alpha)
        return colour, alpha

    @staticmethod
    def backward(ctx, grad_colour, grad_alpha):
        means2d, conics, colors, opacities, colour, alpha = ctx.saved_tensors
        bins = ctx.plan.bins
        dtype, device = means2d.dtype, means2d.device
        pixels = bins.tile_size**2
        gaussians = _Gaussians2D(means2d.detach(), conics.detach(), colors.detach(), opacities.detach())
        sorted_ids = bins.flatten_ids
        basis = _pixel_basis(bins.tile_size, dtype, device)

        grad_colour_tiles = _tile(grad_colour, bins)  # [n_tiles, P, D]
        # Per pixel: g . C_final - g_alpha T_final, the part of dL/dalpha_i shared by all slots.
        total = (grad_colour * colour).sum(-1, keepdim=True) - grad_alpha * (1.0 - alpha)
        total_tiles = _tile(total, bins)[..., 0]  # [n_tiles, P]
        # Gradients of each flat Gaussian, packed: (u, v, a, b, c, log o, colour...).
        grads = means2d.new_zeros(gaussians.padding + 1, 6 + gaussians.channels)
        abs_means2d = means2d.new_zeros(gaussians.padding + 1, 2) if ctx.absgrad else None
        workspace = _Workspace(6, dtype, device)

        for batch in ctx.batches:
            tiles = batch.tiles
            n, slots = tiles.numel(), batch.slots
            shape = (n, slots, pixels)
            rows = _Rows(bins, gaussians, sorted_ids, batch, basis, workspace.get(0, shape))
            weights, after = workspace.get(1, shape), workspace.get(2, shape)
            counts = rows.scan(batch.transmittance, weights, after, workspace.get(4, shape))
            g = grad_colour_tiles.index_select(0, tiles)  # [R, P, D]
            g_dot_c = torch.bmm(rows.features[..., :-1], g.transpose(1, 2), out=workspace.get(3, shape))  # [R, B, P]
            grad_colours = torch.bmm(weights, g)  # [R, B, D]

            # behind[i] = g . (colour of the slots behind slot i) - g_alpha T_final, via a running sum.
            behind = weights.mul_(g_dot_c)
            if slots <= LOOP_SCAN_SLOTS:
                for slot in range(1, slots):
                    behind[:, slot] += behind[:, slot - 1]
            else:
                behind = torch.cumsum(behind, dim=1, out=workspace.get(5, shape))
            ahead = total_tiles.index_select(0, tiles) - (g * batch.colour).sum(-1)  # [R, P]
            behind.neg_().add_(ahead[:, None, :])
            # dL/dalpha_i = T_i (g . c_i) - behind_i / (1 - alpha_i), T_i the transmittance in front of slot i.
            in_front = g_dot_c
            in_front[:, 1:].mul_(after[:, :-1])
            in_front[:, 0].mul_(batch.transmittance)
            keep = torch.sub(rows.alphas.new_ones(()), rows.alphas, out=after)
            grad_alpha_slots = torch.addcdiv(in_front, behind, keep, value=-1.0, out=in_front)
            # d alpha / d(log o - sigma) = alpha, except where alpha is clamped, skipped (alpha = 0) or past the stop.
            grad_exponent = grad_alpha_slots.mul_(rows.alphas)  # [R, B, P]
            if counts is not None:
                grad_exponent.mul_(counts)
            if rows.may_clamp:
                unclamped = torch.sub(rows.alphas.new_full((), MAX_ALPHA), rows.alphas, out=after).sign_()
                grad_exponent.mul_(unclamped)

            moments = torch.matmul(grad_exponent, basis)  # [R, B, 6]
            m0, mx, my, mxx, mxy, myy = moments.unbind(-1)
            ex, ey, ca, cb, cc = rows.ex, rows.ey, rows.ca, rows.cb, rows.cc
            # sigma enters the exponent with a minus sign; dx = ex - x, dy = ey - y at tile-centred pixel x, y.
            sum_dx, sum_dy = ex * m0 - mx, ey * m0 - my
            sum_dxdx = ex * ex * m0 - 2 * ex * mx + mxx
            sum_dxdy = ex * ey * m0 - ex * my - ey * mx + mxy
            sum_dydy = ey * ey * m0 - 2 * ey * my + myy
            row_grads = torch.cat(
                [
                    torch.stack(
                        [
                            -(ca * sum_dx + cb * sum_dy), -(cb * sum_dx + cc * sum_dy),
                            -0.5 * sum_dxdx, -sum_dxdy, -0.5 * sum_dydy, m0,
                        ], dim=-1,
                    ),
                    grad_colours,
                ], dim=-1,
            )  # fmt: skip
            ids = rows.ids.reshape(-1)
            grads.index_add_(0, ids, row_grads.reshape(n * slots, -1))
            if abs_means2d is not None:
                dx = ex[..., None] - basis[:, 1]  # [R, B, P]
                dy = ey[..., None] - basis[:, 2]
                abs_x = (grad_exponent * (ca[..., None] * dx + cb[..., None] * dy)).abs_().sum(-1)
                abs_y = (grad_exponent * (cb[..., None] * dx + cc[..., None] * dy)).abs_().sum(-1)
                abs_means2d.index_add_(0, ids, torch.stack([abs_x, abs_y], -1).reshape(-1, 2))

        shape = means2d.shape[:2]
        if abs_means2d is not None:
            means2d.absgrad = abs_means2d[:-1].reshape(shape + (2,))
        grads = grads[:-1]
        grad_opacities = grads[:, 5].reshape(shape) / opacities.detach().clamp_min(torch.finfo(dtype).tiny)
        return (
            grads[:, 0:2].reshape(shape + (2,)),
            grads[:, 2:5].reshape(shape + (3,)),
            grads[:, 6:].reshape(colors.shape),
            grad_opacities,
            None,
            None,
        )


def _inside_pixels(bins: TileBins, width: int, height: int, device: torch.device) -> torch.Tensor:
    """[tile_height * tile_width, P] bool: which pixels of each tile lie inside the image."""
    size = bins.tile_size
    rows = torch.arange(bins.tile_height * size, device=device) < height
    cols = torch.arange(bins.tile_width * size, device=device) < width
    grid = rows[:, None] & cols[None, :]
    return grid.reshape(bins.tile_height, size, bins.tile_width, size).permute(0, 2, 1, 3).reshape(-1, size * size)


def _untile(tiles: torch.Tensor, bins: TileBins, n_cameras: int, width: int, height: int) -> torch.Tensor:
    """[C * tiles, P, D] -> [C, H, W, D]."""
    size, channels = bins.tile_size, tiles.shape[-1]
    image = tiles.reshape(n_cameras, bins.tile_height, bins.tile_width, size, size, channels)
    image = image.permute(0, 1, 3, 2, 4, 5)
    image = image.reshape(n_cameras, bins.tile_height * size, bins.tile_width * size, channels)
    return image[:, :height, :width].contiguous()


def _tile(image: torch.Tensor, bins: TileBins) -> torch.Tensor:
    """[C, H, W, D] -> [C * tiles, P, D] (zero-padded past the border)."""
    n_cameras, height, width, channels = image.shape
    size = bins.tile_size
    padded = image.new_zeros(n_cameras, bins.tile_height * size, bins.tile_width * size, channels)
    padded[:, :height, :width] = image
    padded = padded.reshape(n_cameras, bins.tile_height, size, bins.tile_width, size, channels)
    return padded.permute(0, 1, 3, 2, 4, 5).reshape(-1, size * size, channels)


def composite(
    means2d: torch.Tensor,
    conics: torch.Tensor,
    colors: torch.Tensor,
    opacities: torch.Tensor,
    bins: TileBins,
    width: int,
    height: int,
    block: int = 32,
    absgrad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite binned Gaussians front to back (differentiable in all four tensors).

    Args:
        means2d: [C, N, 2]. conics: [C, N, 3]. colors: [C, N, D]. opacities: [C, N].
        bins: the output of ``bin_gaussians`` for these Gaussians. width, height: image size.
        block: slots per row (B). absgrad: also store ``means2d.absgrad`` [C, N, 2] in backward.

    Returns:
        colours [C, H, W, D] (``sum w c``, no background) and alphas [C, H, W, 1] (``1 - T_final``).
    """
    plan = CompositingPlan(bins=bins, width=width, height=height, block=block)
    return CompositeGaussians.apply(means2d, conics, colors, opacities, plan, absgrad)
