"""The engine: validation, admission, batched steps, decode, and events, in one loop.

The engine is single-threaded by design: one owner calls `step()` (the CLI directly, the server
from its engine thread) and everything else talks to it through `submit` and `cancel`, which
only enqueue. Each `step()` is one step boundary: drop cancelled or expired requests, admit
queued ones, run one UNet call for one size group, advance those requests, decode the finished.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdserve.adapters import TargetSpec, targets_of
from sdserve.engine.batch import assemble_batch
from sdserve.engine.batcher import Batcher
from sdserve.engine.config import EngineConfig
from sdserve.engine.decode import decode_latents
from sdserve.engine.ip_adapter import IPAdapterStore
from sdserve.engine.model import LoadedModel, ModelInfo, ModelStore
from sdserve.engine.png import model_shorthash, parameters_text
from sdserve.engine.preview import model_preview
from sdserve.engine.request import EngineRequest, RequestSpec, resolve
from sdserve.engine.residency import AdapterRuntime, RequestWeights, ResidencyStats
from sdserve.engine.runner import Runner
from sdserve.engine.state import RequestState, Timings, prepare_state
from sdserve.engine.store import WeightStore
from sdserve.errors import Cancelled, DeadlineExceeded, Internal, InvalidArgument, SdserveError


@dataclass
class GenerationResult:
    request: EngineRequest
    images: list[np.ndarray]  # each [H, W, 3] uint8
    timings: dict[str, float]
    model_hash: str = ""  # A1111's `Model hash` of the model it ran on ("" when unknown: png.model_shorthash)

    def parameters(self, index: int = 0) -> str:
        return parameters_text(self.request, index, self.model_hash)


@dataclass
class EngineEvent:
    """What a listener hears about its request: "admitted", "step", "done" or "error"."""

    kind: str
    request_id: str
    step: int = 0
    total_steps: int = 0
    result: GenerationResult | None = None
    error: SdserveError | None = None
    preview: np.ndarray | None = None  # [h, w, 3] uint8 latent preview on some "step" events


Listener = Callable[[EngineEvent], None]


@dataclass
class _Submission:
    request: EngineRequest
    listener: Listener | None
    timings: Timings = field(default_factory=Timings)


class Engine:
    def __init__(self, config: EngineConfig | None = None, models: ModelStore | None = None) -> None:
        self.config = config or EngineConfig()
        self.models = models or ModelStore(self.config)
        self.batcher = Batcher(self.config.max_batch_rows)
        self.runner = Runner()
        self._queue: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._waiting: list[_Submission] = []  # admitted to the engine, adapters still loading
        self._loader = ThreadPoolExecutor(
            max_workers=self.config.residency.load_threads, thread_name_prefix="sdserve-adapter-load"
        )
        # The one residency store of every per-request weight (engine/store.py), loading on the
        # loader threads; the ControlNet and IP-Adapter registries load through it.
        self.weights = WeightStore(self.config.residency, executor=self._loader)
        self.runner.controlnets.bind(self.weights)
        self.ip_adapters = IPAdapterStore()
        self.ip_adapters.bind(self.weights)
        self._cancelled: set[str] = set()
        self._listeners: dict[str, Listener | None] = {}
        self._arrivals = 0
        self._batch_calls = 0
        self.observers: list[Listener] = []  # hear every request's events (progress bars, metrics)

    # -- the outside world: thread-safe, enqueue only ------------------------------------------

    def validate(
        self, spec: RequestSpec, request_id: str = "", tenant: str = "", deadline: float | None = None
    ) -> EngineRequest:
        """Check a request against its model; raises InvalidArgument / NotFound naming the field.
        Reads no weights: the store is only looked at (see `request.resolve`)."""
        info = self.models.info(spec.model)
        request = resolve(
            spec,
            info,
            max_batch_rows=self.config.max_batch_rows,
            prompt_syntax=self.config.prompt_syntax,
            controlnet_store=self.runner.controlnets,
            ip_adapter_store=self.ip_adapters,
            weights=self.weights,
            request_id=request_id,
            tenant=tenant,
            deadline=deadline,
        )
        if info.backend != "eager":
            from sdserve.engine.onnx_backend import refuse_per_request_weights

            refuse_per_request_weights(request, info)
        return request

    def submit(self, request: EngineRequest, listener: Listener | None = None) -> None:
        self._queue.put(_Submission(request, listener))

    def cancel(self, request_id: str) -> None:
        """The request leaves the batch at the next step boundary."""
        self._cancelled.add(request_id)

    # -- what a server asks of the engine (its façade; thread-safe) ---------------------------

    def model_info(self, name: str) -> ModelInfo:
        """What `name` is (family, defaults, limits), from its directory; no weights read."""
        return self.models.info(name)

    def load_model(self, name: str) -> ModelInfo:
        """Read `name`'s weights now (once), so that no request pays for it."""
        return self.models.get(name).info

    def serve_conditioning_models(self, controlnets: Mapping[str, Path], ip_adapters: Mapping[str, Path]) -> None:
        """Requests may name only these ControlNet and IP-Adapter models, by these names; never a
        directory (the CLI, which trusts its user, leaves paths allowed)."""
        for registry, named in ((self.runner.controlnets, controlnets), (self.ip_adapters, ip_adapters)):
            registry.allow_paths = False
            for name, directory in named.items():
                registry.register(name, Path(directory).expanduser())

    def check_conditioning_models(self, served: Iterable[ModelInfo]) -> None:
        """Each registered ControlNet and IP-Adapter must fit at least one of the `served` eager
        models (the facts read at registration, no weights): one that fits none is refused now,
        at start-up, naming why for each model, instead of on every request that names it."""
        eager = [info for info in served if info.backend == "eager"]  # compiled ones take neither
        for table, registry in (("controlnets", self.runner.controlnets), ("ip_adapters", self.ip_adapters)):
            for name in registry.registered():
                reasons = []
                for info in eager:
                    try:
                        registry.check_fits(name, info, name)
                        break
                    except InvalidArgument as exc:
                        reasons.append(f"{info.name}: {exc.message}")
                else:
                    why = "; ".join(reasons) or "no eager model is served"
                    raise InvalidArgument(f"[models.{table}] {name!r} fits none of the served models ({why})")

    def lora_targets(self, model: str) -> Mapping[str, TargetSpec]:
        """The LoRA-targetable modules of `model` as it was loaded (before any layer was wrapped):
        what an uploaded adapter is validated against."""
        loaded = self.models.get(model)
        if loaded.info.backend != "eager":  # compiled: the exported modules' targets, from its graphs
            from sdserve.engine.onnx_backend import onnx_lora_targets

            return onnx_lora_targets(loaded.info)
        if loaded.adapters is not None:
            return loaded.adapters.targets  # the runtime described the model before wrapping it
        return targets_of(loaded.adapter_components())

    def residency_stats(self, models: Iterable[str]) -> list[ResidencyStats]:
        """Adapter residency counters (hits, misses, loads, evictions, bytes by tier) of each of
        `models` that serves adapters; read by the metrics endpoint at scrape time."""
        stats = []
        for name in models:
            runtime = self.models.get(name).adapters
            if runtime is not None:
                stats.append(runtime.stats)
        return stats

    # -- the loop: one owner ---------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._queue.empty() and not self._waiting and len(self.batcher) == 0

    def step(self) -> bool:
        """One step boundary and at most one UNet call. False when there was nothing to do."""
        self._drop_cancelled_and_expired()
        self._admit()
        picked = self.batcher.next_batch()
        if picked is None:
            return False
        key, states = picked
        model = states[0].model
        steps_before = [state.step_index for state in states]
        try:
            self.runner.step(model, assemble_batch(key, states))
        except Exception as exc:  # a failed call fails the requests that cause it, not the engine
            states = self._step_alone(model, key, states, steps_before, exc)
            if not states:
                return True
        states = self._drop_nonfinite(states)
        now = time.monotonic()
        finished = []
        for state in states:
            if state.timings.first_step is None:
                state.timings.first_step = now
            every = state.request.preview_every
            preview = None
            if every and state.step_index % every == 0 and not state.done:
                preview = model_preview(state.model, state.latents[0])  # [h, w, 3] at latent size
            event = EngineEvent("step", state.request.request_id, state.step_index, state.num_steps, preview=preview)
            self._emit(state.request, event)
            if state.done:
                state.timings.denoised = now
                finished.append(state)
        if finished:
            self._decode(finished)
        return True

    def _step_alone(
        self, model: LoadedModel, key: tuple[str, int, int], states: list[RequestState], steps_before: list[int],
        batch_error: Exception,
    ) -> list[RequestState]:
        """A batch's step raised: step each request that has not stepped yet alone, once, so a
        request whose adapters, conditioning or scheduler raise fails alone and its batch-mates
        go on. -> the requests that stepped.

        Rows never mix inside the UNet (rule 4), so a request stepped alone gets what it would
        have got in the batch (within float rounding). The runner advances requests one after
        another once the UNet call returned, so a raise in one request's scheduler step leaves
        the requests before it advanced: they are kept, never stepped twice. A fault that only
        the whole batch meets (e.g. out of memory) costs one call per request this step; one
        retry only, no bisection: a batch holds a few dozen rows at most.
        """
        stepped = []
        for state, before in zip(states, steps_before):
            if state.step_index != before:
                stepped.append(state)
                continue
            if len(states) == 1:  # it ran alone already
                self._fail(state, Internal("the model failed on this request"), batch_error)
                continue
            try:
                self.runner.step(model, assemble_batch(key, [state]))
            except Exception as exc:
                self._fail(state, Internal("the model failed on this request"), exc)
                continue
            stepped.append(state)
        return stepped

    def _drop_nonfinite(self, states: list[RequestState]) -> list[RequestState]:
        """Fail the requests whose latents overflowed this step; the others go on.

        Rows never mix inside the UNet (per-sample norms and attention), so one request's
        inf/NaN cannot reach its batch-mates; without this it would decode to a black image
        and be reported OK. One reduction per request and one host sync per step.
        """
        finite = torch.stack([torch.isfinite(state.latents).all() for state in states]).tolist()
        if all(finite):
            return states
        kept = []
        for state, ok in zip(states, finite):
            if ok:
                kept.append(state)
                continue
            step = f"step {state.step_index} of {state.num_steps}"
            self._fail(state, Internal(f"the request's latents became non-finite (inf or NaN) at {step}; "
                                       "an adapter or input pushed the model out of range"))
        return kept

    def run_until_idle(self) -> None:
        while not self.idle:
            if not self.step():
                time.sleep(0.002)  # only requests waiting for adapter loads: let the loader run

    def generate(self, requests: Iterable[EngineRequest]) -> list[GenerationResult | SdserveError]:
        """Run `requests` together; results (or each request's error) in input order."""
        requests = list(requests)
        outcomes: dict[int, GenerationResult | SdserveError] = {}

        def listener_for(index: int) -> Listener:
            def on_event(event: EngineEvent) -> None:
                if event.kind == "done":
                    outcomes[index] = event.result
                elif event.kind == "error":
                    outcomes[index] = event.error

            return on_event

        self._batch_calls += 1
        for index, request in enumerate(requests):
            # Listeners are keyed by request id, so ids must be unique within the engine.
            request = _with_id(request, f"{request.request_id or 'gen'}#{self._batch_calls}.{index}")
            self.submit(request, listener_for(index))
        self.run_until_idle()
        return [outcomes[i] for i in range(len(requests))]

    # -- internals ---------------------------------------------------------------------------

    def _emit(self, request: EngineRequest, event: EngineEvent) -> None:
        for observer in self.observers:
            observer(event)
        listener = self._listeners.get(request.request_id)
        if listener is not None:
            listener(event)

    def _fail(self, state_or_request, error: SdserveError, cause: BaseException | None = None) -> None:
        request = state_or_request.request if isinstance(state_or_request, RequestState) else state_or_request
        if isinstance(state_or_request, RequestState):
            self.batcher.remove(state_or_request)
            self._release_slots(request, state_or_request.adapter_slots)
        if cause is not None:
            error.__cause__ = cause
        self._emit(request, EngineEvent("error", request.request_id, error=error))
        self._listeners.pop(request.request_id, None)

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for state in self.batcher.active():
            request = state.request
            if request.request_id in self._cancelled:
                self._cancelled.discard(request.request_id)
                self._fail(state, Cancelled("the request was cancelled"))
            elif request.deadline is not None and now > request.deadline:
                self._fail(state, DeadlineExceeded("the request's deadline passed"))

    def _admit(self) -> None:
        # Requests whose adapters were loading go first, then new arrivals, in order.
        pending, self._waiting = self._waiting, []
        for _ in range(self.config.max_admit_per_step):
            try:
                submission = self._queue.get_nowait()
            except queue.Empty:
                break
            self._listeners[submission.request.request_id] = submission.listener
            pending.append(submission)
        for submission in pending:
            self._try_admit(submission)

    def _try_admit(self, submission: _Submission) -> None:
        request = submission.request
        if request.request_id in self._cancelled:
            self._cancelled.discard(request.request_id)
            self._release_slots(request, ())  # what the store pinned for it while it waited
            self._fail(request, Cancelled("the request was cancelled"))
            return
        if request.deadline is not None and time.monotonic() > request.deadline:
            self._release_slots(request, ())
            self._fail(request, DeadlineExceeded("the request's deadline passed"))
            return
        slots: list[int] = []
        try:
            model = self.models.get(request.model)
            if model.info.backend != "eager":  # compiled: validation refused every per-request weight
                weights, acquired = RequestWeights(), []
            else:
                runtime = self._adapters_of(model)
                # Every weight it names, from the store (loads start in the background; what is held
                # is pinned for the request from now on, so a queued request keeps what it found).
                weights = runtime.gather(request, self.runner.controlnets, self.ip_adapters)
                acquired = runtime.acquire(list(weights.lora_digests)) if weights is not None and request.adapters else []
            if weights is None or acquired is None:
                if submission.timings.adapters_waiting is None:
                    submission.timings.adapters_waiting = time.monotonic()
                self._waiting.append(submission)  # loading, or every slot pinned: next step
                return
            slots = acquired
            submission.timings.admitted = time.monotonic()
            state = prepare_state(
                weights.bind(request), model, self._arrivals, submission.timings, tuple(slots),
                ip_weights=weights.ip_adapters,
            )
        except SdserveError as exc:
            self._release_slots(request, slots)
            self._fail(request, exc)
            return
        except Exception as exc:
            self._release_slots(request, slots)
            self._fail(request, Internal("the request could not be prepared"), exc)
            return
        self._arrivals += 1
        self.batcher.add(state)
        self._emit(request, EngineEvent("admitted", request.request_id, 0, state.num_steps))

    def _release_slots(self, request: EngineRequest, slots: list[int] | tuple[int, ...]) -> None:
        """The request is done with its device slots and with everything the store pinned for it."""
        if slots:
            model = self.models.get(request.model)
            model.adapters.release(list(slots))
        self.weights.release(request.request_id)

    def _adapters_of(self, model: LoadedModel) -> AdapterRuntime:
        """The model's adapter machinery on the engine's store, attached once when first served."""
        if model.adapters is None:
            model.adapters = AdapterRuntime(
                model, self.config.residency, max_rows=self.config.max_batch_rows, store=self.weights
            )
        return model.adapters

    def _decode(self, finished: list[RequestState]) -> None:
        for state in finished:
            self.batcher.remove(state)
            self._release_slots(state.request, state.adapter_slots)
        model = finished[0].model
        chunk: list[RequestState] = []
        for state in finished:
            chunk.append(state)
            if sum(s.request.num_images for s in chunk) >= self.config.max_decode_batch:
                self._decode_chunk(model, chunk)
                chunk = []
        if chunk:
            self._decode_chunk(model, chunk)

    def _decode_chunk(self, model, states: list[RequestState]) -> None:
        try:
            images = decode_latents(model, torch.cat([s.latents for s in states]))
        except Exception as exc:
            for state in states:
                self._fail(state, Internal("decoding failed"), exc)
            return
        now = time.monotonic()
        offset = 0
        info = getattr(model, "info", None)
        model_hash = model_shorthash(info.path) if info is not None else ""
        for state in states:
            n = state.request.num_images
            state.timings.decoded = now
            result = GenerationResult(
                request=state.request,
                images=[images[offset + i] for i in range(n)],
                timings=state.timings.as_dict(),
                model_hash=model_hash,
            )
            offset += n
            self._emit(state.request, EngineEvent("done", state.request.request_id, result=result))
            self._listeners.pop(state.request.request_id, None)


def _with_id(request: EngineRequest, request_id: str) -> EngineRequest:
    from dataclasses import replace

    return replace(request, request_id=request_id)
