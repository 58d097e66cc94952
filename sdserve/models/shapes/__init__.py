"""The synthetic shapes world the embedded `default` model is trained on, and its scorer.

world.py draws seeded scenes, captions.py writes and parses their one caption grammar,
scorer.py reads images back into attributes without learned weights. The base vocabulary
(KINDS, COLORS, WORDS) is what the default model knows; ALL_KINDS, ALL_COLORS, STYLES and
EXTRA_WORDS add what adapters teach it (star, teal, outlined).
"""

from sdserve.models.shapes.captions import (
    EXTRA_WORDS,
    WORDS,
    PromptSpec,
    ShapePrompt,
    caption,
    describe,
    full_spec,
    parse_caption,
    to_caption,
)
from sdserve.models.shapes.scorer import ATTRIBUTES, FoundShape, Reading, read_image, score
from sdserve.models.shapes.world import (
    ALL_COLORS,
    ALL_KINDS,
    COLORS,
    EXTRA_COLORS,
    EXTRA_KINDS,
    FULL_PALETTE,
    HELD_OUT,
    IMAGE_SIZE,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZES,
    STYLES,
    SceneSpec,
    ShapeSpec,
    foreground_mask,
    render,
    sample_scene,
)

__all__ = [
    "ALL_COLORS",
    "ALL_KINDS",
    "ATTRIBUTES",
    "COLORS",
    "EXTRA_COLORS",
    "EXTRA_KINDS",
    "EXTRA_WORDS",
    "FULL_PALETTE",
    "HELD_OUT",
    "IMAGE_SIZE",
    "KINDS",
    "PALETTE",
    "POSITIONS",
    "SIZES",
    "STYLES",
    "WORDS",
    "FoundShape",
    "PromptSpec",
    "Reading",
    "SceneSpec",
    "ShapePrompt",
    "ShapeSpec",
    "caption",
    "describe",
    "foreground_mask",
    "full_spec",
    "parse_caption",
    "read_image",
    "render",
    "sample_scene",
    "score",
    "to_caption",
]
