"""Prior nodes: `train_sr3`, `load_prior`, `upscale_views` (per-view 2D SR) and `evaluate_sr` (SR benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from gsr_core.comparison import comparison_image
from gsr_core.evaluation import format_table, write_metrics
from gsr_core.images import write_image
from gsr_core.lpips import lpips_status
from gsr_core.priors import load_prior as load_prior_folder
from gsr_core.priors.sources import CONVERTERS, local_source, materialize_prior
from gsr_core.priors.sr3_train import SR3TrainConfig, train_sr3 as train
from gsr_core.priors.sr_benchmark import benchmark_prior, folder_pairs, texture_pairs
from gsr_core.store import digest_tree
from gsr_core.upscale_views import upscale_views as upscale_all
from tasks.base import NodeContext, NodeParams, Port, node

PriorKind = Literal[tuple(CONVERTERS)]


class TrainSR3Params(SR3TrainConfig, NodeParams):
    pass


def _source_key(params: TrainSR3Params) -> dict:
    """A folder source is keyed by its content, not its path."""
    return {} if params.source == "textures" else {"source_digest": digest_tree(Path(params.source))}


@node("train_sr3", inputs={}, output="prior", version=1, extra_key=_source_key)
def train_sr3(params: TrainSR3Params, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """An SR3 prior (residual DDPM, EMA weights) trained on random HR crops; validation curve in validation.png.

    Checkpoints go to the node's scratch folder every `checkpoint_every` steps; a stopped run resumes there.
    """
    with ctx.progress(params.steps, unit="step") as bar:
        last = {}

        def report(state: dict) -> None:
            if "psnr" in state:
                last.update(val=f"{state['psnr']:.2f}", bicubic=f"{state['bicubic_psnr']:.2f}")
            bar.update(state["step"] - bar.n)
            bar.set_postfix(loss=f"{state['loss']:.4f}", **last, refresh=False)

        train(SR3TrainConfig(**params.model_dump()), out, checkpoint_dir=ctx.scratch / "sr3", progress=report)


class LoadPriorParams(NodeParams):
    kind: PriorKind = Field(description="sr3 | stablesr | stablesr_turbo | sd_upscaler | ldm_sr")
    source: str = Field(description="builtin:NAME, a gsr prior folder, a diffusers folder or hub id, or an "
                                    "original checkpoint file (SR3 *_gen.pth, StableSR stablesr_*.ckpt)")
    vae: str | None = Field(None, description="StableSR: the CFW VAE checkpoint (vqgan_cfw_00011.ckpt)")
    config: str | None = Field(None, description="SR3 reference checkpoints: the reference's JSON config")


def _source_digests(params: LoadPriorParams) -> dict:
    """Local sources are keyed by content (a retrained builtin or a replaced checkpoint reloads); hub ids by name."""
    digests = {}
    for name in ("source", "vae", "config"):
        value = getattr(params, name)
        path = local_source(value) if value else None
        if path is not None:
            digests[name] = digest_tree(path)
    return digests


def _prior_summary(folder: Path) -> str:
    check = json.loads((folder / "verification.json").read_text())
    return f"prior {check['name']} (x{check['scale']}, {'latent' if check['latent'] else 'pixel'} space), " \
           f"{check['parameters']:,} parameters"


@node("load_prior", inputs={}, output="prior", version=1, extra_key=_source_digests, summary=_prior_summary)
def load_prior(params: LoadPriorParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """A diffusion SR prior resolved from its source, converted once into a self-contained folder, verified.

    Verification loads the converted folder and runs one denoiser call on a small input (finite output).
    """
    materialize_prior(params.kind, params.source, out, vae=params.vae, config=params.config)
    prior = load_prior_folder(out, device="cpu")
    lr = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        cond = prior.condition(lr)
        z = prior.encode(torch.zeros(1, 3, 8 * prior.scale, 8 * prior.scale), cond)
        eps = prior.predict_eps(torch.randn_like(z), prior.num_train_timesteps // 2, cond)
    if not torch.isfinite(eps).all():
        raise ValueError(f"prior from {params.source} produced non-finite noise estimates: the weights are broken")
    parameters = sum(p.numel() for m in _modules(prior) for p in m.parameters())
    (out / "verification.json").write_text(json.dumps({**prior.describe(), "parameters": parameters}, indent=1))


def _modules(prior) -> list[torch.nn.Module]:
    return [value for value in vars(prior).values() if isinstance(value, torch.nn.Module)]


class UpscaleViewsParams(NodeParams):
    steps: int | None = Field(None, ge=1, description="sampling steps (None: the prior's default)")
    seed: int = Field(0, ge=0, description="view i is sampled with seed + i")
    split: Literal["all", "train", "test"] = Field("all", description="which views to super-resolve")
    device: str = Field("auto", description="torch device; 'auto' picks CUDA when available")


@node("upscale_views", inputs={"prior": Port(("prior",)), "views": Port(("views",), description="LR views")},
      output="views", version=1)
def upscale_views(params: UpscaleViewsParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """Every view super-resolved independently by the prior (the "2D SR" baseline), cameras scaled to match."""
    prior = load_prior_folder(inputs["prior"], device=params.device)
    views = inputs["views"]
    split = None if params.split == "all" else params.split
    with ctx.progress(len(views.split(split)), unit="view") as bar:
        upscale_all(prior, views, out, steps=params.steps, seed=params.seed, split=split, progress=bar.update)


class EvaluateSRParams(NodeParams):
    dataset: str = Field(description="'textures' (held-out procedural images) or a folder of *_HR.png images "
                                     "(Set5/Set14 layout)")
    lr_source: Literal["dataset", "area"] = Field(
        "dataset", description="dataset: the folder's *_LR.png files (bicubic, as SR papers); area: downsample HR")
    textures: int = Field(16, ge=1, description="dataset 'textures': how many images")
    resolution: int = Field(128, ge=16, description="dataset 'textures': image side")
    steps: int | None = Field(None, ge=1, description="sampling steps (None: the prior's default)")
    seed: int = Field(0, ge=0)
    border: int | None = Field(None, ge=0, description="pixels cropped from each side before scoring "
                                                       "(None: the scale)")
    lpips: bool = Field(True, description="also LPIPS (RGB) where its weights exist")
    device: str = Field("auto", description="torch device; 'auto' picks CUDA when available")


def _dataset_key(params: EvaluateSRParams) -> dict:
    key = {"dataset_digest": digest_tree(Path(params.dataset))} if params.dataset != "textures" else {}
    if params.lpips:
        available, _, identity = lpips_status(None)
        key["lpips_weights"] = identity if available else None
    return key


def _metrics_summary(folder: Path) -> str:
    return format_table(json.loads((folder / "metrics.json").read_text()))


@node("evaluate_sr", inputs={"prior": Port(("prior",))}, output="metrics", version=1, extra_key=_dataset_key,
      summary=_metrics_summary)
def evaluate_sr(params: EvaluateSRParams, inputs: dict, out: Path, ctx: NodeContext) -> None:
    """The prior against bicubic on SR image pairs: Y-channel PSNR/SSIM with a border crop, as SR papers report."""
    prior = load_prior_folder(inputs["prior"], device=params.device)
    if params.dataset == "textures":
        pairs = texture_pairs(params.textures, params.resolution, prior.scale)
    else:
        pairs = folder_pairs(params.dataset, prior.scale, params.lr_source)
    with ctx.progress(len(pairs), unit="image") as bar:
        evaluation, shown = benchmark_prior(prior, pairs, steps=params.steps, seed=params.seed, border=params.border,
                                            lpips=params.lpips, progress=bar.update)
    write_metrics(evaluation, out)
    picture = comparison_image(shown["hr"][None], {"bicubic": shown["bicubic"][None], prior.name: shown["sr"][None]})
    write_image(out / "comparison.png", picture)
