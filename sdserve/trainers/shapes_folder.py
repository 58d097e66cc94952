"""Captioned training folders drawn from the shapes world, for adapter trainers and their benches.

The base model's own data is an endless in-memory stream (shapes_data.py); adapters train from
folders, as users' trainers do, so this writes the shapes world in the two layouts
`trainers/data.py` reads: kohya's `NAME.png` + `NAME.txt`, or diffusers' imagefolder
`metadata.jsonl` of `{"file_name", "text"}` lines. Narrowing the vocabulary (only stars, only
teal, only outlined shapes, ...) makes a folder that teaches one thing the default model cannot
draw; `exclude` holds (color, kind, position) triples out so a bench can score prompts the
adapter never saw.

Image i is drawn from `np.random.default_rng([seed, i])`, so a folder is a pure function of its
config and a larger count only appends images. The folder is built in a temporary sibling and
renamed into place: it appears whole or not at all. Beside the images, `PROVENANCE_FILE` (a dot
file, which both layouts' readers skip) records the config and every image's scene, the ground
truth a bench scores against.

With `pairs` ("size" or "background") it writes before/after pairs for a visual Concept Slider
(`sdserve train slider --pairs`) instead: `before/NAME.png` with its caption `before/NAME.txt`,
and `after/NAME.png`, the same one-shape scene (kind, colour, background, position and jitter
from the same rng draw) with one attribute changed. For "size" the before shape is 9-13 px
(smaller than the world's small) and the after shape three times that, 27-39 px (larger than
its large; PAIR_SHRINK, PAIR_GROWTH), re-clamped inside the image as `world._place` clamps;
captions name no size (the slider decides it). Size
was chosen over sharp/rounded corners because the default model draws both sizes for an unsized
prompt, so the base model sits between the two ends and the slider's negative scales have
somewhere to go; with corners the base model's sharp squares are one end already, scales -2..0
would all read "sharp", and the ties would cap a per-prompt Spearman rho near 0.8.

For "background" (brightness) the before scene has a black background and the after scene is the
same scene on white (BRIGHTNESS_ENDS); the shape's colour is never black or white, so it shows on
both, and captions name no background. The issue's own example of a second slider; the text
trainer cannot make it (it writes its words on the shape, never in the background phrase).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from sdserve.errors import InvalidArgument
from sdserve.models.shapes.captions import PromptSpec, full_spec, to_caption
from sdserve.models.shapes.world import (
    ALL_COLORS,
    ALL_KINDS,
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    KINDS,
    POSITIONS,
    SIZES,
    STYLES,
    SceneSpec,
    foreground_mask,
    render,
    sample_scene,
    size_of,
)

LAYOUTS: tuple[str, ...] = ("kohya", "imagefolder")
CONDITIONINGS: tuple[str, ...] = ("mask",)
CONDITIONING_DIR = "conditioning"  # beside the images: the readers of both layouts list only the top level
METADATA_FILE = "metadata.jsonl"  # the diffusers imagefolder caption file
PROVENANCE_FILE = ".sdserve_shapes.json"
HELD_OUT_WORD = "held-out"  # in `exclude` text: the base world's HELD_OUT triples
PAIR_ATTRIBUTES: tuple[str, ...] = ("size", "background")
BRIGHTNESS_ENDS = ("black", "white")  # background pairs: before, after
PAIR_SIDES = ("before", "after")
# Size pairs: before 9-13 px (the world's small 12-16, less 3), after 3x that, 27-39 px. Both ends
# lie beyond the world's own sizes (small 12-16, large 24-32), which the default model draws for
# an unsized prompt: trained at +-2, the slider's scales +-1 then fall between the model's own
# sizes and +-2 beyond them. With the world's own small -> large (12-16 -> 24-32) scales +-1 and
# +-2 both drew the model's small or large and their order was a coin flip (docs/benchmarks.md).
# A 9 px triangle still paints 40 px, above the scorer's MIN_AREA of 30.
PAIR_SHRINK, PAIR_GROWTH = 3, 3
PROGRESS_MIN_COUNT = 200  # fewer images take about a second; a bar would only flash


@dataclass(frozen=True)
class ShapesFolderConfig:
    """One folder of captioned shapes images; each field mirrors the `sdserve train data shapes` flag."""

    out: Path
    """Directory to create. An existing one must be empty, or written by this module and `overwrite` set."""
    count: int
    """Number of images."""
    seed: int = 0
    """Image i is drawn from rng([seed, i]): the same seed gives the same bytes."""
    kinds: tuple[str, ...] = KINDS
    """Shape kinds drawn from, uniformly (ALL_KINDS: the base three and "star")."""
    colors: tuple[str, ...] = COLORS
    """Shape colours drawn from (ALL_COLORS: the base eight and "teal"); never the background's."""
    backgrounds: tuple[str, ...] = COLORS
    """Background colours drawn from."""
    positions: tuple[str, ...] = POSITIONS
    """Anchors drawn from; two shapes in one image take two different ones."""
    sizes: tuple[str, ...] = SIZES
    """"small" (12-16 px) and/or "large" (24-32 px)."""
    styles: tuple[str, ...] = ("filled",)
    """"filled" and/or "outlined"; captions say "outlined", never "filled"."""
    shapes_per_image: int | None = None
    """1 or 2; None draws 1 (60 %) or 2 as the base world does."""
    exclude: frozenset[tuple[str, str, str]] = field(default_factory=frozenset)
    """(color, kind, position) triples no image contains."""
    token: str | None = None
    """Written instead of the kind word in every caption (DreamBooth's "a large blue sks ...")."""
    layout: str = "kohya"
    """"kohya" (NAME.png + NAME.txt) or "imagefolder" (metadata.jsonl)."""
    conditioning: str | None = None
    """"mask": also write each scene's shape mask (white shapes on black, the image's size) as
    conditioning/NAME.png and list it as metadata.jsonl's conditioning_file_name (diffusers'
    ControlNet layout; needs the imagefolder layout)."""
    omit_position: bool = False
    """Captions name no shape's position (what a ControlNet's mask is then left to decide)."""
    omit_size: bool = False
    """Captions name no shape's size: for an adapter used with prompts that leave the size open,
    e.g. a brightness slider composed with a size slider, which then sets it."""
    resolution: int = IMAGE_SIZE
    """Side of the written images: a multiple of 64, the 64 px scene upscaled nearest-neighbour."""
    pairs: str | None = None
    """"size" or "background": write before/after pairs of one-shape scenes differing in that attribute alone (see
    the module docstring) for `sdserve train slider --pairs`; kohya captions in before/, no mask."""
    overwrite: bool = False
    """Replace `out` when it is a non-empty folder this module wrote."""
    progress: bool = True
    """Show a progress bar for large counts."""


def parse_exclude(text: str) -> frozenset[tuple[str, str, str]]:
    """"red,star,left;blue,circle,top" (or "held-out" among them) -> (color, kind, position) triples."""
    triples: set[tuple[str, str, str]] = set()
    for item in filter(None, (part.strip() for part in text.split(";"))):
        if item == HELD_OUT_WORD:
            triples |= HELD_OUT
            continue
        parts = tuple(p.strip() for p in item.split(","))
        if len(parts) != 3:
            raise InvalidArgument(f"{item!r} is not color,kind,position (or {HELD_OUT_WORD!r})", field="--exclude")
        color, kind, position = parts
        for value, allowed, what in ((color, ALL_COLORS, "colour"), (kind, ALL_KINDS, "kind"),
                                     (position, POSITIONS, "position")):
            if value not in allowed:
                raise InvalidArgument(f"unknown {what} {value!r} in {item!r} (one of {', '.join(allowed)})",
                                      field="--exclude")
        triples.add((color, kind, position))
    return frozenset(triples)


def check_shapes_folder_config(cfg: ShapesFolderConfig) -> None:
    """Refuse a config that cannot be written, naming the flag; before anything touches the disk."""
    if cfg.count < 1:
        raise InvalidArgument(f"must be at least 1 (got {cfg.count})", field="--count")
    for flag, values, allowed in (("--kinds", cfg.kinds, ALL_KINDS), ("--colors", cfg.colors, ALL_COLORS),
                                  ("--backgrounds", cfg.backgrounds, ALL_COLORS),
                                  ("--positions", cfg.positions, POSITIONS), ("--sizes", cfg.sizes, SIZES),
                                  ("--styles", cfg.styles, STYLES)):
        if not values:
            raise InvalidArgument(f"needs at least one of {', '.join(allowed)}", field=flag)
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise InvalidArgument(f"unknown {unknown[0]!r} (one of {', '.join(allowed)})", field=flag)
        if len(set(values)) != len(values):
            raise InvalidArgument("lists a value twice (values are drawn uniformly)", field=flag)
    if cfg.shapes_per_image not in (None, 1, 2):
        raise InvalidArgument(f"must be 1 or 2 (got {cfg.shapes_per_image})", field="--shapes-per-image")
    if cfg.shapes_per_image != 1 and len(cfg.positions) < 2:
        raise InvalidArgument("two-shape images need two positions; give more, or --shapes-per-image 1",
                              field="--positions")
    if all(set(cfg.colors) <= {background} for background in cfg.backgrounds):
        raise InvalidArgument("every shape colour equals every background; shapes would be invisible",
                              field="--colors")
    if cfg.layout not in LAYOUTS:
        raise InvalidArgument(f"unknown layout {cfg.layout!r} (one of {', '.join(LAYOUTS)})", field="--layout")
    if cfg.conditioning is not None:
        if cfg.conditioning not in CONDITIONINGS:
            raise InvalidArgument(f"unknown conditioning {cfg.conditioning!r} (one of {', '.join(CONDITIONINGS)})",
                                  field="--conditioning")
        if cfg.layout != "imagefolder":
            raise InvalidArgument("conditioning images are listed in metadata.jsonl: use --layout imagefolder",
                                  field="--conditioning")
    if cfg.resolution < IMAGE_SIZE or cfg.resolution % IMAGE_SIZE:
        raise InvalidArgument(f"must be a multiple of {IMAGE_SIZE} (got {cfg.resolution}): scenes are "
                              f"{IMAGE_SIZE} px, upscaled by whole pixels", field="--resolution")
    if cfg.pairs is not None:
        if cfg.pairs not in PAIR_ATTRIBUTES:
            raise InvalidArgument(f"unknown attribute {cfg.pairs!r} (one of {', '.join(PAIR_ATTRIBUTES)})",
                                  field="--pairs")
        if cfg.shapes_per_image == 2:
            raise InvalidArgument("pairs are one-shape scenes (a grown shape could meet the other)",
                                  field="--shapes-per-image")
        if cfg.pairs == "size" and cfg.sizes != SIZES:
            raise InvalidArgument("size pairs draw small before and large after; drop --sizes", field="--sizes")
        if cfg.pairs == "background" and not _pair_colors(cfg):
            raise InvalidArgument(f"background pairs draw on {' and '.join(BRIGHTNESS_ENDS)}, so the shapes need "
                                  "another colour", field="--colors")
        if cfg.conditioning is not None or cfg.layout != "kohya":
            raise InvalidArgument("pairs are written as before/NAME.png + NAME.txt and after/NAME.png",
                                  field="--conditioning" if cfg.conditioning is not None else "--layout")
    if cfg.token is not None and (not cfg.token.strip() or "\n" in cfg.token):
        raise InvalidArgument("must be non-empty text on one line", field="--token")
    try:
        _draw(cfg, 0)  # an exclusion that leaves nothing fails here, not halfway through
    except ValueError:
        raise InvalidArgument("excludes every scene the other flags allow", field="--exclude") from None
    _check_out(cfg)


def _check_out(cfg: ShapesFolderConfig) -> None:
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"{out} exists and is not a directory", field="--out")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InvalidArgument(f"{out} is not empty (add --overwrite to replace a folder this command wrote)",
                                  field="--out")
        if not (out / PROVENANCE_FILE).is_file():
            raise InvalidArgument(f"{out} is not empty and was not written by this command; "
                                  "refusing to delete it", field="--out")


def _draw(cfg: ShapesFolderConfig, index: int) -> SceneSpec:
    if cfg.pairs is not None:
        return _pair(cfg, index)[0]
    return sample_scene(
        np.random.default_rng([cfg.seed, index]),
        num_shapes=cfg.shapes_per_image,
        exclude=cfg.exclude,
        kinds=cfg.kinds,
        colors=cfg.colors,
        backgrounds=cfg.backgrounds,
        positions=cfg.positions,
        sizes=cfg.sizes,
        styles=cfg.styles,
    )


def resized(scene: SceneSpec, extent_of: Callable[[int], int]) -> SceneSpec:
    """The scene with every shape's extent e replaced by extent_of(e) around its own centre,
    re-clamped to keep a 1 px border (world._place's rule); kind, colour, position word (its
    margin holds up to 40 px: the clamp then moves a centre at most 13 px from the image's, and
    the centre rule ends at 8) and background kept."""
    shapes = []
    for shape in scene.shapes:
        extent = extent_of(shape.extent)
        half = extent / 2
        cx = float(np.clip(shape.cx, half + 1, IMAGE_SIZE - half - 1))
        cy = float(np.clip(shape.cy, half + 1, IMAGE_SIZE - half - 1))
        shapes.append(replace(shape, extent=extent, size=size_of(extent), cx=cx, cy=cy))
    return replace(scene, shapes=tuple(shapes))


def _pair_colors(cfg: ShapesFolderConfig) -> tuple[str, ...]:
    """The shape colours a pair may draw: for background pairs none of BRIGHTNESS_ENDS (the shape
    must show on both backgrounds)."""
    if cfg.pairs == "background":
        return tuple(color for color in cfg.colors if color not in BRIGHTNESS_ENDS)
    return cfg.colors


def _pair(cfg: ShapesFolderConfig, index: int) -> tuple[SceneSpec, SceneSpec]:
    """(before, after) scenes of pair `index`, from one draw of rng([seed, index]). Size: a small
    shape shrunk by PAIR_SHRINK px (before), and that scene with the shape PAIR_GROWTH times as large
    (after). Background: the scene on BRIGHTNESS_ENDS[0], then on [1]. See the module docstring."""
    background = cfg.pairs == "background"
    drawn = sample_scene(np.random.default_rng([cfg.seed, index]), num_shapes=1, exclude=cfg.exclude,
                         kinds=cfg.kinds, colors=_pair_colors(cfg),
                         backgrounds=BRIGHTNESS_ENDS[:1] if background else cfg.backgrounds,
                         positions=cfg.positions, sizes=cfg.sizes if background else ("small",), styles=cfg.styles)
    if background:
        return drawn, replace(drawn, background=BRIGHTNESS_ENDS[1])
    before = resized(drawn, lambda extent: extent - PAIR_SHRINK)
    return before, resized(before, lambda extent: extent * PAIR_GROWTH)


def _without(spec: PromptSpec, position: bool, size: bool) -> PromptSpec:
    """The caption spec with no shape's position and/or size named."""
    return replace(spec, shapes=tuple(replace(shape, position=None if position else shape.position,
                                              size=None if size else shape.size) for shape in spec.shapes))


def pair_caption(scene: SceneSpec, attribute: str, omit_position: bool = False, omit_size: bool = False) -> str:
    """A pair's one caption: the scene's, without the attribute the pair changes (and without
    position or size where asked)."""
    spec = _without(full_spec(scene), omit_position, omit_size or attribute == "size")
    return to_caption(replace(spec, background=None) if attribute == "background" else spec)


def scene_caption(scene: SceneSpec, token: str | None = None, omit_position: bool = False,
                  omit_size: bool = False) -> str:
    """The scene's full caption; with `token`, the token stands where each kind word would; with
    `omit_position` / `omit_size`, no shape's place / size is named."""
    spec = _without(full_spec(scene), omit_position, omit_size)
    if token is not None:
        spec = replace(spec, shapes=tuple(replace(shape, kind=token) for shape in spec.shapes))
    return to_caption(spec)


def mask_image(scene: SceneSpec, resolution: int) -> np.ndarray:
    """uint8 [R, R, 3]: the scene's shapes white on black (its ControlNet conditioning image)."""
    mask = foreground_mask(scene).astype(np.uint8) * 255  # [64, 64]
    return upscale(np.repeat(mask[..., None], 3, axis=-1), resolution)


def scene_record(scene: SceneSpec) -> dict:
    """JSON-ready ground truth of a scene (all ShapeSpec fields)."""
    return {"background": scene.background, "shapes": [asdict(shape) for shape in scene.shapes]}


def upscale(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [64, 64, 3] -> [resolution, resolution, 3] by repeating pixels (no new colours)."""
    factor = resolution // image.shape[0]
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def write_shapes_folder(cfg: ShapesFolderConfig) -> Path:
    """Write the folder `cfg` describes and return its path; InvalidArgument (naming the flag) for bad config."""
    from tqdm import tqdm

    check_shapes_folder_config(cfg)
    out = cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the folder is meant to be shared
        width = max(6, len(str(cfg.count - 1)))
        if cfg.conditioning is not None:
            (staging / CONDITIONING_DIR).mkdir()
        records = []
        bar = tqdm(range(cfg.count), desc="writing", unit="img",
                   disable=not cfg.progress or cfg.count < PROGRESS_MIN_COUNT)
        if cfg.pairs is not None:
            for side in PAIR_SIDES:
                (staging / side).mkdir()
        for index in bar:
            if cfg.pairs is not None:
                records.append(_write_pair(cfg, index, staging, width))
                continue
            scene = _draw(cfg, index)
            name = f"{index:0{width}d}"
            text = scene_caption(scene, cfg.token, cfg.omit_position, cfg.omit_size)
            Image.fromarray(upscale(render(scene), cfg.resolution)).save(staging / f"{name}.png")
            if cfg.layout == "kohya":
                (staging / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            record = {"file_name": f"{name}.png", "text": text, "scene": scene_record(scene)}
            if cfg.conditioning is not None:
                record["conditioning_file_name"] = f"{CONDITIONING_DIR}/{name}.png"
                Image.fromarray(mask_image(scene, cfg.resolution)).save(staging / record["conditioning_file_name"])
            records.append(record)
        if cfg.layout == "imagefolder":
            keys = ("file_name", "conditioning_file_name", "text")
            lines = (json.dumps({key: r[key] for key in keys if key in r}) for r in records)
            (staging / METADATA_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        config = {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(cfg).items()}
        config["out"] = str(cfg.out)
        provenance = {"writer": "sdserve.trainers.shapes_folder", "config": config, "images": records}
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1), encoding="utf-8")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_pair(cfg: ShapesFolderConfig, index: int, staging: Path, width: int) -> dict:
    """Write pair `index` (before/NAME.png + NAME.txt, after/NAME.png); -> its provenance record."""
    assert cfg.pairs is not None
    name = f"{index:0{width}d}"
    before, after = _pair(cfg, index)
    text = pair_caption(before, cfg.pairs, cfg.omit_position, cfg.omit_size)
    for side, scene in zip(PAIR_SIDES, (before, after), strict=True):
        Image.fromarray(upscale(render(scene), cfg.resolution)).save(staging / side / f"{name}.png")
    (staging / PAIR_SIDES[0] / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    return {"file_name": f"{name}.png", "text": text, "scene": scene_record(before), "after": scene_record(after)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to `out`; a replaced folder is moved aside first, then deleted."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):  # checked earlier: ours, and overwrite was asked for
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        else:
            out.rmdir()
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_provenance(folder: Path) -> dict:
    """The config and per-image scenes a folder was written with (see PROVENANCE_FILE)."""
    return json.loads((Path(folder) / PROVENANCE_FILE).read_text(encoding="utf-8"))
