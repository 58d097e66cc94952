"""IP-Adapter training (issue 19): the image projection and the decoupled cross-attention k/v
(`to_k_ip`/`to_v_ip`) trained by the shared loop on captioned images, each image its own
reference, over a frozen image encoder (ip_adapter_encoder.py), written as diffusers'
`load_ip_adapter` and sdserve's engine read an IP-Adapter directory.

As in the IP-Adapter paper: the encoder's `image_embeds` go through `ImageProjection` (a linear
map to `num_tokens` tokens of the UNet's cross-attention width, then LayerNorm) and every
cross-attention layer adds a second attention over those tokens,

    out = softmax(q K_text^T / sqrt(d)) V_text + scale · softmax(q K_ip^T / sqrt(d)) V_ip,

with K_ip/V_ip from new `to_k_ip`/`to_v_ip`, initialised from the layer's own `to_k`/`to_v` (the
paper's initialisation: at step 0 the image tokens are read as text tokens would be). The UNet,
VAE, text encoder and image encoder stay frozen; training uses scale 1. The attention is the
engine's `attention_forward` with the branch added, so training and serving compute one function.

Dropout, as the paper (0.05 each): a caption is dropped (""), an image is dropped (its embedding
zeroed, what the engine feeds the unconditional rows) or both, so classifier-free guidance over
the image works at serving time. The draws come from a generator keyed by the run's seed, the
step's --data rows and timesteps (both functions of (seed, step)), so resume stays exact.

Output: OUT/ip_adapter.safetensors (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip.weight`, N = 1,
3, 5, ... in `unet.attn_processors` order, diffusers' numbering of the original checkpoints) with
the loop's provenance in its header, OUT/image_encoder/ and OUT/sdserve.json; staged beside OUT
and renamed into place whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdserve.errors import InvalidArgument
from sdserve.trainers.components import Components
from sdserve.trainers.data import CaptionedImages
from sdserve.trainers.ip_adapter_encoder import ENCODER_DIR, encode_references, encoder_digest
from sdserve.trainers.loop import (
    LoopConfig,
    Result,
    default_state_dir,
    restore_state,
    seeded_generator,
    train,
)
from sdserve.trainers.output import replace_directory, safetensors_bytes

WEIGHTS_FILE = "ip_adapter.safetensors"  # what load_ip_adapter(weight_name=...) and the engine read
METADATA_FILE = "sdserve.json"
_INIT_STREAM, _DROP_STREAM = 42, 43


@dataclass(frozen=True)
class IPAdapterConfig:
    """What the method trains; `sdserve train ip-adapter` flags mirror these fields."""

    num_tokens: int = 4
    """Image tokens the projection makes (the paper's plain IP-Adapter: 4)."""
    dropout: float = 0.05
    """Probability of each of: caption dropped, image dropped, both dropped (the paper's 0.05)."""


def check_config(config: IPAdapterConfig) -> None:
    if not 1 <= config.num_tokens <= 64:
        raise InvalidArgument(f"must be 1 to 64 (got {config.num_tokens})", field="--num-tokens")
    if not 0.0 <= config.dropout <= 1 / 3:
        raise InvalidArgument(f"must be between 0 and 0.33 (three kinds of drop; got {config.dropout})",
                              field="--dropout")


class _BranchProcessor:
    """A cross-attention layer with the method's image branch when the method has tokens set;
    the layer's own processor otherwise."""

    def __init__(self, layer: str, method: IPAdapterMethod, plain) -> None:
        self.layer, self.method, self.plain = layer, method, plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        from sdserve.engine.ip_adapter import attention_forward

        tokens = self.method.tokens  # [B, num_tokens, cross_dim] or None
        if tokens is None or attention_mask is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        to_k, to_v = self.method.to_k[self.layer], self.method.to_v[self.layer]

        def combine(query, key, value, heads, head_dim):  # each [B, H, L, d]
            text = F.scaled_dot_product_attention(query, key, value)
            image = F.scaled_dot_product_attention(query, heads(to_k(tokens)), heads(to_v(tokens)))
            return text + image  # scale 1 in training

        return attention_forward(attn, hidden_states, encoder_hidden_states, temb, combine=combine)


class IPAdapterMethod:
    """The IP-Adapter method for `loop.train`. Installs branch processors on the components' UNet's
    cross-attention layers (pass-through while no tokens are set; `remove()` puts the originals back)."""

    kind = "ip_adapter"

    def __init__(self, components: Components, images: torch.Tensor, encoder: nn.Module,
                 config: IPAdapterConfig = IPAdapterConfig(), seed: int = 0) -> None:
        from diffusers.models.embeddings import ImageProjection

        check_config(config)
        self.components, self.config, self.seed = components, config, seed
        self.encoder_sha256 = encoder_digest(encoder)
        self.embeds = encode_references(encoder, images)  # [N, D]: the encoder is frozen, so once
        self.embed_dim = int(self.embeds.shape[1])
        unet = components.unet
        cross = unet.config.cross_attention_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded_generator(seed, _INIT_STREAM).initial_seed())
            self.projection = ImageProjection(self.embed_dim, cross, config.num_tokens)
        self.to_k, self.to_v = nn.ModuleDict(), nn.ModuleDict()  # layer key -> Linear(cross, hidden)
        self.layers: list[str] = []  # cross-attention layers in attn_processors order
        self._original = dict(unet.attn_processors)
        processors = {}
        for name, processor in self._original.items():
            if not name.endswith("attn2.processor"):
                processors[name] = processor
                continue
            layer = name.removesuffix(".processor")
            attn = unet.get_submodule(layer)
            key = layer.replace(".", "_")
            for table, source in ((self.to_k, attn.to_k), (self.to_v, attn.to_v)):
                linear = nn.Linear(source.in_features, source.out_features, bias=False)
                linear.weight.data.copy_(source.weight.detach())  # the paper's initialisation
                table[key] = linear
            self.layers.append(layer)
            processors[name] = _BranchProcessor(key, self, processor)
        unet.set_attn_processor(processors)
        for module in (self.projection, self.to_k, self.to_v):
            module.train().requires_grad_(True)
        self.tokens: torch.Tensor | None = None
        self._rows: list[int] | None = None

    def remove(self) -> None:
        """Put the UNet's own processors back."""
        self.components.unet.set_attn_processor(self._original)

    def use_rows(self, rows: list[int]) -> None:
        self._rows = list(rows)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.projection.parameters(), *self.to_k.parameters(), *self.to_v.parameters()]

    def drops(self, rows: Sequence[int], timesteps: torch.Tensor) -> tuple[list[bool], list[bool]]:
        """(caption dropped, image dropped) per row: each of caption / image / both with p = dropout."""
        rng = np.random.default_rng([self.seed, _DROP_STREAM, *rows, *timesteps.tolist()])
        draws = rng.random(len(rows))
        p = self.config.dropout
        text = [bool(d < p or 2 * p <= d < 3 * p) for d in draws]
        image = [bool(p <= d < 3 * p) for d in draws]
        return text, image

    def image_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, cross_dim] of image embeddings [B, D]."""
        return self.projection(embeds)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        if self._rows is None or len(self._rows) != len(noisy):
            raise RuntimeError("IPAdapterMethod.predict needs the loop's use_rows for this batch")
        drop_text, drop_image = self.drops(self._rows, timesteps)
        captions = ["" if drop else caption for caption, drop in zip(captions, drop_text, strict=True)]
        keep = torch.tensor([not d for d in drop_image], dtype=torch.float32)[:, None]  # [B, 1]
        embeds = self.embeds[self._rows] * keep  # [B, D]; a dropped image is the zero embedding
        side = noisy.shape[-1] * self.components.vae_scale_factor
        conditioning = self.components.encode_text(captions, resolution=side)
        self.tokens = self.image_tokens(embeds).to(noisy.dtype)  # [B, T, cross]
        try:
            return self.components.predict(noisy, timesteps, conditioning)  # [B, C, h, w]
        finally:
            self.tokens = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"image_proj.{k}": v for k, v in self.projection.state_dict(keep_vars=True).items()} | {
            f"{kind}.{k}": v for kind, table in (("to_k_ip", self.to_k), ("to_v_ip", self.to_v))
            for k, v in table.state_dict(keep_vars=True).items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        restore_state({k: v.detach() for k, v in self.state_dict().items()}, state, "IP-Adapter weights")

    def metadata(self) -> dict[str, str]:
        return {
            "sdserve_num_tokens": str(self.config.num_tokens),
            "sdserve_dropout": repr(self.config.dropout),
            "sdserve_image_embed_dim": str(self.embed_dim),
            "sdserve_image_encoder_sha256": self.encoder_sha256,
        }

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors in the original checkpoints' key layout (diffusers converts them)."""
        proj = self.projection
        tensors = {
            "image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
            "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias,
        }
        for index, layer in enumerate(self.layers):
            key = layer.replace(".", "_")
            tensors[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = self.to_k[key].weight
            tensors[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = self.to_v[key].weight
        return {k: v.detach().clone().contiguous() for k, v in tensors.items()}

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        out.write_bytes(safetensors_bytes(self.adapter_tensors(), metadata))


def _is_ip_adapter_dir(path: Path) -> bool:
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("training", {}).get("sdserve_method") == IPAdapterMethod.kind


def check_output_directory(out: Path) -> None:
    """Refuse, before any work, an --out that cannot become the IP-Adapter directory."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InvalidArgument(f"{out} is a file; an IP-Adapter is written as a directory", field="--out")
        if any(out.iterdir()) and not _is_ip_adapter_dir(out):
            raise InvalidArgument(f"{out} exists and is not an IP-Adapter written by `sdserve train ip-adapter`; "
                                  "choose a new directory", field="--out")
    if not out.parent.is_dir():
        raise InvalidArgument(f"directory {out.parent} does not exist", field="--out")


def check_data(data: CaptionedImages) -> None:
    if len(data) == 0:
        raise InvalidArgument("holds no images", field="--data")


def train_ip_adapter(components: Components, data: CaptionedImages, encoder: nn.Module, cfg: LoopConfig,
                     out: Path, config: IPAdapterConfig = IPAdapterConfig()) -> Result:
    """Train an IP-Adapter on `data` over the frozen `encoder` and write the directory `out` whole.

    Raises InvalidArgument for bad input (before any training) and the loop's Diverged /
    Interrupted (no output written; the checkpoint stays in OUT.state)."""
    out = Path(out)
    check_output_directory(out)
    check_data(data)
    cfg = replace(cfg, state_dir=cfg.state_dir or default_state_dir(out))
    method = IPAdapterMethod(components, data.images, encoder, config, seed=cfg.seed)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the directory is meant to be served
        encoder.save_pretrained(staging / ENCODER_DIR)
        result = train(method, components, data, cfg, staging / WEIGHTS_FILE)
        meta = {
            "description": f"IP-Adapter for {components.name}, trained by `sdserve train ip-adapter` "
                           f"on {len(data)} images ({result.steps} steps)",
            "training": dict(sorted(result.metadata.items())),
        }
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        method.remove()
    return replace(result, out=out)
