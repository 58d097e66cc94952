"""A burst of Generate calls from a process of its own, as a server's clients are.

    python -m tests.server.burst_client TARGET API_KEY COUNT REQUEST_JSON ROUNDS

Fires `COUNT` copies of the request (seeds 0..COUNT-1) at once, ROUNDS times, and prints one JSON
line per round: {"refused": [seconds from send to RESOURCE_EXHAUSTED, ...], "completed": N,
"other": ["STATUS: details", ...]}. In the test's own process the client's threads would compete
with the server's loop and engine threads for one GIL, and the refusal latency measured would be
the client's as much as the server's.
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from sdserve.api.client import Client
from sdserve.api.convert import pb_from_dict


def burst(client: Client, request: dict, count: int) -> dict:
    requests = [pb_from_dict({**request, "seed": index}) for index in range(count)]  # off the clock
    futures, started, finished = [], {}, {}
    for index, pb in enumerate(requests):
        started[index] = time.perf_counter()
        future = client.generate_future(pb, timeout=60)
        future.add_done_callback(lambda f, i=index: finished.setdefault(i, time.perf_counter()))
        futures.append(future)
    refused, completed, other = [], 0, []
    for index, future in enumerate(futures):
        try:
            future.result()
            completed += 1
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in (exc.details() or ""):
                refused.append(finished[index] - started[index])
            else:
                other.append(f"{exc.code().name}: {exc.details()}")
    return {"refused": refused, "completed": completed, "other": other}


def main(argv: list[str]) -> int:
    target, key, count, request, rounds = argv[0], argv[1], int(argv[2]), json.loads(argv[3]), int(argv[4])
    client = Client(target, api_key=key)
    for _ in range(rounds):
        print(json.dumps(burst(client, request, count)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
