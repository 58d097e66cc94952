"""The synthetic shapes world the embedded `default` model is trained on, and its scorer.

world.py draws seeded scenes, captions.py writes and parses their one caption grammar,
scorer.py reads images back into attributes without learned weights.
"""

from sdserve.models.shapes.captions import (
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
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZES,
    SceneSpec,
    ShapeSpec,
    foreground_mask,
    render,
    sample_scene,
)

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "KINDS",
    "PALETTE",
    "POSITIONS",
    "SIZES",
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
