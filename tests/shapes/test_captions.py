import numpy as np
import pytest

from sdserve.models.shapes import (
    WORDS,
    PromptSpec,
    ShapePrompt,
    caption,
    describe,
    full_spec,
    parse_caption,
    sample_scene,
    to_caption,
)
from sdserve.models.tokenizer import write_clip_tokenizer


def test_example_caption_parses():
    spec = parse_caption(
        "a small red circle on the left and a large blue square on the right on a white background"
    )
    assert spec == PromptSpec(
        (ShapePrompt("red", "circle", "small", "left"), ShapePrompt("blue", "square", "large", "right")),
        "white",
    )
    assert parse_caption("a green triangle") == PromptSpec((ShapePrompt("green", "triangle"),), None)


def test_round_trip_full_and_partial():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene)) == full_spec(scene)
        partial = describe(scene, rng, p_size=0.5, p_position=0.5, p_background=0.5)
        assert parse_caption(to_caption(partial)) == partial


@pytest.mark.parametrize(
    "text",
    ["a red", "red circle", "a pink circle", "a red circle on the middle", "a red circle on a red", ""],
)
def test_text_outside_grammar_is_refused(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_every_word_is_one_token(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path, WORDS)
    rng = np.random.default_rng(0)
    text = caption(sample_scene(rng, num_shapes=2))
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.split()) + 2  # BOS + one token per word + EOS
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
