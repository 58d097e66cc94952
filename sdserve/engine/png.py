"""PNG output with the generation parameters in a text chunk ("parameters", as A1111 writes it)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdserve.engine.request import EngineRequest


def parameters_text(request: EngineRequest, image_index: int = 0) -> str:
    """A1111-style parameters: prompt, negative prompt line, then `Key: value` pairs."""
    lines = [request.prompt]
    if request.negative_prompt is not None:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    pairs = {
        "Steps": request.steps,
        "Sampler": request.scheduler,
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model": request.model if "/" not in request.model else request.model.rstrip("/").rsplit("/", 1)[-1],
    }
    if (request.guidance_start, request.guidance_end) != (0.0, 1.0):
        pairs["Guidance interval"] = f"{request.guidance_start:g}-{request.guidance_end:g}"
    if request.clip_skip != 1:
        pairs["Clip skip"] = request.clip_skip  # A1111's key and meaning
    if request.num_images > 1:
        pairs["Batch pos"] = image_index
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


def encode_png(image: np.ndarray, parameters: str) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes carrying `parameters` (no text chunk when it is empty)."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
