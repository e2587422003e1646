"""Training an SR3 prior (``gsr_core.priors.sr3``) from HR images: procedural textures or a folder.

Each step draws ``batch_size`` random HR crops (flips, 90-degree turns), makes their LR by the pipelines' own
downsampling (``gsr_core.data.resample.downsample_image``, 8-bit quantised like the PNGs a pipeline writes),
draws t uniformly and SR3's continuous level gamma ~ U(alphas_cumprod[t], alphas_cumprod[t-1]), noises the
HR crop at sqrt(gamma) and regresses the noise with an L1 or L2 loss (Adam). An exponential moving average of
the weights (``ema_decay``) is what gets saved and validated.

Validation every ``validate_every`` steps: DDIM with ``validate_steps`` steps from the EMA weights on held-out
texture images (seeds never used for training), PSNR against the HR images beside the bicubic PSNR; the curve
is written as ``validation.csv`` and ``validation.png``.

Checkpoints (``checkpoint_dir``): weights, EMA, Adam state, the data/noise generator state and the validation
history every ``checkpoint_every`` steps and at the end, atomically; ``train_sr3`` resumes from the latest and a
resumed run repeats the uninterrupted one on the CPU. ``steps`` and the validation settings may differ on
resume (``RESUMABLE``): lowering ``steps`` ends a run at a checkpoint, raising it trains on.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from gsr_core.data.resample import downsample_image
from gsr_core.data.textures import TEXTURE_KINDS
from gsr_core.images import from_model_range, to_model_range
from gsr_core.metrics import psnr
from gsr_core.priors.image_source import HELD_OUT_SEED_BASE, folder_pool, random_crops, texture_pool
from gsr_core.priors.sr3 import SR3Prior, SR3Settings, bicubic_upsample, save_sr3, sr3_eps, sr3_unet

CHECKPOINT = "sr3-train.pt"


class SR3TrainConfig(BaseModel):
    """Everything a training run depends on (the cache key of the ``train_sr3`` node)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("textures", description="'textures' (procedural, the synthetic scenes' family) or a folder of HR images")
    texture_kinds: list[str] = Field(list(TEXTURE_KINDS), description="texture kinds for source 'textures'")
    pool_size: int = Field(512, ge=1, description="procedural images generated once for the training pool")
    pool_resolution: int = Field(128, ge=16, description="side of each procedural pool image")
    scale: int = Field(4, ge=2, le=8, description="super-resolution factor")
    crop: int = Field(48, ge=8, description="HR crop side (a multiple of scale * 4)")
    batch_size: int = Field(16, ge=1)
    steps: int = Field(10_000, ge=1, description="optimisation steps")
    learning_rate: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    loss: Literal["l1", "l2"] = Field("l1", description="noise regression loss (SR3 uses L1 for its best models)")
    channels: list[int] = Field([32, 64, 64], description="UNet channels per level")
    layers_per_block: int = Field(1, ge=1)
    attention_levels: list[int] = Field([], description="levels with self-attention")
    residual: bool = Field(True, description="diffuse (HR - bicubic(LR)) / residual_scale instead of HR")
    residual_scale: float = Field(0.25, gt=0, description="typical residual size: the residual is divided by it")
    num_train_timesteps: int = Field(1000, ge=10)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    sample_steps: int = Field(50, ge=1, description="DDIM steps the saved prior uses by default")
    validate_every: int = Field(500, ge=1)
    validate_images: int = Field(8, ge=1, description="held-out textures for the validation curve")
    validate_resolution: int = Field(64, ge=16)
    validate_steps: int = Field(20, ge=1, description="DDIM steps when validating")
    checkpoint_every: int = Field(250, ge=1)
    seed: int = Field(0, ge=0)

    def settings(self) -> SR3Settings:
        return SR3Settings(scale=self.scale, residual=self.residual, residual_scale=self.residual_scale,
                           noise_level_scale=1000.0,
                           num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                           beta_end=self.beta_end, default_steps=self.sample_steps)


def train_sr3(config: SR3TrainConfig, out: str | Path, checkpoint_dir: str | Path | None = None,
              progress: Callable[[dict], None] | None = None) -> dict:
    """Train and write an SR3 prior folder (EMA weights) plus ``training.json`` and the validation curve.

    Returns the training summary (steps, seconds, parameters, final validation PSNR vs bicubic).
    """
    if config.crop % (config.scale * 4):
        raise ValueError(f"`crop` must be a multiple of scale * 4 = {config.scale * 4}, got {config.crop}")
    if config.validate_resolution % (config.scale * 4):
        raise ValueError(f"`validate_resolution` must be a multiple of {config.scale * 4}, got {config.validate_resolution}")
    torch.manual_seed(config.seed)  # network initialisation
    unet = sr3_unet(config.channels, config.layers_per_block, config.attention_levels)
    settings = config.settings()
    state = _State(unet, config)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if checkpoint is not None and checkpoint.is_file():
        state.load(torch.load(checkpoint, map_location="cpu", weights_only=True))
    pool = _pool(config)
    validation = _validation_set(config)
    gammas = settings.scheduler().alphas_cumprod.to(torch.float64)
    loss_fn = F.l1_loss if config.loss == "l1" else F.mse_loss
    started = time.perf_counter() - state.seconds
    unet.train()
    while state.step < config.steps:
        hr = to_model_range(random_crops(pool, config.batch_size, config.crop, state.generator))
        lr = _make_lr(hr, config.scale)
        cond = bicubic_upsample(lr, config.scale)
        t = torch.randint(config.num_train_timesteps, (config.batch_size,), generator=state.generator)
        u = torch.rand(config.batch_size, generator=state.generator, dtype=torch.float64)
        level = sample_noise_levels(t, u, gammas)
        eps = torch.randn(hr.shape, generator=state.generator)
        z_0 = (hr - cond) / settings.residual_scale if settings.residual else hr
        z_t = level.view(-1, 1, 1, 1) * z_0 + (1 - level.view(-1, 1, 1, 1) ** 2).sqrt() * eps
        loss = loss_fn(sr3_eps(unet, z_t, level, cond, settings), eps)
        if not torch.isfinite(loss):
            raise ValueError(f"SR3 training diverged at step {state.step + 1} (loss {loss.item()}); "
                             f"the last checkpoint is kept")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.update_ema()
        state.step += 1
        state.seconds = time.perf_counter() - started
        report = {"step": state.step, "loss": loss.item()}
        if state.step % config.validate_every == 0 or state.step == config.steps:
            report.update(_validate(state.ema, settings, validation, config.validate_steps), step=state.step)
            state.validation.append({k: report[k] for k in ("step", "psnr", "bicubic_psnr")})
        if checkpoint is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            _save_atomic(state.to_dict(), checkpoint)
        if progress:
            progress(report)
    return _write_outputs(Path(out), state, settings, config)


def sample_noise_levels(t: torch.Tensor, u: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """SR3's continuous noise levels sqrt(gamma) [B] (float32) for timesteps t [B] and uniform draws u [B] in [0,1).

    gamma = gammas[t] + u (gammas[t-1] - gammas[t]), with 1 for gammas[t-1] at t = 0: uniform between the signal
    levels of adjacent steps; ``gammas`` is the schedule's alphas_cumprod [T] (float64).
    """
    upper = torch.cat([torch.ones(1, dtype=torch.float64), gammas[:-1]])
    return (gammas[t] + u * (upper[t] - gammas[t])).sqrt().float()


# Settings that never touch the weights' trajectory (the learning rate is constant, validation draws its own
# noise): a run may resume with other values, e.g. stop early by lowering `steps`, or train on by raising it.
RESUMABLE = ("steps", "validate_every", "validate_images", "validate_resolution", "validate_steps",
             "checkpoint_every", "sample_steps")


def training_identity(config: SR3TrainConfig) -> dict:
    """What a checkpoint must agree on to be resumed: the config minus ``RESUMABLE``."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUMABLE}


class _State:
    """The complete training state: network, EMA copy, Adam, generator, step, seconds, validation history."""

    def __init__(self, unet, config: SR3TrainConfig):
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False).eval()
        self.decay = config.ema_decay
        self.optimizer = torch.optim.Adam(unet.parameters(), lr=config.learning_rate)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.step, self.seconds = 0, 0.0
        self.validation: list[dict] = []
        self.identity = training_identity(config)

    def update_ema(self) -> None:
        """EMA with the usual warm-up (decay min(d, (1 + step) / (10 + step))) so early weights fade quickly."""
        decay = min(self.decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for average, current in zip(self.ema.parameters(), self.unet.parameters()):
                average.lerp_(current, 1 - decay)

    def to_dict(self) -> dict:
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "step": self.step, "seconds": self.seconds, "validation": json.dumps(self.validation),
                "identity": json.dumps(self.identity, sort_keys=True)}

    def load(self, saved: dict) -> None:
        saved_identity = {k: v for k, v in json.loads(saved["identity"]).items() if k not in RESUMABLE}
        if saved_identity != self.identity:
            changed = sorted(k for k in set(saved_identity) | set(self.identity)
                             if saved_identity.get(k) != self.identity.get(k))
            raise ValueError(f"the SR3 checkpoint was written for another training configuration "
                             f"(differs in {', '.join(changed)}); only {', '.join(RESUMABLE)} may change on resume")
        self.unet.load_state_dict(saved["unet"])
        self.ema.load_state_dict(saved["ema"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        self.step, self.seconds = int(saved["step"]), float(saved["seconds"])
        self.validation = json.loads(saved["validation"])


def _pool(config: SR3TrainConfig) -> list[torch.Tensor]:
    if config.source == "textures":
        images = texture_pool(config.pool_size, config.pool_resolution, config.texture_kinds)
    else:
        images = folder_pool(config.source, config.crop)
    return [_quantise(image) for image in images]


def _validation_set(config: SR3TrainConfig) -> torch.Tensor:
    """[V,3,R,R] held-out HR textures in [-1,1] (seeds disjoint from the training pool)."""
    images = texture_pool(config.validate_images, config.validate_resolution, config.texture_kinds,
                          seed_base=HELD_OUT_SEED_BASE)
    return to_model_range(torch.stack([_quantise(image) for image in images]))


def _validate(ema, settings: SR3Settings, hr: torch.Tensor, steps: int) -> dict:
    prior = SR3Prior(ema, settings)
    lr = _make_lr(hr, settings.scale)
    sample = prior.upscale(lr, steps, torch.Generator().manual_seed(0))
    reference = from_model_range(hr)
    return {"psnr": psnr(from_model_range(sample), reference).mean().item(),
            "bicubic_psnr": psnr(from_model_range(bicubic_upsample(lr, settings.scale)), reference).mean().item()}


def _make_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> LR [B,3,H/s,W/s] by the pipelines' downsampling, 8-bit quantised."""
    images = [_quantise(downsample_image(image, scale)) for image in from_model_range(hr)]
    return to_model_range(torch.stack(images))


def _quantise(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round() / 255


def _save_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _write_outputs(out: Path, state: _State, settings: SR3Settings, config: SR3TrainConfig) -> dict:
    save_sr3(out, state.ema, settings)
    with open(out / "validation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "psnr", "bicubic_psnr"])
        writer.writeheader()
        writer.writerows(state.validation)
    _plot_validation(state.validation, out / "validation.png")
    last = state.validation[-1] if state.validation else {}
    summary = {"steps": state.step, "seconds": round(state.seconds, 1),
               "parameters": sum(p.numel() for p in state.ema.parameters()),
               "validation_psnr": last.get("psnr"), "validation_bicubic_psnr": last.get("bicubic_psnr"),
               "config": config.model_dump(mode="json")}
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


def _plot_validation(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    steps = [row["step"] for row in rows]
    axes.plot(steps, [row["psnr"] for row in rows], marker="o", label="SR3 (EMA, DDIM)")
    axes.plot(steps, [row["bicubic_psnr"] for row in rows], linestyle="--", label="bicubic")
    axes.set_xlabel("step")
    axes.set_ylabel("held-out PSNR (dB)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
