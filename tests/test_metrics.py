"""PSNR, SSIM and LPIPS: exact values, an independent SSIM, and LPIPS on random AlexNet weights (no downloads)."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsr_core import lpips as lpips_module
from gsr_core.lpips import (
    ALEXNET_FILENAME,
    LPIPSUnavailable,
    heads_path,
    load_lpips,
    lpips,
    lpips_status,
)
from gsr_core.metrics import psnr, ssim, ssim_map

# ---------------------------------------------------------------- PSNR


def test_psnr_of_constant_images_is_exact():
    a = torch.full((1, 5, 7, 3), 0.25)
    b = torch.full((1, 5, 7, 3), 0.75)
    # MSE = 0.5^2 = 0.25 -> PSNR = -10 log10(0.25) = 6.0206 dB.
    assert psnr(a, b).item() == pytest.approx(-10 * math.log10(0.25), rel=1e-6)


def test_psnr_is_per_image():
    a = torch.zeros(2, 4, 4, 3)
    b = a.clone()
    b[0, 1, 2, 0] = 1.0  # one value of 48 off by 1: MSE = 1/48
    b[1] = 0.1  # every value off by 0.1: MSE = 0.01
    assert psnr(a, b).tolist() == pytest.approx([10 * math.log10(48), 20.0], rel=1e-5)


def test_psnr_of_identical_images_is_inf():
    a = torch.rand(3, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(a, a.clone())).all() and (psnr(a, a) > 0).all()


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_metrics_reject_bad_inputs_naming_the_argument(metric):
    image = torch.rand(2, 8, 8, 3)
    with pytest.raises(ValueError, match=r"`a` must have shape \[C, H, W, 3\].*image\[None\]"):
        metric(image[0], image[0])
    with pytest.raises(ValueError, match="same shape"):
        metric(image, image[:1])
    with pytest.raises(ValueError, match="`b` must have shape"):
        metric(image, image[..., :2])
    with pytest.raises(TypeError, match="`b` must be a floating-point"):
        metric(image, (image * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="`a` must be a torch.Tensor"):
        metric(image.numpy(), image)
    with pytest.raises(TypeError, match="one dtype"):
        metric(image, image.double())


# ---------------------------------------------------------------- SSIM


def reference_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Straightforward SSIM per image: explicit 11x11 windows over a zero-padded image, one pixel at a time."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    g /= g.sum()
    window = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    count, height, width, channels = a.shape
    result = np.zeros(count)
    for n in range(count):
        values = []
        for c in range(channels):
            x = np.pad(a[n, :, :, c], 5)
            y = np.pad(b[n, :, :, c], 5)
            for i in range(height):
                for j in range(width):
                    wx, wy = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                    mx, my = (window * wx).sum(), (window * wy).sum()
                    vx = (window * wx * wx).sum() - mx**2
                    vy = (window * wy * wy).sum() - my**2
                    cov = (window * wx * wy).sum() - mx * my
                    values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        result[n] = np.mean(values)
    return result


@pytest.fixture(scope="module")
def image_pair():
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(2, 13, 17, 3, generator=generator, dtype=torch.float64)
    b = (a + 0.15 * torch.randn(a.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return a, b


def test_ssim_matches_explicit_window_reference(image_pair):
    a, b = image_pair
    expected = reference_ssim(a.numpy(), b.numpy())
    np.testing.assert_allclose(ssim(a, b).numpy(), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ssim(a.float(), b.float()).numpy(), expected, rtol=0, atol=1e-5)


def test_ssim_map_has_image_size_and_is_symmetric(image_pair):
    a, b = (image.float() for image in image_pair)
    assert ssim_map(a, b).shape == (2, 3, 13, 17)
    torch.testing.assert_close(ssim(a, b), ssim(b, a))


def test_ssim_is_one_for_identical_and_falls_with_noise():
    generator = torch.Generator().manual_seed(2)
    clean = torch.rand(1, 32, 32, 3, generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    scores = [ssim(clean, (clean + sigma * noise).clamp(0, 1)).item() for sigma in (0.0, 0.02, 0.1, 0.3)]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[0] > scores[1] > scores[2] > scores[3]


def test_ssim_loss_gradient_flows_and_matches_finite_differences():
    generator = torch.Generator().manual_seed(3)
    target = torch.rand(1, 5, 6, 3, generator=generator, dtype=torch.float64)
    render = torch.rand(1, 5, 6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    (1 - ssim(render, target)).sum().backward()
    assert torch.isfinite(render.grad).all() and render.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: ssim(x, target), (render.detach().requires_grad_(),))


# ---------------------------------------------------------------- LPIPS

# torchvision's AlexNet state-dict layout: (key, shape). The classifier entries get small stand-in shapes
# (the real ones hold 58M numbers); LPIPS must ignore them whatever they hold.
ALEXNET_LAYOUT = [
    ("features.0.weight", (64, 3, 11, 11)),
    ("features.0.bias", (64,)),
    ("features.3.weight", (192, 64, 5, 5)),
    ("features.3.bias", (192,)),
    ("features.6.weight", (384, 192, 3, 3)),
    ("features.6.bias", (384,)),
    ("features.8.weight", (256, 384, 3, 3)),
    ("features.8.bias", (256,)),
    ("features.10.weight", (256, 256, 3, 3)),
    ("features.10.bias", (256,)),
    ("classifier.1.weight", (8, 4)),
    ("classifier.1.bias", (8,)),
]


def random_alexnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised random weights in torchvision's key layout (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in ALEXNET_LAYOUT:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = math.sqrt(2.0 / fan_in) if key.endswith("weight") else 0.01
        state[key] = torch.randn(shape, generator=generator) * scale
    return state


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub") / ALEXNET_FILENAME
    torch.save(random_alexnet_state(), path)
    return path


def reference_lpips(state: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> float:
    """LPIPS of one pair [H, W, 3] written out with functional ops from the raw state dicts."""
    heads = torch.load(heads_path(), map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(image):
        x = ((image.permute(2, 0, 1)[None] * 2 - 1) - shift) / scale
        out = []
        x = F.relu(F.conv2d(x, state["features.0.weight"], state["features.0.bias"], stride=4, padding=2))
        out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), state["features.3.weight"], state["features.3.bias"], padding=2))
        out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), state["features.6.weight"], state["features.6.bias"], padding=1))
        out.append(x)
        x = F.relu(F.conv2d(x, state["features.8.weight"], state["features.8.bias"], padding=1))
        out.append(x)
        x = F.relu(F.conv2d(x, state["features.10.weight"], state["features.10.bias"], padding=1))
        out.append(x)
        return out

    total = 0.0
    for k, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weight = heads[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * weight).sum(1).mean().item()
    return total


@pytest.fixture(scope="module")
def lpips_images():
    generator = torch.Generator().manual_seed(4)
    a = torch.rand(3, 48, 56, 3, generator=generator)
    b = (a + 0.2 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    return a, b


def test_lpips_matches_functional_reference(alexnet_file, lpips_images):
    a, b = lpips_images
    state = random_alexnet_state()
    distances = load_lpips(alexnet_file)(a, b)
    expected = [reference_lpips(state, a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(distances.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_lpips_properties(alexnet_file, lpips_images):
    a, b = lpips_images
    model = load_lpips(alexnet_file)
    distances = model(a, b)
    assert distances.shape == (3,) and distances.dtype == torch.float32
    assert (distances > 0).all()
    torch.testing.assert_close(model(a, a.clone()), torch.zeros(3), atol=1e-7, rtol=0)
    torch.testing.assert_close(model(b, a), distances, atol=1e-6, rtol=1e-5)
    singles = torch.cat([model(a[i : i + 1], b[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, distances, atol=1e-6, rtol=1e-5)
    noisier = (a + 1.5 * (b - a)).clamp(0, 1)  # the same perturbation, 1.5 times larger
    assert (model(a, noisier) > distances).all()


def test_lpips_is_differentiable_and_frozen(alexnet_file, lpips_images):
    a, b = lpips_images
    model = load_lpips(alexnet_file)
    render = a[:1].clone().requires_grad_()
    model(render, b[:1]).sum().backward()
    assert torch.isfinite(render.grad).all() and render.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_lpips_rejects_bad_images(alexnet_file):
    model = load_lpips(alexnet_file)
    small = torch.rand(1, 30, 64, 3)
    with pytest.raises(ValueError, match="at least 31 x 31"):
        model(small, small)
    assert model(torch.rand(1, 31, 31, 3), torch.rand(1, 31, 31, 3)).shape == (1,)
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"`b` must be in \[0, 1\]"):
        model(image, image * 255)


def test_load_lpips_is_cached_per_file_and_device(alexnet_file, tmp_path):
    assert load_lpips(alexnet_file) is load_lpips(str(alexnet_file), device=torch.device("cpu"))
    other = tmp_path / "other.pth"
    torch.save(random_alexnet_state(seed=1), other)
    assert load_lpips(other) is not load_lpips(alexnet_file)
    image = torch.rand(1, 32, 32, 3)
    assert lpips(image, image.flip(1), weights_path=other) != lpips(image, image.flip(1), weights_path=alexnet_file)


def test_missing_weights_raise_lpips_unavailable_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / ALEXNET_FILENAME
    with pytest.raises(LPIPSUnavailable) as caught:
        load_lpips()
    message = str(caught.value)
    assert str(expected) in message and "download" in message.lower() and "weights_path" in message
    status = lpips_status()
    assert not status.available and str(expected) in status.reason and status.weights_id is None
    with pytest.raises(LPIPSUnavailable, match=str(tmp_path / "elsewhere.pth")):
        load_lpips(tmp_path / "elsewhere.pth")


def test_status_reports_identity_of_hub_cache_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = tmp_path / "checkpoints" / ALEXNET_FILENAME
    path.parent.mkdir()
    torch.save(random_alexnet_state(seed=2), path)
    status = lpips_status()
    assert status.available and str(path) in status.reason
    assert "NOT the torchvision release" in status.reason  # random weights, not the published checkpoint
    assert status.weights_id.startswith(f"alexnet-sha256:{hashlib.sha256(path.read_bytes()).hexdigest()};")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda state: state.pop("features.6.weight"), r"Missing key\(s\).*features\.6\.weight"),
        (lambda state: state.update({"features.3.weight": torch.zeros(192, 64, 3, 3)}), "size mismatch"),
        (lambda state: state.update({"features.12.weight": torch.zeros(1)}), "Unexpected key"),
        (lambda state: [state.pop(key) for key in list(state) if key.startswith("features.")], "no `features"),
    ],
    ids=["missing-key", "wrong-shape", "unexpected-key", "no-features"],
)
def test_malformed_checkpoint_is_rejected_strictly(tmp_path, corrupt, message):
    state = random_alexnet_state()
    corrupt(state)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(LPIPSUnavailable, match=message) as caught:
        load_lpips(path)
    assert str(path) in str(caught.value)
    assert not lpips_status(path).available


def test_unreadable_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSUnavailable, match="not a readable torch checkpoint"):
        load_lpips(path)
    with pytest.raises(TypeError, match="`weights_path`"):
        load_lpips(42)


def test_lpips_never_imports_torchvision(alexnet_file):
    script = textwrap.dedent(
        f"""
        import sys

        class BlockTorchvision:
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    raise ImportError("gsr must not import torchvision")

        sys.meta_path.insert(0, BlockTorchvision())
        import torch
        from gsr_core.lpips import load_lpips

        image = torch.rand(1, 40, 40, 3)
        assert load_lpips({str(alexnet_file)!r})(image, image.flip(1)).item() > 0
        assert not [name for name in sys.modules if name.split(".")[0] in ("torchvision", "torchmetrics")]
        """
    )
    root = Path(lpips_module.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
