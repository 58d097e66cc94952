"""Model families: a registry from family name to the small module that knows it."""

from __future__ import annotations

from sdserve.engine.families.base import ModelFamily, RowConditioning
from sdserve.engine.families.sd import StableDiffusionFamily
from sdserve.engine.families.sdxl import StableDiffusionXLFamily

FAMILIES: dict[str, ModelFamily] = {
    "sd1": StableDiffusionFamily("sd1"),
    "sd2": StableDiffusionFamily("sd2"),
    "sdxl": StableDiffusionXLFamily(),
}


def family_of(name: str) -> ModelFamily:
    return FAMILIES[name]


__all__ = ["FAMILIES", "ModelFamily", "RowConditioning", "family_of"]
