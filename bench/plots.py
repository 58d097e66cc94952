"""PNG line charts for the bench results, drawn with PIL alone (no plotting library needed).

    from bench.plots import line_chart
    line_chart(Path("cdf.png"), "latency CDF", "seconds", "fraction", {"sdserve": [(0.1, 0.5), ...]})
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Series = dict[str, list[tuple[float, float]]]

# Okabe-Ito then Tol's muted: distinguishable on white and for common colour-vision deficiencies;
# twelve, so a 3-system × 3-load chart repeats none.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255",
           "#44AA99", "#332288", "#999933", "#888888")
WIDTH, HEIGHT = 880, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 220, 50, 60


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round-numbered ticks covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 2) if first + i * step <= high + step * 0.5]


def _label(value: float) -> str:
    return f"{value:.3g}"


def line_chart(path: Path, title: str, x_label: str, y_label: str, series: Series, *, log_x: bool = False,
               markers: bool = True) -> Path:
    """Draw `series` (name -> points) as lines on shared axes; write a PNG at `path`."""
    points = [p for values in series.values() for p in values if math.isfinite(p[0]) and math.isfinite(p[1])]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((LEFT, 15), title, fill="black", font=font)
    if not points:
        draw.text((LEFT, HEIGHT // 2), "no data", fill="black", font=font)
        image.save(path)
        return path

    def fx(x: float) -> float:
        return math.log10(max(x, 1e-9)) if log_x else x

    xs, ys = [fx(p[0]) for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(0.0, min(ys)), max(ys) * 1.05 or 1.0
    if x_high == x_low:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    x_ticks = [t for t in _ticks(x_low, x_high) if x_low <= t <= x_high] or [x_low, x_high]
    y_ticks = _ticks(y_low, y_high)
    y_high = max(y_high, y_ticks[-1])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (LEFT + (fx(x) - x_low) / (x_high - x_low) * plot_w, TOP + plot_h - (y - y_low) / (y_high - y_low) * plot_h)

    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline="black")
    for tick in y_ticks:
        _, py = to_px(10**x_low if log_x else x_low, tick)
        if TOP <= py <= TOP + plot_h:
            draw.line([LEFT, py, LEFT + plot_w, py], fill="#e5e5e5")
            draw.text((LEFT - 8, py), _label(tick), fill="black", font=font, anchor="rm")
    for tick in x_ticks:
        px = LEFT + (tick - x_low) / (x_high - x_low) * plot_w
        draw.line([px, TOP, px, TOP + plot_h], fill="#e5e5e5")
        draw.text((px, TOP + plot_h + 6), _label(10**tick if log_x else tick), fill="black", font=font, anchor="ma")
    draw.text((LEFT + plot_w / 2, HEIGHT - 20), x_label + (" (log scale)" if log_x else ""), fill="black",
              font=font, anchor="ma")
    draw.text((10, TOP - 18), y_label, fill="black", font=font)
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(values) if math.isfinite(x) and math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        if markers and len(pixels) < 40:
            for px, py in pixels:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_y = TOP + 10 + 18 * index
        draw.line([WIDTH - RIGHT + 15, legend_y, WIDTH - RIGHT + 40, legend_y], fill=colour, width=3)
        draw.text((WIDTH - RIGHT + 46, legend_y), name, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def cdf_points(values: list[float], max_points: int = 400) -> list[tuple[float, float]]:
    """(value, fraction of values <= it), thinned to at most `max_points`."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return []
    stride = max(1, n // max_points)
    points = [(ordered[i], (i + 1) / n) for i in range(0, n, stride)]
    if points[-1][1] != 1.0:
        points.append((ordered[-1], 1.0))
    return points
