"""``rasterize``: gsplat's ``rasterization`` contract (``packed=False``) with a CUDA and a pure-PyTorch backend."""

from __future__ import annotations

from typing import Any, Literal

import torch

from gsr_core.render.binning import bin_gaussians, drop_invisible_pairs
from gsr_core.render.compositing import composite
from gsr_core.render.gsplat_backend import gsplat_available, rasterize_with_gsplat
from gsr_core.render.projection import project_gaussians
from gsr_core.render.spherical_harmonics import MAX_SH_DEGREE, sh_to_colors

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
Backend = Literal["auto", "torch", "gsplat"]
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
BACKENDS = ("auto", "torch", "gsplat")
# Tile side and Gaussians per tile per wave of the torch backend (tuned with benchmarks/bench_rasterizer.py).
TILE_SIZE = 8
WAVE_BLOCK = 32


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    backgrounds: torch.Tensor | None = None,
    render_mode: RenderMode = "RGB",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    absgrad: bool = False,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Render N 3D Gaussians into C pinhole cameras, as ``gsplat.rasterization(..., packed=False)`` does.

    EWA projection with an ``eps2d`` screen-space blur, opacity-aware 3.33-sigma radii, tile binning, then per
    pixel front-to-back compositing by depth: ``alpha = min(0.999, o exp(-sigma))``, Gaussians with
    ``alpha < 1/255`` skipped, a pixel stops before its transmittance would drop to ``<= 1e-4``.
    Differentiable with respect to means, quats, scales, opacities, colors (or SH) and backgrounds.

    Args:
        means: [N, 3] centres (world).
        quats: [N, 4] rotations, wxyz, any length (normalised here).
        scales: [N, 3] standard deviations along the rotated axes (activated, not log).
        opacities: [N] in [0, 1] (activated, not logit).
        colors: without ``sh_degree``: [N, D] or [C, N, D] features; with it: [N, K, 3] or [C, N, K, 3] SH
            coefficients, K >= (sh_degree + 1)^2, evaluated at the direction from each camera centre.
        viewmats: [C, 4, 4] world-to-camera transforms (OpenCV axes).
        Ks: [C, 3, 3] intrinsics (pixel corners on integers, centres at +0.5).
        width, height: image size in pixels.
        sh_degree: None for plain features, else the SH degree in [0, 3].
        backgrounds: [C, D] colour behind the Gaussians (D = 3 with SH); None for black.
        render_mode: "RGB" features; "D" accumulated depth ``sum w z``; "ED" expected depth
            ``sum w z / sum w``; "RGB+D" / "RGB+ED" features with the depth as the last channel.
        near_plane, far_plane: camera-space depth range kept (near_plane > 0).
        eps2d: variance (pixels^2) added to every projected 2D covariance (0.3: at least ~1 pixel wide).
        absgrad: store the summed absolute screen-space gradients in ``info["means2d"].absgrad`` (AbsGS).
        backend: "torch" (this package, any device), "gsplat" (gsplat's CUDA kernels) or "auto" (gsplat when
            the tensors are on CUDA and gsplat imports, else torch).

    Returns:
        colors: [C, H, W, X] with X = D for "RGB", 1 for "D"/"ED", D + 1 for "RGB+D"/"RGB+ED".
        alphas: [C, H, W, 1] accumulated opacity.
        info: gsplat's meta for ``packed=False``: ``radii`` [C, N, 2] int32 (0 = culled), ``means2d`` [C, N, 2]
            (its ``.grad`` is filled by backward; retained when it requires grad), ``depths`` [C, N], ``conics``
            [C, N, 3], ``opacities`` [C, N], ``tiles_per_gauss`` [C, N], ``isect_ids`` [M], ``flatten_ids`` [M],
            ``isect_offsets`` [C, tile_height, tile_width], ``tile_width``, ``tile_height``, ``tile_size``,
            ``width``, ``height``, ``n_cameras``, ``n_batches`` (1), and ``batch_ids``, ``camera_ids``,
            ``gaussian_ids`` (None when not packed).
    """
    n_cameras, n_channels = _check_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds
    )
    if render_mode not in RENDER_MODES:
        raise ValueError(f"`render_mode` must be one of {RENDER_MODES}, got {render_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if not near_plane > 0 or not far_plane > near_plane:
        raise ValueError(f"need 0 < `near_plane` < `far_plane`, got near_plane={near_plane}, far_plane={far_plane}")
    if not eps2d >= 0:
        raise ValueError(f"`eps2d` must be >= 0, got {eps2d}")

    if backend == "gsplat" or (backend == "auto" and means.device.type == "cuda" and gsplat_available()):
        return rasterize_with_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree,
            backgrounds=backgrounds, render_mode=render_mode, absgrad=absgrad,
        )  # fmt: skip

    projection = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane
    )
    depths = projection.depths
    if render_mode in ("D", "ED"):
        features = depths[..., None]  # [C, N, 1]
    else:
        features = _features(means, colors, viewmats, sh_degree, n_cameras)  # [C, N, D]
        if render_mode != "RGB":
            features = torch.cat([features, depths[..., None]], dim=-1)

    bins = bin_gaussians(projection.means2d, projection.radii, depths, width, height, TILE_SIZE)
    opacities_per_camera = opacities[None, :].expand(n_cameras, -1)  # [C, N]
    means2d = projection.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    visible_pairs = drop_invisible_pairs(bins, means2d, projection.conics, opacities_per_camera)
    rendered, alphas = composite(
        means2d, projection.conics, features, opacities_per_camera, visible_pairs, width, height, WAVE_BLOCK, absgrad
    )
    if backgrounds is not None and render_mode not in ("D", "ED"):  # depth composites over zero, as in gsplat
        depth_padding = backgrounds.new_zeros(n_cameras, rendered.shape[-1] - n_channels)
        background = torch.cat([backgrounds, depth_padding], dim=-1)
        rendered = rendered + (1.0 - alphas) * background[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        rendered = torch.cat([rendered[..., :-1], rendered[..., -1:] / alphas.clamp_min(1e-10)], dim=-1)

    info = {
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": projection.radii,
        "means2d": means2d,
        "depths": depths,
        "conics": projection.conics,
        "opacities": opacities_per_camera,
        "tile_width": bins.tile_width,
        "tile_height": bins.tile_height,
        "tiles_per_gauss": bins.tiles_per_gauss,
        "isect_ids": bins.isect_ids,
        "flatten_ids": bins.flatten_ids,
        "isect_offsets": bins.isect_offsets,
        "width": width,
        "height": height,
        "tile_size": bins.tile_size,
        "n_batches": 1,
        "n_cameras": n_cameras,
    }
    return rendered, alphas, info


def _features(means, colors, viewmats, sh_degree, n_cameras) -> torch.Tensor:
    """[C, N, D] per-camera features: SH evaluated from each camera centre, or the given features broadcast."""
    if sh_degree is None:
        return colors if colors.ndim == 3 else colors[None].expand(n_cameras, -1, -1)
    camera_centres = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = means[None, :, :] - camera_centres[:, None, :]  # [C, N, 3]
    coeffs = colors if colors.ndim == 4 else colors[None]
    return sh_to_colors(sh_degree, dirs, coeffs)


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds):
    """Validate shapes, dtypes and devices; return (C, number of colour channels)."""
    named = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
             "viewmats": viewmats, "Ks": Ks}  # fmt: skip
    if backgrounds is not None:
        named["backgrounds"] = backgrounds
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {tensor.dtype}")
        if tensor.dtype != means.dtype or tensor.device != means.device:
            raise TypeError(
                f"`{name}` must match `means` ({means.dtype} on {means.device}), got {tensor.dtype} on {tensor.device}"
            )
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"`means` must have shape [N, 3], got {_shape(means)}")
    n = means.shape[0]
    for name, tensor, expected in (("quats", quats, [n, 4]), ("scales", scales, [n, 3]), ("opacities", opacities, [n])):
        if _shape(tensor) != expected:
            raise ValueError(f"`{name}` must have shape {expected} (N = {n} from `means`), got {_shape(tensor)}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"`viewmats` must have shape [C, 4, 4], got {_shape(viewmats)}")
    c = viewmats.shape[0]
    if _shape(Ks) != [c, 3, 3]:
        raise ValueError(f"`Ks` must have shape [C, 3, 3] (C = {c} from `viewmats`), got {_shape(Ks)}")
    if sh_degree is None:
        if not (colors.ndim == 2 and colors.shape[0] == n) and not (colors.ndim == 3 and colors.shape[:2] == (c, n)):
            raise ValueError(
                f"`colors` must have shape [N, D] or [C, N, D] (N = {n}, C = {c}) when `sh_degree` is None, "
                f"got {_shape(colors)}"
            )
        channels = colors.shape[-1]
    else:
        if isinstance(sh_degree, bool) or not isinstance(sh_degree, int) or not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"`sh_degree` must be None or an int in [0, {MAX_SH_DEGREE}], got {sh_degree!r}")
        leading_ok = (colors.ndim == 3 and colors.shape[0] == n) or (colors.ndim == 4 and colors.shape[:2] == (c, n))
        if not leading_ok or colors.shape[-1] != 3 or colors.shape[-2] < (sh_degree + 1) ** 2:
            raise ValueError(
                f"`colors` must be SH coefficients [N, K, 3] or [C, N, K, 3] with K >= {(sh_degree + 1) ** 2} "
                f"for sh_degree={sh_degree} (N = {n}, C = {c}), got {_shape(colors)}"
            )
        channels = 3
    if backgrounds is not None and _shape(backgrounds) != [c, channels]:
        raise ValueError(f"`backgrounds` must have shape [C, D] = {[c, channels]}, got {_shape(backgrounds)}")
    return c, channels
