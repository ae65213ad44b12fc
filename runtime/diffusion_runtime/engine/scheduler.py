"""The one queue and the one worker: every pipeline call of the server goes through here.

diffusers pipelines are not thread-safe, so generations, edits, sync requests and async jobs all
wait in one FIFO queue in front of one worker thread that owns the pipeline. A `Work` item carries
the call to make (`run`, executed in the pipeline thread), its step progress and a cancel flag that
the pipeline's step callback checks: a withdrawn running item stops at its next step.

Gauges: `diffusion_queue_depth` (waiting), `diffusion_requests_in_flight` (running, 0 or 1) and
`diffusion_demand_requests` (waiting + running: the autoscaling signal).

Admission asks `accepting` (the server's phase: raises Unavailable) and refuses past
`server.max_queue` (QueueFull, with its Retry-After estimate capped by `server.max_retry_after_seconds`);
the HTTP layer turns those into 503 and 429. The scheduler reads its limits from the `server` section
of the runtime config itself, so a new queue setting is a field there and its use here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from diffusion_runtime.contract.config import ServerConfig
from diffusion_runtime.engine.errors import Cancelled, QueueFull
from diffusion_runtime.engine.params import EncodedResult, StepCallback
from diffusion_runtime.metrics import RuntimeMetrics

# run(cancel, on_step) -> the encoded result; executed in the pipeline thread
PipelineCall = Callable[[threading.Event, StepCallback], EncodedResult]


@dataclass(eq=False)
class Work:
    endpoint: str  # "generations" | "edits": the metrics label
    run: PipelineCall
    total_steps: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    step: int = 0
    cancel_step: int | None = None  # `step` when the cancel was requested
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def queue_wait(self) -> float:
        return (self.started or time.perf_counter()) - self.enqueued


class Scheduler:
    """FIFO queue of Work in front of one worker thread that owns the pipeline."""

    def __init__(self, metrics: RuntimeMetrics, limits: ServerConfig, accepting: Callable[[], None]):
        self.metrics = metrics
        self.limits = limits
        self.accepting = accepting  # raises Unavailable while the server takes no work
        self.queue: collections.deque[Work] = collections.deque()
        self.running: Work | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._avg_seconds = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        return not self.queue and self.running is None

    @property
    def demand(self) -> int:
        return len(self.queue) + (1 if self.running is not None else 0)

    async def wait_idle(self) -> None:
        """Until nothing waits or runs (the queue worker pulls shared work only then)."""
        await self._idle.wait()

    def position(self, work: Work) -> int | None:
        """1-based place among the waiting items; None when not waiting. FIFO: it never increases."""
        for i, w in enumerate(self.queue):
            if w is work:
                return i + 1
        return None

    def retry_after(self) -> int:
        per_item = self._avg_seconds or 1.0
        seconds = max(1, math.ceil(per_item * (len(self.queue) + 1)))
        cap = self.limits.max_retry_after_seconds
        return seconds if cap is None else min(seconds, cap)

    def _gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(len(self.queue))
        m.in_flight.set(1 if self.running is not None else 0)
        m.demand.set(self.demand)
        if self.idle:
            self._idle.set()
        else:
            self._idle.clear()

    def admit(self) -> None:
        """Raise Unavailable or QueueFull unless a new item could be queued now."""
        self.accepting()
        if len(self.queue) >= self.limits.max_queue:
            raise QueueFull(f"queue full ({len(self.queue)} waiting)", retry_after=self.retry_after())

    def submit(self, work: Work) -> None:
        self.admit()
        self.queue.append(work)
        self._gauges()
        self._wakeup.set()

    def withdraw(self, work: Work) -> bool:
        """Nobody wants this item any more: out of the queue (True), or stop it at its next step."""
        if work.cancel_step is None:
            work.cancel_step = work.step
        work.cancel.set()
        try:
            self.queue.remove(work)
            removed = True
        except ValueError:
            removed = False
        if removed and not work.future.done():
            work.future.set_exception(Cancelled())
        self._gauges()
        return removed

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            work = self.queue.popleft()
            if work.cancel.is_set() or work.future.done():
                self._gauges()
                continue
            self.running = work
            work.started = time.perf_counter()
            self._gauges()
            self.metrics.queue_wait.observe(work.started - work.enqueued)

            def on_step(step_index: int, work: Work = work) -> None:
                work.step = step_index + 1

            try:
                result = await loop.run_in_executor(self.executor, work.run, work.cancel, on_step)
                secs = result.inference_seconds
                self._avg_seconds = 0.7 * self._avg_seconds + 0.3 * secs if self._avg_seconds else secs
                if not work.future.done():
                    work.future.set_result(result)
            except asyncio.CancelledError:
                raise  # the server is stopping
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the item
                if not work.future.done():
                    work.future.set_exception(e)
            finally:
                self.running = None
                self._gauges()
