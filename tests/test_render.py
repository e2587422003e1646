"""gsr_core.render.rasterize (torch backend) against the brute-force reference, gradients, info contract, errors."""

from __future__ import annotations

import math

import pytest
import torch

from gsr_core.cameras import intrinsics_from_fov, look_at
from gsr_core.render import rasterize
from gsr_core.render import binning, compositing
from gsr_core.render._reference import reference_alphas, reference_composite, reference_project, reference_rasterize
from gsr_core.render.binning import bin_gaussians, drop_invisible_pairs
from gsr_core.render.compositing import composite
from gsr_core.render.projection import project_gaussians

GSPLAT_INFO_KEYS = {
    "batch_ids", "camera_ids", "gaussian_ids", "radii", "means2d", "depths", "conics", "opacities", "tile_width",
    "tile_height", "tiles_per_gauss", "isect_ids", "flatten_ids", "isect_offsets", "width", "height", "tile_size",
    "n_batches", "n_cameras",
}  # fmt: skip


def make_scene(n=40, cameras=3, width=24, height=20, dtype=torch.float64, seed=0, sh_bases=None, scale=1.0):
    """A few dozen random Gaussians around the origin seen by cameras on a circle (off-centre principal points)."""
    generator = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=generator, dtype=dtype) - 0.5) * 1.6
    quats = torch.randn(n, 4, generator=generator, dtype=dtype)
    scales = torch.exp(torch.rand(n, 3, generator=generator, dtype=dtype) * 1.5 - 3.2) * scale
    opacities = torch.rand(n, generator=generator, dtype=dtype) * 0.9 + 0.05
    if sh_bases is None:
        colors = torch.rand(n, 3, generator=generator, dtype=dtype)
    else:
        colors = torch.randn(n, sh_bases, 3, generator=generator, dtype=dtype) * 0.3
    viewmats, Ks = [], []
    for c in range(cameras):
        angle = 2 * math.pi * c / cameras
        eye = torch.tensor([2.5 * math.sin(angle), 0.3 * c - 0.3, -2.5 * math.cos(angle)], dtype=torch.float64)
        viewmats.append(look_at(eye, torch.zeros(3), torch.tensor([0.0, -1.0, 0.0])))
        K = intrinsics_from_fov(width, height, 50.0)
        K[0, 2] += 0.7 * c
        K[1, 2] -= 0.4 * c
        Ks.append(K)
    return {
        "means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
        "viewmats": torch.stack(viewmats).to(dtype), "Ks": torch.stack(Ks).to(dtype), "width": width, "height": height,
    }  # fmt: skip


PARAMS = ("means", "quats", "scales", "opacities", "colors")


def _render_both(scene, **options):
    """Render with the torch backend and the reference; backpropagate the same random upstream gradients."""
    dtype = scene["means"].dtype
    generator = torch.Generator().manual_seed(1)
    backgrounds = torch.rand(scene["viewmats"].shape[0], 3, generator=generator, dtype=dtype)
    results = []
    for render in (rasterize, reference_rasterize):
        inputs = {k: (v.clone().requires_grad_(True) if k in PARAMS else v) for k, v in scene.items()}
        background = backgrounds.clone().requires_grad_(True)
        colours, alphas, info = render(**inputs, backgrounds=background, **options)
        results.append((inputs, background, colours, alphas, info))
    upstream_colours = torch.randn(results[0][2].shape, generator=generator, dtype=dtype)
    upstream_alphas = torch.randn(results[0][3].shape, generator=generator, dtype=dtype)
    for _, _, colours, alphas, _ in results:
        ((colours * upstream_colours).sum() + (alphas * upstream_alphas).sum()).backward()
    return results


def _assert_close_grads(fast, reference, rtol):
    """Gradients equal up to ``rtol`` of the largest reference gradient entry."""
    pairs = [(name, fast[0][name].grad, reference[0][name].grad) for name in PARAMS]
    pairs.append(("backgrounds", fast[1].grad, reference[1].grad))
    for name, got, expected in pairs:
        if expected is None:  # colours and backgrounds in depth-only modes
            assert got is None or not got.any(), name
            continue
        scale = expected.abs().max().clamp_min(1e-12)
        assert ((got - expected).abs().max() / scale) < rtol, name


@pytest.mark.parametrize(
    "render_mode, sh_degree",
    [(mode, None) for mode in ("RGB", "D", "ED", "RGB+D", "RGB+ED")]
    + [("RGB+ED", 3)]
    + [("RGB", degree) for degree in (0, 1, 2, 3)],
)
def test_matches_brute_force_reference_forward_and_backward(render_mode, sh_degree):
    scene = make_scene(sh_bases=None if sh_degree is None else 16, seed=11 + (sh_degree or 0))
    fast, reference = _render_both(scene, render_mode=render_mode, sh_degree=sh_degree)
    assert fast[2].shape == reference[2].shape
    assert torch.allclose(fast[2], reference[2], atol=1e-10, rtol=0)
    assert torch.allclose(fast[3], reference[3], atol=1e-10, rtol=0)
    assert 0.2 < (fast[3] > 0).double().mean() < 1.0  # the scene covers part of every image
    assert torch.equal(fast[4]["radii"], reference[4]["radii"])
    _assert_close_grads(fast, reference, rtol=1e-8)


def test_float32_matches_reference():
    scene = make_scene(dtype=torch.float32, sh_bases=9, seed=5)
    fast, reference = _render_both(scene, sh_degree=2, render_mode="RGB+D")
    assert fast[2].dtype == torch.float32
    assert (fast[2] - reference[2]).abs().max() < 1e-4
    assert (fast[3] - reference[3]).abs().max() < 1e-5
    _assert_close_grads(fast, reference, rtol=1e-4)


def test_per_camera_colors_match_reference():
    scene = make_scene(seed=3)
    scene["colors"] = torch.rand(3, 40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast = rasterize(**scene)
    reference = reference_rasterize(**scene)
    assert fast[0].shape == (3, 20, 24, 5)
    assert torch.allclose(fast[0], reference[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "block, batch_elements, loop_scan_slots", [(3, 1 << 22, 64), (5, 4000, 64), (32, 1 << 22, 0), (4, 20000, 0)]
)
def test_early_stop_clamp_and_waves_match_reference(monkeypatch, block, batch_elements, loop_scan_slots):
    """Opaque, dense Gaussians: pixels stop at T <= 1e-4, alphas clamp at 0.999, tile lists span many waves
    (small blocks) and batches (small batch budget); rows scanned slot by slot and by cumulative product."""
    monkeypatch.setattr(compositing, "MAX_BATCH_ELEMENTS", batch_elements)
    monkeypatch.setattr(compositing, "LOOP_SCAN_SLOTS", loop_scan_slots)
    scene = make_scene(n=100, cameras=2, seed=3, scale=3.5)
    opacities = scene["opacities"].clone()
    opacities[::3], opacities[1::3] = 1.0, 0.9995
    projection = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], opacities, scene["viewmats"], scene["Ks"], 24, 20,
        0.3, 0.01, 1e10,
    )  # fmt: skip
    leaves = [
        projection.means2d.detach().clone().requires_grad_(True),
        projection.conics.detach().clone().requires_grad_(True),
        scene["colors"][None].expand(2, -1, -1).clone().requires_grad_(True),
        opacities[None].expand(2, -1).clone().requires_grad_(True),
    ]
    bins = bin_gaussians(leaves[0], projection.radii, projection.depths, 24, 20, 8)
    colours, alphas = composite(*leaves, bins, 24, 20, block=block)
    generator = torch.Generator().manual_seed(0)
    upstream = (torch.randn(colours.shape, generator=generator, dtype=torch.float64),
                torch.randn(alphas.shape, generator=generator, dtype=torch.float64))  # fmt: skip
    grads = torch.autograd.grad((colours * upstream[0]).sum() + (alphas * upstream[1]).sum(), leaves)

    reference_leaves = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    loss = 0.0
    for c in range(2):
        keep = (projection.radii[c] > 0).all(-1).nonzero().squeeze(1)
        means2d, conics, colors, opacity = (leaf[c, keep] for leaf in reference_leaves)
        conic_matrices = torch.stack([conics[:, 0], conics[:, 1], conics[:, 1], conics[:, 2]], -1).reshape(-1, 2, 2)
        ref_colours, ref_alphas = reference_composite(
            means2d, conic_matrices, colors, opacity, projection.depths[c, keep].detach(), 24, 20
        )
        assert torch.allclose(colours[c], ref_colours, atol=1e-12, rtol=0)
        assert torch.allclose(alphas[c], ref_alphas, atol=1e-12, rtol=0)
        loss = loss + (ref_colours * upstream[0][c]).sum() + (ref_alphas * upstream[1][c]).sum()
    reference_grads = torch.autograd.grad(loss, reference_leaves)
    for got, expected in zip(grads, reference_grads):
        assert ((got - expected).abs().max() / expected.abs().max()) < 1e-9
    transmittance = 1 - alphas
    assert transmittance.min() < 2e-4  # some pixels reached the stop
    assert (transmittance >= 1e-4 - 1e-12).all()  # ... and none went past it


def test_dropped_tile_pairs_are_invisible_at_every_pixel_of_their_tile():
    scene = make_scene(n=80, cameras=2, width=40, height=32, seed=9, scale=2.0)
    projection = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["viewmats"], scene["Ks"], 40, 32,
        0.3, 0.01, 1e10,
    )  # fmt: skip
    opacities = scene["opacities"][None].expand(2, -1)
    bins = bin_gaussians(projection.means2d, projection.radii, projection.depths, 40, 32, 8)
    kept = drop_invisible_pairs(bins, projection.means2d, projection.conics, opacities)
    assert 0 < kept.flatten_ids.numel() < bins.flatten_ids.numel()
    kept_keys = set(zip(kept.isect_ids.tolist(), kept.flatten_ids.tolist()))
    tile_bits = (bins.tile_width * bins.tile_height).bit_length()
    offsets = torch.arange(8, dtype=torch.float64) + 0.5
    for key, flat in zip(bins.isect_ids.tolist(), bins.flatten_ids.tolist()):
        tile = (key >> 32) & ((1 << tile_bits) - 1)
        xs = (tile % bins.tile_width) * 8 + offsets
        ys = (tile // bins.tile_width) * 8 + offsets
        camera, n = divmod(flat, 80)
        dx = projection.means2d[camera, n, 0] - xs[None, :]
        dy = projection.means2d[camera, n, 1] - ys[:, None]
        a, b, c = projection.conics[camera, n]
        alpha = opacities[camera, n] * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))
        if (key, flat) not in kept_keys:
            assert alpha.max() < 1 / 255
    # The kept lists keep their depth order and per-tile counts agree with the keys.
    assert torch.equal(kept.isect_ids, kept.isect_ids.sort().values)
    assert int(kept.tile_counts.sum()) == kept.flatten_ids.numel()


def test_binning_in_chunks_equals_binning_at_once(monkeypatch):
    scene = make_scene(n=300, cameras=3, width=64, height=48, seed=1, scale=3.0)
    projection = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["viewmats"], scene["Ks"], 64, 48,
        0.3, 0.01, 1e10,
    )  # fmt: skip
    opacities = scene["opacities"][None].expand(3, -1)

    def bins_and_visible_pairs():
        bins = bin_gaussians(projection.means2d, projection.radii, projection.depths, 64, 48, 8)
        return bins, drop_invisible_pairs(bins, projection.means2d, projection.conics, opacities)

    at_once = bins_and_visible_pairs()
    monkeypatch.setattr(binning, "CHUNK_ISECTS", 37)
    in_chunks = bins_and_visible_pairs()
    assert at_once[0].flatten_ids.numel() > 10 * 37
    for whole, chunked in zip(at_once, in_chunks):
        for field in ("isect_ids", "flatten_ids", "isect_offsets", "tile_counts", "tiles_per_gauss"):
            assert torch.equal(getattr(whole, field), getattr(chunked, field)), field


def test_gradcheck_float64():
    scene = make_scene(n=6, cameras=2, width=8, height=6, sh_bases=4, seed=4, scale=4.0)
    background = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def render(means, quats, scales, opacities, colors, backgrounds):
        colours, alphas, _ = rasterize(
            means, quats, scales, opacities, colors, scene["viewmats"], scene["Ks"], 8, 6,
            sh_degree=1, backgrounds=backgrounds, render_mode="RGB+ED",
        )  # fmt: skip
        return colours, alphas

    inputs = [scene[name].clone().requires_grad_(True) for name in PARAMS] + [background.requires_grad_(True)]
    assert (render(*inputs)[1] > 0.1).any()
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_info_has_gsplat_keys_shapes_and_types():
    scene = make_scene(sh_bases=4, seed=2)
    scene["means"][0] = torch.tensor([0.0, 50.0, 0.0])  # outside every camera's view: culled
    inputs = {k: (v.clone().requires_grad_(True) if k in PARAMS else v) for k, v in scene.items()}
    colours, alphas, info = rasterize(**inputs, sh_degree=1)
    n, c = 40, 3
    assert set(info) == GSPLAT_INFO_KEYS
    assert colours.shape == (c, 20, 24, 3) and alphas.shape == (c, 20, 24, 1)
    assert info["radii"].shape == (c, n, 2) and info["radii"].dtype == torch.int32
    assert info["means2d"].shape == (c, n, 2) and info["depths"].shape == (c, n)
    assert info["conics"].shape == (c, n, 3) and info["opacities"].shape == (c, n)
    assert info["tiles_per_gauss"].shape == (c, n) and info["tiles_per_gauss"].dtype == torch.int32
    assert (info["width"], info["height"], info["n_cameras"], info["n_batches"]) == (24, 20, c, 1)
    assert info["gaussian_ids"] is None and info["camera_ids"] is None and info["batch_ids"] is None
    tile = info["tile_size"]
    assert (info["tile_width"], info["tile_height"]) == (math.ceil(24 / tile), math.ceil(20 / tile))
    assert info["isect_offsets"].shape == (c, info["tile_height"], info["tile_width"])
    # Intersections: sorted keys, one per (Gaussian, tile) of each bounding box, all within the box.
    isect_ids, flatten_ids = info["isect_ids"], info["flatten_ids"].long()
    assert isect_ids.dtype == torch.int64 and info["flatten_ids"].dtype == torch.int32
    assert torch.equal(isect_ids, isect_ids.sort().values)
    assert flatten_ids.numel() == int(info["tiles_per_gauss"].sum())
    tile_bits = (info["tile_width"] * info["tile_height"]).bit_length()
    tile_ids = (isect_ids >> 32) & ((1 << tile_bits) - 1)
    assert torch.equal(isect_ids >> (32 + tile_bits), flatten_ids // n)  # camera of each intersection
    centres = info["means2d"].detach().reshape(-1, 2)[flatten_ids]
    radii = info["radii"].reshape(-1, 2)[flatten_ids]
    tile_x, tile_y = (tile_ids % info["tile_width"]) * tile, (tile_ids // info["tile_width"]) * tile
    assert ((centres[:, 0] + radii[:, 0] > tile_x) & (centres[:, 0] - radii[:, 0] < tile_x + tile)).all()
    assert ((centres[:, 1] + radii[:, 1] > tile_y) & (centres[:, 1] - radii[:, 1] < tile_y + tile)).all()
    # means2d keeps its gradient for densification strategies; culled Gaussians get none.
    colours.sum().backward()
    grad = info["means2d"].grad
    assert grad is not None and grad.shape == (c, n, 2)
    culled = (info["radii"] == 0).all(-1)
    assert culled.any() and not grad[culled].any() and grad[~culled].abs().sum() > 0


def test_absgrad_is_sum_of_per_pixel_absolute_gradients():
    scene = make_scene(n=8, cameras=1, width=9, height=7, seed=6, scale=3.0)
    colours, alphas, info = rasterize(**{k: (v.clone().requires_grad_(True) if k in PARAMS else v)
                                         for k, v in scene.items()}, absgrad=True)  # fmt: skip
    upstream = torch.randn(colours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (colours * upstream).sum().backward()
    absgrad = info["means2d"].absgrad
    # Reference: the gradient of each pixel's own loss term, in absolute value, summed over pixels.
    means2d, conics, depths, _ = reference_project(scene["means"], scene["quats"], scene["scales"],
                                                   scene["viewmats"][0], scene["Ks"][0], 9, 7)  # fmt: skip
    means2d = means2d.detach().requires_grad_(True)
    ref_colours, _ = reference_composite(means2d, conics, scene["colors"], scene["opacities"], depths, 9, 7)
    expected = torch.zeros_like(means2d)
    for i in range(7):
        for j in range(9):
            pixel_loss = (ref_colours[i, j] * upstream[0, i, j]).sum()
            (pixel_grad,) = torch.autograd.grad(pixel_loss, means2d, retain_graph=True)
            expected += pixel_grad.abs()
    visible = (info["radii"][0] > 0).all(-1)
    assert torch.allclose(absgrad[0][visible], expected[visible], atol=1e-10, rtol=1e-8)
    assert not absgrad[0][~visible].any()
    assert (absgrad >= info["means2d"].grad.abs() - 1e-12).all()


def test_reference_alphas_agree_with_sequential_reference():
    scene = make_scene(n=60, cameras=1, seed=8, scale=2.0)
    means2d, conics, depths, _ = reference_project(scene["means"], scene["quats"], scene["scales"],
                                                   scene["viewmats"][0], scene["Ks"][0], 24, 20)  # fmt: skip
    opacities = scene["opacities"].clone()
    opacities[::2] = 1.0
    _, sequential = reference_composite(means2d, conics, scene["colors"], opacities, depths, 24, 20)
    chunked = reference_alphas(means2d, conics, opacities, depths, 24, 20, chunk=7)
    assert torch.allclose(sequential[..., 0], chunked, atol=1e-12, rtol=0)


def test_auto_backend_on_cpu_is_torch_and_gsplat_backend_needs_cuda():
    scene = make_scene(n=10, cameras=1, seed=1)
    auto = rasterize(**scene)
    torch_backend = rasterize(**scene, backend="torch")
    assert torch.equal(auto[0], torch_backend[0])
    with pytest.raises(ValueError, match="gsplat"):
        rasterize(**scene, backend="gsplat")


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        ({"means": torch.zeros(40, 2, dtype=torch.float64)}, ValueError, "`means`"),
        ({"quats": torch.zeros(39, 4, dtype=torch.float64)}, ValueError, "`quats`"),
        ({"opacities": torch.zeros(40, 1, dtype=torch.float64)}, ValueError, "`opacities`"),
        ({"colors": torch.zeros(40, dtype=torch.float64)}, ValueError, "`colors`"),
        ({"viewmats": torch.zeros(3, 3, 4, dtype=torch.float64)}, ValueError, "`viewmats`"),
        ({"Ks": torch.zeros(2, 3, 3, dtype=torch.float64)}, ValueError, "`Ks`"),
        ({"width": 0}, ValueError, "`width`"),
        ({"height": 20.0}, ValueError, "`height`"),
        ({"scales": torch.zeros(40, 3, dtype=torch.float32)}, TypeError, "`scales`"),
        ({"means": torch.zeros(40, 3, dtype=torch.int64)}, TypeError, "`means`"),
        ({"render_mode": "RGBD"}, ValueError, "`render_mode`"),
        ({"backend": "cuda"}, ValueError, "`backend`"),
        ({"sh_degree": 4}, ValueError, "`sh_degree`"),
        ({"sh_degree": 1}, ValueError, "`colors`"),
        ({"backgrounds": torch.zeros(3, 4, dtype=torch.float64)}, ValueError, "`backgrounds`"),
        ({"near_plane": 0.0}, ValueError, "`near_plane`"),
        ({"eps2d": -1.0}, ValueError, "`eps2d`"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(change, error, pattern):
    arguments = {**make_scene(), **change}
    with pytest.raises(error, match=pattern):
        rasterize(**arguments)


def test_gaussians_behind_or_outside_every_camera_render_nothing():
    scene = make_scene(n=5, cameras=1, seed=0)
    scene["means"] = scene["means"] + torch.tensor([0.0, 0.0, -50.0], dtype=torch.float64)  # behind the camera
    colours, alphas, info = rasterize(**scene, backgrounds=torch.full((1, 3), 0.25, dtype=torch.float64))
    assert not alphas.any() and torch.all(colours == 0.25)
    assert not info["radii"].any() and info["flatten_ids"].numel() == 0
