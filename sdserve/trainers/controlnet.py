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

The embedding's initial weights (`EMBEDDING_INITS`, --embedding-init). diffusers' `from_unet`
leaves its conv_in and inner convs at torch's default init (uniform, variance 1/(3 fan_in)):
each conv + SiLU shrinks the part of the features that depends on the control image 2.5-3.5x,
so what the zero conv_out reads from the embedded model's 4x embedding (five convs) varies
over the shapes masks by ~0.0005 (std over masks) around a mask-independent ~0.015 (mean
magnitude, from the biases). The control reaches the UNet copy only once training has grown
that chain. Most runs on the embedded model did by step 150 (lr 1e-3, batch 8), but seed 0 at
2 threads never did (250 steps): its ControlNet's residuals grew while true and shuffled masks
gave the same loss throughout, and its embedding's dependence on the mask stayed <= 0.014
(docs/benchmarks.md, ControlNet). "gaussian" (the default) draws those convs from He's normal
init (variance 2/fan_in, zero biases; the ControlNet paper's embedding is "initialized with
Gaussian weights"): the spread over masks is then 0.03-0.05 around a mean magnitude of
0.016-0.026, and the runs used the mask by step ~50. conv_out and the zero convs stay zero
either way, so step 0 is still the base model. "diffusers" keeps from_unet's init.

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
# Initial weights of the conditioning embedding's convs before conv_out (see the module docstring).
EMBEDDING_INITS = ("gaussian", "diffusers")
DEFAULT_EMBEDDING_INIT = "gaussian"


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

    def __init__(self, components: Components, conditioning: torch.Tensor, seed: int = 0,
                 embedding_init: str = DEFAULT_EMBEDDING_INIT) -> None:
        from diffusers import ControlNetModel

        if embedding_init not in EMBEDDING_INITS:
            raise InvalidArgument(f"must be one of {', '.join(EMBEDDING_INITS)} (got {embedding_init!r})",
                                  field="--embedding-init")
        self.components = components
        self.conditioning = conditioning  # [N, 3, R, R] uint8, row i is --data image i's control map
        self.channels = conditioning_channels(components.vae_scale_factor)
        self.embedding_init = embedding_init
        # from_unet builds the new layers with torch's global generator: draw them from the run's seed
        # instead, without disturbing the caller's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded_generator(seed, _INIT_STREAM).initial_seed())
            self.controlnet = ControlNetModel.from_unet(components.unet,
                                                        conditioning_embedding_out_channels=self.channels)
            if embedding_init == "gaussian":
                _gaussian_embedding_init(self.controlnet.controlnet_cond_embedding)
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
        return {"sdserve_conditioning_channels": ",".join(map(str, self.channels)),
                "sdserve_embedding_init": self.embedding_init}

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        """The weights file (`out` is a temporary path beside OUT/WEIGHTS_FILE: the loop makes it atomic)."""
        tensors = {key: tensor.detach().clone().contiguous()
                   for key, tensor in self.controlnet.state_dict().items()}
        out.write_bytes(safetensors_bytes(tensors, metadata))


def _gaussian_embedding_init(embedding: nn.Module) -> None:
    """He-normal weights (variance 2/fan_in) and zero biases for the conditioning embedding's
    convs before its zero conv_out, from torch's global generator (seeded by the caller): what
    keeps the control image's signal from fading through them (see the module docstring)."""
    with torch.no_grad():
        for conv in [embedding.conv_in, *embedding.blocks]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)


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


def train_controlnet(components: Components, data: ControlTriplets, cfg: LoopConfig, out: Path,
                     embedding_init: str = DEFAULT_EMBEDDING_INIT) -> Result:
    """Train a ControlNet on `data` and write the directory `out` whole (see the module docstring;
    `embedding_init` is one of EMBEDDING_INITS).

    Raises InvalidArgument for bad input (before any training) and the loop's Diverged /
    Interrupted (no output written; the checkpoint stays in the state directory, by default
    OUT.state beside OUT)."""
    out = Path(out)
    check_output_directory(out)
    cfg = replace(cfg, state_dir=cfg.state_dir or default_state_dir(out))
    method = ControlNetMethod(components, data.conditioning, seed=cfg.seed, embedding_init=embedding_init)
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
