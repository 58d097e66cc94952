"""Seed corpora and libFuzzer dictionaries, made at test time from what the tests already make.

Binary seeds (LoRA files in every layout, embeddings, hypernetworks, images, protobuf requests)
are generated into a directory each run, never committed; the small text seeds (JSON request
lines, TOML configs) live in `seeds/` beside this file, and the example config ships with the
package. A fuzz run starts from valid inputs, so its mutations reach past the first checks.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

TEXT_SEEDS = Path(__file__).resolve().parent / "seeds"


def _write(directory: Path, files: dict[str, bytes]) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return len(files)


# -- adapters --------------------------------------------------------------------------------


def _lora_files() -> dict[str, bytes]:
    """PEFT-made LoRAs for tiny-sd1 in every layout sdserve reads, and tiny-sdxl in sgm naming."""
    import tempfile

    from peft import LoraConfig

    from tests.adapters.lora_factory import CLIP_ATTENTION, LAYOUTS, make_peft_lora, write_lora
    from tests.engine.lora_cases import model_components

    files: dict[str, bytes] = {}
    # Rank 1 on a few module kinds keeps the files small (a few KB): mutations stay fast.
    sd1_configs = {
        "unet": LoraConfig(r=1, lora_alpha=2, target_modules=["to_q", "proj_in", "conv1"]),
        "text_encoder": LoraConfig(r=1, lora_alpha=1, target_modules=CLIP_ATTENTION[:1]),
    }
    sdxl_configs = {
        "unet": LoraConfig(r=1, lora_alpha=1, target_modules=["to_v", "conv2"]),
        "text_encoder_2": LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]),
    }
    sd1 = make_peft_lora(model_components("tiny-sd1"), sd1_configs, seed=1)
    sdxl = make_peft_lora(model_components("tiny-sdxl"), sdxl_configs, seed=2)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "lora.safetensors"
        cases = [("sd1", layout, None) for layout in LAYOUTS]
        cases += [("sdxl", "kohya_sgm", None), ("sdxl", "peft", None)]
        cases += [("sd1", "kohya", {"prompts": "[]", "config": "{}"})]  # a Concept Slider's metadata
        for model, layout, metadata in cases:
            write_lora(sd1 if model == "sd1" else sdxl, path, layout=layout, extra_metadata=metadata)
            slider = "-slider" if metadata else ""
            files[f"lora-{model}-{layout}{slider}.safetensors"] = path.read_bytes()
    return files


def _other_adapter_files() -> dict[str, bytes]:
    """Embeddings (diffusers, kohya, SDXL layouts), hypernetworks, and kinds that are refused."""
    import safetensors.torch
    import torch

    from sdserve.adapters.hypernetwork import METADATA_KEY

    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def hypernetwork(width: int, layer_norm: bool, activation: str) -> bytes:
        tensors = {}
        for side in "kv":
            for layer, (out, inp) in enumerate(((2 * width, width), (width, 2 * width))):
                prefix = f"hypernetwork.{width}.{side}.{layer}"
                tensors |= {f"{prefix}.weight": randn(out, inp), f"{prefix}.bias": randn(out)}
                if layer_norm:
                    tensors |= {f"{prefix}.norm.weight": torch.ones(out), f"{prefix}.norm.bias": torch.zeros(out)}
        config = {"format": 1, "layer_structure": [1, 2, 1], "activation": activation,
                  "activate_output": False, "layer_norm": layer_norm}
        return safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(config)})

    files = {
        "embedding-diffusers.safetensors": safetensors.torch.save({"<cat-toy>": randn(2, 32)}),
        "embedding-single-vector.safetensors": safetensors.torch.save({"<dog>": randn(32).half()}),
        "embedding-kohya.safetensors": safetensors.torch.save({"emb_params": randn(3, 32)}),
        "embedding-sdxl.safetensors": safetensors.torch.save({"clip_l": randn(2, 32), "clip_g": randn(2, 32)}),
        "hypernetwork-32.safetensors": hypernetwork(32, False, "relu"),
        "hypernetwork-32-norm.safetensors": hypernetwork(32, True, "swish"),
        "hypernetwork-8.safetensors": hypernetwork(8, False, "linear"),  # a width tiny-sd1 lacks
        "loha.safetensors": safetensors.torch.save(
            {"lora_unet_a.hada_w1_a": randn(2, 2), "lora_unet_a.hada_w1_b": randn(2, 2)}),
        "dora-metadata.safetensors": safetensors.torch.save(
            {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": randn(1, 64)},
            metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})}),
        "empty.safetensors": safetensors.torch.save({}),
        "int-dtype.safetensors": safetensors.torch.save({"emb_params": torch.arange(32, dtype=torch.int32)}),
    }
    # A header not padded to 8 bytes (some writers do this): tensors are misaligned in the file.
    header = json.dumps({"<x>": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}}).encode()
    files["unpadded.safetensors"] = struct.pack("<Q", len(header)) + header + randn(32).numpy().tobytes()
    return files


def adapters(directory: Path) -> int:
    return _write(directory, {**_lora_files(), **_other_adapter_files()})


# -- images ----------------------------------------------------------------------------------


def _scene(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)  # [H, W, 3]
    array[height // 4 : height // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(array)


def _encode(image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def image_files() -> dict[str, bytes]:
    """Small images in every mode and encoding the decoder meets, plus formats it refuses."""
    from PIL import Image

    rgb = _scene(32, 24, 0)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90 degrees (width and height swap)
    mirrored = Image.Exif()
    mirrored[0x0112] = 2
    return {
        "rgb.png": _encode(rgb, "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "gray.png": _encode(rgb.convert("L"), "PNG"),
        "bilevel.png": _encode(rgb.convert("1"), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG", transparency=0),
        "gray16.png": _encode(rgb.convert("I;16"), "PNG"),
        "exif-rotated.png": _encode(_scene(16, 8, 1), "PNG", exif=rotated),
        "text-chunk.png": _encode(_scene(8, 8, 2), "PNG", pnginfo=_pnginfo()),
        "baseline.jpg": _encode(rgb, "JPEG", quality=80),
        "progressive.jpg": _encode(_scene(40, 16, 3), "JPEG", progressive=True),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "exif-rotated.jpg": _encode(_scene(24, 8, 4), "JPEG", exif=rotated),
        "exif-mirrored.jpg": _encode(_scene(8, 16, 5), "JPEG", exif=mirrored),
        "subsampled.jpg": _encode(_scene(17, 13, 6), "JPEG", subsampling=2),
        "mask.png": _encode(Image.new("L", (32, 24), 255), "PNG"),
        # Formats the server refuses: they must fail as "not an image", not inside a decoder.
        "lossy.webp": _encode(rgb, "WEBP"),
        "anim.gif": _encode(rgb.convert("P"), "GIF"),
        "plain.bmp": _encode(rgb, "BMP"),
    }


def _pnginfo():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 4, Sampler: euler")
    info.add_itxt("comment", "ünïcode", zip=True)
    return info


def images(directory: Path) -> int:
    return _write(directory, image_files())


# -- requests --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request_dicts() -> list[dict]:
    """The committed JSON lines, plus requests that carry images (generated: PNG bytes)."""
    lines = (TEXT_SEEDS / "requests.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in lines if line.strip()]
    from PIL import Image

    picture = _encode(_scene(32, 32, 7), "PNG")
    small = _encode(_scene(16, 16, 8), "JPEG")
    mask = _encode(Image.new("L", (32, 32), 255), "PNG")
    requests += [
        {"prompt": "a cat", "init_image": _b64(picture), "strength": 0.5, "steps": 4},
        {"prompt": "a cat", "init_image": _b64(picture), "mask": _b64(mask), "steps": 2},
        {"prompt": "a cat", "init_image": _b64(small), "outpaint": {"left": 8, "top": 0, "right": 8, "bottom": 16}},
        {"prompt": "edges", "steps": 2, "controlnets": [
            {"model": "canny", "image": _b64(picture), "preprocess": "canny", "scale": 0.8, "start": 0.0, "end": 0.5}]},
        {"prompt": "a face", "steps": 2, "ip_adapters": [{"model": "face", "image": _b64(small), "scale": 0.6}]},
    ]
    return requests


def request_files() -> dict[str, bytes]:
    from sdserve.api.convert import pb_from_dict

    files = {}
    for index, request in enumerate(request_dicts()):
        files[f"request-{index}.json"] = json.dumps(request).encode()
        files[f"request-{index}.pb"] = pb_from_dict(request).SerializeToString()
    return files


def requests(directory: Path) -> int:
    return _write(directory, request_files())


# -- config ----------------------------------------------------------------------------------


def config_files() -> dict[str, bytes]:
    from sdserve.server import config

    example = Path(config.__file__).resolve().parent / "example-config.toml"
    files = {"example-config.toml": example.read_bytes(), "empty.toml": b""}
    for path in sorted((TEXT_SEEDS / "config").glob("*.toml")):
        files[path.name] = path.read_bytes()
    return files


def config(directory: Path) -> int:
    return _write(directory, config_files())


WRITERS: dict[str, Callable[[Path], int]] = {
    "adapters": adapters, "images": images, "requests": requests, "config": config,
}


def write_seeds(target: str, directory: Path) -> int:
    """Write `target`'s seed corpus into `directory`; returns the number of seeds."""
    return WRITERS[target](Path(directory))


# -- dictionaries: tokens that mutations splice in, so they reach past keyword checks --------


def _tokens(target: str) -> Iterable[bytes]:
    if target == "adapters":
        words = ["__metadata__", "dtype", "shape", "data_offsets", "F64", "F32", "F16", "BF16", "F8_E4M3",
                 "I64", "I8", "U8", "BOOL", ".lora_A.weight", ".lora_B.weight", ".lora_down.weight",
                 ".lora_up.weight", ".alpha", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_",
                 "text_model.", "unet.", "text_encoder.", "text_encoder_2.", "input_blocks_", "middle_block_",
                 "output_blocks_", "hypernetwork.", "sdserve_hypernetwork", "layer_structure", "activation",
                 "layer_norm", "activate_output", "lora_adapter_metadata", "use_dora", "rank_pattern",
                 "alpha_pattern", "use_rslora", "target_modules", "lora_alpha", "emb_params", "clip_l",
                 "clip_g", "string_to_param", "hada_w1_a", "lokr_w1", "sdserve_slider", ".processor.to_q_lora",
                 ".lora_linear_layer.", "[]", "{}", "1e309", "-1", "18446744073709551615"]
        return [w.encode() for w in words]
    if target == "images":
        return [b"\x89PNG\r\n\x1a\n", b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"eXIf", b"iCCP", b"zTXt",
                b"iTXt", b"acTL", b"fcTL", b"\xff\xd8\xff", b"\xff\xc0", b"\xff\xc2", b"\xff\xc4", b"\xff\xdb",
                b"\xff\xda", b"\xff\xdd", b"\xff\xe1", b"Exif\x00\x00", b"MM\x00*", b"II*\x00", b"\x01\x12",
                b"\xff\xff\xff\xff", b"\x00\x00\x80\x00"]
    if target == "requests":
        from sdserve.engine.schedulers import scheduler_names
        from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb

        names: set[str] = set()
        for message in pb.DESCRIPTOR.message_types_by_name.values():
            names.update(field.name for field in message.fields)
        words = [f'"{name}"' for name in sorted(names)] + [f'"{name}"' for name in scheduler_names()]
        words += ["NaN", "Infinity", "-Infinity", "1e309", "-1", "2147483648", "9223372036854775808", "null",
                  "true", '"canny"', '"face"', '"style"', '"cat-toy"', '"hn"', '"tiny-sdxl"', '"/etc"', '"../"']
        return [w.encode() for w in words]
    if target == "config":
        import dataclasses

        from sdserve.engine.config import EngineConfig, ResidencyConfig
        from sdserve.server import config as server_config

        classes = [server_config.ServerConfig, server_config.ModelsConfig, server_config.AdmissionConfig,
                   server_config.RegistryConfig, server_config.TenantConfig, EngineConfig, ResidencyConfig]
        words = [f.name for cls in classes for f in dataclasses.fields(cls)]
        words += ["[server]", "[models]", "[engine]", "[engine.residency]", "[admission]", "[registry]",
                  "[[tenants]]", "[models.controlnets]", "key", "true", "false", "inf", "nan", "-0", "1e999",
                  "0x7fffffffffffffff", "[]", "{}", '"""', "'''", "1979-05-27T07:32:00Z"]
        return [w.encode() for w in words]
    raise KeyError(target)


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b not in (0x22, 0x5C) else f"\\x{b:02X}" for b in token)


def write_dictionary(target: str, path: Path) -> Path:
    """A libFuzzer dictionary (`-dict=`) of `target`'s keywords."""
    lines = [f'kw{index}="{_escape(token)}"' for index, token in enumerate(_tokens(target))]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
