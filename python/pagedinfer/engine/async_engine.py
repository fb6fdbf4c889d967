"""`AsyncLLMEngine`: the server's engine. One thread owns the `LLMEngine` (scheduler, KV cache, model)
and runs its `step()` in a loop; asyncio handlers talk to it only through a thread-safe inbox (adds and
aborts, applied between steps) and get their outputs back on one asyncio queue per request. The event
loop never runs a model step, so it keeps accepting connections while the model computes."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Optional, Union

from pagedinfer.engine.llm_engine import LLMEngine, PromptInput
from pagedinfer.outputs import RequestOutput
from pagedinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed: no request can be served any more."""


@dataclass
class RequestTiming:
    """What the metrics need of a request's life (time.monotonic() seconds)."""

    arrival: float
    first_token: Optional[float] = None


@dataclass
class _OpenRequest:
    queue: asyncio.Queue
    timing: RequestTiming = field(default_factory=lambda: RequestTiming(time.monotonic()))


@dataclass
class _Add:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    request: _OpenRequest


@dataclass
class _Abort:
    request_id: str


_STOP = object()  # the inbox item that ends the engine thread
_Item = Union[_Add, _Abort, object]


class AsyncLLMEngine:
    """on_step(engine) runs on the engine thread after every step (gauges); on_finished(output, timing)
    when a request finishes (counters, histograms); on_failure(error) once, if the engine fails.
    fail_after_steps makes step number N+1 raise: a test's way to kill the engine mid-stream."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 on_step: Callable[[LLMEngine], None] = lambda engine: None,
                 on_finished: Callable[[RequestOutput, RequestTiming], None] = lambda output, timing: None,
                 on_failure: Callable[[BaseException], None] = lambda error: None,
                 fail_after_steps: Optional[int] = None) -> None:
        self.engine = engine
        self.error: Optional[BaseException] = None
        self._loop = loop
        self._on_step, self._on_finished, self._on_failure = on_step, on_finished, on_failure
        self._fail_after_steps = fail_after_steps
        self._inbox: queue.Queue[_Item] = queue.Queue()
        # Orders adds against a failure: an add either reaches the inbox before the failure drains it
        # (and gets the error from there) or sees the error itself; none waits forever.
        self._admission = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pagedinfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt: PromptInput,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's cumulative outputs as the engine makes them, the last one finished. Raises the
        engine's ValueError for a bad request, EngineDeadError if the engine fails. Leaving the loop early
        (a client gone) aborts the request and frees its blocks."""
        request = _OpenRequest(asyncio.Queue())
        with self._admission:
            if not self.is_running:
                raise EngineDeadError(f"the engine is not running: {self.error!r}")
            self._inbox.put(_Add(request_id, prompt, params, request))
        finished = False
        try:
            while not finished:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine no longer holds it
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    # The engine thread: everything below runs there.

    def _run(self) -> None:
        open_requests: dict[str, _OpenRequest] = {}
        num_steps = 0
        try:
            while True:
                # Block for work when idle; otherwise take what came in and step again.
                items = [self._inbox.get()] if not self.engine.has_unfinished_requests() else []
                items += _drain(self._inbox)
                if any(item is _STOP for item in items):
                    return
                for item in items:
                    self._apply(item, open_requests)
                if not self.engine.has_unfinished_requests():
                    self._on_step(self.engine)  # aborts freed blocks: the gauges must say so
                    continue
                if self._fail_after_steps is not None and num_steps >= self._fail_after_steps:
                    raise RuntimeError(f"injected engine failure after {num_steps} steps")
                outputs = self.engine.step()
                num_steps += 1
                now = time.monotonic()
                self._on_step(self.engine)
                for output in outputs:
                    request = open_requests[output.request_id]
                    if request.timing.first_token is None:
                        request.timing.first_token = now
                    if output.finished:
                        del open_requests[output.request_id]
                        self._on_finished(output, request.timing)
                    self._deliver(request, output)
        except BaseException as error:  # noqa: BLE001 - whatever killed the engine, every client hears it
            logger.exception("the engine failed")
            with self._admission:
                self.error = error
                queued = [item.request for item in _drain(self._inbox) if isinstance(item, _Add)]
            for request in [*open_requests.values(), *queued]:
                self._deliver(request, EngineDeadError(f"the engine failed: {error!r}"))
            self._loop.call_soon_threadsafe(self._on_failure, error)

    def _apply(self, item: _Item, open_requests: dict[str, _OpenRequest]) -> None:
        if isinstance(item, _Abort):
            self.engine.abort_request(item.request_id)
            open_requests.pop(item.request_id, None)
            return
        assert isinstance(item, _Add)
        try:
            self.engine.add_request(item.request_id, item.prompt, item.params)
        except ValueError as error:  # a bad request: its client gets the error, the engine goes on
            self._deliver(item.request, error)
            return
        open_requests[item.request_id] = item.request

    def _deliver(self, request: _OpenRequest, item: Union[RequestOutput, BaseException]) -> None:
        self._loop.call_soon_threadsafe(request.queue.put_nowait, item)


def _drain(inbox: queue.Queue[_Item]) -> list[_Item]:
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items
