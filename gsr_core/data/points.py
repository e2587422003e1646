"""Coloured point clouds (for initialising Gaussians), stored as PLY with x y z red green blue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gsr_core.ply import read_ply, write_ply


@dataclass(frozen=True)
class PointCloud:
    """Attributes: xyz [P, 3] float32 world positions; rgb [P, 3] float32 colours in [0, 1]."""

    xyz: torch.Tensor
    rgb: torch.Tensor

    def __post_init__(self) -> None:
        if self.xyz.ndim != 2 or self.xyz.shape[-1] != 3:
            raise ValueError(f"`xyz` must have shape [P, 3], got {list(self.xyz.shape)}")
        if self.rgb.shape != self.xyz.shape:
            raise ValueError(f"`rgb` must have the shape of `xyz` {list(self.xyz.shape)}, got {list(self.rgb.shape)}")

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def write(self, path: str | Path) -> None:
        xyz = self.xyz.detach().cpu().numpy().astype(np.float32)
        rgb = (self.rgb.detach().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
        write_ply(path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                         "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]})

    @classmethod
    def read(cls, path: str | Path) -> "PointCloud":
        columns = read_ply(path)
        missing = {"x", "y", "z", "red", "green", "blue"} - set(columns)
        if missing:
            raise ValueError(f"{path}: point cloud lacks properties {sorted(missing)}")
        xyz = np.stack([columns[k] for k in ("x", "y", "z")], axis=1).astype(np.float32)
        rgb = np.stack([columns[k] for k in ("red", "green", "blue")], axis=1).astype(np.float32) / 255.0
        return cls(torch.from_numpy(xyz), torch.from_numpy(rgb))
