"""Shared tiny base models and PEFT-made LoRAs for the adapter tests (built once per session)."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from sdserve.adapters import targets_of
from tests.adapters.lora_factory import (
    CLIP_ATTENTION,
    UNET_ATTENTION,
    UNET_CONV,
    FactoryLoRA,
    make_peft_lora,
    tiny_sd15_components,
    tiny_sdxl_components,
)


def mixed_configs(family: str) -> dict[str, LoraConfig]:
    """Ranks and alphas that differ per module (alpha != rank everywhere), conv targets,
    rsLoRA on one component: every path of the scale rule is exercised."""
    configs = {
        "unet": LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules=UNET_ATTENTION + UNET_CONV,
            rank_pattern={"conv1": 2},
            alpha_pattern={"to_k": 3.0},
        ),
        "text_encoder": LoraConfig(r=3, lora_alpha=5, target_modules=CLIP_ATTENTION, use_rslora=True),
    }
    if family == "sdxl":
        configs["text_encoder_2"] = LoraConfig(r=2, lora_alpha=1, target_modules=CLIP_ATTENTION)
    return configs


@pytest.fixture(scope="session")
def sd15_components():
    return tiny_sd15_components()


@pytest.fixture(scope="session")
def sdxl_components():
    return tiny_sdxl_components()


@pytest.fixture(scope="session")
def sd15_targets(sd15_components):
    return targets_of(sd15_components)


@pytest.fixture(scope="session")
def sdxl_targets(sdxl_components):
    return targets_of(sdxl_components)


@pytest.fixture(scope="session")
def sd15_lora(sd15_components) -> FactoryLoRA:
    return make_peft_lora(sd15_components, mixed_configs("sd15"), seed=1)


@pytest.fixture(scope="session")
def sdxl_lora(sdxl_components) -> FactoryLoRA:
    return make_peft_lora(sdxl_components, mixed_configs("sdxl"), seed=2)


@pytest.fixture(scope="session")
def family(request, sd15_components, sdxl_components, sd15_targets, sdxl_targets, sd15_lora, sdxl_lora):
    """(components, targets, lora) of the family named by indirect parametrisation."""
    if request.param == "sd15":
        return sd15_components, sd15_targets, sd15_lora
    return sdxl_components, sdxl_targets, sdxl_lora
