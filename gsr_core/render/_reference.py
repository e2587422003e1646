"""Brute-force reference twin of ``rasterize`` (tests only): every Gaussian at every pixel, one at a time.

Written for obviousness, not speed: per camera it projects each Gaussian with explicit matrices
(``Sigma_2d = J W Sigma W^T J^T + eps2d I``, ``conic = inv(Sigma_2d)``), evaluates every Gaussian at every pixel
centre, sorts by depth and composites sequentially with gsplat's rules (skip ``alpha < 1/255``, stop before
``T <= 1e-4``). There is no tiling and no bounding box: that the fast path's boxes lose nothing is what the
comparison checks. Differentiable through plain autograd.
"""

from __future__ import annotations

import torch

from gsr_core.render.spherical_harmonics import sh_to_colors


def _rotations(quats: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] rotation matrices of [N, 4] wxyz quaternions."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def reference_project(means, quats, scales, viewmat, K, width, height, eps2d=0.3):
    """Projection of N Gaussians into one camera with explicit 3x3 and 2x3 matrices.

    ``Sigma = (R S)(R S)^T``, ``Sigma_cam = W Sigma W^T``, ``Sigma_2d = J Sigma_cam J^T + eps2d I`` with the
    perspective Jacobian J taken at x/z, y/z clamped to 1.3x the field of view (as 3DGS and gsplat do);
    ``conic = inv(Sigma_2d)``.

    Returns means2d [N, 2], conic matrices [N, 2, 2], depths [N], blurred 2D covariances [N, 2, 2].
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    world_to_camera = viewmat[:3, :3]
    rs = _rotations(quats) @ torch.diag_embed(scales)
    covars_cam = world_to_camera @ (rs @ rs.transpose(-1, -2)) @ world_to_camera.T
    x, y, z = (means @ world_to_camera.T + viewmat[:3, 3]).unbind(-1)
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    tx = z * torch.clamp(x / z, -lim_x_neg, lim_x_pos)
    ty = z * torch.clamp(y / z, -lim_y_neg, lim_y_pos)
    zero = torch.zeros_like(z)
    jacobians = torch.stack(
        [torch.stack([fx / z, zero, -fx * tx / z**2], -1), torch.stack([zero, fy / z, -fy * ty / z**2], -1)], dim=-2
    )  # [N, 2, 3]
    covars2d = jacobians @ covars_cam @ jacobians.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    return means2d, torch.linalg.inv(covars2d), z, covars2d


def reference_radii(covars2d, means2d, depths, opacities, width, height, near_plane=0.01, far_plane=1e10):
    """[N, 2] int32 radii with gsplat's opacity-aware 3.33-sigma box and culling rules."""
    extend = torch.sqrt(2 * torch.log(opacities.clamp_min(1 / 255) * 255)).clamp_max(3.33)
    radii = torch.ceil(extend[:, None] * torch.sqrt(torch.diagonal(covars2d, dim1=-2, dim2=-1)))
    low, high = means2d - radii, means2d + radii
    keep = (depths >= near_plane) & (depths <= far_plane) & (opacities >= 1 / 255)
    keep &= (high[:, 0] > 0) & (low[:, 0] < width) & (high[:, 1] > 0) & (low[:, 1] < height)
    return (radii * keep[:, None]).int()


def reference_composite(means2d, conics, colors, opacities, depths, width, height):
    """Composite every Gaussian over every pixel centre of one camera, front to back, one Gaussian at a time.

    Args: means2d [N, 2], conics [N, 2, 2], colors [N, D], opacities [N], depths [N] (already culled).
    Returns: colours [H, W, D] and alphas [H, W, 1] (no background).
    """
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=means2d.dtype) + 0.5, torch.arange(width, dtype=means2d.dtype) + 0.5, indexing="ij"
    )
    pixels = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [HW, 2]
    transmittance = torch.ones(pixels.shape[0], dtype=means2d.dtype)
    colour = torch.zeros(pixels.shape[0], colors.shape[-1], dtype=means2d.dtype)
    done = torch.zeros(pixels.shape[0], dtype=torch.bool)
    for n in torch.sort(depths.detach().float(), stable=True).indices.tolist():
        dx, dy = (means2d[n] - pixels).unbind(-1)  # [HW] each
        conic = conics[n]
        sigma = 0.5 * (conic[0, 0] * dx * dx + (conic[0, 1] + conic[1, 0]) * dx * dy + conic[1, 1] * dy * dy)
        alpha = torch.clamp_max(opacities[n] * torch.exp(-sigma), 0.999)
        applies = (sigma >= 0) & (alpha >= 1 / 255) & ~done
        next_transmittance = transmittance * (1 - alpha)
        stops = applies & (next_transmittance <= 1e-4)
        done = done | stops
        applies = applies & ~stops
        colour = colour + torch.where(applies[:, None], (alpha * transmittance)[:, None] * colors[n], 0.0)
        transmittance = torch.where(applies, next_transmittance, transmittance)
    return colour.reshape(height, width, -1), (1 - transmittance).reshape(height, width, 1)


@torch.no_grad()
def reference_alphas(means2d, conics, opacities, depths, width, height, chunk=2048):
    """[H, W] alphas of one camera from every Gaussian at every pixel, for large N (no gradients).

    Same rules as ``reference_composite``, written as running products: Gaussians sorted by depth, alphas of a
    chunk of them at all pixels ``[HW, chunk]``, the raw product of ``1 - alpha`` continued across chunks, and a
    Gaussian counts iff that product after it stays above 1e-4.
    """
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=means2d.dtype) + 0.5, torch.arange(width, dtype=means2d.dtype) + 0.5, indexing="ij"
    )
    pixels = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [HW, 2]
    order = torch.sort(depths.float(), stable=True).indices
    raw = torch.ones(pixels.shape[0], dtype=means2d.dtype)
    weight_sum = torch.zeros_like(raw)
    for start in range(0, order.numel(), chunk):
        ids = order[start : start + chunk]
        dx = means2d[ids, 0] - pixels[:, 0, None]  # [HW, chunk]
        dy = means2d[ids, 1] - pixels[:, 1, None]
        conic = conics[ids]
        cross = conic[:, 0, 1] + conic[:, 1, 0]
        sigma = 0.5 * (conic[:, 0, 0] * dx * dx + cross * dx * dy + conic[:, 1, 1] * dy * dy)
        alpha = torch.clamp_max(opacities[ids] * torch.exp(-sigma), 0.999)
        alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, 0.0)
        after = raw[:, None] * torch.cumprod(1 - alpha, dim=1)
        in_front = torch.cat([raw[:, None], after[:, :-1]], dim=1)
        weight_sum += torch.where(after > 1e-4, alpha * in_front, 0.0).sum(1)
        raw = after[:, -1]
        if bool((raw <= 1e-4).all()):
            break
    return weight_sum.reshape(height, width)


def reference_rasterize(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None, backgrounds=None,
    render_mode="RGB", near_plane=0.01, far_plane=1e10, eps2d=0.3,
):  # fmt: skip
    """Brute-force ``rasterize`` (same arguments, same outputs except ``info``, which holds only ``radii``)."""
    rendered, alphas, radii = [], [], []
    for c in range(viewmats.shape[0]):
        means2d, conics, depths, covars2d = reference_project(
            means, quats, scales, viewmats[c], Ks[c], width, height, eps2d
        )
        radii.append(reference_radii(covars2d.detach(), means2d.detach(), depths.detach(), opacities.detach(),
                                     width, height, near_plane, far_plane))  # fmt: skip
        if sh_degree is None:
            features = colors if colors.ndim == 2 else colors[c]
        else:
            centre = -viewmats[c, :3, :3].T @ viewmats[c, :3, 3]
            features = sh_to_colors(sh_degree, means - centre, colors if colors.ndim == 3 else colors[c])
        if render_mode in ("D", "ED"):
            features = depths[:, None]
        elif render_mode in ("RGB+D", "RGB+ED"):
            features = torch.cat([features, depths[:, None]], dim=-1)
        kept = ((depths >= near_plane) & (depths <= far_plane)).nonzero().squeeze(1)
        colour, alpha = reference_composite(
            means2d[kept], conics[kept], features[kept], opacities[kept], depths[kept], width, height
        )
        if backgrounds is not None and render_mode not in ("D", "ED"):
            background = backgrounds[c]
            if render_mode != "RGB":
                background = torch.cat([background, background.new_zeros(1)])
            colour = colour + (1 - alpha) * background
        if render_mode in ("ED", "RGB+ED"):
            colour = torch.cat([colour[..., :-1], colour[..., -1:] / alpha.clamp_min(1e-10)], dim=-1)
        rendered.append(colour)
        alphas.append(alpha)
    return torch.stack(rendered), torch.stack(alphas), {"radii": torch.stack(radii)}
