"""The modules exported to ONNX: each component behind a wrapper with plain tensor inputs and outputs.

A wrapper holds its module under the component's name (`self.unet`), and export keeps parameter
names (no constant folding: onnxruntime folds the transposes when a session starts), so a graph
initializer is named exactly "<component>.<module path>.weight", the adapter target of that
module plus ".weight": the refit map is read off the graph, not guessed from values.

Each `GraphSpec` says what one component's graph takes and gives, with named dynamic axes, and
makes seeded inputs of any batch and size for the onnxruntime check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class TextEncoderGraph(nn.Module):
    """input_ids [B, T] (and attention_mask [B, T] where the encoder's config asks for one, as the
    SD family passes it) -> last_hidden_state [B, T, D], penultimate_hidden_state [B, T, D],
    pooled [B, P]: SD 1.x/2.x read the first, SDXL the second and the pooled projection."""

    def __init__(self, component: str, encoder: nn.Module) -> None:
        super().__init__()
        self.component = component
        self.add_module(component, encoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = getattr(self, self.component)(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # [B, P]
        return out.last_hidden_state, out.hidden_states[-2], pooled


class UNetGraph(nn.Module):
    """sample [B, C, h, w], timestep [B] float32, encoder_hidden_states [B, T, D] (SDXL also
    text_embeds [B, P], time_ids [B, 6]; with ControlNets the residuals) -> noise_pred [B, 4, h, w]."""

    def __init__(self, unet: nn.Module, sdxl: bool, residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.residuals = residuals  # down-block residuals; a mid-block one comes after them

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor) -> torch.Tensor:
        added = None
        if self.sdxl:
            added = {"text_embeds": extra[0], "time_ids": extra[1]}
            extra = extra[2:]
        down = list(extra[: self.residuals]) if self.residuals else None
        mid = extra[self.residuals] if self.residuals else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]


class VAEDecoderGraph(nn.Module):
    """latent_sample [B, 4, h, w] (already divided by the scaling factor) -> sample [B, 3, H, W]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VAEEncoderGraph(nn.Module):
    """sample [B, 3, H, W] in [-1, 1] -> the latent distribution's mean and logvar [B, 4, h, w]
    (a caller samples mean + exp(logvar / 2) · noise from its own generator, as diffusers does)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(sample, return_dict=False)[0]
        return dist.mean, dist.logvar


class ControlNetGraph(nn.Module):
    """UNet inputs plus controlnet_cond [B, 3, H, W] -> the down-block residuals and the mid-block
    one, at conditioning scale 1 (the engine scales them per row)."""

    def __init__(self, controlnet: nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = sdxl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if self.sdxl else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=1.0, return_dict=False, **kwargs)
        return (*down, mid)


Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GraphSpec:
    """One component to export: the wrapper, its input and output names, dynamic axes, and a
    maker of seeded inputs `(batch, latent height, latent width, generator) -> inputs`."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: Callable[[int, int, int, torch.Generator], Inputs]
    config: dict  # the source module's diffusers/transformers config, written beside the graph
    spatial: bool = True  # its inputs have a size (text encoders: no)


def _normal(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype)


def text_encoder_spec(component: str, encoder: nn.Module, length: int) -> GraphSpec:
    vocab = int(encoder.config.vocab_size)
    masked = bool(getattr(encoder.config, "use_attention_mask", False))

    def make(batch: int, _h: int, _w: int, generator: torch.Generator) -> Inputs:
        inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=generator)}  # [B, T]
        if masked:  # each row's prompt ends somewhere: ones up to it, zeros (padding) after
            ends = torch.randint(2, length + 1, (batch, 1), generator=generator)  # [B, 1]
            inputs["attention_mask"] = (torch.arange(length)[None, :] < ends).long()  # [B, T]
        return inputs

    names = ("input_ids", "attention_mask") if masked else ("input_ids",)
    outputs = ("last_hidden_state", "penultimate_hidden_state", "pooled")
    axes = {name: {0: "batch"} for name in names + outputs}
    return GraphSpec(component, TextEncoderGraph(component, encoder), names, outputs, axes, make,
                     encoder.config.to_dict(), spatial=False)


def _unet_conditioning(batch: int, unet_config, generator: torch.Generator, dtype: torch.dtype,
                       length: int) -> Inputs:
    """timestep, encoder_hidden_states and (SDXL) text_embeds / time_ids for `batch` rows."""
    inputs = {
        "timestep": torch.randint(0, 1000, (batch,), generator=generator).float(),  # [B]
        "encoder_hidden_states": _normal((batch, length, unet_config.cross_attention_dim), generator, dtype),
    }
    if unet_config.addition_embed_type == "text_time":
        pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        inputs["text_embeds"] = _normal((batch, pooled), generator, dtype)  # [B, P]
        inputs["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1).to(dtype)
    return inputs


def _sdxl(unet_config) -> bool:
    return unet_config.addition_embed_type == "text_time"


def unet_spec(unet: nn.Module, dtype: torch.dtype, length: int) -> GraphSpec:
    config = unet.config
    extra = ("text_embeds", "time_ids") if _sdxl(config) else ()

    def make(batch: int, h: int, w: int, generator: torch.Generator) -> Inputs:
        sample = _normal((batch, config.in_channels, h, w), generator, dtype)
        return {"sample": sample, **_unet_conditioning(batch, config, generator, dtype, length)}

    names = ("sample", "timestep", "encoder_hidden_states", *extra)
    axes = {name: {0: "batch"} for name in names}
    axes["sample"] = {0: "batch", 2: "height", 3: "width"}
    axes["noise_pred"] = {0: "batch", 2: "height", 3: "width"}
    return GraphSpec("unet", UNetGraph(unet, _sdxl(config)), names, ("noise_pred",), axes, make, dict(config))


def vae_specs(vae: nn.Module, dtype: torch.dtype, scale_factor: int) -> list[GraphSpec]:
    config = vae.config

    def make_decoder(batch: int, h: int, w: int, generator: torch.Generator) -> Inputs:
        return {"latent_sample": _normal((batch, config.latent_channels, h, w), generator, dtype)}

    def make_encoder(batch: int, h: int, w: int, generator: torch.Generator) -> Inputs:
        pixels = torch.rand((batch, 3, h * scale_factor, w * scale_factor), generator=generator) * 2 - 1
        return {"sample": pixels.to(dtype)}

    image_axes = {0: "batch", 2: "image_height", 3: "image_width"}
    latent_axes = {0: "batch", 2: "height", 3: "width"}
    return [
        GraphSpec("vae_decoder", VAEDecoderGraph(vae), ("latent_sample",), ("sample",),
                  {"latent_sample": latent_axes, "sample": image_axes}, make_decoder, dict(config)),
        GraphSpec("vae_encoder", VAEEncoderGraph(vae), ("sample",), ("mean", "logvar"),
                  {"sample": image_axes, "mean": latent_axes, "logvar": latent_axes}, make_encoder, dict(config)),
    ]


def controlnet_spec(name: str, controlnet: nn.Module, unet_config, dtype: torch.dtype, length: int) -> GraphSpec:
    config = controlnet.config
    # The control image's side over the latents' is the ControlNet's own (its conditioning
    # embedding's stride-2 convs), which the engine's fitting check leaves to the model's VAE.
    scale_factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    sdxl = _sdxl(unet_config)
    # conv_in's, one per layer of every level, one per downsampler (every level but the last)
    residuals = len(config.block_out_channels) * (config.layers_per_block + 1)
    outputs = tuple(f"down_block_residual_{i}" for i in range(residuals)) + ("mid_block_residual",)

    def make(batch: int, h: int, w: int, generator: torch.Generator) -> Inputs:
        inputs = {"sample": _normal((batch, config.in_channels, h, w), generator, dtype)}
        conditioning = _unet_conditioning(batch, unet_config, generator, dtype, length)
        cond = torch.rand((batch, 3, h * scale_factor, w * scale_factor), generator=generator).to(dtype)
        inputs.update(timestep=conditioning.pop("timestep"),
                      encoder_hidden_states=conditioning.pop("encoder_hidden_states"), controlnet_cond=cond)
        return {**inputs, **conditioning}

    names = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")
    names += ("text_embeds", "time_ids") if sdxl else ()
    axes = {name: {0: "batch"} for name in names}
    axes["sample"] = {0: "batch", 2: "height", 3: "width"}
    axes["controlnet_cond"] = {0: "batch", 2: "image_height", 3: "image_width"}
    axes.update({output: {0: "batch", 2: f"{output}_height", 3: f"{output}_width"} for output in outputs})
    return GraphSpec(f"controlnet/{name}", ControlNetGraph(controlnet, sdxl), names, outputs, axes, make,
                     dict(config))


def controlled_unet_spec(unet: nn.Module, control: GraphSpec) -> GraphSpec:
    """The UNet taking a ControlNet's residuals as inputs (zeros for rows without one); its seeded
    inputs carry residuals of `control`'s torch module, so they have real shapes and scales."""
    plain = unet_spec(unet, next(unet.parameters()).dtype, 0)
    residual_names = control.outputs

    def make(batch: int, h: int, w: int, generator: torch.Generator) -> Inputs:
        inputs = control.make_inputs(batch, h, w, generator)
        with torch.no_grad():
            residuals = control.module(*inputs.values())
        inputs.pop("controlnet_cond")
        return {**inputs, **dict(zip(residual_names, residuals))}

    names = plain.inputs + residual_names
    axes = {**plain.dynamic_axes, **{name: control.dynamic_axes[name] for name in residual_names}}
    module = UNetGraph(unet, plain.module.sdxl, residuals=len(residual_names) - 1)
    return GraphSpec("unet_controlled", module, names, plain.outputs, axes, make, plain.config)
