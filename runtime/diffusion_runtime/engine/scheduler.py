"""The one queue and the one worker: every pipeline call of the server goes through here.

diffusers pipelines are not thread-safe, so generations, edits, sync requests and async jobs all
wait in one FIFO queue in front of one worker thread that owns the pipeline. A `Work` item carries
the call to make (`run`, executed in the pipeline thread), its step progress and a cancel flag that
the pipeline's step callback checks: a withdrawn running item stops at its next step.

Gauges: `diffusion_queue_depth` (waiting), `diffusion_requests_in_flight` (running: 0 or 1, up to
`server.max_batch` when batching) and `diffusion_demand_requests` (waiting + running), and the counter
`diffusion_demand_request_seconds_total` (that demand integrated over time: its rate, the average demand,
is the autoscaling signal).

Dynamic batching (`server.max_batch` > 1): a text-to-image item that carries its `params` (and the
`output` its images are encoded to) takes the waiting items with the same `params.batch_key`, up to
`max_batch` images, waiting at most `server.max_batch_delay_seconds` for more, and they run as one
`Engine.generate_batch` call. Each keeps its own seed, result and cancel flag: a withdrawn member
gets Cancelled at the end while the others get their images; the call itself stops only when every
member is withdrawn. Edits, and items without params, run alone. Histograms: `diffusion_batch_size`
(images per pipeline call) and `diffusion_batch_wait_seconds` (the first item's wait for company).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from diffusion_runtime.contract.config import ServerConfig
from diffusion_runtime.engine.errors import Cancelled, QueueFull
from diffusion_runtime.engine.imaging import encode_result
from diffusion_runtime.engine.params import (
    EncodedResult,
    GenerationParams,
    GenerationResult,
    OutputFormat,
    StepCallback,
)
from diffusion_runtime.metrics import RuntimeMetrics

# run(cancel, on_step) -> the encoded result; executed in the pipeline thread
PipelineCall = Callable[[threading.Event, StepCallback], EncodedResult]
# run_batch(params of each member, cancel, on_step) -> one result per member (Engine.generate_batch)
BatchCall = Callable[[Sequence[GenerationParams], threading.Event, StepCallback], list[GenerationResult]]


@dataclass(eq=False)
class Work:
    endpoint: str  # "generations" | "edits" | "videos": the metrics label
    run: PipelineCall
    total_steps: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    step: int = 0
    cancel_step: int | None = None  # `step` when the cancel was requested
    cancel: threading.Event = field(default_factory=threading.Event)
    # batchable (server.max_batch): the call's parameters and its images' encoding
    params: GenerationParams | None = None
    output: OutputFormat | None = None

    @property
    def images(self) -> int:
        return self.params.n if self.params is not None else 1

    @property
    def batch_key(self) -> tuple | None:
        return self.params.batch_key if self.params is not None and self.output is not None else None

    @property
    def queue_wait(self) -> float:
        return (self.started or time.perf_counter()) - self.enqueued


class Scheduler:
    """FIFO queue of Work in front of one worker thread that owns the pipeline."""

    def __init__(
        self,
        metrics: RuntimeMetrics,
        limits: ServerConfig,
        accepting: Callable[[], None],
        run_batch: BatchCall | None = None,
    ):
        self.metrics = metrics
        self.limits = limits
        self.accepting = accepting  # raises Unavailable while the server takes no work
        self.run_batch = run_batch  # None: every item runs alone
        self.queue: collections.deque[Work] = collections.deque()
        self.running: list[Work] = []  # the items of the pipeline call now (or gathering company)
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
        return not self.queue and not self.running

    @property
    def demand(self) -> int:
        return len(self.queue) + len(self.running)

    def is_running(self, work: Work) -> bool:
        return any(w is work for w in self.running)

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
        m.in_flight.set(len(self.running))
        m.demand.set(self.demand)
        m.demand_seconds.set(self.demand)
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

    @property
    def batching(self) -> bool:
        return self.run_batch is not None and self.limits.max_batch > 1

    def _take_company(self, batch: list[Work]) -> None:
        """Move waiting items with the first's batch_key into `batch`, in queue order, while the
        images fit in max_batch."""
        key = batch[0].batch_key
        room = self.limits.max_batch - sum(w.images for w in batch)
        for w in list(self.queue):
            if room <= 0:
                break
            if w.batch_key == key and w.images <= room and not w.cancel.is_set() and not w.future.done():
                self.queue.remove(w)
                batch.append(w)
                room -= w.images

    async def _gather(self, first: Work) -> list[Work]:
        """`first` and the compatible items that come within max_batch_delay_seconds."""
        batch = [first]
        if not self.batching or first.batch_key is None or first.images >= self.limits.max_batch:
            return batch
        self.running = batch
        self._gauges()
        t0 = time.perf_counter()
        deadline = t0 + self.limits.max_batch_delay_seconds
        while True:
            self._take_company(batch)
            self._gauges()
            left = deadline - time.perf_counter()
            if sum(w.images for w in batch) >= self.limits.max_batch or left <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                pass
        self.metrics.batch_wait.observe(time.perf_counter() - t0)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            head = self.queue.popleft()
            if head.cancel.is_set() or head.future.done():
                self._gauges()
                continue
            try:
                gathered = await self._gather(head)
            except asyncio.CancelledError:
                raise  # the server is stopping
            members = []
            for w in gathered:  # withdrawn while the batch gathered: out, Cancelled
                if w.cancel.is_set() or w.future.done():
                    if not w.future.done():
                        w.future.set_exception(Cancelled())
                else:
                    members.append(w)
            self.running = members
            started = time.perf_counter()
            for w in members:
                w.started = started
                self.metrics.queue_wait.observe(w.started - w.enqueued)
            self._gauges()
            if not members:
                continue
            self.metrics.batch_size.observe(sum(w.images for w in members))
            try:
                if len(members) == 1:
                    await self._run_one(loop, members[0])
                else:
                    await self._run_batch(loop, members)
            except asyncio.CancelledError:
                raise  # the server is stopping
            finally:
                self.running = []
                self._gauges()

    def _learn(self, seconds: float, items: int) -> None:
        per_item = seconds / max(items, 1)
        self._avg_seconds = 0.7 * self._avg_seconds + 0.3 * per_item if self._avg_seconds else per_item

    async def _run_one(self, loop: asyncio.AbstractEventLoop, work: Work) -> None:
        def on_step(step_index: int) -> None:
            work.step = step_index + 1

        try:
            result = await loop.run_in_executor(self.executor, work.run, work.cancel, on_step)
            self._learn(result.inference_seconds, 1)
            if not work.future.done():
                work.future.set_result(result)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the item
            if not work.future.done():
                work.future.set_exception(e)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, members: list[Work]) -> None:
        """One pipeline call for `members` (one batch_key); each gets its own outcome."""
        assert self.run_batch is not None
        run_batch = self.run_batch
        stop = threading.Event()  # the whole call stops only when every member is withdrawn

        def on_step(step_index: int) -> None:
            for w in members:
                w.step = step_index + 1
            if all(w.cancel.is_set() for w in members):
                stop.set()

        def call() -> list[EncodedResult]:  # in the pipeline thread: run, then encode each member's images
            results = run_batch([w.params for w in members if w.params is not None], stop, on_step)
            return [
                encode_result(r, w.output or OutputFormat()) for w, r in zip(members, results, strict=True)
            ]

        try:
            encoded = await loop.run_in_executor(self.executor, call)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - every member waits for this call
            for w in members:
                if not w.future.done():
                    w.future.set_exception(Cancelled() if w.cancel.is_set() else e)
            return
        self._learn(encoded[0].inference_seconds, len(members))
        for w, result in zip(members, encoded, strict=True):
            if w.future.done():
                continue
            if w.cancel.is_set():  # withdrawn during the call: its batch-mates keep their images
                w.future.set_exception(Cancelled())
            else:
                w.future.set_result(result)
