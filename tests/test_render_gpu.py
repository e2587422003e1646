"""Parity of the torch backend with gsplat's CUDA rasterization (needs CUDA and gsplat; skipped otherwise)."""

from __future__ import annotations

import math

import pytest
import torch

from gsr_core.cameras import intrinsics_from_fov, look_at
from gsr_core.render import rasterize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _scene(device, n=3000, cameras=2, width=96, height=64):
    generator = torch.Generator().manual_seed(0)
    viewmats, Ks = [], []
    for c in range(cameras):
        angle = 0.4 * c
        eye = torch.tensor([3.0 * math.sin(angle), 0.2, -3.0 * math.cos(angle)], dtype=torch.float64)
        viewmats.append(look_at(eye, torch.zeros(3), torch.tensor([0.0, -1.0, 0.0])))
        Ks.append(intrinsics_from_fov(width, height, 45.0))
    tensors = {
        "means": (torch.rand(n, 3, generator=generator) - 0.5) * 2.0,
        "quats": torch.randn(n, 4, generator=generator),
        "scales": torch.exp(torch.rand(n, 3, generator=generator) * 2.0 - 5.0),
        "opacities": torch.sigmoid(torch.randn(n, generator=generator)),
        "colors": torch.randn(n, 16, 3, generator=generator) * 0.3,
        "viewmats": torch.stack(viewmats).float(),
        "Ks": torch.stack(Ks).float(),
        "backgrounds": torch.rand(cameras, 3, generator=generator),
    }
    return {k: v.to(device) for k, v in tensors.items()}, width, height


@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED"])
def test_torch_backend_matches_gsplat_on_cuda(render_mode):
    pytest.importorskip("gsplat", reason="gsplat is not installed")
    tensors, width, height = _scene("cuda")
    trainable = ("means", "quats", "scales", "opacities", "colors")
    outputs, gradients = {}, {}
    for backend in ("gsplat", "torch"):
        inputs = {k: (v.clone().requires_grad_(True) if k in trainable else v) for k, v in tensors.items()}
        colours, alphas, info = rasterize(
            **inputs, width=width, height=height, sh_degree=3, render_mode=render_mode, backend=backend
        )
        info["means2d"].retain_grad()
        upstream = torch.randn(colours.shape, generator=torch.Generator().manual_seed(1)).to("cuda")
        ((colours * upstream).sum() + alphas.sum()).backward()
        outputs[backend] = (colours.detach(), alphas.detach(), info["radii"])
        gradients[backend] = {name: inputs[name].grad for name in trainable}
        gradients[backend]["means2d"] = info["means2d"].grad
    ours, theirs = outputs["torch"], outputs["gsplat"]
    assert (ours[0] - theirs[0]).abs().mean() < 1e-3
    assert (ours[1] - theirs[1]).abs().mean() < 1e-3
    assert (ours[2] == theirs[2]).float().mean() > 0.99
    for name, expected in gradients["gsplat"].items():
        got = gradients["torch"][name]
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
        assert cosine > 0.99, f"{name}: gradient cosine similarity {cosine:.4f}"
