"""Requests: bytes -> GenerateRequest -> RequestSpec -> a validated EngineRequest, the server's way.

One input is tried both as a protobuf message (as gRPC hands it to the servicer, through the
lenient deserializer) and, if it is UTF-8, as a JSON request line (requests files, the HTTP
and CLI schema). Then it goes the way `GenerationServicer._run` takes it, up to admission:
the served-model lookup, the cost estimate a loaded server refuses by, registered names mapped
to this server's files (client paths refused), `Engine.validate` against tiny-sd1 or tiny-sdxl
(the cheap path: no weights are loaded; images are decoded, embeddings and hypernetworks read),
and the admitted cost check. ControlNet and IP-Adapter stores are locked down as the server
does, with one registered model each.

The same input also builds a request directly (`structured_request`): known fields with values
mostly in range and now and then at an edge (of any JSON type), registered and unknown names,
and real or garbled images, so that validation's later rules are reached as often as its first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tests.fuzz.common import Choices, typed_errors_only

# json_format is the Python half of protobuf's JSON parser (the binary parser is upb, in C).
INSTRUMENT = ("sdserve", "google.protobuf.json_format", "PIL")
MODULES = (
    "sdserve.api.convert",
    "sdserve.server.admission",
    "sdserve.engine.request",
    "sdserve.engine.schedulers",
    "sdserve.engine.controlnet",
    "sdserve.engine.ip_adapter",
    "sdserve.engine.images",
    "sdserve.adapters.embeddings",
    "sdserve.adapters.hypernetwork",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
)

# Names a tenant has registered (what the seeds use); the values are file kinds.
REGISTERED = {
    "adapters": {"style": "style.safetensors", "slider": "slider.safetensors"},
    "embeddings": {"cat-toy": "cat-toy.safetensors"},
    "hypernetworks": {"hn": "hn.safetensors"},
}
CONTROLNET = "canny"
IP_ADAPTER = "face"
DEFAULT_MODEL = "tiny-sd1"
FAMILY_OF_FILES = "sd1"  # every registered file was uploaded for SD 1.x

_state: dict[str, Any] = {}


def _write_files(workdir: Path, info: Any) -> dict[str, dict[str, str]]:
    import safetensors.torch
    import torch

    from sdserve.adapters.hypernetwork import METADATA_KEY

    generator = torch.Generator().manual_seed(0)
    width = info.text_widths["text_encoder"]
    safetensors.torch.save_file({"<cat-toy>": torch.randn(2, width, generator=generator)},
                                str(workdir / "cat-toy.safetensors"))
    hn_width = info.attention_widths[0]
    tensors = {}
    for side in "kv":
        tensors |= {
            f"hypernetwork.{hn_width}.{side}.0.weight": torch.randn(2 * hn_width, hn_width, generator=generator),
            f"hypernetwork.{hn_width}.{side}.0.bias": torch.randn(2 * hn_width, generator=generator),
            f"hypernetwork.{hn_width}.{side}.1.weight": torch.randn(hn_width, 2 * hn_width, generator=generator),
            f"hypernetwork.{hn_width}.{side}.1.bias": torch.randn(hn_width, generator=generator),
        }
    config = {"format": 1, "layer_structure": [1, 2, 1], "activation": "relu", "activate_output": False,
              "layer_norm": False}
    safetensors.torch.save_file(tensors, str(workdir / "hn.safetensors"), metadata={METADATA_KEY: json.dumps(config)})
    # Validation records LoRA paths without reading them (residency loads them later).
    for name in REGISTERED["adapters"].values():
        (workdir / name).write_bytes(b"")
    return {field: {name: str(workdir / file) for name, file in names.items()} for field, names in REGISTERED.items()}


def _write_models(workdir: Path, info: Any) -> tuple[Path, Path]:
    """Stand-ins with what validation reads of a ControlNet (config.json) and an IP-Adapter
    (ip_adapter.safetensors's keys and shapes); their weights are never loaded here."""
    import safetensors.torch
    import torch

    controlnet = workdir / "controlnet"
    controlnet.mkdir(exist_ok=True)
    # A ControlNet's conditioning embedding takes control images down to the latent grid: as many
    # stride-2 convs as the base model's VAE has (validation refuses another stride).
    config = json.loads((info.path / "unet" / "config.json").read_text())
    vae_levels = len(json.loads((info.path / "vae" / "config.json").read_text())["block_out_channels"])
    config["conditioning_embedding_out_channels"] = [16 * 2**level for level in range(vae_levels)]
    (controlnet / "config.json").write_text(json.dumps(config))
    ip = workdir / "ip-adapter"
    (ip / "image_encoder").mkdir(parents=True, exist_ok=True)
    cross = json.loads((info.path / "unet" / "config.json").read_text())["cross_attention_dim"]
    safetensors.torch.save_file(
        {"image_proj.proj.weight": torch.zeros(4 * cross, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, cross)},
        str(ip / "ip_adapter.safetensors"),
    )
    return controlnet, ip


def setup(workdir: Path) -> None:
    from sdserve.engine import Engine, EngineConfig
    from sdserve.engine.model import read_model_info
    from sdserve.models.builtin import builtin_path
    from sdserve.server.admission import Admission
    from sdserve.server.config import AdmissionConfig

    workdir = Path(workdir)
    served = {name: read_model_info(name, builtin_path(name)) for name in ("tiny-sd1", "tiny-sdxl")}
    engine = Engine(EngineConfig(max_batch_rows=16))
    controlnet, ip = _write_models(workdir, served[DEFAULT_MODEL])
    # As the server's `_lock_down_model_stores`: registered names only, never a client's directory.
    engine.runner.controlnets.allow_paths = False
    engine.runner.controlnets.register(CONTROLNET, controlnet)
    engine.ip_adapters.allow_paths = False
    engine.ip_adapters.register(IP_ADAPTER, ip)
    _state.update(served=served, engine=engine, files=_write_files(workdir, served[DEFAULT_MODEL]),
                  admission=Admission(AdmissionConfig()), images=_images())


def _images() -> tuple[str, ...]:
    """base64 images a structured request may carry: init/control sized, mask, over the limit."""
    import base64
    import io

    from PIL import Image

    def encoded(image: Image.Image, format: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format=format)
        return base64.b64encode(buffer.getvalue()).decode()

    return (encoded(Image.new("RGB", (32, 32), (200, 30, 30)), "PNG"),
            encoded(Image.new("RGB", (16, 24), (20, 90, 160)), "JPEG"),
            encoded(Image.new("L", (32, 32), 255), "PNG"),
            encoded(Image.new("RGB", (264, 264)), "PNG"))


def _resolve_names(spec: Any, family: str) -> Any:
    """The server's `_resolve_adapters`, without its registry: names -> files, paths refused."""
    from sdserve.errors import InvalidArgument, NotFound

    changes = {}
    for field_name, files in _state["files"].items():
        resolved = []
        for index, entry in enumerate(getattr(spec, field_name)):
            where = f"{field_name}[{index}]"
            if entry.path:
                raise InvalidArgument("the server does not read client paths", field=f"{where}.path")
            if entry.name not in files:
                raise NotFound("no such adapter", field=f"{where}.name")
            if family != FAMILY_OF_FILES:
                raise InvalidArgument("is for another model family", field=f"{where}.name")
            resolved.append(dataclasses.replace(entry, path=files[entry.name]))
        if resolved:
            changes[field_name] = tuple(resolved)
    return dataclasses.replace(spec, **changes) if changes else spec


def _serve(spec: Any) -> None:
    from sdserve.errors import NotFound
    from sdserve.server.admission import estimated_cost, request_cost

    state = _state
    info = state["served"].get(spec.model or DEFAULT_MODEL)
    if info is None:
        raise NotFound("unknown model", field="model")
    state["admission"].check(estimated_cost(spec, info.defaults, info.limits), "fuzz")
    spec = _resolve_names(spec, info.family)
    request = state["engine"].validate(dataclasses.replace(spec, model=info.name), request_id="fuzz", tenant="fuzz")
    state["admission"].check(request_cost(request), "fuzz")


def _structured_value(choices: Choices, usual: Any) -> Any:
    return choices.mostly(usual, (choices.integer(), choices.number(), "x", None, True, [], {}))


def structured_request(data: bytes) -> dict[str, Any]:
    """A request (JSON form) built from `data` (see the module docstring)."""
    import base64

    from sdserve.engine.schedulers import scheduler_names

    choices = Choices(data)

    def image() -> Any:
        garbled = base64.b64encode(choices.raw(choices.below(64))).decode()
        return _structured_value(choices, choices.mostly(choices.pick(_state["images"]), (garbled, "")))

    def fraction() -> Any:
        return _structured_value(choices, choices.pick((0.0, 0.25, 0.5, 1.0)))

    usual = {
        "model": lambda: choices.mostly("", ("tiny-sdxl", "tiny-sd1", "default", "/tmp", "../x")),
        "negative_prompt": lambda: choices.pick(("", "blurry", "<cat-toy>")),
        "seed": choices.integer,
        "steps": lambda: choices.pick((1, 2, 3, 4)),
        "guidance_scale": lambda: choices.pick((1.0, 5.0, 0.0, 7.5)),
        "scheduler": lambda: choices.pick(scheduler_names()),
        "width": lambda: choices.pick((32, 48, 16, 256, 264, 0, 33)),
        "height": lambda: choices.pick((32, 48, 16, 256, 264, 0, 33)),
        "num_images": lambda: choices.pick((1, 2, 8, 9)),
        "strength": fraction,
        "preview_every": lambda: choices.pick((0, 1, 3)),
        "guidance_start": fraction,
        "guidance_end": fraction,
        "init_image": image,
        "mask": image,
        "outpaint": lambda: {side: choices.pick((0, 8, 16, -8, 4096)) for side in ("left", "top", "right", "bottom")
                             if choices.chance(160)},
    }
    request: dict[str, Any] = {"prompt": choices.mostly("a cat", ("", " ", "x" * 2001, "<cat-toy> on a mat"))}
    for name, make in usual.items():
        if choices.chance(48):
            request[name] = _structured_value(choices, make())
    for field, names in (("adapters", [*REGISTERED["adapters"]]), ("embeddings", [*REGISTERED["embeddings"]]),
                         ("hypernetworks", [*REGISTERED["hypernetworks"]])):
        if choices.chance(64):
            extra = {"adapters": ("scale", "start", "end"), "embeddings": ("token",), "hypernetworks": ("strength",)}
            request[field] = [
                {"name": choices.mostly(choices.pick(names), ("", "unknown", "style")), **(
                    {"path": "/etc/hosts"} if choices.chance(8) else {}), **{
                    key: (choices.pick(("<t>", "", "a b")) if key == "token" else fraction())
                    for key in extra[field] if choices.chance(128)}}
                for _ in range(choices.mostly(1, (0, 2, 9)))
            ]
    if choices.chance(48):
        request["controlnets"] = [
            {"model": choices.mostly(CONTROLNET, ("", "other", "/tmp")), "image": image(),
             "preprocess": choices.pick(("", "canny", "none", "depth")), "scale": fraction(),
             "start": fraction(), "end": fraction()}
            for _ in range(choices.mostly(1, (0, 2, 5)))
        ]
    if choices.chance(32):
        request["ip_adapters"] = [{"model": choices.mostly(IP_ADAPTER, ("", "other")), "image": image(),
                                   "scale": fraction()} for _ in range(choices.mostly(1, (0, 2, 5)))]
    return request


def one_input(data: bytes) -> None:
    from sdserve.api import convert
    from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb

    def grpc_route() -> None:
        message = convert._lenient(pb.GenerateRequest)(data)  # what the servicer receives
        convert.check_parsed(message)
        _serve(convert.spec_from_pb(message))

    typed_errors_only(grpc_route)
    typed_errors_only(lambda: _serve(convert.spec_from_dict(structured_request(data))))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # the requests-file reader refuses it before any JSON is parsed
    typed_errors_only(lambda: _serve(convert.spec_from_json_line(text)))
