"""Fitting 3D Gaussians to posed images: the standard 3DGS optimisation of gsplat's simple trainer.

Per step: ``batch_size`` train views (each epoch a new seeded permutation), the Gaussians rendered at the
current SH degree (raised by one every ``sh_degree_interval`` steps up to ``sh_degree``), the loss
``(1 - ssim_lambda) L1 + ssim_lambda (1 - SSIM)`` (+ opacity and scale regularisers for MCMC), one Adam per
parameter group with gsplat's learning rates (the means' multiplied by the scene extent and decayed
exponentially to 1% over the run), then the densification strategy's hooks (``gsr_core.strategy``).

Backgrounds: the render is composited over the background colour, and so are images with alpha before the
loss. ``background="auto"`` takes the views' metadata ``background`` (the synthetic scenes' sky colour) when
there is one, else black; ``"random"`` draws a colour per view per step (discourages transparent Gaussians,
gsplat's ``random_bkgd``), and the final PSNR then uses black. ``FitResult.background`` is the colour to render
the result with.

Densification schedule. gsplat's defaults assume 30k steps: refine from step 500 to 15k (MCMC: 25k) every 100
steps, reset opacities every 3k, raise the SH degree every 1k. A value left ``None`` is derived from
``f = min(1, iterations / 30000)``: start, stop, reset period and SH period scale by ``f`` (rounded, periods at
least 1), so each phase keeps its place in the run; the refine period is ``min(100, (stop - start) // 10)``
(at least 1), not ``100 f``: Gaussians need tens of steps to settle after a split, and scaling the period
like the rest (gsplat's ``steps_scaler``, meant for larger batches) keeps all ~145 refinements of a 30k run
a few steps apart and the count explodes (measured: 2,000 -> 63,000 Gaussians within 100 of 500 steps on a
48 px scene). For 2000 iterations: refine from step 33 to 1000 every 96 steps, reset opacities every 200,
SH degree up every 67 steps. Any of them can be set explicitly.

Checkpoints and resume. With ``checkpoint_dir``, the complete training state (parameters, Adam moments,
strategy state, the global torch RNG state, history) is written every ``checkpoint_every`` steps and at the
end, atomically (temp file + rename); only the latest is kept. ``fit`` resumes from it when present. Every
random draw comes from the global torch generator (forked for the call and seeded with ``seed``) or from
per-epoch seeded generators, so a resumed run repeats the uninterrupted one: bit for bit on the CPU (tested);
on CUDA up to the nondeterminism of atomic additions in the rasterizer's backward pass.

NaN guard: if the loss or any parameter becomes non-finite, ``fit`` raises ValueError naming the step; the
last checkpoint (always written from finite parameters) stays in place.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gsr_core.arguments import resolve_device
from gsr_core.cameras import Camera
from gsr_core.data.views import Views
from gsr_core.gaussians import PARAM_NAMES, Gaussians
from gsr_core.images import composite_over
from gsr_core.metrics import psnr, ssim
from gsr_core.render import rasterize
from gsr_core.render_views import background_tensor, camera_tensors, render_views
from gsr_core.strategy import DefaultStrategy, MCMCStrategy
from gsr_core.strategy.dropout import DropoutStrategy

REFERENCE_ITERATIONS = 30_000  # the run length gsplat's default schedule is written for
CHECKPOINT_PREFIX = "fit-"
CHECKPOINT_SUFFIX = ".pt"
MEANS_LR_FINAL_FRACTION = 0.01  # the means' learning rate decays to this fraction of its start
# Config keys that may differ between a checkpoint and the run resuming it (they do not change the result).
RESUMABLE_CHANGES = ("device", "backend", "checkpoint_every")

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LearningRates(BaseModel):
    """Adam learning rates per parameter group (gsplat's simple trainer), for batch size 1."""

    model_config = _STRICT
    means: float = Field(1.6e-4, gt=0, description="Means; times the scene extent, decays to 1% over the run.")
    scales: float = Field(5e-3, gt=0, description="Log scales.")
    quats: float = Field(1e-3, gt=0, description="Quaternions.")
    opacities: float = Field(5e-2, gt=0, description="Opacity logits.")
    sh0: float = Field(2.5e-3, gt=0, description="Degree-0 SH coefficients.")
    shN: float = Field(2.5e-3 / 20, gt=0, description="Higher-degree SH coefficients.")


class FitConfig(BaseModel):
    """Everything that decides a fit. Unknown keys are errors; ``None`` means "the strategy's default"."""

    model_config = _STRICT
    iterations: int = Field(30_000, ge=1, description="Optimisation steps.")
    strategy: Literal["default", "mcmc"] = Field(
        "default", description="Densification: 3DGS's adaptive density control ('default') or 3DGS-MCMC.")
    sh_degree: int = Field(3, ge=0, le=3, description="Final spherical-harmonics degree of the colours.")
    lrs: LearningRates = Field(default_factory=LearningRates, description="Adam learning rates per parameter group.")
    backend: Literal["auto", "torch", "gsplat"] = Field("auto", description="Rasterizer backend.")
    device: str = Field("auto", description="Torch device; 'auto' picks CUDA when available.")
    seed: int = Field(0, ge=0, description="Seeds initialisation, view order, backgrounds and densification.")
    batch_size: int = Field(
        1, ge=1, description="Views per step; learning rates scale by sqrt(batch_size), Adam betas to beta^batch_size.")
    background: Literal["auto", "random"] | tuple[float, float, float] = Field(
        "auto", description="Colour behind the Gaussians and transparent pixels: RGB in [0, 1], 'random' per view "
        "and step, or 'auto' (the views' metadata `background` when present, else black).")
    ssim_lambda: float = Field(0.2, ge=0, le=1, description="Weight of 1 - SSIM in the loss (the rest is L1).")
    init: Literal["auto", "points", "random"] = Field(
        "auto", description="Initial Gaussians: the views' point cloud ('points'), random in the scene bounds "
        "('random'), or 'auto' (points when the views have them).")
    init_random_count: int = Field(100_000, ge=4, description="Gaussians of a random initialisation.")
    init_opacity: float | None = Field(None, gt=0, lt=1, description="Initial opacity (None: 0.1; MCMC 0.5).")
    init_scale: float | None = Field(
        None, gt=0, description="Initial scale over the 3-nearest-neighbour distance (None: 1; MCMC 0.1).")
    opacity_reg: float | None = Field(
        None, ge=0, description="Weight of mean opacity in the loss (None: 0; MCMC 0.01).")
    scale_reg: float | None = Field(None, ge=0, description="Weight of mean scale in the loss (None: 0; MCMC 0.01).")
    grow_grad2d: float = Field(
        2e-4, gt=0, description="Default strategy: mean screen-space gradient (NDC) above which Gaussians grow.")
    cap_max: int = Field(1_000_000, ge=1, description="MCMC strategy: the most Gaussians it grows to.")
    refine_start: int | None = Field(
        None, ge=0, description="Densification starts after this step (None: 500, scaled to `iterations`).")
    refine_stop: int | None = Field(
        None, ge=0, description="Densification stops at this step (None: 15000, MCMC 25000, scaled).")
    refine_every: int | None = Field(
        None, ge=1, description="Densify every this many steps (None: min(100, (stop - start) // 10)).")
    reset_every: int | None = Field(
        None, ge=1, description="Default strategy: reset opacities every this many steps (None: 3000, scaled).")
    sh_degree_interval: int | None = Field(
        None, ge=1, description="Raise the SH degree every this many steps (None: 1000, scaled).")
    checkpoint_every: int = Field(
        1000, ge=1, description="Steps between checkpoints (when fit is given a checkpoint folder).")

    @field_validator("background")
    @classmethod
    def _colour_in_range(cls, value):
        if value not in ("auto", "random") and not all(0.0 <= channel <= 1.0 for channel in value):
            raise ValueError(f"background must be 'auto', 'random' or three numbers in [0, 1], got {value!r}")
        return value

    def schedule(self) -> "Schedule":
        """The densification and SH schedule, with unset values scaled to ``iterations`` (module docstring)."""
        factor = min(1.0, self.iterations / REFERENCE_ITERATIONS)

        def scaled(value: int | None, default: int, minimum: int) -> int:
            return value if value is not None else max(minimum, round(default * factor))

        mcmc = self.strategy == "mcmc"
        start = scaled(self.refine_start, 500, 0)
        stop = scaled(self.refine_stop, 25_000 if mcmc else 15_000, 0)
        every = self.refine_every if self.refine_every is not None else min(100, max(1, (stop - start) // 10))
        return Schedule(
            refine_start=start,
            refine_stop=stop,
            refine_every=every,
            reset_every=scaled(self.reset_every, 3000, 1),
            sh_degree_interval=scaled(self.sh_degree_interval, 1000, 1),
        )

    def strategy_defaults(self) -> dict[str, float]:
        """init_opacity, init_scale, opacity_reg, scale_reg with the strategy's defaults filled in."""
        mcmc = self.strategy == "mcmc"
        defaults = {"init_opacity": (0.1, 0.5), "init_scale": (1.0, 0.1), "opacity_reg": (0.0, 0.01),
                    "scale_reg": (0.0, 0.01)}  # fmt: skip
        return {key: pair[mcmc] if getattr(self, key) is None else getattr(self, key) for key, pair in defaults.items()}


@dataclass(frozen=True)
class Schedule:
    """Resolved step counts of a fit (see ``FitConfig.schedule``)."""

    refine_start: int
    refine_stop: int
    refine_every: int
    reset_every: int
    sh_degree_interval: int


@dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
        gaussians: the fitted Gaussians, float32 on the CPU.
        iterations: steps run in total (over resumed segments too).
        seconds: wall time of the whole fit, resumed segments included.
        train_psnr: mean PSNR (dB) of renders of the train views (clamped to [0, 1]) against them.
        num_gaussians: N at the end.
        history: one entry per step: ``{"step", "loss", "num_gaussians"}`` and the objective's figures
            (the default's ``"psnr"``); step counted from 1.
        scene_extent: the extent that scaled the means' learning rate.
        background: the background of the final renders ([3] floats).
        resumed_from: the checkpoint step this call started from, or None.
    """

    gaussians: Gaussians
    iterations: int
    seconds: float
    train_psnr: float
    num_gaussians: int
    history: list[dict[str, float]] = field(repr=False)
    scene_extent: float
    background: tuple[float, float, float]
    resumed_from: int | None
    densification: dict[str, int] = field(default_factory=dict)  # Gaussian dropout's candidate/dropped counts

    def stats(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the Gaussians and the history)."""
        return {"iterations": self.iterations, "seconds": self.seconds, "train_psnr": self.train_psnr,
                "num_gaussians": self.num_gaussians, "scene_extent": self.scene_extent,
                "background": list(self.background), "resumed_from": self.resumed_from}  # fmt: skip


def scene_extent(cameras: Sequence[Camera]) -> float:
    """1.1 x the largest distance of a camera centre from the centres' mean (gsplat's ``scene_scale``)."""
    if not cameras:
        raise ValueError("`cameras` must hold at least one camera")
    centres = torch.stack([camera.center for camera in cameras])
    return 1.1 * float((centres - centres.mean(dim=0)).norm(dim=1).max())


def fit(
    views: Views,
    config: FitConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    init: Gaussians | None = None,
    objective: "Objective | None" = None,
    render_scale: int = 1,
    densify_dropout: float | None = None,
) -> FitResult:
    """Fit Gaussians to the ``train`` views of ``views``.

    Args:
        views: a views folder; only its ``train`` split is used.
        config: the fit's settings.
        checkpoint_dir: folder for checkpoints (created); resumes from the latest one found there.
        progress: called after every step with ``{"step", "iterations", "loss", "num_gaussians",
            "sh_degree"}``; an exception it raises stops the fit (checkpoints written so far stay).
        init: start from these Gaussians (SH degree adapted to ``config.sh_degree``) instead of
            ``config.init``; ignored when resuming.
        objective: the loss of each step (``Objective``); default: ``PhotometricObjective`` against the train
            images. Distillation methods pass their own (GaussianSR's SDS, 3DSR's HR + LR terms).
        render_scale: render at this multiple of the train cameras' resolution (e.g. 4 when distilling a x4
            prior from LR views); the default objective needs 1.
        densify_dropout: GaussianSR's Gaussian dropout for the default strategy (``DropoutStrategy``): each
            densification candidate is grown with probability 1 - densify_dropout (0: plain densification that
            still counts its candidates in ``FitResult.densification``); None: the plain strategy.

    Returns:
        ``FitResult``.

    Raises:
        ValueError: no train views, cameras at one place, ``densify_dropout`` outside [0, 1) (or with the
            'mcmc' strategy), a checkpoint of another fit in ``checkpoint_dir``, or the loss or parameters
            became non-finite (the message names the step).
    """
    if not isinstance(config, FitConfig):
        raise TypeError(f"`config` must be a FitConfig, got {type(config).__name__}")
    if init is not None and not isinstance(init, Gaussians):
        raise TypeError(f"`init` must be Gaussians or None, got {type(init).__name__}")
    records = views.split("train")
    if not records:
        raise ValueError(f"views folder {views.root} has no `train` views to fit")
    cameras = [record.camera for record in records]
    extent = scene_extent(cameras)
    if extent <= 0:
        raise ValueError("the train cameras all share one centre: the scene extent (which scales the means' "
                         "learning rate) is zero; fit needs views from at least two places")  # fmt: skip
    if config.batch_size > len(records):
        raise ValueError(f"`batch_size` ({config.batch_size}) exceeds the {len(records)} train views")
    if densify_dropout is not None and not 0.0 <= densify_dropout < 1.0:
        raise ValueError(f"`densify_dropout` must lie in [0, 1), got {densify_dropout}")
    if render_scale != 1 and objective is None:
        raise ValueError(f"`render_scale` {render_scale} needs an `objective`: the default one compares renders "
                         f"with the train images at their own resolution")
    device = resolve_device(config.device)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    identity = {"config": _resume_key(config), "views": [record.name for record in records],
                "render_scale": render_scale, "densify_dropout": densify_dropout}
    checkpoint = _load_latest(folder, identity, device) if folder is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    background = resolve_background(config.background, views)
    images = train_images(views).to(device)
    viewmats, Ks = camera_tensors([camera.scaled(render_scale) for camera in cameras], device)
    if objective is None:
        objective = PhotometricObjective(images, config.ssim_lambda)

    fork_devices = []
    if device.type == "cuda":
        fork_devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=fork_devices, device_type="cuda"):
        torch.manual_seed(config.seed)
        if checkpoint is None:
            gaussians = (init.with_sh_degree(config.sh_degree) if init is not None
                         else _initial_gaussians(views, config, cameras, extent))  # fmt: skip
        else:
            gaussians = Gaussians.from_params(checkpoint["params"])
        loop = _Loop(config, gaussians, extent, images, viewmats, Ks, background, device, folder, identity,
                     objective, render_scale, densify_dropout)
        if checkpoint is not None:
            loop.restore(checkpoint)
        loop.run(progress)
        train_psnr = loop.train_psnr(cameras)
    return FitResult(
        gaussians=Gaussians.from_params(loop.params).to("cpu"),
        iterations=config.iterations,
        seconds=loop.seconds(),
        train_psnr=train_psnr,
        num_gaussians=len(loop.params["means"]),
        history=loop.history,
        scene_extent=extent,
        background=tuple(loop.eval_background.tolist()),
        resumed_from=None if checkpoint is None else checkpoint["step"],
        densification={key: int(loop.strategy_state[key]) for key in ("candidates", "dropped")
                       if key in loop.strategy_state},
    )


class Objective(Protocol):
    """The loss of one fit step.

    Called with the renders [B,H,W,3] (composited over ``backgrounds`` [B,3]), the indices [B] of the train
    views they show (in ``views.split("train")`` order) and the 0-based step; returns the loss (a scalar
    tensor to minimise) and the figures to report for the step (floats, e.g. ``{"psnr": ...}``). Any random
    draw must come from the global torch generator, which fit forks, seeds and checkpoints.
    """

    def __call__(self, rendered: torch.Tensor, ids: torch.Tensor, backgrounds: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


class PhotometricObjective:
    """3DGS's loss against target images: ``(1 - ssim_lambda) L1 + ssim_lambda (1 - SSIM)``, and the PSNR."""

    def __init__(self, images: torch.Tensor, ssim_lambda: float):
        self.images, self.ssim_lambda = images, ssim_lambda  # [V,H,W,4] straight alpha

    def __call__(self, rendered, ids, backgrounds, step):
        target = composite_over(self.images[ids], backgrounds[:, None, None, :])
        l1 = (rendered - target).abs().mean()
        loss = (1.0 - self.ssim_lambda) * l1 + self.ssim_lambda * (1.0 - ssim(rendered, target).mean())
        mse = float((rendered.detach().clamp(0, 1) - target).square().mean())
        return loss, {"psnr": -10.0 * math.log10(max(mse, 1e-20))}


class _Loop:
    """The state of one fit (parameters, optimizers, strategy) and its steps."""

    def __init__(self, config, gaussians, extent, images, viewmats, Ks, background, device, folder, identity,
                 objective, render_scale, densify_dropout):
        self.config, self.schedule, self.extent = config, config.schedule(), extent
        self.images, self.viewmats, self.Ks, self.device = images, viewmats, Ks, device
        self.folder, self.identity, self.objective = folder, identity, objective
        self.height, self.width = images.shape[1] * render_scale, images.shape[2] * render_scale
        self.params = {name: torch.nn.Parameter(tensor.detach().to(device, torch.float32).clone().contiguous())
                       for name, tensor in gaussians.params().items()}  # fmt: skip
        self.optimizers = _make_optimizers(self.params, config, extent)
        self.strategy, self.strategy_state = _make_strategy(config, self.schedule, extent, densify_dropout)
        self.strategy.check_sanity(self.params, self.optimizers)
        self.regularisers = config.strategy_defaults()
        self.fixed_background = None if background is None else background.to(device)
        self.eval_background = torch.zeros(3, device=device) if background is None else self.fixed_background
        self.step, self.history, self.elapsed_before = 0, [], 0.0
        self.started = time.perf_counter()
        self.last_checkpoint: Path | None = None

    def means_lr(self, step: int) -> float:
        """The means' learning rate at ``step``: exponential decay to 1% at the last step."""
        start = self.config.lrs.means * self.extent * math.sqrt(self.config.batch_size)
        return start * MEANS_LR_FINAL_FRACTION ** (step / self.config.iterations)

    def run(self, progress) -> None:
        while self.step < self.config.iterations:
            record = self._one_step(self.step)
            self.step += 1
            self.history.append(record)
            due = self.step % self.config.checkpoint_every == 0 or self.step == self.config.iterations
            if self.folder is not None and due:
                self._save_checkpoint()
            if progress is not None:
                progress({**record, "iterations": self.config.iterations, "sh_degree": self._sh_degree(self.step - 1)})

    def _sh_degree(self, step: int) -> int:
        return min(step // self.schedule.sh_degree_interval, self.config.sh_degree)

    def _one_step(self, step: int) -> dict[str, float]:
        config, params = self.config, self.params
        ids = torch.tensor(_batch_views(step, config.batch_size, self.images.shape[0], config.seed), device=self.device)
        self.optimizers["means"].param_groups[0]["lr"] = self.means_lr(step)
        if self.fixed_background is None:
            backgrounds = torch.rand(len(ids), 3, device=self.device)
        else:
            backgrounds = self.fixed_background.expand(len(ids), 3)
        rendered, _, info = rasterize(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            torch.cat([params["sh0"], params["shN"]], dim=1), self.viewmats[ids], self.Ks[ids], self.width, self.height,
            sh_degree=self._sh_degree(step), backgrounds=backgrounds, backend=config.backend,
        )  # fmt: skip
        self.strategy.step_pre_backward(params, self.optimizers, self.strategy_state, step, info)
        loss, terms = self.objective(rendered, ids, backgrounds, step)
        if self.regularisers["opacity_reg"] > 0:
            loss = loss + self.regularisers["opacity_reg"] * torch.sigmoid(params["opacities"]).mean()
        if self.regularisers["scale_reg"] > 0:
            loss = loss + self.regularisers["scale_reg"] * torch.exp(params["scales"]).mean()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise ValueError(self._diverged(step, f"the loss is {loss_value}"))
        loss.backward()
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if isinstance(self.strategy, MCMCStrategy):
            lr = self.means_lr(step + 1)  # gsplat passes the rate after this step's decay
            self.strategy.step_post_backward(params, self.optimizers, self.strategy_state, step, info, lr=lr)
        else:
            self.strategy.step_post_backward(params, self.optimizers, self.strategy_state, step, info, packed=False)
        for name, value in params.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(self._diverged(step, f"parameter `{name}` has non-finite values after the update"))
        return {"step": step + 1, "loss": loss_value, **terms, "num_gaussians": len(params["means"])}

    def _diverged(self, step: int, what: str) -> str:
        kept = (f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint is not None
                else "no checkpoint had been written")  # fmt: skip
        return (f"fit diverged at step {step} (0-based, of {self.config.iterations}): {what}; {kept}. "
                f"Lower the learning rates (`lrs`) or check the images for invalid values.")  # fmt: skip

    def seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @torch.no_grad()
    def train_psnr(self, cameras: list[Camera]) -> float:
        gaussians = Gaussians.from_params(self.params)
        renders = render_views(gaussians, cameras, background=self.eval_background, backend=self.config.backend,
                               device=self.device)  # fmt: skip
        targets = composite_over(self.images, self.eval_background).cpu()
        return float(psnr(renders, targets).mean())

    def _save_checkpoint(self) -> None:
        state = {
            "identity": self.identity,
            "step": self.step,
            "params": {name: value.detach() for name, value in self.params.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "strategy_state": self.strategy_state,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "history": self.history,
            "seconds": self.seconds(),
        }
        path = self.folder / f"{CHECKPOINT_PREFIX}{self.step:08d}{CHECKPOINT_SUFFIX}"
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        stale = [older for older in _checkpoints(self.folder) if older != path]
        for older in stale + list(self.folder.glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}.tmp")):
            older.unlink()
        self.last_checkpoint = path

    def restore(self, checkpoint: dict[str, Any]) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        self.strategy_state.update(_to_device(checkpoint["strategy_state"], self.device))
        torch.set_rng_state(checkpoint["rng_cpu"])
        if self.device.type == "cuda" and checkpoint["rng_cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"], self.device)
        self.step, self.history = checkpoint["step"], list(checkpoint["history"])
        self.elapsed_before = checkpoint["seconds"]
        self.last_checkpoint = checkpoint["path"]


def resolve_background(background, views: Views) -> torch.Tensor | None:
    """[3] colour of a fixed background, or None for random ones."""
    if background == "random":
        return None
    if background == "auto":
        colour = views.metadata.get("background", (0.0, 0.0, 0.0))
        try:
            return background_tensor(colour)
        except ValueError as error:
            raise ValueError(f"views folder {views.root}: metadata `background` must be three numbers in [0, 1] "
                             f"for `background='auto'`, got {colour!r}") from error  # fmt: skip
    return background_tensor(background)


def train_images(views: Views) -> torch.Tensor:
    """[V,H,W,4] straight-alpha images of the ``train`` views, in ``views.split("train")`` order (the ids a fit's
    objective receives); RGB images get an opaque alpha."""
    return torch.stack([_rgba(views.load_image(record)) for record in views.split("train")])


def _rgba(image: torch.Tensor) -> torch.Tensor:
    """[H, W, 4]: RGB images get an opaque alpha channel."""
    if image.shape[-1] == 4:
        return image
    return torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)


@lru_cache(maxsize=8)
def _epoch_order(epoch: int, count: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(count, generator=generator).tolist())


def _batch_views(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Train-view indices of ``step``: consecutive slots of per-epoch seeded permutations (no state to save)."""
    return [_epoch_order(slot // count, count, seed)[slot % count]
            for slot in range(step * batch_size, (step + 1) * batch_size)]  # fmt: skip


def _initial_gaussians(views: Views, config: FitConfig, cameras: list[Camera], extent: float) -> Gaussians:
    generator = torch.Generator().manual_seed(config.seed)
    defaults = config.strategy_defaults()
    options = {"sh_degree": config.sh_degree, "init_opacity": defaults["init_opacity"],
               "init_scale": defaults["init_scale"], "generator": generator}  # fmt: skip
    if config.init == "points" and not views.has_points:
        raise ValueError(f"`init` is 'points' but views folder {views.root} has no point cloud; use 'random' or 'auto'")
    if config.init != "random" and views.has_points:
        return Gaussians.from_points(views.points(), **options)
    low, high = _scene_bounds(views, cameras, extent)
    return Gaussians.random(config.init_random_count, low, high, **options)


def _scene_bounds(views: Views, cameras: list[Camera], extent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cube random initialisation fills: ``center +- radius`` from the views' metadata when it has both;
    else, when the optical axes converge (object-centric captures such as NeRF-synthetic), the cube around
    ``looked_at_point`` whose half side is what the median camera sees there (distance x tan(half field of
    view)); else gsplat's cube, 3 x the scene extent around the mean camera centre."""
    metadata = views.metadata
    if "center" in metadata and "radius" in metadata:
        centre, half = torch.tensor(metadata["center"], dtype=torch.float32), float(metadata["radius"])
        return centre - half, centre + half
    looked_at = looked_at_point(cameras)
    if looked_at is not None:
        distances = torch.stack([(camera.center - looked_at).norm() for camera in cameras])
        half_fov_tan = torch.tensor([camera.width / (2 * camera.K[0, 0]) for camera in cameras], dtype=torch.float64)
        half = float((distances * half_fov_tan).median())
        return (looked_at - half).float(), (looked_at + half).float()
    centre = torch.stack([camera.center for camera in cameras]).mean(dim=0).float()
    return centre - 3.0 * extent, centre + 3.0 * extent


def looked_at_point(cameras: Sequence[Camera], min_conditioning: float = 0.05) -> torch.Tensor | None:
    """[3] float64 point nearest (least squares) to every camera's optical axis, or None when the axes are
    close to parallel (forward-facing captures), i.e. when the smallest eigenvalue of sum(I - d d^T) is below
    ``min_conditioning`` times the largest, or the point lies behind the median camera."""
    eye = torch.eye(3, dtype=torch.float64)
    system, target = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for camera in cameras:
        axis = camera.world_to_camera[2, :3]  # the camera's +z (viewing direction) in world coordinates
        projector = eye - torch.outer(axis, axis)
        system += projector
        target += projector @ camera.center
    eigenvalues = torch.linalg.eigvalsh(system)
    if eigenvalues[0] < min_conditioning * eigenvalues[-1]:
        return None
    point = torch.linalg.solve(system, target)
    depths = torch.stack([camera.world_to_camera[2, :3] @ (point - camera.center) for camera in cameras])
    return point if float(depths.median()) > 0 else None


def _make_optimizers(params, config: FitConfig, extent: float) -> dict[str, torch.optim.Adam]:
    """One Adam per parameter (gsplat's batch-size rule: lr x sqrt(B), eps 1e-15 / sqrt(B); betas^B)."""
    scale = math.sqrt(config.batch_size)
    rates = config.lrs.model_dump()
    rates["means"] *= extent
    betas = (0.9**config.batch_size, 0.999**config.batch_size)
    return {name: torch.optim.Adam([params[name]], lr=rates[name] * scale, eps=1e-15 / scale, betas=betas)
            for name in PARAM_NAMES}  # fmt: skip


def _make_strategy(config: FitConfig, schedule: Schedule, extent: float, dropout: float | None = None):
    common = {"refine_start_iter": schedule.refine_start, "refine_stop_iter": schedule.refine_stop,
              "refine_every": schedule.refine_every}  # fmt: skip
    if config.strategy == "mcmc":
        if dropout is not None:
            raise ValueError("Gaussian dropout (`densify_dropout`) applies to the default strategy, not 'mcmc'")
        strategy = MCMCStrategy(cap_max=config.cap_max, **common)
        return strategy, strategy.initialize_state()
    kind = DefaultStrategy if dropout is None else DropoutStrategy
    extra = {} if dropout is None else {"dropout": dropout}
    strategy = kind(reset_every=schedule.reset_every, grow_grad2d=config.grow_grad2d, **common, **extra)
    return strategy, strategy.initialize_state(scene_scale=extent)


def _resume_key(config: FitConfig) -> dict[str, Any]:
    key = config.model_dump(mode="json")
    for name in RESUMABLE_CHANGES:
        key.pop(name)
    return key


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}"))


def _load_latest(folder: Path, identity: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """The latest checkpoint in ``folder`` (None if there is none), checked to belong to this fit."""
    if not folder.is_dir():
        return None
    found = _checkpoints(folder)
    if not found:
        return None
    path = found[-1]
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise ValueError(f"checkpoint {path} cannot be read ({error}); delete it to start the fit afresh") from error
    saved = checkpoint.get("identity", {})
    if saved != identity:
        differing = sorted(key for key in set(saved.get("config", {})) | set(identity["config"])
                           if saved.get("config", {}).get(key) != identity["config"].get(key))  # fmt: skip
        if saved.get("views") != identity["views"]:
            differing.append("train views")
        raise ValueError(f"checkpoint {path} belongs to another fit (differs in {differing}); use another "
                         f"`checkpoint_dir` or delete it")  # fmt: skip
    checkpoint["path"] = path
    return checkpoint


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value
