"""SR3 (Saharia et al., "Image Super-Resolution via Iterative Refinement"): a conditional DDPM in pixel space.

The denoiser is diffusers' ``UNet2DModel`` taking the noisy HR image concatenated with the bicubic-upsampled LR
image (6 -> 3 channels). ``SR3UNet`` changes only its noise-level embedding to SR3's: the sinusoidal encoding
of the noise level goes through an MLP ``ch -> 4ch -> ch`` and is added in every ResNet block by a linear map
with no activation before it (diffusers' default applies SiLU there). That makes checkpoints of the reference
implementation loadable (``gsr_core.priors.sr3_convert``) and changes nothing else.

Noise-level conditioning. SR3 conditions on the continuous signal level: training draws gamma uniformly
between adjacent schedule values (``alphas_cumprod[t]`` and ``alphas_cumprod[t-1]``) and feeds ``sqrt(gamma)``
to the network as its timestep, multiplied by ``noise_level_scale`` (1 in the reference implementation; ours
use 1000 so the sinusoidal embedding spans the range DDPM's integer timesteps do). Sampling at a discrete
``t`` feeds ``sqrt(alphas_cumprod[t])``.

Residual parameterisation (``residual: true``, the shipped ``builtin:sr3-x4``). The diffusion variable is the
scaled residual z = (HR - u) / residual_scale, u = bicubic(LR): ``encode(images, cond)`` and
``decode(z, cond)`` convert (the condition is u), so distillation methods handle it like a latent prior of
the HR size. The residual is what SR must add and converges much faster on a CPU budget (DESIGN.md's
measurements); dividing it by its typical size (about 0.25 in [-1, 1] units on the textures) gives it unit
variance, so the linear-beta schedule spends its steps where the signal is (unscaled, the residual drowns
in noise from t ~ 100 of 1000 on and DDIM sampling drifts). ``residual: false`` is plain SR3 on HR images
(reference checkpoints).

Sampling: ``refine`` is the paper's iterative refinement over all T steps,
``y_{t-1} = (y_t - (1-a_t)/sqrt(1-g_t) f) / sqrt(a_t) + sqrt(1-a_t) z``; ``upscale(lr, steps)`` with fewer
steps uses DDIM (diffusers' ``DDIMScheduler`` over the same betas, eta = 0). ``cascade`` chains priors
(x4 then x4).

A prior folder holds ``prior.json`` (kind ``sr3``, scale, residual, noise_level_scale, the schedule), ``unet/`` (diffusers
``save_pretrained``, safetensors) and ``scheduler/`` (the ``DDPMScheduler`` config).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from gsr_core.priors.base import PRIOR_FILE, SRPrior, freeze, quiet_diffusers, read_prior_file



class SR3UNet(UNet2DModel):
    """``UNet2DModel`` with SR3's noise-level embedding (see the module docstring); same config keys.

    forward(sample [B,6,H,W], timestep [B] = noise_level_scale * sqrt(gamma)) -> eps [B,3,H,W] (``.sample``).
    """

    @functools.wraps(UNet2DModel.__init__)  # diffusers reads the config keys from this signature
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        channels = self.config.block_out_channels[0]
        self.time_embedding = TimestepEmbedding(channels, 4 * channels, out_dim=channels)
        for module in self.modules():
            if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
                module.time_emb_proj = nn.Linear(channels, module.time_emb_proj.out_features)
                module.skip_time_act = True


def sr3_unet(channels: Sequence[int] = (32, 64, 128), layers_per_block: int = 1, attention_levels: Sequence[int] = (),
             norm_groups: int = 32, dropout: float = 0.0) -> SR3UNet:
    """A freshly initialised SR3 denoiser: 6 input channels (noisy HR + bicubic LR), 3 outputs.

    Args:
        channels: channels per resolution level (the first is SR3's ``inner_channel``).
        layers_per_block: ResNet blocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels with self-attention (one head, as in SR3).
        norm_groups: GroupNorm groups (SR3 uses 32).
    """
    channels = tuple(int(c) for c in channels)
    attention = set(attention_levels)
    if not attention <= set(range(len(channels))):
        raise ValueError(f"`attention_levels` must index `channels` (0..{len(channels) - 1}), got {sorted(attention)}")
    head_dims = {channels[i] for i in attention} | {channels[-1]}
    if len(head_dims) > 1:
        raise ValueError(f"attention levels and the middle block must share one channel count (SR3 uses one "
                         f"head), got {sorted(head_dims)}")
    return SR3UNet(
        in_channels=6, out_channels=3, block_out_channels=channels, layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(channels))),
        up_block_types=tuple("AttnUpBlock2D" if i in attention else "UpBlock2D"
                             for i in reversed(range(len(channels)))),
        attention_head_dim=channels[-1], norm_num_groups=norm_groups, attn_norm_num_groups=norm_groups,
        flip_sin_to_cos=False, freq_shift=0, dropout=dropout, add_attention=True,
    )


@dataclass(frozen=True)
class SR3Settings:
    """What an SR3 prior folder's ``prior.json`` says beyond the network: how it was trained to be used."""

    scale: int = 4
    residual: bool = True
    residual_scale: float = 0.25
    noise_level_scale: float = 1000.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    default_steps: int = 50

    def scheduler(self) -> DDPMScheduler:
        """SR3's linear-beta schedule as a diffusers ``DDPMScheduler``."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                             beta_end=self.beta_end, beta_schedule="linear", clip_sample=False)


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """[B,3,h,w] in [-1,1] -> [B,3,h*scale,w*scale] bicubic, clamped (as ``gsr_core.data.resample.upsample_image``)."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


class SR3Prior(SRPrior):
    """A trained SR3 model behind the common prior interface (pixel space: encode/decode are the identity)."""

    latent = False

    def __init__(self, unet: SR3UNet, settings: SR3Settings, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str = "sr3"):
        super().__init__(device, dtype)
        self.unet = freeze(unet).to(self.device)
        if dtype != torch.float32:
            self.unet.to(dtype)
        self.settings = settings
        self.scale = settings.scale
        self.scheduler = settings.scheduler()
        self.name = name

    @classmethod
    def from_folder(cls, folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "SR3Prior":
        folder = Path(folder)
        _, saved = read_prior_file(folder, ("sr3",), "the train_sr3 node or gsr_core.priors.sr3_convert.materialize")
        settings = SR3Settings(**saved)
        with quiet_diffusers():
            unet = SR3UNet.from_pretrained(folder / "unet", use_safetensors=True)
        return cls(unet, settings, device, dtype)

    def save(self, folder: str | Path) -> None:
        """Write the prior folder (``prior.json``, ``unet/``, ``scheduler/``)."""
        save_sr3(folder, self.unet, self.settings)

    def condition(self, lr: torch.Tensor) -> torch.Tensor:
        """The bicubic-upsampled LR [B,3,H,W] in [-1,1]."""
        self.check_lr(lr)
        return bicubic_upsample(lr.to(self.device, self.dtype), self.scale)

    def encode(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """HR images [B,3,H,W] -> z: the scaled residual (images - u) / residual_scale, or the images."""
        if not self.settings.residual:
            return images
        if cond is None:
            raise ValueError(f"{self.name}: a residual SR3 prior encodes against its condition: pass `cond`")
        return (images - cond) / self.settings.residual_scale

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z -> HR images [B,3,H,W] (u + residual_scale z for residual priors)."""
        if not self.settings.residual:
            return z
        if cond is None:
            raise ValueError(f"{self.name}: a residual SR3 prior decodes against its condition: pass `cond`")
        return cond + self.settings.residual_scale * z

    def noise_level(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        """sqrt(gamma_t) [B] for discrete timesteps (float32 on the prior's device)."""
        t = self.timesteps(t, batch)
        return self.alphas_cumprod[t.cpu()].sqrt().to(self.device, torch.float32)

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        return self.eps_at_level(z_t, self.noise_level(t, z_t.shape[0]), cond)

    def eps_at_level(self, z_t: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network's eps for z_t [B,3,H,W] at continuous noise levels sqrt(gamma) [B]."""
        if cond.shape != z_t.shape:
            raise ValueError(f"{self.name}: z_t {tuple(z_t.shape)} and the upsampled LR {tuple(cond.shape)} differ")
        return sr3_eps(self.unet, z_t, level, cond, self.settings)

    def refine(self, lr: torch.Tensor, generator: torch.Generator | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """The paper's iterative refinement over all T steps: LR [B,3,h,w] -> HR [B,3,H,W] in [-1,1]."""
        cond = self.condition(lr)
        alphas = 1 - self.scheduler.betas.to(torch.float64)
        gammas = self.alphas_cumprod
        y = _noise(cond.shape, generator, cond)
        for t in reversed(range(self.num_train_timesteps)):
            with torch.no_grad():
                eps = self.predict_eps(y, t, cond)
            a, g = alphas[t].item(), gammas[t].item()
            y = (y - (1 - a) / (1 - g) ** 0.5 * eps) / a ** 0.5
            if t > 0:
                y = y + (1 - a) ** 0.5 * _noise(cond.shape, generator, cond)
            if progress:
                progress(1)
        return self.decode(y, cond).clamp(-1, 1)

    def upscale(self, lr: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """LR [B,3,h,w] -> HR [B,3,H,W] in [-1,1]: DDIM with ``steps`` (default from prior.json); T steps = ``refine``."""
        self.check_lr(lr)
        steps = self.settings.default_steps if steps is None else int(steps)
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"`steps` must lie in [1, {self.num_train_timesteps}], got {steps}")
        if steps == self.num_train_timesteps:
            return self.refine(lr, generator, progress)
        cond = self.condition(lr)
        scheduler = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, set_alpha_to_one=True)
        scheduler.set_timesteps(steps)
        z = _noise(cond.shape, generator, cond)
        for t in scheduler.timesteps:
            with torch.no_grad():
                eps = self.predict_eps(z, int(t), cond)
            z = scheduler.step(eps, int(t), z, eta=0.0).prev_sample
            if progress:
                progress(1)
        return self.decode(z, cond).clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **asdict(self.settings),
                "parameters": sum(p.numel() for p in self.unet.parameters())}


def sr3_eps(unet: SR3UNet, z_t: torch.Tensor, level: torch.Tensor, cond: torch.Tensor,
            settings: SR3Settings) -> torch.Tensor:
    """eps_hat for z_t [B,3,H,W] at noise levels sqrt(gamma) [B] given the upsampled LR [B,3,H,W] (training too)."""
    return unet(torch.cat([z_t, cond], dim=1), level.to(z_t.dtype) * settings.noise_level_scale).sample


def cascade(priors: Sequence[SRPrior], lr: torch.Tensor, steps: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Chain priors (e.g. x4 then x4 for x16): each one's output is the next one's LR input."""
    if not priors:
        raise ValueError("`priors` must name at least one prior")
    image = lr
    for prior in priors:
        image = prior.upscale(image, steps, generator)
    return image


def save_sr3(folder: str | Path, unet: SR3UNet, settings: SR3Settings) -> None:
    """Write an SR3 prior folder: ``prior.json``, ``unet/`` (safetensors) and ``scheduler/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    settings.scheduler().save_pretrained(folder / "scheduler")
    (folder / PRIOR_FILE).write_text(json.dumps({"kind": "sr3", **asdict(settings)}, indent=1))


def _noise(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
