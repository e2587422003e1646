"""The 3DGS paper's adaptive density control: gsplat's ``DefaultStrategy`` with its opacity reset working.

In gsplat 1.5.3 ``DefaultStrategy.step_post_backward`` guards the reset with
``step % self.reset_every == 0 & step > 0``; ``&`` binds tighter than the comparisons, so the chain reads
``step % reset_every == 0 and 0 > 0`` and is always false: opacities are never reset. This subclass does the
reset itself, where the 3DGS paper and gsplat intend it: every ``reset_every`` steps (not at step 0) while
densification runs (``step < refine_stop_iter``), clamping every opacity to at most ``2 * prune_opa`` and
zeroing its Adam moments. (Should a later gsplat fix the guard, the reset would run twice in one step; it is
idempotent, so the result is the same.) Growth and pruning are gsplat's own, unchanged; they run on CPU tensors.

Subclass this (e.g. GaussianSR's Gaussian dropout) by overriding ``_grow_gs`` / ``_prune_gs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gsplat.strategy import DefaultStrategy as GsplatDefaultStrategy
from gsplat.strategy.ops import reset_opa


@dataclass
class DefaultStrategy(GsplatDefaultStrategy):
    """gsplat's ``DefaultStrategy`` (same fields and defaults) whose periodic opacity reset fires."""

    def step_post_backward(
        self,
        params: dict[str, torch.nn.Parameter],
        optimizers: dict[str, torch.optim.Optimizer],
        state: dict[str, Any],
        step: int,
        info: dict[str, Any],
        packed: bool = False,
    ) -> None:
        """Accumulate screen-space gradients, grow and prune on schedule, then reset opacities when due."""
        super().step_post_backward(params, optimizers, state, step, info, packed=packed)
        if self.opacity_reset_due(step):
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)

    def opacity_reset_due(self, step: int) -> bool:
        """Whether ``step_post_backward`` at ``step`` resets opacities."""
        return 0 < step < self.refine_stop_iter and step % self.reset_every == 0
