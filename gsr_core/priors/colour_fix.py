"""Colour correction of super-resolved images against their LR inputs (StableSR's ``colorfix_type``).

Diffusion SR drifts in colour; both fixes take the colours of a *reference* (the LR image upsampled to the
output's size) and the detail of the *image*:

- ``adain``: per image and channel, the image's mean and standard deviation are replaced by the reference's
  (adaptive instance normalisation; unbiased variance plus ``eps``, as StableSR).
- ``wavelet``: an a-trous wavelet decomposition (``levels`` passes of a 3x3 binomial blur, dilation 2^i, edges
  replicated) splits each image into a low-frequency residual and the sum of its detail bands; the result is the
  image's detail bands plus the reference's low-frequency residual.

Shapes: images [B,C,H,W]; ``adain`` accepts a reference of any size, ``wavelet`` needs the image's size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ColourFix = Literal["adain", "wavelet", "none"]
COLOUR_FIXES = ("adain", "wavelet", "none")


def _mean_std(images: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel mean and sqrt(unbiased variance + eps), each [B,C,1,1]."""
    flat = images.flatten(2)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain(images: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``images`` [B,C,H,W] with each channel's mean and std replaced by ``reference``'s [B,C,h,w]."""
    _check_pair(images, reference, same_size=False)
    mean, std = _mean_std(images, eps)
    ref_mean, ref_std = _mean_std(reference, eps)
    return (images - mean) / std * ref_std + ref_mean


def wavelet_blur(images: torch.Tensor, dilation: int) -> torch.Tensor:
    """[B,C,H,W] blurred by the 3x3 binomial kernel [1,2,1]^T[1,2,1]/16 with ``dilation``, edges replicated."""
    taps = torch.tensor([0.25, 0.5, 0.25], dtype=images.dtype, device=images.device)
    kernel = (taps[:, None] * taps[None, :]).expand(images.shape[1], 1, 3, 3)
    padded = F.pad(images, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=images.shape[1], dilation=dilation)


def wavelet_decompose(images: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(detail, residual), each [B,C,H,W], with detail + residual = images; residual is ``levels`` blurs deep."""
    if levels < 1:
        raise ValueError(f"`levels` must be >= 1, got {levels}")
    residual = images
    for level in range(levels):
        residual = wavelet_blur(residual, 2 ** level)
    return images - residual, residual


def wavelet_fix(images: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """``images``' detail bands plus ``reference``'s low-frequency residual (both [B,C,H,W])."""
    _check_pair(images, reference, same_size=True)
    detail, _ = wavelet_decompose(images, levels)
    _, low = wavelet_decompose(reference, levels)
    return detail + low


def colour_fix(images: torch.Tensor, reference: torch.Tensor, mode: ColourFix) -> torch.Tensor:
    """``images`` [B,C,H,W] recoloured after ``reference`` by ``mode`` ('adain', 'wavelet' or 'none')."""
    if mode == "adain":
        return adain(images, reference)
    if mode == "wavelet":
        return wavelet_fix(images, reference)
    if mode == "none":
        return images
    raise ValueError(f"colour fix `mode` must be one of {COLOUR_FIXES}, got {mode!r}")


def _check_pair(images: torch.Tensor, reference: torch.Tensor, same_size: bool) -> None:
    if images.dim() != 4 or reference.dim() != 4 or images.shape[:2] != reference.shape[:2]:
        raise ValueError(f"colour fix: `images` and `reference` must be [B,C,H,W] with equal B and C, got "
                         f"{tuple(images.shape)} and {tuple(reference.shape)}")
    if same_size and images.shape[-2:] != reference.shape[-2:]:
        raise ValueError(f"colour fix: the wavelet fix needs `reference` at the images' size "
                         f"{tuple(images.shape[-2:])}, got {tuple(reference.shape[-2:])}")
