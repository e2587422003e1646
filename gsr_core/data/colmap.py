"""COLMAP sparse models, read with pycolmap, as posed pinhole views and an initial point cloud.

Layout of a COLMAP dataset folder::

    <root>/sparse/0/{cameras,images,points3D}.bin   the mapper's output, the layout 3DGS reads (.txt for text models)
    <root>/sparse/{cameras,images,points3D}.bin     the layout `colmap image_undistorter` writes
    <root>/<images>/<name>                          the images the model names (``images``, ``images_4``, ...)

COLMAP's conventions are gsr's: OpenCV camera axes, ``cam_from_world`` is the world-to-camera transform, and
pixel coordinates have integers on pixel corners (the top-left pixel's centre is (0.5, 0.5)). PINHOLE and
SIMPLE_PINHOLE cameras carry over unchanged, as do SIMPLE_RADIAL, RADIAL, OPENCV and FULL_OPENCV cameras whose
distortion parameters are all zero. Other cameras are distorted: refused with instructions, or, with
``undistort=True``, undistorted on load by COLMAP's own undistorter (``Undistorter``).

pycolmap reads only complete models; ``read_points3d_file`` reads a lone ``points3D`` file (LLFF releases
ship one without its ``images.bin``).
"""

from __future__ import annotations

import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
import torch

from gsr_core.cameras import Camera
from gsr_core.data.datasets import (Dataset, SourceView, camera_for_image, missing_files_error, view_name)
from gsr_core.data.points import PointCloud
from gsr_core.images import image_size

MODEL_NAMES = ("cameras", "images", "points3D")
OPTIONAL_MODEL_NAMES = ("rigs", "frames")  # COLMAP >= 3.12 writes them; read when present
PINHOLE_MODELS = frozenset({"SIMPLE_PINHOLE", "PINHOLE"})
RADIAL_TANGENTIAL_MODELS = frozenset({"SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV"})  # pinhole when undistorted
_TEXT_COUNT = re.compile(r"#\s*Number of (cameras|images|points):\s*(\d+)")


def find_model_dir(root: Path) -> Path | None:
    """``root/sparse/0`` or ``root/sparse``, whichever holds a cameras file first; None when neither does."""
    for candidate in (root / "sparse" / "0", root / "sparse"):
        if any((candidate / f"cameras{suffix}").is_file() for suffix in (".bin", ".txt")):
            return candidate
    return None


def model_files(model_dir: Path) -> list[Path]:
    """The model's files: cameras, images, points3D (all .bin or all .txt), then rigs/frames when present.

    Raises:
        ValueError naming the folder and the missing files.
    """
    for suffix in (".bin", ".txt"):
        required = [model_dir / f"{name}{suffix}" for name in MODEL_NAMES]
        present = [path.name for path in required if path.is_file()]
        if len(present) == len(required):
            optional = [model_dir / f"{name}{suffix}" for name in OPTIONAL_MODEL_NAMES]
            return required + [path for path in optional if path.is_file()]
        if present:
            missing = [path.name for path in required if not path.is_file()]
            hint = (" This looks like an LLFF release (poses_bounds.npy): load it with `format: llff`."
                    if (model_dir.parent.parent / "poses_bounds.npy").is_file() else "")
            raise ValueError(f"COLMAP model {model_dir} is incomplete: {', '.join(missing)} missing (it has "
                             f"{', '.join(present)}); a model needs cameras, images and points3D.{hint}")
    raise ValueError(f"{model_dir} holds no COLMAP model: expected cameras, images and points3D .bin (or .txt) files")


def read_model(model_dir: Path) -> pycolmap.Reconstruction:
    """A complete COLMAP model, read by pycolmap and checked for truncation.

    Binary files are checked by writing the model back and comparing file sizes (a truncated file can read
    without error but writes back longer); text files by their ``# Number of ...`` header lines.

    Raises:
        ValueError naming the folder (and file) that is missing, unreadable or truncated.
    """
    files = model_files(model_dir)
    binary = files[0].suffix == ".bin"
    reconstruction = pycolmap.Reconstruction()
    try:
        (reconstruction.read_binary if binary else reconstruction.read_text)(str(model_dir))
    except Exception as error:  # pycolmap raises ValueError, IndexError, MemoryError, RuntimeError
        raise ValueError(
            f"COLMAP model {model_dir} cannot be read ({type(error).__name__}: {error}): a file is truncated or "
            f"corrupt, or names a camera model pycolmap {pycolmap.__version__} does not know; re-export the model "
            f"(`colmap model_converter --input_path {model_dir} --output_path OUT --output_type BIN`)") from None
    (_check_binary_complete if binary else _check_text_counts)(reconstruction, model_dir)
    return reconstruction


def _check_binary_complete(reconstruction: pycolmap.Reconstruction, model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="gsr-colmap-") as scratch:
        reconstruction.write_binary(scratch)
        for name in MODEL_NAMES:
            size, expected = (model_dir / f"{name}.bin").stat().st_size, (Path(scratch) / f"{name}.bin").stat().st_size
            if size != expected:
                raise ValueError(f"COLMAP model file {model_dir / f'{name}.bin'} is truncated or corrupt: it is {size} "
                                 f"bytes but the {_counts(reconstruction)} it declares take {expected} bytes; "
                                 f"re-export the model")


def _check_text_counts(reconstruction: pycolmap.Reconstruction, model_dir: Path) -> None:
    counts = {"cameras": reconstruction.num_cameras(), "images": reconstruction.num_images(),
              "points": reconstruction.num_points3D()}
    for name in MODEL_NAMES:
        path = model_dir / f"{name}.txt"
        with open(path) as handle:
            for line in handle:
                if not line.startswith("#"):
                    break
                match = _TEXT_COUNT.match(line)
                if match and int(match.group(2)) != counts[match.group(1)]:
                    raise ValueError(f"COLMAP model file {path} is truncated or corrupt: its header declares "
                                     f"{match.group(2)} {match.group(1)} but {counts[match.group(1)]} were read")


def _counts(reconstruction: pycolmap.Reconstruction) -> str:
    return (f"{reconstruction.num_cameras()} cameras, {reconstruction.num_images()} images and "
            f"{reconstruction.num_points3D()} points")


class Undistorter:
    """COLMAP's undistortion (what ``colmap image_undistorter`` runs) of images from one distorted camera.

    Default ``UndistortCameraOptions``: the undistorted image keeps only valid pixels (no blank border).

    Attributes:
        distorted: pycolmap camera of the input images.
        undistorted: PINHOLE pycolmap camera of the output images (its own width and height).
    """

    def __init__(self, distorted: pycolmap.Camera, where: str):
        self.options = pycolmap.UndistortCameraOptions()
        self.distorted = distorted
        try:
            self.undistorted = pycolmap.undistort_camera(self.options, distorted)
        except Exception as error:
            raise ValueError(f"{where}: COLMAP cannot undistort camera {distorted}: {error}") from None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """[H, W, C] (C = 3 or 4) float in [0, 1] of the distorted size -> [H', W', C] of the undistorted size."""
        if image.shape[:2] != (self.distorted.height, self.distorted.width):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the distorted camera "
                             f"{self.distorted.width}x{self.distorted.height}")
        pixels = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
        planes = [pixels[..., :3]] + [pixels[..., channel] for channel in range(3, pixels.shape[-1])]
        undistorted = [pycolmap.undistort_image(self.options, pycolmap.Bitmap.from_array(np.ascontiguousarray(plane)),
                                                self.distorted)[0].to_array() for plane in planes]
        stacked = np.concatenate([plane.reshape(*plane.shape[:2], -1) for plane in undistorted], axis=-1)
        return torch.from_numpy(stacked.astype(np.float32) / 255.0)


class DistortedCameraError(ValueError):
    """A distorted camera met while not undistorting; each reader re-raises it with its own instructions."""


def _distorted_camera_error(where: str, camera: pycolmap.Camera, image_folder: Path, model_dir: Path) -> ValueError:
    return ValueError(
        f"{where}: camera {camera.camera_id} is {camera.model.name} with distortion "
        f"{camera.params_info} = {list(np.round(camera.params, 6))}; gsr fits pinhole images. Set `undistort: true` to "
        f"undistort with COLMAP's undistorter on load, or undistort once on disk with `colmap image_undistorter "
        f"--image_path {image_folder} --input_path {model_dir} --output_path UNDISTORTED` (or "
        f"pycolmap.undistort_images('UNDISTORTED', '{model_dir}', '{image_folder}')) and load UNDISTORTED")


def pinhole_view_camera(camera: pycolmap.Camera, world_to_camera: torch.Tensor, width: int, height: int, where: str,
                        undistorters: dict | None) -> tuple[Camera, Undistorter | None]:
    """The pinhole camera of an image file of ``width`` x ``height`` taken by COLMAP camera ``camera``.

    Args:
        undistorters: None to refuse distorted cameras; else a dict caching one ``Undistorter`` per camera and size.

    Returns:
        the camera (of the undistorted image when distorted) and the undistorter to apply (or None).

    Raises:
        DistortedCameraError for a distorted camera when ``undistorters`` is None; ValueError naming ``where``
        for an image whose aspect ratio is not the camera's.
    """
    model = camera.model.name
    distortion = np.asarray(camera.params)[camera.extra_params_idxs()]
    model_camera = Camera(camera.calibration_matrix(), world_to_camera, camera.width, camera.height)
    fitted = camera_for_image(model_camera, width, height, where)  # also checks the aspect ratio
    if model in PINHOLE_MODELS or (model in RADIAL_TANGENTIAL_MODELS and not distortion.any()):
        return fitted, None
    if undistorters is None:
        raise DistortedCameraError(where)
    key = (camera.camera_id, model, tuple(camera.params), camera.width, camera.height, width, height)
    if key not in undistorters:
        resized = pycolmap.Camera(camera.todict())
        resized.rescale(width, height)
        undistorters[key] = Undistorter(resized, where)
    undistorter = undistorters[key]
    pinhole = undistorter.undistorted
    return Camera(pinhole.calibration_matrix(), world_to_camera, pinhole.width, pinhole.height), undistorter


def read_colmap(root: Path, images: str = "images", undistort: bool = False) -> Dataset:
    """A COLMAP dataset folder as views (sorted by image name, named by it) and its 3D points.

    Args:
        root: the dataset folder (see the module docstring for the layout).
        images: the image folder, relative to ``root``; a folder of resized images (``images_4``) gets the
            intrinsics scaled to its images' size.
        undistort: undistort images of distorted cameras (else they are refused with instructions).

    Raises:
        ValueError naming the file: no or incomplete model, unreadable model, images missing on disk (all named),
        distorted cameras (when not undistorting), non-finite poses, a model without 3D points.
    """
    root = Path(root)
    model_dir = find_model_dir(root)
    if model_dir is None:
        raise ValueError(f"{root} has no COLMAP model: expected {root / 'sparse' / '0'}/cameras.bin, images.bin and "
                         f"points3D.bin (or .txt); run COLMAP (`colmap mapper`, then `colmap image_undistorter`) "
                         f"or point `path` at the dataset folder that holds sparse/")
    reconstruction = read_model(model_dir)
    image_folder = root / images
    undistorters: dict | None = {} if undistort else None
    views, missing, unposed = [], [], []
    for image in sorted(reconstruction.images.values(), key=lambda item: item.name):
        if not image.has_pose:
            unposed.append(image.name)
            continue
        path = image_folder / image.name
        if not path.is_file():
            missing.append(image.name)
            continue
        where = f"image {image.name!r} of COLMAP model {model_dir}"
        world_to_camera = torch.eye(4, dtype=torch.float64)
        world_to_camera[:3] = torch.from_numpy(np.asarray(image.cam_from_world().matrix(), dtype=np.float64))
        if not torch.isfinite(world_to_camera).all():
            raise ValueError(f"{where}: its pose is not finite ({world_to_camera[:3].tolist()}); re-run bundle "
                             f"adjustment or delete the image from the model")
        width, height = image_size(path)
        camera = reconstruction.cameras[image.camera_id]
        try:
            pinhole, undistorter = pinhole_view_camera(camera, world_to_camera, width, height, where, undistorters)
        except DistortedCameraError:
            raise _distorted_camera_error(where, camera, image_folder, model_dir) from None
        views.append(SourceView(view_name(image.name), path, pinhole, None, undistorter))
    if missing:
        raise missing_files_error(f"COLMAP model {model_dir} (image folder {image_folder})", missing,
                                  "restore them, or choose the image folder that holds them with `images`")
    if not views:
        raise ValueError(f"COLMAP model {model_dir} has no registered images (none has a pose)")
    points = colmap_point_cloud(reconstruction)
    if len(points) == 0:
        raise ValueError(f"COLMAP model {model_dir} has no 3D points; the initial point cloud would be empty "
                         f"(re-run `colmap point_triangulator` on the model)")
    metadata = {"images": images, "model": model_dir.relative_to(root).as_posix()}
    if unposed:
        metadata["images_without_pose"] = unposed
    return Dataset("colmap", root, tuple(views), points, tuple(model_files(model_dir)), metadata)


def colmap_point_cloud(reconstruction: pycolmap.Reconstruction) -> PointCloud:
    """The model's 3D points with their colours, in point-id order."""
    points = [reconstruction.points3D[point_id] for point_id in sorted(reconstruction.points3D)]
    xyz = np.array([point.xyz for point in points], dtype=np.float32).reshape(-1, 3)
    rgb = np.array([point.color for point in points], dtype=np.float32).reshape(-1, 3) / 255.0
    return PointCloud(torch.from_numpy(xyz), torch.from_numpy(rgb))


@dataclass(frozen=True)
class ColmapPoints:
    """A lone COLMAP points3D file: points and their tracks (which images observe each point).

    Attributes:
        xyz: [P, 3] float64 world positions. rgb: [P, 3] uint8 colours. error: [P] float64 reprojection errors.
        track_point: [E] int64, the row of ``xyz`` each observation belongs to.
        track_image_id: [E] int64 COLMAP image id of each observation (ids of the model's images file).
        track_point2d: [E] int64 index of the observation among that image's 2D points.
    """

    xyz: np.ndarray
    rgb: np.ndarray
    error: np.ndarray
    track_point: np.ndarray
    track_image_id: np.ndarray
    track_point2d: np.ndarray

    def point_cloud(self) -> PointCloud:
        return PointCloud(torch.from_numpy(self.xyz.astype(np.float32)),
                          torch.from_numpy(self.rgb.astype(np.float32) / 255.0))


_POINT_HEADER = struct.Struct("<Q3d3BdQ")  # point3D_id, x y z, r g b, error, track length


def read_points3d_file(path: str | Path) -> ColmapPoints:
    """Read ``points3D.bin`` or ``points3D.txt`` on its own (pycolmap needs the whole model).

    Binary layout (little-endian): uint64 count, then per point uint64 id, 3 float64 xyz, 3 uint8 rgb, float64
    error, uint64 track length and that many (int32 image_id, int32 point2D_idx). Text: one line per point,
    ``ID X Y Z R G B ERROR (IMAGE_ID POINT2D_IDX)...``.

    Raises:
        ValueError naming the file when it is missing, truncated or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"COLMAP points file {path} does not exist")
    rows, tracks = (_points_binary if path.suffix == ".bin" else _points_text)(path)
    if not rows:
        raise ValueError(f"COLMAP points file {path} holds no points")
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    lengths = np.array([len(track) // 2 for track in tracks], dtype=np.int64)
    pairs = np.concatenate(tracks).reshape(-1, 2).astype(np.int64)
    return ColmapPoints(table[:, :3], table[:, 3:6].astype(np.uint8), table[:, 6],
                        np.repeat(np.arange(len(rows)), lengths), pairs[:, 0], pairs[:, 1])


def _points_binary(path: Path) -> tuple[list, list]:
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"COLMAP points file {path} is truncated ({len(data)} bytes)")
    (count,), offset = struct.unpack_from("<Q", data, 0), 8
    rows, tracks = [], []
    for index in range(count):
        if offset + _POINT_HEADER.size > len(data):
            raise ValueError(f"COLMAP points file {path} is truncated: it declares {count} points but ends in point "
                             f"{index}")
        _, x, y, z, r, g, b, error, length = _POINT_HEADER.unpack_from(data, offset)
        offset += _POINT_HEADER.size
        if offset + 8 * length > len(data):
            raise ValueError(f"COLMAP points file {path} is truncated: point {index} declares a track of {length} "
                             f"observations that the file does not hold")
        tracks.append(np.frombuffer(data, dtype="<i4", count=2 * length, offset=offset))
        offset += 8 * length
        rows.append((x, y, z, r, g, b, error))
    if offset != len(data):
        raise ValueError(f"COLMAP points file {path} is corrupt: {len(data) - offset} bytes follow its {count} points")
    return rows, tracks


def _points_text(path: Path) -> tuple[list, list]:
    rows, tracks, declared = [], [], None
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            match = _TEXT_COUNT.match(line)
            if match and match.group(1) == "points":
                declared = int(match.group(2))
            if line.startswith("#") or not line.strip():
                continue
            fields = line.split()
            try:
                values = [float(value) for value in fields[1:8]]
                track = np.array([int(value) for value in fields[8:]], dtype=np.int32)
            except ValueError:
                raise ValueError(f"{path}:{number}: malformed point line {line.strip()[:80]!r}") from None
            if len(values) < 7 or len(track) % 2:
                raise ValueError(f"{path}:{number}: expected ID X Y Z R G B ERROR and (IMAGE_ID POINT2D_IDX) pairs, "
                                 f"got {len(fields)} fields")
            rows.append(tuple(values))
            tracks.append(track)
    if declared is not None and declared != len(rows):
        raise ValueError(f"COLMAP points file {path} is truncated: its header declares {declared} points, it holds "
                         f"{len(rows)}")
    return rows, tracks
