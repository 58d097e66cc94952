"""ControlNet training (issue 19): a ControlNet initialised from the base UNet, trained by the
shared loop on (image, conditioning image, caption) triplets, written as a diffusers ControlNet
directory.

As in diffusers' `train_controlnet.py`: `ControlNetModel.from_unet` copies the UNet's encoder
half and adds zero-initialised 1x1 convs on every residual, so at step 0 the ControlNet adds
exactly nothing and the model is the base model; every ControlNet weight trains, the UNet, VAE
and text encoder stay frozen; the control image enters in [0, 1] (diffusers' ToTensor, and what
the engine's `prepare_controls` feeds it), at the training images' side.

The conditioning embedding must take control images down by the base model's VAE scale, or the
residuals would not line up with the latents (the engine refuses such a ControlNet): diffusers'
default channels (16, 32, 96, 256) are three stride-2 convs, 8x, SD's scale; a model whose VAE
downsamples 4x (the embedded `default`) gets the first three, 2x the first two. The embedding's
random initial weights are drawn from the run's seed.

Output: OUT/config.json and OUT/diffusion_pytorch_model.safetensors, what
`ControlNetModel.from_pretrained` and the server's ControlNet store read, with the loop's
provenance (method, base model and its digest, steps, ...) in the safetensors header and in
OUT/sdserve.json. The directory is staged beside OUT and renamed into place whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components
from sdserve.trainers.controlnet_data import ControlTriplets
from sdserve.trainers.loop import (
    LoopConfig,
    Result,
    default_state_dir,
    restore_state,
    seeded_generator,
    train,
)
from sdserve.trainers.output import replace_directory, safetensors_bytes

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' name, what from_pretrained looks for
METADATA_FILE = "sdserve.json"
_INIT_STREAM = 41  # seeded_generator stream of the conditioning embedding's initial weights
# diffusers' ControlNetModel default (8x); see the module docstring for other VAE scales.
DIFFUSERS_CONDITIONING_CHANNELS = (16, 32, 96, 256)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Conditioning-embedding channels whose stride-2 convs take a control image down by
    `vae_scale_factor` (a power of two from 2 to 8): one conv per halving."""
    halvings = int(math.log2(vae_scale_factor))
    if 2**halvings != vae_scale_factor or not 1 <= halvings <= len(DIFFUSERS_CONDITIONING_CHANNELS) - 1:
        raise InvalidArgument(f"the model's VAE scale {vae_scale_factor} is not 2, 4 or 8", field="--model")
    return DIFFUSERS_CONDITIONING_CHANNELS[: halvings + 1]


class ControlNetMethod:
    """The ControlNet method for `loop.train`: holds its own ControlNetModel (the components'
    UNet is not modified) and the --data conditioning images it reads by row."""

    kind = "controlnet"

    def __init__(self, components: Components, conditioning: torch.Tensor, seed: int = 0) -> None:
        from diffusers import ControlNetModel

        self.components = components
        self.conditioning = conditioning  # [N, 3, R, R] uint8, row i is --data image i's control map
        self.channels = conditioning_channels(components.vae_scale_factor)
        # from_unet builds the new layers with torch's global generator: draw them from the run's seed
        # instead, without disturbing the caller's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded_generator(seed, _INIT_STREAM).initial_seed())
            self.controlnet = ControlNetModel.from_unet(components.unet,
                                                        conditioning_embedding_out_channels=self.channels)
        self.controlnet.train().requires_grad_(True)
        self._rows: list[int] | None = None

    def use_rows(self, rows: list[int]) -> None:
        self._rows = list(rows)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.controlnet.parameters())

    def control_images(self, rows: Sequence[int]) -> torch.Tensor:
        """The control maps of --data rows as the ControlNet reads them, float [B, 3, R, R] in [0, 1]."""
        return self.conditioning[list(rows)].float() / 255.0

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        if self._rows is None or len(self._rows) != len(noisy):
            raise RuntimeError("ControlNetMethod.predict needs the loop's use_rows for this batch")
        side = noisy.shape[-1] * self.components.vae_scale_factor
        conditioning = self.components.encode_text(captions, resolution=side)
        control = self.control_images(self._rows).to(noisy.dtype)  # [B, 3, R, R]
        down, mid = self.controlnet(
            noisy, timesteps, encoder_hidden_states=conditioning.states, controlnet_cond=control,
            conditioning_scale=1.0, added_cond_kwargs=conditioning.added, return_dict=False,
        )
        return self.components.predict(noisy, timesteps, conditioning, residuals=(down, mid))  # [B, C, h, w]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.controlnet.named_parameters()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        restore_state(self.state_dict(), state, "ControlNet weights")

    def metadata(self) -> dict[str, str]:
        return {"sdserve_conditioning_channels": ",".join(map(str, self.channels))}

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        """The weights file (`out` is a temporary path beside OUT/WEIGHTS_FILE: the loop makes it atomic)."""
        tensors = {key: tensor.detach().clone().contiguous()
                   for key, tensor in self.controlnet.state_dict().items()}
        out.write_bytes(safetensors_bytes(tensors, metadata))


def _is_controlnet_dir(path: Path) -> bool:
    """A directory this trainer wrote (which a new run may replace), told by its sdserve.json."""
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("training", {}).get("sdserve_method") == ControlNetMethod.kind


def check_output_directory(out: Path) -> None:
    """Refuse, before any work, an --out that cannot become the ControlNet directory: a file, a
    directory with other contents (never replaced: it may be anything), or an unwritable parent."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InvalidArgument(f"{out} is a file; a ControlNet is written as a directory", field="--out")
        if any(out.iterdir()) and not _is_controlnet_dir(out):
            raise InvalidArgument(f"{out} exists and is not a ControlNet written by `sdserve train controlnet`; "
                                  "choose a new directory", field="--out")
    parent = out.parent
    if not parent.is_dir():
        raise InvalidArgument(f"directory {parent} does not exist", field="--out")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as error:
        raise InvalidArgument(f"cannot write to {parent} ({error.strerror or error})", field="--out") from None
    os.rmdir(probe)


def train_controlnet(components: Components, data: ControlTriplets, cfg: LoopConfig, out: Path) -> Result:
    """Train a ControlNet on `data` and write the directory `out` whole (see the module docstring).

    Raises InvalidArgument for bad input (before any training) and the loop's Diverged /
    Interrupted (no output written; the checkpoint stays in the state directory, by default
    OUT.state beside OUT)."""
    out = Path(out)
    check_output_directory(out)
    cfg = replace(cfg, state_dir=cfg.state_dir or default_state_dir(out))
    method = ControlNetMethod(components, data.conditioning, seed=cfg.seed)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the directory is meant to be served
        method.controlnet.save_config(staging)
        result = train(method, components, data, cfg, staging / WEIGHTS_FILE)
        meta = {
            "description": f"ControlNet for {components.name}, trained by `sdserve train controlnet` "
                           f"on {len(data)} images ({result.steps} steps)",
            "training": dict(sorted(result.metadata.items())),
        }
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(result, out=out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
