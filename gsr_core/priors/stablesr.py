"""StableSR and StableSR-Turbo (Wang et al., IJCV 2024) as latent priors: SD-2.1's latent diffusion with a
time-aware LR encoder (SPADE in every denoiser ResNet block) and CFW in the autoencoder's decoder. The networks are
in ``stablesr_modules.py``; ``stablesr_convert.materialize`` makes a prior folder from the released checkpoints.

- Latent space: SD's KL autoencoder, z = 0.18215 x posterior mean, [B,4,H/8,W/8] for HR [B,3,H,W]. ``encode`` is
  differentiable (SDS); the autoencoder always runs in float32 (it produces NaNs in half precision).
- Condition (``StableSRCondition``): the LR image upsampled bicubically to the HR size, its scaled latent (the
  time-aware encoder's input, re-encoded at every timestep inside ``predict_eps``), the autoencoder encoder's
  features of it (for CFW) and the text context: StableSR always samples with the empty prompt, whose OpenCLIP
  embedding [1,77,1024] is computed once at conversion and stored in the folder (``null_context``).
- ``decode(z, cond)`` fuses the LR features into the decoder with weight ``dec_w`` (prior.json; 0.5 in StableSR's
  examples); ``decode(z)`` without a condition decodes plainly (as ``dec_w`` = 0).
- ``predict_eps``: the denoiser predicts eps (the 512 models, Turbo) or v (``prediction_type: v_prediction``, the
  768v model), converted to eps. Latents whose sides are not multiples of 8 are padded (edge values repeated) and
  cropped back; latents larger than ``tile_size`` are denoised in overlapping tiles whose outputs are blended with
  Gaussian weights (StableSR's tiled sampling), so any image size works at bounded memory.
- ``upscale(lr, steps)``: StableSR's sampler, DDPM over the respaced schedule: the timesteps are StableSR's
  ``space_timesteps(1000, [steps])`` (200 by default; Turbo 4: t = 999, 666, 333, 0), each step the DDPM posterior
  between consecutive kept timesteps (``posterior_step`` with eta 1). It starts from the LR latent noised to the
  first timestep (StableSR's tiled script), decodes with CFW and applies the colour fix (``colour_fix`` in
  prior.json: 'wavelet', 'adain' or 'none').

Prior folder: ``prior.json`` (kind ``stablesr`` or ``stablesr_turbo``, the settings below and the architecture) and
``weights.safetensors`` (``StableSRModel``'s state dict: ``unet.*`` in diffusers' layout plus ``spade``,
``structcond.*``, ``vae.*``, ``null_context``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from gsr_core.priors.base import PRIOR_FILE, SRPrior, freeze, quiet_diffusers, read_prior_file
from gsr_core.priors.colour_fix import ColourFix, colour_fix
from gsr_core.priors.pipeline_prior import check_precision, noise
from gsr_core.priors.prediction import eps_from_output
from gsr_core.priors.stablesr_modules import StableSRArchitecture, StableSRModel, build_model

KINDS = ("stablesr", "stablesr_turbo")
DEFAULT_STEPS = {"stablesr": 200, "stablesr_turbo": 4}
WEIGHTS_FILE = "weights.safetensors"
SHOWN_KEYS = 5  # how many offending keys error messages list


class StableSRSettings(BaseModel):
    """What ``prior.json`` holds besides ``kind``: sampling settings and the architecture."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    scale: int = Field(4, ge=1, description="HR size / LR size (StableSR is trained for x4)")
    default_steps: int = Field(200, ge=2, description="upscale steps when none are given (Turbo: 4)")
    dec_w: float = Field(0.5, ge=0, le=1, description="CFW fusion weight: 0 fidelity to the diffusion output, "
                                                      "1 to the LR image")
    colour_fix: ColourFix = Field("wavelet", description="colour correction of upscale's output")
    tile_size: int = Field(64, ge=8, description="latent tile side for the denoiser (64 = 512 px)")
    tile_overlap: int = Field(32, ge=0, description="latent pixels shared by neighbouring tiles")
    architecture: StableSRArchitecture = Field(default_factory=StableSRArchitecture)
    sources: dict[str, str] = Field(default_factory=dict, description="what the folder was converted from")

    @model_validator(mode="after")
    def _consistent(self) -> "StableSRSettings":
        arch = self.architecture
        if self.tile_overlap >= self.tile_size:
            raise ValueError(f"`tile_overlap` ({self.tile_overlap}) must be smaller than `tile_size` "
                             f"({self.tile_size})")
        if self.tile_size % arch.latent_multiple:
            raise ValueError(f"`tile_size` must be a multiple of {arch.latent_multiple}, got {self.tile_size}")
        if self.default_steps > arch.num_train_timesteps:
            raise ValueError(f"`default_steps` must be at most {arch.num_train_timesteps}, got {self.default_steps}")
        if self.dec_w > 0 and not arch.cfw:
            raise ValueError(f"`dec_w` {self.dec_w} needs CFW fusion layers, but this prior was converted without "
                             f"a CFW autoencoder (vqgan_cfw_*.ckpt); set dec_w to 0")
        return self


@dataclass
class StableSRCondition:
    """What ``condition(lr)`` returns; pass it back unchanged.

    lr [B,3,h,w] and upsampled [B,3,H,W] in [-1,1] (float32); latent [B,4,H/8,W/8] (the scaled LR latent, in
    the denoiser's dtype); features: the autoencoder encoder's feature maps of ``upsampled`` at the CFW levels
    (float32); context [B,tokens,dim] (the empty prompt's embedding).
    """

    lr: torch.Tensor
    upsampled: torch.Tensor
    latent: torch.Tensor
    features: list[torch.Tensor]
    context: torch.Tensor


def respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """StableSR's ``space_timesteps(T, [steps])``, descending: ``round(i (T-1)/(steps-1))`` for i < steps."""
    if not 2 <= steps <= num_train_timesteps:
        raise ValueError(f"`steps` must lie in [2, {num_train_timesteps}], got {steps}")
    stride = (num_train_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)}, reverse=True)


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size``, neighbours sharing at least ``overlap``; the last
    tile ends flush with the edge."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile `overlap` must lie in [0, {tile}), got {overlap}")
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def tile_weights(height: int, width: int) -> torch.Tensor:
    """[height,width] Gaussian blending weights, standard deviation 0.1 x the tile side, peak at the centre."""
    def profile(n: int) -> torch.Tensor:
        x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-x ** 2 / (2 * 0.01))
    return (profile(height)[:, None] * profile(width)[None, :]).float()


def tiled(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, guide: torch.Tensor,
          tile: int, overlap: int) -> torch.Tensor:
    """``fn(x, guide)`` for x, guide [B,C,H,W] evaluated on overlapping tiles and blended with ``tile_weights``.

    One tile covering everything calls ``fn`` once on the whole input. ``fn`` maps a [B,C,h,w] tile to [B,C',h,w].
    """
    height, width = x.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    if (tile_h, tile_w) == (height, width):
        return fn(x, guide)
    weights = tile_weights(tile_h, tile_w).to(x.device)
    total, out = torch.zeros(height, width, device=x.device), None
    for top in tile_origins(height, tile_h, overlap):
        for left in tile_origins(width, tile_w, overlap):
            window = (..., slice(top, top + tile_h), slice(left, left + tile_w))
            value = fn(x[window], guide[window]).float()
            if out is None:
                out = torch.zeros(*value.shape[:-2], height, width, device=x.device)
            out[window] += value * weights
            total[top:top + tile_h, left:left + tile_w] += weights
    return out / total


class StableSRPrior(SRPrior):
    """StableSR (or StableSR-Turbo) behind the common prior interface (see the module docstring)."""

    latent = True

    def __init__(self, model: StableSRModel, settings: StableSRSettings, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, kind: str = "stablesr", name: str | None = None):
        super().__init__(device, dtype)
        check_precision(self.device, dtype)
        if kind not in KINDS:
            raise ValueError(f"StableSR prior `kind` must be one of {KINDS}, got {kind!r}")
        if model.arch != settings.architecture:
            raise ValueError("the model's architecture differs from the settings' `architecture`")
        self.kind, self.name, self.settings = kind, name or kind, settings
        self.arch = settings.architecture
        self.scale = settings.scale
        self.model = freeze(model).to(self.device)
        if dtype != torch.float32:
            with quiet_diffusers():  # the autoencoder stays float32
                self.model.unet.to(dtype)
                self.model.structcond.to(dtype)
        self.scheduler = DDPMScheduler(num_train_timesteps=self.arch.num_train_timesteps,
                                       beta_start=self.arch.beta_start, beta_end=self.arch.beta_end,
                                       beta_schedule="scaled_linear", clip_sample=False,
                                       prediction_type=self.arch.prediction_type)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoising UNet (with SPADE blocks; run it through ``model.denoise``)."""
        return self.model.unet

    # --- folders ------------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "StableSRPrior":
        """The prior in a folder written by ``stablesr_convert.materialize`` (or ``save``)."""
        folder = Path(folder)
        kind, settings = read_folder_settings(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ValueError(f"{folder} is not a complete StableSR prior folder: {WEIGHTS_FILE} is missing")
        model = build_model(settings.architecture, device="meta")
        load_strict(model, load_file(weights), str(weights))
        return cls(model, settings, device, dtype, kind=kind, name=f"{kind}:{folder.name}")

    def save(self, folder: str | Path) -> None:
        """Write the prior folder (``prior.json`` and ``weights.safetensors``, float32)."""
        write_folder(folder, self.model, self.settings, self.kind)

    # --- the diffusion variable ---------------------------------------------------------------------------------

    def check_hr(self, images: torch.Tensor) -> None:
        """ValueError unless ``images`` is [B,3,H,W] floating point with H, W multiples of the autoencoder's 8."""
        factor = self.arch.vae_factor
        if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3 and images.is_floating_point()):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{self.name}: HR images must be a float tensor [B,3,H,W] in [-1,1], got {shape}")
        if images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(f"{self.name}: HR size {tuple(images.shape[-2:])} must be a multiple of the "
                             f"autoencoder's factor {factor}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """HR images [B,3,H,W] in [-1,1] -> z_0 [B,4,H/8,W/8] = scale_factor x posterior mean (float32)."""
        self.check_hr(images)
        mean, _ = self.model.vae.encode(images.to(self.device, torch.float32))
        return mean * self.arch.scale_factor

    def decode(self, z: torch.Tensor, cond: StableSRCondition | None = None) -> torch.Tensor:
        """z [B,4,h,w] -> HR images [B,3,8h,8w] (about [-1,1], not clamped), float32.

        With ``cond`` (from ``condition`` of the matching LR images) CFW fuses the LR features with weight
        ``settings.dec_w``; without it the decoder runs plainly.
        """
        self.check_latent(z)
        features = cond.features if cond is not None else None
        return self.model.vae.decode(z.to(self.device, torch.float32) / self.arch.scale_factor, features,
                                     self.settings.dec_w)

    def check_latent(self, z: torch.Tensor, cond: StableSRCondition | None = None) -> None:
        """ValueError unless ``z`` is [B,4,h,w] (matching ``cond``'s LR latent in batch and size when given)."""
        channels = self.arch.latent_channels
        if not (torch.is_tensor(z) and z.dim() == 4 and z.shape[1] == channels):
            shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"{self.name}: latents must be [B,{channels},h,w], got {shape}")
        if cond is not None and z.shape[0] != cond.latent.shape[0]:
            raise ValueError(f"{self.name}: {z.shape[0]} latents but the condition holds {cond.latent.shape[0]} "
                             f"LR images")
        if cond is not None and z.shape[-2:] != cond.latent.shape[-2:]:
            factor = self.arch.vae_factor
            hr = tuple(s * factor for s in z.shape[-2:])
            raise ValueError(f"{self.name}: latents {tuple(z.shape[-2:])} (HR {hr}) do not match the condition, "
                             f"built from LR {tuple(cond.lr.shape[-2:])} at scale {self.scale} (HR "
                             f"{tuple(cond.upsampled.shape[-2:])}, latent {tuple(cond.latent.shape[-2:])}): HR and LR "
                             f"sizes must differ by the prior's scale {self.scale}")

    # --- conditioning and the denoiser --------------------------------------------------------------------------

    def condition(self, lr: torch.Tensor) -> StableSRCondition:
        """LR images [B,3,h,w] in [-1,1] -> the ``StableSRCondition`` (h * scale must be a multiple of 8)."""
        self.check_lr(lr)
        lr = lr.to(self.device, torch.float32)
        size = (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale)
        upsampled = F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        self.check_hr(upsampled)
        with torch.no_grad():
            mean, features = self.model.vae.encode(upsampled)
        context = self.model.null_context.to(self.dtype).expand(lr.shape[0], -1, -1)
        return StableSRCondition(lr, upsampled, (mean * self.arch.scale_factor).to(self.dtype), features, context)

    def model_output(self, z_t: torch.Tensor, t: torch.Tensor, cond: StableSRCondition) -> torch.Tensor:
        """The denoiser's raw output (eps or v) [B,4,h,w] in float32 for z_t at timesteps t [B]: padded to the
        denoiser's multiple, tiled above ``tile_size`` (see the module docstring)."""
        height, width = z_t.shape[-2:]
        multiple = self.arch.latent_multiple
        pad = (0, -width % multiple, 0, -height % multiple)
        z = F.pad(z_t.to(self.device, self.dtype), pad, mode="replicate")
        guide = F.pad(cond.latent, pad, mode="replicate")

        def denoise(z_tile: torch.Tensor, guide_tile: torch.Tensor) -> torch.Tensor:
            return self.model.denoise(z_tile, t, guide_tile, cond.context)

        output = tiled(denoise, z, guide, self.settings.tile_size, self.settings.tile_overlap)
        return output[..., :height, :width].float()

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: StableSRCondition) -> torch.Tensor:
        """eps [B,4,h,w] (float32) for z_t [B,4,h,w] at timesteps t [B] given ``condition(lr)``."""
        self.check_latent(z_t, cond)
        t = self.timesteps(t, z_t.shape[0])
        output = self.model_output(z_t, t, cond)
        z_t = z_t.to(output.device, torch.float32)
        return eps_from_output(output, z_t, self._levels(t, z_t), self.arch.prediction_type)

    def colour_fix(self, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """HR [B,3,H,W] recoloured after its LR [B,3,h,w] upsampled bicubically (``settings.colour_fix``)."""
        reference = F.interpolate(lr.to(hr.device, hr.dtype), size=hr.shape[-2:], mode="bicubic",
                                  align_corners=False).clamp(-1, 1)
        return colour_fix(hr, reference, self.settings.colour_fix)

    # --- plain 2D super-resolution ------------------------------------------------------------------------------

    def upscale(self, lr: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """LR [B,3,h,w] in [-1,1] -> HR [B,3,h*scale,w*scale] in [-1,1] (StableSR's respaced DDPM sampler).

        ``steps`` defaults to prior.json's ``default_steps``; ``generator`` draws all noise. Inputs of any size are
        padded (edges repeated) to the networks' multiples and the result cropped.
        """
        self.check_lr(lr)
        steps = self.settings.default_steps if steps is None else int(steps)
        timesteps = respaced_timesteps(self.num_train_timesteps, steps)
        height, width = lr.shape[-2:]
        multiple = self.arch.vae_factor * self.arch.latent_multiple
        lr_multiple = multiple // math.gcd(multiple, self.scale)
        padded = F.pad(lr.to(self.device, torch.float32), (0, -width % lr_multiple, 0, -height % lr_multiple),
                       mode="replicate")
        cond = self.condition(padded)
        latent = cond.latent.float()
        z = self.add_noise(latent, noise(latent.shape, generator, self.device), timesteps[0])
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
            with torch.no_grad():
                eps = self.predict_eps(z, t, cond)
                z = self.posterior_step(z, t, t_prev, self.predict_x0(z, t, cond, eps), generator, eta=1.0)
            if progress:
                progress(1)
        with torch.no_grad():
            hr = self.colour_fix(self.decode(z, cond), cond.lr)
        return hr[..., :height * self.scale, :width * self.scale].clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": self.kind, "dec_w": self.settings.dec_w,
                "colour_fix": self.settings.colour_fix, "default_steps": self.settings.default_steps,
                "prediction_type": self.arch.prediction_type, "cfw": self.arch.cfw,
                "parameters": sum(p.numel() for p in self.model.parameters())}


# --- prior folders ----------------------------------------------------------------------------------------------------


def read_folder_settings(folder: Path) -> tuple[str, StableSRSettings]:
    """(kind, settings) from ``folder/prior.json``; ValueError naming the file unless it is a StableSR prior."""
    kind, saved = read_prior_file(folder, KINDS, "gsr_core.priors.stablesr_convert.materialize(checkpoint, folder, vae=...)")
    try:
        return kind, StableSRSettings(**saved)
    except ValueError as error:
        raise ValueError(f"{Path(folder) / PRIOR_FILE}: invalid StableSR settings: {error}") from error


def write_folder(folder: str | Path, model: StableSRModel, settings: StableSRSettings, kind: str) -> None:
    """Write ``prior.json`` and ``weights.safetensors`` (float32, contiguous) into ``folder``."""
    if kind not in KINDS:
        raise ValueError(f"StableSR prior `kind` must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE)
    (folder / PRIOR_FILE).write_text(json.dumps({"kind": kind, **settings.model_dump(mode="json")}, indent=1))


def load_strict(model: StableSRModel, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True, assign=True)`` after checking keys and shapes; ValueError listing the first
    few missing, unexpected or mis-shaped keys otherwise (``model`` may live on the meta device)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''})"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("mis-shaped keys", shapes)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit the StableSR architecture: {'; '.join(problems)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
