"""3DSR (Chen et al., ICCV 2025): diffusion sampling interleaved with 3DGS fits, so every view stays consistent.

Each training view i carries its own diffusion variable z_i. Starting from the current 3DGS's HR render noised
to ``t_0`` (SDEdit-style; at t_0 = T-1 it is practically pure noise), for each of the K timesteps
``t_0 > t_1 > ... > t_{K-1}`` (default evenly spaced down to 0, StableSR-Turbo's 999, 666, 333, 0 for K = 4):

1. predict x0 for every view, decode to HR images H_i and apply the prior's colour fix against the LR input;
2. fit the 3DGS for M iterations on ``L = L_hr(H_i, R_i) + lambda L_lr(L_i, down(R_i))`` with
   ``L_a = (1 - delta) L1 + delta D-SSIM`` (lambda = 1, delta = 0.2), densifying in the first half;
3. render R_i at HR, encode, and take the posterior step z_{t_{k+1}} ~ q(. | z_{t_k}, x0 = encode(R_i))
   (DDIM's step with eta; eta = 1 is DDPM's posterior). After the last timestep the 3DGS is the result.

The 3D model is the only thing that crosses from one step to the next, which is what makes the per-view
samples agree. Each stage checkpoints (its fit, then z and the Gaussians when it ends); a crash resumes at the
stage it was in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from gsr_core.arguments import resolve_device
from gsr_core.data.views import Views
from gsr_core.distill.common import (DistillResult, HRAndLRObjective, HRFitSettings, Progress, Stopwatch,
                                     lr_model_inputs)
from gsr_core.fit import fit, resolve_background, train_images
from gsr_core.gaussians import Gaussians
from gsr_core.images import from_model_range, to_model_range
from gsr_core.priors.base import SRPrior
from gsr_core.render_views import render_views

STAGE_FILE = "stage-{:02d}.pt"


class ThreeDSRSettings(HRFitSettings):
    """3DSR's hyperparameters (beside the HR optimisation's; ``iterations`` is M, per diffusion step)."""

    iterations: int = Field(150, ge=1, description="M: 3DGS steps per diffusion step (5000 in the paper)")
    steps: int = Field(4, ge=1, description="K: diffusion steps")
    t_start: float = Field(1.0, gt=0, le=1, description="t_0 as a fraction of the prior's T - 1")
    lambda_lr: float = Field(1.0, ge=0, description="weight of the LR consistency term")
    delta: float = Field(0.2, ge=0, le=1, description="D-SSIM weight in L_a")
    eta: float = Field(1.0, ge=0, le=1, description="posterior step noise (1: DDPM posterior, 0: DDIM)")
    colour_fix: bool = Field(True, description="apply the prior's colour fix to the decoded x0")


def timesteps(prior: SRPrior, settings: ThreeDSRSettings) -> list[int]:
    """``t_0 > ... > t_{K-1}``: K timesteps evenly spaced from round(t_start (T-1)) down to 0."""
    top = round(settings.t_start * (prior.num_train_timesteps - 1))
    if settings.steps == 1:
        return [top]
    return [round(top - k * top / (settings.steps - 1)) for k in range(settings.steps)]


def three_dsr(gaussians: Gaussians, views: Views, prior: SRPrior, settings: ThreeDSRSettings, *,
              checkpoint_dir: str | Path | None = None, progress: Progress | None = None) -> DistillResult:
    """Run 3DSR from ``gaussians`` (the LR 3DGS) on the LR ``views``' train split; returns the HR 3DGS."""
    device = resolve_device(settings.device)
    lr = train_images(views)
    lr_inputs = lr_model_inputs(prior, lr, views)
    conditions = [prior.condition(image[None]) for image in lr_inputs]
    schedule = timesteps(prior, settings)
    cameras = [record.camera.scaled(prior.scale) for record in views.split("train")]
    background = resolve_background("auto", views)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    first, latents, clock, lr_psnr = 0, None, Stopwatch(), float("nan")
    saved = _latest_stage(folder)
    if saved is not None:
        first, history, lr_psnr = saved["stage"] + 1, saved["history"], saved["lr_psnr"]
        latents = [z.to(prior.device, prior.dtype) for z in saved["latents"]]
        gaussians, clock = Gaussians.from_params(saved["gaussians"]), Stopwatch(saved["seconds"])
        generator.set_state(saved["generator"])
    else:
        renders = _render(gaussians, cameras, background, settings, prior)
        latents = [prior.add_noise(z, _noise(z, generator), schedule[0])
                   for z in (prior.encode(image[None], cond) for image, cond in zip(renders, conditions))]
    for stage in range(first, len(schedule)):
        t = schedule[stage]
        targets = _predict_targets(prior, latents, conditions, lr_inputs, t, settings)  # [V,H,W,3]
        objective = HRAndLRObjective(targets.to(device), lr.to(device), prior.scale, settings.lambda_lr,
                                     settings.delta)

        def report(state: dict, stage=stage, t=t) -> None:
            if progress:
                progress({**state, "stage": stage, "t": t, "step": stage * settings.iterations + state["step"],
                          "iterations": len(schedule) * settings.iterations})

        stage_dir = folder / f"fit-{stage:02d}" if folder is not None else None
        result = fit(views, settings.fit_config(), checkpoint_dir=stage_dir, init=gaussians, objective=objective,
                     render_scale=prior.scale, progress=report)
        # The fit's own history holds every step, those before a resume too (progress sees only this call's).
        history.extend({**record, "stage": stage, "t": t} for record in result.history)
        gaussians, lr_psnr = result.gaussians, result.train_psnr
        if stage + 1 < len(schedule):
            renders = _render(gaussians, cameras, background, settings, prior)
            latents = [prior.posterior_step(z, t, schedule[stage + 1], prior.encode(image[None], cond).detach(),
                                            generator=generator, eta=settings.eta)
                       for z, image, cond in zip(latents, renders, conditions)]
        if folder is not None:
            _save_stage(folder, stage, {"latents": [z.cpu() for z in latents], "gaussians": gaussians.params(),
                                        "history": history, "seconds": clock.seconds(), "lr_psnr": lr_psnr,
                                        "generator": generator.get_state()})
    return DistillResult(gaussians, clock.seconds(), history,
                         {"method": "3dsr", "timesteps": schedule, "lr_psnr": lr_psnr})


def _predict_targets(prior: SRPrior, latents: list[torch.Tensor], conditions: list, lr_inputs: torch.Tensor, t: int,
                     settings: ThreeDSRSettings) -> torch.Tensor:
    """HR targets H_i [V,H,W,3] in [0,1]: decoded x0 predictions, colour-fixed against the LR inputs."""
    targets = []
    with torch.no_grad():
        for z, cond, lr_input in zip(latents, conditions, lr_inputs):
            image = prior.decode(prior.predict_x0(z, t, cond), cond)
            if settings.colour_fix:
                image = prior.colour_fix(image, lr_input[None])
            targets.append(from_model_range(image.float().cpu())[0])
    return torch.stack(targets)


def _render(gaussians: Gaussians, cameras, background, settings: ThreeDSRSettings, prior: SRPrior) -> torch.Tensor:
    """HR renders [V,3,H,W] in [-1,1] (prior layout, on the prior's device) of the train cameras."""
    with torch.no_grad():
        images = render_views(gaussians, cameras, background=background, backend=settings.backend,
                              device=settings.device)
    return to_model_range(images).to(prior.device, prior.dtype)


def _noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the CPU generator (device-independent)."""
    return torch.randn(like.shape, generator=generator).to(like.device, like.dtype)


def _save_stage(folder: Path, stage: int, state: dict) -> None:
    """Atomically write the state after ``stage`` (latents, Gaussians, history, seconds, generator)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STAGE_FILE.format(stage)
    temporary = path.with_suffix(".tmp")
    torch.save({"stage": stage, **state}, temporary)
    temporary.replace(path)


def _latest_stage(folder: Path | None) -> dict | None:
    if folder is None or not folder.is_dir():
        return None
    stages = sorted(folder.glob("stage-*.pt"))
    return torch.load(stages[-1], map_location="cpu", weights_only=True) if stages else None
