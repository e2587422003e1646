"""GaussianSR (Yu et al., arXiv 2406.10111): score distillation of a 2D SR prior into the HR 3DGS.

Each step renders a training view at HR, x0 = C_theta(pi) [B,H,W,3], and minimises

    L = L_lr(Downsample(x0), x_lr) + lambda_sds * L_SDS

with ``L_lr = (1 - delta) L1 + delta D-SSIM`` (the LR consistency term) and the SDS gradient
``w(t) (eps_hat(z_t; x_lr, t) - eps)`` pushed into z0 = encode(x0) (a VAE latent, SR3's scaled residual)
and from there through the render to the Gaussians. It is written once as the detached-target trick:
``L_SDS = 0.5 mean((z0 - sg[z0 - w(t)(eps_hat - eps)])^2)``, whose gradient w.r.t. z0 is the SDS gradient
divided by the element count (so ``lambda_sds`` is on the scale of a per-pixel loss).

Timestep annealing: ``t ~ U(LB(i), t_max)`` with ``LB(i)`` falling linearly from ``t_max`` at the first step to
``t_min`` at the last (large noise early: coarse structure first, detail later); ``annealing: false`` samples
``U(t_min, t_max)`` throughout. ``t_min``/``t_max`` are fractions of the prior's training timesteps.

w(t): ``constant`` (1), ``one_minus_alpha`` (1 - alpha_bar_t, DreamFusion's choice), or ``sqrt_one_minus_alpha``.

Gaussian dropout (``dropout`` = p): densification grows each candidate with probability 1 - p
(``gsr_core.strategy.dropout``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from gsr_core.data.views import Views
from gsr_core.arguments import resolve_device
from gsr_core.distill.common import (DistillResult, HRFitSettings, Progress, area_downsample, batched, composited,
                                     lr_model_inputs, photometric, psnr_of)
from gsr_core.fit import fit, train_images
from gsr_core.gaussians import Gaussians
from gsr_core.images import to_model_range
from gsr_core.priors.base import SRPrior

Weighting = Literal["constant", "one_minus_alpha", "sqrt_one_minus_alpha"]


class GaussianSRSettings(HRFitSettings):
    """GaussianSR's hyperparameters (beside the HR optimisation's)."""

    iterations: int = Field(800, ge=1, description="optimisation steps, each with one prior evaluation")
    lambda_sds: float = Field(0.1, ge=0, description="weight of the SDS term (per-element mean, see docs)")
    weighting: Weighting = Field("one_minus_alpha", description="w(t)")
    t_min: float = Field(0.02, ge=0, le=1, description="lowest timestep, as a fraction of the prior's T")
    t_max: float = Field(0.5, ge=0, le=1, description="highest timestep, as a fraction of the prior's T")
    annealing: bool = Field(True, description="t ~ U(LB(i), t_max) with LB falling from t_max to t_min")
    dropout: float = Field(0.5, ge=0, lt=1, description="Gaussian dropout p (0: plain densification)")
    delta: float = Field(0.2, ge=0, le=1, description="D-SSIM weight in the LR consistency loss")

    @model_validator(mode="after")
    def _t_range(self) -> "GaussianSRSettings":
        if self.t_min > self.t_max:
            raise ValueError(f"`t_min` ({self.t_min}) must not exceed `t_max` ({self.t_max})")
        return self


class TimestepSchedule:
    """Integer timesteps for step i of n: annealed ``U(LB(i), t_max)`` or plain ``U(t_min, t_max)``."""

    def __init__(self, t_min: int, t_max: int, iterations: int, annealing: bool):
        if t_min > t_max:
            raise ValueError(f"`t_min` ({t_min}) must not exceed `t_max` ({t_max})")
        self.t_min, self.t_max, self.iterations, self.annealing = t_min, t_max, iterations, annealing

    def lower_bound(self, step: int) -> int:
        if not self.annealing:
            return self.t_min
        progress = step / max(1, self.iterations - 1)
        return int(round(self.t_max - (self.t_max - self.t_min) * progress))

    def sample(self, step: int) -> int:
        low = self.lower_bound(step)
        return int(torch.randint(low, self.t_max + 1, ()))


def sds_weight(weighting: Weighting, alpha_bar: float) -> float:
    if weighting == "constant":
        return 1.0
    if weighting == "one_minus_alpha":
        return 1.0 - alpha_bar
    return math.sqrt(1.0 - alpha_bar)


class SDSObjective:
    """GaussianSR's per-step loss (module docstring) for renders of the train views ``ids``."""

    def __init__(self, prior: SRPrior, lr: torch.Tensor, conditions: list, settings: GaussianSRSettings,
                 schedule: TimestepSchedule):
        self.prior, self.lr, self.conditions, self.settings, self.schedule = prior, lr, conditions, settings, schedule

    def __call__(self, rendered, ids, backgrounds, step):
        prior, settings = self.prior, self.settings
        lr_target = composited(self.lr, ids, backgrounds)
        down = area_downsample(rendered, prior.scale)
        lr_loss = photometric(down, lr_target, settings.delta)
        t = self.schedule.sample(step)
        cond = batched([self.conditions[int(i)] for i in ids])
        z0 = prior.encode(to_model_range(rendered).to(prior.device, prior.dtype), cond)
        eps = torch.randn_like(z0)
        with torch.no_grad():
            z_t = prior.add_noise(z0.detach(), eps, t)
            eps_hat = prior.predict_eps(z_t, t, cond)
            weight = sds_weight(settings.weighting, float(prior.alphas_cumprod[t]))
            target = z0.detach() - weight * (eps_hat - eps)
        sds = 0.5 * (z0 - target).square().mean()
        loss = lr_loss + settings.lambda_sds * sds.to(lr_loss.device, lr_loss.dtype)
        return loss, {"lr_loss": float(lr_loss.detach()), "sds": float(sds.detach()), "t": float(t), "psnr": psnr_of(down, lr_target)}


def gaussiansr(gaussians: Gaussians, views: Views, prior: SRPrior, settings: GaussianSRSettings, *,
               checkpoint_dir=None, progress: Progress | None = None) -> DistillResult:
    """Distil ``prior`` into ``gaussians`` (the LR 3DGS) with the LR ``views``' train split; returns the HR 3DGS."""
    lr = train_images(views)
    conditions = [prior.condition(image[None]) for image in lr_model_inputs(prior, lr, views)]
    steps = prior.num_train_timesteps - 1
    schedule = TimestepSchedule(round(settings.t_min * steps), round(settings.t_max * steps), settings.iterations,
                                settings.annealing)
    objective = SDSObjective(prior, lr.to(resolve_device(settings.device)), conditions, settings, schedule)
    result = fit(views, settings.fit_config(), checkpoint_dir=checkpoint_dir, progress=progress, init=gaussians,
                 objective=objective, render_scale=prior.scale, densify_dropout=settings.dropout)
    return DistillResult(result.gaussians, result.seconds, result.history,
                         {"method": "gaussiansr", "densification": result.densification,
                          "lr_psnr": result.train_psnr})
