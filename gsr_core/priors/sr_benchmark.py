"""Single-image super-resolution benchmarks for a prior, scored as SR papers do.

Pairs come from a folder of ``*_HR.png`` images (Set5/Set14 layout: ``img_001_SRF_4_HR.png`` beside its
``img_001_SRF_4_LR.png``), with the dataset's own LR files or LR made by the pipelines' area downsampling, or
from held-out procedural textures. Each HR image is cropped to a multiple of the scale ("modcrop"). Scores:
PSNR and SSIM on the luma channel Y (ITU-R BT.601, as MATLAB's ``rgb2ycbcr``) after removing ``border``
pixels on every side (the usual crop of ``scale`` pixels); LPIPS on RGB where its weights exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from gsr_core.data.resample import downsample_image
from gsr_core.evaluation import Evaluation
from gsr_core.images import from_model_range, read_image, to_model_range
from gsr_core.lpips import LPIPSUnavailable, load_lpips
from gsr_core.metrics import psnr, ssim
from gsr_core.priors.base import SRPrior
from gsr_core.priors.image_source import HELD_OUT_SEED_BASE, texture_pool
from gsr_core.priors.sr3 import bicubic_upsample

BENCHMARK_SEED_BASE = HELD_OUT_SEED_BASE + 10_000  # textures for reports, disjoint from the validation curve's
LRSource = Literal["dataset", "area"]


@dataclass
class SRPair:
    name: str
    hr: torch.Tensor  # [H,W,3] in [0,1], H and W multiples of the scale
    lr: torch.Tensor  # [H/s,W/s,3] in [0,1]


def folder_pairs(folder: str | Path, scale: int, lr_source: LRSource = "dataset") -> list[SRPair]:
    """HR/LR pairs from a Set5/Set14-style folder (``*_HR.png``, and ``*_LR.png`` when ``lr_source='dataset'``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"SR benchmark folder {folder} does not exist")
    hr_files = sorted(folder.glob("*_HR.png"))
    if not hr_files:
        raise ValueError(f"SR benchmark folder {folder} has no *_HR.png images")
    pairs = []
    for hr_file in hr_files:
        hr = _modcrop(read_image(hr_file)[..., :3], scale)
        if lr_source == "area":
            lr = downsample_image(hr, scale)
        else:
            lr_file = hr_file.with_name(hr_file.name[: -len("_HR.png")] + "_LR.png")
            lr = read_image(lr_file)[..., :3]
            expected = (hr.shape[0] // scale, hr.shape[1] // scale)
            if tuple(lr.shape[:2]) != expected:
                raise ValueError(f"{lr_file}: {lr.shape[1]}x{lr.shape[0]} is not its HR image divided by the scale "
                                 f"{scale} ({expected[1]}x{expected[0]}); check the scale")
        pairs.append(SRPair(hr_file.name[: -len("_HR.png")], hr, lr))
    return pairs


def texture_pairs(count: int, resolution: int, scale: int) -> list[SRPair]:
    """Held-out procedural textures (seeds no training or validation run uses), LR by area downsampling."""
    images = texture_pool(count, resolution, seed_base=BENCHMARK_SEED_BASE)
    return [SRPair(f"texture_{i:03d}", (image * 255).round() / 255, downsample_image((image * 255).round() / 255, scale))
            for i, image in enumerate(images)]


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """[...,3] RGB in [0,1] -> [...,1] luma in [0,1] (BT.601 studio range, as MATLAB's rgb2ycbcr / 255)."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=images.dtype) / 255.0
    return (images @ weights)[..., None] + 16.0 / 255.0


def score_pair(estimate: torch.Tensor, truth: torch.Tensor, border: int) -> dict[str, float]:
    """Y-channel PSNR and SSIM of [H,W,3] images after cropping ``border`` pixels from each side."""
    if border:
        estimate, truth = estimate[border:-border, border:-border], truth[border:-border, border:-border]
    y_estimate, y_truth = rgb_to_y(estimate)[None].expand(-1, -1, -1, 3), rgb_to_y(truth)[None].expand(-1, -1, -1, 3)
    return {"psnr": float(psnr(y_estimate, y_truth)[0]), "ssim": float(ssim(y_estimate, y_truth)[0])}


def benchmark_prior(prior: SRPrior, pairs: list[SRPair], *, steps: int | None = None, seed: int = 0,
                    border: int | None = None, lpips: bool = True, lpips_weights: str | None = None,
                    progress: Callable[[int], None] | None = None) -> tuple[Evaluation, dict[str, torch.Tensor]]:
    """Score bicubic and the prior on every pair; returns the evaluation and the first pair's images.

    Candidates are ``bicubic`` and ``prior.name``; views are the pair names. The images dict holds the first
    pair's ``hr``, ``bicubic`` and ``sr`` [H,W,3] for a comparison picture.
    """
    border = prior.scale if border is None else border
    metrics = ["psnr", "ssim"] + (["lpips"] if lpips else [])
    evaluation = Evaluation(split="sr-benchmark", metrics=metrics, views=[p.name for p in pairs])
    lpips_model = None
    if lpips:
        try:
            lpips_model = load_lpips(lpips_weights)
        except LPIPSUnavailable as error:
            evaluation.lpips_available, evaluation.lpips_reason = False, str(error)
    evaluation.values = {"bicubic": {}, prior.name: {}}
    shown: dict[str, torch.Tensor] = {}
    for index, pair in enumerate(pairs):
        lr = to_model_range(pair.lr[None]).to(prior.device)
        generator = torch.Generator(prior.device).manual_seed(seed + index)
        with torch.no_grad():
            estimates = {"bicubic": bicubic_upsample(lr, prior.scale), prior.name: prior.upscale(lr, steps, generator)}
        for label, estimate in estimates.items():
            image = from_model_range(estimate.float().cpu())[0]
            image = (image * 255).round() / 255  # scored as the 8-bit PNG it would be saved as
            row = score_pair(image, pair.hr, border)
            if lpips_model is not None:
                with torch.no_grad():
                    row["lpips"] = float(lpips_model(image[None], pair.hr[None])[0])
            evaluation.values[label][pair.name] = row
            if index == 0:
                shown["sr" if label == prior.name else label] = image
        if index == 0:
            shown["hr"] = pair.hr
        if progress:
            progress(1)
    return evaluation, shown


def _modcrop(image: torch.Tensor, scale: int) -> torch.Tensor:
    height, width = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    return image[:height, :width]
