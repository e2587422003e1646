"""What the diffusers-pipeline priors (``sd_upscaler``, ``ldm_sr``) share: prior folders, precision, DDIM sampling.

A prior folder made by ``materialize`` is self-contained and offline: ``prior.json`` (``kind`` and the prior's
settings), ``model_index.json`` (so the folder is also a valid diffusers pipeline folder) and one folder per
component written with ``save_pretrained`` (weights as safetensors).

Precision: float32 always works; half precision (``torch.float16``/``bfloat16``) is allowed on CUDA only and
applies to the denoising UNet. Autoencoders stay float32 (the x4 upscaler's VAE produces NaNs in fp16).

Both latents live at the LR size (their autoencoders downsample by the SR scale, 4), so the LR image is
concatenated to the noisy latent channel-wise.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, ModelMixin

from gsr_core.priors.base import PRIOR_FILE, SRPrior, quiet_diffusers, read_prior_file
from gsr_core.priors.hub import MODEL_INDEX

HALF_DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers' and transformers' loading chatter and progress bars for the duration; errors still raise."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with quiet_diffusers():
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def read_settings(folder: Path, kind: str, settings_class: type) -> Any:
    """The settings dataclass stored in ``folder/prior.json`` after checking its ``kind`` and keys."""
    _, saved = read_prior_file(folder, (kind,), f"gsr_core.priors.{kind}.materialize(source, folder)")
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{Path(folder) / PRIOR_FILE}: unknown keys {unknown}; known keys are {sorted(known)}")
    return settings_class(**saved)


def write_prior_folder(out: Path, kind: str, settings: Any, index: dict, components: dict[str, Any]) -> None:
    """Write ``components`` (name -> diffusers/transformers object) with ``save_pretrained``, a ``model_index.json``
    listing only them (plus the index's non-component entries) and ``prior.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        for name, component in components.items():
            if isinstance(component, ModelMixin):
                component.save_pretrained(out / name, safe_serialization=True)
            else:
                component.save_pretrained(out / name)  # transformers models always write safetensors
    kept = {k: v for k, v in index.items() if k.startswith("_") or k in components or not isinstance(v, list)}
    (out / MODEL_INDEX).write_text(json.dumps(kept, indent=1))
    (out / PRIOR_FILE).write_text(json.dumps({"kind": kind, **asdict(settings)}, indent=1))


def check_precision(device: torch.device, dtype: torch.dtype) -> None:
    """float32 anywhere; half precision only on CUDA."""
    if dtype != torch.float32 and not (dtype in HALF_DTYPES and device.type == "cuda"):
        raise ValueError(f"`dtype` must be torch.float32, or float16/bfloat16 on CUDA; got {dtype} on {device}")


def noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 standard normal noise drawn on the generator's device, moved to ``device``."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=torch.float32).to(device)


class PipelinePrior(SRPrior):
    """A latent prior built from a diffusers pipeline's parts; subclasses set ``latent_channels`` and implement
    ``encode``, ``decode``, ``condition``, ``predict_eps`` and ``upscale`` (with ``sample``, DDIM as the pipelines)."""

    latent = True
    latent_channels: int
    settings: Any

    def check_hr(self, images: torch.Tensor) -> None:
        """ValueError unless ``images`` is [B,3,H,W] floating point with H and W multiples of the scale."""
        if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3 and images.is_floating_point()):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{self.name}: HR images must be a float tensor [B,3,H,W] in [-1,1], got {shape}")
        if images.shape[-2] % self.scale or images.shape[-1] % self.scale:
            raise ValueError(f"{self.name}: HR size {tuple(images.shape[-2:])} must be a multiple of the scale "
                             f"{self.scale}")

    def check_latent(self, z: torch.Tensor, lr_size: tuple[int, int] | None = None) -> None:
        """ValueError unless ``z`` is [B,latent_channels,h,w] (with (h, w) = ``lr_size`` when given)."""
        if not (torch.is_tensor(z) and z.dim() == 4 and z.shape[1] == self.latent_channels):
            shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"{self.name}: latents must be [B,{self.latent_channels},h,w], got {shape}")
        if lr_size is not None and tuple(z.shape[-2:]) != tuple(lr_size):
            raise ValueError(f"{self.name}: latents are {tuple(z.shape[-2:])} but the LR condition is "
                             f"{tuple(lr_size)}: the latent has the LR's size (HR / {self.scale})")

    def sample(self, cond: Any, batch: int, lr_size: tuple[int, int], steps: int, eta: float,
               generator: torch.Generator | None, progress: Callable[[int], None] | None) -> torch.Tensor:
        """DDIM from pure noise to z_0 [B,latent_channels,h,w] (the scheduler's betas, its timestep spacing)."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"`steps` must lie in [1, {self.num_train_timesteps}], got {steps}")
        sampler = DDIMScheduler.from_config(self.scheduler.config, prediction_type="epsilon")
        sampler.set_timesteps(steps)
        z = noise((batch, self.latent_channels, *lr_size), generator, self.device) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            with torch.no_grad():
                eps = self.predict_eps(z, int(t), cond)
            z = sampler.step(eps, t, z, eta=eta, generator=generator).prev_sample
            if progress:
                progress(1)
        return z

    def describe(self) -> dict[str, Any]:
        modules = [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]
        return {**super().describe(), **asdict(self.settings),
                "parameters": sum(p.numel() for m in modules for p in m.parameters())}
