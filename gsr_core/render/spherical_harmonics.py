"""Real spherical harmonics of degree 0-3 turned into colours, as 3DGS (and gsplat) evaluate them.

The basis is the one of the 3DGS reference implementation (Inria) and gsplat: ``Y_0 = 0.2820947917738781`` and
the degree 1-3 polynomials below, evaluated on unit view directions from the camera centre to each Gaussian.
The colour is ``max(sum_k Y_k(d) coeffs_k + 0.5, 0)``.
"""

from __future__ import annotations

import torch

MAX_SH_DEGREE = 3
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)  # fmt: skip


def sh_bases(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """[..., (degree+1)^2] basis values at [..., 3] directions (normalised here)."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"`sh_degree` must be in [0, {MAX_SH_DEGREE}], got {degree}")
    x, y, z = torch.nn.functional.normalize(dirs, dim=-1).unbind(-1)
    bases = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        bases += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        bases += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(bases, dim=-1)


def sh_to_colors(degree: int, dirs: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Colours from SH coefficients, using the first ``(degree+1)^2`` bases.

    Args:
        degree: SH degree in [0, 3].
        dirs: [..., 3] view directions (camera centre to Gaussian; any length).
        coeffs: [..., K, 3] coefficients with K >= (degree+1)^2; broadcastable against ``dirs``.

    Returns:
        [..., 3] colours ``max(SH(dirs) + 0.5, 0)``.
    """
    n_bases = (degree + 1) ** 2
    bases = sh_bases(degree, dirs)  # [..., n_bases]
    return torch.clamp_min((bases[..., :, None] * coeffs[..., :n_bases, :]).sum(dim=-2) + 0.5, 0.0)
