"""The "SR -> 3DGS" baseline: super-resolve every LR train view with the prior, then fit the 3DGS at HR.

Each LR train view is upscaled independently (``prior.upscale``, seeded per view); the LR 3DGS is then
optimised at HR on ``L_hr(H_i, R_i) + lambda L_lr(L_i, down(R_i))`` like one 3DSR stage, so the baseline
differs from 3DSR only in that its targets never see the 3D model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field

from gsr_core.arguments import resolve_device
from gsr_core.data.views import Views
from gsr_core.distill.common import DistillResult, HRAndLRObjective, HRFitSettings, Progress, lr_model_inputs
from gsr_core.fit import fit, train_images
from gsr_core.gaussians import Gaussians
from gsr_core.images import from_model_range
from gsr_core.priors.base import SRPrior

TARGETS_FILE = "sr-targets.pt"


class SRThenFitSettings(HRFitSettings):
    """The baseline's settings (beside the HR optimisation's)."""

    sample_steps: int | None = Field(None, ge=1, description="prior sampling steps per view (None: its default)")
    lambda_lr: float = Field(1.0, ge=0, description="weight of the LR consistency term")
    delta: float = Field(0.2, ge=0, le=1, description="D-SSIM weight in L_a")


def sr_then_fit(gaussians: Gaussians, views: Views, prior: SRPrior, settings: SRThenFitSettings, *,
                checkpoint_dir: str | Path | None = None, progress: Progress | None = None) -> DistillResult:
    """2D SR of every LR train view, then the HR fit from ``gaussians``; the SR images are checkpointed."""
    started = time.perf_counter()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    lr = train_images(views)
    cached = folder / TARGETS_FILE if folder is not None else None
    if cached is not None and cached.is_file():
        saved = torch.load(cached, map_location="cpu", weights_only=True)
        targets, sr_seconds = saved["targets"], saved["seconds"]
    else:
        targets = upscale_each(prior, lr_model_inputs(prior, lr, views), settings.sample_steps, settings.seed)
        sr_seconds = time.perf_counter() - started
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"targets": targets, "seconds": sr_seconds}, cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").replace(cached)
    device = resolve_device(settings.device)
    objective = HRAndLRObjective(targets.to(device), lr.to(device), prior.scale, settings.lambda_lr, settings.delta)
    result = fit(views, settings.fit_config(), checkpoint_dir=folder / "fit" if folder else None, init=gaussians,
                 objective=objective, render_scale=prior.scale, progress=progress)
    # Wall time of the 2D SR (recorded with the targets) and of the fit (its own total, over resumes too).
    return DistillResult(result.gaussians, sr_seconds + result.seconds, result.history,
                         {"method": "sr_then_fit", "lr_psnr": result.train_psnr})


def upscale_each(prior: SRPrior, lr_inputs: torch.Tensor, steps: int | None, seed: int) -> torch.Tensor:
    """[V,3,h,w] prior inputs -> [V,H,W,3] in [0,1], view i sampled with seed + i."""
    images = []
    for index, lr_input in enumerate(lr_inputs):
        generator = torch.Generator(prior.device).manual_seed(seed + index)
        with torch.no_grad():
            images.append(from_model_range(prior.upscale(lr_input[None], steps, generator).float().cpu())[0])
    return torch.stack(images)
