"""Cheap previews of a request's current latents, for GenerateStream progress events.

A model's preview decoder is picked once per loaded model (`preview_decoder`), first that applies:
1. **fitted**: `preview_decoder.safetensors` in the model's directory: each latent pixel's
   k x k neighbourhood mapped to RGB by a linear map plus bias (least squares) or by a tiny
   two-layer net (a k x k conv, SiLU, a 1x1 conv), fitted against the model's own VAE decode
   (`sdserve models fit-preview`, engine/preview_fit.py). The default model ships one.
2. **vae**: the model's own VAE, when its decoder is small enough to run every step
   (`CHEAP_VAE_PARAMS`, the tiny built-in models), its image area-averaged to latent resolution.
3. **sd-factors**: the fixed latent->RGB factors A1111-style UIs use for SD 1.x/2.x, for
   4-channel latents (SD's VAE; they fit no other VAE well).
4. **grey**: the channel mean, for anything else.

Every preview is uint8 [h, w, 3] at latent resolution.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREVIEW_FILE = "preview_decoder.safetensors"
# A VAE decoder up to this many parameters previews every step (the tiny built-in models: ~0.1-1 M);
# SD's (49 M) would cost more than a denoise step.
CHEAP_VAE_PARAMS = 2_000_000

# rgb = latent_channels @ FACTORS, per pixel: [4, 3]
SD_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def _to_uint8(rgb01: torch.Tensor) -> np.ndarray:
    """[h, w, 3] in [0, 1] -> uint8."""
    return (rgb01.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@torch.inference_mode()
def sd_factors_preview(latents: torch.Tensor) -> np.ndarray:
    """latents [C, h, w] -> uint8 [h, w, 3]: SD's fixed factors (4 channels), else a grey mean."""
    x = latents.detach().float().cpu()
    if x.shape[0] == SD_LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", x, SD_LATENT_RGB)  # roughly in [-1, 1]
    else:
        rgb = x.mean(0, keepdim=True).permute(1, 2, 0).expand(-1, -1, 3)
    return _to_uint8((rgb + 1) / 2)


latent_preview = sd_factors_preview  # the name engine code and older callers use


def neighbourhood_features(latents: torch.Tensor, kernel: int) -> torch.Tensor:
    """latents [N, C, h, w] -> [N, h, w, C·k·k + 1]: each pixel's k x k neighbourhood (edges
    replicated) and a constant 1 for the bias."""
    n, c, h, w = latents.shape
    pad = kernel // 2
    x = torch.nn.functional.pad(latents, (pad, pad, pad, pad), mode="replicate") if pad else latents
    cols = torch.nn.functional.unfold(x, kernel)  # [N, C·k·k, h·w]
    cols = cols.transpose(1, 2).reshape(n, h, w, c * kernel * kernel)
    return torch.cat([cols, torch.ones(n, h, w, 1, dtype=cols.dtype)], dim=-1)


@dataclass(frozen=True)
class FittedPreview:
    """A model's fitted preview decoder, in [0, 1] per channel:
    hidden = 0: rgb = f @ W, with f = features(latents, k) (the last row of W is the bias);
    hidden > 0: rgb = [silu(f @ W1), 1] @ W2 (a k x k conv, SiLU, a 1x1 conv).
    """

    weights: tuple[torch.Tensor, ...]  # hidden 0: ([C·k·k + 1, 3],); else ([C·k·k + 1, H], [H + 1, 3])
    kernel: int
    channels: int

    @property
    def hidden(self) -> int:
        return 0 if len(self.weights) == 1 else int(self.weights[0].shape[1])

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, C, h, w] -> [N, h, w, 3], unclamped (what the fit minimises against)."""
        x = neighbourhood_features(latents, self.kernel)  # [N, h, w, C·k·k + 1]
        for weight in self.weights[:-1]:
            x = torch.nn.functional.silu(x @ weight)
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        return x @ self.weights[-1]

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """latents [C, h, w] -> uint8 [h, w, 3]."""
        with torch.inference_mode():
            return _to_uint8(self.rgb(latents.detach().float().cpu()[None])[0])

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        import safetensors.torch

        meta = {"kernel": str(self.kernel), "channels": str(self.channels), "hidden": str(self.hidden), **metadata}
        tensors = {f"layer{i}": w.float().contiguous() for i, w in enumerate(self.weights)}
        safetensors.torch.save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> FittedPreview:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = tuple(f.get_tensor(f"layer{i}").float() for i in range(len(list(f.keys()))))
        kernel, channels, hidden = int(meta["kernel"]), int(meta["channels"]), int(meta.get("hidden", 0))
        inputs = channels * kernel * kernel + 1
        shapes = [(inputs, 3)] if hidden == 0 else [(inputs, hidden), (hidden + 1, 3)]
        if kernel % 2 != 1 or [tuple(w.shape) for w in weights] != shapes:
            raise ValueError(f"{path.name}: layers {[tuple(w.shape) for w in weights]} do not fit kernel {kernel}, "
                             f"{channels} channels, hidden {hidden}")
        return cls(weights, kernel, channels)


class VaePreview:
    """The model's own VAE decode, area-averaged to latent resolution."""

    def __init__(self, model: Any) -> None:
        self._model = weakref.proxy(model) if _weakrefable(model) else model

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        from sdserve.engine.decode import decode_latents

        with torch.inference_mode():
            image = decode_latents(self._model, latents[None])[0]  # [H, W, 3] uint8
            return _area_downsample(image, latents.shape[-2:])


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _area_downsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], each output pixel the mean of its H/h x W/w block."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W]
    small = torch.nn.functional.adaptive_avg_pool2d(x, tuple(size))[0].permute(1, 2, 0)
    return _to_uint8(small)


@dataclass(frozen=True)
class PreviewDecoder:
    kind: str  # "fitted", "vae", "sd-factors" or "grey"
    decode: Callable[[torch.Tensor], np.ndarray]  # latents [C, h, w] -> uint8 [h, w, 3]

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return self.decode(latents)


_CHOSEN: dict[int, tuple[Any, PreviewDecoder]] = {}  # id(model) -> (weakref to it, its decoder)
_LOCK = threading.Lock()


def choose_preview_decoder(model: Any) -> PreviewDecoder:
    """The preview decoder of a loaded model (engine.model.LoadedModel), by the rules above."""
    path = getattr(model.info, "path", None)
    fitted = Path(path) / PREVIEW_FILE if path else None
    channels = int(getattr(getattr(model.vae, "config", None), "latent_channels", 4))
    if fitted is not None and fitted.is_file():
        decoder = FittedPreview.load(fitted)
        if decoder.channels == channels:
            return PreviewDecoder("fitted", decoder)
    vae_decoder = getattr(model.vae, "decoder", None)
    if isinstance(vae_decoder, torch.nn.Module) and sum(p.numel() for p in vae_decoder.parameters()) <= CHEAP_VAE_PARAMS:
        return PreviewDecoder("vae", VaePreview(model))
    return PreviewDecoder("sd-factors" if channels == 4 else "grey", sd_factors_preview)


def preview_decoder(model: Any) -> PreviewDecoder:
    """`choose_preview_decoder`, once per loaded model."""
    with _LOCK:
        entry = _CHOSEN.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1]
    chosen = choose_preview_decoder(model)
    if _weakrefable(model):
        key = id(model)
        with _LOCK:  # the entry goes when the model does (an id may be reused after that)
            _CHOSEN[key] = (weakref.ref(model, lambda _: _CHOSEN.pop(key, None)), chosen)
    return chosen


def model_preview(model: Any, latents: torch.Tensor) -> np.ndarray:
    """latents [C, h, w] of `model` -> uint8 [h, w, 3] with the model's preview decoder."""
    return preview_decoder(model)(latents)
