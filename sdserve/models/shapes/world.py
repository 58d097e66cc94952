"""The shapes world: 64x64 scenes of one or two filled shapes on a plain background.

Everything in a scene can be measured exactly from its pixels (see `scorer.py`), which is why
the project trains its embedded default model on it: adapter effects become numbers.

Geometry is chosen so that every attribute has a margin the scorer can rely on:
- size: "small" shapes are 12-16 px across, "large" ones 24-32 px; nothing lies in between.
- position: a shape's bounding-box centre sits at one of five anchors (left, right, top, bottom,
  centre) plus at most `JITTER` px; the anchors are `ANCHOR_OFFSET` px from the image centre,
  so the scorer's rule (`position_of`) has a >= 5 px margin either side.
- shapes are axis-aligned (squares) or upright (isosceles triangles, apex up), never touch
  (>= `MIN_GAP` px apart) and never share the background's colour.
Colours are exact palette RGB values; there is no anti-aliasing, so the scorer reads them back
without error.
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

SIZE_RANGE: dict[str, tuple[int, int]] = {"small": (12, 16), "large": (24, 32)}  # extent in px
SIZE_THRESHOLD = 20  # extent <= threshold reads as "small"
ANCHOR_OFFSET = 16  # px from the image centre to the left/right/top/bottom anchors
JITTER = 3  # px of uniform jitter around an anchor
CENTER_RADIUS = 8  # |dx| and |dy| both below this read as "center"
MIN_GAP = 3  # px between two shapes' bounding boxes (so they stay separate components)

_ANCHOR_DIRECTION: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "center": (0, 0),
}


@dataclass(frozen=True)
class ShapeSpec:
    """One filled shape. (cx, cy) is the centre of its bounding box in pixel units."""

    kind: str
    color: str
    size: str  # "small" | "large"
    position: str  # one of POSITIONS
    extent: int  # bounding-box width == height, px
    cx: float
    cy: float


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
    rng: np.random.Generator, kind: str, color: str, size: str, position: str, image_size: int
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
    return ShapeSpec(kind, color, size, position, extent, cx, cy)


def sample_scene(
    rng: np.random.Generator,
    num_shapes: int | None = None,
    exclude: frozenset[tuple[str, str, str]] = frozenset(),
    image_size: int = IMAGE_SIZE,
) -> SceneSpec:
    """Draw a scene; `exclude` lists (color, kind, position) triples that must not appear."""
    if num_shapes is None:
        num_shapes = 1 if rng.random() < 0.6 else 2
    while True:  # rejection sampling; a few tries at most (two large shapes may collide)
        background = COLORS[rng.integers(len(COLORS))]
        shape_colors = [c for c in COLORS if c != background]
        positions = rng.permutation(len(POSITIONS))[:num_shapes]
        shapes = []
        for index in positions:
            kind = KINDS[rng.integers(len(KINDS))]
            color = shape_colors[rng.integers(len(shape_colors))]
            size = SIZES[rng.integers(len(SIZES))]
            shapes.append(_place(rng, kind, color, size, POSITIONS[index], image_size))
        if any((s.color, s.kind, s.position) in exclude for s in shapes):
            continue
        if len(shapes) == 2 and not _boxes_apart(shapes[0], shapes[1]):
            continue
        # Order shapes left-to-right, then top-to-bottom, so captions read naturally.
        shapes.sort(key=lambda s: (s.cx, s.cy))
        return SceneSpec(background, tuple(shapes))


def shape_mask(shape: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centres lie inside the shape."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5  # pixel centres
    half = shape.extent / 2
    dx, dy = xs - shape.cx, ys - shape.cy
    if shape.kind == "circle":
        return dx * dx + dy * dy <= half * half
    if shape.kind == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upright isosceles triangle filling its box: apex at the top centre, base on the bottom.
    depth = (dy + half) / shape.extent  # 0 at the apex row, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= half * depth)


def render(scene: SceneSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] image of the scene, palette colours exact."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    for shape in scene.shapes:
        image[shape_mask(shape, image_size)] = PALETTE[shape.color]
    return image


def foreground_mask(scene: SceneSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [H, W]: pixels of any shape (the VAE weights them up so small shapes survive)."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    for shape in scene.shapes:
        mask |= shape_mask(shape, image_size)
    return mask
