"""Render a set of Gaussians at any cameras, in batches of cameras so memory stays bounded."""

from __future__ import annotations

from typing import Sequence

import torch

from gsr_core.arguments import resolve_device
from gsr_core.cameras import Camera
from gsr_core.gaussians import Gaussians
from gsr_core.render import rasterize

DEFAULT_CAMERAS_PER_BATCH = 4


def camera_tensors(
    cameras: Sequence[Camera], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The renderer's camera arguments: viewmats [C, 4, 4] and Ks [C, 3, 3] on ``device``."""
    viewmats = torch.stack([camera.world_to_camera for camera in cameras]).to(device, dtype)
    Ks = torch.stack([camera.K for camera in cameras]).to(device, dtype)
    return viewmats, Ks


def background_tensor(background: Sequence[float] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """[3] float32 colour in [0, 1] from three numbers; ValueError otherwise."""
    colour = torch.as_tensor(background, dtype=torch.float32).reshape(-1)
    if colour.shape != (3,) or not bool(((colour >= 0) & (colour <= 1)).all()):
        raise ValueError(f"`background` must be three numbers in [0, 1], got {background!r}")
    return colour.to(device)


def _check_cameras(gaussians: Gaussians, cameras: Sequence[Camera], sh_degree: int | None,
                   cameras_per_batch: int) -> tuple[int, int, int]:
    """(width, height, SH degree) after checking the shared arguments of the render functions."""
    if not cameras:
        raise ValueError("`cameras` must hold at least one camera")
    sizes = {(camera.width, camera.height) for camera in cameras}
    if len(sizes) != 1:
        raise ValueError(f"`cameras` must share one image size, got {sorted(sizes)}")
    if isinstance(cameras_per_batch, bool) or not isinstance(cameras_per_batch, int) or cameras_per_batch < 1:
        raise ValueError(f"`cameras_per_batch` must be a positive int, got {cameras_per_batch!r}")
    degree = gaussians.sh_degree if sh_degree is None else sh_degree
    if not 0 <= degree <= gaussians.sh_degree:
        raise ValueError(f"`sh_degree` must be in [0, {gaussians.sh_degree}] for these Gaussians, got {sh_degree}")
    width, height = sizes.pop()
    return width, height, degree


def _render_batches(gaussians: Gaussians, cameras: Sequence[Camera], width: int, height: int, degree: int,
                    render_mode: str, background: torch.Tensor | None, backend: str, device: torch.device,
                    cameras_per_batch: int):
    """Yield ``rasterize``'s (colors [c, H, W, X], alphas [c, H, W, 1]) for successive batches of cameras."""
    gaussians = gaussians.to(device)
    means, quats = gaussians.means, gaussians.quats
    scales, opacities = torch.exp(gaussians.scales), torch.sigmoid(gaussians.opacities)
    coefficients = gaussians.colors()
    for start in range(0, len(cameras), cameras_per_batch):
        viewmats, Ks = camera_tensors(cameras[start : start + cameras_per_batch], device, means.dtype)
        backgrounds = None if background is None else background.to(means.dtype).expand(viewmats.shape[0], 3)
        rendered, alphas, _ = rasterize(
            means, quats, scales, opacities, coefficients, viewmats, Ks, width, height,
            sh_degree=degree, backgrounds=backgrounds, render_mode=render_mode, backend=backend,
        )  # fmt: skip
        yield rendered, alphas


@torch.no_grad()
def render_views(
    gaussians: Gaussians,
    cameras: Sequence[Camera],
    *,
    background: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
    backend: str = "auto",
    device: str | torch.device = "auto",
    sh_degree: int | None = None,
    cameras_per_batch: int = DEFAULT_CAMERAS_PER_BATCH,
) -> torch.Tensor:
    """Images of ``gaussians`` seen from ``cameras``.

    Args:
        gaussians: N Gaussians (any device; moved to ``device``).
        cameras: C cameras of one image size.
        background: RGB colour behind the Gaussians.
        backend: the rasterizer backend ("auto", "torch", "gsplat").
        device: where to render ("auto": CUDA when available).
        sh_degree: SH degree to evaluate (default: all of ``gaussians``'s).
        cameras_per_batch: cameras rasterized together (bounds memory).

    Returns:
        [C, H, W, 3] float32 on the CPU, clamped to [0, 1].
    """
    width, height, degree = _check_cameras(gaussians, cameras, sh_degree, cameras_per_batch)
    device = resolve_device(device)
    colour = background_tensor(background, device)
    batches = _render_batches(gaussians, cameras, width, height, degree, "RGB", colour, backend, device,
                              cameras_per_batch)
    return torch.cat([rendered.clamp(0.0, 1.0).cpu() for rendered, _ in batches])


@torch.no_grad()
def render_depths(
    gaussians: Gaussians,
    cameras: Sequence[Camera],
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    cameras_per_batch: int = DEFAULT_CAMERAS_PER_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The geometry of ``gaussians`` seen from ``cameras``: expected depth and accumulated opacity.

    Args:
        gaussians: N Gaussians (any device; moved to ``device``).
        cameras: C cameras of one image size.
        backend: the rasterizer backend ("auto", "torch", "gsplat").
        device: where to render ("auto": CUDA when available).
        cameras_per_batch: cameras rasterized together (bounds memory).

    Returns:
        depths: [C, H, W] float32 on the CPU, the expected camera-space depth ``sum w z / sum w`` (render mode
            "ED"; 0 where nothing is drawn).
        alphas: [C, H, W] float32 on the CPU, the accumulated opacity ``sum w``.
    """
    width, height, _ = _check_cameras(gaussians, cameras, 0, cameras_per_batch)
    batches = list(_render_batches(gaussians, cameras, width, height, 0, "ED", None, backend,
                                   resolve_device(device), cameras_per_batch))
    depths = torch.cat([rendered[..., 0].cpu() for rendered, _ in batches])
    alphas = torch.cat([alpha[..., 0].cpu() for _, alpha in batches])
    return depths.float(), alphas.float()
