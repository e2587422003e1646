"""Fitting Gaussians: quality on a synthetic scene, densification, exact resume, the NaN guard, backgrounds,
the config's schedule, and rendering the result at any cameras."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pydantic
import torch

import gsr_core.fit as fit_module
from gsr_core.cameras import Camera, intrinsics_from_fov, look_at
from gsr_core.data.points import PointCloud
from gsr_core.data.synthetic import write_synthetic_scene
from gsr_core.data.views import Views, ViewsWriter
from gsr_core.fit import FitConfig, LearningRates, Schedule, fit, scene_extent
from gsr_core.gaussians import Gaussians
from gsr_core.metrics import psnr
from gsr_core.render_views import render_views

FAST = {"device": "cpu", "backend": "torch"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Views:
    """A 32 px synthetic scene: 12 orbit views (9 train, 3 test) and a 300-point cloud."""
    folder = tmp_path_factory.mktemp("fit") / "tiles"
    write_synthetic_scene(folder, "tiles", resolution=32, views=12, seed=0, test_every=4, supersample=2, num_points=300)
    return Views.read(folder)


def camera_at(eye, size: int = 8) -> Camera:
    """A square pinhole camera at ``eye`` looking at the origin, z up."""
    eye = torch.as_tensor(eye, dtype=torch.float64)
    return Camera(intrinsics_from_fov(size, size, 50.0), look_at(eye, torch.zeros(3), torch.tensor([0.0, 0.0, 1.0])),
                  size, size)  # fmt: skip


def cameras_of(views: Views, split: str | None) -> list[Camera]:
    return [record.camera for record in views.split(split)]


def test_fit_learns_the_scene_and_generalises(scene):
    config = FitConfig(iterations=200, sh_degree=0, refine_start=40, refine_stop=160, refine_every=40,
                       reset_every=10_000, **FAST)  # fmt: skip
    reports = []
    result = fit(scene, config, progress=reports.append)

    assert [report["step"] for report in reports] == list(range(1, 201))
    assert set(reports[0]) >= {"step", "loss", "psnr", "num_gaussians"}
    assert result.iterations == 200 and len(result.history) == 200
    assert result.background == pytest.approx(tuple(scene.metadata["background"]))  # background "auto"
    assert result.num_gaussians > 300, "the default strategy clones and splits under-reconstructed Gaussians"
    assert result.num_gaussians == len(result.gaussians) == result.history[-1]["num_gaussians"]
    first, last = result.history[0]["loss"], sum(r["loss"] for r in result.history[-10:]) / 10
    assert last < 0.6 * first

    test_cameras, test_images = cameras_of(scene, "test"), scene.load_rgb(scene.split("test"))
    initial = Gaussians.from_points(scene.points(), sh_degree=0)
    background = result.background
    initial_psnr = float(psnr(render_views(initial, test_cameras, background=background), test_images).mean())
    test_psnr = float(psnr(render_views(result.gaussians, test_cameras, background=background), test_images).mean())
    assert result.train_psnr > 17.5
    assert test_psnr > initial_psnr + 4.0, (initial_psnr, test_psnr)
    assert result.train_psnr > test_psnr - 0.5  # trained on the train views only


def test_mcmc_fit_grows_within_its_cap(scene):
    config = FitConfig(iterations=40, strategy="mcmc", sh_degree=0, cap_max=340, refine_start=5, refine_every=5,
                       refine_stop=40, **FAST)  # fmt: skip
    result = fit(scene, config)
    counts = [record["num_gaussians"] for record in result.history]
    assert counts[0] == 300 and max(counts) == counts[-1] == 340
    assert all(math.isfinite(record["loss"]) for record in result.history)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("strategy", ["default", "mcmc"])
def test_resumed_fit_ends_exactly_where_an_uninterrupted_one_does(scene, tmp_path, strategy):
    """Interrupted at step 20 (checkpoint at 16), resumed: the same parameters bit for bit, because the
    checkpoint holds the Adam moments, strategy state and the global RNG state, and the view order is a
    function of (seed, step). The schedule densifies, resets opacities and raises the SH degree inside
    the window, and backgrounds are random, so every piece of state matters."""
    config = FitConfig(iterations=24, strategy=strategy, sh_degree=1, sh_degree_interval=10, refine_start=2,
                       refine_stop=22, refine_every=5, reset_every=12, cap_max=330, background="random",
                       checkpoint_every=8, seed=3, **FAST)  # fmt: skip
    reference = fit(scene, config)

    def stop_at_20(report):
        if report["step"] == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(scene, config, checkpoint_dir=tmp_path, progress=stop_at_20)
    assert [path.name for path in tmp_path.iterdir()] == ["fit-00000016.pt"]

    resumed = fit(scene, config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 16
    for name, value in reference.gaussians.params().items():
        assert torch.equal(getattr(resumed.gaussians, name), value), name
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]
    assert reference.num_gaussians != 300  # densification did happen

    again = fit(scene, config, checkpoint_dir=tmp_path)  # the final checkpoint: nothing left to do
    assert again.resumed_from == 24 and torch.equal(again.gaussians.means, reference.gaussians.means)


def test_checkpoint_of_another_fit_is_refused(scene, tmp_path):
    fit(scene, FitConfig(iterations=2, sh_degree=0, seed=0, **FAST), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"belongs to another fit \(differs in \['seed'\]\)"):
        fit(scene, FitConfig(iterations=2, sh_degree=0, seed=1, **FAST), checkpoint_dir=tmp_path)
    resumed = fit(scene, FitConfig(iterations=2, sh_degree=0, seed=0, checkpoint_every=7, device="cpu"),
                  checkpoint_dir=tmp_path)  # fmt: skip
    assert resumed.resumed_from == 2  # device, backend and checkpoint period may change


def test_absurd_learning_rate_stops_with_a_clear_error(scene):
    huge = LearningRates(means=1e30, scales=1e30, quats=1e30, opacities=1e30, sh0=1e30, shN=1e30)
    with pytest.raises(ValueError, match=r"fit diverged at step \d+ \(0-based, of 5\): .*(non-finite|loss is nan)"):
        fit(scene, FitConfig(iterations=5, sh_degree=0, lrs=huge, **FAST))


def test_nan_keeps_the_last_good_checkpoint(scene, tmp_path, monkeypatch):
    config = FitConfig(iterations=16, sh_degree=0, checkpoint_every=5, refine_start=1000, **FAST)
    real_rasterize, calls = fit_module.rasterize, []

    def poisoned(*args, **kwargs):  # a numerical blow-up from step 12 on
        colors, alphas, info = real_rasterize(*args, **kwargs)
        calls.append(1)
        return (colors * math.nan if len(calls) > 12 else colors), alphas, info

    monkeypatch.setattr(fit_module, "rasterize", poisoned)
    with pytest.raises(ValueError, match=r"diverged at step 12 .*loss is nan.*fit-00000010.pt is kept"):
        fit(scene, config, checkpoint_dir=tmp_path)
    kept = torch.load(tmp_path / "fit-00000010.pt", weights_only=True)
    assert kept["step"] == 10 and all(torch.isfinite(value).all() for value in kept["params"].values())

    monkeypatch.setattr(fit_module, "rasterize", real_rasterize)
    result = fit(scene, config, checkpoint_dir=tmp_path)
    assert result.resumed_from == 10 and len(result.history) == 16


def transparent_views(folder: Path, count: int = 4, size: int = 16) -> Views:
    """Views whose RGBA images are fully transparent (red, alpha 0), with a small point cloud."""
    writer = ViewsWriter(folder)
    image = torch.zeros(size, size, 4)
    image[..., 0] = 1.0
    for index in range(count):
        angle = 2 * math.pi * index / count
        writer.add(f"v{index}", "train", camera_at([3 * math.cos(angle), 3 * math.sin(angle), 1.0], size), image)
    generator = torch.Generator().manual_seed(0)
    writer.close(PointCloud(torch.rand(64, 3, generator=generator) - 0.5, torch.rand(64, 3, generator=generator)))
    return Views.read(folder)


def test_random_backgrounds_teach_transparency(tmp_path):
    views = transparent_views(tmp_path / "clear")
    result = fit(views, FitConfig(iterations=80, sh_degree=0, background="random", refine_start=1000, **FAST))
    assert result.background == (0.0, 0.0, 0.0)
    assert float(torch.sigmoid(result.gaussians.opacities).max()) < 0.05
    assert result.train_psnr > 25.0  # renders over black are black, as the transparent images are


def test_schedule_scales_to_short_runs():
    assert FitConfig(iterations=30_000).schedule() == Schedule(500, 15_000, 100, 3000, 1000)
    assert FitConfig(iterations=2000).schedule() == Schedule(33, 1000, 96, 200, 67)
    assert FitConfig(iterations=2000, strategy="mcmc").schedule() == Schedule(33, 1667, 100, 200, 67)
    assert FitConfig(iterations=60_000).schedule() == Schedule(500, 15_000, 100, 3000, 1000)
    assert FitConfig(iterations=2000, refine_every=5, reset_every=7).schedule() == Schedule(33, 1000, 5, 7, 67)
    assert FitConfig(strategy="mcmc").strategy_defaults() == {"init_opacity": 0.5, "init_scale": 0.1,
                                                              "opacity_reg": 0.01, "scale_reg": 0.01}  # fmt: skip


def test_config_rejects_unknown_and_invalid_values():
    with pytest.raises(pydantic.ValidationError, match="iteration"):
        FitConfig(iteration=10)
    with pytest.raises(pydantic.ValidationError, match="background"):
        FitConfig(background=(0.0, 2.0, 0.0))
    with pytest.raises(pydantic.ValidationError, match="means"):
        FitConfig(lrs={"means": -1.0})
    assert FitConfig.model_validate({"lrs": {"means": 1e-3}, "background": [1, 1, 1]}).background == (1.0, 1.0, 1.0)


def test_scene_extent_is_gsplats():
    cameras = []
    for index in range(6):
        angle = 2 * math.pi * index / 6
        cameras.append(camera_at([2.0 * math.cos(angle), 2.0 * math.sin(angle), 5.0]))
    assert scene_extent(cameras) == pytest.approx(1.1 * 2.0)


def test_fit_starts_from_given_or_random_gaussians(scene):
    start = Gaussians.from_points(scene.points(), sh_degree=0)
    kept = start.means.clone()
    result = fit(scene, FitConfig(iterations=3, sh_degree=1, refine_start=100, **FAST), init=start)
    assert result.gaussians.sh_degree == 1 and result.history[0]["num_gaussians"] == 300
    assert torch.equal(start.means, kept)  # the caller's tensors are not trained in place

    result = fit(scene, FitConfig(iterations=1, init="random", init_random_count=50, **FAST))
    centre, radius = torch.tensor(scene.metadata["center"]), scene.metadata["radius"]
    assert result.history[0]["num_gaussians"] == 50
    assert bool(((result.gaussians.means - centre).abs() <= radius + 0.1).all())


def test_points_init_needs_points(tmp_path):
    writer = ViewsWriter(tmp_path / "no-points")
    for index in range(2):
        writer.add(f"v{index}", "train", camera_at([3.0, float(index), 0.0]), torch.zeros(8, 8, 3))
    writer.close()
    with pytest.raises(ValueError, match="`init` is 'points' but .* has no point cloud"):
        fit(Views.read(tmp_path / "no-points"), FitConfig(iterations=1, init="points", **FAST))


def test_fit_needs_train_views(tmp_path):
    writer = ViewsWriter(tmp_path / "only-test")
    writer.add("v0", "test", camera_at([3.0, 0.0, 0.0]), torch.zeros(8, 8, 3))
    writer.close()
    with pytest.raises(ValueError, match="no `train` views"):
        fit(Views.read(tmp_path / "only-test"), FitConfig(iterations=1, **FAST))


def test_render_views_batches_cameras_and_shows_the_background(scene):
    gaussians = Gaussians.from_points(scene.points(), sh_degree=1)
    cameras = cameras_of(scene, None)
    one_by_one = render_views(gaussians, cameras, background=(0.2, 0.4, 0.6), cameras_per_batch=1, **FAST)
    batched = render_views(gaussians, cameras, background=(0.2, 0.4, 0.6), cameras_per_batch=5, **FAST)
    assert one_by_one.shape == (12, 32, 32, 3) and one_by_one.device.type == "cpu"
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
    assert 0.0 <= float(batched.min()) and float(batched.max()) <= 1.0

    clear = Gaussians(**{**gaussians.params(), "opacities": torch.full_like(gaussians.opacities, -20.0)})
    empty = render_views(clear, cameras[:2], background=(0.2, 0.4, 0.6), **FAST)
    torch.testing.assert_close(empty, torch.tensor([0.2, 0.4, 0.6]).expand(2, 32, 32, 3))


def test_render_views_checks_its_cameras(scene):
    gaussians = Gaussians.from_points(scene.points(), sh_degree=0)
    small = cameras_of(scene, "train")[0].scaled(0.5)
    with pytest.raises(ValueError, match="one image size"):
        render_views(gaussians, [cameras_of(scene, "train")[0], small], **FAST)
    with pytest.raises(ValueError, match="sh_degree"):
        render_views(gaussians, [small], sh_degree=2, **FAST)


def test_random_init_fills_the_region_object_centric_cameras_look_at():
    """Cameras orbiting a point: random Gaussians go around that point (NeRF-synthetic needs this: gsplat's
    3 x extent cube around the cameras would put almost none of them on the object)."""
    from gsr_core.cameras import Camera, intrinsics_from_fov, look_at
    from gsr_core.fit import looked_at_point

    target = torch.tensor([0.5, -0.2, 0.3], dtype=torch.float64)
    cameras = []
    for index in range(12):
        angle = torch.tensor(2 * torch.pi * index / 12, dtype=torch.float64)
        eye = target + torch.stack([4 * torch.cos(angle), 4 * torch.sin(angle), 1.0 + 0.3 * torch.sin(3 * angle)])
        cameras.append(Camera(intrinsics_from_fov(64, 64, 40.0), look_at(eye, target, torch.tensor([0, 0, 1.0])), 64, 64))
    assert torch.allclose(looked_at_point(cameras), target, atol=1e-9)
    forward = [Camera(intrinsics_from_fov(64, 64, 40.0), look_at(torch.tensor([x, 0.0, 0.0]), torch.tensor([x, 5.0, 0.0]),
                                                                  torch.tensor([0, 0, 1.0])), 64, 64) for x in (0.0, 0.3, 0.6)]
    assert looked_at_point(forward) is None  # parallel axes: no such point, the caller falls back to gsplat's cube
