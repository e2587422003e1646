"""The views folder format: round trip, and bad input named by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gsr_core.data.views import Views, ViewsWriter
from gsr_core.images import write_image
from tests.conftest import orbit_camera, write_views


def test_round_trip_keeps_cameras_images_splits_points(tmp_path: Path):
    folder = write_views(tmp_path / "v", count=5, size=16, test_every=2)
    views = Views.read(folder)
    assert [r.name for r in views] == [f"v{i:03d}" for i in range(5)]
    assert [r.name for r in views.split("test")] == ["v000", "v002", "v004"]
    assert torch.equal(views.records[1].camera.K, orbit_camera(1, 5, 16).K)
    assert views.load_rgb(views.split("train")).shape == (2, 16, 16, 3)
    assert len(views.points()) == 50 and views.metadata == {"scene": "test"}


def test_missing_folder_and_bad_json_name_the_file(tmp_path: Path):
    with pytest.raises(ValueError, match="cameras.json does not exist"):
        Views.read(tmp_path)
    (tmp_path / "cameras.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cameras.json is not valid JSON"):
        Views.read(tmp_path)


def test_missing_image_is_named(tmp_path: Path):
    folder = write_views(tmp_path / "v", count=3, size=16)
    (folder / "images" / "v001.png").unlink()
    with pytest.raises(ValueError, match=r"views\[1\] \('v001'\): image file .*v001.png does not exist"):
        Views.read(folder)


def test_corrupt_image_is_named(tmp_path: Path):
    folder = write_views(tmp_path / "v", count=3, size=16)
    (folder / "images" / "v002.png").write_bytes(b"\x89PNG garbage")
    views = Views.read(folder)
    with pytest.raises(ValueError, match=r"v002.png is not a readable image"):
        views.load_image(views.record("v002"))


def test_image_of_another_size_than_its_camera_is_named(tmp_path: Path):
    folder = write_views(tmp_path / "v", count=3, size=16)
    write_image(folder / "images" / "v001.png", torch.zeros(16, 15, 3))
    views = Views.read(folder)
    with pytest.raises(ValueError, match=r"v001.png is 15x16 but its camera .* says 16x16"):
        views.check_image_sizes()


def test_cameras_of_different_sizes_are_refused(tmp_path: Path):
    folder = write_views(tmp_path / "v", count=3, size=16)
    document = json.loads((folder / "cameras.json").read_text())
    document["views"][2]["camera"]["width"] = 32
    (folder / "cameras.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"views have different sizes: images/v000.png is 16x16 but images/v002.png is 32x16"):
        Views.read(folder)


def test_writer_refuses_mismatched_image_and_duplicate_names(tmp_path: Path):
    writer = ViewsWriter(tmp_path)
    with pytest.raises(ValueError, match="image is 8x8 but its camera is 16x16"):
        writer.add("a", "train", orbit_camera(0, 4, 16), torch.zeros(8, 8, 3))
    writer.add("a", "train", orbit_camera(0, 4, 16), torch.zeros(16, 16, 3))
    with pytest.raises(ValueError, match="duplicate view name 'a'"):
        writer.add("a", "test", orbit_camera(1, 4, 16), torch.zeros(16, 16, 3))
