"""The shapes world: 64x64 scenes of one or two shapes on a plain background.

Everything in a scene can be measured exactly from its pixels (see `scorer.py`), which is why
the project trains its embedded default model on it: adapter effects become numbers.

Geometry is chosen so that every attribute has a margin the scorer can rely on:
- size: "small" shapes are 12-16 px across, "large" ones 24-32 px; nothing lies in between.
- position: a shape's bounding-box centre sits at one of five anchors (left, right, top, bottom,
  centre) plus at most `JITTER` px; the anchors are `ANCHOR_OFFSET` px from the image centre,
  so the scorer's rule (`position_of`) has a >= 5 px margin either side.
- shapes are axis-aligned (squares) or upright (isosceles triangles and five-pointed stars,
  apex up), never touch (>= `MIN_GAP` px apart) and never share the background's colour.
Colours are exact palette RGB values; there is no anti-aliasing, so the scorer reads them back
without error.

Two vocabularies: the base one (KINDS, COLORS, filled shapes) that the embedded default model
is trained on and tokenizes word by word, and extras it has never seen (EXTRA_KINDS,
EXTRA_COLORS, the "outlined" style) for adapters to teach. `sample_scene` draws extras only when
a caller names them, and with its default arguments it makes exactly the rng calls it always
made, so the base model's training stream does not depend on the extras existing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

# Palette colours are far apart in RGB (closest pair, orange/yellow, is ~85 apart) so that the
# nearest-colour rule of the scorer still holds on the blurry, off-palette pixels a model draws.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 175, 45),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (145, 40, 195),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "large")

# Outside the base vocabulary: the default model never saw these; adapters teach them. Teal sits
# ~118 from both green and blue, further than orange from yellow, so the nearest-colour rule holds.
EXTRA_KINDS: tuple[str, ...] = ("star",)
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"teal": (0, 160, 160)}
STYLES: tuple[str, ...] = ("filled", "outlined")
ALL_KINDS: tuple[str, ...] = KINDS + EXTRA_KINDS
FULL_PALETTE: dict[str, tuple[int, int, int]] = PALETTE | EXTRA_COLORS
"""Every colour the world draws and the scorer snaps to, base colours first (in COLORS order)."""
ALL_COLORS: tuple[str, ...] = tuple(FULL_PALETTE)

SIZE_RANGE: dict[str, tuple[int, int]] = {"small": (12, 16), "large": (24, 32)}  # extent in px
SIZE_THRESHOLD = 20  # extent <= threshold reads as "small"
ANCHOR_OFFSET = 16  # px from the image centre to the left/right/top/bottom anchors
JITTER = 3  # px of uniform jitter around an anchor
CENTER_RADIUS = 8  # |dx| and |dy| both below this read as "center"
MIN_GAP = 3  # px between two shapes' bounding boxes (so they stay separate components)
# Inner / outer radius of the star. A regular pentagram has 0.38; 0.45 gives arms fat enough that
# an outlined 12 px star still encloses >= 2 px of background (0.42 left some with 1 px).
STAR_INNER_RATIO = 0.45
# Width of an outlined shape's stroke: pixels whose centres lie less than this far inside the
# outline. A wider stroke would fill a small star's arms solid; large shapes get a wider one.
STROKE_WIDTH: dict[str, float] = {"small": 2.0, "large": 3.0}

_ANCHOR_DIRECTION: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "center": (0, 0),
}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape. (cx, cy) is the centre of its bounding box in pixel units."""

    kind: str  # one of ALL_KINDS
    color: str  # one of ALL_COLORS
    size: str  # "small" | "large"
    position: str  # one of POSITIONS
    extent: int  # bounding-box width == height, px
    cx: float
    cy: float
    style: str = "filled"  # one of STYLES; last and defaulted so positional constructors still work


@dataclass(frozen=True)
class SceneSpec:
    background: str
    shapes: tuple[ShapeSpec, ...]


def position_of(cx: float, cy: float, size: int = IMAGE_SIZE) -> str:
    """The position word of a bounding-box centre; the one rule shared by world and scorer."""
    dx, dy = cx - size / 2, cy - size / 2
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def size_of(extent: float) -> str:
    return "small" if extent <= SIZE_THRESHOLD else "large"


def held_out_triples() -> frozenset[tuple[str, str, str]]:
    """(color, kind, position) combinations never drawn in training; the bench tests them.

    12 of the 120 triples, spread so every colour, kind and position keeps most of its pairs
    in training (each colour x kind pair loses at most one of its five positions).
    """
    held = set()
    for ci, color in enumerate(COLORS):
        for ki, kind in enumerate(KINDS):
            if (3 * ci + ki) % 2 == 0:
                held.add((color, kind, POSITIONS[(ci + 2 * ki) % len(POSITIONS)]))
    return frozenset(held)


HELD_OUT: frozenset[tuple[str, str, str]] = held_out_triples()


def _boxes_apart(a: ShapeSpec, b: ShapeSpec) -> bool:
    reach_x = (a.extent + b.extent) / 2 + MIN_GAP
    return abs(a.cx - b.cx) >= reach_x or abs(a.cy - b.cy) >= reach_x


def _place(
    rng: np.random.Generator,
    kind: str,
    color: str,
    size: str,
    position: str,
    image_size: int,
    style: str = "filled",
) -> ShapeSpec:
    lo, hi = SIZE_RANGE[size]
    extent = int(rng.integers(lo, hi + 1))
    half = extent / 2
    dir_x, dir_y = _ANCHOR_DIRECTION[position]
    centre = image_size / 2
    cx = centre + dir_x * ANCHOR_OFFSET + rng.uniform(-JITTER, JITTER)
    cy = centre + dir_y * ANCHOR_OFFSET + rng.uniform(-JITTER, JITTER)
    # Keep the shape fully inside with a 1 px border; clamping never crosses the position rule
    # because large shapes reach at most 16 px from the centre of their box.
    cx = float(np.clip(cx, half + 1, image_size - half - 1))
    cy = float(np.clip(cy, half + 1, image_size - half - 1))
    return ShapeSpec(kind, color, size, position, extent, cx, cy, style)


def _check_vocab(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise ValueError(f"{name} must be a non-empty tuple from {allowed}, got {values}")


MAX_TRIES = 10_000  # rejection sampling gives up here: the constraints leave (almost) nothing


def sample_scene(
    rng: np.random.Generator,
    num_shapes: int | None = None,
    exclude: frozenset[tuple[str, str, str]] = frozenset(),
    image_size: int = IMAGE_SIZE,
    *,
    kinds: tuple[str, ...] = KINDS,
    colors: tuple[str, ...] = COLORS,
    backgrounds: tuple[str, ...] = COLORS,
    positions: tuple[str, ...] = POSITIONS,
    sizes: tuple[str, ...] = SIZES,
    styles: tuple[str, ...] = ("filled",),
) -> SceneSpec:
    """Draw a scene; `exclude` lists (color, kind, position) triples that must not appear.

    The keyword-only tuples narrow or widen what is drawn (uniformly from each). With their
    defaults the rng sees the same calls in the same order as before they existed, so the base
    model's seeded training stream is unchanged; a style is drawn only when there is a choice.
    """
    _check_vocab("kinds", kinds, ALL_KINDS)
    _check_vocab("colors", colors, ALL_COLORS)
    _check_vocab("backgrounds", backgrounds, ALL_COLORS)
    _check_vocab("positions", positions, POSITIONS)
    _check_vocab("sizes", sizes, SIZES)
    _check_vocab("styles", styles, STYLES)
    if num_shapes is None:
        num_shapes = 1 if rng.random() < 0.6 else 2
    if not 1 <= num_shapes <= min(2, len(positions)):
        raise ValueError(f"num_shapes={num_shapes} needs 1 or 2 shapes and as many positions as shapes")
    if all(set(colors) <= {b} for b in backgrounds):
        raise ValueError(f"no shape colour in {colors} differs from a background in {backgrounds}")
    for _ in range(MAX_TRIES):  # rejection sampling; a few tries at most (two large shapes may collide)
        background = backgrounds[rng.integers(len(backgrounds))]
        shape_colors = [c for c in colors if c != background]
        if not shape_colors:
            continue
        order = rng.permutation(len(positions))[:num_shapes]
        shapes = []
        for index in order:
            kind = kinds[rng.integers(len(kinds))]
            color = shape_colors[rng.integers(len(shape_colors))]
            size = sizes[rng.integers(len(sizes))]
            style = styles[rng.integers(len(styles))] if len(styles) > 1 else styles[0]
            shapes.append(_place(rng, kind, color, size, positions[index], image_size, style))
        if any((s.color, s.kind, s.position) in exclude for s in shapes):
            continue
        if len(shapes) == 2 and not _boxes_apart(shapes[0], shapes[1]):
            continue
        # Order shapes left-to-right, then top-to-bottom, so captions read naturally.
        shapes.sort(key=lambda s: (s.cx, s.cy))
        return SceneSpec(background, tuple(shapes))
    raise ValueError(f"no scene found in {MAX_TRIES} tries: the exclusions leave nothing to draw")


def _star_vertices() -> np.ndarray:
    """[10, 2] (x, y) of an apex-up five-pointed star scaled to fill the box [-1, 1]^2, y down.

    A regular star is 1.902 R wide and 1.809 R tall; stretching it 5 % vertically makes its box
    square, so the world's extent/centre rules (and the scorer's) hold as for the other kinds.
    """
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # outer points on even indices, apex first
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    xs = xs / xs.max()  # outer points at +-sin(72 deg) -> +-1
    ys = 2 * (ys - ys.min()) / (ys.max() - ys.min()) - 1  # apex -1, lower points cos(36 deg) -> 1
    return np.stack([xs, ys], axis=1)


_STAR = _star_vertices()  # [10, 2]
_TRIANGLE = np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])  # [3, 2] apex, base right, base left


def _inside_polygon(dx: np.ndarray, dy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: even-odd rule for points (dx, dy) against a closed polygon [V, 2]."""
    inside = np.zeros(dx.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y0 == y1:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y0 > dy) != (y1 > dy)
        x_at = x0 + (dy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (dx < x_at)
    return inside


def _distance_to_polygon(dx: np.ndarray, dy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Float [H, W]: Euclidean distance from (dx, dy) to the nearest edge of the polygon [V, 2]."""
    best = np.full(dx.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((dx - x0) * ex + (dy - y0) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        best = np.minimum(best, np.hypot(dx - x0 - t * ex, dy - y0 - t * ey))
    return best


def shape_mask(shape: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centres lie inside the shape (its stroke, if outlined)."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5  # pixel centres
    half = shape.extent / 2
    dx, dy = xs - shape.cx, ys - shape.cy
    if shape.kind == "circle":
        inside = dx * dx + dy * dy <= half * half
        depth = half - np.hypot(dx, dy)  # distance in from the outline, for outlined shapes
    elif shape.kind == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        depth = half - np.maximum(np.abs(dx), np.abs(dy))
    elif shape.kind == "triangle":
        # Upright isosceles triangle filling its box: apex at the top centre, base on the bottom.
        fraction = (dy + half) / shape.extent  # 0 at the apex row, 1 at the base
        inside = (fraction >= 0) & (fraction <= 1) & (np.abs(dx) <= half * fraction)
        depth = _distance_to_polygon(dx, dy, _TRIANGLE * half) if shape.style != "filled" else None
    elif shape.kind == "star":
        inside = _inside_polygon(dx, dy, _STAR * half)
        depth = _distance_to_polygon(dx, dy, _STAR * half) if shape.style != "filled" else None
    else:
        raise ValueError(f"unknown kind {shape.kind!r}")
    if shape.style == "filled":
        return inside
    if shape.style == "outlined":
        return inside & (depth < STROKE_WIDTH[shape.size])
    raise ValueError(f"unknown style {shape.style!r}")


def render(scene: SceneSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] image of the scene, palette colours exact."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = FULL_PALETTE[scene.background]
    for shape in scene.shapes:
        image[shape_mask(shape, image_size)] = FULL_PALETTE[shape.color]
    return image


def foreground_mask(scene: SceneSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [H, W]: pixels of any shape (the VAE weights them up so small shapes survive)."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    for shape in scene.shapes:
        mask |= shape_mask(shape, image_size)
    return mask
