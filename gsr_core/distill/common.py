"""What the distillation methods share: settings of the HR optimisation, the LR/HR losses, the result.

Every method starts from the LR 3DGS and optimises it at HR with ``gsr_core.fit.fit`` (``render_scale`` =
the prior's scale) under its own objective; all keep the LR consistency term ``||down(R_i) - L_i||`` with
``down`` the pipelines' area downsampling, so the HR scene still explains the captured LR images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from gsr_core.data.views import Views
from gsr_core.fit import FitConfig, resolve_background
from gsr_core.gaussians import Gaussians
from gsr_core.images import composite_over, to_model_range
from gsr_core.metrics import ssim
from gsr_core.priors.base import SRPrior

Progress = Callable[[dict[str, Any]], None]


class HRFitSettings(BaseModel):
    """How a method optimises the Gaussians at HR (a subset of ``FitConfig``; the rest keeps its defaults)."""

    model_config = ConfigDict(extra="forbid")
    iterations: int = Field(600, ge=1, description="optimisation steps (3DSR: per diffusion step)")
    grow_grad2d: float = Field(2e-4, gt=0, description="screen-space gradient above which Gaussians grow")
    densify_fraction: float = Field(0.5, ge=0, le=1, description="densify during this first fraction of the steps")
    means_lr: float = Field(1.6e-5, gt=0, description="means' learning rate (x scene extent); 10x below a fit "
                                                      "from scratch, as the LR 3DGS is already in place")
    sh_degree: int = Field(3, ge=0, le=3)
    backend: Literal["auto", "torch", "gsplat"] = "auto"
    device: str = "auto"
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)

    def fit_config(self, iterations: int | None = None) -> FitConfig:
        """A ``FitConfig`` fine-tuning from an initial 3DGS: full SH degree at once, no opacity reset."""
        steps = self.iterations if iterations is None else iterations
        stop = int(round(steps * self.densify_fraction))
        return FitConfig(
            iterations=steps, sh_degree=self.sh_degree, sh_degree_interval=1, backend=self.backend,
            device=self.device, seed=self.seed, grow_grad2d=self.grow_grad2d, refine_start=min(stop, max(1, steps // 20)),
            refine_stop=stop, refine_every=max(1, min(100, stop // 5)), reset_every=steps + 1,
            lrs={"means": self.means_lr}, checkpoint_every=self.checkpoint_every, background="auto",
        )


@dataclass
class DistillResult:
    """A distilled HR 3DGS and how it was made."""

    gaussians: Gaussians
    seconds: float
    history: list[dict[str, float]] = field(repr=False)
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: seconds, num_gaussians and the method's stats."""
        return {"seconds": self.seconds, "num_gaussians": len(self.gaussians), **self.stats}


def area_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[B,H,W,3] -> [B,H/f,W/f,3]: mean of each f x f block (the pipelines' 'area' filter), differentiable."""
    return F.avg_pool2d(images.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1)


def photometric(estimate: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """``(1 - delta) L1 + delta (1 - SSIM)`` of [B,H,W,3] images (3DGS's loss; 3DSR's L_a)."""
    loss = (estimate - target).abs().mean()
    if delta > 0:
        loss = (1 - delta) * loss + delta * (1 - ssim(estimate, target).mean())
    return loss


def composited(images: torch.Tensor, ids: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """Straight-alpha [V,H,W,4] images ``ids`` over ``backgrounds`` [B,3] -> [B,H,W,3]."""
    return composite_over(images[ids], backgrounds[:, None, None, :])


def psnr_of(estimate: torch.Tensor, target: torch.Tensor) -> float:
    mse = float((estimate.detach().clamp(0, 1) - target).square().mean())
    return -10.0 * torch.log10(torch.tensor(max(mse, 1e-20))).item()


class HRAndLRObjective:
    """``L = L_hr(H_i, R_i) + lambda_lr L_lr(L_i, down(R_i))`` with ``L_a = (1 - delta) L1 + delta D-SSIM``.

    3DSR's per-step loss and the SR -> 3DGS baseline's. ``hr`` [V,H,W,3] are the HR targets (opaque, already
    over the background), ``lr`` [V,h,w,4] the captured LR images (straight alpha).
    """

    def __init__(self, hr: torch.Tensor, lr: torch.Tensor, factor: int, lambda_lr: float, delta: float):
        self.hr, self.lr, self.factor, self.lambda_lr, self.delta = hr, lr, factor, lambda_lr, delta

    def __call__(self, rendered, ids, backgrounds, step):
        lr_target = composited(self.lr, ids, backgrounds)
        down = area_downsample(rendered, self.factor)
        hr_loss = photometric(rendered, self.hr[ids], self.delta)
        lr_loss = photometric(down, lr_target, self.delta)
        return hr_loss + self.lambda_lr * lr_loss, {
            "hr_loss": float(hr_loss.detach()), "lr_loss": float(lr_loss.detach()), "psnr": psnr_of(down, lr_target),
            "hr_psnr": psnr_of(rendered, self.hr[ids])}


def lr_model_inputs(prior: SRPrior, lr: torch.Tensor, views: Views) -> torch.Tensor:
    """The LR train images [V,h,w,4] over the background the fit uses, as prior inputs [V,3,h,w] in [-1,1]."""
    background = resolve_background("auto", views)
    background = torch.zeros(3) if background is None else background
    return to_model_range(composite_over(lr, background)).to(prior.device, prior.dtype)


def batched(conditions: list):
    """One conditioning for a batch of views: tensors are concatenated; other (prior-specific) ones need batch 1."""
    if len(conditions) == 1:
        return conditions[0]
    if all(torch.is_tensor(c) for c in conditions):
        return torch.cat(conditions)
    raise ValueError("this prior's conditioning cannot be batched: use batch size 1")


class Stopwatch:
    """Wall time that survives a resume: seconds recorded before plus this process's."""

    def __init__(self, before: float = 0.0):
        self.before, self.started = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started
