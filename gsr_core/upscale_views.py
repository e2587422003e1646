"""Per-view 2D super-resolution of a views folder with a prior (the "2D SR" baseline, the input of SR -> 3DGS)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from gsr_core.data.views import Split, Views, ViewsWriter
from gsr_core.images import from_model_range, to_model_range
from gsr_core.priors.base import SRPrior


def check_prior_scale(prior: SRPrior, views: Views, what: str = "views") -> None:
    """ValueError when the views say they were downsampled by a factor other than the prior's scale."""
    resampled = views.metadata.get("resampled") or {}
    if resampled.get("direction") == "down" and int(resampled.get("factor", prior.scale)) != prior.scale:
        raise ValueError(f"{what} ({views.root}) were downsampled by {resampled['factor']}, but the prior "
                         f"{prior.name} super-resolves x{prior.scale}; use a x{resampled['factor']} prior or "
                         f"downsample by {prior.scale}")


def upscale_views(prior: SRPrior, views: Views, out: Path, *, steps: int | None = None, seed: int = 0,
                  split: Split | None = None, progress: Callable[[int], None] | None = None) -> Path:
    """Super-resolve every view of ``split`` (None: all) independently; cameras scaled by ``prior.scale``.

    View i is sampled with its own generator seeded ``seed + i``, so results do not depend on the order or
    on which other views are processed. The metadata's ``upscaled`` entry records the prior, the steps and
    ``seconds``, the wall time of the whole loop (what evaluation reports as the method's time).
    """
    check_prior_scale(prior, views)
    writer = ViewsWriter(out, metadata=dict(views.metadata, upscaled={"prior": prior.describe(), "steps": steps}))
    start = time.perf_counter()
    for index, record in enumerate(views.split(split)):
        lr = to_model_range(views.load_rgb([record])).to(prior.device, prior.dtype)
        generator = torch.Generator(prior.device).manual_seed(seed + index)
        with torch.no_grad():
            hr = prior.upscale(lr, steps, generator)
        image = from_model_range(hr.float().cpu())[0]
        writer.add(record.name, record.split, record.camera.scaled(prior.scale), image)
        if progress:
            progress(1)
    writer.metadata["upscaled"]["seconds"] = time.perf_counter() - start
    return writer.close(views.points())
