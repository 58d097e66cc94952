"""A request as its caller gave it: the domain form of the proto's GenerateRequest.

Plain frozen dataclasses, field for field the proto's messages, absent fields None. They import
nothing (no torch, no server), so the Python client, the CLI and the JSON reader can build them;
the engine's `request.resolve` checks them and fills defaults into an `EngineRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AdapterSpec:
    """One entry of a request's adapter stack: the proto's AdapterRef (None = absent).

    The engine needs `path`; `name`, when given, is only the label errors and responses use.
    `sha256`, when given (the server's registry knows it), is the file's identity: the engine
    trusts it instead of hashing the file again."""

    name: str = ""
    path: str = ""
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    sha256: str = ""


@dataclass(frozen=True)
class EmbeddingSpec:
    """A textual-inversion embedding as given (the engine reads `path`; `name` labels it;
    `sha256`, when the server's registry knows it, is the file's identity, as for adapters)."""

    name: str = ""
    path: str = ""
    token: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class HypernetworkSpec:
    name: str = ""
    path: str = ""
    strength: float | None = None
    sha256: str = ""


@dataclass(frozen=True)
class ControlSpec:
    """One unit as given: the proto's ControlNetUnit (None = absent)."""

    model: str
    image: bytes
    preprocess: str = ""
    scale: float | None = None
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class IPAdapterSpec:
    """One entry of a request's `ip_adapters` as given (None = absent)."""

    model: str
    image: bytes
    scale: float | None = None


@dataclass(frozen=True)
class RequestSpec:
    """A request as given, field for field the proto's GenerateRequest; None = absent."""

    model: str = ""
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    num_images: int | None = None
    adapters: tuple[AdapterSpec, ...] = ()
    init_image: bytes | None = None  # PNG/JPEG bytes
    strength: float | None = None
    mask: bytes | None = None  # PNG/JPEG bytes
    outpaint: tuple[int, int, int, int] | None = None  # left, top, right, bottom
    controlnets: tuple[ControlSpec, ...] = ()
    ip_adapters: tuple[IPAdapterSpec, ...] = ()
    embeddings: tuple[EmbeddingSpec, ...] = ()
    hypernetworks: tuple[HypernetworkSpec, ...] = ()
    preview_every: int | None = None
    guidance_start: float | None = None
    guidance_end: float | None = None
    clip_skip: int | None = None  # A1111's meaning: 1 = the model's own layer
    prompt_syntax: str | None = None  # "plain" | "a1111"; None = the server's default


def spec_field_names() -> list[str]:
    return [f.name for f in fields(RequestSpec)]
