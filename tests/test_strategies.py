"""Densification strategies on CPU tensors: the default strategy's growth and opacity reset, and the MCMC
operations against the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from gsplat.strategy import DefaultStrategy as GsplatDefaultStrategy
from gsplat.strategy import MCMCStrategy as GsplatMCMCStrategy

from gsr_core.strategy import DefaultStrategy, MCMCStrategy
from gsr_core.strategy.ops import (
    binomial_table,
    compute_relocation,
    covariance,
    inject_noise,
    relocate,
    sample_add,
    sample_by_weight,
)


def make_splats(n: int, seed: int = 0, opacity: float | torch.Tensor = 0.5):
    """gsplat-style params dict and one Adam per parameter, with Adam state from one step."""
    generator = torch.Generator().manual_seed(seed)
    opacities = torch.full((n,), float(opacity)) if not isinstance(opacity, torch.Tensor) else opacity
    tensors = {
        "means": torch.randn(n, 3, generator=generator),
        "quats": torch.randn(n, 4, generator=generator),
        "scales": torch.full((n, 3), math.log(0.05)) + 0.1 * torch.randn(n, 3, generator=generator),
        "opacities": torch.logit(opacities),
        "sh0": torch.randn(n, 1, 3, generator=generator),
        "shN": torch.randn(n, 3, 3, generator=generator),
    }
    params = {name: torch.nn.Parameter(value) for name, value in tensors.items()}
    optimizers = {name: torch.optim.Adam([param], lr=1e-3) for name, param in params.items()}
    sum(param.sum() for param in params.values()).backward()
    for optimizer in optimizers.values():
        optimizer.step()
        optimizer.zero_grad()
    return params, optimizers


def fake_info(n: int, grads: torch.Tensor, size: int = 64) -> dict:
    """The renderer's info as the default strategy reads it: one camera, every Gaussian visible."""
    means2d = torch.zeros(1, n, 2, requires_grad=True)
    means2d.grad = grads.reshape(1, n, 2).clone()
    return {"width": size, "height": size, "n_cameras": 1, "radii": torch.full((1, n, 2), 3, dtype=torch.int32),
            "gaussian_ids": None, "means2d": means2d}  # fmt: skip


def adam_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    state = optimizer.state[param]
    return [state["exp_avg"], state["exp_avg_sq"]]


def test_default_strategy_resets_opacities_where_gsplat_does_not():
    reset_every = 30
    for strategy_class, resets in ((DefaultStrategy, True), (GsplatDefaultStrategy, False)):
        strategy = strategy_class(refine_start_iter=1000, refine_stop_iter=100, reset_every=reset_every)
        params, optimizers = make_splats(20, opacity=0.9)
        state = strategy.initialize_state()
        before = params["opacities"].detach().clone()
        strategy.step_post_backward(params, optimizers, state, reset_every, fake_info(20, torch.zeros(20, 2)))
        opacities = torch.sigmoid(params["opacities"].detach())
        if resets:
            assert bool((opacities <= 2 * strategy.prune_opa + 1e-6).all())
            assert all(not moment.any() for moment in adam_moments(optimizers["opacities"], params["opacities"]))
            assert optimizers["opacities"].param_groups[0]["params"][0] is params["opacities"]
        else:  # gsplat 1.5.3's guard `step % reset_every == 0 & step > 0` is never true
            assert torch.equal(params["opacities"].detach(), before)


def test_opacity_reset_schedule():
    strategy = DefaultStrategy(refine_stop_iter=100, reset_every=30)
    assert [step for step in range(0, 200) if strategy.opacity_reset_due(step)] == [30, 60, 90]


def test_default_strategy_grows_and_prunes_on_cpu():
    n = 40
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=10, refine_stop_iter=1000, grow_scale3d=0.05)
    params, optimizers = make_splats(n, opacity=0.5)
    with torch.no_grad():  # ten small Gaussians to clone, ten large ones to split, five transparent to prune
        params["scales"][:10] = math.log(0.01)
        params["scales"][10:20] = math.log(0.2)
        params["opacities"][35:] = torch.logit(torch.tensor(0.001))
    grads = torch.zeros(n, 2)
    grads[:20] = 1e-3  # above grow_grad2d once scaled to NDC (x width / 2)
    state = strategy.initialize_state(scene_scale=1.0)
    strategy.step_post_backward(params, optimizers, state, 10, fake_info(n, grads))
    assert len(params["means"]) == n + 10 + 10 - 5  # clones + one extra per split - pruned
    for name, param in params.items():
        assert optimizers[name].param_groups[0]["params"][0] is param
        assert all(moment.shape == param.shape for moment in adam_moments(optimizers[name], param))


def eq9_reference(opacity: float, scale: float, copies: int) -> tuple[float, float]:
    """Eq. 9 of the MCMC paper as written: two nested sums with math.comb, in Python floats."""
    new_opacity = 1.0 - (1.0 - opacity) ** (1.0 / copies)
    denominator = sum(
        math.comb(i - 1, k) * (-1) ** k / math.sqrt(k + 1) * new_opacity ** (k + 1)
        for i in range(1, copies + 1)
        for k in range(i)
    )
    return new_opacity, opacity / denominator * scale


def test_relocation_matches_equation_9():
    generator = torch.Generator().manual_seed(0)
    opacities = torch.rand(200, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    scales = torch.rand(200, 3, generator=generator, dtype=torch.float64) + 0.1
    ratios = torch.randint(1, 52, (200,), generator=generator)
    new_opacities, new_scales = compute_relocation(opacities, scales, ratios, binomial_table())
    for i in range(200):
        expected_opacity, expected_scale = eq9_reference(float(opacities[i]), float(scales[i, 0]), int(ratios[i]))
        assert math.isclose(float(new_opacities[i]), expected_opacity, rel_tol=1e-12)
        assert math.isclose(float(new_scales[i, 0]), expected_scale, rel_tol=1e-7)


@pytest.mark.parametrize("copies", [1, 2, 5, 20])
def test_relocated_copies_preserve_opacity_profile(copies):
    """N copies of (o', s') composited at one place: opacity o at the centre, and the same integral of opacity
    along a line through the centre as the original Gaussian (what Eq. 9 is derived from)."""
    opacity, scale = torch.tensor([0.7], dtype=torch.float64), torch.tensor([[0.3, 0.3, 0.3]], dtype=torch.float64)
    new_opacity, new_scale = compute_relocation(opacity, scale, torch.tensor([copies]), binomial_table())
    assert math.isclose(1.0 - (1.0 - float(new_opacity)) ** copies, 0.7, rel_tol=1e-12)
    x = torch.linspace(-4.0, 4.0, 200_001, dtype=torch.float64)
    single = 0.7 * torch.exp(-0.5 * (x / 0.3) ** 2)
    composite = 1.0 - (1.0 - new_opacity * torch.exp(-0.5 * (x / new_scale[0, 0]) ** 2)) ** copies
    assert math.isclose(float(torch.trapezoid(composite, x)), float(torch.trapezoid(single, x)), rel_tol=1e-6)


def rotation_from_axis_angle(axis: torch.Tensor, angle: float) -> torch.Tensor:
    axis = axis / axis.norm()
    x, y, z = axis.tolist()
    skew = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_exp(angle * skew)


def test_covariance_matches_rotated_scales():
    generator = torch.Generator().manual_seed(3)
    quats, rotations = [], []
    for _ in range(16):
        axis = torch.randn(3, generator=generator, dtype=torch.float64)
        angle = float(torch.rand(1, generator=generator)) * 3.0
        unit = axis / axis.norm()
        real = torch.tensor([math.cos(angle / 2)], dtype=torch.float64)
        quats.append(2.5 * torch.cat([real, math.sin(angle / 2) * unit]))  # deliberately not unit length
        rotations.append(rotation_from_axis_angle(axis, angle))
    scales = torch.rand(16, 3, generator=generator, dtype=torch.float64) + 0.1
    expected = torch.stack([r @ torch.diag(s.square()) @ r.T for r, s in zip(rotations, scales)])
    torch.testing.assert_close(covariance(torch.stack(quats), scales), expected, rtol=1e-10, atol=1e-12)


def test_sample_by_weight_follows_weights():
    torch.manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0, 4.0])
    draws = sample_by_weight(weights, 80_000)
    frequencies = torch.bincount(draws, minlength=5).double() / 80_000
    torch.testing.assert_close(frequencies, weights.double() / 8.0, atol=0.01, rtol=0)


def test_relocate_moves_dead_onto_live():
    torch.manual_seed(0)
    opacities = torch.full((30,), 0.6)
    opacities[:8] = 0.001
    params, optimizers = make_splats(30, opacity=opacities)
    before = {name: value.detach().clone() for name, value in params.items()}
    dead = torch.sigmoid(params["opacities"]) <= 0.005
    assert relocate(params, optimizers, dead, binomial_table()) == 8
    assert len(params["means"]) == 30
    means = params["means"].detach()
    live_means = before["means"][8:]
    for i in range(8):  # every dead one now sits exactly on a live one
        assert bool((live_means == means[i]).all(dim=1).any())
    sources = [j for j in range(8, 30) if not torch.equal(params["opacities"][j], before["opacities"][j])]
    assert sources, "relocation must update the opacity of the Gaussians it copied"
    for j in sources:
        assert float(torch.sigmoid(params["opacities"].detach()[j])) < 0.6  # shared with its copies
        for moment in adam_moments(optimizers["means"], params["means"]):
            assert not moment[j].any()
    for name, param in params.items():
        assert optimizers[name].param_groups[0]["params"][0] is param


def test_sample_add_appends_copies():
    torch.manual_seed(0)
    params, optimizers = make_splats(20)
    assert sample_add(params, optimizers, 7, binomial_table()) == 7
    assert all(len(value) == 27 for value in params.values())
    means = params["means"].detach()
    for i in range(20, 27):
        assert bool((means[:20] == means[i]).all(dim=1).any())
    for moment in adam_moments(optimizers["scales"], params["scales"]):
        assert moment.shape == (27, 3) and not moment[20:].any()


def test_noise_follows_covariance_and_spares_opaque_gaussians():
    torch.manual_seed(0)
    opacities = torch.tensor([0.001, 0.999])
    params, _ = make_splats(2, opacity=opacities)
    with torch.no_grad():
        params["quats"][:] = torch.tensor([[0.9, 0.2, -0.3, 0.1], [1.0, 0.0, 0.0, 0.0]])
        params["scales"][:] = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.5, 0.5]]))
    start = params["means"].detach().clone()
    sigma = covariance(params["quats"].detach(), torch.exp(params["scales"].detach()))[0]
    steps = []
    for _ in range(4000):
        before = params["means"].detach().clone()
        inject_noise(params, scaler=1.0)
        steps.append(params["means"].detach() - before)
    steps = torch.stack(steps)  # [T, 2, 3]
    assert not steps[:, 1].any()  # gate sigmoid(-100 (0.999 - 0.005)) ~ 1e-43: an opaque Gaussian stays put
    gate = float(torch.sigmoid(torch.tensor(-100.0 * (0.001 - 0.005))))
    empirical = steps[:, 0].T.double().cov()
    torch.testing.assert_close(empirical, (gate**2 * sigma @ sigma.T).double(), atol=2e-4, rtol=0.1)
    assert not torch.equal(params["means"][0].detach(), start[0])


def test_mcmc_strategy_grows_to_the_cap_on_cpu():
    torch.manual_seed(0)
    params, optimizers = make_splats(100)
    strategy = MCMCStrategy(cap_max=120, refine_start_iter=0, refine_every=1, refine_stop_iter=1000)
    assert isinstance(strategy, GsplatMCMCStrategy)
    state = strategy.initialize_state()
    counts = []
    for step in range(1, 8):
        strategy.step_post_backward(params, optimizers, state, step, info={}, lr=1e-3)
        counts.append(len(params["means"]))
    assert counts == [105, 110, 115, 120, 120, 120, 120]
    assert all(torch.isfinite(value).all() for value in params.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_match_gsplats_cuda_kernels():
    from gsplat import quat_scale_to_covar_preci
    from gsplat.relocation import compute_relocation as gsplat_compute_relocation

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    quats = torch.randn(100, 4, generator=generator).to(device)
    scales = (torch.rand(100, 3, generator=generator) + 0.1).to(device)
    expected, _ = quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    torch.testing.assert_close(covariance(quats, scales), expected, rtol=1e-5, atol=1e-6)

    opacities = (torch.rand(100, generator=generator) * 0.9 + 0.05).to(device)
    ratios = torch.randint(1, 8, (100,), generator=generator).to(device)  # small N: gsplat's float32 sums hold
    binoms = GsplatMCMCStrategy().initialize_state()["binoms"].to(device)
    expected_opacities, expected_scales = gsplat_compute_relocation(opacities, scales, ratios.clone(), binoms)
    new_opacities, new_scales = compute_relocation(opacities, scales, ratios, binomial_table().to(device))
    torch.testing.assert_close(new_opacities, expected_opacities, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_scales, expected_scales, rtol=1e-4, atol=1e-6)
