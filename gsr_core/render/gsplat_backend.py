"""The ``gsplat`` backend: gsplat's CUDA ``rasterization`` with ``packed=False``, imported lazily."""

from __future__ import annotations

import torch


def gsplat_available() -> bool:
    """True when gsplat imports (its CUDA kernels still need a CUDA device to run)."""
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def rasterize_with_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **options):
    """Call ``gsplat.rasterization(..., packed=False)``; options are passed through by name."""
    try:
        from gsplat import rasterization
    except ImportError as error:
        raise ValueError(
            "`backend='gsplat'` needs the gsplat package (pip install gsplat==1.5.3); "
            "use `backend='torch'` on machines without it"
        ) from error
    if means.device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"`backend='gsplat'` runs gsplat's CUDA kernels and needs tensors on a CUDA device, got {means.device}; "
            "use `backend='torch'` (or 'auto') on CPU"
        )
    return rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, packed=False, **options
    )
