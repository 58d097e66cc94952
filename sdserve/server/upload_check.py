"""Uploaded files are validated in worker processes, each with a time and a memory limit.

An uploaded file is hostile until validated, and validation runs parsers (JSON headers, regular
expressions on metadata, tensor checks) whose cost an attacker picks. In the server process a
slow parse holds the GIL: health checks, every other tenant's calls and even SIGTERM wait behind
it. So every validation runs in a separate process:

- a fresh interpreter (exec'd, as multiprocessing's "spawn" does: no copy of the engine's threads,
  CUDA or torch state) that imports only what validation needs (`sdserve.adapters`, torch);
- wall-clock limit `validate_timeout_seconds`: past it the worker is SIGKILLed and replaced;
- memory limit: RLIMIT_AS = the worker's address space after its imports + `validate_memory_bytes`,
  so a memory bomb fails its allocation in the worker instead of taking the host's memory;
- at most `max_concurrent_uploads` workers; the first starts when the pool does, the rest on demand;
- a worker dies with its server (PR_SET_PDEATHSIG, and EOF on its pipe between jobs).

A job is a module-level callable and its arguments (pickled by reference, parent -> worker); the
worker calls it and discards what it returns unless that is a small report, a dict of JSON scalars
(what `sdserve.adapters.inspect.listing` returns), which comes back as `run`'s value. A job whose
callable has a `worker_prepare` attribute (a function of the code that reads no file: the packed
ControlNet / IP-Adapter checks import diffusers and transformers, ~10 s on a busy 2-core machine)
has it called first, and the worker says "started" before it calls the job: the time limit counts
from there, so the file pays for its check, not for the imports. Replies
(worker -> parent) are JSON, never pickle: the worker has just parsed hostile bytes, and the parent
must not unpickle anything it sends, and must check the shape of any report before using it.
The parent waits in threads of the pool's own executor, so the event loop never blocks and the
loop's default executor is not filled with waiting uploads.

Pool state (which workers exist, which are idle) belongs to the event loop; a waiting thread only
touches the one worker it was given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe
from typing import TYPE_CHECKING, Any

from sdserve import errors
from sdserve.errors import AdapterError, InvalidArgument, SdserveError, Unavailable

if TYPE_CHECKING:  # at run time the worker must not import config (it imports the engine)
    from sdserve.server.config import RegistryConfig

log = logging.getLogger("sdserve.server")

STARTUP_SECONDS = 120.0
"""How long a new worker may take to import torch and report ready (a busy host is slow); not
counted against an upload's validation time."""
MAX_REPLY_BYTES = 64 * 1024
"""A reply is a short JSON object; anything longer means the worker is not behaving."""
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection  # the parent's end of the worker's pipe
    ready: dict[str, Any] | None = None  # the worker's start-up report, once read


@dataclass(frozen=True)
class _Outcome:
    """What one job came to, as the waiting thread saw it."""

    kind: str  # "reply" | "timeout" | "crashed" | "lost" (job never reached a live worker)
    reply: dict[str, Any] = field(default_factory=dict)
    detail: str = ""  # for the server log only


class UploadChecks:
    """A pool of validation worker processes; `await run(fn, *args)` runs `fn(*args)` in one."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.max_workers = max(1, config.max_concurrent_uploads)
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._slots = asyncio.Semaphore(self.max_workers)
        # One thread per job in flight: a waiting upload must not take a thread of the loop's
        # default executor, which registry calls and model loading share.
        self._threads = ThreadPoolExecutor(self.max_workers, thread_name_prefix="upload-check")
        self._closed = False

    def start(self) -> UploadChecks:
        """Start the first worker now, so the first upload does not wait for torch to import.

        Call from the event loop's thread: PR_SET_PDEATHSIG fires when the *thread* that spawned
        a worker exits, and the loop's thread lives as long as the server."""
        self._top_up()
        return self

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    @property
    def worker_reports(self) -> list[dict[str, Any]]:
        """The start-up reports (time, memory) of the workers that have been used so far."""
        return [dict(worker.ready) for worker in self._workers if worker.ready is not None]

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """Run `fn(*args, **kwargs)` in a worker; return when it returned, raise what it raised.

        Returns what `fn` returned if that was a report (a dict of at most 16 JSON scalars keyed by
        strings), else None. A report is untrusted data: check every value before using it.

        An SdserveError raised by `fn` is raised here again from its message (AdapterError from
        its name and problem); past the time or memory limit, or if the worker dies, the file is
        refused with InvalidArgument(field="data").
        """
        job = (fn, args, kwargs)
        async with self._slots:
            for attempt in range(2):
                outcome = await self._on_a_worker(job)
                # A worker that died while idle never saw the job: one more try on a fresh one.
                if outcome.kind != "lost" or attempt == 1:
                    break
        self._raise(outcome)
        report = outcome.reply.get("report")
        return report if isinstance(report, dict) else None

    def close(self) -> None:
        """Kill every worker (busy ones too: their uploads are refused as UNAVAILABLE)."""
        self._closed = True
        for worker in self._workers:
            _kill(worker)
        self._workers.clear()
        self._idle.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- the pool, on the event loop --------------------------------------------------------------

    async def _on_a_worker(self, job: tuple[Any, ...]) -> _Outcome:
        if self._closed:
            raise Unavailable("the server is shutting down; retry the upload on another replica")
        while self._idle and self._idle[-1].process.poll() is not None:
            _kill(self._idle.pop())  # died while idle (OOM killer, operator): reap and forget it
        if self._idle:
            worker = self._idle.pop()
        else:
            try:
                worker = self._spawn()
            except OSError:
                log.exception("could not start an upload validation worker")
                raise Unavailable("uploads cannot be validated right now; retry shortly") from None
        self._top_up()  # a spare starts now, so the next upload (or this one's replacement) is warm
        loop = asyncio.get_running_loop()
        reusable = False
        try:
            outcome = await loop.run_in_executor(self._threads, self._exchange, worker, job)
            reusable = outcome.kind == "reply" and not outcome.reply.get("recycle")
            return outcome
        finally:
            # Cancelled (the client went away) or done: either way this worker is free now. One
            # that was cancelled mid-job is killed, so that it stops spending CPU on the file.
            if reusable and not self._closed:
                self._idle.append(worker)
            else:
                _kill(worker)
                if worker in self._workers:
                    self._workers.remove(worker)
            self._top_up()

    def _top_up(self) -> None:
        """Keep one idle (or starting) worker while there is room: replacements start at once."""
        if not self._closed and not self._idle and len(self._workers) < self.max_workers:
            try:
                self._idle.append(self._spawn())
            except OSError:  # out of processes or memory: the next upload tries again
                log.exception("could not start an upload validation worker")

    def _spawn(self) -> _Worker:
        parent_end, worker_end = Pipe(duplex=True)
        # A fresh interpreter, as multiprocessing's "spawn" gives, but started directly: spawn
        # would also re-run the server's __main__ module in every worker (whatever the host
        # program imports, and an error in any host without a `__main__` guard).
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path), str(worker_end.fileno()),
             str(os.getpid()), str(self.config.validate_memory_bytes)],
            pass_fds=(worker_end.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        worker_end.close()  # the worker holds the only other end: its death reads as EOF here
        worker = _Worker(process, parent_end)
        self._workers.append(worker)
        return worker

    def _raise(self, outcome: _Outcome) -> None:
        limit_seconds = self.config.validate_timeout_seconds
        if self._closed and outcome.kind != "reply":  # killed by close(), not by the file
            raise Unavailable("the server is shutting down; retry the upload on another replica")
        if outcome.kind == "timeout":
            log.warning("upload validation exceeded %.3g s; worker killed", limit_seconds)
            raise InvalidArgument(
                f"validating the file took longer than the server's limit of {limit_seconds:g} s", field="data"
            )
        if outcome.kind == "crashed":
            log.warning("upload validation worker died on a file (%s); replaced", outcome.detail)
            raise InvalidArgument("the file could not be validated (its validation failed)", field="data")
        if outcome.kind == "lost":
            log.error("upload validation worker unavailable (%s)", outcome.detail)
            raise Unavailable("uploads cannot be validated right now; retry shortly")
        reply = outcome.reply
        if reply.get("memory"):
            log.warning("upload validation exceeded its memory limit")
            raise InvalidArgument(
                f"validating the file needed more memory than the server's limit of "
                f"{self.config.validate_memory_bytes} bytes",
                field="data",
            )
        if "internal" in reply:
            log.error("upload validation failed unexpectedly; in the worker:\n%s", reply["internal"])
            raise errors.Internal("internal error; the server log has details")
        if "error" in reply:
            raise _error_from(reply)

    # -- one job, on a waiting thread -------------------------------------------------------------

    def _exchange(self, worker: _Worker, job: tuple[Any, ...]) -> _Outcome:
        conn = worker.conn
        try:
            if worker.ready is None:
                if not conn.poll(STARTUP_SECONDS):
                    _kill(worker)
                    return _Outcome("lost", detail=f"no start-up report in {STARTUP_SECONDS:g} s")
                worker.ready = json.loads(conn.recv_bytes(MAX_REPLY_BYTES))
                log.debug("upload validation worker ready: %s", worker.ready)
            conn.send(job)
            if getattr(job[0], "worker_prepare", None) is not None:
                # The imports are the code's cost, not the file's: bounded like start-up.
                if not conn.poll(STARTUP_SECONDS):
                    _kill(worker)
                    return _Outcome("lost", detail=f"its imports took longer than {STARTUP_SECONDS:g} s")
                conn.recv_bytes(MAX_REPLY_BYTES)  # {"started": true}
        except (EOFError, OSError, ValueError) as exc:
            _kill(worker)
            return _Outcome("lost", detail=f"worker exit code {worker.process.returncode} ({type(exc).__name__})")
        # The clock starts once the job reached a ready worker: start-up is not the file's cost.
        if not conn.poll(self.config.validate_timeout_seconds):
            _kill(worker)
            return _Outcome("timeout")
        try:
            reply = json.loads(conn.recv_bytes(MAX_REPLY_BYTES))
            if not isinstance(reply, dict):
                raise ValueError("reply is not an object")
        except (EOFError, OSError, ValueError) as exc:
            _kill(worker)
            return _Outcome("crashed", detail=f"exit code {worker.process.returncode} ({type(exc).__name__})")
        return _Outcome("reply", reply)


def _kill(worker: _Worker) -> None:
    """SIGKILL and reap: a worker stuck in C code (a regex, a huge JSON) ignores anything milder."""
    if worker.process.poll() is None:
        worker.process.kill()
    try:
        worker.process.wait(5)
    except subprocess.TimeoutExpired:
        log.error("upload validation worker %d did not die on SIGKILL", worker.process.pid)
    worker.conn.close()


def _error_from(reply: dict[str, Any]) -> SdserveError:
    """The worker's error again, built from plain strings: only sdserve.errors classes, no trace."""
    if reply["error"] == "AdapterError":
        return AdapterError(str(reply["name"]), str(reply["problem"]))
    cls = getattr(errors, str(reply["error"]), None)
    if not (isinstance(cls, type) and issubclass(cls, SdserveError)) or issubclass(cls, AdapterError):
        cls = InvalidArgument
    field_name = reply.get("field")
    return cls(str(reply["message"]), field=str(field_name) if field_name is not None else None)


# -- the worker process ---------------------------------------------------------------------------


# The worker's command: the server's import path first (the same modules resolve in the worker,
# test modules included), then this module's entry point.
_BOOTSTRAP = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from sdserve.server.upload_check import worker_main; worker_main(*sys.argv[2:])"
)


def worker_main(fd: str, parent_pid: str, memory_bytes: str) -> None:
    """A validation worker's entry point (argv strings from `_spawn`)."""
    _worker_loop(Connection(int(fd)), int(parent_pid), int(memory_bytes))


def _worker_loop(conn: Connection, parent_pid: int, memory_bytes: int) -> None:
    """A validation worker: import, fix the memory limit, then run jobs until the pipe closes."""
    # Ctrl-C reaches the whole process group; the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    started = time.monotonic()
    import torch

    import sdserve.adapters  # noqa: F401  (what the jobs call, imported before the limit is set)
    import sdserve.adapters.conditioning  # noqa: F401  (the packed ControlNet / IP-Adapter jobs)
    import sdserve.adapters.inspect  # noqa: F401  (the listing job)

    # One thread: validation does not need more, and every extra thread maps a stack and a
    # malloc arena that would count against the address-space limit.
    torch.set_num_threads(1)
    torch.zeros(16).sum()  # the allocator's first use maps what it keeps; count it as start-up
    limited, address_space = _limit_memory(memory_bytes)
    conn.send_bytes(
        json.dumps(
            {
                "pid": os.getpid(),
                "startup_seconds": round(time.monotonic() - started, 3),
                "vm_bytes": address_space,
                "rss_bytes": _status_bytes("VmRSS"),
                "memory_limited": limited,
            }
        ).encode()
    )
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return  # the server closed the pool or died
        except Exception:
            reply: dict[str, Any] = {"internal": traceback.format_exc(limit=4)[-4000:], "recycle": True}
        else:
            prepare = getattr(job[0], "worker_prepare", None)
            if prepare is not None:
                _prepare(prepare)
                conn.send_bytes(b'{"started": true}')
            reply = _run_job(job)
            del job  # its arguments may be large; do not hold them while waiting
        conn.send_bytes(json.dumps(reply).encode())


def _prepare(prepare: Callable[[], None]) -> None:
    """Import what a job's callable needs, before its clock starts. A failure (the memory limit)
    is left for the job itself to meet and report when it imports the modules again."""
    try:
        prepare()
    except Exception:
        return


def _run_job(job: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> dict[str, Any]:
    fn, args, kwargs = job
    try:
        # A loaded adapter is not needed, only whether it loads; a report (`_is_report`) comes back.
        result = fn(*args, **kwargs)
    except AdapterError as exc:
        return {"error": "AdapterError", "name": exc.adapter_name, "problem": exc.problem}
    except SdserveError as exc:
        name = next(c.__name__ for c in type(exc).__mro__ if getattr(errors, c.__name__, None) is c)
        return {"error": name, "message": exc.message, "field": exc.field}
    except MemoryError:
        return {"memory": True, "recycle": True}
    except Exception as exc:
        if _is_allocation_failure(exc):
            return {"memory": True, "recycle": True}
        return {"internal": traceback.format_exc(limit=8)[-4000:], "recycle": True}
    return {"ok": True, "report": result} if _is_report(result) else {"ok": True}


def _is_report(value: Any) -> bool:
    """A job's small JSON answer (not a loaded adapter, which stays in the worker)."""
    return (
        isinstance(value, dict)
        and len(value) <= 16
        and all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in value.items())
    )


def _is_allocation_failure(exc: BaseException) -> bool:
    """torch reports a failed CPU allocation as RuntimeError ("DefaultCPUAllocator: can't
    allocate memory"), not MemoryError."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its server dies, even mid-job with the GIL held in C
    (a Python watchdog thread could not run then). Between jobs, EOF on the pipe does the same
    on any platform."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the server died before prctl took effect
        os._exit(1)


def _status_bytes(key: str) -> int | None:
    """A `Vm*` line of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _limit_memory(memory_bytes: int) -> tuple[bool, int | None]:
    """RLIMIT_AS = what this worker maps now + `memory_bytes`; soft and hard, so a job cannot
    raise it again. Returns whether a limit was set and the address space it was based on."""
    address_space = _status_bytes("VmSize")
    try:
        import resource
    except ImportError:
        return False, address_space
    if address_space is None or memory_bytes <= 0:
        return False, address_space
    limit = address_space + memory_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return True, address_space
