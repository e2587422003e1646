"""rasterize on real Gaussians (garden_test.npz) and under gsplat's DefaultStrategy, on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gsr_core.cameras import intrinsics_from_fov, look_at
from gsr_core.render import rasterize
from gsr_core.render._reference import reference_alphas, reference_project

GARDEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gaussians" / "garden_test.npz"


@pytest.fixture(scope="module")
def garden():
    if not GARDEN.is_file():
        pytest.skip(f"real Gaussians not found at {GARDEN} (the shared data folder beside the repository)")
    data = np.load(GARDEN)
    means = torch.from_numpy(data["means3d"]).float()
    n = means.shape[0]
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return {
        "means": means,
        "quats": quats,
        "scales": torch.full((n, 3), 0.005),  # small isotropic Gaussians
        "opacities": torch.ones(n),  # full opacity: alphas clamp at 0.999, pixels stop early
        "colors": torch.from_numpy(data["colors"]).float() / 255.0,
        "viewmats": torch.from_numpy(data["viewmats"]).float(),
        "Ks": torch.from_numpy(data["Ks"]).float(),
        "width": int(data["width"]),
        "height": int(data["height"]),
    }


def _downscaled(garden, factor):
    """Cameras for an image ``factor`` times smaller (sizes rounded up; intrinsics scaled exactly)."""
    scale = torch.tensor([factor, factor, 1.0])
    return {
        **garden,
        "Ks": garden["Ks"] * scale[None, :, None],
        "width": math.ceil(garden["width"] * factor),
        "height": math.ceil(garden["height"] * factor),
    }


def test_garden_renders_finite_images_whose_coverage_matches_the_reference(garden):
    assert garden["means"].shape == (138_766, 3) and garden["viewmats"].shape == (3, 4, 4)
    scene = _downscaled(garden, 1 / 24)  # 27 x 18 pixels: the brute-force reference stays fast
    colours, alphas, info = rasterize(**scene, backgrounds=torch.zeros(3, 3))
    assert colours.shape == (3, 18, 27, 3)
    assert torch.isfinite(colours).all() and torch.isfinite(alphas).all()
    assert ((alphas >= 0) & (alphas <= 1)).all()
    assert 0.5 < (alphas > 0.5).float().mean() < 1.0  # mostly covered, not everywhere
    visible = (info["radii"] > 0).all(-1)
    assert 10_000 < int(visible[0].sum()) < 138_766

    # Brute force over every Gaussian that can reach the image (alpha < 1/255 beyond 4 sqrt(trace) pixels).
    means = scene["means"].double()
    means2d, conics, depths, covars2d = reference_project(
        means, scene["quats"].double(), scene["scales"].double(), scene["viewmats"][0].double(),
        scene["Ks"][0].double(), scene["width"], scene["height"],
    )  # fmt: skip
    margin = 4 * torch.sqrt(covars2d[:, 0, 0] + covars2d[:, 1, 1])
    u, v = means2d.unbind(-1)
    near = (depths >= 0.01) & (u > -margin) & (u < scene["width"] + margin) & (v > -margin)
    near &= v < scene["height"] + margin
    expected = reference_alphas(
        means2d[near], conics[near], scene["opacities"][near].double(), depths[near], scene["width"], scene["height"],
        chunk=8192,
    )
    assert (alphas[0, ..., 0].double() - expected).abs().max() < 1e-4


def test_garden_quarter_resolution_is_finite(garden):
    scene = _downscaled(garden, 1 / 4)  # 162 x 105 with real densities
    colours, alphas, _ = rasterize(**scene)
    assert torch.isfinite(colours).all() and torch.isfinite(alphas).all()
    assert (alphas > 0.5).float().mean() > 0.5


@pytest.mark.parametrize("absgrad", [False, True])
def test_gsplat_default_strategy_runs_on_cpu_with_our_info(absgrad):
    strategy_module = pytest.importorskip("gsplat.strategy", reason="gsplat is not installed")
    generator = torch.Generator().manual_seed(0)
    n = 60
    params = torch.nn.ParameterDict(
        {
            "means": torch.nn.Parameter((torch.rand(n, 3, generator=generator) - 0.5) * 1.5),
            "scales": torch.nn.Parameter(torch.full((n, 3), math.log(0.08))),
            "quats": torch.nn.Parameter(torch.randn(n, 4, generator=generator)),
            "opacities": torch.nn.Parameter(torch.logit(torch.full((n,), 0.5))),
            "sh0": torch.nn.Parameter(torch.rand(n, 1, 3, generator=generator)),
            "shN": torch.nn.Parameter(torch.zeros(n, 3, 3)),
        }
    )
    optimizers = {name: torch.optim.Adam([param], lr=1e-3) for name, param in params.items()}
    strategy = strategy_module.DefaultStrategy(
        refine_start_iter=0, refine_every=1, grow_grad2d=1e-9, prune_opa=0.0, reset_every=10_000, absgrad=absgrad
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    viewmats = torch.stack([look_at(torch.tensor([0.0, 0.0, -3.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))])
    Ks = intrinsics_from_fov(32, 24, 50.0)[None]
    target = torch.rand(1, 24, 32, 3, generator=generator)
    for step in range(2):
        colors = torch.cat([params["sh0"], params["shN"]], dim=1)
        rendered, _, info = rasterize(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
            colors, viewmats.float(), Ks.float(), 32, 24, sh_degree=1, absgrad=absgrad,
        )  # fmt: skip
        strategy.step_pre_backward(params, optimizers, state, step, info)
        ((rendered - target) ** 2).mean().backward()
        if step == 0:
            visible = (info["radii"][0] > 0).all(-1)
            assert visible.any()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad()
    # Step 1 refined: every visible Gaussian had a screen-space gradient above the tiny threshold and grew.
    assert params["means"].shape[0] > n
    assert all(param.shape[0] == params["means"].shape[0] for param in params.values())
    assert torch.isfinite(params["means"]).all()
