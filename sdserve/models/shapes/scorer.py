"""Read a shapes image back into attributes, with no learned weights.

Pixels snap to the nearest palette colour; the background is the commonest colour on the
border; every other colour splits into 4-connected components; geometry names each component:
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
from sdserve.models.shapes.world import COLORS, PALETTE, position_of, size_of

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "size", "background")
MIN_AREA = 30  # px; a 12 px triangle, the smallest shape drawn, covers ~75
MIN_FILL = 0.3  # of the bounding box; rings and slivers of edge colour fall below
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [8, 3]


@dataclass(frozen=True)
class FoundShape:
    color: str
    kind: str
    size: str
    position: str
    extent: int  # max(bbox width, bbox height), px
    box_center: tuple[float, float]  # (x, y) of the bounding box centre
    centroid: tuple[float, float]  # (x, y) centre of mass
    area: int
    fill: float  # area / bbox area


@dataclass(frozen=True)
class Reading:
    background: str
    shapes: tuple[FoundShape, ...]  # largest first


def palette_labels(image: np.ndarray) -> np.ndarray:
    """[H, W] int index into COLORS of each pixel's nearest palette colour (RGB distance)."""
    pixels = image.astype(np.float32)[..., None, :]  # [H, W, 1, 3]
    return np.argmin(((pixels - _PALETTE_RGB) ** 2).sum(-1), axis=-1)


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


def classify_kind(mask: np.ndarray) -> str:
    """'circle' | 'square' | 'triangle' for a boolean mask cropped to its bounding box."""
    height, width = mask.shape
    area = mask.sum()
    fill = area / (height * width)
    top_fraction = mask[: height // 2].sum() / area if height > 1 else 0.5
    if top_fraction < 0.38 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def read_image(image: np.ndarray) -> Reading:
    """Shapes found in a uint8 [H, W, 3] image, and its background colour."""
    labels = palette_labels(image)
    size = image.shape[0]
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(COLORS)).argmax())
    comp = connected_components(labels, background)
    ids, areas = np.unique(comp[comp >= 0], return_counts=True)
    found = []
    for comp_id, area in zip(ids, areas):
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(comp == comp_id)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        fill = area / ((y1 - y0) * (x1 - x0))
        if fill < MIN_FILL:
            continue
        crop = comp[y0:y1, x0:x1] == comp_id
        extent = int(max(y1 - y0, x1 - x0))
        box_center = ((x0 + x1) / 2, (y0 + y1) / 2)
        found.append(
            FoundShape(
                color=COLORS[labels[ys[0], xs[0]]],
                kind=classify_kind(crop),
                size=size_of(extent),
                position=position_of(*box_center, size=size),
                extent=extent,
                box_center=box_center,
                centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                area=int(area),
                fill=float(fill),
            )
        )
    found.sort(key=lambda s: -s.area)
    return Reading(COLORS[background], tuple(found))


def _matches(prompt: ShapePrompt, found: FoundShape | None) -> dict[str, bool | None]:
    if found is None:
        return {
            "color": False,
            "shape": False,
            "size": False if prompt.size else None,
            "position": False if prompt.position else None,
        }
    return {
        "color": found.color == prompt.color,
        "shape": found.kind == prompt.kind,
        "size": found.size == prompt.size if prompt.size else None,
        "position": found.position == prompt.position if prompt.position else None,
    }


def score(spec: PromptSpec, image: np.ndarray) -> dict[str, bool | None]:
    """Per-attribute correctness of `image` against a prompt; None where the prompt is silent.

    The prompt's K shapes are matched to the K largest shapes found (fewer found: the rest
    count as missing), choosing the pairing that satisfies most attributes; an attribute is
    right when it is right for every prompted shape. "count" says whether exactly K shapes
    were found; "all" whether every scored attribute is right.
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
    for attribute in ("color", "shape", "position", "size"):
        values = [m[attribute] for m in best if m[attribute] is not None]
        result[attribute] = all(values) if values else None
    result["background"] = reading.background == spec.background if spec.background else None
    result["count"] = len(reading.shapes) == len(spec.shapes)
    result["all"] = all(v for k, v in result.items() if v is not None and k != "count")
    return result
