"""LPIPS (Zhang et al., CVPR 2018), AlexNet variant, version 0.1 — the score 3D super-resolution papers report.

Written without torchvision (which must never be imported in gsr: it breaks ``import diffusers`` here).
The two weight files LPIPS needs:

* the backbone: torchvision's ImageNet AlexNet checkpoint ``alexnet-owt-7be5be79.pth``. Our ``AlexNetFeatures``
  has torchvision's ``features.*`` keys, so the file loads with a strict ``load_state_dict`` of its
  ``features.*`` entries (``classifier.*`` is ignored). It is read from an explicit path or from the torch hub
  cache, ``torch.hub.get_dir()/checkpoints/``; never downloaded (gsr makes no network access at runtime).
* the five linear heads (1x1 convolutions over the feature channels), shipped inside the torchmetrics package
  (``torchmetrics/functional/image/lpips_models/alex.pth``, keys ``lin{k}.model.1.weight``); torchmetrics is
  located on disk, not imported.

A missing or broken file raises ``LPIPSUnavailable``, whose message names the file, where it was looked for and
how to provide it; no score is ever made up. ``lpips_status`` reports availability and the identity of the
weights (for reports and cache keys) without raising.

The distance between images x and y (in [-1, 1] after ``to_model_range``): scale each input with
``(x - shift) / scale``, run AlexNet and keep the ReLU outputs after conv1..conv5; for each of the five layers
unit-normalise the features along channels (``f / (||f|| + 1e-10)``), take the squared difference, apply the
layer's linear head, average over space; sum over the layers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch import nn

from gsr_core.images import to_model_range
from gsr_core.metrics import check_image_pair
from gsr_core.store import sha256_file

ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILENAME}"
# torch hub names checkpoints by the first hex digits of their sha256: the official file's digest starts so.
ALEXNET_SHA256_PREFIX = "7be5be79"
HEADS_RELATIVE_PATH = Path("functional", "image", "lpips_models", "alex.pth")

# Smallest H and W AlexNet's conv1 + two max-pools accept (the second pool needs a 3 x 3 input).
MIN_IMAGE_SIZE = 31
TAP_CHANNELS = (64, 192, 384, 256, 256)
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
NORMALISE_EPS = 1e-10

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot be computed: a weight file is missing or unreadable. The message says which and how to fix it."""


class LPIPSStatus(NamedTuple):
    """Whether LPIPS can run, why (or why not), and which weights it uses.

    Attributes:
        available: True when both weight files load.
        reason: a sentence for a report ("LPIPS unavailable: ..." material when not available).
        weights_id: ``"alexnet-sha256:<hex>;heads-sha256:<hex>"`` of the files used, None when unavailable.
    """

    available: bool
    reason: str
    weights_id: str | None


class AlexNetFeatures(nn.Module):
    """The convolutional part of torchvision's AlexNet, state-dict compatible (``features.0 ... features.10``).

    Shape:
        input: [B, 3, H, W] (ImageNet-like normalised), H, W >= ``MIN_IMAGE_SIZE``.
        output: five [B, c_l, h_l, w_l] ReLU outputs after conv1..conv5, c_l = ``TAP_CHANNELS``.
    """

    # Index in ``features`` of the ReLU after each of the five convolutions.
    TAP_INDICES = (1, 4, 7, 9, 11)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features[: self.TAP_INDICES[-1] + 1]):
            images = layer(images)
            if index in self.TAP_INDICES:
                taps.append(images)
        return taps


class LPIPS(nn.Module):
    """LPIPS distance (AlexNet, v0.1) with frozen weights; ``load_lpips`` builds it from the weight files.

    Args:
        backbone: AlexNet features holding the ImageNet weights (see ``alexnet_features``).
        heads: the five linear heads, 1x1 convolutions c_l -> 1 without bias (see ``lpips_heads``).
        weights_id: identity of the weight files, kept for reports and cache keys.
    """

    def __init__(self, backbone: AlexNetFeatures, heads: nn.ModuleList, weights_id: str | None = None) -> None:
        super().__init__()
        self.weights_id = weights_id
        self.backbone = backbone
        self.heads = heads
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(INPUT_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of each image pair (0 for identical images, larger = less similar).

        Args:
            a: [C, H, W, 3] float images in [0, 1], H, W >= ``MIN_IMAGE_SIZE``.
            b: [C, H, W, 3] float images in [0, 1].

        Returns:
            [C] float32 distances on the device of ``a``; differentiable with respect to the images.
        """
        check_image_pair(a, b)
        height, width = a.shape[1:3]
        if min(height, width) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"`a` and `b` must be at least {MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} pixels for AlexNet, "
                f"got {height} x {width}"
            )
        for name, image in (("a", a), ("b", b)):
            low, high = image.min().item(), image.max().item()
            if low < 0.0 or high > 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        count = a.shape[0]
        images = to_model_range(torch.cat([a, b])).to(device=self.shift.device, dtype=self.shift.dtype)
        taps = self.backbone((images - self.shift) / self.scale)
        distance = torch.zeros(count, device=images.device, dtype=images.dtype)
        for tap, head in zip(taps, self.heads):
            unit = tap / (torch.linalg.vector_norm(tap, dim=1, keepdim=True) + NORMALISE_EPS)
            distance = distance + head((unit[:count] - unit[count:]).square()).mean(dim=(1, 2, 3))
        return distance.to(a.device)


def alexnet_features(state: Mapping[str, torch.Tensor]) -> AlexNetFeatures:
    """AlexNet features loaded strictly from the ``features.*`` entries of a torchvision AlexNet state dict.

    Raises:
        LPIPSUnavailable: no ``features.*`` entries, or missing, unexpected or wrongly shaped ones.
    """
    features = {key: value for key, value in state.items() if key.startswith("features.")}
    if not features:
        raise LPIPSUnavailable(f"the state dict has no `features.*` entries (keys: {_key_summary(state)})")
    return _load_strict(AlexNetFeatures(), features, "AlexNet `features.*`")


def lpips_heads(state: Mapping[str, torch.Tensor]) -> nn.ModuleList:
    """The five LPIPS linear heads from the reference state dict (keys ``lin{k}.model.1.weight``, [1, c_k, 1, 1]).

    Raises:
        LPIPSUnavailable: a key is unexpected or missing, or a weight has the wrong shape.
    """
    renamed = {}
    for key, value in state.items():
        layer, _, rest = key.partition(".")
        if not (layer.startswith("lin") and layer[3:].isdigit() and rest == "model.1.weight"):
            raise LPIPSUnavailable(f"unexpected key {key!r} in the LPIPS heads (expected lin{{k}}.model.1.weight)")
        renamed[f"{layer[3:]}.weight"] = value
    heads = nn.ModuleList(nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in TAP_CHANNELS)
    return _load_strict(heads, renamed, "LPIPS heads")


def default_weights_path() -> Path:
    """Where the AlexNet checkpoint is looked for when no path is given: the torch hub checkpoint cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILENAME


def heads_path() -> Path:
    """The LPIPS AlexNet v0.1 linear heads file inside the installed torchmetrics package (not imported).

    Raises:
        LPIPSUnavailable: when torchmetrics is not installed or does not ship the file.
    """
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSUnavailable(
            "the LPIPS linear heads come with the torchmetrics package, which is not installed "
            "(pip install 'torchmetrics>=1.4,<2')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / HEADS_RELATIVE_PATH
    if not path.is_file():
        raise LPIPSUnavailable(f"the LPIPS linear heads {path} are missing from the installed torchmetrics")
    return path


def lpips_status(weights_path: str | Path | None = None) -> LPIPSStatus:
    """Whether LPIPS can run with these weights, without raising (loads and caches the model on the CPU).

    Args:
        weights_path: the AlexNet checkpoint; None looks in the torch hub cache (``default_weights_path()``).

    Returns:
        ``LPIPSStatus(available, reason, weights_id)``.
    """
    try:
        model = load_lpips(weights_path)
    except LPIPSUnavailable as error:
        return LPIPSStatus(False, str(error), None)
    path = _resolve_weights_path(weights_path)
    official = model.weights_id.startswith(f"alexnet-sha256:{ALEXNET_SHA256_PREFIX}")
    provenance = (
        "the torchvision release"
        if official
        else f"NOT the torchvision release (its sha256 does not start with {ALEXNET_SHA256_PREFIX}; "
        "scores are not comparable with published LPIPS)"
    )
    return LPIPSStatus(True, f"LPIPS (AlexNet, v0.1) with backbone {path}, {provenance}", model.weights_id)


def load_lpips(weights_path: str | Path | None = None, device: str | torch.device = "cpu") -> LPIPS:
    """The frozen LPIPS model, loaded once per (file, device) in this process.

    Args:
        weights_path: torchvision's ``alexnet-owt-7be5be79.pth`` (or a file with its ``features.*`` keys);
            None looks in the torch hub cache (``default_weights_path()``). Never downloaded.
        device: where the model runs.

    Raises:
        LPIPSUnavailable: the checkpoint or the heads file is missing, unreadable or does not match the
            architecture; the message names the file and how to provide it.
        TypeError: ``weights_path`` is not a path.
    """
    path = _resolve_weights_path(weights_path)
    device = torch.device(device)
    if not path.is_file():
        raise LPIPSUnavailable(_missing_backbone_message(path, "no such file"))
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))
    if key not in _LOADED:
        _LOADED[key] = _build(path).to(device)
    return _LOADED[key]


def lpips(a: torch.Tensor, b: torch.Tensor, weights_path: str | Path | None = None) -> torch.Tensor:
    """LPIPS distance per image pair, computed on the device of ``a`` (see ``LPIPS.forward``).

    Args:
        a: [C, H, W, 3] float images in [0, 1].
        b: [C, H, W, 3] float images in [0, 1].
        weights_path: the AlexNet checkpoint, as for ``load_lpips``.

    Returns:
        [C] distances.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"`a` must be a torch.Tensor of shape [C, H, W, 3], got {type(a).__name__}")
    return load_lpips(weights_path, device=a.device)(a, b)


_LOADED: dict[tuple[str, int, int, str], LPIPS] = {}


def _resolve_weights_path(weights_path: str | Path | None) -> Path:
    if weights_path is None:
        return default_weights_path()
    if not isinstance(weights_path, (str, Path)):
        raise TypeError(f"`weights_path` must be a str, a Path or None, got {type(weights_path).__name__}")
    return Path(weights_path).expanduser()


def _missing_backbone_message(path: Path, problem: str) -> str:
    return (
        f"LPIPS needs torchvision's AlexNet weights {ALEXNET_FILENAME}; looked for {path}: {problem}. "
        f"Provide it by downloading {ALEXNET_URL} into {path.parent} (any machine with network: "
        f"`python -c \"import torch; torch.hub.load_state_dict_from_url('{ALEXNET_URL}')\"` puts it in the "
        "torch hub cache, then copy it), or pass its location as `weights_path`."
    )


def _build(path: Path) -> LPIPS:
    try:
        backbone = alexnet_features(_read_state_dict(path))
    except LPIPSUnavailable as error:
        raise LPIPSUnavailable(_missing_backbone_message(path, str(error))) from error
    heads_file = heads_path()
    try:
        heads = lpips_heads(_read_state_dict(heads_file))
    except LPIPSUnavailable as error:
        message = f"the LPIPS heads file {heads_file} is unusable: {error}; reinstall torchmetrics"
        raise LPIPSUnavailable(message) from error
    return LPIPS(backbone, heads, f"alexnet-sha256:{sha256_file(path)};heads-sha256:{sha256_file(heads_file)}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A tensor state dict read with ``torch.load(weights_only=True)`` onto the CPU, or LPIPSUnavailable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read the file means the weights are unavailable
        raise LPIPSUnavailable(f"not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise LPIPSUnavailable(f"expected a state dict of tensors, found a {type(state).__name__}")
    return dict(state)


def _load_strict(module: ModuleT, state: Mapping[str, torch.Tensor], what: str) -> ModuleT:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise LPIPSUnavailable(f"the {what} weights do not match the architecture: {error}") from error
    return module


def _key_summary(state: Mapping[str, torch.Tensor], limit: int = 6) -> str:
    keys = list(state)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "") if keys else "none"
