"""Rendering 3D Gaussians: ``rasterize`` with gsplat's contract, on CUDA (gsplat) or any device (PyTorch)."""

from gsr_core.render.rasterize import rasterize

__all__ = ["rasterize"]
