"""Full-reference image quality: PSNR and SSIM, per image, on the renderer layout.

Both take two batches ``a`` and ``b`` of shape [C, H, W, 3] (C images, float, nominally in [0, 1]) and return
one value per image, shape [C]. The range is not enforced: renders of a Gaussian scene may overshoot [0, 1]
before clamping, and ``ssim`` doubles as a fitting loss on such renders.

* ``psnr`` uses a data range of 1: ``-10 log10(mean((a - b)^2))`` over the H x W x 3 values of each image.
  Identical images have an MSE of 0 and a PSNR of ``+inf`` (not an error, not a cap).
* ``ssim`` is the Gaussian-window SSIM reported by 3D Gaussian Splatting papers (the Inria 3DGS evaluation):
  an 11 x 11 Gaussian window with sigma 1.5 applied to each colour channel separately, zero padding of 5
  pixels so the SSIM map has the image size, ``C1 = 0.01^2``, ``C2 = 0.03^2`` (data range 1), and the mean
  over the whole map and the three channels. It is differentiable (autograd), for the
  ``0.8 L1 + 0.2 (1 - SSIM)`` fitting loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gsr_core.images import to_channels_first

SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def check_image_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise TypeError/ValueError unless ``a`` and ``b`` are float [C, H, W, 3] of one shape, dtype and device."""
    for name, image in zip(names, (a, b)):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape [C, H, W, 3], got {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor in [0, 1], got dtype {image.dtype}")
        if image.ndim != 4 or image.shape[-1] != 3 or min(image.shape) == 0:
            hint = " (one image [H, W, 3]? pass `image[None]`)" if image.ndim == 3 else ""
            raise ValueError(
                f"`{name}` must have shape [C, H, W, 3] with C, H, W >= 1, got {list(image.shape)}{hint}"
            )
    if a.shape != b.shape:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same shape, got {list(a.shape)} and {list(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"`{names[0]}` and `{names[1]}` must have one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"`{names[0]}` and `{names[1]}` must be on one device, got {a.device} and {b.device}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB with data range 1, per image.

    Args:
        a: [C, H, W, 3] float images in [0, 1].
        b: [C, H, W, 3] float images in [0, 1].

    Returns:
        [C] ``-10 log10(MSE)`` of each image pair; ``+inf`` where the two images are identical.
    """
    check_image_pair(a, b)
    mse = (a - b).square().mean(dim=(1, 2, 3))
    return -10.0 * torch.log10(mse)


def gaussian_window_1d(
    size: int = SSIM_WINDOW_SIZE,
    sigma: float = SSIM_SIGMA,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[size] normalised Gaussian weights centred on index ``size // 2`` (the 1D factor of the SSIM window)."""
    offsets = torch.arange(size, dtype=dtype, device=device) - size // 2
    weights = torch.exp(-offsets.square() / (2.0 * sigma**2))
    return weights / weights.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Gaussian-window SSIM map of each image pair and colour channel.

    Args:
        a: [C, H, W, 3] float images in [0, 1].
        b: [C, H, W, 3] float images in [0, 1].

    Returns:
        [C, 3, H, W] local SSIM (window, padding and constants as in the module docstring).
    """
    check_image_pair(a, b)
    x, y = to_channels_first(a), to_channels_first(b)
    g = gaussian_window_1d(dtype=a.dtype, device=a.device)
    # The five local statistics E[x], E[y], E[x^2], E[y^2], E[xy] of every colour plane in one depthwise
    # convolution (15 groups). On CPU one 11 x 11 depthwise pass is faster than two separable 1D passes.
    planes = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    window = torch.outer(g, g).expand(planes.shape[1], 1, SSIM_WINDOW_SIZE, SSIM_WINDOW_SIZE)
    moments = F.conv2d(planes, window, padding=SSIM_WINDOW_SIZE // 2, groups=planes.shape[1])
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = moments.split(3, dim=1)
    variance_x = mean_xx - mean_x.square()
    variance_y = mean_yy - mean_y.square()
    covariance = mean_xy - mean_x * mean_y
    numerator = (2.0 * mean_x * mean_y + SSIM_C1) * (2.0 * covariance + SSIM_C2)
    denominator = (mean_x.square() + mean_y.square() + SSIM_C1) * (variance_x + variance_y + SSIM_C2)
    return numerator / denominator


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image: the mean of ``ssim_map`` over its 3 channels and H x W pixels.

    Args:
        a: [C, H, W, 3] float images in [0, 1].
        b: [C, H, W, 3] float images in [0, 1].

    Returns:
        [C] SSIM of each pair, 1 for identical images; differentiable with respect to ``a`` and ``b``.
    """
    return ssim_map(a, b).mean(dim=(1, 2, 3))
