"""Diffusion super-resolution priors behind one interface (``SRPrior``), one module per prior.

A prior lives in a folder whose ``prior.json`` names its ``kind``; ``load_prior(folder)`` builds the right
class. Kinds: ``sr3`` (``sr3.py``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from gsr_core.arguments import resolve_device
from gsr_core.priors.base import SRPrior, read_prior_file

# kind -> "module:class"; each class has from_folder(folder, device, dtype)
PRIOR_CLASSES = {
    "sr3": "gsr_core.priors.sr3:SR3Prior",
    "sd_upscaler": "gsr_core.priors.sd_upscaler:SDUpscalerPrior",
    "ldm_sr": "gsr_core.priors.ldm_sr:LDMSRPrior",
    "stablesr": "gsr_core.priors.stablesr:StableSRPrior",
    "stablesr_turbo": "gsr_core.priors.stablesr:StableSRPrior",
}


def prior_kind(folder: str | Path) -> str:
    """The ``kind`` recorded in a prior folder's ``prior.json`` (ValueError naming the folder otherwise)."""
    kind, _ = read_prior_file(folder, tuple(PRIOR_CLASSES), "the load_prior or train_sr3 node")
    return kind


def load_prior(folder: str | Path, device: str = "auto", dtype: torch.dtype = torch.float32) -> SRPrior:
    """The prior stored in ``folder``, frozen, on ``device`` ('auto': CUDA when available)."""
    module_name, class_name = PRIOR_CLASSES[prior_kind(folder)].split(":")
    prior_class = getattr(importlib.import_module(module_name), class_name)
    return prior_class.from_folder(Path(folder), device=resolve_device(device), dtype=dtype)
