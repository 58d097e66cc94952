"""The grammar's new words (outlined, star, teal): written, parsed, and kept out of WORDS."""

import numpy as np
import pytest

from sdserve.models.shapes import WORDS, PromptSpec, ShapePrompt, caption, describe, full_spec, parse_caption
from sdserve.models.shapes.captions import EXTRA_WORDS, to_caption
from sdserve.models.shapes.world import ALL_COLORS, ALL_KINDS, STYLES, sample_scene
from sdserve.models.tokenizer import write_clip_tokenizer

# The base vocabulary as the default model's tokenizer was built from it; it must never grow.
BASE_WORDS = (
    "a", "and", "on", "the", "at", "in", "background", "small", "large",
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
    "circle", "square", "triangle", "left", "right", "top", "bottom", "center",
)

EXTRAS = {"kinds": ALL_KINDS, "colors": ALL_COLORS, "backgrounds": ALL_COLORS, "styles": STYLES}


def test_base_vocabulary_is_unchanged_and_extras_are_outside_it():
    assert WORDS == BASE_WORDS
    assert set(EXTRA_WORDS) == {"outlined", "star", "teal"} and not set(EXTRA_WORDS) & set(WORDS)


def test_examples_parse():
    text = "a outlined large teal star on the left and a small red circle at the bottom on a teal background"
    assert parse_caption(text) == PromptSpec(
        (ShapePrompt("teal", "star", "large", "left", "outlined"), ShapePrompt("red", "circle", "small", "bottom")),
        "teal",
    )
    assert parse_caption("a outlined blue square") == PromptSpec((ShapePrompt("blue", "square", style="outlined"),))
    assert to_caption(PromptSpec((ShapePrompt("teal", "star", "small", None, "filled"),))) == "a small teal star"


@pytest.mark.parametrize(
    "text", ["a large outlined red star", "a filled red star", "a outlined red", "an outlined red star", "a red stars"]
)
def test_text_outside_the_grammar_is_refused(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_round_trip_with_extras():
    rng = np.random.default_rng(1)
    styles_seen = set()
    for _ in range(500):
        scene = sample_scene(rng, **EXTRAS)
        spec = full_spec(scene)
        assert parse_caption(caption(scene)) == spec
        partial = describe(scene, rng, p_size=0.5, p_position=0.5, p_background=0.5)
        assert parse_caption(to_caption(partial)) == partial
        # The style word is never dropped: outlined shapes always say so, filled ones never do.
        for shape, prompt in zip(scene.shapes, partial.shapes):
            assert prompt.style == ("outlined" if shape.style == "outlined" else None)
            styles_seen.add(shape.style)
    assert styles_seen == set(STYLES)


def test_new_words_are_spelled_out_by_the_base_tokenizer(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path, WORDS)
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    for word in EXTRA_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) > 1, word
