"""The views folder: gsr's own on-disk format for posed images, written by every views-producing node.

Layout::

    <folder>/
        cameras.json        {"format": "gsr-views", "version": 1, "views": [...], "points": ..., "metadata": {...}}
        images/<name>.png   8-bit RGB (or RGBA) images, all of one size
        points.ply          optional coloured point cloud (x y z red green blue) for initialising Gaussians

Each entry of ``views`` is ``{"name", "split": "train"|"test", "image": <path relative to the folder>,
"camera": {"width", "height", "K", "world_to_camera"}}`` with the camera conventions of ``gsr_core.cameras``.
``metadata`` is free-form JSON about the scene (its name, background colour, bounds, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from gsr_core.cameras import Camera
from gsr_core.data.points import PointCloud
from gsr_core.images import image_size, read_image, write_image

FORMAT = "gsr-views"
FORMAT_VERSION = 1
CAMERAS_FILE = "cameras.json"
POINTS_FILE = "points.ply"
SPLITS = ("train", "test")
Split = Literal["train", "test"]


@dataclass(frozen=True)
class ViewRecord:
    """One posed image of a views folder: its name, split, camera and image path relative to the folder."""

    name: str
    split: Split
    camera: Camera
    image: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "image": self.image, "camera": self.camera.to_dict()}


class Views:
    """A views folder opened for reading. Images are read on demand, so large scenes stay on disk.

    Attributes:
        root: the folder.
        records: one ``ViewRecord`` per view, in file order.
        metadata: the free-form ``metadata`` dict of ``cameras.json``.
    """

    def __init__(self, root: Path, records: list[ViewRecord], points_file: str | None, metadata: dict[str, Any]):
        self.root = Path(root)
        self.records = records
        self.metadata = metadata
        self._points_file = points_file

    @classmethod
    def read(cls, root: str | Path) -> "Views":
        """Open a views folder, checking ``cameras.json`` and that every listed image exists.

        Raises:
            ValueError naming the file (and view) that is missing, malformed or inconsistent.
        """
        root = Path(root)
        path = root / CAMERAS_FILE
        if not path.is_file():
            raise ValueError(f"{path} does not exist: {root} is not a gsr views folder (images + {CAMERAS_FILE})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: expected \"format\": \"{FORMAT}\", got {data.get('format') if isinstance(data, dict) else data!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: views format version {data.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        entries = data.get("views")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: \"views\" must be a non-empty list")
        records, seen = [], set()
        for index, entry in enumerate(entries):
            where = f"{path}: views[{index}]"
            if not isinstance(entry, dict) or {"name", "split", "image", "camera"} - set(entry):
                raise ValueError(f"{where} must have keys name, split, image, camera; got {entry!r:.200}")
            if entry["split"] not in SPLITS:
                raise ValueError(f"{where} ({entry['name']!r}): split must be one of {SPLITS}, got {entry['split']!r}")
            if entry["name"] in seen:
                raise ValueError(f"{where}: duplicate view name {entry['name']!r}")
            seen.add(entry["name"])
            try:
                camera = Camera.from_dict(entry["camera"])
            except ValueError as error:
                raise ValueError(f"{where} ({entry['name']!r}): bad camera: {error}") from error
            if not (root / entry["image"]).is_file():
                raise ValueError(f"{where} ({entry['name']!r}): image file {root / entry['image']} does not exist")
            records.append(ViewRecord(entry["name"], entry["split"], camera, entry["image"]))
        sizes = {(r.camera.width, r.camera.height) for r in records}
        if len(sizes) > 1:
            first = records[0]
            odd = next(r for r in records if (r.camera.width, r.camera.height) != (first.camera.width, first.camera.height))
            raise ValueError(
                f"{path}: views have different sizes: {first.image} is {first.camera.width}x{first.camera.height} "
                f"but {odd.image} is {odd.camera.width}x{odd.camera.height}; a views folder holds images of one size"
            )
        points_file = data.get("points")
        if points_file is not None and not (root / points_file).is_file():
            raise ValueError(f"{path}: points file {root / points_file} does not exist")
        return cls(root, records, points_file, data.get("metadata") or {})

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ViewRecord]:
        return iter(self.records)

    @property
    def width(self) -> int:
        return self.records[0].camera.width

    @property
    def height(self) -> int:
        return self.records[0].camera.height

    def split(self, split: Split | None) -> list[ViewRecord]:
        """The records of one split (all records for ``None``)."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS} or None, got {split!r}")
        return [record for record in self.records if split is None or record.split == split]

    def record(self, name: str) -> ViewRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise ValueError(f"views folder {self.root} has no view named {name!r}")

    def image_path(self, record: ViewRecord) -> Path:
        return self.root / record.image

    def check_image_sizes(self) -> None:
        """Check every image file's header against its camera, without decoding pixels.

        Raises:
            ValueError naming the first image whose size differs from its camera.
        """
        for record in self.records:
            width, height = image_size(self.image_path(record))
            if (width, height) != (record.camera.width, record.camera.height):
                raise ValueError(
                    f"image {self.image_path(record)} is {width}x{height} but its camera in {self.root / CAMERAS_FILE} "
                    f"says {record.camera.width}x{record.camera.height}"
                )

    def load_image(self, record: ViewRecord) -> torch.Tensor:
        """[H, W, 3] or [H, W, 4] float32 in [0, 1], checked against the camera's size."""
        image = read_image(self.image_path(record))
        height, width = image.shape[:2]
        if (width, height) != (record.camera.width, record.camera.height):
            raise ValueError(
                f"image {self.image_path(record)} is {width}x{height} but its camera in {self.root / CAMERAS_FILE} "
                f"says {record.camera.width}x{record.camera.height}"
            )
        return image

    def load_rgb(self, records: list[ViewRecord]) -> torch.Tensor:
        """[C, H, W, 3] float32 colours of ``records`` (alpha, if any, is dropped: see ``load_image``)."""
        return torch.stack([self.load_image(record)[..., :3] for record in records])

    @property
    def has_points(self) -> bool:
        return self._points_file is not None

    def points(self) -> PointCloud | None:
        """The folder's point cloud, or None when it has none."""
        return PointCloud.read(self.root / self._points_file) if self._points_file else None


class ViewsWriter:
    """Writes a views folder one image at a time; ``cameras.json`` is written by ``close``, last.

    Example::

        writer = ViewsWriter(folder, metadata={"scene": "tiles"})
        for ...:
            writer.add(name, split, camera, image)   # image [H, W, 3|4] float in [0, 1]
        writer.close(points)                         # points: PointCloud or None
    """

    def __init__(self, root: str | Path, metadata: dict[str, Any] | None = None):
        self.root = Path(root)
        self.metadata = dict(metadata or {})
        self.records: list[ViewRecord] = []
        (self.root / "images").mkdir(parents=True, exist_ok=True)

    def add(self, name: str, split: Split, camera: Camera, image: torch.Tensor) -> ViewRecord:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        if image.shape[:2] != (camera.height, camera.width):
            raise ValueError(
                f"view {name!r}: image is {image.shape[1]}x{image.shape[0]} but its camera is {camera.width}x{camera.height}"
            )
        if any(record.name == name for record in self.records):
            raise ValueError(f"duplicate view name {name!r}")
        record = ViewRecord(name, split, camera, f"images/{name}.png")
        write_image(self.root / record.image, image)
        self.records.append(record)
        return record

    def close(self, points: PointCloud | None = None) -> Path:
        """Write the point cloud (if any) and ``cameras.json``; returns the folder."""
        if not self.records:
            raise ValueError(f"views folder {self.root} would be empty: add at least one view before close()")
        if points is not None:
            points.write(self.root / POINTS_FILE)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "views": [record.to_dict() for record in self.records],
            "points": POINTS_FILE if points is not None else None,
            "metadata": self.metadata,
        }
        (self.root / CAMERAS_FILE).write_text(json.dumps(document, indent=1))
        return self.root
