"""Gaussians: initialisation (neighbour scales, colours), SH degree changes, and the Inria 3DGS PLY layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsr_core.data.points import PointCloud
from gsr_core.gaussians import Gaussians, neighbour_distance, rgb_to_sh, sh_to_rgb
from gsr_core.ply import read_ply, write_ply


def brute_force_neighbour_distance(xyz: torch.Tensor, k: int = 3) -> torch.Tensor:
    """The obviously-correct twin of ``neighbour_distance``: the full distance matrix."""
    squared = torch.cdist(xyz.double(), xyz.double()).square()
    squared.fill_diagonal_(math.inf)
    return squared.topk(k, dim=1, largest=False).values.mean(dim=1).clamp_min(1e-7).sqrt().float()


def random_gaussians(n: int, sh_degree: int, seed: int = 0) -> Gaussians:
    generator = torch.Generator().manual_seed(seed)
    rest = (sh_degree + 1) ** 2 - 1
    return Gaussians(
        means=torch.randn(n, 3, generator=generator),
        quats=torch.randn(n, 4, generator=generator),
        scales=torch.randn(n, 3, generator=generator) - 3,
        opacities=torch.randn(n, generator=generator),
        sh0=torch.randn(n, 1, 3, generator=generator),
        shN=torch.randn(n, rest, 3, generator=generator),
    )


INRIA_PREFIX = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
INRIA_SUFFIX = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def test_neighbour_distance_matches_brute_force_on_hard_clouds():
    generator = torch.Generator().manual_seed(1)
    cloud = torch.cat([
        torch.rand(1500, 3, generator=generator),                 # uniform volume
        torch.rand(800, 3, generator=generator) * 1e-3 + 4.0,     # a dense cluster far away
        torch.cat([torch.rand(700, 2, generator=generator) * 3, torch.zeros(700, 1)], dim=1),  # a plane
        torch.randn(20, 3, generator=generator) * 100.0,          # sparse outliers
        torch.zeros(6, 3),                                        # duplicates
    ])  # fmt: skip
    for k in (1, 3):
        torch.testing.assert_close(neighbour_distance(cloud, k=k), brute_force_neighbour_distance(cloud, k=k),
                                   rtol=1e-6, atol=0)  # fmt: skip


def test_neighbour_distance_floors_duplicates_and_checks_input():
    cloud = torch.zeros(10, 3)
    assert torch.allclose(neighbour_distance(cloud), torch.full((10,), math.sqrt(1e-7)))
    with pytest.raises(ValueError, match="more than k = 3"):
        neighbour_distance(torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"\[P, 3\]"):
        neighbour_distance(torch.rand(10, 2))


def test_from_points_initialises_as_3dgs():
    generator = torch.Generator().manual_seed(0)
    points = PointCloud(torch.rand(200, 3, generator=generator), torch.rand(200, 3, generator=generator))
    gaussians = Gaussians.from_points(points, sh_degree=2, init_opacity=0.25, init_scale=0.5, generator=generator)
    assert len(gaussians) == 200 and gaussians.sh_degree == 2
    assert gaussians.shN.shape == (200, 8, 3) and not gaussians.shN.any()
    torch.testing.assert_close(gaussians.means, points.xyz)
    torch.testing.assert_close(sh_to_rgb(gaussians.sh0[:, 0]), points.rgb)
    expected_scales = (0.5 * brute_force_neighbour_distance(points.xyz)).log()
    torch.testing.assert_close(gaussians.scales, expected_scales[:, None].expand(200, 3))
    torch.testing.assert_close(torch.sigmoid(gaussians.opacities), torch.full((200,), 0.25))


def test_random_init_stays_in_bounds():
    low, high = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.5, 3.0])
    gaussians = Gaussians.random(500, low, high, sh_degree=0, generator=torch.Generator().manual_seed(0))
    assert len(gaussians) == 500 and gaussians.sh_degree == 0
    assert bool(((gaussians.means >= low) & (gaussians.means <= high)).all())
    with pytest.raises(ValueError, match="low < high"):
        Gaussians.random(10, high, low)


def test_rgb_sh_round_trip():
    rgb = torch.rand(5, 3)
    torch.testing.assert_close(sh_to_rgb(rgb_to_sh(rgb)), rgb)


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_ply_round_trip_is_bit_exact(tmp_path, sh_degree):
    gaussians = random_gaussians(57, sh_degree)
    path = tmp_path / "scene.ply"
    gaussians.save_ply(path)
    loaded = Gaussians.load_ply(path)
    for name, value in gaussians.params().items():
        assert torch.equal(getattr(loaded, name), value), name


def test_ply_uses_the_inria_layout(tmp_path):
    gaussians = random_gaussians(4, sh_degree=3)
    # shN[:, k, c] = 100 c + k, so each f_rest column tells which coefficient landed there
    k, c = torch.meshgrid(torch.arange(15.0), torch.arange(3.0), indexing="ij")
    gaussians.shN = (100 * c + k).expand(4, 15, 3).clone()
    path = tmp_path / "scene.ply"
    gaussians.save_ply(path)
    header = path.read_bytes().split(b"end_header")[0].decode("ascii").splitlines()
    properties = [line.split() for line in header if line.startswith("property")]
    assert all(kind == "float" for _, kind, _ in properties)
    names = [name for _, _, name in properties]
    assert names == INRIA_PREFIX + [f"f_rest_{i}" for i in range(45)] + INRIA_SUFFIX
    columns = read_ply(path)
    for channel in range(3):
        for basis in range(15):  # channel-major: f_rest_{c * 15 + k} = shN[:, k, c]
            assert np.all(columns[f"f_rest_{channel * 15 + basis}"] == 100 * channel + basis)
    assert np.all(columns["nx"] == 0)
    np.testing.assert_array_equal(columns["rot_0"], gaussians.quats[:, 0].numpy())  # w first
    np.testing.assert_array_equal(columns["opacity"], gaussians.opacities.numpy())  # logit, raw


def test_reads_what_gsplat_exports(tmp_path):
    from gsplat import export_splats

    gaussians = random_gaussians(9, sh_degree=2)
    path = tmp_path / "gsplat.ply"
    export_splats(**gaussians.params(), format="ply", save_to=str(path))
    loaded = Gaussians.load_ply(path)
    for name, value in gaussians.params().items():
        assert torch.equal(getattr(loaded, name), value), name


def test_load_ply_rejects_other_files(tmp_path):
    path = tmp_path / "points.ply"
    write_ply(path, {"x": np.zeros(3, np.float32), "y": np.zeros(3, np.float32), "z": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="points.ply: not a 3DGS PLY"):
        Gaussians.load_ply(path)
    columns = {name: np.zeros(2, np.float32) for name in INRIA_PREFIX + INRIA_SUFFIX}
    columns.update({f"f_rest_{i}": np.zeros(2, np.float32) for i in range(7)})  # not 3 (K - 1)
    write_ply(path, columns)
    with pytest.raises(ValueError, match="f_rest"):
        Gaussians.load_ply(path)


def test_shapes_are_checked():
    gaussians = random_gaussians(5, 1)
    with pytest.raises(ValueError, match="`quats` must have shape \\[5, 4\\]"):
        Gaussians(**{**gaussians.params(), "quats": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="`shN`"):
        Gaussians(**{**gaussians.params(), "shN": torch.zeros(5, 4, 3)})


def test_with_sh_degree_pads_and_truncates():
    gaussians = random_gaussians(6, 1)
    higher = gaussians.with_sh_degree(3)
    assert higher.sh_degree == 3
    assert torch.equal(higher.shN[:, :3], gaussians.shN) and not higher.shN[:, 3:].any()
    assert torch.equal(higher.with_sh_degree(1).shN, gaussians.shN)
    assert gaussians.with_sh_degree(0).shN.shape == (6, 0, 3)
