"""The IP-Adapter's frozen image encoder, built here (no hub downloads): a tiny
CLIPVisionModelWithProjection from a config, trained on the shapes world and then frozen.

Why an attribute objective and not CLIP's contrastive one: an IP-Adapter can only pass on what the
encoder's `image_embeds` carry, and on the shapes world that is the shape's colour, kind and the
background. Four linear heads on `image_embeds` (shape colour, shape kind, background colour,
position) trained by cross-entropy on freshly rendered one-shape scenes make those attributes
linearly readable in a few hundred steps (seconds); a contrastive objective would need captions
and a text tower for the same end, and a random encoder's embedding, after its final LayerNorm and
projection, carries the shape's colour only weakly (the background dominates its pixels). The
heads are dropped: what is saved is exactly a CLIPVisionModelWithProjection, as diffusers'
`load_ip_adapter` and sdserve's engine read `image_encoder/`.

Pixels go through `CLIPImageProcessor(size, crop_size)`, the preprocessing the engine applies to a
request's reference image, so the encoder trains on what it will see.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdserve.errors import InvalidArgument

ENCODER_DIR = "image_encoder"
_INIT_STREAM, _DATA_STREAM = 44, 45  # seeded streams (loop.seeded_generator / numpy) of the encoder's build


@dataclass(frozen=True)
class EncoderConfig:
    """The built encoder's size and its attribute training."""

    image_size: int = 32
    """Side the CLIP processor resizes reference images to (64 px shapes read fine at half size)."""
    patch_size: int = 4
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    projection_dim: int = 32
    """Width of `image_embeds`, what the IP-Adapter's projection reads."""
    steps: int = 300
    """Optimizer steps of the attribute objective (0: the random initial encoder)."""
    batch_size: int = 32
    lr: float = 1e-3
    pool: int = 1024
    """Rendered scenes the steps draw batches from."""
    held_out: int = 256
    """Further scenes the accuracy is measured on."""


def processor_for(encoder: nn.Module):
    """The CLIP preprocessing the engine applies to reference images (engine/ip_adapter.py)."""
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


def encode_references(encoder: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """image_embeds [N, D] of uint8 images [N, 3, R, R], preprocessed as the engine does."""
    from PIL import Image

    processor = processor_for(encoder)
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            pils = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images[start : start + batch]]
            pixels = processor(pils, return_tensors="pt").pixel_values  # [b, 3, S, S]
            parts.append(encoder(pixels.to(encoder.dtype)).image_embeds.float())  # [b, D]
    return torch.cat(parts)


def _attribute_pool(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [count, 3, 64, 64] one-shape scenes of the whole world (stars and teal too) and their
    labels [count, 4] int64: shape colour, kind, background, position (indices into the world's tuples)."""
    from sdserve.models.shapes.world import ALL_COLORS, ALL_KINDS, POSITIONS, render, sample_scene

    rng = np.random.default_rng([seed, _DATA_STREAM])
    images, labels = [], []
    for _ in range(count):
        scene = sample_scene(rng, num_shapes=1, kinds=ALL_KINDS, colors=ALL_COLORS, backgrounds=ALL_COLORS)
        shape = scene.shapes[0]
        images.append(torch.from_numpy(render(scene)).permute(2, 0, 1))
        labels.append([ALL_COLORS.index(shape.color), ALL_KINDS.index(shape.kind),
                       ALL_COLORS.index(scene.background), POSITIONS.index(shape.position)])
    return torch.stack(images), torch.tensor(labels)


def build_encoder(config: EncoderConfig, seed: int = 0) -> tuple[nn.Module, float]:
    """A frozen CLIPVisionModelWithProjection trained on the attribute objective; -> (encoder, the
    heads' mean accuracy on `held_out` further scenes)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from sdserve.models.shapes.world import ALL_COLORS, ALL_KINDS, POSITIONS
    from sdserve.trainers.loop import seeded_generator

    vision = CLIPVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=2 * config.hidden_size,
        num_attention_heads=config.heads, num_hidden_layers=config.layers, image_size=config.image_size,
        patch_size=config.patch_size, projection_dim=config.projection_dim,
    )
    classes = (len(ALL_COLORS), len(ALL_KINDS), len(ALL_COLORS), len(POSITIONS))
    with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed, the caller's stream untouched
        torch.manual_seed(seeded_generator(seed, _INIT_STREAM).initial_seed())
        encoder = CLIPVisionModelWithProjection(vision)
        heads = nn.ModuleList(nn.Linear(config.projection_dim, n) for n in classes)
    if config.steps == 0:  # the random encoder: no scenes to render
        return encoder.eval().requires_grad_(False), float("nan")
    images, labels = _attribute_pool(config.pool + config.held_out, seed)  # [P, 3, 64, 64], [P, 4]
    processor = processor_for(encoder)
    pixels = processor(list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt").pixel_values  # [P, 3, S, S]
    train_pixels, train_labels = pixels[: config.pool], labels[: config.pool]
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=config.lr)
    order = np.random.default_rng([seed, _DATA_STREAM, 1])
    encoder.train()
    for _ in range(config.steps):
        rows = torch.from_numpy(order.choice(config.pool, config.batch_size, replace=False))
        embeds = encoder(train_pixels[rows]).image_embeds  # [B, D]
        loss = sum(F.cross_entropy(head(embeds), train_labels[rows, i]) for i, head in enumerate(heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        embeds = encoder(pixels[config.pool :]).image_embeds
        accuracy = float(torch.stack([(head(embeds).argmax(-1) == labels[config.pool :, i]).float().mean()
                                      for i, head in enumerate(heads)]).mean())
    return encoder, accuracy


def load_encoder(path: Path) -> nn.Module:
    """A CLIPVisionModelWithProjection directory, frozen; one-line errors naming --image-encoder."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise InvalidArgument(f"{path} holds no readable config.json", field="--image-encoder") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip_vision_model" \
            or "projection_dim" not in config:
        raise InvalidArgument(f"{path} is not a CLIP vision model with a projection "
                              "(CLIPVisionModelWithProjection, as IP-Adapters use)", field="--image-encoder")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(path)
    except Exception as error:  # transformers raises many kinds for missing or torn weights
        raise InvalidArgument(f"{path}: its weights could not be read ({type(error).__name__})",
                              field="--image-encoder") from None
    return encoder.float().eval().requires_grad_(False)


def encoder_digest(encoder: nn.Module) -> str:
    """sha256 over the encoder's tensors in name order: what a resumed run must use again."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode() + b"\0" + tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()
