"""The engine replicas as a Ray Serve application an operator deploys, and a front that attaches.

`sdserve serve --ray` deploys its replicas itself and deletes them on exit. Operators who manage
Ray Serve applications with Serve config files (`serve run FILE`, `serve deploy FILE`, the
dashboard, KubeRay's RayService) deploy the replicas that way instead:

    sdserve serve --ray --replicas 4 --config server.toml --print-serve-config > sdserve.yaml
    serve run sdserve.yaml                    # or: serve deploy sdserve.yaml (a running cluster)
    sdserve serve --ray --address auto --attach --config server.toml

The file's application names `build_app` as its import path; its `args` are the server config's
path plus the scale-out settings (RayConfig's fields), so the replicas build the engine from the
same `server.toml` the front reads. The front started with `--attach` deploys nothing: it asks the
running application how it was built (`EngineReplica.describe`), takes its replica count, routing
and store from there, refuses to front replicas that serve other models than its own config's,
and leaves the application running when it stops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdserve.errors import InvalidArgument
from sdserve.scaleout.config import RayConfig
from sdserve.server.config import Config, load_config, with_overrides

IMPORT_PATH = "sdserve.scaleout.app:build_app"
# RayConfig fields that describe the replicas (what the application's args may set); the rest
# (address, attach) are the front's own.
REPLICA_FIELDS = ("replicas", "routing", "spill_threshold", "stacks_per_replica", "cpus_per_replica",
                  "gpus_per_replica", "max_ongoing_requests", "retries", "store_url")
_CONFIG_KEYS = ("config", "model", "data_dir")


def app_args(config_path: Path | None, models: Sequence[str], data_dir: str | None, ray_config: RayConfig
             ) -> dict[str, Any]:
    """The application's `args`: where its config comes from and every replica setting that
    differs from RayConfig's default (a file that says only what was chosen)."""
    args: dict[str, Any] = {}
    if config_path is not None:
        # The controller and every replica read it, on whichever node they run: an absolute path.
        args["config"] = str(Path(config_path).resolve())
    if models:
        args["model"] = list(models)
    if data_dir:
        args["data_dir"] = str(Path(data_dir).resolve())
    default = RayConfig()
    for name in REPLICA_FIELDS:
        value = getattr(ray_config, name)
        if value != getattr(default, name):
            args[name] = value
    return args


def parse_app_args(args: Mapping[str, Any]) -> tuple[Config, RayConfig]:
    """The server config and RayConfig an application's `args` describe; unknown keys refused."""
    unknown = sorted(set(args) - set(_CONFIG_KEYS) - set(REPLICA_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(_CONFIG_KEYS + REPLICA_FIELDS)}", field="args")
    config = load_config(Path(args["config"]) if args.get("config") else None)
    models = args.get("model")
    if isinstance(models, str):
        models = [models]
    config = with_overrides(config, models__serve=tuple(models) if models else None,
                            models__default=models[0] if models else None, registry__data_dir=args.get("data_dir"))
    ray_config = RayConfig(**{name: args[name] for name in REPLICA_FIELDS if name in args})
    return config, ray_config


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (the Serve config's `import_path`): the bound EngineReplica
    deployment that `sdserve serve --ray` would deploy for the same config and settings."""
    from sdserve.scaleout.replica import deployment

    config, ray_config = parse_app_args(args)
    return deployment(config, ray_config)


def serve_config_yaml(args: Mapping[str, Any], app_name: str) -> str:
    """A Serve config file with one application: the engine replicas, no Ray HTTP/gRPC proxy (the
    sdserve front is the ingress: docs/scaleout.md)."""
    import yaml

    document = {
        "proxy_location": "Disabled",
        "applications": [{"name": app_name, "route_prefix": None, "import_path": IMPORT_PATH, "args": dict(args)}],
    }
    header = ("# sdserve engine replicas as a Ray Serve application (sdserve serve --ray --print-serve-config).\n"
              "# Deploy: `serve run THIS_FILE` (foreground) or `serve deploy THIS_FILE` (a running cluster);\n"
              f"# then the front: sdserve serve --ray --address auto --attach --app-name {app_name} "
              "--config <the same server.toml>\n"
              "# Change replicas and routing under args (the front reads them from the replicas), not under a\n"
              "# `deployments:` override the front cannot see.\n")
    return header + yaml.safe_dump(document, sort_keys=False)


def describe(config: Config, ray_config: RayConfig, models: Sequence[str]) -> dict[str, Any]:
    """What a replica tells an attaching front: its settings and the models it serves."""
    return {"ray_config": {name: getattr(ray_config, name) for name in REPLICA_FIELDS}, "models": list(models),
            "default_model": config.models.default_model}


def attach(config: Config, ray_config: RayConfig, timeout: float = 120.0) -> tuple[Any, RayConfig]:
    """The running application's handle and the RayConfig its replicas were built with (the
    front's address and app name kept). Refused where the application is missing or serves
    other models than `config`."""
    from ray import serve

    try:
        handle = serve.get_app_handle(ray_config.app_name)
    except Exception as error:  # ray raises RayServeException (no such app) or a bare one (no Serve)
        raise InvalidArgument(f"no running Ray Serve application {ray_config.app_name!r} to attach to "
                              f"({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                              "deploy it first (serve run / serve deploy the file --print-serve-config writes)",
                              field="--app-name") from None
    facts = handle.describe.remote().result(timeout_s=timeout)
    ours = list(dict.fromkeys((config.models.default_model, *config.models.serve)))
    if facts["models"] != ours or facts["default_model"] != config.models.default_model:
        raise InvalidArgument(f"the application {ray_config.app_name!r} serves {', '.join(facts['models'])}, "
                              f"this front's config {', '.join(ours)}: start both from the same server.toml",
                              field="--attach")
    adopted = dataclasses.replace(ray_config, **facts["ray_config"])
    return handle, adopted
