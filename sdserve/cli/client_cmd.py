"""`sdserve client`: call a running sdserve server.

    sdserve client generate --target 127.0.0.1:50051 --prompt "a red circle" --out out.png
    sdserve client generate --prompt "..." --adapter style:0.8 --out out.png --stream
    sdserve client adapters upload style.safetensors --name style --family sd1   (or --model NAME)
    sdserve client adapters upload CONTROLNET_DIR --kind controlnet --name edges --family sd1
    sdserve client adapters list | get NAME | delete NAME
    sdserve client models
    sdserve client health

The API key comes from --api-key or $SDSERVE_API_KEY (sent as `authorization: Bearer <key>`).
Request flags are `sdserve generate`'s, from one table (sdserve/cli/request_flags.py): GenerateRequest's
field names with dashes, images as files, and --requests FILE.jsonl --out-dir DIR; adapters (--lora or
--adapter), embeddings, hypernetworks, ControlNets and IP-Adapters are names registered on the server.
--stream shows a progress bar and, with --preview-dir, writes the server's previews as PNGs.
--tls connects over TLS (the server checked against the system's CAs, or --ca FILE); --cert and
--key add a client certificate for a server that asks for one. Send an API key only over TLS
beyond this machine. --verbose prints the causes an INTERNAL error carries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdserve.cli.common import EXIT_FAILURE, EXIT_USAGE, fail
from sdserve.cli.image_output import add_format_flags, checked_quality

STATUS_EXIT = {"INVALID_ARGUMENT": EXIT_USAGE, "NOT_FOUND": EXIT_USAGE}


def _connection_flags(parser: argparse.ArgumentParser, default) -> None:
    """SUPPRESS defaults, so a flag given at either level wins and an absent one changes nothing."""
    parser.add_argument("--target", default=default, help="server HOST:PORT (default 127.0.0.1:50051)")
    parser.add_argument("--api-key", default=default, help="API key (default: $SDSERVE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=default, help="call deadline in seconds")
    parser.add_argument("--tls", action="store_true", default=default, help="connect over TLS")
    parser.add_argument("--ca", type=Path, default=default, metavar="FILE",
                        help="PEM CA certificate(s) to check the server with (implies --tls; default: the system's)")
    parser.add_argument("--cert", type=Path, default=default, metavar="FILE",
                        help="PEM client certificate, for a server that asks for one (mutual TLS; with --key)")
    parser.add_argument("--key", type=Path, default=default, metavar="FILE", help="PEM private key of --cert")
    parser.add_argument("--verbose", "-v", action="store_true", default=default,
                        help="on an error, also print the causes the server sent")


class _DeferredParser(argparse.ArgumentParser):
    """An action's parser whose `defer`red flags are added when it is first parsed or asked for
    help: `client generate`'s request flags come from the proto's descriptor (protobuf and the
    stubs, ~0.07 s) that `client health` need not load."""

    _deferred: list[Callable[[argparse.ArgumentParser], None]]

    def defer(self, add_flags: Callable[[argparse.ArgumentParser], None]) -> None:
        self.__dict__.setdefault("_deferred", []).append(add_flags)

    def _add_deferred(self) -> None:
        deferred, self._deferred = self.__dict__.get("_deferred", []), []
        for add_flags in deferred:
            add_flags(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "client", help="call a running server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _connection_flags(parser, argparse.SUPPRESS)
    parser.set_defaults(target="127.0.0.1:50051", api_key=None, timeout=None, tls=False, ca=None, cert=None,
                        key=None, verbose=False)
    actions = parser.add_subparsers(dest="client_command", required=True, metavar="ACTION",
                                    parser_class=_DeferredParser)

    generate = actions.add_parser("generate", help="generate images")
    generate.defer(_add_request_flags)
    output = generate.add_argument_group("input and output")
    output.add_argument("--out", type=Path, help="output file, PNG unless --format (FILE_1.png, ... for several images)")
    output.add_argument("--requests", type=Path, metavar="FILE",
                        help="JSON-lines file, one GenerateRequest per line (registered names, images as base64); "
                        "all sent at once, images written to --out-dir as 0000.png, 0001.png, ... in input order")
    output.add_argument("--out-dir", type=Path, metavar="DIR", help="output directory for --requests")
    add_format_flags(output)
    output.add_argument("--stream", action="store_true",
                        help="GenerateStream: a progress bar on stderr (one request from flags)")
    output.add_argument("--preview-dir", type=Path, metavar="DIR",
                        help="with --stream: write each preview as DIR/step_NNN.png (sets --preview-every 1 "
                        "unless given)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    output.add_argument("--priority", type=int, default=None, help="priority among your own queued requests")
    generate.set_defaults(func=run, action=_generate)

    adapters = actions.add_parser("adapters", help="manage adapters").add_subparsers(
        dest="adapters_command", required=True, metavar="ACTION"
    )
    upload = adapters.add_parser(
        "upload", help="upload an adapter file, ControlNet or IP-Adapter",
        description="Upload one safetensors file: a LoRA, embedding or hypernetwork, or a ControlNet or "
                    "IP-Adapter packed with `sdserve adapters pack`. With --kind controlnet or ip_adapter "
                    "FILE may also be the model's directory (a diffusers ControlNet dir; an IP-Adapter dir with "
                    "ip_adapter.safetensors and image_encoder/), packed here on the fly.")
    upload.add_argument("file", type=Path, metavar="FILE",
                        help="the adapter file (.safetensors) to upload, or a ControlNet / IP-Adapter directory")
    upload.add_argument("--name", required=True, help="name to register it under")
    upload.add_argument("--family", default="", choices=["sd1", "sd2", "sdxl"],
                        help="model family it is for: validated against every served model of it, accepted if it "
                             "fits one (default: the family of --model, else every served model)")
    upload.add_argument("--model", default="", metavar="NAME",
                        help="the served model (as `client models` names it) to validate it against and use it with")
    upload.add_argument("--kind", default="lora",
                        help="adapter kind: lora (default), embedding, hypernetwork, controlnet or ip_adapter "
                             "(ip-adapter is read as ip_adapter)")
    upload.add_argument("--shared", action="store_true", help="publish for every tenant (admins only)")
    upload.set_defaults(func=run, action=_upload)
    listing = adapters.add_parser("list", help="list the adapters you can use")
    listing.add_argument("--family", default="", help="only this family")
    listing.set_defaults(func=run, action=_list)
    get = adapters.add_parser("get", help="describe one adapter")
    get.add_argument("name", help="the adapter's registered name")
    get.set_defaults(func=run, action=_get)
    delete = adapters.add_parser("delete", help="delete one of your adapters")
    delete.add_argument("name", help="the adapter's registered name")
    delete.add_argument("--shared", action="store_true", help="delete the shared adapter (admins only)")
    delete.set_defaults(func=run, action=_delete)

    models = actions.add_parser("models", help="list the served models")
    models.set_defaults(func=run, action=_models)
    health = actions.add_parser("health", help="the server's health status")
    health.set_defaults(func=run, action=_health)
    # Connection flags are accepted after the action too (`client generate --target ...`).
    for action_parser in (generate, upload, listing, get, delete, models, health):
        _connection_flags(action_parser, argparse.SUPPRESS)


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    from sdserve.cli.request_flags import Refs, add_request_flags

    add_request_flags(parser, Refs.NAMES)


def _client(args: argparse.Namespace) -> Any:
    from sdserve.api.client import Client

    if (args.cert is None) != (args.key is None):
        fail("--cert and --key go together (a client certificate and its private key)")
    pems: dict[str, bytes] = {}
    for flag in ("ca", "cert", "key"):
        path = getattr(args, flag)
        if path is not None:
            try:
                pems[flag] = path.read_bytes()
            except OSError as exc:
                fail(f"--{flag} {path}: cannot read ({exc.strerror or exc.__class__.__name__})")
    return Client(args.target, api_key=args.api_key or os.environ.get("SDSERVE_API_KEY"), timeout=args.timeout,
                  tls=args.tls, **pems)


def _print_json(message: Any) -> None:
    from sdserve.api.convert import to_dict

    print(json.dumps(to_dict(message), indent=2))


def _generate(args: argparse.Namespace, client: Any) -> None:
    from sdserve.cli import request_flags

    checked_quality(args)  # a bad --quality is refused before anything is sent
    if args.requests is not None:
        _generate_many(args, client)
        return
    if args.out is None:
        fail("give --out FILE.png (or --requests FILE --out-dir DIR)")
    if args.prompt is None:
        fail("--prompt is required")
    if args.preview_dir is not None and not args.stream:
        fail("--preview-dir needs --stream")
    request = request_flags.request_values(args, request_flags.Refs.NAMES)
    if args.preview_dir is not None:
        request.setdefault("preview_every", 1)
    request = _checked(request)
    if args.stream:
        response = _stream(args, client, request)
    else:
        response = client.generate(request, priority=args.priority)
    _write_images(args, request_flags.output_paths(args, 0, len(response.images)), response)
    t = response.timings
    print(f"queue {t.queue:.3f} s, adapters {t.adapter_load:.3f} s, denoise {t.denoise:.3f} s, "
          f"decode {t.decode:.3f} s, total {t.total:.3f} s", file=sys.stderr)
    for used in response.adapters:
        print(f"adapter {used.name} sha256={used.sha256}{' (shared)' if used.shared else ''}", file=sys.stderr)


def _checked(request: dict[str, Any], where: str = "") -> Any:
    """The request as a GenerateRequest message; a field the schema refuses is one line, exit 2."""
    from sdserve.api.convert import pb_from_dict
    from sdserve.cli.common import fail_on
    from sdserve.errors import SdserveError

    try:
        return pb_from_dict(request)
    except SdserveError as exc:
        fail_on(exc, where)


def _write_images(args: argparse.Namespace, paths: list[Path], response: Any) -> None:
    """The server's PNGs, re-encoded for --format jpeg/webp (the parameters text carried over)."""
    from sdserve.cli.image_output import SUFFIXES, reencode_png

    quality = checked_quality(args)
    if args.requests is not None:  # DIR/0000.png -> DIR/0000.jpg; --out keeps the name the user gave
        paths = [path.with_suffix(SUFFIXES[args.format]) for path in paths]
    for path, image in zip(paths, response.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(reencode_png(image.png, args.format, quality))
        print(f"{path}  seed={response.seed}")


def progress_bar(step: int, total: int, width: int = 30) -> str:
    """`[#########.....................] step 3/10`: one line, redrawn in place with '\\r'."""
    filled = width * step // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}"


def _stream(args: argparse.Namespace, client: Any, request: Any) -> Any:
    response = None
    previews = 0
    for event in client.generate_stream(request, priority=args.priority):
        kind = event.WhichOneof("event")
        if kind == "queued" and not args.quiet:
            print(f"queued as {event.queued.request_id} (position {event.queued.queue_position})", file=sys.stderr)
        elif kind == "progress":
            progress = event.progress
            if not args.quiet:
                print(f"\r{progress_bar(progress.step, progress.total_steps)}", end="", file=sys.stderr, flush=True)
            if args.preview_dir is not None and progress.preview_png:
                args.preview_dir.mkdir(parents=True, exist_ok=True)
                (args.preview_dir / f"step_{progress.step:03d}.png").write_bytes(progress.preview_png)
                previews += 1
        elif kind == "result":
            response = event.result
    if not args.quiet:
        print(file=sys.stderr)
    if args.preview_dir is not None:
        print(f"{previews} preview(s) in {args.preview_dir}", file=sys.stderr)
    if response is None:
        fail("the stream ended without a result", EXIT_FAILURE)
    return response


def _generate_many(args: argparse.Namespace, client: Any) -> None:
    """--requests: every line sent at once (the server batches them), images written in input order."""
    import grpc

    from sdserve.cli import request_flags

    if args.stream or args.out is not None:
        fail("--requests writes to --out-dir; --out and --stream are for one request")
    request_flags.check_requests_flags(args)
    lines = request_flags.read_requests_file(args.requests, args.model)
    futures = [(where, client.generate_future(_checked(data, where), priority=args.priority)) for where, data in lines]
    failed = 0
    bad_input = True  # exit 2 when every failure was the input's fault
    for index, (where, future) in enumerate(futures):
        try:
            response = future.result()
        except grpc.RpcError as exc:
            failed += 1
            bad_input = bad_input and exc.code().name in STATUS_EXIT
            print(f"sdserve: error: {where}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            continue
        _write_images(args, request_flags.output_paths(args, index, len(response.images)), response)
    print(f"{len(futures) - failed} request(s) done", file=sys.stderr)
    if failed:
        raise SystemExit(EXIT_USAGE if bad_input else EXIT_FAILURE)


def _upload(args: argparse.Namespace, client: Any) -> None:
    from sdserve.adapters import conditioning
    from sdserve.errors import SdserveError

    kind = "ip_adapter" if args.kind == "ip-adapter" else args.kind
    if args.file.is_dir():
        if kind not in conditioning.KINDS:
            fail(f"{args.file} is a directory; only --kind controlnet and ip_adapter upload a directory "
                 "(packed on the fly)")
        try:
            data = conditioning.pack(kind, args.file)
        except SdserveError as exc:
            fail(str(exc))
    else:
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            fail(f"{args.file}: cannot read ({exc.__class__.__name__})")
    _print_json(client.upload_adapter(data, name=args.name, family=args.family, kind=kind, shared=args.shared,
                                      model=args.model))


def _list(args: argparse.Namespace, client: Any) -> None:
    # form / rank / targets / scales / start: what `sdserve adapters inspect` reads in the file ("-"
    # where the server registered it before it reported them, or where they do not apply; scales
    # and start are a Concept Slider's trained scales and suggested start fraction).
    row = "{:32} {:6} {:12} {:10} {:>4} {:>7} {:12} {:>5} {:6} {:>10}  {}"
    print(row.format("NAME", "FAMILY", "KIND", "FORM", "RANK", "TARGETS", "SCALES", "START", "SCOPE", "BYTES",
                     "SHA256"))
    for info in client.list_adapters(args.family).adapters:
        scope = "shared" if info.shared else "own"
        scales = ",".join(f"{scale:g}" for scale in info.slider_scales) or "-"
        # A slider's start may be 0 (from the first step); other adapters have none to show.
        start = f"{info.slider_start:g}" if info.slider_scales or info.slider_start else "-"
        print(row.format(info.name, info.family, info.kind, info.form or "-", info.rank or "-", info.targets or "-",
                         scales, start, scope, info.size, info.sha256))


def _get(args: argparse.Namespace, client: Any) -> None:
    _print_json(client.get_adapter(args.name))


def _delete(args: argparse.Namespace, client: Any) -> None:
    print(f"deleted {args.name} (sha256 {client.delete_adapter(args.name, shared=args.shared).sha256})")


def _models(args: argparse.Namespace, client: Any) -> None:
    _print_json(client.list_models())


def _health(args: argparse.Namespace, client: Any) -> None:
    print(client.health())


def run(args: argparse.Namespace) -> int:
    import grpc

    client = _client(args)
    try:
        args.action(args, client)
    except grpc.RpcError as exc:
        from sdserve.api.client import cause_of

        code = exc.code()
        cause = cause_of(exc)
        if args.verbose and cause:
            print(f"sdserve: cause: {cause}", file=sys.stderr)
        fail(f"{code.name}: {exc.details()}", STATUS_EXIT.get(code.name, EXIT_FAILURE))
    finally:
        client.close()
    return 0
