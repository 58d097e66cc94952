"""LoHa and LoKr files written by LyCORIS itself (its modules' own state dicts), and its own deltas.

    sd = make_lycoris(components, {"unet.mid_block.resnets.0.conv1": ("loha", {"lora_dim": 2, "use_tucker": True})})
    deltas = lycoris_deltas(components, sd)   # target -> ΔW, computed by lycoris-lora from the file

Every parameter is drawn at random (LyCORIS zero-initialises one factor), so each module's delta
is non-zero. The keys are kohya's ("lora_unet_<path>", "lora_te_<path>"), as LyCORIS writes them
for SD 1.x; `lycoris_deltas` loads them back module by module with `lycoris.modules.get_module` and
`make_module`, what `lycoris.kohya.create_network_from_weights` runs per module (rebuilding each one
from the file's shapes alone, as for users' files). That function itself cannot be called here:
its network constructor refuses diffusers' UNet ("duplicated lora name" in lycoris-lora 4.1.3).
Nor can lycoris-lora 4.1.3 rebuild a Tucker LoKr module from its own file (it takes the rank from
`lokr_w2_a.size(1)`, which is the output factor there): those deltas come from its functional
API's scale-explicit `lycoris.functional.lokr.kron_weight`, on the file's tensors with the scale
alpha / r of LyCORIS's modules (its `diff_weight` divides by `lokr_w2_a.size(1)` too).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from lycoris.functional import lokr as functional_lokr
from lycoris.modules import get_module, make_module
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_CLASSES = {"loha": LohaModule, "lokr": LokrModule}

Plan = Mapping[str, tuple[str, dict[str, object]]]  # target -> (algo, the module's keyword arguments)


def lora_name(target: str) -> str:
    component, _, path = target.partition(".")
    return _PREFIX[component] + path.replace(".", "_")


def make_lycoris(components: Mapping[str, torch.nn.Module], plan: Plan, seed: int = 0,
                 std: float = 0.3, names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A kohya-layout LyCORIS state dict: one module per planned target, random parameters.
    `names` overrides a target's module name (SDXL's "lora_te1_", "lora_te2_", sgm block names)."""
    names = names or {}
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for target, (algo, kwargs) in plan.items():
        component, _, path = target.partition(".")
        name = names[target] if target in names else lora_name(target)
        module = _CLASSES[algo](name, components[component].get_submodule(path), 1.0, **kwargs)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        for role, tensor in module.custom_state_dict().items():
            state[f"{name}.{role}"] = tensor.detach().float().clone().contiguous()
    return state


def lycoris_modules(components: Mapping[str, torch.nn.Module], state: Mapping[str, torch.Tensor]) -> dict:
    """target -> the LyCORIS module lycoris-lora rebuilds from the file (not applied to the model)."""
    modules = {}
    for component in ("unet", "text_encoder"):
        for path, module in components[component].named_modules():
            target = f"{component}.{path}"
            tucker_lokr = f"{lora_name(target)}.lokr_t2" in state
            if path and not tucker_lokr and any(key.startswith(lora_name(target) + ".") for key in state):
                kind, params = get_module(dict(state), lora_name(target))
                modules[target] = make_module(kind, params, lora_name(target), module)
    return modules


def lycoris_deltas(components: Mapping[str, torch.nn.Module], state: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """target -> the ΔW lycoris-lora's forward pass adds at multiplier 1 (`get_weight`: alpha/dim once)."""
    with torch.no_grad():
        deltas = {target: module.get_weight(module.shape).detach().double()
                  for target, module in lycoris_modules(components, state).items()}
        for component in ("unet", "text_encoder"):
            for path, module in components[component].named_modules():
                name = lora_name(f"{component}.{path}")
                if path and f"{name}.lokr_t2" in state:
                    deltas[f"{component}.{path}"] = _tucker_lokr_delta(state, name, module.weight.shape)
    return deltas


def _tucker_lokr_delta(state: Mapping[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """LyCORIS's functional ΔW of a Tucker LoKr, scale alpha / r (r = lokr_t2's rank) as its modules use."""
    get = lambda role: state.get(f"{name}.{role}")  # noqa: E731
    rank = get("lokr_t2").shape[0]
    alpha = float(get("alpha")) if get("alpha") is not None and float(get("alpha")) else rank
    weights = (get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), None, get("lokr_w2_a"), get("lokr_w2_b"),
               get("lokr_t2"))
    return functional_lokr.kron_weight(*weights, scale=alpha / rank).reshape(shape).double()
