"""Distilling a 2D diffusion SR prior into a high-resolution 3DGS, one module per method.

* ``sds.py``: GaussianSR (score distillation with timestep annealing and Gaussian dropout);
* ``consistent.py``: 3DSR (diffusion steps interleaved with 3DGS fits);
* ``baselines.py``: SR -> 3DGS (per-view 2D SR, then a fit).

Each takes the LR 3DGS, the LR views and an ``SRPrior`` and returns a ``DistillResult``.
"""

from gsr_core.distill.baselines import SRThenFitSettings, sr_then_fit
from gsr_core.distill.common import DistillResult, HRFitSettings
from gsr_core.distill.consistent import ThreeDSRSettings, three_dsr
from gsr_core.distill.sds import GaussianSRSettings, gaussiansr

METHODS = {
    "gaussiansr": (GaussianSRSettings, gaussiansr),
    "3dsr": (ThreeDSRSettings, three_dsr),
    "sr_then_fit": (SRThenFitSettings, sr_then_fit),
}

__all__ = ["METHODS", "DistillResult", "HRFitSettings", "GaussianSRSettings", "ThreeDSRSettings",
           "SRThenFitSettings", "gaussiansr", "three_dsr", "sr_then_fit"]
