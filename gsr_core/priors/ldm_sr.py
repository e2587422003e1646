"""LDM super-resolution (CompVis/ldm-super-resolution-4x-openimages) as a latent prior, from diffusers'
``LDMSuperResolutionPipeline`` components: ``VQModel`` + ``UNet2DModel`` + ``DDIMScheduler``.

- Latent space: the VQ autoencoder downsamples by 4, so z is [B,3,h,w] for an HR image [B,3,4h,4w] (the LR's
  size). ``encode`` is the VQ encoder and ``quant_conv`` without quantisation (``VQModel.encode``);
  ``decode`` quantises to the codebook first, as the pipeline decodes (straight-through, so gradients pass).
  No latent scaling (the pipeline uses none). The VQ model always runs in float32.
- Condition: the LR image itself [B,3,h,w] in [-1,1], concatenated to the noisy latent: the UNet takes 6
  channels and predicts what the scheduler's ``prediction_type`` says (epsilon for the released model).
- ``upscale``: DDIM over the scheduler's betas, 100 steps and eta 0 by default (the pipeline's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, UNet2DModel, VQModel

from gsr_core.priors.base import freeze
from gsr_core.priors.hub import check_pipeline, component_folder, load_kwargs, pipeline_folder
from gsr_core.priors.pipeline_prior import (PipelinePrior, check_precision, quiet_loading, read_settings,
                                            write_prior_folder)
from gsr_core.priors.prediction import check_prediction_type, eps_from_output

KIND = "ldm_sr"
PIPELINE = "LDMSuperResolutionPipeline"
HUB_ID = "CompVis/ldm-super-resolution-4x-openimages"
COMPONENTS = ("vqvae", "unet", "scheduler")


@dataclass(frozen=True)
class LDMSRSettings:
    """What ``prior.json`` says beyond the networks: how LDM-SR samples."""

    scale: int = 4
    default_steps: int = 100
    eta: float = 0.0
    source: str = ""  # the hub id or folder the prior was made from (for reports)


class LDMSRPrior(PipelinePrior):
    """LDM-SR behind the common prior interface (see the module docstring)."""

    def __init__(self, vqvae: VQModel, unet: UNet2DModel, scheduler: DDIMScheduler, settings: LDMSRSettings,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, name: str = KIND):
        super().__init__(device, dtype)
        check_precision(self.device, dtype)
        self.name = name
        self.settings = settings
        self.latent_channels = int(vqvae.config.vq_embed_dim or vqvae.config.latent_channels)
        self.scale = 2 ** (len(vqvae.config.block_out_channels) - 1)
        _check_parts(unet, scheduler, settings, self.latent_channels, self.scale)
        with quiet_loading():  # diffusers notes every dtype cast, even with nothing to keep in float32
            self.vqvae = freeze(vqvae).to(self.device, torch.float32)
            self.unet = freeze(unet).to(self.device, dtype)
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "LDMSRPrior":
        """The prior in a folder written by ``materialize`` (``prior.json`` of kind ``ldm_sr``)."""
        folder = Path(folder)
        settings = read_settings(folder, KIND, LDMSRSettings)
        check_pipeline(folder, PIPELINE, KIND)
        return cls(**load_parts(folder, dtype), settings=settings, device=device, dtype=dtype,
                   name=f"{KIND}:{folder.name}")

    def encode(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """HR images [B,3,H,W] in [-1,1] -> z_0 [B,3,H/4,W/4] (VQ encoder + quant_conv, not quantised), float32."""
        self.check_hr(images)
        return self.vqvae.encode(images.to(self.device, torch.float32)).latents

    def decode(self, z: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """z [B,3,h,w] -> HR images [B,3,4h,4w], about [-1,1] (quantised, then decoded; not clamped), float32."""
        self.check_latent(z)
        return self.vqvae.decode(z.to(self.device, torch.float32)).sample

    def condition(self, lr: torch.Tensor) -> torch.Tensor:
        """The LR images [B,3,h,w] in [-1,1] themselves, on the prior's device in the UNet's dtype."""
        self.check_lr(lr)
        return lr.to(self.device, self.dtype)

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """eps [B,3,h,w] for z_t [B,3,h,w] at timesteps t [B] given the LR images ``cond`` [B,3,h,w]."""
        self.check_latent(z_t, tuple(cond.shape[-2:]))
        if z_t.shape[0] != cond.shape[0]:
            raise ValueError(f"{self.name}: {z_t.shape[0]} latents but {cond.shape[0]} LR images")
        t = self.timesteps(t, z_t.shape[0])
        output = self.unet(torch.cat([z_t.to(self.device, self.dtype), cond], dim=1), t).sample.to(z_t.dtype)
        return eps_from_output(output, z_t.to(output.device), self._levels(t, output), self.prediction_type)

    def upscale(self, lr: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """LR [B,3,h,w] in [-1,1] -> HR [B,3,4h,4w] in [-1,1] by DDIM (``steps`` default from prior.json).

        ``generator`` draws the initial latents (and DDIM's noise when eta > 0); with eta 0 the result matches
        ``LDMSuperResolutionPipeline`` with the same seed and steps.
        """
        cond = self.condition(lr)
        steps = self.settings.default_steps if steps is None else int(steps)
        z = self.sample(cond, lr.shape[0], tuple(lr.shape[-2:]), steps, self.settings.eta, generator, progress)
        with torch.no_grad():
            return self.decode(z).clamp(-1, 1)


def _check_parts(unet, scheduler, settings: LDMSRSettings, latent_channels: int, scale: int) -> None:
    """ValueError naming the mismatch unless the parts and settings make an LDM-SR-style prior."""
    expected_in = latent_channels + 3
    if unet.config.in_channels != expected_in or unet.config.out_channels != latent_channels:
        raise ValueError(f"{KIND}: the UNet must take {expected_in} channels (latent {latent_channels} + LR image 3) "
                         f"and give {latent_channels}, found in_channels {unet.config.in_channels}, out_channels "
                         f"{unet.config.out_channels}")
    check_prediction_type(KIND, scheduler.config.prediction_type)
    if settings.scale != scale:
        raise ValueError(f"{KIND}: prior settings say scale {settings.scale}, but the VQ model downsamples by {scale}")
    if settings.eta < 0:
        raise ValueError(f"{KIND}: `eta` must be >= 0, got {settings.eta}")


def load_parts(folder: Path, dtype: torch.dtype = torch.float32) -> dict:
    """The pipeline's parts from a local folder (no network): VQ model in float32, UNet in ``dtype``."""
    folder = Path(folder)
    paths = {name: component_folder(folder, name) for name in COMPONENTS}
    with quiet_loading():
        return {
            "vqvae": VQModel.from_pretrained(paths["vqvae"], torch_dtype=torch.float32, **load_kwargs(paths["vqvae"])),
            "unet": UNet2DModel.from_pretrained(paths["unet"], torch_dtype=dtype, **load_kwargs(paths["unet"])),
            "scheduler": DDIMScheduler.from_pretrained(paths["scheduler"]),
        }


def materialize(source: str, out: Path, settings: LDMSRSettings | None = None) -> None:
    """Write a self-contained ``ldm_sr`` prior folder ``out`` from ``source``.

    Args:
        source: a local ``LDMSuperResolutionPipeline`` folder or a hub id (``HUB_ID``); offline, a hub id must
            already be in the Hugging Face cache (``gsr_core.priors.hub``). The released model has ``.bin``
            weights only; they are read with ``torch.load(weights_only=True)`` and written back as safetensors.
        out: the folder to write: ``prior.json``, ``model_index.json`` and ``vqvae/``, ``unet/``, ``scheduler/``.
        settings: steps and eta (``LDMSRSettings()`` when None); ``scale`` must match the VQ model's.
    """
    settings = settings or LDMSRSettings()
    folder = pipeline_folder(source, COMPONENTS)
    index = check_pipeline(folder, PIPELINE, KIND)
    parts = load_parts(folder)
    LDMSRPrior(**parts, settings=settings)  # validates the parts against the settings
    write_prior_folder(out, KIND, replace(settings, source=str(source)), index, parts)
