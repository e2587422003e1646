"""Procedural synthetic scenes, ray-traced analytically in PyTorch: the exact ground truth of the embedded demo.

A scene is a few textured primitives — a ground quad, oriented boxes (cubes, pillars, thin panels), spheres —
with procedural textures (``gsr_core.data.textures``) in their surface coordinates. Rays are intersected in
closed form (vectorised over rays), so images at any resolution come from the geometry itself and never from
the Gaussian renderer under test. Shading is view-independent, so a 3DGS can fit it exactly: Lambertian under
one directional light plus ambient, with hard shadows (one shadow ray per hit, no texture lookups). Rays that
hit nothing get the constant background colour. Pixels average ``supersample`` x ``supersample`` samples
(one at the centre of each sub-pixel), which anti-aliases edges and textures.

World frame: z up, metres; the ground is the plane z = 0. Cameras follow ``gsr_core.cameras`` (OpenCV axes,
pixel corners on integers). Everything random — layout jitter, textures, light, camera jitter, the point cloud's
pixels — comes from CPU ``torch.Generator`` streams seeded by ``seed``: the same seed gives bit-identical
images (on one device).

Entry points: ``build_scene``, ``orbit_cameras``, ``render``, ``render_depth``, ``intersect``,
``sample_surface_points`` and ``write_synthetic_scene`` (a whole views folder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Union

import torch

from gsr_core.arguments import check_int, resolve_device
from gsr_core.cameras import Camera, intrinsics_from_fov, look_at
from gsr_core.data.points import PointCloud
from gsr_core.data.textures import Texture, make_texture
from gsr_core.data.views import ViewsWriter

SCENE_NAMES = ("tiles", "glyphs", "stripes")

_MIN_DISTANCE = 1e-4  # rays ignore hits closer than this (metres): no self-intersection at the ray origin
_SHADOW_OFFSET = 1e-3  # shadow rays start this far off the surface, along the normal
_CHUNK_RAYS = 1 << 18  # rays traced at once by render (bounded memory at any resolution)
_UP = (0.0, 0.0, 1.0)


def _vector(value, size: int, name: str) -> torch.Tensor:
    vector = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if vector.shape != (size,) or not torch.isfinite(vector).all():
        raise ValueError(f"`{name}` must be {size} finite numbers, got {value!r}")
    return vector


@dataclass(frozen=True)
class Material:
    """A texture and its scale: texture units per metre of surface coordinate."""

    texture: Texture
    scale: float

    def __post_init__(self) -> None:
        if not isinstance(self.texture, Texture):
            raise TypeError(f"`texture` must be a Texture, got {type(self.texture).__name__}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"`scale` must be a positive number of texture units per metre, got {self.scale!r}")

    def to(self, device: str | torch.device) -> "Material":
        return Material(self.texture.to(device), self.scale)


@dataclass(frozen=True)
class Quad:
    """A two-sided rectangle: ``center`` [3], orthonormal in-plane axes ``u_axis``, ``v_axis`` [3],
    ``half_size`` [2] along them. Surface coordinates (metres): the offsets along ``u_axis`` and ``v_axis``."""

    center: torch.Tensor
    u_axis: torch.Tensor
    v_axis: torch.Tensor
    half_size: torch.Tensor
    material: Material

    def __post_init__(self) -> None:
        for name, size in (("center", 3), ("u_axis", 3), ("v_axis", 3), ("half_size", 2)):
            object.__setattr__(self, name, _vector(getattr(self, name), size, name))
        axes = torch.stack([self.u_axis, self.v_axis])
        if not torch.allclose(axes @ axes.T, torch.eye(2), atol=1e-5):
            raise ValueError(f"`u_axis` {self.u_axis.tolist()} and `v_axis` {self.v_axis.tolist()} must be orthonormal")

    def corners(self) -> torch.Tensor:
        """[4, 3] world corners."""
        signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
        offsets = signs * self.half_size
        return self.center + offsets[:, :1] * self.u_axis + offsets[:, 1:] * self.v_axis


@dataclass(frozen=True)
class Box:
    """An oriented box: ``center`` [3], ``rotation`` [3, 3] whose columns are its axes in world coordinates,
    ``half_size`` [3] along them. Surface coordinates on a face: the offsets along the face's two other axes."""

    center: torch.Tensor
    rotation: torch.Tensor
    half_size: torch.Tensor
    material: Material

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _vector(self.center, 3, "center"))
        object.__setattr__(self, "half_size", _vector(self.half_size, 3, "half_size"))
        object.__setattr__(self, "rotation", _vector(self.rotation, 9, "rotation").reshape(3, 3))
        if not torch.allclose(self.rotation.T @ self.rotation, torch.eye(3), atol=1e-5):
            raise ValueError(f"`rotation` must be orthonormal, got {self.rotation.tolist()}")
        if (self.half_size <= 0).any():
            raise ValueError(f"`half_size` must be positive, got {self.half_size.tolist()}")

    def corners(self) -> torch.Tensor:
        """[8, 3] world corners."""
        signs = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
        return self.center + (signs * self.half_size) @ self.rotation.T


@dataclass(frozen=True)
class Sphere:
    """A sphere: ``center`` [3], ``radius``; ``rotation`` [3, 3] orients its texture. Surface coordinates
    (metres): longitude x radius and latitude x radius in the rotated frame (poles on its third axis)."""

    center: torch.Tensor
    radius: float
    material: Material
    rotation: torch.Tensor = field(default_factory=lambda: torch.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _vector(self.center, 3, "center"))
        object.__setattr__(self, "rotation", _vector(self.rotation, 9, "rotation").reshape(3, 3))
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"`radius` must be positive, got {self.radius!r}")


Primitive = Union[Quad, Box, Sphere]


@dataclass(frozen=True)
class Scene:
    """A synthetic scene.

    Attributes:
        name: its name (one of ``SCENE_NAMES`` for built-in scenes).
        primitives: the surfaces; ``Hits.primitive`` indexes this tuple.
        light_direction: [3] unit vector from surfaces towards the directional light.
        ambient: light reaching every surface, in [0, 1]; a surface facing the light gets 1.
        background: (r, g, b) colour of rays that hit nothing.
        center: [3] the point cameras look at.
        orbit_distance: default distance of orbit cameras from ``center``.
        shadows: whether surfaces facing the light can be shadowed by others.
    """

    name: str
    primitives: tuple[Primitive, ...]
    light_direction: torch.Tensor
    ambient: float
    background: tuple[float, float, float]
    center: torch.Tensor
    orbit_distance: float
    shadows: bool = True

    def __post_init__(self) -> None:
        if not self.primitives:
            raise ValueError("`primitives` must hold at least one Quad, Box or Sphere")
        for index, primitive in enumerate(self.primitives):
            if not isinstance(primitive, (Quad, Box, Sphere)):
                raise TypeError(f"`primitives[{index}]` must be a Quad, Box or Sphere, got {type(primitive).__name__}")
        light = _vector(self.light_direction, 3, "light_direction")
        if light.norm() == 0:
            raise ValueError("`light_direction` must be non-zero")
        object.__setattr__(self, "light_direction", light / light.norm())
        object.__setattr__(self, "center", _vector(self.center, 3, "center"))
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"`ambient` must be in [0, 1], got {self.ambient}")
        if len(self.background) != 3 or not all(0.0 <= c <= 1.0 for c in self.background):
            raise ValueError(f"`background` must be 3 values in [0, 1], got {self.background!r}")

    @property
    def radius(self) -> float:
        """Radius of the smallest sphere centred on ``center`` that holds every primitive."""
        reach = []
        for primitive in self.primitives:
            if isinstance(primitive, Sphere):
                reach.append(float((primitive.center - self.center).norm()) + primitive.radius)
            else:
                reach.append(float((primitive.corners() - self.center).norm(dim=1).max()))
        return max(reach)

    def to(self, device: str | torch.device) -> "Scene":
        """The same scene with every texture on ``device`` (geometry is packed per call, see ``intersect``)."""
        return replace(self, primitives=tuple(replace(p, material=p.material.to(device)) for p in self.primitives))


# ----------------------------------------------------------------------------------------------------------
# Intersection. Inside this module rays are stored as columns — origins and directions [3, R] — and each
# primitive type is packed into tensors, so distances for all primitives x all rays come out as [M, R] from
# [M, 3] @ [3, R] products (much faster on CPU than [R, 3] @ [3, M]).
# ----------------------------------------------------------------------------------------------------------


def _nearest_positive(near: torch.Tensor, far: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """Ray parameter of the first intersection in front of the origin (inf when none)."""
    distance = torch.where(near > _MIN_DISTANCE, near, far)
    return torch.where(hit & (distance > _MIN_DISTANCE), distance, torch.full_like(distance, math.inf))


def _avoid_zero(values: torch.Tensor) -> torch.Tensor:
    """``values`` with exact (or denormal) zeros replaced by 1e-12, so that dividing by them stays finite."""
    return torch.where(values.abs() < 1e-12, torch.full_like(values, 1e-12), values)


class _Quads:
    def __init__(self, quads: list[Quad], device: torch.device):
        self.center = torch.stack([q.center for q in quads]).to(device)
        self.u_axis = torch.stack([q.u_axis for q in quads]).to(device)
        self.v_axis = torch.stack([q.v_axis for q in quads]).to(device)
        self.half_size = torch.stack([q.half_size for q in quads]).to(device)
        self.normal = torch.linalg.cross(self.u_axis, self.v_axis)

    def distances(self, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Rays [3, R] -> [Q, R] ray parameters of the hits (inf for misses)."""
        facing = _avoid_zero(self.normal @ directions)
        distance = ((self.center * self.normal).sum(-1, keepdim=True) - self.normal @ origins) / facing
        inside = torch.ones_like(distance, dtype=torch.bool)
        for axis, half in ((self.u_axis, self.half_size[:, :1]), (self.v_axis, self.half_size[:, 1:])):
            offset = axis @ origins + distance * (axis @ directions) - (self.center * axis).sum(-1, keepdim=True)
            inside &= offset.abs() <= half
        return _nearest_positive(distance, distance, inside)

    def surface(self, points: torch.Tensor, directions: torch.Tensor, index: torch.Tensor):
        """Hit points and ray directions [r, 3] on quads ``index`` [r] -> normals [r, 3] (turned towards the
        ray: quads are two-sided) and surface coordinates [r, 2]."""
        normal = self.normal[index]
        normal = torch.where(((normal * directions).sum(-1) > 0)[:, None], -normal, normal)
        offset = points - self.center[index]
        uv = torch.stack([(offset * self.u_axis[index]).sum(-1), (offset * self.v_axis[index]).sum(-1)], dim=1)
        return normal, uv


def _sphere_roots(origins: torch.Tensor, directions: torch.Tensor, center: torch.Tensor, radius: torch.Tensor):
    """Ray-sphere intersection of rays [3, R] (unit directions) with [S] spheres of centres [S, 3].

    Returns: ``half_b`` [S, R] (minus the ray parameter of the point closest to the centre) and
    ``discriminant`` [S, R] (>= 0 where the ray's line meets the sphere; roots at -half_b +- its square root).
    The discriminant is r^2 minus the squared distance from the centre to the line, computed from the
    perpendicular offset itself: the textbook |o - c|^2 - b^2 cancels catastrophically in float32 for
    cameras a few metres away and rays near tangency.
    """
    offset = [origins[k] - center[:, k : k + 1] for k in range(3)]  # 3 x [S, R]: o - c
    half_b = offset[0] * directions[0] + offset[1] * directions[1] + offset[2] * directions[2]
    perpendicular = [offset[k] - half_b * directions[k] for k in range(3)]
    squared = perpendicular[0] ** 2 + perpendicular[1] ** 2 + perpendicular[2] ** 2
    return half_b, radius[:, None] ** 2 - squared


class _Boxes:
    _OTHER_AXES = torch.tensor([[1, 2], [0, 2], [0, 1]])

    def __init__(self, boxes: list[Box], device: torch.device):
        self.center = torch.stack([b.center for b in boxes]).to(device)
        self.rotation = torch.stack([b.rotation for b in boxes]).to(device)
        self.half_size = torch.stack([b.half_size for b in boxes]).to(device)
        self.bounding_radius = self.half_size.norm(dim=-1) * (1.0 + 1e-4)  # a margin for float rounding

    def distances(self, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Rays [3, R] -> [B, R] ray parameters of the hits (inf for misses).

        Only the box-ray pairs whose ray meets the box's bounding sphere in front go through the slab test.
        """
        half_b, discriminant = _sphere_roots(origins, directions, self.center, self.bounding_radius)
        candidates = (discriminant >= 0) & (discriminant.clamp(min=0.0).sqrt() > half_b)
        box, ray = candidates.nonzero(as_tuple=True)
        rotation = self.rotation[box]  # [K, 3, 3]
        local_origin = torch.einsum("kj,kjl->kl", origins[:, ray].T - self.center[box], rotation)
        inverse = 1.0 / _avoid_zero(torch.einsum("kj,kjl->kl", directions[:, ray].T, rotation))
        middle = -local_origin * inverse
        half_width = (self.half_size[box] * inverse).abs()
        near = (middle - half_width).amax(dim=-1)
        far = (middle + half_width).amin(dim=-1)
        distances = torch.full(candidates.shape, math.inf, dtype=origins.dtype, device=origins.device)
        distances[box, ray] = _nearest_positive(near, far, near <= far)
        return distances

    def surface(self, points: torch.Tensor, directions: torch.Tensor, index: torch.Tensor):
        """Hit points [r, 3] on boxes ``index`` [r] -> outward normals [r, 3] of the faces hit and surface
        coordinates [r, 2] on them."""
        rotation = self.rotation[index]
        local = torch.einsum("rj,rjk->rk", points - self.center[index], rotation)
        axis = (local.abs() / self.half_size[index]).argmax(dim=-1)
        sign = torch.sign(local.gather(1, axis[:, None]))
        normal = rotation.gather(2, axis[:, None, None].expand(-1, 3, 1))[..., 0] * sign
        uv = local.gather(1, self._OTHER_AXES.to(points.device)[axis])
        return normal, uv


class _Spheres:
    def __init__(self, spheres: list[Sphere], device: torch.device):
        self.center = torch.stack([s.center for s in spheres]).to(device)
        self.radius = torch.tensor([s.radius for s in spheres], dtype=torch.float32, device=device)
        self.rotation = torch.stack([s.rotation for s in spheres]).to(device)

    def distances(self, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Rays [3, R] (unit directions) -> [S, R] ray parameters of the hits (inf for misses)."""
        half_b, discriminant = _sphere_roots(origins, directions, self.center, self.radius)
        root = discriminant.clamp(min=0.0).sqrt()
        return _nearest_positive(-half_b - root, -half_b + root, discriminant >= 0)

    def surface(self, points: torch.Tensor, directions: torch.Tensor, index: torch.Tensor):
        """Hit points [r, 3] on spheres ``index`` [r] -> outward normals [r, 3] and surface coordinates [r, 2]
        (longitude and latitude in the sphere's texture frame, times its radius)."""
        normal = points - self.center[index]
        normal = normal / normal.norm(dim=-1, keepdim=True)
        local = torch.einsum("rj,rjk->rk", normal, self.rotation[index])
        radius = self.radius[index]
        longitude = torch.atan2(local[:, 1], local[:, 0])
        latitude = torch.asin(local[:, 2].clamp(-1.0, 1.0))
        return normal, torch.stack([longitude * radius, latitude * radius], dim=1)


class _Packed:
    """A scene's geometry as tensors on one device: one batch per primitive type, and ``order`` [M] mapping
    packed indices (quads, then boxes, then spheres) to indices of ``scene.primitives``."""

    def __init__(self, scene: Scene, device: torch.device):
        self.batches, order = [], []
        for kind, batch_type in ((Quad, _Quads), (Box, _Boxes), (Sphere, _Spheres)):
            members = [i for i, p in enumerate(scene.primitives) if isinstance(p, kind)]
            if members:
                self.batches.append((batch_type([scene.primitives[i] for i in members], device), len(members)))
                order.extend(members)
        self.order = torch.tensor(order, dtype=torch.long, device=device)

    def distances(self, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Rays [3, R] -> [M, R] ray parameters against every primitive (inf for misses)."""
        return torch.cat([batch.distances(origins, directions) for batch, _ in self.batches])


@dataclass(frozen=True)
class Hits:
    """The first surface along each of R rays.

    Attributes:
        distance: [R] ray parameter (metres along the unit direction); inf where the ray hits nothing.
        primitive: [R] int64 index into ``scene.primitives``; -1 where the ray hits nothing.
        points: [R, 3] world hit points (the ray origin where missed).
        normal: [R, 3] unit surface normals facing the ray's side (zeros where missed).
        uv: [R, 2] surface coordinates in metres (zeros where missed).
    """

    distance: torch.Tensor
    primitive: torch.Tensor
    points: torch.Tensor
    normal: torch.Tensor
    uv: torch.Tensor

    @property
    def hit(self) -> torch.Tensor:
        """[R] bool."""
        return self.primitive >= 0


def _intersect(packed: _Packed, origins: torch.Tensor, directions: torch.Tensor) -> Hits:
    """Rays [3, R] -> their first hits."""
    distance, packed_index = packed.distances(origins, directions).min(dim=0)
    hit = torch.isfinite(distance)
    points = (origins + torch.where(hit, distance, torch.zeros_like(distance)) * directions).T
    directions = directions.T
    normal = torch.zeros_like(points)
    uv = torch.zeros(points.shape[0], 2, dtype=points.dtype, device=points.device)
    start = 0
    for batch, count in packed.batches:
        chosen = hit & (packed_index >= start) & (packed_index < start + count)
        normal[chosen], uv[chosen] = batch.surface(points[chosen], directions[chosen], packed_index[chosen] - start)
        start += count
    primitive = torch.where(hit, packed.order[packed_index], torch.full_like(packed_index, -1))
    return Hits(distance, primitive, points, normal, uv)


def _shade(scene: Scene, packed: _Packed, hits: Hits) -> torch.Tensor:
    """[R, 3] colours: texture x (ambient + (1 - ambient) x lambert x unshadowed), background where missed."""
    device = hits.points.device
    albedo = torch.zeros_like(hits.points)
    for index, primitive in enumerate(scene.primitives):
        chosen = hits.primitive == index
        if chosen.any():
            albedo[chosen] = primitive.material.texture(hits.uv[chosen] * primitive.material.scale)
    light = scene.light_direction.to(device)
    lambert = (hits.normal @ light).clamp(min=0.0)
    if scene.shadows:
        lit = lambert > 0  # misses have zero normals, so only hits facing the light cast shadow rays
        shadow_origins = (hits.points[lit] + _SHADOW_OFFSET * hits.normal[lit]).T.contiguous()
        shadow_directions = light[:, None].expand_as(shadow_origins).contiguous()
        blocked = torch.isfinite(packed.distances(shadow_origins, shadow_directions).amin(dim=0))
        lambert[lit] = torch.where(blocked, torch.zeros_like(lambert[lit]), lambert[lit])
    shaded = albedo * (scene.ambient + (1.0 - scene.ambient) * lambert)[:, None]
    background = torch.tensor(scene.background, dtype=torch.float32, device=device)
    return torch.where(hits.hit[:, None], shaded, background).clamp(0.0, 1.0)


def _check_rays(origins: torch.Tensor, directions: torch.Tensor) -> None:
    if origins.ndim != 2 or origins.shape[-1] != 3 or directions.shape != origins.shape:
        raise ValueError(
            "`origins` and `directions` must both have shape [R, 3], "
            f"got {list(origins.shape)} and {list(directions.shape)}"
        )
    if origins.dtype != torch.float32 or directions.dtype != torch.float32:
        raise TypeError(f"`origins` and `directions` must be float32, got {origins.dtype} and {directions.dtype}")


def intersect(scene: Scene, origins: torch.Tensor, directions: torch.Tensor) -> Hits:
    """The first surface hit by each ray.

    Args:
        scene: the scene.
        origins: [R, 3] float32 ray origins.
        directions: [R, 3] float32 unit ray directions (same device as ``origins``).
    """
    _check_rays(origins, directions)
    return _intersect(_Packed(scene, origins.device), origins.T.contiguous(), directions.T.contiguous())


def shade(scene: Scene, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[R, 3] float32 colours seen along rays (``origins``, unit ``directions``: [R, 3] float32), one sample each."""
    _check_rays(origins, directions)
    scene = scene.to(origins.device)
    packed = _Packed(scene, origins.device)
    return _shade(scene, packed, _intersect(packed, origins.T.contiguous(), directions.T.contiguous()))


# ----------------------------------------------------------------------------------------------------------
# Cameras and images.
# ----------------------------------------------------------------------------------------------------------


def _camera_rays(camera: Camera, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates [2, P] -> ray origins and unit directions [3, P] (float32, on ``pixels``' device)."""
    device = pixels.device
    camera_to_world = camera.camera_to_world
    pixel_to_world = (camera_to_world[:3, :3] @ torch.linalg.inv(camera.K)).to(device, torch.float32)
    directions = pixel_to_world[:, :2] @ pixels.float() + pixel_to_world[:, 2:]
    directions = directions * (directions * directions).sum(0).rsqrt()
    origins = camera_to_world[:3, 3:].to(device, torch.float32).expand_as(directions).contiguous()
    return origins, directions


def camera_rays(camera: Camera, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through continuous pixel coordinates.

    Args:
        camera: the camera.
        pixels: [P, 2] (x, y) image coordinates, corners on integers (pixel (i, j)'s centre is (j + .5, i + .5)).

    Returns:
        origins [P, 3] and unit directions [P, 3], float32 on ``pixels``' device.
    """
    if pixels.ndim != 2 or pixels.shape[-1] != 2:
        raise ValueError(f"`pixels` must have shape [P, 2], got {list(pixels.shape)}")
    origins, directions = _camera_rays(camera, pixels.T)
    return origins.T, directions.T


def _pixel_grid(camera: Camera, top: int, rows: int, supersample: int, device: torch.device) -> torch.Tensor:
    """[2, rows * s * W * s] (x, y) sample coordinates of image rows ``top..top+rows``, one at the centre of each
    of the s x s sub-pixels, ordered (row, sub-row, column, sub-column)."""
    sub = (torch.arange(supersample, dtype=torch.float32, device=device) + 0.5) / supersample
    xs = (torch.arange(camera.width, dtype=torch.float32, device=device)[:, None] + sub).reshape(-1)
    ys = (torch.arange(top, top + rows, dtype=torch.float32, device=device)[:, None] + sub).reshape(-1)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)])


def render(
    scene: Scene,
    camera: Camera,
    *,
    supersample: int = 4,
    device: str | torch.device = "cpu",
    chunk_rays: int = _CHUNK_RAYS,
) -> torch.Tensor:
    """Ray-trace one image.

    Args:
        scene: the scene.
        camera: the camera; the image is ``camera.height`` x ``camera.width``.
        supersample: samples per pixel along each axis, at sub-pixel centres, averaged (1: pixel centres only).
        device: where to trace ("auto": CUDA when available). CPU float32 always works.
        chunk_rays: rays traced at once (bounds memory; the result does not depend on it).

    Returns:
        [H, W, 3] float32 in [0, 1] on ``device``.
    """
    check_int("supersample", supersample, 1)
    check_int("chunk_rays", chunk_rays, 1)
    device = resolve_device(device)
    scene = scene.to(device)
    packed = _Packed(scene, device)
    samples_per_row = camera.width * supersample * supersample
    rows_per_chunk = max(1, chunk_rays // samples_per_row)
    blocks = []
    for top in range(0, camera.height, rows_per_chunk):
        rows = min(rows_per_chunk, camera.height - top)
        origins, directions = _camera_rays(camera, _pixel_grid(camera, top, rows, supersample, device))
        colours = _shade(scene, packed, _intersect(packed, origins, directions))
        blocks.append(colours.reshape(rows, supersample, camera.width, supersample, 3).mean(dim=(1, 3)))
    return torch.cat(blocks)


def render_depth(scene: Scene, camera: Camera, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """[H, W] float32 camera-space depth (z) of the first surface at each pixel centre; inf where nothing is hit."""
    device = resolve_device(device)
    packed = _Packed(scene, device)
    rows_per_chunk = max(1, _CHUNK_RAYS // camera.width)
    forward = camera.world_to_camera[2, :3].to(device, torch.float32)
    blocks = []
    for top in range(0, camera.height, rows_per_chunk):
        rows = min(rows_per_chunk, camera.height - top)
        origins, directions = _camera_rays(camera, _pixel_grid(camera, top, rows, 1, device))
        hits = _intersect(packed, origins, directions)
        blocks.append((hits.distance * (forward @ directions)).reshape(rows, camera.width))
    return torch.cat(blocks)


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent CPU random stream per (seed, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (1 << 63))


_STREAM_SCENE, _STREAM_CAMERAS, _STREAM_POINTS = 1, 2, 3


def orbit_cameras(
    center,
    distance: float,
    views: int,
    resolution: int,
    *,
    seed: int,
    fov_degrees: float = 45.0,
    elevation_degrees: tuple[float, float] = (20.0, 55.0),
) -> list[Camera]:
    """Pinhole cameras on an orbit, all looking at ``center`` with world z up, square ``resolution`` images.

    View k sits at azimuth ``2 pi k / views`` plus a jitter of at most a quarter of the spacing, at an elevation
    spread over ``elevation_degrees`` by a golden-ratio sequence (plus jitter), at ``distance`` x (1 +- 5%).

    Args:
        center: [3] the look-at point. distance: orbit radius (metres). views: number of cameras.
        resolution: image width and height. seed: fixes the jitter.
        fov_degrees: horizontal (= vertical) field of view. elevation_degrees: (lowest, highest) above the horizon.

    Returns:
        ``views`` cameras in azimuth order.
    """
    check_int("views", views, 1)
    check_int("resolution", resolution, 1)
    check_int("seed", seed, 0)
    center = _vector(center, 3, "center").double()
    if not (math.isfinite(distance) and distance > 0):
        raise ValueError(f"`distance` must be positive, got {distance!r}")
    if not 0 < fov_degrees < 180:
        raise ValueError(f"`fov_degrees` must be in (0, 180), got {fov_degrees!r}")
    low, high = elevation_degrees
    if not -89.0 <= low <= high <= 89.0:
        raise ValueError(f"`elevation_degrees` must be (low, high), -89 <= low <= high <= 89; got {elevation_degrees}")
    generator = _generator(seed, _STREAM_CAMERAS)
    jitter = torch.rand(views, 3, generator=generator, dtype=torch.float64) * 2.0 - 1.0  # [views, 3] in [-1, 1)
    golden = (torch.arange(views, dtype=torch.float64) * 0.6180339887 + 0.5) % 1.0
    azimuth = 2.0 * math.pi * (torch.arange(views, dtype=torch.float64) + 0.25 * jitter[:, 0]) / views
    elevation = torch.deg2rad(low + (high - low) * (golden + 0.1 * jitter[:, 1]).clamp(0.0, 1.0))
    radius = distance * (1.0 + 0.05 * jitter[:, 2])
    K = intrinsics_from_fov(resolution, resolution, fov_degrees)
    up = torch.tensor(_UP, dtype=torch.float64)
    horizontal = torch.cos(elevation)
    eyes = center + radius[:, None] * torch.stack(
        [horizontal * torch.cos(azimuth), horizontal * torch.sin(azimuth), torch.sin(elevation)], dim=1
    )  # [views, 3]
    return [Camera(K.clone(), look_at(eye, center, up), resolution, resolution) for eye in eyes]


def sample_surface_points(
    scene: Scene, cameras: list[Camera], num_points: int, *, seed: int, device: str | torch.device = "cpu"
) -> PointCloud:
    """A sparse coloured point cloud on the surfaces the cameras see, for initialising Gaussians.

    Rays through randomly chosen pixel centres of randomly chosen cameras; the hits are kept and coloured with
    the shaded colour at the hit (one sample, no anti-aliasing). Every point lies exactly on the surface
    visible at the centre of one pixel of one camera.

    Returns:
        ``PointCloud`` with P = ``num_points`` points (fewer only if the cameras see almost nothing).
    """
    check_int("num_points", num_points, 1)
    check_int("seed", seed, 0)
    if not cameras:
        raise ValueError("`cameras` must hold at least one camera")
    device = resolve_device(device)
    scene = scene.to(device)
    packed = _Packed(scene, device)
    generator = _generator(seed, _STREAM_POINTS)
    xyz, rgb, found = [], [], 0
    for _ in range(16):  # each round draws 2x what is missing; background-heavy views need a few rounds
        draws = 2 * (num_points - found)
        which = torch.randint(0, len(cameras), (draws,), generator=generator)
        fractions = torch.rand(draws, 2, generator=generator, dtype=torch.float64)
        for index in which.unique().tolist():
            camera = cameras[index]
            chosen = which == index
            pixel = torch.floor(fractions[chosen] * torch.tensor([camera.width, camera.height], dtype=torch.float64))
            origins, directions = _camera_rays(camera, (pixel + 0.5).T.float().to(device))
            hits = _intersect(packed, origins, directions)
            colours = _shade(scene, packed, hits)
            xyz.append(hits.points[hits.hit].cpu())
            rgb.append(colours[hits.hit].cpu())
            found += int(hits.hit.sum())
        if found >= num_points:
            break
    keep = torch.randperm(found, generator=generator)[:num_points]  # a uniform subset, not the first cameras'
    return PointCloud(torch.cat(xyz)[keep], torch.cat(rgb)[keep])


# ----------------------------------------------------------------------------------------------------------
# The named scenes.
# ----------------------------------------------------------------------------------------------------------

_GROUND_HALF_SIZE = 2.5
_CENTER = (0.0, 0.0, 0.4)
_BACKGROUND = (0.82, 0.86, 0.92)
_AMBIENT = 0.35
_ORBIT_DISTANCE = 5.0  # metres from _CENTER: the objects fill the frame at a 45 degree field of view


class _Layout:
    """The random draws of one scene's layout: numbers, ring positions, materials (each texture its own seed)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=self.generator, dtype=torch.float64))

    def material(self, kind: str, scale: float) -> Material:
        seed = int(torch.randint(0, 1 << 31, (1,), generator=self.generator))
        return Material(make_texture(kind, seed), scale * self.uniform(0.85, 1.15))

    def slots(self, count: int, radius: float) -> list[tuple[float, float]]:
        """``count`` ground positions spread around a ring of ``radius`` (jittered angle and radius)."""
        start = self.uniform(0.0, 2.0 * math.pi)
        positions = []
        for k in range(count):
            angle = start + 2.0 * math.pi * (k + self.uniform(-0.12, 0.12)) / count
            distance = radius * self.uniform(0.9, 1.1)
            positions.append((distance * math.cos(angle), distance * math.sin(angle)))
        return positions


def _yaw(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ground(material: Material) -> Quad:
    half = _GROUND_HALF_SIZE
    return Quad([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [half, half], material)


def _standing_box(
    layout: _Layout, x: float, y: float, size: tuple[float, float, float], material: Material, yaw: float | None = None
) -> Box:
    """A box of ``size`` (width, depth, height) standing on the ground at (x, y)."""
    yaw = layout.uniform(0.0, math.pi) if yaw is None else yaw
    return Box([x, y, size[2] / 2], _yaw(yaw), [s / 2 for s in size], material)


def _panel(layout: _Layout, x: float, y: float, width: float, height: float, material: Material) -> Box:
    """A thin upright board at (x, y), its face turned roughly towards the scene centre."""
    facing = math.atan2(y, x) + math.pi / 2 + layout.uniform(-0.4, 0.4)
    return _standing_box(layout, x, y, (width, 0.06, height), material, yaw=facing)


def _resting_sphere(
    layout: _Layout, x: float, y: float, radius: float, material: Material, floor: float = 0.0
) -> Sphere:
    """A sphere resting on the horizontal surface at height ``floor``, its texture randomly oriented."""
    axis_angle = layout.uniform(0.0, math.pi)
    c, s = math.cos(axis_angle), math.sin(axis_angle)
    tilt = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return Sphere([x, y, floor + radius], radius, material, _yaw(layout.uniform(0.0, 2 * math.pi)) @ tilt)


def _tiles_primitives(layout: _Layout) -> list[Primitive]:
    """Tiled floor; a checkered cube with a small sphere on top; around it a glyph pillar, a noise sphere,
    a striped panel, a striped ball and a low tiled block."""
    cube = layout.uniform(0.75, 0.9)
    slots = layout.slots(5, 1.45)
    return [
        _ground(layout.material("tiles", 2.5)),
        _standing_box(layout, 0.0, 0.0, (cube, cube, cube), layout.material("checkers", 5.0)),
        _resting_sphere(layout, 0.0, 0.0, 0.22, layout.material("stripes", 12.0), floor=cube),
        _standing_box(layout, *slots[0], (0.45, 0.45, layout.uniform(1.0, 1.25)), layout.material("glyphs", 7.0)),
        _resting_sphere(layout, *slots[1], layout.uniform(0.38, 0.46), layout.material("noise", 3.0)),
        _panel(layout, *slots[2], 1.0, layout.uniform(0.65, 0.8), layout.material("stripes", 5.0)),
        _resting_sphere(layout, *slots[3], layout.uniform(0.26, 0.32), layout.material("checkers", 9.0)),
        _standing_box(layout, *slots[4], (0.6, 0.6, layout.uniform(0.18, 0.26)), layout.material("tiles", 6.0)),
    ]


def _glyphs_primitives(layout: _Layout) -> list[Primitive]:
    """Glyph-covered floor; a glyph globe in the middle; three glyph boards and a glyph cube around it."""
    slots = layout.slots(4, 1.5)
    return [
        _ground(layout.material("glyphs", 3.0)),
        _resting_sphere(layout, 0.0, 0.0, layout.uniform(0.5, 0.6), layout.material("glyphs", 6.0)),
        _panel(layout, *slots[0], 1.1, layout.uniform(0.75, 0.9), layout.material("glyphs", 6.0)),
        _panel(layout, *slots[1], 1.1, layout.uniform(0.75, 0.9), layout.material("glyphs", 7.0)),
        _panel(layout, *slots[2], 0.9, layout.uniform(0.6, 0.75), layout.material("glyphs", 8.0)),
        _standing_box(layout, *slots[3], (0.6, 0.6, 0.6), layout.material("glyphs", 6.0)),
    ]


def _stripes_primitives(layout: _Layout) -> list[Primitive]:
    """Striped floor; a striped block in the middle; two striped balls, a striped cube and board around it."""
    slots = layout.slots(4, 1.5)
    return [
        _ground(layout.material("stripes", 1.5)),
        _standing_box(layout, 0.0, 0.0, (0.7, 0.7, layout.uniform(0.8, 1.0)), layout.material("stripes", 4.0)),
        _resting_sphere(layout, *slots[0], layout.uniform(0.38, 0.45), layout.material("stripes", 6.0)),
        _standing_box(layout, *slots[1], (0.5, 0.5, 0.5), layout.material("stripes", 6.0)),
        _resting_sphere(layout, *slots[2], layout.uniform(0.26, 0.32), layout.material("stripes", 8.0)),
        _panel(layout, *slots[3], 1.0, 0.7, layout.material("stripes", 5.0)),
    ]


_SCENES: dict[str, Callable[[_Layout], list[Primitive]]] = {
    "tiles": _tiles_primitives,
    "glyphs": _glyphs_primitives,
    "stripes": _stripes_primitives,
}
assert set(_SCENES) == set(SCENE_NAMES)


def _check_name(name: str) -> None:
    if name not in SCENE_NAMES:
        raise ValueError(f"`name` must be one of {SCENE_NAMES}, got {name!r}")


def build_scene(name: str, seed: int) -> Scene:
    """The named scene (one of ``SCENE_NAMES``), its layout jitter, textures and light fixed by ``seed``."""
    _check_name(name)
    check_int("seed", seed, 0)
    layout = _Layout(_generator(seed, _STREAM_SCENE))
    primitives = tuple(_SCENES[name](layout))
    azimuth, elevation = layout.uniform(0.0, 2 * math.pi), math.radians(layout.uniform(50.0, 65.0))
    light = [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
    return Scene(name, primitives, torch.tensor(light), _AMBIENT, _BACKGROUND, torch.tensor(_CENTER), _ORBIT_DISTANCE)


def write_synthetic_scene(
    out_dir: str | Path,
    name: str,
    *,
    resolution: int,
    views: int,
    seed: int,
    test_every: int = 8,
    supersample: int = 4,
    num_points: int = 10_000,
    fov_degrees: float = 45.0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Render a named scene from orbit cameras into a views folder (``gsr_core.data.views``).

    Views are named ``r_000``, ``r_001``, ...; view k is ``test`` when ``k % test_every == 0``, else ``train``.
    The point cloud (``num_points`` points) is sampled from the train cameras only. Metadata: ``scene``,
    ``seed``, ``background`` [3], ``center`` [3], ``radius``, ``near``, ``far`` (depth range covering the scene
    from every camera), ``up`` [3], ``light_direction`` [3], ``ambient``, ``supersample``, ``fov_degrees``.

    Args:
        out_dir: the folder to create (must not exist, or be empty).
        name: one of ``SCENE_NAMES``.
        resolution: image width and height in pixels (>= 8).
        views: number of views (>= 2).
        seed: fixes everything random (same seed -> identical folder contents).
        test_every: hold-out period (>= 2, so view 1 is always a train view).
        supersample: anti-aliasing samples per pixel along each axis.
        num_points: size of the point cloud.
        fov_degrees: field of view of the square images.
        device: where to trace ("auto": CUDA when available); "cpu" reproduces across machines.
        progress: called as ``progress(done, total)`` after each rendered view.

    Returns:
        ``out_dir`` as a Path.
    """
    _check_name(name)
    check_int("resolution", resolution, 8)
    check_int("views", views, 2)
    check_int("seed", seed, 0)
    check_int("test_every", test_every, 2)
    check_int("supersample", supersample, 1)
    check_int("num_points", num_points, 1)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"`out_dir` {out_dir} must not exist or be an empty folder")
    scene = build_scene(name, seed)
    cameras = orbit_cameras(scene.center, scene.orbit_distance, views, resolution, seed=seed, fov_degrees=fov_degrees)
    radius = scene.radius
    camera_distances = [float((camera.center - scene.center.double()).norm()) for camera in cameras]
    metadata = {
        "scene": name,
        "seed": seed,
        "generator": "gsr_core.data.synthetic",
        "background": list(scene.background),
        "center": scene.center.tolist(),
        "radius": radius,
        "near": max(min(camera_distances) - radius, 0.01),
        "far": max(camera_distances) + radius,
        "up": list(_UP),
        "light_direction": scene.light_direction.tolist(),
        "ambient": scene.ambient,
        "supersample": supersample,
        "fov_degrees": fov_degrees,
    }
    writer = ViewsWriter(out_dir, metadata)
    for index, camera in enumerate(cameras):
        split = "test" if index % test_every == 0 else "train"
        writer.add(f"r_{index:03d}", split, camera, render(scene, camera, supersample=supersample, device=device).cpu())
        if progress is not None:
            progress(index + 1, views)
    train_cameras = [camera for index, camera in enumerate(cameras) if index % test_every != 0]
    points = sample_surface_points(scene, train_cameras, num_points, seed=seed, device=device)
    return writer.close(points)
