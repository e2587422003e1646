"""3DGS as Markov Chain Monte Carlo: gsplat's ``MCMCStrategy`` on any device.

gsplat 1.5.3's ``MCMCStrategy`` calls two CUDA-only kernels: ``compute_relocation`` (Eq. 9, used when dead
Gaussians are relocated and when new ones are added) and ``quat_scale_to_covar_preci`` (the covariance that
shapes the position noise). This subclass keeps gsplat's fields, defaults and hook signature and runs the same
three steps with the PyTorch operations of ``gsr_core.strategy.ops``:

1. every ``refine_every`` steps in (``refine_start_iter``, ``refine_stop_iter``): relocate Gaussians with
   opacity <= ``min_opacity`` onto live ones drawn in proportion to opacity;
2. then add ``min(cap_max, 1.05 N) - N`` Gaussians the same way (so N never exceeds ``cap_max`` through
   growth);
3. every step: add covariance-shaped noise of scale ``lr * noise_lr`` to the means, gated to transparent
   Gaussians.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gsplat.strategy import MCMCStrategy as GsplatMCMCStrategy

from gsr_core.strategy.ops import binomial_table, inject_noise, relocate, sample_add

BINOMIAL_TABLE_SIZE = 51  # gsplat's n_max: at most 51 copies share one Gaussian's opacity in Eq. 9


@dataclass
class MCMCStrategy(GsplatMCMCStrategy):
    """gsplat's ``MCMCStrategy`` (same fields and defaults), device-independent."""

    def initialize_state(self) -> dict[str, Any]:
        """``{"binoms": [51, 51] float64 C(n, k)}`` (exact, unlike gsplat's float32 table)."""
        return {"binoms": binomial_table(BINOMIAL_TABLE_SIZE)}

    def step_post_backward(
        self,
        params: dict[str, torch.nn.Parameter],
        optimizers: dict[str, torch.optim.Optimizer],
        state: dict[str, Any],
        step: int,
        info: dict[str, Any],
        lr: float,
    ) -> None:
        """Relocate and add Gaussians on schedule, then inject position noise.

        Args:
            lr: the current learning rate of ``means`` (after this step's decay), as gsplat's trainer passes it.
        """
        binoms = state["binoms"]
        if self.refine_start_iter < step < self.refine_stop_iter and step % self.refine_every == 0:
            relocated = self._relocate_gs(params, optimizers, binoms)
            added = self._add_new_gs(params, optimizers, binoms)
            if self.verbose:
                print(f"Step {step}: relocated {relocated}, added {added}, now {len(params['means'])} Gaussians.")
        inject_noise(params, scaler=lr * self.noise_lr)

    @torch.no_grad()
    def _relocate_gs(self, params, optimizers, binoms: torch.Tensor) -> int:
        dead = torch.sigmoid(params["opacities"].detach()) <= self.min_opacity
        return relocate(params, optimizers, dead, binoms, self.min_opacity)

    @torch.no_grad()
    def _add_new_gs(self, params, optimizers, binoms: torch.Tensor) -> int:
        current = len(params["means"])
        count = max(0, min(self.cap_max, int(1.05 * current)) - current)
        return sample_add(params, optimizers, count, binoms, self.min_opacity)
