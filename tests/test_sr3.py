"""SR3: noise-level conditioning, the residual parameterisation, sampling, prior folders and the training node."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from flows.pipeline import run_pipeline
from gsr_core.images import write_image
from gsr_core.priors import load_prior
from gsr_core.priors.sr3 import SR3Prior, SR3Settings, cascade, sr3_unet
from gsr_core.priors.sr3_train import CHECKPOINT, SR3TrainConfig, sample_noise_levels, train_sr3

T = 20  # a tiny schedule keeps iterative refinement over all T steps cheap
TINY = dict(pool_size=4, pool_resolution=32, crop=16, batch_size=2, steps=4, channels=[32, 32],
            num_train_timesteps=T, validate_every=2, validate_images=1, validate_resolution=16, validate_steps=2,
            checkpoint_every=2, sample_steps=4)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_prior(residual: bool = True, seed: int = 0) -> SR3Prior:
    torch.manual_seed(seed)
    return SR3Prior(sr3_unet((32, 32)), SR3Settings(residual=residual, num_train_timesteps=T, default_steps=5))


def lr_images(batch: int = 2, height: int = 4, width: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=seeded(seed)) * 2 - 1


# --- conditioning and parameterisation ----------------------------------------------------------------------------


def test_training_noise_levels_lie_between_adjacent_schedule_values():
    gammas = SR3Settings(num_train_timesteps=T).scheduler().alphas_cumprod.to(torch.float64)
    upper = torch.cat([torch.ones(1, dtype=torch.float64), gammas[:-1]])
    t = torch.arange(T).repeat(500)
    u = torch.rand(len(t), generator=seeded(0), dtype=torch.float64)
    level = sample_noise_levels(t, u, gammas)
    assert level.dtype == torch.float32 and level.shape == t.shape
    gamma = level.double() ** 2
    assert (gamma >= gammas[t] * (1 - 1e-6)).all() and (gamma <= upper[t] * (1 + 1e-6)).all()
    # Linear in u, so uniform in gamma between the two values (up to the float32 level's rounding).
    position = (gamma - gammas[t]) / (upper[t] - gammas[t])
    assert (position - u).abs().max() < 0.01
    # The ends are the schedule's own levels; sampling at step t feeds the lower one.
    torch.testing.assert_close(sample_noise_levels(t, torch.zeros_like(u), gammas), gammas[t].sqrt().float())
    torch.testing.assert_close(sample_noise_levels(t, torch.ones_like(u), gammas), upper[t].sqrt().float())
    assert sample_noise_levels(torch.tensor([0]), torch.ones(1, dtype=torch.float64), gammas).item() == 1.0
    steps = torch.tensor([0, 7, T - 1])
    torch.testing.assert_close(tiny_prior().noise_level(steps, 3),
                               sample_noise_levels(steps, torch.zeros(3, dtype=torch.float64), gammas))


@pytest.mark.parametrize("residual", [True, False])
def test_the_network_sees_the_diffusion_variable_of_its_parameterisation(residual: bool):
    prior = tiny_prior(residual)
    cond = prior.condition(lr_images())
    hr = torch.rand(cond.shape, generator=seeded(1)) * 2 - 1
    eps = torch.randn(cond.shape, generator=seeded(2))
    t = torch.tensor([3, 15])
    gamma = prior.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    z_0 = prior.encode(hr, cond)
    # Residual: z = (HR - u) / residual_scale; plain SR3 diffuses the HR image itself.
    expected_z0 = (hr - cond) / prior.settings.residual_scale if residual else hr
    torch.testing.assert_close(z_0, expected_z0)
    torch.testing.assert_close(prior.decode(z_0, cond), hr, rtol=1e-5, atol=1e-5)
    z_t = prior.add_noise(z_0, eps, t)
    torch.testing.assert_close(z_t, gamma.sqrt() * expected_z0 + (1 - gamma).sqrt() * eps)
    seen = {}
    hook = prior.unet.register_forward_pre_hook(lambda _, args: seen.update(sample=args[0], timestep=args[1]))
    prior.predict_eps(z_t, t, cond)
    hook.remove()
    torch.testing.assert_close(seen["sample"][:, :3], z_t)
    torch.testing.assert_close(seen["sample"][:, 3:], cond)
    torch.testing.assert_close(seen["timestep"], 1000 * prior.alphas_cumprod[t].sqrt().float())
    # x0 from a known eps decodes to the clean HR image.
    torch.testing.assert_close(prior.decode(prior.predict_x0(z_t, t, cond, eps=eps), cond), hr, rtol=1e-5, atol=1e-5)
    if residual:
        with pytest.raises(ValueError, match="pass `cond`"):
            prior.encode(hr)


# --- sampling -----------------------------------------------------------------------------------------------------


def test_ddim_and_iterative_refinement_give_hr_images():
    prior, lr = tiny_prior(), lr_images()
    ddim_steps, refine_steps = [], []
    ddim = prior.upscale(lr, generator=seeded(0), progress=ddim_steps.append)
    refined = prior.refine(lr, generator=seeded(0), progress=refine_steps.append)
    assert len(ddim_steps) == prior.settings.default_steps and len(refine_steps) == T  # refine: every step
    for sample in (ddim, refined):
        assert sample.shape == (2, 3, 16, 24) and torch.isfinite(sample).all()
        assert sample.min() >= -1 and sample.max() <= 1
    assert not torch.equal(ddim, refined)
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match=r"`steps` must lie in \[1, 20\]"):
            prior.upscale(lr, steps=steps)
    with pytest.raises(ValueError, match=r"LR images must be a float tensor \[B,3,h,w\]"):
        prior.upscale(lr[:, :2])


def test_cascade_of_two_x4_priors_gives_x16():
    first, second = tiny_prior(seed=0), tiny_prior(seed=1)
    hr = cascade([first, second], lr_images(1, 4, 4), steps=2, generator=seeded(0))
    assert hr.shape == (1, 3, 64, 64) and torch.isfinite(hr).all() and hr.abs().max() <= 1
    with pytest.raises(ValueError, match="at least one prior"):
        cascade([], lr_images())


def test_prior_folder_round_trip_gives_identical_outputs(tmp_path: Path):
    prior = tiny_prior()
    prior.save(tmp_path / "sr3")
    loaded = load_prior(tmp_path / "sr3", device="cpu")
    assert isinstance(loaded, SR3Prior) and loaded.settings == prior.settings
    lr = lr_images()
    assert torch.equal(loaded.upscale(lr, 3, seeded(0)), prior.upscale(lr, 3, seeded(0)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "prior.json").write_text(json.dumps({"kind": "stablesr"}))
    with pytest.raises(ValueError, match="prior.json: expected prior kind 'sr3', found 'stablesr'"):
        SR3Prior.from_folder(other)


# --- training -----------------------------------------------------------------------------------------------------


def ema_weights(folder: Path) -> dict[str, torch.Tensor]:
    return SR3Prior.from_folder(folder).unet.state_dict()


def test_train_sr3_writes_the_prior_its_curve_and_summary(tmp_path: Path):
    summary = train_sr3(SR3TrainConfig(**TINY), tmp_path / "out")
    prior = load_prior(tmp_path / "out", device="cpu")
    assert isinstance(prior, SR3Prior) and prior.settings.residual and prior.settings.default_steps == 4
    assert prior.upscale(lr_images(), generator=seeded(0)).shape == (2, 3, 16, 24)
    with open(tmp_path / "out" / "validation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert all(0 < float(row["psnr"]) < 60 and 0 < float(row["bicubic_psnr"]) < 60 for row in rows)
    assert (tmp_path / "out" / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "out" / "training.json").read_text())
    assert written["steps"] == summary["steps"] == 4 and written["config"]["channels"] == [32, 32]
    assert written["validation_psnr"] == pytest.approx(float(rows[-1]["psnr"]))


class Crash(Exception):
    pass


def test_interrupted_training_resumes_bit_identically(tmp_path: Path):
    config = SR3TrainConfig(**TINY)
    train_sr3(config, tmp_path / "straight")

    def crash_after_step_3(report: dict) -> None:  # past the checkpoint at step 2
        if report["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train_sr3(config, tmp_path / "resumed", tmp_path / "scratch", progress=crash_after_step_3)
    assert (tmp_path / "scratch" / CHECKPOINT).is_file() and not (tmp_path / "resumed").exists()
    steps = []
    train_sr3(config, tmp_path / "resumed", tmp_path / "scratch", progress=lambda r: steps.append(r["step"]))
    assert steps == [3, 4]
    straight, resumed = ema_weights(tmp_path / "straight"), ema_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    curves = [(tmp_path / run / "validation.csv").read_text() for run in ("straight", "resumed")]
    assert curves[0] == curves[1]
    with pytest.raises(ValueError, match=r"written for another training configuration \(differs in seed\)"):
        train_sr3(SR3TrainConfig(**{**TINY, "seed": 1}), tmp_path / "other", tmp_path / "scratch")
    # `steps` may change on resume: training on from the last checkpoint continues the same trajectory.
    longer = []
    summary = train_sr3(SR3TrainConfig(**{**TINY, "steps": 5}), tmp_path / "longer", tmp_path / "scratch",
                        progress=lambda r: longer.append(r["step"]))
    assert longer == [5] and summary["steps"] == 5


def test_training_on_a_folder_of_images(tmp_path: Path):
    folder = tmp_path / "images"
    for index in range(3):
        write_image(folder / f"{index}.png", torch.rand(20, 24, 3, generator=seeded(index)))
    summary = train_sr3(SR3TrainConfig(**{**TINY, "source": str(folder), "steps": 2}), tmp_path / "out")
    assert summary["steps"] == 2 and (tmp_path / "out" / "prior.json").is_file()
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "small" / "tiny.png", torch.rand(8, 8, 3))
    for source, message in ((tmp_path / "absent", "does not exist"), (tmp_path / "empty", "holds no images"),
                            (tmp_path / "small", "8x8 is smaller than the crop size 16")):
        with pytest.raises(ValueError, match=message):
            train_sr3(SR3TrainConfig(**{**TINY, "source": str(source)}), tmp_path / "bad")


def test_train_sr3_node_in_a_pipeline(tmp_path: Path, prefect_api):
    spec = {"name": "tiny-sr3", "nodes": {"sr3": {"task": "train_sr3", "params": {**TINY, "steps": 2}}}}
    store = tmp_path / "store"
    first = run_pipeline(spec=spec, store=str(store))
    assert [(r["node"], r["status"]) for r in first] == [("sr3", "ran")]
    output = store / first[0]["path"]
    assert isinstance(load_prior(output, device="cpu"), SR3Prior)
    assert {"validation.csv", "validation.png", "training.json"} <= {p.name for p in output.iterdir()}
    again = run_pipeline(spec=spec, store=str(store))
    assert [(r["node"], r["status"], r["key"]) for r in again] == [("sr3", "cached", first[0]["key"])]
