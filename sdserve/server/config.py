"""The server's configuration: one TOML file parsed into one frozen dataclass per domain.

    [server]      host, port, metrics_port, http_port, grace period, message sizes, log level
    [models]      which models to serve and which is the default
    [engine]      the engine's own EngineConfig (batch rows, device, dtype, ...)
    [admission]   cost bounds and fair sharing between tenants
    [registry]    where adapters live and how large they may be
    [[tenants]]   API keys -> tenants, admin flag, quotas
    [[variants]]  compiled variants of hot stacks: (base model, fused dir); see server/variants.py

Every section and key is optional; an empty file (or no file) serves `default` on
127.0.0.1:50051 to one local tenant without a key. Unknown keys are errors, so a typo does not
silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdserve.engine import EngineConfig
from sdserve.errors import InvalidArgument
from sdserve.server.variants import VariantConfig

LOCAL_TENANT = "local"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ServerConfig:
    """How the gRPC server listens and shuts down."""

    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server local, 0.0.0.0 exposes it."""
    port: int = 50051
    """gRPC port; 0 picks a free one (the chosen port is logged)."""
    metrics_port: int | None = None
    """Port of the Prometheus text endpoint; None disables it, 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds: local by default even when `host` exposes gRPC, so
    a scraper on the machine (or a sidecar) reads it and tenants cannot."""
    metrics_token_sha256: str = ""
    """sha256 (hex) of a bearer token the metrics endpoint requires ("" = none); set it whenever
    `metrics_host` is reachable by anyone but the operator's scraper."""
    metrics_tenant_labels: bool = False
    """Label per-tenant metrics (refusals; queue and request latency histograms) with tenant names;
    off by default, since anyone who can read the metrics then learns every tenant's name and load."""
    grace_seconds: float = 30.0
    """On SIGTERM, how long running requests may take to finish before they are cancelled."""
    max_receive_message_bytes: int = 64 * 1024 * 1024
    """Largest message a client may send: a request may carry init/mask/ControlNet images as PNG;
    adapter uploads arrive in chunks of ~1 MiB."""
    max_send_message_bytes: int = 256 * 1024 * 1024
    """Largest message the server sends: a response carries every image of a request as PNG."""
    log_level: str = "INFO"
    """Python logging level name."""
    max_concurrent_streams: int = 100
    """HTTP/2 limit on calls one connection may have open at once (a client that opens more
    waits for one to end): one connection cannot hold unbounded server memory. 100 is HTTP/2's
    recommended minimum: at 32, a load generator with ~150 calls open on one channel saw 3 of 245
    calls fail UNAVAILABLE (streams refused while the client's count raced the server's); what a
    tenant's calls may hold is bounded by admission, counted until each response is delivered."""
    keepalive_seconds: float = 60.0
    """Ping an idle connection this often, and drop it if the ping is unanswered for
    `keepalive_timeout_seconds`: dead peers do not keep their streams open."""
    keepalive_timeout_seconds: float = 20.0
    """How long a keepalive ping may go unanswered before the connection is closed."""
    max_connection_idle_seconds: float = 600.0
    """Close a connection with no call open for this long."""
    max_connection_age_seconds: float = 3600.0
    """Ask clients to reconnect after this long (GOAWAY), so load rebalances and no connection
    lives forever; calls open then get `max_connection_age_grace_seconds` to finish."""
    max_connection_age_grace_seconds: float = 600.0
    """How long calls on a connection past its age may still run."""
    tls_cert: str = ""
    """PEM certificate (chain) of the server; with `tls_key`, the gRPC port speaks TLS only.
    Never expose a server whose tenants have API keys without it: keys would cross the network
    readable. "" = plaintext."""
    tls_key: str = ""
    """PEM private key of `tls_cert`."""
    tls_client_ca: str = ""
    """PEM CA certificate(s): when set, a client must present a certificate one of them signed
    (mutual TLS), on top of its API key. Needs `tls_cert`."""
    http_port: int | None = None
    """Port of the HTTP/JSON gateway and its playground page at `/` (server/http_gateway.py): the
    same sdserve.v1 calls, auth and admission as gRPC. None disables it, 0 picks a free one. With
    `tls_cert` set it speaks HTTPS only, with the same certificate (and client CA)."""
    http_host: str = ""
    """Address the HTTP gateway binds; "" = `host`."""
    tracing: str = "off"
    """OpenTelemetry traces of each Generate call (span tree: sdserve.request > admission, denoise
    with one event per batch step, decode; docs/observability.md): "off", "console" (spans printed
    to stdout) or "otlp" (OTLP/gRPC exporter). Needs the `otel` extra; off costs nothing."""
    otlp_endpoint: str = ""
    """With tracing = "otlp": the collector's address (e.g. http://localhost:4317); "" = the
    standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT variables, else localhost:4317."""


@dataclass(frozen=True)
class ModelsConfig:
    """Which models the server serves."""

    serve: tuple[str, ...] = ("default",)
    """Built-in model names, local diffusers-format directories (fp16-variant-only ones included)
    or single-file checkpoints (`.safetensors` in the original SD 1.x/2.x/XL layout, converted
    once into $SDSERVE_HOME/models/single-file/); all are loaded at start-up."""
    default: str = ""
    """The model an empty GenerateRequest.model selects; "" = the first of `serve`."""
    controlnets: dict[str, str] = field(default_factory=dict)
    """ControlNet models requests may name: name -> local diffusers-format directory. Requests
    can name only these (never a directory of their own)."""
    ip_adapters: dict[str, str] = field(default_factory=dict)
    """IP-Adapter models requests may name: name -> directory with ip_adapter.safetensors and
    image_encoder/. Requests can name only these."""
    vae: dict[str, str] = field(default_factory=dict)
    """A separate VAE per served model: model (as named in `serve`) -> VAE file (`.safetensors`,
    original or diffusers layout) or directory (an AutoencoderKL dir, or a model dir with vae/)."""

    @property
    def default_model(self) -> str:
        return self.default or self.serve[0]


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission by cost: cost = width × height × steps × UNet rows (pixels × steps × CFG rows)."""

    max_pending_cost: int = 64 * 512 * 512 * 50
    """Most cost queued and running at once; a request beyond it is refused with RESOURCE_EXHAUSTED
    at once, before any encoding work."""
    max_tenant_pending_cost: int = 32 * 512 * 512 * 50
    """Most cost one tenant may have queued and running: keeps room for the other tenants when
    one of them floods the server."""
    max_inflight_cost: int = 16 * 512 * 512 * 50
    """Most cost released into the engine at once; the rest waits in per-tenant queues and is
    released fairly (the tenant with the least cost running goes first)."""


@dataclass(frozen=True)
class RegistryConfig:
    """The adapter registry: a content-addressed store and an SQLite index."""

    data_dir: str = ""
    """Directory holding `adapters/` (files by sha256) and `registry.db`; "" = $SDSERVE_HOME/server."""
    max_adapter_bytes: int = 512 * 1024 * 1024
    """Largest adapter file accepted by an upload."""
    max_rank: int = 128
    """Largest LoRA rank accepted by an upload."""
    max_concurrent_uploads: int = 4
    """Uploads the server receives and validates at once (all tenants); beyond it an upload is
    refused with RESOURCE_EXHAUSTED at once. It is also the number of validation workers."""
    max_tenant_concurrent_uploads: int = 2
    """Uploads one tenant may have under way at once."""
    validate_timeout_seconds: float = 30.0
    """Longest an uploaded file's validation may run (in a worker process, never holding the
    server's GIL); past it the worker is killed and the upload refused."""
    validate_memory_bytes: int = 4 * 1024 * 1024 * 1024
    """Address-space limit of a validation worker process (RLIMIT_AS, on top of what the worker
    maps at start-up); an upload whose validation needs more is refused."""


@dataclass(frozen=True)
class TenantConfig:
    """One tenant: who it is, how it proves it, and what it may store."""

    name: str
    """Tenant name: adapter names are scoped by it; appears in logs and metrics."""
    key_sha256: str = ""
    """sha256 (hex) of the tenant's API key; "" = the anonymous tenant (calls without a key)."""
    admin: bool = False
    """Admins may publish and delete shared adapters."""
    max_adapters: int = 100
    """Most adapters the tenant may register."""
    max_adapter_bytes_total: int = 4 * 1024 * 1024 * 1024
    """Most bytes of adapter files the tenant may register."""


@dataclass(frozen=True)
class Config:
    """The whole server configuration, passed around as one object."""

    server: ServerConfig = field(default_factory=ServerConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tenants: tuple[TenantConfig, ...] = (TenantConfig(LOCAL_TENANT, admin=True),)
    """No [[tenants]] in the file = one local admin tenant without a key (`make serve`)."""
    variants: tuple[VariantConfig, ...] = ()
    """Compiled variants: requests whose stack matches one run on its directory (server/variants.py)."""

    @property
    def open_access(self) -> bool:
        """True when some tenant needs no key (anyone who reaches the port can call)."""
        return any(not t.key_sha256 for t in self.tenants)


def _section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidArgument(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidArgument(f"[{where}] unknown key {unknown[0]!r}; keys are {', '.join(known)}")
    # TOML arrays become tuples: the dataclasses are frozen and hashable all the way down.
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    for key, value in values.items():
        factory = known[key].default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            # A nested table, e.g. [engine.residency]; anything else there is refused by _section
            # (a scalar would otherwise be kept, and fail only when the server first reads it).
            values[key] = _section(factory, value, f"{where}.{key}")
            continue
        _check_type(f"{where}.{key}", str(known[key].type), value)
    try:
        return cls(**values)
    except TypeError as exc:
        raise InvalidArgument(f"[{where}] {exc}") from None


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "tuple[str, ...]": (tuple,),
    "dict[str, str]": (dict,),
}


def _check_type(where: str, annotation: str, value: Any) -> None:
    """TOML values are typed already; a wrong type is a mistake worth a clear start-up error."""
    optional = annotation.endswith(" | None")
    wanted = _TYPES.get(annotation.removesuffix(" | None"))
    if wanted is None or (optional and value is None):
        return
    if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
        raise InvalidArgument(f"{where}: must be of type {annotation.removesuffix(' | None')}")
    if isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where}: must be an array of strings")
    if isinstance(value, dict) and not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(f"{where}: must be a table of strings (name = \"directory\")")


def _tenant(data: Any, index: int) -> TenantConfig:
    where = f"tenants[{index}]"
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where} must be a table")
    data = dict(data)
    key = data.pop("key", None)
    if key is not None:
        # Plain keys are accepted for local set-ups; only their hash is kept in memory.
        if data.get("key_sha256"):
            raise InvalidArgument(f"{where}: give key or key_sha256, not both")
        data["key_sha256"] = hash_key(str(key))
    tenant = _section(TenantConfig, data, where)
    if not TENANT_NAME.match(tenant.name):
        raise InvalidArgument(f"{where}.name: letters, digits, '_', '-', '.' only (1 to 64)")
    if tenant.key_sha256 and not re.fullmatch(r"[0-9a-f]{64}", tenant.key_sha256):
        raise InvalidArgument(f"{where}.key_sha256: must be 64 lowercase hex digits")
    return tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config_from_dict(data: dict[str, Any]) -> Config:
    known = {"server", "models", "engine", "admission", "registry", "tenants", "variants"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"unknown section [{unknown[0]}]; sections are {', '.join(sorted(known))}")
    parts: dict[str, Any] = {}
    for name, cls in (
        ("server", ServerConfig),
        ("models", ModelsConfig),
        ("engine", EngineConfig),
        ("admission", AdmissionConfig),
        ("registry", RegistryConfig),
    ):
        if name in data:
            parts[name] = _section(cls, data[name], name)
    if "tenants" in data:
        if not isinstance(data["tenants"], list) or not data["tenants"]:
            raise InvalidArgument("[[tenants]] must be a non-empty array of tables")
        parts["tenants"] = tuple(_tenant(t, i) for i, t in enumerate(data["tenants"]))
    if "variants" in data:
        if not isinstance(data["variants"], list):
            raise InvalidArgument("[[variants]] must be an array of tables")
        parts["variants"] = tuple(_section(VariantConfig, v, f"variants[{i}]") for i, v in enumerate(data["variants"]))
    config = Config(**parts)
    check(config)
    return config


def check(config: Config) -> None:
    """Rules across fields, so that a bad file fails at start-up rather than on the first call."""
    names = [t.name for t in config.tenants]
    if len(set(names)) != len(names):
        raise InvalidArgument("[[tenants]] names must be unique")
    keys = [t.key_sha256 for t in config.tenants]
    if len(set(keys)) != len(keys):
        raise InvalidArgument("[[tenants]] keys must be unique (at most one tenant without a key)")
    for table in ("controlnets", "ip_adapters", "vae"):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in getattr(config.models, table).items()):
            raise InvalidArgument(f"[models.{table}] maps names to directory strings")
    if not config.models.serve:
        raise InvalidArgument("[models] serve must name at least one model")
    if config.models.default and config.models.default not in config.models.serve:
        raise InvalidArgument("[models] default must be one of serve")
    for model in config.models.vae:
        if model not in config.models.serve:
            raise InvalidArgument(f"[models.vae] {model!r} is not one of serve")
    server = config.server
    if bool(server.tls_cert) != bool(server.tls_key):
        raise InvalidArgument("[server] tls_cert and tls_key go together (a certificate and its private key)")
    if server.tls_client_ca and not server.tls_cert:
        raise InvalidArgument("[server] tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
    if server.tracing not in ("off", "console", "otlp"):
        raise InvalidArgument(f"[server] tracing must be off, console or otlp, not {server.tracing!r}")
    if server.otlp_endpoint and server.tracing != "otlp":
        raise InvalidArgument("[server] otlp_endpoint needs tracing = \"otlp\"")
    registry = config.registry
    if registry.validate_memory_bytes < 2 * registry.max_adapter_bytes:
        # A file's data section is read whole into the validation worker's memory.
        raise InvalidArgument("[registry] validate_memory_bytes must be at least twice max_adapter_bytes")
    if min(registry.max_concurrent_uploads, registry.max_tenant_concurrent_uploads) < 1:
        raise InvalidArgument("[registry] upload limits must be at least 1")
    for index, variant in enumerate(config.variants):
        if not variant.model or not variant.dir:
            raise InvalidArgument(f"[[variants]] entry {index} needs model and dir")
    admission = config.admission
    if min(admission.max_pending_cost, admission.max_tenant_pending_cost, admission.max_inflight_cost) <= 0:
        raise InvalidArgument("[admission] bounds must be positive")


def load_config(path: Path | None) -> Config:
    """Parse the TOML file at `path` (None = all defaults)."""
    if path is None:
        return config_from_dict({})
    try:
        # TOML is UTF-8 by definition, whatever the machine's locale says.
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgument(f"config file could not be read ({exc.__class__.__name__})") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"config file is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file is not valid TOML ({exc})") from None
    return config_from_dict(data)


def with_overrides(config: Config, **changes: Any) -> Config:
    """`config` with some `section__key=value` overrides (from CLI flags); None means keep."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        if value is None:
            continue
        section, key = dotted.split("__", 1)
        sections.setdefault(section, {})[key] = value
    updated = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    result = dataclasses.replace(config, **updated)
    check(result)
    return result
