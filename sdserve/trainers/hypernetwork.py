"""Hypernetwork training (AUTOMATIC1111's kind): MLP pairs on the attention contexts, trained by
the shared loop.

What is trained is what `adapters/hypernetwork.py` serves: for every context width w of the
UNet's attention layers, a pair (k_mlp, v_mlp), and in every attention layer whose context has
width w

    k = to_k(c + k_mlp(c) · strength)        v = to_v(c + v_mlp(c) · strength)

with strength 1 while training. As in A1111 the pairs are keyed by width, so they act on the
self-attention contexts (the hidden states, widths 320/640/1280 in SD 1.x) as well as on the
cross-attention context (the text, 768): a style that lives in the image itself (outlined,
hollow shapes) is reachable, not only what the prompt says. The widths are read from the UNet's
attention modules (`to_k.in_features`), so every width that has an attention layer gets a pair.

The training forward IS the serving forward: the UNet's attention processors are the engine's
(`engine.ip_adapter.install_processors`, put back by `remove()`), reading the MLPs through a row
context as a request would, with `adapters.hypernetwork.HypernetworkMLP`s whose tensors are the
trainable parameters. Dropout, which A1111 offers while training, is left out: serving has none,
and a training forward that differs from the served one would fit the wrong function.

Initialisation: hidden layers as nn.Linear initialises them (kaiming-uniform weights, seeded) with
zero biases (A1111's); the output is zero at step 0, so the model starts as the base model: the
last linear layer is zero, or with --layer-norm the last LayerNorm's gain and shift (the linear
before it stays random so the gradient reaches it). An --activate-output activation that is not
0 at 0 (sigmoid, softplus, logsigmoid) would shift every context at step 0 and is refused
without --layer-norm.

Output: sdserve's hypernetwork safetensors layout (see that module; `key_of` and `metadata_of`
name the keys and the config), with the loop's provenance in the metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from sdserve.adapters.hypernetwork import (
    ACTIVATIONS,
    MAX_EXPANSION,
    MAX_LAYERS,
    METADATA_KEY,
    Hypernetwork,
    HypernetworkMLP,
    key_of,
    metadata_of,
)
from sdserve.engine.ip_adapter import install_processors
from sdserve.engine.row_context import RowContext, RowContextHolder
from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components
from sdserve.trainers.loop import restore_state, seeded_generator
from sdserve.trainers.output import safetensors_bytes

_INIT_STREAM = 31  # seeded_generator stream of the initial hidden weights
SIDES = ("k", "v")


@dataclass(frozen=True)
class HypernetworkConfig:
    """The MLPs' shape; the `sdserve train hypernetwork` flags mirror these fields."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    """Layer widths as multiples of the context width, first and last 1 (A1111's "1, 2, 1")."""
    activation: str = "linear"
    """After every layer but the last (see activate_output); A1111's names (see ACTIVATIONS)."""
    layer_norm: bool = False
    """A LayerNorm after every layer (after its activation), as A1111's option adds."""
    activate_output: bool = False
    """Apply the activation after the last layer too."""


def parse_layer_structure(text: str) -> tuple[float, ...]:
    """"1,2,1" -> (1.0, 2.0, 1.0); one line naming --layer-structure otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgument(f"expected comma-separated numbers such as 1,2,1 (got {text!r})",
                              field="--layer-structure") from None
    return values


def check_config(config: HypernetworkConfig) -> None:
    """One-line errors naming the flag, before any model is loaded (the limits load_hypernetwork
    enforces, so a trained file always loads)."""
    structure = config.layer_structure
    if not 2 <= len(structure) <= MAX_LAYERS + 1 or structure[0] != 1 or structure[-1] != 1 or not all(
        math.isfinite(s) and 0 < s <= MAX_EXPANSION for s in structure
    ):
        raise InvalidArgument(f"must be 2 to {MAX_LAYERS + 1} sizes in (0, {MAX_EXPANSION:g}], starting and "
                              f"ending with 1, e.g. 1,2,1 (got {','.join(f'{s:g}' for s in structure)})",
                              field="--layer-structure")
    if config.activation not in ACTIVATIONS:
        raise InvalidArgument(f"unknown activation {config.activation!r}; choose from {', '.join(ACTIVATIONS)}",
                              field="--activation")
    if config.activate_output and not config.layer_norm:
        at_zero = float(ACTIVATIONS[config.activation](torch.zeros(1)))
        if at_zero != 0.0:
            raise InvalidArgument(f"{config.activation}(0) = {at_zero:.3g}, so the output could not start at 0 "
                                  "(the base model); add --layer-norm or drop --activate-output",
                                  field="--activate-output")


def attention_widths(unet: nn.Module) -> list[int]:
    """The context widths of the UNet's attention layers (self- and cross-attention), sorted."""
    return sorted({module.to_k.in_features for module in unet.modules() if isinstance(module, Attention)})


class HypernetworkMethod:
    """The hypernetwork method for `loop.train`: installs the engine's attention processors on
    the UNet in place (`remove()` puts the previous ones back)."""

    kind = "hypernetwork"

    def __init__(self, components: Components, config: HypernetworkConfig, seed: int = 0) -> None:
        check_config(config)
        self.components, self.config = components, config
        self.widths = attention_widths(components.unet)
        if not self.widths:
            raise InvalidArgument("the model's UNet has no attention layers", field="--model")
        for width in self.widths:
            if min(int(width * s) for s in config.layer_structure) < 1:
                raise InvalidArgument(f"gives the model's width-{width} contexts a layer of 0 units",
                                      field="--layer-structure")
        generator = seeded_generator(seed, _INIT_STREAM)
        self.tensors: dict[str, nn.Parameter] = {}  # file key -> parameter, in a fixed order
        modules: dict[int, tuple[HypernetworkMLP, HypernetworkMLP]] = {}
        for width in self.widths:
            pair = tuple(self._mlp(width, side, generator) for side in SIDES)
            modules[width] = (pair[0], pair[1])
        self.network = Hypernetwork(name="trained", modules=MappingProxyType(modules),
                                    layer_structure=config.layer_structure)
        self._previous = dict(components.unet.attn_processors)
        self._rows = RowContextHolder()
        install_processors(components.unet, self._rows)

    def _mlp(self, width: int, side: str, generator: torch.Generator) -> HypernetworkMLP:
        """One MLP's parameters (registered in `self.tensors`) and its served form."""
        sizes = [int(width * s) for s in self.config.layer_structure]  # A1111: int(dim * layer_structure[i])
        last = len(sizes) - 2
        weights, biases, norms = [], [], []
        for i in range(len(sizes) - 1):
            weight = torch.empty(sizes[i + 1], sizes[i])  # [out_i, in_i]
            if i < last or self.config.layer_norm:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            else:
                weight.zero_()  # the output starts at 0: step 0 is the base model
            layer = {"weight": weight, "bias": torch.zeros(sizes[i + 1])}  # [out_i]
            if self.config.layer_norm:
                gain = torch.zeros(sizes[i + 1]) if i == last else torch.ones(sizes[i + 1])  # [out_i]
                layer |= {"norm.weight": gain, "norm.bias": torch.zeros(sizes[i + 1])}
            params = {name: nn.Parameter(tensor) for name, tensor in layer.items()}
            self.tensors.update({key_of(width, side, i, name): p for name, p in params.items()})
            weights.append(params["weight"])
            biases.append(params["bias"])
            if self.config.layer_norm:
                norms.append((params["norm.weight"], params["norm.bias"]))
        return HypernetworkMLP(tuple(weights), tuple(biases), tuple(norms) if self.config.layer_norm else None,
                               self.config.activation, self.config.activate_output)

    def remove(self) -> None:
        """Put the UNet's previous attention processors back (the components are the base model again)."""
        self.components.unet.set_attn_processor(self._previous)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.tensors.values())

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str],
                strength: float = 1.0) -> torch.Tensor:
        side = noisy.shape[-1] * self.components.vae_scale_factor
        conditioning = self.components.encode_text(captions, resolution=side)
        chain = ((self.network, strength),)
        with self._rows.rows(RowContext(hypernetworks=[chain] * len(noisy))):
            return self.components.predict(noisy, timesteps, conditioning)  # [B, C, h, w]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: tensor.detach() for key, tensor in self.tensors.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        restore_state(self.state_dict(), state, "hypernetwork tensors")

    def metadata(self) -> dict[str, str]:
        config = self.config
        return {
            METADATA_KEY: metadata_of(list(config.layer_structure), config.activation, config.activate_output,
                                      config.layer_norm),
            "sdserve_widths": ",".join(map(str, self.widths)),
        }

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        tensors = {key: tensor.detach().clone().contiguous() for key, tensor in self.tensors.items()}
        out.write_bytes(safetensors_bytes(tensors, metadata))
