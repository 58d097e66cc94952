"""The engine thread: the one owner of `Engine.step()` in a server.

The engine's UNet calls take from milliseconds to seconds; running them on a thread of their
own keeps the gRPC event loop free to refuse, cancel and answer health checks meanwhile (torch
releases the GIL inside its ops, so the event loop keeps running during a step; between ops
both threads take turns on the GIL).

The thread sleeps on an Event while the engine is idle; `submit` and `cancel` set it, so a new
request starts at once and an idle server costs no CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sdserve.engine.engine import Engine, Listener
from sdserve.engine.request import EngineRequest

log = logging.getLogger("sdserve.engine")

# How long an idle thread sleeps before looking again even without a wake-up; a safety net
# only (every submit and cancel wakes it), so it can be long.
_IDLE_WAIT_S = 1.0


class EngineThread:
    """Runs `engine.step()` on one thread while there is work; thread-safe submit and cancel."""

    def __init__(self, engine: Engine, name: str = "sdserve-engine") -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        # Orders "became busy" (submit) against "became idle" (the loop), so wait_idle never
        # returns while a request just submitted is still unseen.
        self._idle_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.step_hooks: list[Callable[[float], None]] = []  # hear each busy step's duration
        # Hear the loop die (a bug), on the dying thread: nothing else would ever tell the
        # requests it held, so the owner (the server) must act. Add them before `start`.
        self.death_hooks: list[Callable[[BaseException], None]] = []
        self.failure: BaseException | None = None  # set if the loop itself died (a bug)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: EngineRequest, listener: Listener | None = None) -> None:
        with self._idle_lock:
            self._idle.clear()
            self.engine.submit(request, listener)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step boundary (its listener hears a Cancelled error)."""
        self.engine.cancel(request_id)
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running; False on timeout."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the current step; requests still in the engine are left as they are."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                # Clear before looking, so a submit that lands after the look still wakes us.
                self._wake.clear()
                started = time.perf_counter()
                worked = engine.step()
                if worked:
                    elapsed = time.perf_counter() - started
                    for hook in self.step_hooks:
                        hook(elapsed)
                    continue
                with self._idle_lock:
                    idle = engine.idle
                    if idle:
                        self._idle.set()
                if idle:
                    self._wake.wait(_IDLE_WAIT_S)
                else:
                    # Queued work the step could not start yet (e.g. adapters still loading).
                    self._wake.wait(0.005)
        except BaseException as exc:  # a bug in the engine: keep it visible, never hang callers
            self.failure = exc
            # The one log of the cause, with its trace. Not re-raised: threading's excepthook
            # would print the same trace again, and the failure is recorded for the owner.
            log.critical("the engine thread died; no request can run any more", exc_info=exc)
            self._idle.set()
            for hook in self.death_hooks:
                try:
                    hook(exc)
                except Exception:  # one broken hook must not keep the others from hearing it
                    log.exception("an engine death hook failed")
