"""GaussianSR's Gaussian dropout: densification that grows only a random subset of its candidates.

Among the densification candidates (mean screen-space gradient above ``grow_grad2d``), each is kept with
probability ``1 - dropout`` and only the kept ones are split or cloned (GaussianSR, arXiv 2406.10111: the SDS
gradients of a 2D prior are noisy and inconsistent across views, so plain densification grows many redundant
Gaussians). ``dropout=0`` is the plain ``DefaultStrategy`` bit for bit (it draws no random numbers). Dropped
candidates sit the round out: their accumulated gradient is cleared like everyone's after a refinement. The
draws come from the global torch generator, which ``gsr_core.fit.fit`` forks, seeds and checkpoints.

``state["candidates"]`` and ``state["dropped"]`` count candidates and dropped ones over the run (reported by
the distill node, so the ablation shows what dropout does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gsr_core.strategy.default import DefaultStrategy


@dataclass
class DropoutStrategy(DefaultStrategy):
    """``DefaultStrategy`` whose growth keeps each candidate with probability ``1 - dropout``."""

    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {self.dropout}")

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        return {**super().initialize_state(scene_scale), "candidates": 0, "dropped": 0}

    @torch.no_grad()
    def _grow_gs(self, params, optimizers, state, step) -> tuple[int, int]:
        grads = state["grad2d"] / state["count"].clamp_min(1)
        candidates = grads > self.grow_grad2d
        state["candidates"] += int(candidates.sum())
        if self.dropout > 0:  # at p = 0 no draw, so the global generator's later draws match DefaultStrategy's
            dropped = candidates & (torch.rand(candidates.shape, device=candidates.device) < self.dropout)
            state["dropped"] += int(dropped.sum())
            state["grad2d"][dropped] = 0.0
        return super()._grow_gs(params, optimizers, state, step)
