"""Distillation methods: GaussianSR's timestep annealing, SDS gradient and Gaussian dropout, 3DSR's schedule and
resume, the posterior step, SR -> 3DGS's checkpointed targets, and the `distill` node in a pipeline.

Everything runs on tiny scenes (16 px LR views, 64 px HR renders) with tiny randomly initialised SR3 priors: real
components, so the checks are about the methods' arithmetic and bookkeeping, not the quality of a trained prior.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
from pathlib import Path

import pydantic
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import gsr_core.fit as fit_module
from flows.pipeline import PipelineFailed, run_pipeline
from flows.spec import SpecError, validate
from gsr_core.data.resample import resample_views
from gsr_core.data.synthetic import write_synthetic_scene
from gsr_core.data.views import Views
from gsr_core.distill import (GaussianSRSettings, SRThenFitSettings, ThreeDSRSettings, gaussiansr, sr_then_fit,
                              three_dsr)
from gsr_core.distill.baselines import TARGETS_FILE
from gsr_core.distill.consistent import timesteps
from gsr_core.distill.sds import SDSObjective, TimestepSchedule, sds_weight
from gsr_core.fit import FitConfig, fit
from gsr_core.gaussians import Gaussians
from gsr_core.images import to_model_range
from gsr_core.priors.sr3 import SR3Prior, SR3Settings, save_sr3, sr3_unet
from gsr_core.strategy.dropout import DropoutStrategy

FAST = {"device": "cpu", "backend": "torch"}
T = 50  # timesteps of the tiny priors' schedule


def tiny_prior(residual: bool = True, num_train_timesteps: int = T, seed: int = 0) -> SR3Prior:
    """A randomly initialised two-level x4 SR3 prior (real network and schedule, untrained weights)."""
    torch.manual_seed(seed)
    settings = SR3Settings(scale=4, residual=residual, num_train_timesteps=num_train_timesteps, default_steps=2)
    return SR3Prior(sr3_unet((32, 32)), settings)


def same_gaussians(a: Gaussians, b: Gaussians) -> bool:
    """Every parameter bit-identical."""
    return all(torch.equal(a.params()[name], b.params()[name]) for name in a.params())


@pytest.fixture(scope="module")
def lr_views(tmp_path_factory) -> Views:
    """A 64 px synthetic scene (6 views: 4 train, 2 test, 200 points) downsampled x4 to 16 px."""
    folder = tmp_path_factory.mktemp("distill")
    write_synthetic_scene(folder / "hr", "tiles", resolution=64, views=6, seed=0, test_every=3, supersample=1,
                          num_points=200)
    return Views.read(resample_views(Views.read(folder / "hr"), folder / "lr", 4, "down"))


@pytest.fixture(scope="module")
def lr_gaussians(lr_views: Views) -> Gaussians:
    """The starting 3DGS: one Gaussian per point of the scene's point cloud."""
    return Gaussians.from_points(lr_views.points(), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def prior() -> SR3Prior:
    return tiny_prior()


# --- GaussianSR: timestep annealing -------------------------------------------------------------------------------


def test_annealed_lower_bound_falls_linearly_and_samples_stay_above_it():
    schedule = TimestepSchedule(t_min=20, t_max=500, iterations=101, annealing=True)
    bounds = [schedule.lower_bound(i) for i in range(101)]
    assert bounds[0] == 500 and bounds[-1] == 20
    assert bounds == [round(500 - 480 * i / 100) for i in range(101)]  # linear in the step
    torch.manual_seed(0)
    for step in (0, 30, 70, 100):
        samples = torch.tensor([schedule.sample(step) for _ in range(400)])
        assert samples.min() >= bounds[step] and samples.max() <= 500
        if step > 0:  # the whole interval is drawn, both ends included
            assert samples.min() <= bounds[step] + 25 and samples.max() >= 475
    assert {schedule.sample(0) for _ in range(20)} == {500}  # the first step is all noise


def test_without_annealing_timesteps_are_uniform_over_the_whole_range():
    schedule = TimestepSchedule(t_min=20, t_max=500, iterations=100, annealing=False)
    torch.manual_seed(0)
    for step in (0, 99):
        assert schedule.lower_bound(step) == 20
        samples = torch.tensor([schedule.sample(step) for _ in range(2000)], dtype=torch.float64)
        assert samples.min() >= 20 and samples.max() <= 500
        assert abs(float(samples.mean()) - 260) < 10  # U(20, 500): mean 260, standard error ~3


def test_t_min_above_t_max_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`t_min` \(300\) must not exceed `t_max` \(200\)"):
        TimestepSchedule(t_min=300, t_max=200, iterations=10, annealing=True)
    with pytest.raises(pydantic.ValidationError, match="t_min.*must not exceed.*t_max"):
        GaussianSRSettings(t_min=0.6, t_max=0.5)


# --- GaussianSR: the SDS gradient ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["constant", "one_minus_alpha", "sqrt_one_minus_alpha"])
@pytest.mark.parametrize("residual", [True, False])
def test_sds_gradient_reaching_the_render_is_w_times_eps_error_through_encode(weighting: str, residual: bool):
    """d L_SDS / d render = 2 w(t) (eps_hat - eps) / (s numel): the 2 converts [0,1] to [-1,1], s is the residual
    prior's residual_scale (encode = (x - u) / s; 1 for a plain SR3 prior), numel the element count of z0."""
    prior = tiny_prior(residual=residual)
    generator = torch.Generator().manual_seed(1)
    lr = torch.cat([torch.rand(3, 8, 8, 3, generator=generator), torch.ones(3, 8, 8, 1)], dim=-1)  # [V,h,w,4]
    conditions = [prior.condition(to_model_range(image[None, ..., :3])) for image in lr]
    rendered = torch.rand(1, 32, 32, 3, generator=generator)
    ids, backgrounds, step = torch.tensor([2]), torch.zeros(1, 3), 7
    schedule = TimestepSchedule(5, 40, iterations=20, annealing=True)

    def gradient(lambda_sds: float) -> tuple[torch.Tensor, dict]:
        settings = GaussianSRSettings(lambda_sds=lambda_sds, weighting=weighting)
        image = rendered.clone().requires_grad_(True)
        torch.manual_seed(123)
        loss, terms = SDSObjective(prior, lr, conditions, settings, schedule)(image, ids, backgrounds, step)
        loss.backward()
        return image.grad, terms

    with_sds, terms = gradient(1.0)
    lr_only, _ = gradient(0.0)  # the LR consistency term alone
    # The expected value, from the same random draws: t first, then eps. eps is drawn like z0, whose memory
    # layout is the permuted render's, so it is drawn the same way here.
    cond = conditions[2]
    s = prior.settings.residual_scale if residual else 1.0
    z0 = (to_model_range(rendered) - (cond if residual else 0)) / s
    torch.manual_seed(123)
    t = schedule.sample(step)
    eps = torch.randn_like(prior.encode(to_model_range(rendered), cond))
    assert terms["t"] == t and schedule.lower_bound(step) <= t <= 40
    a = float(prior.alphas_cumprod[t])
    with torch.no_grad():
        eps_hat = prior.predict_eps(math.sqrt(a) * z0 + math.sqrt(1 - a) * eps, t, cond)
    w = {"constant": 1.0, "one_minus_alpha": 1 - a, "sqrt_one_minus_alpha": math.sqrt(1 - a)}[weighting]
    expected = (2 * w * (eps_hat - eps) / (s * z0.numel())).permute(0, 2, 3, 1)
    torch.testing.assert_close(with_sds - lr_only, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # and the reported term is 0.5 mean((w (eps_hat - eps))^2)
    assert terms["sds"] == pytest.approx(0.5 * float((w * (eps_hat - eps)).square().mean()), rel=1e-4)


def test_sds_weightings():
    alpha = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    for a in alpha.tolist():
        assert sds_weight("constant", a) == 1.0
        assert sds_weight("one_minus_alpha", a) == pytest.approx(1 - a)
        assert sds_weight("sqrt_one_minus_alpha", a) == pytest.approx(math.sqrt(1 - a))
    with pytest.raises(pydantic.ValidationError, match="weighting"):
        GaussianSRSettings(weighting="linear")


# --- GaussianSR: Gaussian dropout ----------------------------------------------------------------------------------


def test_dropout_zero_is_bit_identical_to_the_default_strategy(lr_views, lr_gaussians, prior, monkeypatch):
    """The same GaussianSR run with the default strategy and with DropoutStrategy at p = 0 in its place: the
    dropout strategy must draw nothing, or the SDS noise and split positions that follow would change."""
    settings = GaussianSRSettings(iterations=10, dropout=0.0, **FAST)
    plain = gaussiansr(lr_gaussians, lr_views, prior, settings)
    monkeypatch.setattr(fit_module, "DefaultStrategy", functools.partial(DropoutStrategy, dropout=0.0))
    with_dropout_strategy = gaussiansr(lr_gaussians, lr_views, prior, settings)
    counts = with_dropout_strategy.stats["densification"]
    assert counts["candidates"] > 0 and counts["dropped"] == 0  # densification did run, and dropped nothing
    assert len(with_dropout_strategy.gaussians) > len(lr_gaussians)
    assert same_gaussians(plain.gaussians, with_dropout_strategy.gaussians)
    assert plain.history == with_dropout_strategy.history


def test_dropout_drops_about_p_of_the_candidates_and_grows_fewer_gaussians(lr_views, lr_gaussians, prior):
    results = {p: gaussiansr(lr_gaussians, lr_views, prior,
                             GaussianSRSettings(iterations=12, dropout=p, seed=3, **FAST)) for p in (0.0, 0.5)}
    counts = results[0.5].stats["densification"]
    n, dropped = counts["candidates"], counts["dropped"]
    assert n > 200
    assert abs(dropped - n / 2) <= 4 * math.sqrt(n / 4)  # Binomial(n, 1/2) within four standard deviations
    plain = results[0.0].stats["densification"]  # p = 0 counts its candidates too, and drops none
    assert plain["candidates"] > 200 and plain["dropped"] == 0
    assert len(results[0.5].gaussians) < len(results[0.0].gaussians)
    assert results[0.5].summary()["num_gaussians"] == len(results[0.5].gaussians)


def test_invalid_dropout_is_refused(lr_views):
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"`dropout` must lie in \[0, 1\)"):
            DropoutStrategy(dropout=p)
        with pytest.raises(pydantic.ValidationError, match="dropout"):
            GaussianSRSettings(dropout=p)
        with pytest.raises(ValueError, match=r"`densify_dropout` must lie in \[0, 1\)"):
            fit(lr_views, FitConfig(iterations=2, **FAST), densify_dropout=p)
    with pytest.raises(ValueError, match="dropout.*default strategy, not 'mcmc'"):
        fit(lr_views, FitConfig(iterations=2, strategy="mcmc", **FAST), densify_dropout=0.5)


# --- 3DSR ----------------------------------------------------------------------------------------------------------


def test_3dsr_timesteps_are_evenly_spaced_down_to_zero():
    prior = tiny_prior(num_train_timesteps=1000)
    assert timesteps(prior, ThreeDSRSettings(steps=4, t_start=1.0)) == [999, 666, 333, 0]  # StableSR-Turbo's
    assert timesteps(prior, ThreeDSRSettings(steps=1)) == [999]
    assert timesteps(prior, ThreeDSRSettings(steps=3, t_start=0.5)) == [500, 250, 0]


def test_interrupted_3dsr_resumes_to_the_uninterrupted_result(lr_views, lr_gaussians, prior, tmp_path):
    settings = ThreeDSRSettings(steps=3, iterations=4, checkpoint_every=2, **FAST)
    whole = three_dsr(lr_gaussians, lr_views, prior, settings)

    class Stop(Exception):
        pass

    def stop_in_stage_1(state: dict) -> None:
        if state["stage"] == 1 and state["step"] == 7:  # step 3 of stage 1; its fit checkpointed step 2
            raise Stop

    with pytest.raises(Stop):
        three_dsr(lr_gaussians, lr_views, prior, settings, checkpoint_dir=tmp_path, progress=stop_in_stage_1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-00", "fit-01", "stage-00.pt"]
    assert [p.name for p in (tmp_path / "fit-01").iterdir()] == ["fit-00000002.pt"]  # stage 1 resumes mid-fit
    seen: list[dict] = []
    resumed = three_dsr(lr_gaussians, lr_views, prior, settings, checkpoint_dir=tmp_path, progress=seen.append)
    assert [(s["stage"], s["step"]) for s in seen] == [(1, 7), (1, 8)] + [(2, k) for k in range(9, 13)]
    assert same_gaussians(whole.gaussians, resumed.gaussians)  # bit for bit on the CPU
    assert resumed.history == whole.history
    schedule = whole.stats["timesteps"]
    assert schedule == [49, 24, 0]
    assert [(row["stage"], row["t"]) for row in whole.history] == [(k, schedule[k]) for k in range(3) for _ in range(4)]
    assert {"hr_loss", "lr_loss", "loss", "num_gaussians"} <= set(whole.history[0])
    # A finished run in the same folder returns the result at once.
    again = three_dsr(lr_gaussians, lr_views, prior, settings, checkpoint_dir=tmp_path, progress=seen.append)
    assert same_gaussians(again.gaussians, whole.gaussians) and len(seen) == 6


# --- the posterior step --------------------------------------------------------------------------------------------


def _posterior_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and z_t [2,3,16,16] (standard normal)."""
    generator = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, 16, 16, generator=generator)
    z_t = torch.randn(2, 3, 16, 16, generator=generator)
    return x0, z_t


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_posterior_step_is_ddims_step_with_eta(eta: float):
    """Against diffusers' DDIMScheduler.step, given the eps that x0 implies and the same noise generator."""
    prior = tiny_prior(num_train_timesteps=1000)
    x0, z_t = _posterior_inputs()
    scheduler = DDIMScheduler.from_config(prior.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)  # steps of 100
    t, t_prev = 500, 400
    a_t = float(prior.alphas_cumprod[t])
    eps = (z_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    ours = prior.posterior_step(z_t, t, t_prev, x0, generator=torch.Generator().manual_seed(9), eta=eta)
    theirs = scheduler.step(eps, t, z_t, eta=eta, generator=torch.Generator().manual_seed(9)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if eta == 0:  # deterministic: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        a_prev = float(prior.alphas_cumprod[t_prev])
        torch.testing.assert_close(ours, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps)
        assert torch.equal(ours, prior.posterior_step(z_t, t, t_prev, x0, eta=0.0))


def test_posterior_step_with_eta_1_is_ddpms_posterior():
    prior = tiny_prior(num_train_timesteps=1000)
    x0, z_t = _posterior_inputs()
    # One step t -> t - 1 is DDPMScheduler.step with the eps implied by x0, noise included.
    t = 300
    a_t = float(prior.alphas_cumprod[t])
    eps = (z_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    ours = prior.posterior_step(z_t, t, t - 1, x0, generator=torch.Generator().manual_seed(2), eta=1.0)
    ddpm = DDPMScheduler.from_config(prior.scheduler.config)
    theirs = ddpm.step(eps, t, z_t, generator=torch.Generator().manual_seed(2)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # A longer jump t -> s: Gaussian around DDPM's posterior mean with variance (1-a_s)/(1-a_t) (1 - a_t/a_s).
    t, s = 600, 200
    a_t, a_s = float(prior.alphas_cumprod[t]), float(prior.alphas_cumprod[s])
    z_t = z_t[:1].expand(512, -1, -1, -1)
    x0 = x0[:1].expand(512, -1, -1, -1)
    samples = prior.posterior_step(z_t, t, s, x0, generator=torch.Generator().manual_seed(4), eta=1.0)
    mean = (math.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t) * x0
            + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * z_t)
    variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    residual = (samples - mean).double()
    assert abs(float(residual.mean())) < 4 * math.sqrt(variance / residual.numel())
    assert float(residual.var()) == pytest.approx(variance, rel=0.02)  # 393k samples: ~0.2% standard error


def test_posterior_step_before_zero_returns_x0():
    prior = tiny_prior()
    x0, z_t = _posterior_inputs()
    assert prior.posterior_step(z_t, 10, -1, x0) is x0


# --- SR -> 3DGS ----------------------------------------------------------------------------------------------------


def test_sr_then_fit_checkpoints_its_sr_targets(lr_views, lr_gaussians, tmp_path):
    prior = tiny_prior()
    calls: list[int] = []
    upscale = prior.upscale

    def counting_upscale(lr, steps=None, generator=None):
        calls.append(lr.shape[0])
        return upscale(lr, steps, generator)

    prior.upscale = counting_upscale
    settings = SRThenFitSettings(iterations=3, sample_steps=2, **FAST)
    first = sr_then_fit(lr_gaussians, lr_views, prior, settings, checkpoint_dir=tmp_path)
    train = len(lr_views.split("train"))
    assert calls == [1] * train  # one view at a time
    assert (tmp_path / TARGETS_FILE).is_file()
    saved = torch.load(tmp_path / TARGETS_FILE, weights_only=True)["targets"]
    assert saved.shape == (train, 64, 64, 3)
    second = sr_then_fit(lr_gaussians, lr_views, prior, settings, checkpoint_dir=tmp_path)
    assert calls == [1] * train  # the prior was not called again
    assert same_gaussians(first.gaussians, second.gaussians)
    assert first.stats["method"] == "sr_then_fit"
    # The reported wall time still counts the first call's SR and fit, not only the second call's own time.
    sr_seconds = torch.load(tmp_path / TARGETS_FILE, weights_only=True)["seconds"]
    fit_seconds = torch.load(next((tmp_path / "fit").glob("fit-*.pt")), weights_only=True)["seconds"]
    assert second.seconds >= sr_seconds + fit_seconds
    assert abs(second.seconds - first.seconds) < 0.25 * first.seconds


# --- the distill node ----------------------------------------------------------------------------------------------


def distill_spec(prior_folder: Path) -> dict:
    """A 64 px scene shrunk x4, a 10-step LR fit, a tiny x4 prior and every method (a few steps each)."""
    common = {**FAST, "iterations": 3}
    return {
        "name": "tiny-distill",
        "nodes": {
            "scene": {"task": "synthetic_scene", "params": {"name": "tiles", "resolution": 64, "views": 6,
                                                            "test_every": 3, "supersample": 1, "num_points": 200}},
            "lowres": {"task": "downsample", "inputs": {"views": "scene"}, "params": {"factor": 4}},
            "lr_gs": {"task": "fit_gaussians", "inputs": {"views": "lowres"}, "params": {**FAST, "iterations": 10}},
            "prior": {"task": "load_prior", "params": {"kind": "sr3", "source": str(prior_folder)}},
            "sds": {"task": "distill", "inputs": {"gaussians": "lr_gs", "views": "lowres", "prior": "prior"},
                    "params": {"method": "gaussiansr", **common}},
            "tdsr": {"task": "distill", "inputs": {"gaussians": "lr_gs", "views": "lowres", "prior": "prior"},
                     "params": {"method": "3dsr", "steps": 2, **common}},
            "srfit": {"task": "distill", "inputs": {"gaussians": "lr_gs", "views": "lowres", "prior": "prior"},
                      "params": {"method": "sr_then_fit", "sample_steps": 2, **common}},
        },
    }


def test_distill_node_runs_every_method_caches_and_validates(tmp_path, prefect_api):
    prior = tiny_prior()
    save_sr3(tmp_path / "prior", prior.unet, prior.settings)
    spec, store = distill_spec(tmp_path / "prior"), tmp_path / "store"
    # A param another method uses, or an invalid value, fails validation before anything runs, naming it.
    wrong = copy.deepcopy(spec)
    wrong["nodes"]["sds"]["params"]["steps"] = 2
    wrong["nodes"]["tdsr"]["params"]["dropout"] = 0.5
    with pytest.raises(SpecError) as error:
        validate(wrong)
    message = str(error.value)
    assert "node 'sds' (distill)" in message and "method 'gaussiansr' does not use steps" in message
    assert "node 'tdsr' (distill)" in message and "method '3dsr' does not use dropout" in message
    wrong = copy.deepcopy(spec)
    wrong["nodes"]["sds"]["params"].update(t_min=0.6, t_max=0.4)
    with pytest.raises(SpecError, match=r"node 'sds' \(distill\).*t_min.*must not exceed.*t_max"):
        validate(wrong)

    reports = {r["node"]: r for r in run_pipeline(spec=spec, store=str(store))}
    assert {r["status"] for r in reports.values()} == {"ran"}
    expected_columns = {"sds": {"lr_loss", "sds", "t"}, "tdsr": {"hr_loss", "lr_loss", "stage", "t"},
                        "srfit": {"hr_loss", "lr_loss"}}
    methods = {"sds": "gaussiansr", "tdsr": "3dsr", "srfit": "sr_then_fit"}
    for node, method in methods.items():
        out = store / reports[node]["path"]
        gaussians = Gaussians.load_ply(out / "gaussians.ply")
        summary = json.loads((out / "fit.json").read_text())
        assert summary["method"] == method and summary["seconds"] > 0
        assert summary["num_gaussians"] == len(gaussians)
        assert summary["prior"]["scale"] == 4 and summary["settings"]["iterations"] == 3
        with open(out / "history.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert expected_columns[node] <= set(rows[0])
        assert len(rows) == 3 * (2 if node == "tdsr" else 1)
    assert "densification" in json.loads((store / reports["sds"]["path"] / "fit.json").read_text())
    with open(store / reports["tdsr"]["path"] / "history.csv") as handle:
        assert [(row["stage"], row["t"]) for row in csv.DictReader(handle)] == [("0", "49")] * 3 + [("1", "0")] * 3

    again = run_pipeline(spec=spec, store=str(store))
    assert {r["status"] for r in again} == {"cached"}

    # A prior whose scale differs from the views' downsampling factor: a clear error naming both.
    spec["nodes"]["lowres2"] = {"task": "downsample", "inputs": {"views": "scene"}, "params": {"factor": 2}}
    spec["nodes"]["mismatch"] = {"task": "distill", "inputs": {"gaussians": "lr_gs", "views": "lowres2",
                                                              "prior": "prior"},
                                 "params": {"method": "gaussiansr", **FAST, "iterations": 2}}
    with pytest.raises(PipelineFailed, match=r"node 'mismatch' \(distill\) failed: .*downsampled by 2, but the "
                                             r"prior sr3 super-resolves x4"):
        run_pipeline(spec=spec, store=str(store))
