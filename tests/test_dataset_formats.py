"""Dataset readers on small scenes written by the tests: COLMAP (text and binary), LLFF, Blender, instant-ngp.

Each scene has known cameras; the readers must give them back exactly (after the documented axis and size
conversions), match images by name, and refuse bad input with an error naming the file and what to do.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch

from gsr_core.cameras import Camera, look_at
from gsr_core.data.datasets import (MAX_CROP_FRACTION, Dataset, SourceView, check_layout, dataset_digest,
                                    detect_format, plan_views, read_dataset, write_dataset_views)
from gsr_core.data.views import Views
from gsr_core.images import read_image, write_image

WIDTH, HEIGHT = 48, 36
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ scene builders


def scene_cameras(count: int = 6, width: int = WIDTH, height: int = HEIGHT, focal: tuple[float, float] = (40.0, 42.0),
                  principal: tuple[float, float] | None = None) -> list[Camera]:
    """Cameras on a ring around the origin, looking at it."""
    cx, cy = principal or (width / 2, height / 2)
    K = torch.tensor([[focal[0], 0.0, cx], [0.0, focal[1], cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    cameras = []
    for index in range(count):
        angle = 2 * math.pi * index / count
        eye = torch.tensor([3 * math.cos(angle), 3 * math.sin(angle), 1.0], dtype=torch.float64)
        cameras.append(Camera(K, look_at(eye, torch.zeros(3), torch.tensor([0.0, 0.0, 1.0])), width, height))
    return cameras


def smooth_image(seed: int, width: int = WIDTH, height: int = HEIGHT, channels: int = 3) -> torch.Tensor:
    """[height, width, channels] smooth random colours in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 4, 4, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return image[0].permute(1, 2, 0)


def scene_points(count: int = 40, seed: int = 0) -> torch.Tensor:
    return (torch.rand(count, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5)


def write_colmap_text(model_dir: Path, cameras: list[Camera], names: list[str], points: torch.Tensor,
                      camera_lines: list[str] | None = None) -> None:
    """A COLMAP text model: one camera per image (PINHOLE unless ``camera_lines`` says otherwise), the points
    observed wherever they project inside an image."""
    model_dir.mkdir(parents=True, exist_ok=True)
    camera_lines = camera_lines or [
        f"{i + 1} PINHOLE {c.width} {c.height} {c.K[0, 0].item()!r} {c.K[1, 1].item()!r} {c.K[0, 2].item()!r} "
        f"{c.K[1, 2].item()!r}" for i, c in enumerate(cameras)]
    tracks: list[list[tuple[int, int]]] = [[] for _ in points]
    image_lines = []
    for index, (camera, name) in enumerate(zip(cameras, names)):
        uv, depth = camera.project(points)
        observations = []
        for point, ((u, v), z) in enumerate(zip(uv.tolist(), depth.tolist())):
            if z > 0 and 0 <= u < camera.width and 0 <= v < camera.height:
                tracks[point].append((index + 1, len(observations)))
                observations.append(f"{u!r} {v!r} {point + 1}")
        rotation = pycolmap.Rotation3d(camera.world_to_camera[:3, :3].numpy())
        qx, qy, qz, qw = (float(q) for q in rotation.quat)
        tx, ty, tz = camera.world_to_camera[:3, 3].tolist()
        image_lines += [f"{index + 1} {qw!r} {qx!r} {qy!r} {qz!r} {tx!r} {ty!r} {tz!r} {index + 1} {name}",
                        " ".join(observations)]
    point_lines = [f"{p + 1} {x!r} {y!r} {z!r} {10 + p} {20 + p} {30 + p} 0.5 "
                   + " ".join(f"{image} {idx}" for image, idx in tracks[p])
                   for p, (x, y, z) in enumerate(points.tolist())]
    (model_dir / "cameras.txt").write_text(f"# Number of cameras: {len(camera_lines)}\n"
                                           + "\n".join(camera_lines) + "\n")
    (model_dir / "images.txt").write_text(f"# Number of images: {len(cameras)}, mean observations per image: 1\n"
                                          + "\n".join(image_lines) + "\n")
    (model_dir / "points3D.txt").write_text(f"# Number of points: {len(point_lines)}, mean track length: 1\n"
                                            + "\n".join(point_lines) + "\n")


@pytest.fixture
def colmap_scene(tmp_path: Path) -> tuple[Path, list[Camera], torch.Tensor]:
    """A COLMAP dataset with a text model in sparse/0 and PNG images named in reverse order of their ids."""
    root = tmp_path / "colmap"
    cameras, points = scene_cameras(), scene_points()
    names = [f"view_{5 - i}.png" for i in range(len(cameras))]
    write_colmap_text(root / "sparse" / "0", cameras, names, points)
    for index, name in enumerate(names):
        write_image(root / "images" / name, smooth_image(index))
    return root, cameras, points


def to_binary(model_dir: Path, legacy: bool = True) -> None:
    """Rewrite a text model in place as a binary one (through pycolmap); ``legacy`` drops the rigs and frames
    files of COLMAP >= 3.12, as in models written by older COLMAP (poses then come from images.bin)."""
    reconstruction = pycolmap.Reconstruction(str(model_dir))
    for path in model_dir.glob("*.txt"):
        path.unlink()
    reconstruction.write_binary(str(model_dir))
    if legacy:
        (model_dir / "rigs.bin").unlink()
        (model_dir / "frames.bin").unlink()


# ------------------------------------------------------------------------------------------------------- COLMAP


@pytest.mark.parametrize("binary", ["text", "binary", "binary_with_rigs"])
def test_colmap_cameras_points_and_names_come_back(colmap_scene, binary):
    root, cameras, points = colmap_scene
    if binary != "text":
        to_binary(root / "sparse" / "0", legacy=binary == "binary")
    dataset = read_dataset(root)
    assert dataset.format == "colmap"
    assert [view.name for view in dataset.views] == [f"view_{i}" for i in range(6)]  # sorted by image name
    for view in dataset.views:
        original = cameras[5 - int(view.name[-1])]  # view_5 is image id 1
        assert view.image == root / "images" / f"{view.name}.png"
        torch.testing.assert_close(view.camera.K, original.K)
        torch.testing.assert_close(view.camera.world_to_camera, original.world_to_camera, atol=1e-12, rtol=0)
        assert (view.camera.width, view.camera.height) == (WIDTH, HEIGHT)
    torch.testing.assert_close(dataset.points.xyz, points.float())
    assert dataset.points.rgb[3].tolist() == pytest.approx([13 / 255, 23 / 255, 33 / 255])
    suffix = "txt" if binary == "text" else "bin"
    names = ("cameras", "images", "points3D") + (("rigs", "frames") if binary == "binary_with_rigs" else ())
    assert [path.name for path in dataset.model_files] == [f"{name}.{suffix}" for name in names]


def test_colmap_image_folder_at_another_resolution_scales_intrinsics(colmap_scene):
    root, cameras, points = colmap_scene
    for path in (root / "images").iterdir():
        write_image(root / "images_2" / path.name, read_image(path)[::2, ::2])
    dataset = read_dataset(root, images="images_2")
    full = read_dataset(root)
    for half_view, full_view in zip(dataset.views, full.views):
        assert half_view.name == full_view.name
        assert (half_view.camera.width, half_view.camera.height) == (WIDTH // 2, HEIGHT // 2)
        torch.testing.assert_close(half_view.camera.K[:2], full_view.camera.K[:2] / 2)
        uv_half, _ = half_view.camera.project(points)
        uv_full, _ = full_view.camera.project(points)
        torch.testing.assert_close(uv_half, uv_full / 2)


def test_colmap_undistorted_layout_in_sparse_is_found(colmap_scene):
    root, _, _ = colmap_scene
    for path in (root / "sparse" / "0").iterdir():
        path.rename(root / "sparse" / path.name)
    (root / "sparse" / "0").rmdir()
    assert len(read_dataset(root, format="colmap").views) == 6


def test_colmap_missing_sparse_model_says_where_it_looked(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"cannot tell the format.*sparse/0"):
        read_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"has no COLMAP model: expected .*sparse/0.*colmap mapper"):
        read_dataset(tmp_path, format="colmap")


def test_colmap_incomplete_model_names_the_missing_file(colmap_scene):
    root, _, _ = colmap_scene
    (root / "sparse" / "0" / "images.txt").unlink()
    with pytest.raises(ValueError, match=r"incomplete: images.txt missing"):
        read_dataset(root)


@pytest.mark.parametrize("name", ["cameras", "images", "points3D"])
@pytest.mark.parametrize("keep", ["half", "all_but_4_bytes"])
def test_colmap_truncated_binary_files_are_refused(colmap_scene, name, keep):
    root, _, _ = colmap_scene
    model = root / "sparse" / "0"
    to_binary(model)
    path = model / f"{name}.bin"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if keep == "half" else data[:-4])
    with pytest.raises(ValueError, match=r"(cannot be read|truncated or corrupt)") as error:
        read_dataset(root)
    assert str(model) in str(error.value)


def test_colmap_truncated_text_points_are_refused(colmap_scene):
    root, _, _ = colmap_scene
    path = root / "sparse" / "0" / "points3D.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-5]) + "\n")
    with pytest.raises(ValueError, match=r"points3D.txt is truncated or corrupt: its header declares 40 points"):
        read_dataset(root)


def test_colmap_missing_images_are_all_named(colmap_scene):
    root, _, _ = colmap_scene
    (root / "images" / "view_2.png").unlink()
    (root / "images" / "view_4.png").unlink()
    with pytest.raises(ValueError, match=r"2 image\(s\) it lists are missing on disk: view_2.png, view_4.png"):
        read_dataset(root)


def test_colmap_unknown_camera_model_is_refused(colmap_scene):
    root, cameras, points = colmap_scene
    model = root / "sparse" / "0"
    lines = (model / "cameras.txt").read_text().replace(" PINHOLE ", " MYSTERY_LENS ", 1)
    (model / "cameras.txt").write_text(lines)
    with pytest.raises(ValueError, match=rf"COLMAP model {model} cannot be read .*Camera model does not exist"):
        read_dataset(root)


def test_colmap_non_finite_pose_is_refused(colmap_scene):
    root, _, _ = colmap_scene
    model = root / "sparse" / "0"
    to_binary(model)
    data = bytearray((model / "images.bin").read_bytes())
    data[8 + 4 + 32:8 + 4 + 40] = np.array([np.nan]).tobytes()  # first image: count, id, quaternion, then tx
    (model / "images.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"image 'view_5.png' of COLMAP model .*pose is not finite"):
        read_dataset(root)


def test_colmap_distorted_camera_is_refused_with_instructions_and_zero_distortion_is_pinhole(tmp_path):
    cameras, points = scene_cameras(2), scene_points()
    c = cameras[0]
    f, cx, cy = c.K[0, 0].item(), c.K[0, 2].item(), c.K[1, 2].item()
    for model_k, expect_error in ((0.0, False), (0.05, True)):
        root = tmp_path / f"k{model_k}"
        lines = [f"{i + 1} SIMPLE_RADIAL {WIDTH} {HEIGHT} {f} {cx} {cy} {model_k}" for i in range(2)]
        write_colmap_text(root / "sparse" / "0", [Camera(torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1.0]]),
                                                         cam.world_to_camera, WIDTH, HEIGHT) for cam in cameras],
                          ["a.png", "b.png"], points, camera_lines=lines)
        for name in ("a.png", "b.png"):
            write_image(root / "images" / name, smooth_image(0))
        if expect_error:
            with pytest.raises(ValueError, match=r"SIMPLE_RADIAL .*`undistort: true`.*colmap image_undistorter"):
                read_dataset(root)
        else:
            assert read_dataset(root).views[0].camera.K[0, 0].item() == pytest.approx(f)


def test_colmap_model_without_points_is_refused(colmap_scene):
    root, _, _ = colmap_scene
    (root / "sparse" / "0" / "points3D.txt").write_text("# Number of points: 0, mean track length: 0\n")
    with pytest.raises(ValueError, match=r"has no 3D points"):
        read_dataset(root)


# -------------------------------------------------------------------------------------------------- undistortion


def plane_colours(normalized: np.ndarray) -> np.ndarray:
    """Colours [P, 3] of a smooth texture on the plane z = 1 seen along camera rays (x, y, 1), [P, 2] given."""
    x, y = normalized[:, 0], normalized[:, 1]
    return np.stack([0.5 + 0.4 * np.sin(9 * x + 0.3) * np.cos(7 * y), 0.5 + 0.4 * np.cos(8 * x - 5 * y),
                     0.5 + 0.4 * np.sin(6 * y + 1.0)], axis=1)


def render_plane(cam_from_img, width: int, height: int) -> torch.Tensor:
    """[height, width, 3] image of the textured plane through ``cam_from_img`` (pixel centres -> normalized)."""
    columns, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pixels = np.stack([columns.ravel(), rows.ravel()], axis=1)
    colours = plane_colours(np.asarray(cam_from_img(pixels))).reshape(height, width, 3)
    return torch.from_numpy(colours.astype(np.float32))


def pinhole_cam_from_img(K: torch.Tensor):
    K = K.numpy()
    return lambda pixels: (pixels - K[:2, 2]) / np.array([K[0, 0], K[1, 1]])


def assert_undistorted(view: SourceView, distorted: torch.Tensor) -> None:
    """The undistorted image matches the plane rendered through the view's pinhole camera; the distorted does not."""
    undistorted = view.undistort(distorted)
    expected = render_plane(pinhole_cam_from_img(view.camera.K), view.camera.width, view.camera.height)
    assert undistorted.shape == expected.shape
    inner = (slice(2, -2), slice(2, -2))  # bilinear interpolation at the border reads outside the image
    error = (undistorted - expected)[inner].abs().mean().item()
    resized = torch.nn.functional.interpolate(distorted.permute(2, 0, 1)[None], size=expected.shape[:2],
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert error < 0.02, error
    assert (resized - expected)[inner].abs().mean().item() > 4 * error


def test_colmap_undistort_on_load_matches_a_pinhole_rendering(tmp_path):
    root = tmp_path / "distorted"
    width, height = 160, 120
    camera = pycolmap.Camera(model="OPENCV", width=width, height=height,
                             params=[120.0, 118.0, 81.0, 59.0, -0.25, 0.06, 0.002, -0.001])
    identity = Camera(torch.eye(3, dtype=torch.float64) * 100, torch.eye(4, dtype=torch.float64), width, height)
    lines = [f"{i} OPENCV {width} {height} " + " ".join(repr(float(p)) for p in camera.params) for i in (1, 2)]
    write_colmap_text(root / "sparse" / "0", [identity, identity], ["plane_a.png", "plane_b.png"],
                      torch.tensor([[0.0, 0.0, 1.0]]), lines)
    distorted = render_plane(camera.cam_from_img, width, height)
    write_image(root / "images" / "plane_a.png", distorted)
    write_image(root / "images" / "plane_b.png", distorted)
    with pytest.raises(ValueError, match="undistort: true"):
        read_dataset(root)
    view = read_dataset(root, undistort=True).views[0]
    assert view.undistort is not None
    assert_undistorted(view, read_image(view.image))
    out = write_dataset_views(read_dataset(root, undistort=True), tmp_path / "views")
    assert (Views.read(out).width, Views.read(out).height) == (view.camera.width, view.camera.height)


# ---------------------------------------------------------------------------------------------------------- LLFF


def write_llff(root: Path, cameras: list[Camera], folders: dict[str, int]) -> None:
    """poses_bounds.npy for ``cameras`` (full resolution) and image folders {name: downscale factor}."""
    rows = []
    for camera in cameras:
        c2w = camera.camera_to_world[:3]
        llff = torch.stack([c2w[:, 1], c2w[:, 0], -c2w[:, 2], c2w[:, 3],
                            torch.tensor([camera.height, camera.width, camera.K[0, 0].item()], dtype=torch.float64)], 1)
        rows.append(torch.cat([llff.reshape(-1), torch.tensor([1.5, 9.0], dtype=torch.float64)]))
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "poses_bounds.npy", torch.stack(rows).numpy())
    for folder, factor in folders.items():
        for index, camera in enumerate(cameras):
            write_image(root / folder / f"{folder}_{index:02d}.png",
                        smooth_image(index, camera.width // factor, camera.height // factor))


def test_llff_poses_convert_to_opencv_and_names_match_across_folders(tmp_path):
    cameras = scene_cameras(9, width=64, height=48, focal=(50.0, 50.0))
    write_llff(tmp_path, cameras, {"images": 1, "images_4": 4})
    full, small = read_dataset(tmp_path), read_dataset(tmp_path, images="images_4")
    assert full.format == "llff" and full.points is None
    assert [v.name for v in full.views] == [v.name for v in small.views] == [f"{i:03d}" for i in range(9)]
    for camera, view, small_view in zip(cameras, full.views, small.views):
        torch.testing.assert_close(view.camera.world_to_camera, camera.world_to_camera, atol=1e-12, rtol=0)
        torch.testing.assert_close(view.camera.K, camera.K)
        torch.testing.assert_close(small_view.camera.K[:2], camera.K[:2] / 4)
    expected_splits = ["test"] + ["train"] * 7 + ["test"]
    assert [p.split for p in plan_views(full)] == [p.split for p in plan_views(small)] == expected_splits
    assert full.metadata["near"] == 1.5 and full.metadata["far"] == 9.0


def test_llff_bad_poses_file_and_image_count_are_refused(tmp_path):
    cameras = scene_cameras(4)
    write_llff(tmp_path, cameras, {"images": 1})
    (tmp_path / "images" / "images_03.png").unlink()
    with pytest.raises(ValueError, match=r"holds 4 poses but image folder .*images has 3 images"):
        read_dataset(tmp_path)
    write_image(tmp_path / "images" / "images_03.png", smooth_image(3))
    array = np.load(tmp_path / "poses_bounds.npy")
    array[2, 3] = np.inf
    np.save(tmp_path / "poses_bounds.npy", array)
    with pytest.raises(ValueError, match=r"poses_bounds.npy: rows \[2\] .* non-finite"):
        read_dataset(tmp_path)
    (tmp_path / "poses_bounds.npy").write_bytes((tmp_path / "poses_bounds.npy").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"poses_bounds.npy cannot be read .*truncated"):
        read_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------ Blender


def write_blender(root: Path, cameras: list[Camera], split: str, fov_x: float) -> None:
    frames = []
    for index, camera in enumerate(cameras):
        image = smooth_image(index, camera.width, camera.height, channels=4)
        image[..., 3] = 0.0
        image[: camera.height // 2, :, 3] = 1.0  # top half opaque, bottom half transparent
        write_image(root / split / f"r_{index}.png", image)
        frames.append({"file_path": f"./{split}/r_{index}",
                       "transform_matrix": (camera.camera_to_world @ OPENGL_TO_OPENCV).tolist()})
    (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": fov_x, "frames": frames}))


def test_blender_cameras_splits_and_background(tmp_path):
    fov_x = 0.8
    focal = 0.5 * 40 / math.tan(fov_x / 2)
    cameras = scene_cameras(6, width=40, height=40, focal=(focal, focal))
    write_blender(tmp_path, cameras[:4], "train", fov_x)
    write_blender(tmp_path, cameras[4:], "test", fov_x)
    assert detect_format(tmp_path) == "blender"
    train_only = read_dataset(tmp_path)
    assert [v.name for v in train_only.views] == ["train_r_0", "train_r_1", "train_r_2", "train_r_3"]
    both = read_dataset(tmp_path, split="dataset")
    assert [v.split for v in both.views] == ["train"] * 4 + ["test"] * 2
    for camera, view in zip(cameras, both.views):
        torch.testing.assert_close(view.camera.K, camera.K)
        torch.testing.assert_close(view.camera.world_to_camera, camera.world_to_camera, atol=1e-12, rtol=0)
    for background, value in (("white", 1.0), ("black", 0.0)):
        out = write_dataset_views(both, tmp_path / background, split="dataset", background=background)
        views = Views.read(out)
        assert [r.split for r in views.records] == ["train"] * 4 + ["test"] * 2
        assert views.metadata["background"] == [value] * 3
        image = views.load_image(views.records[0])
        source = read_image(tmp_path / "train" / "r_0.png")
        assert image.shape[-1] == 3
        torch.testing.assert_close(image[-1], torch.full((40, 3), value))  # transparent rows: the background
        torch.testing.assert_close(image[0], source[0, :, :3], atol=1 / 255, rtol=0)


def test_blender_missing_frame_image_and_bad_pose_are_refused(tmp_path):
    write_blender(tmp_path, scene_cameras(3, 40, 40), "train", 0.8)
    (tmp_path / "train" / "r_1.png").unlink()
    with pytest.raises(ValueError, match=r"transforms_train.json: 1 image\(s\) it lists are missing on disk: "
                                         r"./train/r_1"):
        read_dataset(tmp_path)
    write_image(tmp_path / "train" / "r_1.png", smooth_image(1, 40, 40))
    document = json.loads((tmp_path / "transforms_train.json").read_text())
    document["frames"][2]["transform_matrix"][0][3] = float("nan")
    (tmp_path / "transforms_train.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"frames\[2\] \(./train/r_2\): the pose has non-finite values"):
        read_dataset(tmp_path)
    (tmp_path / "transforms_train.json").write_text(json.dumps(document)[:-30])
    with pytest.raises(ValueError, match=r"transforms_train.json is not valid JSON"):
        read_dataset(tmp_path)


# -------------------------------------------------------------------------------------------------- instant-ngp


def test_instant_ngp_scene_round_trips(tmp_path):
    cameras = scene_cameras(5, focal=(41.0, 43.5), principal=(23.25, 17.5))
    root = tmp_path / "ngp"
    K = cameras[0].K
    frames = []
    for index, camera in enumerate(cameras):
        write_image(root / "frames" / f"cam{index % 2}" / f"f{index}.png", smooth_image(index))
        frames.append({"file_path": f"frames/cam{index % 2}/f{index}.png",
                       "transform_matrix": (camera.camera_to_world @ OPENGL_TO_OPENCV).tolist()})
    frames[3]["fl_x"] = 45.0  # a per-frame intrinsic overrides the file's
    document = {"fl_x": K[0, 0].item(), "fl_y": K[1, 1].item(), "cx": K[0, 2].item(), "cy": K[1, 2].item(),
                "w": WIDTH, "h": HEIGHT, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "aabb_scale": 4,
                "frames": frames}
    (root / "transforms.json").write_text(json.dumps(document, indent=1))
    dataset = read_dataset(root)
    assert dataset.format == "instant_ngp" and dataset.metadata["aabb_scale"] == 4
    assert [v.name for v in dataset.views] == [f"frames_cam{i % 2}_f{i}" for i in range(5)]
    for index, (camera, view) in enumerate(zip(cameras, dataset.views)):
        torch.testing.assert_close(view.camera.world_to_camera, camera.world_to_camera, atol=1e-12, rtol=0)
        expected_K = camera.K.clone()
        if index == 3:
            expected_K[0, 0] = 45.0
        torch.testing.assert_close(view.camera.K, expected_K)
    out = write_dataset_views(dataset, tmp_path / "views", llffhold=2)
    views = Views.read(out)
    assert [r.split for r in views.records] == ["test", "train", "test", "train", "test"]
    for record, view in zip(views.records, dataset.views):
        assert record.name == view.name
        torch.testing.assert_close(record.camera.K, view.camera.K)
        torch.testing.assert_close(views.load_image(record), read_image(view.image))  # PNG in, PNG out: lossless

    document["w"], document["h"] = WIDTH * 2, HEIGHT * 2  # intrinsics stated for images twice the files' size
    document["fl_x"], document["cx"] = 2 * document["fl_x"], 2 * document["cx"]
    document["fl_y"], document["cy"] = 2 * document["fl_y"], 2 * document["cy"]
    del frames[3]["fl_x"]
    (root / "transforms.json").write_text(json.dumps(document))
    torch.testing.assert_close(read_dataset(root).views[0].camera.K, K)


def test_instant_ngp_distortion_refused_or_undistorted(tmp_path):
    width, height = 160, 120
    params = {"fl_x": 120.0, "fl_y": 118.0, "cx": 81.0, "cy": 59.0, "k1": -0.25, "k2": 0.06, "p1": 0.002, "p2": -0.001}
    camera = pycolmap.Camera(model="OPENCV", width=width, height=height, params=list(params.values()))
    write_image(tmp_path / "images" / "plane.png", render_plane(camera.cam_from_img, width, height))
    (tmp_path / "transforms.json").write_text(json.dumps({
        **params, "w": width, "h": height,
        "frames": [{"file_path": "images/plane.png", "transform_matrix": torch.eye(4).tolist()}]}))
    with pytest.raises(ValueError, match=r"frames\[0\] \(images/plane.png\): the images are distorted "
                                         r"\(OPENCV.*undistort: true"):
        read_dataset(tmp_path)
    view = read_dataset(tmp_path, undistort=True).views[0]
    assert_undistorted(view, read_image(view.image))


def test_instant_ngp_missing_frame_image_is_named(tmp_path):
    (tmp_path / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.9, "frames": [
        {"file_path": "./images/missing.jpg", "transform_matrix": torch.eye(4).tolist()}]}))
    with pytest.raises(ValueError, match=r"transforms.json: 1 image\(s\) it lists are missing on disk: "
                                         r"./images/missing.jpg"):
        read_dataset(tmp_path)


# ---------------------------------------------------------------------------------------- detection and assembly


def test_detect_format_and_layout_checks(colmap_scene, tmp_path):
    root, _, _ = colmap_scene
    assert detect_format(root) == "colmap"
    assert check_layout(root, "auto", "images") == "colmap"
    with pytest.raises(ValueError, match=r"`images`: image folder .*images_8 does not exist; "
                                         r".* image folders \['images'\]"):
        check_layout(root, "colmap", "images_8")
    with pytest.raises(ValueError, match=r"`split: dataset` needs the dataset's own train/test files"):
        check_layout(root, "auto", None, "dataset")
    with pytest.raises(ValueError, match=r"format blender: .*transforms_train.json does not exist"):
        check_layout(root, "blender")
    with pytest.raises(ValueError, match=r"dataset folder .*nowhere does not exist"):
        check_layout(tmp_path / "nowhere")


def fake_dataset(sizes: list[tuple[int, int]], tmp_path: Path) -> Dataset:
    views = []
    for index, (width, height) in enumerate(sizes):
        camera = scene_cameras(1, width, height)[0]
        path = tmp_path / f"v{index}.png"
        write_image(path, smooth_image(index, width, height))
        views.append(SourceView(f"v{index}", path, camera))
    return Dataset("colmap", tmp_path, tuple(views), None, (), {})


def test_views_of_slightly_different_sizes_are_centre_cropped_with_cameras_shifted(tmp_path):
    dataset = fake_dataset([(96, 72), (96, 74), (95, 73)], tmp_path)
    plan = plan_views(dataset)
    assert [p.crop for p in plan] == [(0, 0, 95, 72), (0, 1, 95, 72), (0, 0, 95, 72)]
    points = scene_points()
    for view in plan:
        left, top, _, _ = view.crop
        uv_source, _ = view.source.camera.project(points)
        uv_cropped, _ = view.camera.project(points)
        torch.testing.assert_close(uv_cropped, uv_source - torch.tensor([left, top], dtype=torch.float64))
    views = Views.read(write_dataset_views(dataset, tmp_path / "out"))
    torch.testing.assert_close(views.load_image(views.records[1]), read_image(tmp_path / "v1.png")[1:73, :95])
    too_far = fake_dataset([(96, 72), (96, 72 + math.ceil(72 * MAX_CROP_FRACTION * 1.5))], tmp_path / "far")
    with pytest.raises(ValueError, match=r"view 'v1' .* is 96x\d+ but another view is only 96x72"):
        plan_views(too_far)


def test_resolution_cap_scales_cameras_exactly_and_split_policies(tmp_path):
    dataset = fake_dataset([(48, 36)] * 3, tmp_path)
    plan = plan_views(dataset, llffhold=2, max_side=24)
    assert [p.split for p in plan] == ["test", "train", "test"]
    assert (plan[0].camera.width, plan[0].camera.height) == (24, 18)
    torch.testing.assert_close(plan[0].camera.K[:2], dataset.views[0].camera.K[:2] / 2)
    assert plan_views(dataset, max_side=100)[0].camera is dataset.views[0].camera
    with pytest.raises(ValueError, match=r"`split: dataset`: .* has no own split"):
        plan_views(dataset, split="dataset")
    with pytest.raises(ValueError, match=r"no view is left for training"):
        plan_views(Dataset("colmap", tmp_path, dataset.views[:1], None, (), {}))
    written = Views.read(write_dataset_views(dataset, tmp_path / "capped", max_side=24))
    source = read_image(tmp_path / "v0.png").permute(2, 0, 1)[None]
    expected = torch.nn.functional.avg_pool2d(source, 2)[0].permute(1, 2, 0)
    assert (written.load_image(written.records[0]) - expected).abs().mean() < 0.01  # smooth image: filters agree


def test_digest_covers_exactly_the_files_used(colmap_scene):
    root, _, _ = colmap_scene
    before = dataset_digest(read_dataset(root))
    (root / "unrelated.txt").write_text("not part of the dataset")
    write_image(root / "images_2" / "view_0.png", smooth_image(0, 24, 18))
    assert dataset_digest(read_dataset(root)) == before
    write_image(root / "images" / "view_3.png", smooth_image(99))
    assert dataset_digest(read_dataset(root)) != before
    shutil.copy(root / "sparse" / "0" / "points3D.txt", root / "points.bak")
    (root / "sparse" / "0" / "points3D.txt").write_text(
        (root / "points.bak").read_text().replace(" 0.5 ", " 0.25 ", 1))
    assert dataset_digest(read_dataset(root)) != before


def test_gsr_validate_reports_dataset_params_that_cannot_work(colmap_scene, tmp_path):
    from flows.spec import SpecError, validate

    root, _, _ = colmap_scene
    spec = {"name": "datasets", "nodes": {
        "fine": {"task": "load_dataset", "params": {"path": str(root), "max_side": 32}},
        "gone": {"task": "load_dataset", "params": {"path": str(tmp_path / "gone")}},
        "split": {"task": "load_dataset", "params": {"path": str(root), "split": "dataset"}},
        "folder": {"task": "load_dataset", "params": {"path": str(root), "images": "images_4"}},
    }}
    with pytest.raises(SpecError) as error:
        validate(spec)
    message = str(error.value)
    assert "node 'fine'" not in message
    assert f"node 'gone' (load_dataset): params.path: Value error, dataset folder {tmp_path / 'gone'} does not" in message
    assert "node 'split' (load_dataset): params: Value error, `split: dataset` needs" in message
    assert "node 'folder' (load_dataset): params: Value error, `images`: image folder" in message
