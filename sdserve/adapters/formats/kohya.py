"""The kohya sd-scripts layout: "lora_unet_<path with _>.lora_down.weight", ".lora_up.weight", ".alpha".

kohya flattens a module path by replacing every "." with "_", which cannot be undone by string
rules alone ("time_emb_proj" vs "time.emb.proj"). Instead of guessing, the flattened name of
every module of the base model is computed and looked up, so a key resolves exactly when the
base model has that module. SD 1.x/2.x LoRAs use diffusers module paths; SDXL LoRAs use the
original UNet's names (see `sgm`), and both are looked up. Text encoders are "lora_te_"
(SD 1.x/2.x) or "lora_te1_"/"lora_te2_" (SDXL). Concept Sliders use this same layout.

Without ".alpha" kohya trains with alpha = rank; an alpha of 0 also means rank (kohya's rule).

LyCORIS writes its modules in this same layout, under other suffixes: LoHa ".hada_w1_a",
".hada_w1_b", ".hada_w2_a", ".hada_w2_b" (Tucker convs add ".hada_t1", ".hada_t2"), LoKr
".lokr_w1" or ".lokr_w1_a"/".lokr_w1_b", ".lokr_w2" or ".lokr_w2_a"/".lokr_w2_b" (Tucker:
".lokr_t2"), each with ".alpha". Those are returned as `RawLycoris` for `adapters.lycoris`; a
file may mix them with LoRA pairs (LyCORIS presets pick an algorithm per module type).

LyCORIS DoRA adds ".dora_scale" (the magnitude vector, [out, 1] with LyCORIS' default
wd_on_out=True) beside a LoRA pair; on a LoHa/LoKr module it is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sdserve.adapters.formats.common import RawLycoris, RawPair, short
from sdserve.adapters.formats.sgm import sgm_aliases
from sdserve.adapters.targets import portable_path
from sdserve.errors import AdapterError, UnsupportedAdapterKind

# kohya prefix -> component; lora_te_ and lora_te1_ both name the first text encoder.
PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "dora_scale"}
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_SUFFIXES.update({f".{role}": role for role in LOHA_ROLES + LOKR_ROLES})


def flatten(path: str) -> str:
    return path.replace(".", "_")


def kohya_names(targets: Iterable[str]) -> dict[str, str | None]:
    """kohya module name -> target name, for every target; None where two targets flatten alike."""
    by_component: dict[str, list[str]] = {}
    for target in targets:
        component, _, path = target.partition(".")
        by_component.setdefault(component, []).append(path)

    table: dict[str, str | None] = {}

    def add(name: str, target: str) -> None:
        # Two different modules with one flattened name cannot be told apart: refuse both.
        table[name] = target if table.get(name, target) == target else None

    for prefix, component in PREFIXES.items():
        for path in by_component.get(component, []):
            add(prefix + flatten(path), f"{component}.{path}")
            # Text-encoder files name modules with "text_model." even where the model has none.
            add(prefix + flatten(portable_path(component, path)), f"{component}.{path}")
    for sgm_path, path in sgm_aliases(by_component.get("unet", [])).items():
        add("lora_unet_" + flatten(sgm_path), f"unet.{path}")
    return table


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _alpha_value(name: str, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1 or not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise AdapterError(name, f"alpha {short(key)!r} is not a single number")
    value = float(tensor.reshape(()).double().item())
    if value != value or value in (float("inf"), float("-inf")):
        raise AdapterError(name, f"alpha {short(key)!r} is not finite")
    return value


def parse_kohya(
    name: str, tensors: Mapping[str, torch.Tensor], targets: Iterable[str]
) -> tuple[list[RawPair], list[RawLycoris]]:
    """Pair the factors of a kohya-layout file and resolve each module to a target: LoRA pairs,
    and LyCORIS (LoHa, LoKr) modules left for `adapters.lycoris` to check."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None or not split[0].startswith(tuple(PREFIXES)):
            raise AdapterError(name, f"unexpected key {short(key)!r} in a LoRA file")
        module_name, role = split
        groups.setdefault(module_name, {})[role] = (key, tensor)

    table = kohya_names(targets)
    pairs: list[RawPair] = []
    lycoris: list[RawLycoris] = []
    seen: dict[str, str] = {}
    for module_name, parts in groups.items():
        dora = parts.pop("dora_scale", None)  # LyCORIS DoRA's magnitude, beside a LoRA pair only
        if not parts:
            raise AdapterError(name, f"LoRA key {short(dora[0])!r} has no matching up/down partner")
        kinds = {kind for kind, roles in (("lora", ("down", "up")), ("loha", LOHA_ROLES), ("lokr", LOKR_ROLES))
                 if any(role in parts for role in roles)}
        # The key quoted in errors: a weight's rather than the alpha's, where there is one.
        first_key = next((key for role, (key, _) in parts.items() if role != "alpha"), next(iter(parts.values()))[0])
        if len(kinds) > 1:
            raise AdapterError(name, f"key {short(first_key)!r}: one module holds {' and '.join(sorted(kinds))} "
                                     f"weights")
        if not kinds or (kinds == {"lora"} and ("down" not in parts or "up" not in parts)):
            raise AdapterError(name, f"LoRA key {short(first_key)!r} has no matching up/down partner")
        kind = kinds.pop()
        key = parts["down"][0] if kind == "lora" else first_key
        target = table.get(module_name)
        if target is None:
            raise AdapterError(name, f"LoRA key {short(key)!r} does not match any module of the base model")
        if target in seen:
            # e.g. lora_te_ and lora_te1_ both present for one module.
            raise AdapterError(name, f"two LoRA weights for the same module ({short(key)!r})")
        seen[target] = module_name
        alpha = _alpha_value(name, parts["alpha"][0], parts["alpha"][1]) if "alpha" in parts else None
        alpha = alpha if alpha else None  # 0 means "no scaling" to kohya and LyCORIS
        if kind != "lora":
            if dora is not None:
                raise UnsupportedAdapterKind(name, f"dora on a {kind} module ({short(dora[0])!r})")
            roles = {role: part for role, part in parts.items() if role != "alpha"}
            lycoris.append(RawLycoris(target=target, kind=kind, tensors=roles, alpha=alpha, key=key))
            continue
        pairs.append(
            RawPair(target=target, down=parts["down"][1], up=parts["up"][1], alpha=alpha, use_rslora=False, key=key,
                    magnitude=None if dora is None else dora[1], magnitude_key=None if dora is None else dora[0])
        )
    return pairs, lycoris
