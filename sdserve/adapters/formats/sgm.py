"""SDXL's original-model ("sgm"/LDM) UNet module names, mapped onto diffusers module paths.

kohya sd-scripts trains SDXL on the original UNet, so SDXL kohya LoRAs name modules like
"input_blocks.4.1.transformer_blocks.0.attn1.to_q" where diffusers says
"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q". The map is derived from the
diffusers module paths of the actual base model (how many resnets each block holds, which blocks
have attentions and samplers), so it needs no config and fits any block layout:

    input_blocks.0.0                  conv_in
    input_blocks.<i>.0 / .1           down_blocks.<b>.resnets.<l> / attentions.<l>, i counted from 1
    input_blocks.<i>.0.op             down_blocks.<b>.downsamplers.0.conv (its own index i)
    middle_block.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.<o>.0 / .1          up_blocks.<b>.resnets.<l> / attentions.<l>, o counted from 0
    output_blocks.<o>.1|2.conv        up_blocks.<b>.upsamplers.0.conv (2 when the block has attentions)
    time_embed.0 / .2                 time_embedding.linear_1 / linear_2
    label_emb.0.0 / .2                add_embedding.linear_1 / linear_2
    out.2                             conv_out
    ResBlock in_layers.2 / emb_layers.1 / out_layers.3 / skip_connection
                                      conv1 / time_emb_proj / conv2 / conv_shortcut
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_RESNET_PARTS = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet_inner(rest: str) -> str | None:
    return _RESNET_PARTS.get(rest)


def sgm_aliases(unet_paths: Iterable[str]) -> dict[str, str]:
    """sgm module path -> diffusers module path, for the given diffusers UNet module paths."""
    paths = list(unet_paths)
    resnet_count: dict[tuple[str, int], int] = {}
    has_attentions: set[tuple[str, int]] = set()
    has_sampler: set[tuple[str, int]] = set()
    for path in paths:
        match = _BLOCK.fullmatch(path)
        if not match:
            continue
        side, block, part, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if part == "resnets":
            resnet_count[(side, block)] = max(resnet_count.get((side, block), 0), index + 1)
        elif part == "attentions":
            has_attentions.add((side, block))
        else:
            has_sampler.add((side, block))

    # Walk the blocks in order, numbering sgm rows the way the original UNet builds them.
    input_row: dict[tuple[int, int], int] = {}  # (block, layer) -> input_blocks index
    downsampler_row: dict[int, int] = {}
    row = 1
    for block in sorted(b for side, b in resnet_count if side == "down_blocks"):
        for layer in range(resnet_count[("down_blocks", block)]):
            input_row[(block, layer)] = row
            row += 1
        if ("down_blocks", block) in has_sampler:
            downsampler_row[block] = row
            row += 1
    output_row: dict[tuple[int, int], int] = {}
    row = 0
    for block in sorted(b for side, b in resnet_count if side == "up_blocks"):
        for layer in range(resnet_count[("up_blocks", block)]):
            output_row[(block, layer)] = row
            row += 1

    aliases: dict[str, str] = {}
    for path in paths:
        sgm = _to_sgm(path, input_row, downsampler_row, output_row, resnet_count, has_attentions)
        if sgm is not None:
            aliases[sgm] = path
    return aliases


def _to_sgm(
    path: str,
    input_row: dict[tuple[int, int], int],
    downsampler_row: dict[int, int],
    output_row: dict[tuple[int, int], int],
    resnet_count: dict[tuple[str, int], int],
    has_attentions: set[tuple[str, int]],
) -> str | None:
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    match = _MID.fullmatch(path)
    if match:
        part, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}" if index == 0 else None
        inner = _resnet_inner(rest)
        return f"middle_block.{0 if index == 0 else 2}.{inner}" if inner and index < 2 else None
    match = _BLOCK.fullmatch(path)
    if not match:
        return None
    side, block, part, index, rest = (
        match.group(1),
        int(match.group(2)),
        match.group(3),
        int(match.group(4)),
        match.group(5),
    )
    if side == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{downsampler_row[block]}.0.op" if rest == "conv" else None
        row = input_row.get((block, index))
        if row is None:
            return None
        if part == "attentions":
            return f"input_blocks.{row}.1.{rest}"
        inner = _resnet_inner(rest)
        return f"input_blocks.{row}.0.{inner}" if inner else None
    if part == "upsamplers":
        last = output_row.get((block, resnet_count[(side, block)] - 1))
        slot = 2 if (side, block) in has_attentions else 1
        return f"output_blocks.{last}.{slot}.conv" if rest == "conv" and last is not None else None
    row = output_row.get((block, index))
    if row is None:
        return None
    if part == "attentions":
        return f"output_blocks.{row}.1.{rest}"
    inner = _resnet_inner(rest)
    return f"output_blocks.{row}.0.{inner}" if inner else None
