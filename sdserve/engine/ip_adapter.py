"""IP-Adapter per request: image branches in cross-attention, only on the rows that ask.

A model directory holds `ip_adapter.safetensors` (`image_proj.*`, `ip_adapter.*`) and
`image_encoder/` (CLIPVisionModelWithProjection), the layout diffusers' `load_ip_adapter` reads.
For a request, the image encoder's embedding (zeros for the unconditional CFG rows, as diffusers
does) goes through the adapter's projection to `num_tokens` image tokens. At every cross-attention
layer, rows with branches compute

    out[b] = softmax(q K_text^T / sqrt(d)) V_text + Σ_i scale[b,i] · softmax(q K_i^T / sqrt(d)) V_i

(`kernels.scaled_multi_branch_attention`), K_i/V_i being the adapter's `to_k_ip`/`to_v_ip` of the
row's image tokens; rows of requests without an IP-Adapter get no image branch at all, and a
batch with none runs diffusers' own processor unchanged. The processors read each row's branches
and hypernetworks from the model's row context (`row_context`), set once per UNet call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdserve.adapters.hypernetwork import apply_hypernetwork
from sdserve.api.types import IPAdapterSpec
from sdserve.engine.model import MODULE_BUILD_LOCK, ModelInfo
from sdserve.engine.row_context import RowContextHolder
from sdserve.engine.store import DirectoryModel, DirectoryRegistry, WeightKey
from sdserve.errors import InvalidArgument
from sdserve.kernels import scaled_multi_branch_attention

MAX_IP_ADAPTERS = 2


@dataclass(frozen=True)
class IPAdapterUnit:
    model: str  # a name in the IPAdapterStore
    image: Any  # PIL RGB
    scale: float
    source: DirectoryModel | None = field(default=None, compare=False, repr=False)  # what `model` named


class IPAdapterWeights:
    """One IP-Adapter's modules: image encoder, projection, and per-layer to_k_ip / to_v_ip."""

    def __init__(self, path: Path, unet, device: torch.device, dtype: torch.dtype) -> None:
        import safetensors.torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        state = safetensors.torch.load_file(str(path / "ip_adapter.safetensors"))
        image_proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
        layers = {k.removeprefix("ip_adapter."): v for k, v in state.items() if k.startswith("ip_adapter.")}
        if "proj.weight" not in image_proj:
            raise InvalidArgument("only plain IP-Adapter models (image_proj.proj) are served", field="ip_adapters")
        self.projection = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
        self.projection = self.projection.to(device, dtype).eval().requires_grad_(False)
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", dtype=dtype)
        self.image_encoder = self.image_encoder.to(device).eval().requires_grad_(False)
        size = self.image_encoder.config.image_size
        self.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)
        self.num_tokens = self.projection.num_image_text_embeds
        # diffusers numbers the original checkpoint's cross-attention layers 1, 3, 5, ... in the
        # order of unet.attn_processors.
        self.to_k: dict[str, nn.Linear] = {}
        self.to_v: dict[str, nn.Linear] = {}
        key_id = 1
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            layer = name.removesuffix(".processor")
            for table, kind in ((self.to_k, "to_k_ip"), (self.to_v, "to_v_ip")):
                weight = layers[f"{key_id}.{kind}.weight"]
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight.data.copy_(weight)
                table[layer] = linear.to(device, dtype).eval().requires_grad_(False)
            key_id += 2
        self.device, self.dtype = device, dtype

    @property
    def nbytes(self) -> int:
        """What the residency store counts for it: encoder, projection and per-layer k/v weights."""
        modules = [self.image_encoder, self.projection, *self.to_k.values(), *self.to_v.values()]
        return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))

    @torch.inference_mode()
    def image_tokens(self, image, num_images: int, guidance: bool) -> torch.Tensor:
        """[rows, num_tokens, cross_dim]: zeros-embedding tokens for the uncond rows first."""
        pixels = self.feature_extractor(image, return_tensors="pt").pixel_values
        embeds = self.image_encoder(pixels.to(self.device, self.dtype)).image_embeds  # [1, D]
        embeds = embeds.repeat_interleave(num_images, dim=0)
        if guidance:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        return self.projection(embeds)


class IPAdapterStore(DirectoryRegistry):
    """IP-Adapter models by name (operator-registered directories, or a directory the CLI names);
    loaded, kept and evicted by the engine's residency store (engine/store.py), keyed by the
    directory's digest and the base model it was built for (its attention layers)."""

    kind = "ip_adapter"
    what = "IP-Adapter model"

    def is_model_dir(self, path: Path) -> bool:
        return (path / "ip_adapter.safetensors").is_file() and (path / "image_encoder").is_dir()

    def describe(self, path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        try:
            with safe_open(str(path / "ip_adapter.safetensors"), "pt") as f:
                plain = "image_proj.proj.weight" in set(f.keys())
                k_width = f.get_slice("ip_adapter.1.to_k_ip.weight").get_shape()[1] if plain else None
        except Exception as exc:  # safetensors' own error type, a missing key: not an IP-Adapter file
            raise ValueError("ip_adapter.safetensors could not be read") from exc
        return {"plain": plain, "cross_attention_dim": k_width}

    def check_fits(self, name: str, info: ModelInfo, field: str) -> DirectoryModel:
        """The registered model if it was made for `info`'s UNet (no file is read)."""
        model = self.resolve(name, field)
        if not model.facts["plain"]:
            raise InvalidArgument("only plain IP-Adapter models are served", field=field)
        ours, theirs = model.facts["cross_attention_dim"], info.unet_config.get("cross_attention_dim")
        if ours != theirs:
            raise InvalidArgument(f"was made for another base model (cross-attention {ours} vs {theirs})", field=field)
        return model

    def key(self, model: DirectoryModel, loaded) -> WeightKey:
        return WeightKey(self.kind, model.digest, loaded.info.name)

    def loader(self, model: DirectoryModel, loaded) -> Callable[[], IPAdapterWeights]:
        return partial(_load_ip_adapter, model.path, loaded.unet, loaded.device, loaded.dtype)

    def get(self, name: str, loaded) -> IPAdapterWeights:
        """The IP-Adapter `name` built for the loaded model `loaded`: held by the store, else loaded now."""
        model = self.resolve(name, "ip_adapters")
        key = self.key(model, loaded)
        weights = self.weights.peek(key)
        return weights if weights is not None else self.weights.get_now(key, self.loader(model, loaded))


def _load_ip_adapter(path: Path, unet, device: torch.device, dtype: torch.dtype) -> IPAdapterWeights:
    with MODULE_BUILD_LOCK:
        return IPAdapterWeights(path, unet, device, dtype)


def resolve_ip_units(specs: tuple[IPAdapterSpec, ...], info: ModelInfo, store: IPAdapterStore):
    from sdserve.engine.images import decode_image

    if len(specs) > MAX_IP_ADAPTERS:
        raise InvalidArgument(f"at most {MAX_IP_ADAPTERS} IP-Adapters per request", field="ip_adapters")
    units = []
    for index, spec in enumerate(specs):
        where = f"ip_adapters[{index}]"
        source = store.check_fits(spec.model, info, f"{where}.model")
        if not spec.image:
            raise InvalidArgument("needs an image", field=f"{where}.image")
        image = decode_image(spec.image, f"{where}.image", max_pixels=info.limits.max_pixels)
        scale = 1.0 if spec.scale is None else float(spec.scale)
        if not (-10.0 <= scale <= 10.0):
            raise InvalidArgument("must be between -10 and 10", field=f"{where}.scale")
        units.append(IPAdapterUnit(spec.model, image, scale, source))
    return tuple(units)


@dataclass
class PreparedIP:
    weights: IPAdapterWeights
    tokens: torch.Tensor  # [rows_i, num_tokens, cross_dim]
    scale: float


def hypernetwork_contexts(context: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111: k and v read `context + MLP(context) · strength`, each row through its own chain.

    context [B, L, width] -> (context for to_k, context for to_v), both [B, L, width].
    """
    width = context.shape[-1]
    key_context, value_context = context.clone(), context.clone()
    groups: dict[tuple, list[int]] = {}
    for row, chain in enumerate(rows):
        if chain:
            groups.setdefault(tuple((id(net), strength) for net, strength in chain), []).append(row)
    for row_list in groups.values():
        chain = rows[row_list[0]]
        index = torch.tensor(row_list, device=context.device)
        k, v = context[index], context[index]
        for net, strength in chain:
            mlps = net.modules.get(width)
            if mlps is None:  # A1111 skips widths a hypernetwork has no module for
                continue
            k = apply_hypernetwork(k, mlps[0], strength)
            v = apply_hypernetwork(v, mlps[1], strength)
        key_context[index], value_context[index] = k, v
    return key_context, value_context


def attention_forward(attn, hidden_states, encoder_hidden_states, temb, *, attend=None, hypernetworks=None,
                      combine=None):
    """diffusers' AttnProcessor2_0 (no mask, no dropout) with the attention kernel `attend` (softmax
    attention on [B, H, L, D]; None = F.scaled_dot_product_attention), the rows' hypernetworks
    applied to the key/value context, and `combine(query, key, value, heads, head_dim)` in place of
    the kernel when IP-Adapter branches join the text branch."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key_context = value_context = encoder_hidden_states
    if hypernetworks is not None:
        key_context, value_context = hypernetwork_contexts(encoder_hidden_states, hypernetworks)
    key = attn.to_k(key_context)
    value = attn.to_v(value_context)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, inner] -> [B, H, L, d]
        return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(query), heads(key), heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if combine is not None:
        out = combine(query, key, value, heads, head_dim)
    elif attend is not None:
        out = attend(query, key, value)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class RowBranchAttnProcessor:
    """diffusers' AttnProcessor2_0, plus per-row IP-Adapter branches and hypernetworks when the
    current row context has any; without them the processor installed at load (`plain`: diffusers'
    own, or the engine's attention backend) runs unchanged. `attend` is that backend's kernel, which
    the branch path uses too (None: torch's sdpa)."""

    def __init__(self, layer: str, rows: RowContextHolder, plain, cross: bool, attend=None) -> None:
        self.layer = layer
        self.rows = rows
        self.plain = plain
        self.cross = cross
        self.attend = attend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = self.rows.current
        branches = context.ip_rows if context is not None and self.cross else None
        hypernetworks = context.hypernetwork_rows if context is not None else None
        if (branches is None and hypernetworks is None) or attention_mask is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        combine = None
        if branches is not None:
            def combine(query, key, value, heads, head_dim):
                return self._with_branches(query, key, value, branches, attn.heads, head_dim, heads)
        return attention_forward(attn, hidden_states, encoder_hidden_states, temb, attend=self.attend,
                                 hypernetworks=hypernetworks, combine=combine)

    def _with_branches(self, query, key, value, rows, num_heads, head_dim, heads):
        batch = query.shape[0]
        num_branches = max(len(r) for r in rows)
        max_tokens = max(t.shape[0] for r in rows for _, t, _ in r)
        k_image = query.new_zeros(batch, num_branches, num_heads, max_tokens, head_dim)
        v_image = torch.zeros_like(k_image)
        scales = torch.zeros(batch, num_branches, dtype=torch.float32, device=query.device)
        present = torch.zeros(batch, num_branches, dtype=torch.bool, device=query.device)
        lengths = torch.full((batch, num_branches), max_tokens, dtype=torch.int32, device=query.device)
        for row, branches in enumerate(rows):
            for b, (weights, tokens, scale) in enumerate(branches):
                count = tokens.shape[0]
                k_image[row, b, :, :count] = heads(weights.to_k[self.layer](tokens[None]))[0]
                v_image[row, b, :, :count] = heads(weights.to_v[self.layer](tokens[None]))[0]
                scales[row, b] = scale
                present[row, b] = scale != 0.0  # diffusers skips a branch at scale 0
                lengths[row, b] = count
        return scaled_multi_branch_attention(query, key, value, k_image, v_image, scales, present, lengths,
                                             attend=self.attend)


def install_processors(unet, rows: RowContextHolder) -> None:
    """Once per model, at load: every attention layer gets a row-aware processor reading `rows`."""
    processors = {}
    for name, processor in unet.attn_processors.items():
        cross = name.endswith("attn2.processor")
        # The attention backend's kernel (engine/attention_backend.py), if one was installed at load.
        attend = getattr(processor, "attend", None)
        processors[name] = RowBranchAttnProcessor(name.removesuffix(".processor"), rows, processor, cross, attend)
    unet.set_attn_processor(processors)
