"""Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler) as a latent prior, from diffusers'
``StableDiffusionUpscalePipeline`` components.

- Latent space: the AutoencoderKL downsamples by 4 (three levels), so z is [B,4,h,w] for an HR image
  [B,3,4h,4w], i.e. the latent has the LR's size; ``encode``/``decode`` apply the VAE's ``scaling_factor``
  (0.08333). ``encode`` takes the posterior mean. The VAE always runs in float32.
- Condition: the LR image noised to ``noise_level`` by the ``low_res_scheduler`` (``add_noise``; the pipeline's
  default level 20, at most ``max_noise_level`` from ``model_index.json``), the noise level as the UNet's class
  label, and the CLIP text embedding of ``prompt`` (empty by default), computed once at load; the text encoder
  is not kept.
- The UNet takes concat(noisy latent [4], noised LR [3]) = 7 channels and predicts v (the scheduler's
  ``prediction_type`` "v_prediction"); ``predict_eps`` returns eps = sqrt(a_t) v + sqrt(1-a_t) z_t.
- Guidance: ``guidance_scale`` 1 (default) is one UNet pass per call, what distillation wants. The pipeline's
  own default is 9 with classifier-free guidance against ``negative_prompt``; with ``guidance_scale`` > 1 each
  call runs the UNet on both prompts, eps = eps_neg + g (eps_prompt - eps_neg). With the empty prompt and the
  empty negative prompt both embeddings are equal and guidance changes nothing, so set a ``prompt`` with it.
- ``upscale``: DDIM over the scheduler's betas, 75 steps and eta 0 by default (the pipeline's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from gsr_core.priors.base import freeze
from gsr_core.priors.hub import check_pipeline, component_folder, load_kwargs, pipeline_folder
from gsr_core.priors.pipeline_prior import (PipelinePrior, check_precision, noise, quiet_loading, read_settings,
                                            write_prior_folder)
from gsr_core.priors.prediction import check_prediction_type, eps_from_output

KIND = "sd_upscaler"
PIPELINE = "StableDiffusionUpscalePipeline"
HUB_ID = "stabilityai/stable-diffusion-x4-upscaler"
COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "low_res_scheduler", "scheduler")


@dataclass(frozen=True)
class SDUpscalerSettings:
    """What ``prior.json`` says beyond the networks: how the x4 upscaler is conditioned and sampled."""

    scale: int = 4
    noise_level: int = 20
    guidance_scale: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    default_steps: int = 75
    eta: float = 0.0
    seed: int = 0  # seeds the LR noise of condition() when no generator is passed
    source: str = ""  # the hub id or folder the prior was made from (for reports)


@dataclass
class UpscalerCondition:
    """The x4 upscaler's conditioning for B LR images (``SDUpscalerPrior.condition``)."""

    image: torch.Tensor  # [B,3,h,w] the LR images noised to noise_level, in the UNet's dtype
    noise_level: torch.Tensor  # [B] long: the UNet's class labels
    text: torch.Tensor  # [B,L,D] the prompt's embedding
    negative_text: torch.Tensor | None  # [B,L,D] the negative prompt's embedding (with guidance only)


class SDUpscalerPrior(PipelinePrior):
    """The x4 upscaler behind the common prior interface (see the module docstring)."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: torch.nn.Module, tokenizer,
                 low_res_scheduler: DDPMScheduler, scheduler: DDIMScheduler, settings: SDUpscalerSettings,
                 max_noise_level: int = 350, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = KIND):
        super().__init__(device, dtype)
        check_precision(self.device, dtype)
        self.name = name
        self.settings = settings
        self.latent_channels = int(vae.config.latent_channels)
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)
        _check_parts(vae, unet, scheduler, settings, max_noise_level, self.scale)
        with quiet_loading():  # diffusers notes every dtype cast, even with nothing to keep in float32
            self.vae = freeze(vae).to(self.device, torch.float32)
            self.unet = freeze(unet).to(self.device, dtype)
        self.scheduler = scheduler
        self.low_res_scheduler = low_res_scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.text = self._embed(text_encoder, tokenizer, settings.prompt)
        self.negative_text = (self._embed(text_encoder, tokenizer, settings.negative_prompt)
                              if settings.guidance_scale > 1 else None)

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "SDUpscalerPrior":
        """The prior in a folder written by ``materialize`` (``prior.json`` of kind ``sd_upscaler``)."""
        folder = Path(folder)
        settings = read_settings(folder, KIND, SDUpscalerSettings)
        index = check_pipeline(folder, PIPELINE, KIND)
        parts = load_parts(folder, dtype)
        return cls(**parts, settings=settings, max_noise_level=int(index.get("max_noise_level", 350)),
                   device=device, dtype=dtype, name=f"{KIND}:{folder.name}")

    def _embed(self, text_encoder: torch.nn.Module, tokenizer, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden states [1,L,D] for ``prompt`` (as the pipeline encodes prompts)."""
        tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
        with torch.no_grad():
            hidden = text_encoder.float()(tokens.input_ids, attention_mask=mask)[0]
        return hidden.to(self.device, self.dtype)

    # --- the diffusion variable -------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """HR images [B,3,H,W] in [-1,1] -> z_0 [B,4,H/4,W/4] (posterior mean x scaling_factor), float32."""
        self.check_hr(images)
        posterior = self.vae.encode(images.to(self.device, torch.float32)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """z [B,4,h,w] -> HR images [B,3,4h,4w], about [-1,1] (not clamped, so gradients pass), float32."""
        self.check_latent(z)
        return self.vae.decode(z.to(self.device, torch.float32) / self.vae.config.scaling_factor).sample

    # --- conditioning and the denoiser ------------------------------------------------------------------------

    def condition(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> UpscalerCondition:
        """LR [B,3,h,w] in [-1,1] -> the noised LR, its noise level and the text embeddings.

        The LR noise comes from ``generator``, or from one seeded with ``prior.json``'s ``seed`` when None, so
        the same LR always gives the same condition.
        """
        self.check_lr(lr)
        lr = lr.to(self.device, torch.float32)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(self.settings.seed)
        level = torch.full((lr.shape[0],), self.settings.noise_level, dtype=torch.long, device=self.device)
        noised = self.low_res_scheduler.add_noise(lr, noise(tuple(lr.shape), generator, self.device), level)
        batch = lr.shape[0]
        negative = None if self.negative_text is None else self.negative_text.expand(batch, -1, -1)
        return UpscalerCondition(noised.to(self.dtype), level, self.text.expand(batch, -1, -1), negative)

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: UpscalerCondition) -> torch.Tensor:
        """eps [B,4,h,w] for z_t [B,4,h,w] at timesteps t [B] (v predicted by the UNet, converted; CFG if set)."""
        self.check_latent(z_t, tuple(cond.image.shape[-2:]))
        if z_t.shape[0] != cond.image.shape[0]:
            raise ValueError(f"{self.name}: {z_t.shape[0]} latents but {cond.image.shape[0]} LR conditions")
        t = self.timesteps(t, z_t.shape[0])
        x = torch.cat([z_t.to(self.device, self.dtype), cond.image], dim=1)
        guided = cond.negative_text is not None
        if guided:
            output = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat(
                [cond.negative_text, cond.text]), class_labels=torch.cat([cond.noise_level, cond.noise_level])).sample
            negative, positive = output.chunk(2)
            output = negative + self.settings.guidance_scale * (positive - negative)
        else:
            output = self.unet(x, t, encoder_hidden_states=cond.text, class_labels=cond.noise_level).sample
        output = output.to(z_t.dtype)
        return eps_from_output(output, z_t.to(output.device), self._levels(t, output), self.prediction_type)

    def upscale(self, lr: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """LR [B,3,h,w] in [-1,1] -> HR [B,3,4h,4w] in [-1,1] by DDIM (``steps`` default from prior.json).

        ``generator`` draws first the LR noise, then the initial latents, as the diffusers pipeline does: with
        the same seed, steps, noise level and guidance the result matches ``StableDiffusionUpscalePipeline``.
        """
        cond = self.condition(lr, generator)
        steps = self.settings.default_steps if steps is None else int(steps)
        z = self.sample(cond, lr.shape[0], tuple(lr.shape[-2:]), steps, self.settings.eta, generator, progress)
        with torch.no_grad():
            return self.decode(z).clamp(-1, 1)


def _check_parts(vae, unet, scheduler, settings: SDUpscalerSettings, max_noise_level: int, scale: int) -> None:
    """ValueError naming the mismatch unless the parts and settings make an x4-upscaler-style prior."""
    expected_in = vae.config.latent_channels + 3
    if unet.config.in_channels != expected_in or unet.config.out_channels != vae.config.latent_channels:
        raise ValueError(f"{KIND}: the UNet must take {expected_in} channels (latent {vae.config.latent_channels} + "
                         f"LR image 3) and give {vae.config.latent_channels}, found in_channels "
                         f"{unet.config.in_channels}, out_channels {unet.config.out_channels}")
    if unet.config.num_class_embeds is None:
        raise ValueError(f"{KIND}: the UNet has no class embedding (num_class_embeds) for the noise level")
    check_prediction_type(KIND, scheduler.config.prediction_type)
    if settings.scale != scale:
        raise ValueError(f"{KIND}: prior settings say scale {settings.scale}, but the VAE downsamples by {scale}")
    if not 0 <= settings.noise_level <= max_noise_level:
        raise ValueError(f"{KIND}: `noise_level` must lie in [0, {max_noise_level}], got {settings.noise_level}")
    if settings.guidance_scale < 1:
        raise ValueError(f"{KIND}: `guidance_scale` must be >= 1 (1: no guidance), got {settings.guidance_scale}")
    if settings.eta < 0:
        raise ValueError(f"{KIND}: `eta` must be >= 0, got {settings.eta}")


def load_parts(folder: Path, dtype: torch.dtype = torch.float32) -> dict:
    """The pipeline's parts from a local folder (no network): VAE and text encoder in float32, UNet in ``dtype``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    paths = {name: component_folder(folder, name) for name in COMPONENTS}
    with quiet_loading():
        return {
            "vae": AutoencoderKL.from_pretrained(paths["vae"], torch_dtype=torch.float32, **load_kwargs(paths["vae"])),
            "unet": UNet2DConditionModel.from_pretrained(paths["unet"], torch_dtype=dtype,
                                                         **load_kwargs(paths["unet"])),
            "text_encoder": CLIPTextModel.from_pretrained(paths["text_encoder"], dtype=torch.float32,
                                                          **load_kwargs(paths["text_encoder"])),
            "tokenizer": CLIPTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True),
            "low_res_scheduler": DDPMScheduler.from_pretrained(paths["low_res_scheduler"]),
            "scheduler": DDIMScheduler.from_pretrained(paths["scheduler"]),
        }


def materialize(source: str, out: Path, settings: SDUpscalerSettings | None = None) -> None:
    """Write a self-contained ``sd_upscaler`` prior folder ``out`` from ``source``.

    Args:
        source: a local ``StableDiffusionUpscalePipeline`` folder or a hub id (``HUB_ID``); offline, a
            hub id must already be in the Hugging Face cache (``gsr_core.priors.hub``).
        out: the folder to write: ``prior.json``, ``model_index.json`` and the six components (safetensors).
        settings: noise level, guidance, prompts, steps (``SDUpscalerSettings()`` when None); ``scale`` must
            match the VAE's.
    """
    settings = settings or SDUpscalerSettings()
    folder = pipeline_folder(source, COMPONENTS)
    index = check_pipeline(folder, PIPELINE, KIND)
    parts = load_parts(folder)
    SDUpscalerPrior(**parts, settings=settings, max_noise_level=int(index.get("max_noise_level", 350)))  # validates
    write_prior_folder(out, KIND, replace(settings, source=str(source)), index, parts)
