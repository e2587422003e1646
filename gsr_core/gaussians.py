"""The 3D Gaussian Splatting parameter set: initialisation and the standard 3DGS PLY file.

Parameters use gsplat's names and raw (pre-activation) forms, N Gaussians, K = (sh_degree + 1)^2 SH bases:

* ``means`` [N, 3] world centres;
* ``quats`` [N, 4] rotations, wxyz, not necessarily normalised (the renderer normalises);
* ``scales`` [N, 3] log standard deviations along the rotated axes (activation ``exp``);
* ``opacities`` [N] logits (activation ``sigmoid``);
* ``sh0`` [N, 1, 3] degree-0 SH coefficients; ``shN`` [N, K - 1, 3] the higher degrees.

PLY files follow the Inria 3DGS layout that common viewers read: one binary little-endian ``vertex`` element of
float32 properties ``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0 scale_1
scale_2 rot_0 rot_1 rot_2 rot_3``. The normals are zero. ``f_rest`` is channel-major, as Inria writes it: property
``f_rest_{c (K-1) + k}`` holds ``shN[:, k, c]``. Values are stored raw (logit opacity, log scale, unnormalised
quaternion), so a float32 set writes and reads back bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gsr_core.data.points import PointCloud
from gsr_core.ply import read_ply, write_ply

PARAM_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN")
MAX_SH_DEGREE = 3
SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
_KNN_CHUNK_ELEMENTS = 1 << 24  # distances (or 4x candidate pairs) held at once by the neighbour search
_MIN_SQUARED_DISTANCE = 1e-7  # Inria's floor on the mean squared neighbour distance (duplicate points)


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """Degree-0 SH coefficient whose evaluation (``SH_C0 * c + 0.5``) is ``rgb``; same shape as ``rgb``."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh0: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_sh``: the view-independent colour of degree-0 coefficients; same shape."""
    return sh0 * SH_C0 + 0.5


def num_sh_bases(sh_degree: int) -> int:
    """K = (sh_degree + 1)^2."""
    return (sh_degree + 1) ** 2


def neighbour_distance(xyz: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Root mean square distance of every point to its ``k`` nearest other points (3DGS's initial scale).

    Exact, in float64, and fast on a CPU for 100k+ points: points are hashed into a grid of cubic cells of
    side h; a point's candidates are the points of its own and the 26 neighbouring cells, which contain every
    point within distance h of it, so when its k-th nearest candidate is at most h away the answer is exact.
    Points left undecided are searched again with h doubled. Pairs are processed in chunks, so memory stays
    bounded (a few hundred MB) for any cloud.

    Args:
        xyz: [P, 3] points, P > k.
        k: number of neighbours.

    Returns:
        [P] float32 ``sqrt(mean of the k smallest squared distances to other points)``, floored at
        ``sqrt(1e-7)`` (duplicate points would otherwise get a zero scale), on the device of ``xyz``.
    """
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"`xyz` must have shape [P, 3], got {list(xyz.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}")
    if xyz.shape[0] <= k:
        raise ValueError(f"`xyz` must hold more than k = {k} points, got {xyz.shape[0]}")
    if not bool(torch.isfinite(xyz).all()):
        raise ValueError("`xyz` must be finite")
    points = xyz.detach().double()
    points = points - points.mean(dim=0)
    mean_squared = torch.empty(points.shape[0], dtype=torch.float64, device=points.device)
    pending = torch.arange(points.shape[0], device=points.device)
    cell = _initial_cell_size(points, k)
    while pending.numel():
        found, values = _grid_neighbours(points, pending, cell, k)
        mean_squared[pending[found]] = values[found]
        pending = pending[~found]
        cell *= 2.0
    return mean_squared.clamp_min(_MIN_SQUARED_DISTANCE).sqrt().float()


def _initial_cell_size(points: torch.Tensor, k: int) -> float:
    """Twice the median k-th neighbour distance of up to 256 evenly spaced points (brute force)."""
    probes = points[torch.linspace(0, points.shape[0] - 1, min(256, points.shape[0]), device=points.device).long()]
    rows = max(1, _KNN_CHUNK_ELEMENTS // points.shape[0])
    kth = []
    for start in range(0, probes.shape[0], rows):
        distances = torch.cdist(probes[start : start + rows], points)
        kth.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])  # k + 1: the probe itself is one
    median = float(torch.cat(kth).median())
    extent = float((points.max(dim=0).values - points.min(dim=0).values).max())
    return max(2.0 * median, extent * 1e-6, 1e-12)


def _grid_neighbours(points: torch.Tensor, queries: torch.Tensor, cell: float, k: int):
    """For each query index: (found [Q] bool, mean squared distance [Q] of its k nearest other points).

    ``found`` is False where fewer than k candidates lie in the 27 cells around the query or the k-th one is
    farther than ``cell`` (the answer might then lie outside those cells).
    """
    device = points.device
    cells = torch.floor(points / cell).long()
    cells = cells - cells.min(dim=0).values + 1  # >= 1, so the -1 offsets stay >= 0
    dims = cells.max(dim=0).values + 2
    strides = torch.stack([dims[1] * dims[2], dims[2], torch.ones_like(dims[2])])
    keys = (cells * strides).sum(dim=1)  # [P]
    order = keys.argsort()
    cell_keys, cell_counts = torch.unique_consecutive(keys[order], return_counts=True)
    cell_starts = cell_counts.cumsum(0) - cell_counts
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, device=device)] * 3, indexing="ij"), dim=-1)
    offset_keys = (offsets.reshape(-1, 3) * strides).sum(dim=1)  # [27]

    query_keys = keys[queries][:, None] + offset_keys[None, :]  # [Q, 27]
    slot = torch.searchsorted(cell_keys, query_keys).clamp_max(cell_keys.numel() - 1)
    occupied = cell_keys[slot] == query_keys
    counts = torch.where(occupied, cell_counts[slot], 0)  # [Q, 27]
    starts = torch.where(occupied, cell_starts[slot], 0)
    per_query = counts.sum(dim=1)  # [Q] candidates, the query itself included

    found = torch.zeros(queries.numel(), dtype=torch.bool, device=device)
    values = torch.zeros(queries.numel(), dtype=torch.float64, device=device)
    by_count = per_query.argsort()  # chunks of queries with similar candidate counts pad little
    sorted_counts = per_query[by_count].tolist()
    budget, first = _KNN_CHUNK_ELEMENTS // 4, 0
    while first < len(sorted_counts):
        last = min(len(sorted_counts), first + max(1, budget // max(sorted_counts[first], 1)))
        while last - first > 1 and (last - first) * sorted_counts[last - 1] > budget:
            last = first + max(1, budget // sorted_counts[last - 1])
        rows = by_count[first:last]
        width = sorted_counts[last - 1]
        flat_counts, flat_starts = counts[rows].reshape(-1), starts[rows].reshape(-1)
        owner = torch.repeat_interleave(torch.arange(rows.numel(), device=device), per_query[rows])  # [M]
        position = torch.arange(owner.numel(), device=device)
        column = position - torch.repeat_interleave(per_query[rows].cumsum(0) - per_query[rows], per_query[rows])
        run_starts = torch.repeat_interleave(flat_counts.cumsum(0) - flat_counts, flat_counts)
        candidates = order[torch.repeat_interleave(flat_starts, flat_counts) + position - run_starts]  # [M]
        query_ids = queries[rows][owner]
        squared = (points[query_ids] - points[candidates]).square().sum(dim=1)
        squared[candidates == query_ids] = math.inf
        table = torch.full((rows.numel(), max(width, k)), math.inf, dtype=torch.float64, device=device)
        table[owner, column] = squared
        nearest = table.topk(k, dim=1, largest=False).values  # [rows, k] ascending; inf where too few
        found[rows] = nearest[:, -1] <= cell * cell
        values[rows] = nearest.mean(dim=1)
        first = last
    return found, values


@dataclass
class Gaussians:
    """A 3DGS scene: the raw parameters of N Gaussians (see the module docstring for shapes and activations).

    All six tensors are float32 (or one other float dtype) on one device. ``sh_degree`` follows from ``shN``.
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh0: torch.Tensor
    shN: torch.Tensor

    def __post_init__(self) -> None:
        for name in PARAM_NAMES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got {type(value).__name__}")
        if self.means.ndim != 2 or self.means.shape[1] != 3:
            raise ValueError(f"`means` must have shape [N, 3], got {list(self.means.shape)}")
        n = self.means.shape[0]
        expected = {"quats": [n, 4], "scales": [n, 3], "opacities": [n], "sh0": [n, 1, 3]}
        for name, shape in expected.items():
            if list(getattr(self, name).shape) != shape:
                raise ValueError(f"`{name}` must have shape {shape} (N from `means`), got "
                                 f"{list(getattr(self, name).shape)}")  # fmt: skip
        bases = self.shN.shape[1] + 1 if self.shN.ndim == 3 else 0
        if self.shN.ndim != 3 or self.shN.shape[0] != n or self.shN.shape[2] != 3 or not _is_sh_count(bases):
            raise ValueError(f"`shN` must have shape [N, K - 1, 3] with K in (1, 4, 9, 16) and N = {n}, "
                             f"got {list(self.shN.shape)}")  # fmt: skip
        for name in PARAM_NAMES[1:]:
            value = getattr(self, name)
            if value.device != self.means.device or value.dtype != self.means.dtype:
                raise ValueError(f"`{name}` must match `means` ({self.means.dtype} on {self.means.device}), "
                                 f"got {value.dtype} on {value.device}")  # fmt: skip

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return math.isqrt(self.shN.shape[1] + 1) - 1

    @property
    def device(self) -> torch.device:
        return self.means.device

    def params(self) -> dict[str, torch.Tensor]:
        """The six tensors by name, in ``PARAM_NAMES`` order (gsplat's ``splats`` dict)."""
        return {name: getattr(self, name) for name in PARAM_NAMES}

    @classmethod
    def from_params(cls, params: dict[str, torch.Tensor]) -> "Gaussians":
        """Detached copies of the tensors of a ``{name: tensor}`` dict such as a trainer's parameters."""
        missing = set(PARAM_NAMES) - set(params)
        if missing:
            raise ValueError(f"`params` lacks {sorted(missing)}; it has {sorted(params)}")
        return cls(**{name: params[name].detach().clone() for name in PARAM_NAMES})

    def to(self, device: str | torch.device) -> "Gaussians":
        return Gaussians(**{name: tensor.to(device) for name, tensor in self.params().items()})

    def colors(self) -> torch.Tensor:
        """[N, K, 3] all SH coefficients (``sh0`` then ``shN``), the renderer's ``colors`` with ``sh_degree``."""
        return torch.cat([self.sh0, self.shN], dim=1)

    def with_sh_degree(self, sh_degree: int) -> "Gaussians":
        """The same Gaussians with ``shN`` cut to, or zero-padded up to, ``sh_degree``."""
        if not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"`sh_degree` must be in [0, {MAX_SH_DEGREE}], got {sh_degree}")
        rest = num_sh_bases(sh_degree) - 1
        shN = self.shN[:, :rest]
        if shN.shape[1] < rest:
            shN = torch.cat([shN, shN.new_zeros(len(self), rest - shN.shape[1], 3)], dim=1)
        return Gaussians(self.means, self.quats, self.scales, self.opacities, self.sh0, shN)

    @classmethod
    def from_points(
        cls,
        points: PointCloud,
        *,
        sh_degree: int = MAX_SH_DEGREE,
        init_opacity: float = 0.1,
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> "Gaussians":
        """One Gaussian per point, as 3DGS initialises from a sparse point cloud.

        Isotropic scales ``init_scale`` x the RMS distance to the 3 nearest neighbours, random quaternions
        (uniform in [0, 1)^4, as gsplat's trainer), opacity ``init_opacity``, ``sh0`` from the point colours
        and ``shN`` zero.

        Args:
            points: P > 3 coloured points.
            sh_degree: SH degree of the set (0..3).
            init_opacity: activated opacity in (0, 1).
            init_scale: factor on the neighbour distance.
            generator: CPU generator for the quaternions (None: the global one).
        """
        if len(points) <= 3:
            raise ValueError(f"`points` must hold more than 3 points to measure neighbour distances, got {len(points)}")
        scales = neighbour_distance(points.xyz.float()) * init_scale
        return cls._isotropic(points.xyz.float(), points.rgb.float(), scales, sh_degree, init_opacity, generator)

    @classmethod
    def random(
        cls,
        count: int,
        low: torch.Tensor,
        high: torch.Tensor,
        *,
        sh_degree: int = MAX_SH_DEGREE,
        init_opacity: float = 0.1,
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> "Gaussians":
        """``count`` Gaussians uniform in the box [low, high] with random colours (gsplat's random init).

        Scales, quaternions, opacities as in ``from_points``.

        Args:
            count: number of Gaussians (> 3). low, high: [3] box corners, low < high.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count <= 3:
            raise ValueError(f"`count` must be an int > 3, got {count!r}")
        low, high = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (low, high))
        if low.shape != (3,) or high.shape != (3,) or not bool((low < high).all()):
            raise ValueError(f"`low` and `high` must be 3 numbers with low < high, got {low.tolist()} and "
                             f"{high.tolist()}")  # fmt: skip
        xyz = low + (high - low) * torch.rand(count, 3, generator=generator)
        rgb = torch.rand(count, 3, generator=generator)
        scales = neighbour_distance(xyz) * init_scale
        return cls._isotropic(xyz, rgb, scales, sh_degree, init_opacity, generator)

    @classmethod
    def _isotropic(cls, xyz, rgb, scales, sh_degree, init_opacity, generator) -> "Gaussians":
        if not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"`sh_degree` must be in [0, {MAX_SH_DEGREE}], got {sh_degree}")
        if not 0.0 < init_opacity < 1.0:
            raise ValueError(f"`init_opacity` must be in (0, 1), got {init_opacity}")
        n = xyz.shape[0]
        return cls(
            means=xyz.clone(),
            quats=torch.rand(n, 4, generator=generator),
            scales=scales.log()[:, None].expand(n, 3).clone(),
            opacities=torch.full((n,), math.log(init_opacity / (1.0 - init_opacity))),
            sh0=rgb_to_sh(rgb)[:, None, :].clone(),
            shN=torch.zeros(n, num_sh_bases(sh_degree) - 1, 3),
        )

    def save_ply(self, path: str | Path) -> None:
        """Write the Inria 3DGS PLY layout (module docstring) as float32."""
        arrays = {name: tensor.detach().to("cpu", torch.float32).numpy() for name, tensor in self.params().items()}
        n, rest = len(self), self.shN.shape[1]
        columns: dict[str, np.ndarray] = {}
        for axis, name in enumerate("xyz"):
            columns[name] = arrays["means"][:, axis]
        for name in ("nx", "ny", "nz"):
            columns[name] = np.zeros(n, dtype=np.float32)
        for channel in range(3):
            columns[f"f_dc_{channel}"] = arrays["sh0"][:, 0, channel]
        for channel in range(3):
            for basis in range(rest):
                columns[f"f_rest_{channel * rest + basis}"] = arrays["shN"][:, basis, channel]
        columns["opacity"] = arrays["opacities"]
        for axis in range(3):
            columns[f"scale_{axis}"] = arrays["scales"][:, axis]
        for axis in range(4):
            columns[f"rot_{axis}"] = arrays["quats"][:, axis]
        write_ply(path, {name: np.ascontiguousarray(values) for name, values in columns.items()})

    @classmethod
    def load_ply(cls, path: str | Path) -> "Gaussians":
        """Read a 3DGS PLY in the Inria layout (other properties, e.g. normals, are ignored); float32 on CPU.

        Raises:
            ValueError naming the file when properties are missing or ``f_rest_*`` is not 0, 9, 24 or 45 long.
        """
        columns = read_ply(path)
        required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                    "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
        missing = [name for name in required if name not in columns]
        if missing:
            raise ValueError(f"{path}: not a 3DGS PLY, it lacks properties {missing}")
        rest_count = sum(1 for name in columns if name.startswith("f_rest_"))
        expected_rest = [f"f_rest_{i}" for i in range(rest_count)]
        if rest_count % 3 or not _is_sh_count(rest_count // 3 + 1) or any(n not in columns for n in expected_rest):
            raise ValueError(f"{path}: f_rest_* must be f_rest_0 .. f_rest_{{3(K-1)-1}} with K in (1, 4, 9, 16), "
                             f"got {rest_count} properties")  # fmt: skip

        def stack(names: list[str]) -> torch.Tensor:
            return torch.from_numpy(np.stack([columns[name] for name in names], axis=1).astype(np.float32))

        n, rest = len(columns["x"]), rest_count // 3
        shN = stack(expected_rest).reshape(n, 3, rest).transpose(1, 2) if rest else torch.zeros(n, 0, 3)
        return cls(
            means=stack(["x", "y", "z"]),
            quats=stack([f"rot_{i}" for i in range(4)]),
            scales=stack([f"scale_{i}" for i in range(3)]),
            opacities=torch.from_numpy(columns["opacity"].astype(np.float32)),
            sh0=stack(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :],
            shN=shN.contiguous(),
        )


def _is_sh_count(bases: int) -> bool:
    return bases in tuple(num_sh_bases(d) for d in range(MAX_SH_DEGREE + 1))
