"""Captions of shapes scenes: one grammar, written and parsed.

    caption  := shape [" and " shape] [" on a " COLOR " background"]
    shape    := "a " [STYLE " "] [SIZE " "] COLOR " " KIND [" " PLACE]
    STYLE    := outlined
    SIZE     := small | large
    COLOR    := red | green | blue | yellow | purple | orange | white | black | teal
    KIND     := circle | square | triangle | star
    PLACE    := on the left | on the right | at the top | at the bottom | in the center

Every optional part is independent: a shape may name its size and place or not, and the
background phrase, which closes the caption, belongs to the whole scene. Two-shape captions list
shapes left-to-right (then top-to-bottom), the order `world.sample_scene` gives them. The
phrases never share a prefix ambiguously ("on the ..." is a place, "on a ..." the background),
so one regular expression parses the language. The article is always "a" (also before
"orange"): one spelling per meaning keeps the vocabulary and the parser exact.

Training drops each optional part with some probability (`describe`), so a prompt that leaves
an attribute out is in-distribution; the scorer scores only what a prompt names.

"teal", "star" and "outlined" (EXTRA_WORDS) are outside the base vocabulary WORDS on purpose:
the default model's tokenizer spells them in characters, and adapters learn what they mean.
"Filled" is never written: a caption without "outlined" leaves the style open, as the base
model's captions always did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdserve.models.shapes.world import (
    ALL_COLORS,
    ALL_KINDS,
    COLORS,
    EXTRA_COLORS,
    EXTRA_KINDS,
    KINDS,
    SIZES,
    SceneSpec,
)

PLACE_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_PHRASE_PLACE = {phrase: place for place, phrase in PLACE_PHRASE.items()}

WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "and", "on", "the", "at", "in", "background"]
        + list(SIZES)
        + list(COLORS)
        + list(KINDS)
        + [w for phrase in PLACE_PHRASE.values() for w in phrase.split()]
    )
)
"""Every word of the base grammar; `write_clip_tokenizer(dir, WORDS)` makes each one token.

The default model's tokenizer is built from it, so it must not grow: see EXTRA_WORDS."""

OUTLINED = "outlined"  # the one style word; "filled" is the unwritten default
EXTRA_WORDS: tuple[str, ...] = (OUTLINED, *EXTRA_KINDS, *EXTRA_COLORS)
"""Words of the full grammar that WORDS leaves out (the default model has never seen them)."""


@dataclass(frozen=True)
class ShapePrompt:
    """What a caption asks of one shape; None means the caption leaves it open."""

    color: str
    kind: str
    size: str | None = None
    position: str | None = None
    style: str | None = None  # "outlined" | "filled"; captions only ever say "outlined"


@dataclass(frozen=True)
class PromptSpec:
    shapes: tuple[ShapePrompt, ...]
    background: str | None = None


def _written_style(style: str) -> str | None:
    return OUTLINED if style == OUTLINED else None


def full_spec(scene: SceneSpec) -> PromptSpec:
    """The spec naming every attribute a caption can name (so `parse_caption(caption(s))` equals it).

    A filled shape's style stays None, as no caption says "filled"; to score filledness, replace
    it with "filled".
    """
    return PromptSpec(
        tuple(ShapePrompt(s.color, s.kind, s.size, s.position, _written_style(s.style)) for s in scene.shapes),
        scene.background,
    )


def describe(
    scene: SceneSpec,
    rng: np.random.Generator,
    p_size: float = 0.8,
    p_position: float = 0.8,
    p_background: float = 0.8,
) -> PromptSpec:
    """A spec of the scene with each optional attribute kept with its probability.

    The style word is always kept and costs no rng draw: dropping it would caption outlined
    shapes as plain ones, and drawing for it would shift the base model's seeded caption stream.
    """
    shapes = tuple(
        ShapePrompt(
            s.color,
            s.kind,
            s.size if rng.random() < p_size else None,
            s.position if rng.random() < p_position else None,
            _written_style(s.style),
        )
        for s in scene.shapes
    )
    return PromptSpec(shapes, scene.background if rng.random() < p_background else None)


def to_caption(spec: PromptSpec) -> str:
    phrases = []
    for shape in spec.shapes:
        words = ["a"] + ([OUTLINED] if shape.style == OUTLINED else [])
        words += ([shape.size] if shape.size else []) + [shape.color, shape.kind]
        if shape.position:
            words.append(PLACE_PHRASE[shape.position])
        phrases.append(" ".join(words))
    text = " and ".join(phrases)
    if spec.background:
        text += f" on a {spec.background} background"
    return text


def caption(scene: SceneSpec, rng: np.random.Generator | None = None) -> str:
    """The scene's caption: complete without `rng`, with parts dropped at random with one."""
    return to_caption(full_spec(scene) if rng is None else describe(scene, rng))


_COLOR = "|".join(ALL_COLORS)
_SHAPE = (
    rf"a (?:({OUTLINED}) )?(?:({'|'.join(SIZES)}) )?({_COLOR}) ({'|'.join(ALL_KINDS)})"
    rf"(?: ({'|'.join(re.escape(p) for p in PLACE_PHRASE.values())}))?"
)
_CAPTION = re.compile(rf"^{_SHAPE}(?: and {_SHAPE})?(?: on a ({_COLOR}) background)?$")


def parse_caption(text: str) -> PromptSpec:
    """Caption -> spec; raises ValueError for text outside the grammar."""
    match = _CAPTION.match(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    groups = match.groups()
    shapes = []
    for offset in (0, 5):
        style, size, color, kind, place = groups[offset : offset + 5]
        if color is not None:
            shapes.append(ShapePrompt(color, kind, size, _PHRASE_PLACE[place] if place else None, style))
    return PromptSpec(tuple(shapes), groups[10])
