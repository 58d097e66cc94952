"""PEFT `rank_pattern`/`alpha_pattern` keys come from an untrusted header: never a regex.

A 16 KB upload with a catastrophic-backtracking pattern, and a module path from the file's own
keys chosen to trigger it, held the GIL for 25+ s under `re.match(rf"(.*\\.)?({P})$", path)`.
Patterns are now module paths matched by dictionary lookup; PEFT's own `get_pattern_key` is the
oracle for every pattern form that PEFT and diffusers write.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import safetensors.torch
import torch
from peft.utils.other import get_pattern_key

from sdserve.adapters import load_lora
from sdserve.adapters.formats.peft import parse_configs
from sdserve.adapters.targets import portable_path
from sdserve.errors import AdapterError
from tests.adapters.lora_factory import peft_file_contents

NAME = "tenant-a/patterns"
# The exponential case of `(x+x+)+y` against "x" * n: about 6 s at n = 28 under the old matcher on
# a loaded 2-core machine (4x per 2 more characters), refused before any matching now.
EVIL_PATTERN = "(x+x+)+y"
EVIL_PATH_LENGTH = 28
FAST_SECONDS = 1.0


def _hostile_file(field: str) -> bytes:
    module = "x" * EVIL_PATH_LENGTH
    tensors = {f"unet.{module}.lora_A.weight": torch.ones(2, 4), f"unet.{module}.lora_B.weight": torch.ones(4, 2)}
    config = {"unet.r": 2, "unet.lora_alpha": 2, f"unet.{field}": {EVIL_PATTERN: 1}}
    return safetensors.torch.save(tensors, metadata={"lora_adapter_metadata": json.dumps(config)})


@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
def test_backtracking_pattern_is_refused_fast(field, sd15_targets):
    data = _hostile_file(field)
    started = time.perf_counter()
    with pytest.raises(AdapterError) as info:
        load_lora(data, NAME, sd15_targets)
    elapsed = time.perf_counter() - started
    assert f"unet.{field} key {EVIL_PATTERN!r} is not a module path" in info.value.problem
    assert elapsed < FAST_SECONDS, f"took {elapsed:.1f} s"


@pytest.mark.parametrize(
    "pattern",
    ["to_.*", "to_k|to_q", "(to_k)", "to_[kq]", "to_k$", "a^b", "to_k+", "to k", "", ".to_k", "to_k.", "a..b",
     "to\\_k", "^", "x" * 1001],
)
def test_other_regex_syntax_is_refused(pattern):
    config = {"unet.r": 2, "unet.alpha_pattern": {pattern: 1.0}}
    with pytest.raises(AdapterError) as info:
        parse_configs(NAME, {"lora_adapter_metadata": json.dumps(config)})
    assert "lora_adapter_metadata" in info.value.problem and "alpha_pattern" in info.value.problem


def _module_paths(components) -> list[str]:
    """Every module path of the tiny SD 1.x UNet and text encoder, as files spell them."""
    paths = [path for path, _ in components["unet"].named_modules() if path]
    paths += [portable_path("text_encoder", path) for path, _ in components["text_encoder"].named_modules() if path]
    return paths


ATTN1_TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
PATTERN_SETS = {
    "suffix": {"to_k": 1, "conv1": 2, "to_out.0": 3, "ff.net.2": 4, "q_proj": 5},
    "escaped_dots": {"to_out\\.0": 1, "attn2\\.to_v": 2, "self_attn\\.k_proj": 3},
    "anchored": {f"^{ATTN1_TO_K}": 1, "^conv_in": 2, "^text_model.encoder.layers.0.mlp.fc1": 3},
    "anchored_escaped": {"^" + ATTN1_TO_K.replace(".", "\\."): 1, "^up_blocks\\.0\\.resnets\\.0\\.conv1": 2},
    # A caret pattern that is only a suffix of real paths matches none of them.
    "anchored_suffix_only": {"^attn1.to_k": 1, "^to_q": 2},
    # Not at a dot boundary: "o_k" is not a module of "...to_k".
    "partial_segment": {"o_k": 1, "_proj": 2, "onv1": 3},
    # Several patterns match one path: the first in file order wins, either way round.
    "first_wins": {"attn1.to_k": 1, "to_k": 2, f"^{ATTN1_TO_K}": 3},
    "first_wins_reversed": {f"^{ATTN1_TO_K}": 3, "to_k": 2, "attn1.to_k": 1},
    # What sdserve's own save writes: re.escape of whole paths, unanchored.
    "saved": {re.escape(ATTN1_TO_K): 7, re.escape("text_model.encoder.layers.1.self_attn.out_proj"): 8},
    "two_spellings": {"attn1.to_k": 1, "attn1\\.to_k": 2},
}


@pytest.mark.parametrize("case", sorted(PATTERN_SETS))
def test_patterns_match_as_peft_matches_them(case, sd15_components):
    patterns = PATTERN_SETS[case]
    config = {"r": 4, "lora_alpha": 9.5, "rank_pattern": patterns,
              "alpha_pattern": {key: float(value) for key, value in patterns.items()}}
    parsed = parse_configs(NAME, {"lora_adapter_metadata": json.dumps(config)})[""]
    matched = 0
    for path in _module_paths(sd15_components):
        key = get_pattern_key(list(patterns), path)  # PEFT's rule: the oracle
        expected = patterns.get(key)
        assert parsed.rank_for(path) == (4 if expected is None else expected), path
        assert parsed.alpha_for(path) == (9.5 if expected is None else float(expected)), path
        matched += expected is not None
    if case not in ("anchored_suffix_only", "partial_segment"):
        assert matched, "the case must match some real module"


def test_config_with_patterns_still_loads(sd15_targets, sd15_lora):
    """The fixture's PEFT-written config (rank_pattern conv1, alpha_pattern to_k) keeps loading."""
    tensors, metadata = peft_file_contents(sd15_lora)
    adapter = load_lora(safetensors.torch.save(tensors, metadata=metadata), NAME, sd15_targets)
    for target, module in adapter.modules.items():
        assert module.scale == pytest.approx(sd15_lora.scalings[target]), target
        assert module.rank == sd15_lora.ranks[target], target
