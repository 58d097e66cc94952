"""The slider-compose bench row's measures (bench/trainers.py): `warmth` and `effect_ratio`."""

from __future__ import annotations

import math

import numpy as np

from bench.trainers import effect_ratio, warmth
from sdserve.models.shapes.world import PALETTE


def scene(shape: str, background: str, side: int = 20) -> np.ndarray:
    """uint8 [64, 64, 3]: a `side`-px square of palette colour `shape` on `background`."""
    image = np.empty((64, 64, 3), np.uint8)
    image[:] = PALETTE[background]
    image[10 : 10 + side, 20 : 20 + side] = PALETTE[shape]
    return image


def test_warmth_reads_the_shape_not_the_background() -> None:
    # R - B of the palette colour of the square, whatever the background around it.
    assert warmth(scene("red", "white")) == 225 - 30
    assert warmth(scene("red", "black")) == 225 - 30
    assert warmth(scene("blue", "yellow")) == 30 - 230
    assert warmth(scene("white", "green")) == 0


def test_warmth_follows_a_colour_between_palette_colours() -> None:
    image = scene("red", "white").astype(np.float32)
    image[10:30, 20:40] = (180, 40, 100)  # a red pushed toward blue: no palette colour
    assert warmth(image.astype(np.uint8)) == 80


def test_warmth_is_nan_where_no_shape_stands_out() -> None:
    assert math.isnan(warmth(scene("white", "white")))  # merged into the background
    assert math.isnan(warmth(scene("red", "white", side=5)))  # 25 px: under the scorer's minimum area
    near_white = scene("white", "white").astype(np.float32)
    near_white[10:30, 20:40] = (245, 215, 215)  # 42 from the background: not the shape's
    assert math.isnan(warmth(near_white.astype(np.uint8)))


def test_effect_ratio_is_a_ratio_of_mean_changes_over_the_measured_pairs() -> None:
    base = np.array([100.0, 200.0, 300.0, np.nan])
    alone = np.array([150.0, 260.0, 340.0, 500.0])
    combined = np.array([140.0, 250.0, np.nan, 500.0])
    together, single, ratio, used = effect_ratio(combined, alone, base)
    # Pairs 2 (combined NaN) and 3 (base NaN) drop out: changes (40 + 50) / 2 against (50 + 60) / 2.
    assert used == 2
    assert together == 45.0 and single == 55.0
    assert ratio == 45.0 / 55.0


def test_effect_ratio_without_an_effect_alone_or_any_pair_is_nan() -> None:
    flat = np.array([1.0, 2.0])
    assert math.isnan(effect_ratio(flat + 1, flat, flat)[2])  # alone moves nothing: no ratio
    assert effect_ratio(flat, flat, np.array([np.nan, np.nan]))[3] == 0


def test_the_late_start_reads_the_scales_a_slider_was_trained_on(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from bench.trainers import _trained_scales

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.ones(4, 32), f"{key}.lora_up.weight": torch.ones(32, 4)}
    for written, ends in (("-1,1", (-1.0, 1.0)), ("-2,-1,0,1,2", (-2.0, 2.0))):
        path = tmp_path / "slider.safetensors"
        save_file(tensors, str(path), {"sdserve_slider": "true", "sdserve_slider_scale_range": written})
        assert _trained_scales(path) == ends
