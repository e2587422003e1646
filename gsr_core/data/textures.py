"""Procedural textures: colour functions of continuous 2D coordinates, deterministic given a seed.

A texture maps texture coordinates ``uv`` [P, 2] (any real values; one texture *unit* is the pattern's main
cell or period) to colours [P, 3] float32 in [0, 1]. Because they are functions of continuous coordinates,
they can be sampled at any resolution, and averaging several samples per pixel anti-aliases them. All have
sharp edges or fine detail (high-frequency content) so that super-resolution has something to recover.

Kinds (``TEXTURE_KINDS``):

* ``checkers``: a rotated checkerboard of checkerboards (two scales, four colours).
* ``stripes``: three layers of square-wave stripes at different orientations and periods.
* ``tiles``: tiles (square grid or running bond) separated by grout lines, each tile with a random colour and
  a motif (plain, inset ring, diagonal hatching, dot).
* ``glyphs``: lines of letter-like glyphs, each made of a few straight strokes on a 3x3 lattice.
* ``noise``: multi-octave gradient noise (fractal Brownian motion) through a colour ramp.

``make_texture(kind, seed)`` builds one; ``texture_image(kind, height, width, seed)`` renders a flat,
area-anti-aliased image of one (training images for a super-resolution prior of the same family as the
synthetic scenes of ``gsr_core.data.synthetic``).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from gsr_core.arguments import check_int

TEXTURE_KINDS = ("checkers", "stripes", "tiles", "glyphs", "noise")

_TABLE_SIZE = 61  # per-cell random values repeat every 61 cells (a prime, so no short visible period)
_CHUNK_SAMPLES = 1 << 18  # samples evaluated at once by texture_image (bounded memory at any resolution)


class Texture(ABC):
    """Base class: a colour function of continuous texture coordinates; subclasses are dataclasses of tensors."""

    @abstractmethod
    def __call__(self, uv: torch.Tensor) -> torch.Tensor:
        """Colours at ``uv`` [P, 2] (float32, on the texture's device) -> [P, 3] float32 in [0, 1]."""

    def to(self, device: str | torch.device) -> "Texture":
        """The same texture with every tensor on ``device``."""
        moved = {
            field.name: getattr(self, field.name).to(device)
            for field in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, field.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[n] hue, saturation, value in [0, 1] -> [n, 3] RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6.0) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float32)


def random_palette(count: int, generator: torch.Generator, *, value: tuple[float, float] = (0.2, 0.95)) -> torch.Tensor:
    """[count, 3] colours with well-spread hues (golden-ratio steps) and values alternating dark and light.

    Args:
        count: number of colours.
        generator: the random stream (CPU ``torch.Generator``).
        value: (low, high) HSV value range; even entries come from its upper third, odd ones from its lower third.
    """
    low, high = value
    hue = (torch.rand(1, generator=generator) + torch.arange(count) * 0.618034) % 1.0
    saturation = _uniform(generator, count, 0.35, 0.9)
    third = (high - low) / 3.0
    light = _uniform(generator, count, high - third, high)
    dark = _uniform(generator, count, low, low + third)
    values = torch.where(torch.arange(count) % 2 == 0, light, dark)
    return _hsv_to_rgb(hue, saturation, values).float()


def _rotation_2d(angle: float) -> torch.Tensor:
    """[2, 2] matrix whose rows are the rotated u and v axes."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, s], [-s, c]], dtype=torch.float32)


def _cell_values(table: torch.Tensor, column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Per-cell random int64 values: ``table`` [T, T] looked up at integer cells ([P] each, any sign)."""
    size = table.shape[0]
    return table[column.remainder(size), row.remainder(size)]


def _random_table(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1 << 30, (_TABLE_SIZE, _TABLE_SIZE), generator=generator)


@dataclass(frozen=True)
class Checkers(Texture):
    """A rotated checkerboard (unit cells) modulated by a coarser one (``coarse`` units per cell).

    Attributes: rotation [2, 2]; palette [4, 3] (fine parity + 2 * coarse parity -> colour); coarse: cell ratio.
    """

    rotation: torch.Tensor
    palette: torch.Tensor
    coarse: float

    def __call__(self, uv: torch.Tensor) -> torch.Tensor:
        cells = torch.floor(uv @ self.rotation.T).long()
        fine = (cells[:, 0] + cells[:, 1]).remainder(2)
        coarse_cells = torch.floor(cells.float() / self.coarse).long()
        coarse = (coarse_cells[:, 0] + coarse_cells[:, 1]).remainder(2)
        return self.palette[fine + 2 * coarse]


@dataclass(frozen=True)
class Stripes(Texture):
    """L layers of square-wave stripes; layer l is on where frac(uv . direction_l / period_l + phase_l) < duty_l.

    Attributes: directions [L, 2] unit; periods [L]; duties [L]; phases [L]; palette [2 ** L, 3] indexed by the
    layers' on/off bits (bit l for layer l).
    """

    directions: torch.Tensor
    periods: torch.Tensor
    duties: torch.Tensor
    phases: torch.Tensor
    palette: torch.Tensor

    def __call__(self, uv: torch.Tensor) -> torch.Tensor:
        position = uv @ self.directions.T / self.periods + self.phases
        on = (position - torch.floor(position)) < self.duties
        weights = 2 ** torch.arange(on.shape[1], device=uv.device)
        return self.palette[(on.long() * weights).sum(dim=1)]


@dataclass(frozen=True)
class Tiles(Texture):
    """Unit tiles separated by grout; odd rows shifted by ``bond`` (0 for a square grid, 0.5 for running bond).

    Attributes: table [T, T] per-tile random values; palette [n, 3] tile colours; grout_colour [3];
    grout: grout line width (texture units); bond: row shift; rotation [2, 2].
    Motifs by tile value: 0 plain, 1 darker inset ring, 2 darker diagonal hatching, 3 dot of another colour.
    """

    table: torch.Tensor
    palette: torch.Tensor
    grout_colour: torch.Tensor
    grout: float
    bond: float
    rotation: torch.Tensor

    def __call__(self, uv: torch.Tensor) -> torch.Tensor:
        uv = uv @ self.rotation.T
        row = torch.floor(uv[:, 1])
        x = uv[:, 0] + self.bond * row.remainder(2)
        column = torch.floor(x)
        fx, fy = x - column, uv[:, 1] - row
        value = _cell_values(self.table, column.long(), row.long())
        count = self.palette.shape[0]
        colour = self.palette[value % count]
        motif = (value // count) % 4
        cx, cy = fx - 0.5, fy - 0.5
        ring = (torch.maximum(cx.abs(), cy.abs()) - 0.26).abs() < 0.045
        hatch = ((fx + fy) * 5.0).remainder(1.0) < 0.5
        dot = cx * cx + cy * cy < 0.18**2
        colour = torch.where(((motif == 1) & ring)[:, None], colour * 0.55, colour)
        colour = torch.where(((motif == 2) & hatch)[:, None], colour * 0.75, colour)
        colour = torch.where(((motif == 3) & dot)[:, None], self.palette[(value + 1) % count], colour)
        edge = torch.minimum(torch.minimum(fx, 1.0 - fx), torch.minimum(fy, 1.0 - fy))
        return torch.where((edge < self.grout / 2)[:, None], self.grout_colour, colour)


# The glyph lattice: 3 x 3 nodes inside a cell of 0.7 x 1 units; strokes join nodes one step apart.
_GLYPH_CELL_WIDTH = 0.7
_GLYPH_NODES = torch.tensor([[x, y] for y in (0.2, 0.5, 0.8) for x in (0.14, 0.35, 0.56)], dtype=torch.float32)
_GLYPH_EDGES = [
    (a, b)
    for a in range(9)
    for b in range(a + 1, 9)
    if max(abs(a % 3 - b % 3), abs(a // 3 - b // 3)) == 1
]


@dataclass(frozen=True)
class Glyphs(Texture):
    """Lines of glyphs in cells of ``_GLYPH_CELL_WIDTH`` x 1 units; some cells are blank (spaces).

    Attributes: strokes [G, S, 4] segments (x0, y0, x1, y1) in cell units; table [T, T] per-cell values
    (glyph choice, ink colour, blank); paper [n, 3] per-line colours; ink [m, 3] colours; stroke: half width;
    blank_per_mille: blank cells per thousand; rotation [2, 2].
    """

    strokes: torch.Tensor
    table: torch.Tensor
    paper: torch.Tensor
    ink: torch.Tensor
    stroke: float
    blank_per_mille: int
    rotation: torch.Tensor

    def __call__(self, uv: torch.Tensor) -> torch.Tensor:
        uv = uv @ self.rotation.T
        column = torch.floor(uv[:, 0] / _GLYPH_CELL_WIDTH)
        row = torch.floor(uv[:, 1])
        point = torch.stack([uv[:, 0] - column * _GLYPH_CELL_WIDTH, uv[:, 1] - row], dim=1)  # [P, 2] in the cell
        value = _cell_values(self.table, column.long(), row.long())
        segments = self.strokes[value % self.strokes.shape[0]]  # [P, S, 4]
        start, end = segments[..., :2], segments[..., 2:]
        along = end - start
        offset = point[:, None, :] - start
        fraction = ((offset * along).sum(-1) / (along * along).sum(-1)).clamp(0.0, 1.0)
        distance = (offset - along * fraction[..., None]).norm(dim=-1).amin(dim=1)
        blank = (value // 7) % 1000 < self.blank_per_mille
        inked = (distance < self.stroke) & ~blank
        line_value = _cell_values(self.table, torch.zeros_like(row.long()), row.long())
        paper = self.paper[line_value % self.paper.shape[0]]
        ink = self.ink[(value // 7000) % self.ink.shape[0]]
        return torch.where(inked[:, None], ink, paper)


@dataclass(frozen=True)
class Noise(Texture):
    """Fractal gradient noise: ``octaves`` layers of Perlin noise, frequency x2 and amplitude x0.5 per layer.

    Attributes: gradients [T, T, 2] unit lattice gradients; offsets [octaves, 2] per-octave shifts;
    palette [n, 3] colour ramp stops (evenly spaced over [0, 1]); contrast: gain before the ramp.
    """

    gradients: torch.Tensor
    offsets: torch.Tensor
    palette: torch.Tensor
    contrast: float

    def _perlin(self, uv: torch.Tensor) -> torch.Tensor:
        """[P, 2] -> [P] gradient noise, zero on lattice points."""
        cell = torch.floor(uv)
        local = uv - cell
        cell = cell.long()
        fade = local * local * local * (local * (local * 6.0 - 15.0) + 10.0)
        size = self.gradients.shape[0]

        def corner(dx: int, dy: int) -> torch.Tensor:
            gradient = self.gradients[(cell[:, 0] + dx).remainder(size), (cell[:, 1] + dy).remainder(size)]
            return (gradient * (local - torch.tensor([dx, dy], dtype=uv.dtype, device=uv.device))).sum(-1)

        bottom = torch.lerp(corner(0, 0), corner(1, 0), fade[:, 0])
        top = torch.lerp(corner(0, 1), corner(1, 1), fade[:, 0])
        return torch.lerp(bottom, top, fade[:, 1])

    def __call__(self, uv: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(uv.shape[0], dtype=uv.dtype, device=uv.device)
        for octave in range(self.offsets.shape[0]):
            total = total + self._perlin(uv * 2.0**octave + self.offsets[octave]) * 0.5**octave
        level = (0.5 + self.contrast * total).clamp(0.0, 1.0) * (self.palette.shape[0] - 1)
        lower = torch.floor(level).long().clamp(max=self.palette.shape[0] - 2)
        return torch.lerp(self.palette[lower], self.palette[lower + 1], (level - lower)[:, None])


def _random_angle(generator: torch.Generator) -> float:
    return float(_uniform(generator, 1, 0.0, math.pi))


def _checkers(generator: torch.Generator) -> Checkers:
    palette = random_palette(4, generator)
    coarse = float(torch.randint(3, 6, (1,), generator=generator))
    return Checkers(_rotation_2d(_random_angle(generator)), palette, coarse)


def _stripes(generator: torch.Generator) -> Stripes:
    base = _random_angle(generator)
    spread = _uniform(generator, 3, -0.35, 0.35) * torch.tensor([0.0, 1.0, 3.0])  # the finest layer turns most
    angles = torch.tensor([base, base + math.pi / 2, base]) + spread
    directions = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    periods = torch.cat([torch.ones(1), _uniform(generator, 1, 0.35, 0.6), _uniform(generator, 1, 0.12, 0.2)])
    duties = torch.cat([torch.full((1,), 0.5), _uniform(generator, 1, 0.2, 0.35), torch.full((1,), 0.5)])
    phases = _uniform(generator, 3, 0.0, 1.0)
    colours = random_palette(4, generator)
    palette = torch.cat([colours, colours * 0.7])  # the finest layer (bit 2) darkens the two coarse ones' colour
    return Stripes(directions, periods, duties, phases, palette)


def _tiles(generator: torch.Generator) -> Tiles:
    palette = random_palette(5, generator, value=(0.35, 0.95))
    grout_colour = random_palette(2, generator, value=(0.1, 0.95))[int(torch.randint(0, 2, (1,), generator=generator))]
    bond = 0.5 * float(torch.randint(0, 2, (1,), generator=generator))
    grout = float(_uniform(generator, 1, 0.05, 0.09))
    angle = float(_uniform(generator, 1, -0.3, 0.3))
    return Tiles(_random_table(generator), palette, grout_colour, grout, bond, _rotation_2d(angle))


def _glyphs(generator: torch.Generator, count: int = 48, strokes: int = 5) -> Glyphs:
    edges = torch.tensor(_GLYPH_EDGES)
    glyphs = []
    for _ in range(count):
        used = int(torch.randint(2, strokes + 1, (1,), generator=generator))
        chosen = edges[torch.randperm(len(_GLYPH_EDGES), generator=generator)[:used]]
        chosen = torch.cat([chosen, chosen[:1].expand(strokes - used, 2)])  # pad with a repeated stroke
        glyphs.append(torch.cat([_GLYPH_NODES[chosen[:, 0]], _GLYPH_NODES[chosen[:, 1]]], dim=1))
    paper = random_palette(3, generator, value=(0.55, 1.0))[::2]
    ink = random_palette(4, generator, value=(0.05, 0.5))[1::2]
    stroke = float(_uniform(generator, 1, 0.045, 0.065))
    angle = float(_uniform(generator, 1, -0.25, 0.25))
    table = _random_table(generator)
    return Glyphs(torch.stack(glyphs), table, paper.contiguous(), ink.contiguous(), stroke, 120, _rotation_2d(angle))


def _noise(generator: torch.Generator, octaves: int = 6) -> Noise:
    angles = _uniform(generator, _TABLE_SIZE * _TABLE_SIZE, 0.0, 2.0 * math.pi).reshape(_TABLE_SIZE, _TABLE_SIZE)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    offsets = _uniform(generator, octaves * 2, 0.0, float(_TABLE_SIZE)).reshape(octaves, 2)
    palette = random_palette(4, generator)
    return Noise(gradients, offsets, palette, contrast=1.4)


_BUILDERS = {"checkers": _checkers, "stripes": _stripes, "tiles": _tiles, "glyphs": _glyphs, "noise": _noise}
assert set(_BUILDERS) == set(TEXTURE_KINDS)


def _check_kind(kind: str) -> None:
    if kind not in TEXTURE_KINDS:
        raise ValueError(f"`kind` must be one of {TEXTURE_KINDS}, got {kind!r}")


def make_texture(kind: str, seed: int, *, device: str | torch.device = "cpu") -> Texture:
    """A texture of ``kind`` (one of ``TEXTURE_KINDS``) whose pattern and colours are fixed by ``seed``.

    The random draws happen on the CPU, so the texture is the same on every device.
    """
    _check_kind(kind)
    check_int("seed", seed, 0)
    generator = torch.Generator().manual_seed(seed)
    return _BUILDERS[kind](generator).to(device)


def texture_image(
    kind: str,
    height: int,
    width: int,
    seed: int,
    *,
    cells: float = 8.0,
    supersample: int = 4,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A flat image of a texture, area-anti-aliased by averaging ``supersample`` x ``supersample`` samples per pixel.

    Pixel (i, j) covers texture coordinates ``[j, j+1) x [i, i+1)`` times ``cells / width``; its samples sit at
    the centres of its ``supersample`` x ``supersample`` sub-pixels.

    Args:
        kind: one of ``TEXTURE_KINDS``.
        height, width: image size in pixels.
        seed: fixes the texture (same seed -> identical image).
        cells: texture units across the image width (the pattern's scale: more cells, finer detail per pixel).
        supersample: samples per pixel along each axis (1 = point-sampled at pixel centres).
        device: where to evaluate.

    Returns:
        [H, W, 3] float32 in [0, 1] on ``device``.
    """
    _check_kind(kind)
    check_int("height", height, 1)
    check_int("width", width, 1)
    check_int("supersample", supersample, 1)
    if not (isinstance(cells, (int, float)) and math.isfinite(cells) and cells > 0):
        raise ValueError(f"`cells` must be a positive finite number, got {cells!r}")
    texture = make_texture(kind, seed, device=device)
    step = cells / width
    sub = (torch.arange(supersample, dtype=torch.float32, device=device) + 0.5) / supersample
    columns = (torch.arange(width, dtype=torch.float32, device=device)[:, None] + sub).reshape(-1)  # [W * s]
    rows_per_chunk = max(1, _CHUNK_SAMPLES // (width * supersample * supersample))
    blocks = []
    for top in range(0, height, rows_per_chunk):
        count = min(rows_per_chunk, height - top)
        rows = (torch.arange(top, top + count, dtype=torch.float32, device=device)[:, None] + sub).reshape(-1)
        y, x = torch.meshgrid(rows, columns, indexing="ij")  # [count * s, W * s]
        colours = texture(torch.stack([x.reshape(-1), y.reshape(-1)], dim=1) * step)
        colours = colours.reshape(count, supersample, width, supersample, 3).mean(dim=(1, 3))
        blocks.append(colours)
    return torch.cat(blocks).clamp(0.0, 1.0)
