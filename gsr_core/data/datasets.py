"""Real captures in: format detection, and the common assembly of a dataset into a views folder.

A reader (``colmap``, ``llff``, ``blender``, ``instant_ngp``) turns a dataset folder into a ``Dataset``: its
views in the dataset's own order, each with a stable name, its image file, a pinhole ``Camera`` that matches
that file (after ``undistort``, for a distorted source) and the dataset's own split where it has one; the
initial point cloud; and the model files it read. The assembly (``plan_views``, ``write_dataset_views``) then

1. brings every view to one size, as the views format requires: views whose sizes differ by a few pixels
   (COLMAP's undistorter crops each image on its own) are centre-cropped to the smallest size, with ``cx, cy``
   shifted by the crop; sizes further apart than ``MAX_CROP_FRACTION`` are an error;
2. assigns the split: ``llffhold`` (every n-th view in dataset order, from the first, is a test view — the
   3DGS papers' protocol) or ``dataset`` (the dataset's own train/test files);
3. composites RGBA images over the chosen background (white or black);
4. applies the resolution cap: images whose longer side exceeds ``max_side`` are resized with antialiased
   bicubic filtering and the intrinsics scaled per axis (exact under the pixel convention of
   ``gsr_core.cameras``).

View names depend on the dataset, never on the image folder or the resolution cap, so the same dataset loaded
at two resolutions gives views with the same names and splits (evaluation matches views by name).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from gsr_core.cameras import Camera
from gsr_core.data.points import PointCloud
from gsr_core.data.views import Split, ViewsWriter
from gsr_core.images import composite_over, read_image
from gsr_core.store import canonical_json, digest_tree

Format = Literal["colmap", "llff", "blender", "instant_ngp"]
FORMATS: tuple[str, ...] = ("colmap", "llff", "blender", "instant_ngp")
SplitPolicy = Literal["llffhold", "dataset"]
Background = Literal["white", "black"]
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_CROP_FRACTION = 0.05  # largest share of a side cropped away to bring views to one size
_ASPECT_TOLERANCE_PX = 1.0  # rounding of a downscaled image folder's sizes
_ROTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SourceView:
    """One posed image of a dataset, as a reader found it.

    Attributes:
        name: stable view name (the same at every resolution of the dataset).
        image: the image file.
        camera: pinhole camera of the image file, or of ``undistort(image)`` when ``undistort`` is set.
        split: the dataset's own split ("train"/"test"), None when the dataset has no split files.
        undistort: maps the decoded file [H, W, C] to the undistorted image [H', W', C] the camera describes.
    """

    name: str
    image: Path
    camera: Camera
    split: Split | None = None
    undistort: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Dataset:
    """A dataset as read: views in dataset order, initial points, the model files read and free-form metadata."""

    format: Format
    root: Path
    views: tuple[SourceView, ...]
    points: PointCloud | None
    model_files: tuple[Path, ...]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class PlannedView:
    """A view as it will be written: its split, the crop of the (undistorted) source image, its final camera.

    Attributes:
        source: the reader's view.
        split: "train" or "test".
        crop: (left, top, width, height) in pixels of the source image (after undistortion).
        camera: the written image's camera (cropped, then scaled by the resolution cap).
    """

    source: SourceView
    split: Split
    crop: tuple[int, int, int, int]
    camera: Camera

    @property
    def name(self) -> str:
        return self.source.name


# ---------------------------------------------------------------------------------------------- helpers for readers


def camera_for_image(camera: Camera, width: int, height: int, where: str) -> Camera:
    """``camera`` (for the size the model states) fitted to an image file of ``width`` x ``height``.

    A folder such as LLFF's ``images_4`` holds the model's images resized; intrinsics scale per axis by
    ``width / camera.width`` and ``height / camera.height`` (exact with pixel corners on integers). The two
    factors may differ only by the rounding of the resized sizes.

    Raises:
        ValueError naming ``where`` when the file's aspect ratio is not the model's.
    """
    if (width, height) == (camera.width, camera.height):
        return camera
    scale_x, scale_y = width / camera.width, height / camera.height
    if (abs(camera.width * scale_y - width) > _ASPECT_TOLERANCE_PX
            or abs(camera.height * scale_x - height) > _ASPECT_TOLERANCE_PX):
        raise ValueError(
            f"{where} is {width}x{height} but its camera is {camera.width}x{camera.height}: that is not the same "
            f"image resized (aspect ratios differ); the image folder does not belong to this model")
    scale = torch.diag(torch.tensor([scale_x, scale_y, 1.0], dtype=torch.float64))
    return Camera(scale @ camera.K, camera.world_to_camera, width, height)


def world_to_camera_from_pose(camera_to_world: torch.Tensor, where: str) -> torch.Tensor:
    """[4, 4] world-to-camera of a rigid [3, 4] or [4, 4] camera-to-world in OpenCV axes.

    Raises:
        ValueError naming ``where`` when the pose is not finite or its rotation is not a rotation.
    """
    pose = torch.as_tensor(camera_to_world, dtype=torch.float64)
    if pose.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"{where}: a pose must be a 3x4 or 4x4 matrix, got shape {list(pose.shape)}")
    if not torch.isfinite(pose).all():
        raise ValueError(f"{where}: the pose has non-finite values {pose.tolist()}; fix or drop this view")
    rotation, centre = pose[:3, :3], pose[:3, 3]
    error = (rotation.T @ rotation - torch.eye(3, dtype=torch.float64)).abs().max().item()
    if error > _ROTATION_TOLERANCE or torch.linalg.det(rotation) <= 0:
        raise ValueError(f"{where}: the pose's 3x3 part is not a rotation (|R^T R - I| = {error:.2g}, "
                         f"det = {torch.linalg.det(rotation).item():.3g}); expected a rigid camera-to-world")
    world_to_camera = torch.eye(4, dtype=torch.float64)
    world_to_camera[:3, :3] = rotation.T
    world_to_camera[:3, 3] = -rotation.T @ centre
    return world_to_camera


def view_name(relative_path: str) -> str:
    """A view name from an image path relative to the dataset: extension dropped, folders joined by '_'.

    ``.`` and ``..`` parts are dropped: ``./train/r_0.png`` -> ``train_r_0``, ``../aerial/0019.png`` -> ``aerial_0019``.
    """
    path = Path(relative_path.replace("\\", "/"))
    parts = [part for part in path.with_suffix("").parts if part not in (".", "..", "")]
    return "_".join(parts)


def image_files(folder: Path) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``, any case) of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def missing_files_error(source: str, missing: list[str], fix: str) -> ValueError:
    """One error naming every missing image (the first 10 and a count)."""
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return ValueError(f"{source}: {len(missing)} image(s) it lists are missing on disk: {shown}; {fix}")


# ---------------------------------------------------------------------------------------- detection and reading


def image_folders(root: Path) -> list[str]:
    """Folders of ``root`` whose name starts with ``images`` (``images``, ``images_4``, ...), sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("images"))


def detect_format(root: str | Path) -> Format:
    """The format of a dataset folder, from the files that mark each format.

    Order: ``poses_bounds.npy`` -> llff (an LLFF release may also hold a COLMAP model; name ``format: colmap``
    to read that instead), ``transforms_train.json`` -> blender, ``transforms.json`` -> instant_ngp, a COLMAP
    model in ``sparse/0`` or ``sparse`` -> colmap.

    Raises:
        ValueError naming the folder and what was looked for.
    """
    from gsr_core.data.colmap import find_model_dir  # the readers import this module

    root = _dataset_root(root)
    if (root / "poses_bounds.npy").is_file():
        return "llff"
    if (root / "transforms_train.json").is_file():
        return "blender"
    if (root / "transforms.json").is_file():
        return "instant_ngp"
    if find_model_dir(root) is not None:
        return "colmap"
    raise ValueError(
        f"cannot tell the format of dataset folder {root}: it has no poses_bounds.npy (llff), "
        f"transforms_train.json (blender), transforms.json (instant_ngp) or sparse/0/cameras.bin|txt (colmap); "
        f"it contains {sorted(p.name for p in root.iterdir())[:20]}")


def check_layout(root: str | Path, format: Format | Literal["auto"] = "auto", images: str | None = None,
                 split: SplitPolicy = "llffhold") -> Format:
    """Check, without reading any model, that ``root`` looks like a dataset the other arguments fit.

    Returns:
        the format (``detect_format`` for "auto").

    Raises:
        ValueError naming the argument or file that does not fit.
    """
    root = _dataset_root(root)
    if format not in ("auto", *FORMATS):
        raise ValueError(f"`format` must be one of auto, {', '.join(FORMATS)}; got {format!r}")
    resolved: Format = detect_format(root) if format == "auto" else format
    marker = {"llff": "poses_bounds.npy", "blender": "transforms_train.json", "instant_ngp": "transforms.json"}
    if resolved in marker and not (root / marker[resolved]).is_file():
        raise ValueError(f"format {resolved}: {root / marker[resolved]} does not exist")
    if resolved in ("colmap", "llff"):
        folder = images or "images"
        if not (root / folder).is_dir():
            raise ValueError(f"`images`: image folder {root / folder} does not exist; "
                             f"{root} has image folders {image_folders(root) or 'none'}")
    elif images is not None:
        raise ValueError(f"`images` selects the image folder of colmap and llff datasets; {resolved} frames name "
                         f"their own image files, so leave `images` unset (got {images!r})")
    if split == "dataset":
        if resolved != "blender":
            raise ValueError(f"`split: dataset` needs the dataset's own train/test files, which the {resolved} "
                             f"format does not have; use `split: llffhold`")
        if not (root / "transforms_test.json").is_file():
            raise ValueError(f"`split: dataset`: {root / 'transforms_test.json'} does not exist; "
                             f"use `split: llffhold` to hold out training views instead")
    elif split != "llffhold":
        raise ValueError(f"`split` must be 'llffhold' or 'dataset', got {split!r}")
    return resolved


def read_dataset(root: str | Path, format: Format | Literal["auto"] = "auto", images: str | None = None,
                 split: SplitPolicy = "llffhold", undistort: bool = False) -> Dataset:
    """Read a dataset folder in any supported format.

    Args:
        root: the dataset folder.
        format: "auto" (see ``detect_format``) or one of ``FORMATS``.
        images: image folder of colmap/llff datasets, relative to ``root`` (default ``images``).
        split: "llffhold" reads the training views only (Blender's ``transforms_train.json``); "dataset" also
            reads the dataset's test views.
        undistort: undistort images of distorted cameras with COLMAP's undistorter; when False they are refused.

    Raises:
        ValueError naming the file and what to do, for anything missing, unreadable or inconsistent.
    """
    from gsr_core.data import blender, colmap, instant_ngp, llff  # the readers import this module

    root = _dataset_root(root)
    resolved = check_layout(root, format, images, split)
    if resolved == "colmap":
        dataset = colmap.read_colmap(root, images or "images", undistort=undistort)
    elif resolved == "llff":
        dataset = llff.read_llff(root, images or "images")
    elif resolved == "blender":
        dataset = blender.read_blender(root, ("train", "test") if split == "dataset" else ("train",))
    else:
        dataset = instant_ngp.read_instant_ngp(root, undistort=undistort)
    names = [view.name for view in dataset.views]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"dataset {root}: several views would be named {duplicates[:5]}; view names come from "
                         f"image file names, which must be unique")
    return dataset


def dataset_digest(dataset: Dataset) -> str:
    """Content digest of exactly the files ``dataset`` uses: its model files and its views' images."""
    files = sorted({*dataset.model_files, *(view.image for view in dataset.views)})
    entries = {os.path.relpath(path, dataset.root).replace(os.sep, "/"): digest_tree(path) for path in files}
    return hashlib.sha256(canonical_json(entries).encode()).hexdigest()


def _dataset_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist or is not a folder")
    return root


# ------------------------------------------------------------------------------------------------------ assembly


def plan_views(dataset: Dataset, split: SplitPolicy = "llffhold", llffhold: int = 8,
               max_side: int | None = None) -> list[PlannedView]:
    """Decide, from cameras alone, each view's split, crop and final camera (see the module docstring).

    Raises:
        ValueError when views differ in size by more than ``MAX_CROP_FRACTION``, when ``split: dataset`` meets a
        view without a split, or when no view is left for training.
    """
    if not dataset.views:
        raise ValueError(f"dataset {dataset.root} has no views")
    if isinstance(llffhold, bool) or not isinstance(llffhold, int) or llffhold < 2:
        raise ValueError(f"`llffhold` must be an int >= 2, got {llffhold!r}")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"`max_side` must be a positive int or None, got {max_side!r}")
    splits = _splits(dataset, split, llffhold)
    width = min(view.camera.width for view in dataset.views)
    height = min(view.camera.height for view in dataset.views)
    planned = []
    for view, view_split in zip(dataset.views, splits):
        crop, camera = _crop_to(view, width, height)
        planned.append(PlannedView(view, view_split, crop, _capped(camera, max_side)))
    return planned


def write_dataset_views(dataset: Dataset, out: str | Path, split: SplitPolicy = "llffhold", llffhold: int = 8,
                        max_side: int | None = None, background: Background = "white",
                        progress: Callable[[int], None] | None = None) -> Path:
    """Write ``dataset`` as a views folder at ``out`` (see the module docstring for the steps).

    Args:
        progress: called with 1 after each view is written.

    Returns:
        ``out`` as a Path.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"`background` must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    plan = plan_views(dataset, split, llffhold, max_side)
    metadata = {**dataset.metadata, "scene": dataset.root.resolve().name, "format": dataset.format, "split": split}
    if split == "llffhold":
        metadata["llffhold"] = llffhold
    writer = ViewsWriter(out, metadata)
    had_alpha = False
    for view in plan:
        image = _prepared_image(view)
        had_alpha |= image.shape[-1] == 4
        if image.shape[-1] == 4:
            colour = torch.tensor(BACKGROUNDS[background], dtype=image.dtype)
            image = composite_over(image, colour)
        if (view.camera.width, view.camera.height) != (image.shape[1], image.shape[0]):
            image = _resize(image, view.camera.width, view.camera.height)
        writer.add(view.name, view.split, view.camera, image)
        if progress is not None:
            progress(1)
    if had_alpha:
        writer.metadata["background"] = list(BACKGROUNDS[background])
    return writer.close(dataset.points)


def _splits(dataset: Dataset, split: SplitPolicy, llffhold: int) -> list[Split]:
    if split == "llffhold":
        splits: list[Split] = ["test" if index % llffhold == 0 else "train" for index in range(len(dataset.views))]
    elif split == "dataset":
        unsplit = [view.name for view in dataset.views if view.split is None]
        if unsplit:
            raise ValueError(f"`split: dataset`: dataset {dataset.root} ({dataset.format}) has no own split for views "
                             f"{unsplit[:5]}; use `split: llffhold`")
        splits = [view.split for view in dataset.views]
    else:
        raise ValueError(f"`split` must be 'llffhold' or 'dataset', got {split!r}")
    if "train" not in splits:
        raise ValueError(f"dataset {dataset.root}: no view is left for training ({len(splits)} view(s), split {split}"
                         f"{f', llffhold {llffhold}' if split == 'llffhold' else ''})")
    return splits


def _crop_to(view: SourceView, width: int, height: int) -> tuple[tuple[int, int, int, int], Camera]:
    camera = view.camera
    for side, have, want in (("width", camera.width, width), ("height", camera.height, height)):
        if have - want > MAX_CROP_FRACTION * have:
            raise ValueError(
                f"view {view.name!r} ({view.image}) is {camera.width}x{camera.height} but another view is only "
                f"{width}x{height}; a views folder holds one image size and cropping {have - want} px of its {side} "
                f"is more than {MAX_CROP_FRACTION:.0%}: load views of one size (one camera), or resize them first")
    left, top = (camera.width - width) // 2, (camera.height - height) // 2
    if (left, top, width, height) == (0, 0, camera.width, camera.height):
        return (0, 0, width, height), camera
    K = camera.K.clone()
    K[0, 2] -= left
    K[1, 2] -= top
    return (left, top, width, height), Camera(K, camera.world_to_camera, width, height)


def _capped(camera: Camera, max_side: int | None) -> Camera:
    if max_side is None or max(camera.width, camera.height) <= max_side:
        return camera
    factor = max_side / max(camera.width, camera.height)
    width, height = max(1, round(camera.width * factor)), max(1, round(camera.height * factor))
    scale = torch.diag(torch.tensor([width / camera.width, height / camera.height, 1.0], dtype=torch.float64))
    return Camera(scale @ camera.K, camera.world_to_camera, width, height)


def _prepared_image(view: PlannedView) -> torch.Tensor:
    """The source image decoded, undistorted, checked against its camera and cropped: [h, w, 3|4]."""
    source = view.source
    image = read_image(source.image)
    if source.undistort is not None:
        image = source.undistort(image)
    if (image.shape[1], image.shape[0]) != (source.camera.width, source.camera.height):
        raise ValueError(f"image {source.image} is {image.shape[1]}x{image.shape[0]} but view {source.name!r} expects "
                         f"{source.camera.width}x{source.camera.height}; was the file replaced while loading?")
    left, top, width, height = view.crop
    return image[top:top + height, left:left + width]


def _resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, 3] -> [height, width, 3] with antialiased bicubic filtering (continuous coordinates scale exactly)."""
    planar = image.permute(2, 0, 1)[None]
    resized = F.interpolate(planar, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).clamp(0.0, 1.0)
