"""`sdserve serve`: run the gRPC server.

Configuration is one TOML file (sections [server], [models], [engine], [admission], [registry],
[[tenants]]; see `sdserve.server.config`); flags override the file. Without a file the server
serves `default` on 127.0.0.1:50051 to one local tenant with no API key.

With --ray the same server is the front (auth, admission, registry, health) of engine replicas
deployed on Ray Serve (pip install 'sdserve[ray]'; docs/scaleout.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdserve.cli.common import fail_on, quiet_libraries
from sdserve.errors import SdserveError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME|DIR|FILE",
        help="model to serve: a built-in name, a diffusers-format directory or a single-file "
        ".safetensors checkpoint (SD 1.x/2.x/XL layout); repeat for several, the first is the default "
        "(replaces [models] serve)",
    )
    parser.add_argument("--vae", metavar="FILE_OR_DIR",
                        help="a separate VAE for the default model (adds to [models] vae)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus endpoint port (default: off)")
    parser.add_argument("--http-port", type=int,
                        help="also serve HTTP/JSON (POST /v1/generate, ...) and the playground page at / on this "
                        "port (default: off; 0 picks a free one; HTTPS when [server] tls_cert is set; "
                        "[server] http_host binds another address than --host)")
    parser.add_argument("--data-dir", help="adapter registry directory (default $SDSERVE_HOME/server)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    ray = parser.add_argument_group("scale-out on Ray Serve (docs/scaleout.md)")
    ray.add_argument("--ray", action="store_true",
                     help="run the engine as Ray Serve replicas behind this server (needs sdserve[ray])")
    ray.add_argument("--replicas", type=int, metavar="N",
                     help="engine replicas (default 1; one per GPU, or per CPU process)")
    ray.add_argument("--address", metavar="ray://HOST:PORT|auto",
                     help="join this Ray cluster (default: start a local Ray instance, stopped on exit)")
    ray.add_argument("--routing", choices=("affine", "multiplex", "least_loaded"),
                     help="affine (default): each adapter stack has a home replica (rendezvous hashing), left "
                     "for its second choice when the home is 3+ requests busier (a stack both hold: the less busy); multiplex: Ray Serve's "
                     "model multiplexing (a replica that served the stack recently, else the least loaded); "
                     "least_loaded: ignore adapters")
    ray.add_argument("--cpus-per-replica", type=float, metavar="N", help="Ray CPUs each replica reserves (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, metavar="N", help="Ray GPUs each replica reserves (default 0)")
    ray.add_argument("--store-url", metavar="URL",
                     help="share uploaded adapters with the replicas through this fsspec URL (file:///shared/dir, "
                     "s3://bucket/dir, ...): the front copies each file there once, replicas fetch and check it "
                     "(default: replicas read the front's registry paths: one node or a shared mount)")
    ray.add_argument("--app-name", metavar="NAME",
                     help="the Ray Serve application of the replicas (default sdserve; one per front)")
    ray.add_argument("--print-serve-config", action="store_true",
                     help="print a Ray Serve config file (YAML) that deploys these replicas with `serve run` or "
                     "`serve deploy`, and exit; then start the front with --attach (docs/scaleout.md)")
    ray.add_argument("--attach", action="store_true",
                     help="deploy nothing: front the running application --app-name (deployed from that file) "
                     "with the replica count, routing and store its replicas report; needs --address; the "
                     "application keeps running when the front stops")
    parser.set_defaults(func=run)


def ray_config(args: argparse.Namespace):  # -> RayConfig | None (no import at module level: --help stays fast)
    from sdserve.errors import InvalidArgument
    from sdserve.scaleout.config import RayConfig

    replica_flags = {"--replicas": args.replicas, "--routing": args.routing,
                     "--cpus-per-replica": args.cpus_per_replica, "--gpus-per-replica": args.gpus_per_replica,
                     "--store-url": args.store_url}
    flags = {**replica_flags, "--address": args.address, "--app-name": args.app_name,
             "--print-serve-config": args.print_serve_config or None, "--attach": args.attach or None}
    if not args.ray:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise InvalidArgument("needs --ray", field=given[0])
        return None
    if args.attach:
        if args.print_serve_config:
            raise InvalidArgument("is for the front; --print-serve-config writes the replicas' file",
                                  field="--attach")
        given = [flag for flag, value in replica_flags.items() if value is not None]
        if given:  # the replicas were built from the Serve config file's args: the front adopts them
            raise InvalidArgument("is set by the application's Serve config (its args) when attaching",
                                  field=given[0])
    chosen = {"replicas": args.replicas, "address": args.address, "routing": args.routing,
              "cpus_per_replica": args.cpus_per_replica, "gpus_per_replica": args.gpus_per_replica,
              "store_url": args.store_url, "app_name": args.app_name, "attach": args.attach or None}
    return RayConfig(**{key: value for key, value in chosen.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    import asyncio

    from sdserve.server.app import serve
    from sdserve.server.config import load_config, with_overrides

    try:
        config = load_config(args.config)
        config = with_overrides(
            config,
            server__host=args.host,
            server__port=args.port,
            server__metrics_port=args.metrics_port,
            server__http_port=args.http_port,
            server__log_level=args.log_level,
            models__serve=tuple(args.model) if args.model else None,
            models__default=args.model[0] if args.model else None,
            registry__data_dir=args.data_dir,
            engine__device=args.device,
        )
        if args.vae:
            config = with_overrides(config, models__vae={**config.models.vae, config.models.default_model: args.vae})
    except SdserveError as exc:
        fail_on(exc, str(args.config) if args.config else "")
    try:
        scaleout = ray_config(args)
    except SdserveError as exc:
        fail_on(exc)
    if scaleout is not None and args.print_serve_config:
        return print_serve_config(args, scaleout)
    if scaleout is not None:
        return run_ray(config, scaleout)
    try:
        # Non-zero when the server stopped because its engine died, so a supervisor restarts it.
        return asyncio.run(serve(config))
    except SdserveError as exc:
        fail_on(exc)
    except OSError as exc:
        fail_on(SdserveError(f"could not start the server ({exc})"))


def print_serve_config(args: argparse.Namespace, scaleout) -> int:
    """The replicas' Serve config file on stdout, checked as the application will read it."""
    from sdserve.scaleout.app import app_args, parse_app_args, serve_config_yaml

    try:
        options = app_args(args.config, args.model or (), args.data_dir, scaleout)
        parse_app_args(options)  # the controller's reading of the file, here, before any deploy
    except SdserveError as exc:
        fail_on(exc)
    print(serve_config_yaml(options, scaleout.app_name), end="")
    return 0


def run_ray(config, scaleout) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        fail_on(SdserveError("--ray needs Ray Serve: pip install 'sdserve[ray]'"))
    from sdserve.scaleout.cluster import serve_ray

    try:
        return serve_ray(config, scaleout)
    except SdserveError as exc:
        fail_on(exc)
    except (OSError, ConnectionError) as exc:
        fail_on(SdserveError(f"could not start the server ({exc})"))
