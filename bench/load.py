"""Load generator: many tenants, per-request LoRA stacks, open-loop Poisson or fixed concurrency.

One target (any server speaking sdserve.v1; adapters are generated and uploaded first):

    python -m bench.load --target 127.0.0.1:50051 --rate 8 --duration 20 --adapters 32
    python -m bench.load --target 127.0.0.1:50051 --concurrency 8 --max-requests 200

A server the bench did not start: one API key per tenant (each line of --api-keys-file, or
--api-key repeated; the tenant count follows), TLS with --tls / --ca, files outside the checkout:

    python -m bench.load --target gpu-box:50051 --tls --api-keys-file ~/keys.txt --rate 4 \
        --out /tmp/load.json --adapter-dir /tmp/bench-adapters

The suite (starts sdserve, baseline (a) "diffusers" and baseline (b) "homogeneous" itself, drives
all three with the same requests in the same run; bench/load_suite.py):

    python -m bench.load --suite quick     # make bench: 32 adapters, two loads + capacity (~2.5 min)
    python -m bench.load --suite full      # 8, 32 and 128 adapters (~12 min on 2 cores)
    python -m bench.load --suite goal      # 32 adapters: capacity, then 0.8x of sdserve's (~3 min)
    python -m bench.load --suite quick --duration 5   # the same grid, 5 s per run (a check, not a result)

The "just under capacity" loads are fractions of sdserve's closed-loop throughput measured first
in the same run (printed with the tables), not fixed rates: they mean the same on any machine.

A hot stack with and without its compiled variant (starts two sdserve servers; bench/load_hot.py):

    python -m bench.load --hot 0.5         # 50 % of requests use one stack; open loop, then closed

Workload: N tenants; M adapters (random PEFT-layout LoRAs of ranks 4/8/16 for the served model's
attention projections), adapter i owned by tenant i mod N; adapter popularity is Zipf over i.
A request holds 0 to 3 adapters of one tenant; every fourth adapter is a Concept-Slider-style one
used with a signed scale, often starting late in the schedule. Step counts and schedulers vary.
Records per request: status code, queue / adapter-load / denoise / decode seconds (the response's
timings), time to first progress event (GenerateStream) and end-to-end latency. Exits 1 when any
request fails with a status other than RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED (load shedding);
requests still open when the run's drain time ends are cancelled by the generator itself and
reported as `cut_off` (status CANCELLED_BY_GENERATOR), not as failures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.load_gen import Connection, Workload, load_label, print_summaries, run_one, upload_adapters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("quick", "full", "goal"), help="start the three servers and run the grid")
    parser.add_argument("--hot", type=float, metavar="FRACTION",
                        help="this share of requests uses one hot stack; compares sdserve with and without "
                        "its compiled variant (starts both servers)")
    parser.add_argument("--target", help="HOST:PORT of a running server")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="a tenant's API key (repeat: one tenant each); default: the bench servers' keys")
    parser.add_argument("--api-keys-file", type=Path, metavar="FILE",
                        help="API keys, one a line (one tenant each); keeps keys out of the process list")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (the system's CAs)")
    parser.add_argument("--ca", type=Path, help="PEM of the CA that signed the server's certificate (implies --tls)")
    parser.add_argument("--adapter-dir", type=Path, help="where the generated LoRA files go "
                        "(default bench/results/adapters)")
    parser.add_argument("--rate", type=float, help="open-loop Poisson arrivals per second")
    parser.add_argument("--concurrency", type=int, help="closed loop: this many requests in flight")
    parser.add_argument("--duration", type=float, help="seconds of sending (default 20; with --suite, each "
                        "run's, in place of the suite's own)")
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=30.0, help="each request's deadline, seconds")
    parser.add_argument("--slo", type=float, default=2.0, help="latency objective, seconds")
    parser.add_argument("--model", default="tiny-sd1")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-upload", action="store_true", help="the adapters are already uploaded")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/load*.json)")
    args = parser.parse_args(argv)
    from bench.common import RESULTS_DIR, write_json

    if args.suite:
        from bench.load_suite import run_suite

        if args.duration is not None and args.duration <= 0:
            parser.error("--duration must be positive")
        return run_suite(args.suite, args.out or RESULTS_DIR / "load.json", slo=args.slo, seed=args.seed,
                         duration=args.duration)
    duration = args.duration if args.duration is not None else 20.0
    if args.hot is not None:
        if not 0.0 < args.hot <= 1.0:
            parser.error("--hot must be a fraction in (0, 1]")
        from bench.load_hot import run_hot

        rates = (args.rate,) if args.rate is not None else (() if args.concurrency else (6.0,))
        concurrency = args.concurrency or (None if args.rate is not None else 12)
        return run_hot(args.hot, args.out or RESULTS_DIR / "load_hot.json", model=args.model, rates=rates,
                       concurrency=concurrency, duration=duration,
                       timeout=args.timeout, slo=args.slo, seed=args.seed)
    host, _, port = (args.target or "").rpartition(":")
    if not host or not port.isdigit():
        parser.error("--target must be HOST:PORT (or use --suite)")
    if args.rate is None and args.concurrency is None:
        parser.error("give --rate or --concurrency")
    keys = list(args.api_key)
    if args.api_keys_file is not None:
        try:
            keys += [line.strip() for line in args.api_keys_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            parser.error(f"--api-keys-file: cannot read {args.api_keys_file}: {exc.strerror}")
        if not keys:
            parser.error(f"--api-keys-file: {args.api_keys_file} holds no keys")
    connection = Connection(keys=tuple(keys), tls=args.tls, ca=str(args.ca) if args.ca else None)
    tenants = len(keys) or args.tenants  # one tenant per key given
    workload = Workload(model=args.model, tenants=tenants, adapters=args.adapters, seed=args.seed)
    if not args.no_upload:
        upload_adapters(args.target, args.model, args.adapters, tenants, args.adapter_dir or RESULTS_DIR / "adapters",
                        connection)
    result = run_one(args.target, workload, rate=args.rate, concurrency=args.concurrency, duration=duration,
                     max_requests=args.max_requests, timeout=args.timeout, slo=args.slo, connection=connection)
    print_summaries([("target", args.adapters, load_label(args.rate, args.concurrency), result["summary"])])
    path = write_json("load_single", {"command": _recorded_command(argv if argv is not None else sys.argv[1:]),
                                      **result}, args.out or RESULTS_DIR / "load_single.json")
    print(f"wrote {path}")
    return 1 if result["summary"]["unexpected_errors"] else 0


def _recorded_command(argv: list[str]) -> str:
    """The command line as the JSON records it: API keys given as flags are not written out."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg == "--api-key":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--api-key="):
            shown.append("--api-key=***")
        else:
            shown.append(arg)
    return " ".join(["python -m bench.load", *shown])


if __name__ == "__main__":
    sys.exit(main())
