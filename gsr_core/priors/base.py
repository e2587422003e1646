"""The interface every diffusion super-resolution prior exposes (DESIGN.md, "Priors: the common interface").

Distillation methods hold an ``SRPrior`` and never branch on which one: SR3 (pixel space), StableSR and the
diffusers x4 upscaler / LDM-SR (latent space) all answer the same calls.

Vocabulary. Images are [B,3,H,W] in [-1,1] (``gsr_core.images.to_model_range`` converts). ``z`` is the
diffusion variable: the image itself for pixel priors (``encode``/``decode`` are the identity), a VAE latent
[B,c,H/f,W/f] for latent priors. ``t`` is an integer training timestep in ``[0, num_train_timesteps)`` (a
LongTensor [B] or an int); ``alphas_cumprod[t]`` is its signal level, so ``z_t = sqrt(a) z_0 + sqrt(1-a) eps``.
``cond`` is whatever ``condition(lr)`` returns; callers pass it back unchanged, to ``predict_eps`` and to
``encode``/``decode`` (a residual SR3's variable is relative to its upsampled LR; StableSR's decoder fuses
encoder features of the LR image).

Weights are frozen (``requires_grad=False``); gradients flow through ``encode``/``decode`` when the caller's
inputs require them (SDS through a latent prior's encoder).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

PRIOR_FILE = "prior.json"  # every prior folder has one: {"kind": ..., kind-specific settings}


class SRPrior(ABC):
    """A frozen diffusion super-resolution model: ``scale``, ``latent``, encode/decode, condition, predict_eps.

    Subclasses set ``scale`` (HR size / LR size), ``latent``, ``scheduler`` (the diffusers scheduler the prior
    samples with; its ``alphas_cumprod`` define the forward process) and implement ``encode``, ``decode``,
    ``condition`` and ``predict_eps``; ``upscale`` is plain 2D super-resolution built on those.
    """

    scale: int
    latent: bool
    scheduler: Any
    name: str = "prior"

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    # --- the diffusion variable -------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """HR images [B,3,H,W] in [-1,1] -> z_0 (the images themselves for pixel-space priors).

        ``cond`` (from ``condition``) is for priors whose variable depends on the LR input (residual SR3).
        """
        return images

    def decode(self, z: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """z -> HR images [B,3,H,W] in [-1,1] (identity for pixel-space priors); ``cond`` as for ``encode``."""
        return z

    @abstractmethod
    def condition(self, lr: torch.Tensor) -> Any:
        """The conditioning for LR images [B,3,h,w] in [-1,1] (h = H / scale); opaque to callers."""

    @abstractmethod
    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Any) -> torch.Tensor:
        """The model's noise estimate for z_t at timesteps t [B] (same shape as z_t)."""

    def colour_fix(self, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Colour correction of decoded HR images [B,3,H,W] against their LR inputs; identity by default."""
        return hr

    # --- the forward process ----------------------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """[T] float64 signal levels of the training schedule (on CPU)."""
        return self.scheduler.alphas_cumprod.to(torch.float64)

    def _levels(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] shaped [B,1,1,1] for broadcasting against ``like`` [B,...]."""
        t = self.timesteps(t, like.shape[0])
        levels = self.alphas_cumprod[t.cpu()].to(device=like.device, dtype=like.dtype)
        return levels.view(-1, *([1] * (like.dim() - 1)))

    def timesteps(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        """t as a LongTensor [B] on the prior's device (an int is repeated)."""
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long)
        t = torch.as_tensor(t, dtype=torch.long)
        if t.dim() == 0:
            t = t.repeat(batch)
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t.min()}..{t.max()}")
        return t.to(self.device)

    def add_noise(self, z_0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps."""
        a = self._levels(t, z_0)
        return a.sqrt() * z_0 + (1 - a).sqrt() * eps

    def predict_x0(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Any,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
        """The clean-variable estimate (z_t - sqrt(1-a) eps_hat) / sqrt(a); pass ``eps`` to reuse a prediction."""
        eps = self.predict_eps(z_t, t, cond) if eps is None else eps
        a = self._levels(t, z_t)
        return (z_t - (1 - a).sqrt() * eps) / a.sqrt()

    def posterior_step(self, z_t: torch.Tensor, t: int, t_prev: int, x0: torch.Tensor,
                       generator: torch.Generator | None = None, eta: float = 1.0) -> torch.Tensor:
        """A sample of z_{t_prev} given z_t and a clean estimate x0 (DDIM's step; eta=1 is DDPM's posterior).

        With t_prev < 0 the clean estimate itself is returned (the last step). Used by 3DSR, which puts the
        encoded 3DGS render in place of the model's x0.
        """
        if t_prev < 0:
            return x0
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[t_prev])
        eps = (z_t - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        noise = torch.randn(z_t.shape, generator=generator, device=z_t.device if generator is None
                            else generator.device, dtype=z_t.dtype).to(z_t.device)
        direction = max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        return a_prev ** 0.5 * x0 + direction + sigma * noise

    # --- plain 2D super-resolution ----------------------------------------------------------------------------

    @abstractmethod
    def upscale(self, lr: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """Super-resolve LR images [B,3,h,w] in [-1,1] to [B,3,h*scale,w*scale] in [-1,1].

        ``steps``: sampling steps (None: the prior's default); ``generator`` seeds the initial noise.
        """

    def check_lr(self, lr: torch.Tensor) -> None:
        """ValueError unless ``lr`` is [B,3,h,w] floating point."""
        if not (torch.is_tensor(lr) and lr.dim() == 4 and lr.shape[1] == 3 and lr.is_floating_point()):
            shape = tuple(lr.shape) if torch.is_tensor(lr) else type(lr).__name__
            raise ValueError(f"{self.name}: LR images must be a float tensor [B,3,h,w] in [-1,1], got {shape}")

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (name, scale, latent space, timesteps) for reports."""
        return {"name": self.name, "scale": self.scale, "latent": self.latent,
                "num_train_timesteps": self.num_train_timesteps}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode and no gradients for the module's weights (priors never train during distillation)."""
    module.eval()
    module.requires_grad_(False)
    return module


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' loading chatter (accelerate hints, dtype notes) for the duration; errors still raise."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def read_prior_file(folder: str | Path, kinds: tuple[str, ...], maker: str) -> tuple[str, dict[str, Any]]:
    """(kind, settings) from ``folder/prior.json``; ValueError naming the file unless its kind is one of ``kinds``.

    ``maker`` says how to make such a folder (shown when ``prior.json`` is missing).
    """
    path = Path(folder) / PRIOR_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not a prior folder ({PRIOR_FILE} is missing); make one with {maker}")
    saved = json.loads(path.read_text())
    kind = saved.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"{path}: expected prior kind {' or '.join(map(repr, kinds))}, found {kind!r}")
    return kind, saved
