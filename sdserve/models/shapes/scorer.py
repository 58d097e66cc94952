"""Read a shapes image back into attributes, with no learned weights.

Pixels snap to the nearest base palette colour, or to teal within EXTRA_CAPTURE_RADIUS of it
(teal lies between green and blue, so a plain nearest-colour rule would turn the blended edge of
a green shape on blue into teal slivers and bite the corners off squares); the background
is the commonest colour on the border; every other colour splits into 4-connected components.
A component that encloses background pixels is an outlined shape: its holes are filled back in
(its footprint) before geometry names the kind. A ring enclosing another colour is not: that is
the halo of in-between colour a model paints around a shape, and it stays subject to MIN_FILL.
Geometry of the footprint names the kind:
- star: the only concave kind; it covers ~0.55-0.7 of its convex hull, the others > 0.87;
- triangle: apex-up triangles hold ~1/4 of their area in the top half of their box (circles and
  squares 1/2), and fill ~1/2 of the box;
- circle vs square: a disc fills pi/4 ~ 0.785 of its box, a square all of it.
Size and position use the bounding box with the world's own rules (`size_of`, `position_of`),
so a ground-truth render reads back exactly; model samples are blurry and off-palette, which
the area and fill floors below absorb (thin halos of in-between colours are not shapes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sdserve.models.shapes.captions import PromptSpec, ShapePrompt
from sdserve.models.shapes.world import ALL_COLORS, COLORS, FULL_PALETTE, position_of, size_of

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "size", "background")
"""The attributes every prompt names; "style" is scored too, but only when a prompt names it."""
MIN_AREA = 30  # px; a 12 px star, the smallest shape drawn, covers ~55 (outlined ~50)
MIN_FILL = 0.3  # of the bounding box, by footprint; rings and slivers of edge colour fall below
# area / convex hull: rendered stars <= 0.71, rendered other kinds >= 0.87, the default model's
# blurry triangles >= 0.77 (bench.shapes_quality samples); the middle of that last gap.
STAR_MAX_SOLIDITY = 0.74
MIN_HOLE = 2  # px of enclosed background that make a shape outlined; a small outlined star has >= 2
# RGB distance within which a pixel is an extra colour; any green/blue blend is >= 53 from teal.
EXTRA_CAPTURE_RADIUS = 40.0
_BASE_RGB = np.array([FULL_PALETTE[c] for c in COLORS], dtype=np.float32)  # [8, 3]
_EXTRA_RGB = np.array([FULL_PALETTE[c] for c in ALL_COLORS[len(COLORS) :]], dtype=np.float32)  # [E, 3]


@dataclass(frozen=True)
class FoundShape:
    color: str
    kind: str
    size: str
    position: str
    extent: int  # max(bbox width, bbox height), px
    box_center: tuple[float, float]  # (x, y) of the bounding box centre
    centroid: tuple[float, float]  # (x, y) centre of mass
    area: int  # painted px
    fill: float  # area / bbox area; low for an outlined shape, whose ring paints little of its box
    style: str = "filled"  # "outlined" when the shape encloses >= MIN_HOLE background px
    footprint: int = 0  # area plus the enclosed background px (== area for a filled shape)


@dataclass(frozen=True)
class Reading:
    background: str
    shapes: tuple[FoundShape, ...]  # largest first


def palette_labels(image: np.ndarray) -> np.ndarray:
    """[H, W] int index into ALL_COLORS: the nearest base colour, or an extra one close enough.

    Base colours come first in ALL_COLORS, so where no pixel is near an extra colour the labels
    are exactly the base palette's nearest-colour labels.
    """
    pixels = image.astype(np.float32)[..., None, :]  # [H, W, 1, 3]
    labels = np.argmin(((pixels - _BASE_RGB) ** 2).sum(-1), axis=-1)  # [H, W]
    extra_dist = ((pixels - _EXTRA_RGB) ** 2).sum(-1)  # [H, W, E]
    near_extra = extra_dist.min(-1) < EXTRA_CAPTURE_RADIUS**2  # [H, W]
    return np.where(near_extra, len(COLORS) + extra_dist.argmin(-1), labels)


def connected_components(labels: np.ndarray, background: int) -> np.ndarray:
    """[H, W] int component id (-1 on background) joining 4-neighbours of the same label.

    Min-label propagation; a few dozen vectorised sweeps on a 64x64 image, no scipy needed.
    """
    height, width = labels.shape
    big = height * width
    comp = np.where(labels != background, np.arange(big).reshape(height, width), big)
    same_right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] != background)  # [H, W-1]
    same_down = (labels[1:, :] == labels[:-1, :]) & (labels[1:, :] != background)  # [H-1, W]
    while True:
        prev = comp
        comp = comp.copy()
        left_right = np.minimum(comp[:, 1:], comp[:, :-1])
        comp[:, 1:] = np.where(same_right, left_right, comp[:, 1:])
        comp[:, :-1] = np.where(same_right, np.minimum(comp[:, :-1], comp[:, 1:]), comp[:, :-1])
        comp[1:, :] = np.where(same_down, np.minimum(comp[1:, :], comp[:-1, :]), comp[1:, :])
        comp[:-1, :] = np.where(same_down, np.minimum(comp[:-1, :], comp[1:, :]), comp[:-1, :])
        if np.array_equal(comp, prev):
            return np.where(comp == big, -1, comp)


def convex_hull_area(mask: np.ndarray) -> float:
    """Area in px^2 of the convex hull of a boolean mask's pixel squares (corners, not centres).

    Only each row's outermost pixels can be hull corners, so the hull is built from <= 4 points
    per row with Andrew's monotone chain.
    """
    rows = np.nonzero(mask.any(axis=1))[0]
    if len(rows) == 0:
        return 0.0
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)  # one past the last pixel
    points = sorted(
        {(float(x), float(y)) for y, lo, hi in zip(rows, left, right) for x in (lo, hi) for y in (y, y + 1)}
    )

    def turn(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    upper: list[tuple[float, float]] = []
    for point in points:
        while len(lower) >= 2 and turn(lower[-2], lower[-1], point) <= 0:
            lower.pop()
        lower.append(point)
    for point in reversed(points):
        while len(upper) >= 2 and turn(upper[-2], upper[-1], point) <= 0:
            upper.pop()
        upper.append(point)
    hull = np.array(lower[:-1] + upper[:-1])  # [V, 2] counter-clockwise
    xs, ys = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def classify_kind(mask: np.ndarray) -> str:
    """'circle' | 'square' | 'triangle' | 'star' for a boolean mask cropped to its bounding box.

    The star test runs first and needs both a concave outline and a sparse box, so a convex
    blob never reads as a star; the old three-way rule is unchanged for everything else.
    """
    height, width = mask.shape
    area = mask.sum()
    fill = area / (height * width)
    if fill < 0.62 and area < STAR_MAX_SOLIDITY * convex_hull_area(mask):
        return "star"
    top_fraction = mask[: height // 2].sum() / area if height > 1 else 0.5
    if top_fraction < 0.38 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def enclosed(mask: np.ndarray) -> np.ndarray:
    """Boolean like `mask`: the pixels outside it that cannot reach the crop's edge (its holes).

    4-connected, so a ring that touches itself only diagonally still closes its hole.
    """
    outside = np.pad(~mask, 1, constant_values=True)  # [H + 2, W + 2]; the pad joins all edges
    comp = connected_components(outside.astype(np.int8), background=0)
    return (comp != comp[0, 0])[1:-1, 1:-1] & ~mask


def read_image(image: np.ndarray) -> Reading:
    """Shapes found in a uint8 [H, W, 3] image, and its background colour."""
    labels = palette_labels(image)
    size = image.shape[0]
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(ALL_COLORS)).argmax())
    comp = connected_components(labels, background)
    ids, areas = np.unique(comp[comp >= 0], return_counts=True)
    found = []
    for comp_id, area in zip(ids, areas):
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(comp == comp_id)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box_area = (y1 - y0) * (x1 - x0)
        crop = comp[y0:y1, x0:x1] == comp_id
        # Only background holes fill in: a hole of another colour means this is a halo ring.
        holes = enclosed(crop) & (labels[y0:y1, x0:x1] == background)
        hole_area = int(holes.sum())
        outlined = hole_area >= MIN_HOLE
        footprint = crop | holes if outlined else crop
        if (area + hole_area * outlined) / box_area < MIN_FILL:
            continue
        extent = int(max(y1 - y0, x1 - x0))
        box_center = ((x0 + x1) / 2, (y0 + y1) / 2)
        found.append(
            FoundShape(
                color=ALL_COLORS[labels[ys[0], xs[0]]],
                kind=classify_kind(footprint),
                size=size_of(extent),
                position=position_of(*box_center, size=size),
                extent=extent,
                box_center=box_center,
                centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                area=int(area),
                fill=float(area / box_area),
                style="outlined" if outlined else "filled",
                footprint=int(footprint.sum()),
            )
        )
    found.sort(key=lambda s: -s.footprint)  # by footprint: a large ring outranks a small disc
    return Reading(ALL_COLORS[background], tuple(found))


def _matches(prompt: ShapePrompt, found: FoundShape | None) -> dict[str, bool | None]:
    if found is None:
        return {
            "color": False,
            "shape": False,
            "size": False if prompt.size else None,
            "position": False if prompt.position else None,
            "style": False if prompt.style else None,
        }
    return {
        "color": found.color == prompt.color,
        "shape": found.kind == prompt.kind,
        "size": found.size == prompt.size if prompt.size else None,
        "position": found.position == prompt.position if prompt.position else None,
        "style": found.style == prompt.style if prompt.style else None,
    }


def score(spec: PromptSpec, image: np.ndarray) -> dict[str, bool | None]:
    """Per-attribute correctness of `image` against a prompt; None where the prompt is silent.

    The prompt's K shapes are matched to the K largest shapes found (fewer found: the rest
    count as missing), choosing the pairing that satisfies most attributes; an attribute is
    right when it is right for every prompted shape. "style" is None unless some prompted shape
    names one (captions name only "outlined"; set "filled" to score that). "count" says whether
    exactly K shapes were found; "all" whether every scored attribute is right.
    """
    reading = read_image(image)
    candidates: list[FoundShape | None] = list(reading.shapes[: len(spec.shapes)])
    candidates += [None] * (len(spec.shapes) - len(candidates))
    best: list[dict[str, bool | None]] = []
    best_hits = -1
    for order in itertools.permutations(candidates):
        per_shape = [_matches(p, f) for p, f in zip(spec.shapes, order)]
        hits = sum(bool(v) for m in per_shape for v in m.values())
        if hits > best_hits:
            best, best_hits = per_shape, hits
    result: dict[str, bool | None] = {}
    for attribute in ("color", "shape", "position", "size", "style"):
        values = [m[attribute] for m in best if m[attribute] is not None]
        result[attribute] = all(values) if values else None
    result["background"] = reading.background == spec.background if spec.background else None
    result["count"] = len(reading.shapes) == len(spec.shapes)
    result["all"] = all(v for k, v in result.items() if v is not None and k != "count")
    return result
