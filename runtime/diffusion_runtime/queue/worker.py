"""A runtime pod's side of the shared queue: pull a job only when the local scheduler is idle, run it
through that one scheduler (the same `Work`/`PipelineCall` path as a direct request), renew it while
it runs, store its result and finish it at most once.

- Pull: `XAUTOCLAIM` first (an entry idle > `queue.claim_idle_seconds`: its pod died), else
  `XREADGROUP ... COUNT 1 BLOCK 1000`, consumer = HOSTNAME.PID; nothing is read while the scheduler
  has anything queued or running, so a busy pod never holds work it cannot start.
- Start (Lua): only a job still queued/running starts; `attempts` counts starts; past
  `queue.max_attempts` the job fails naming the reason. A generation's first delivery carries its
  request in the entry: it is submitted at once and START runs beside its first steps.
- While running: every step's progress is written (at most every `PROGRESS_SECONDS`) and the entry is
  renewed (XCLAIM to itself) every third of `claim_idle_seconds`; a cancel (pub/sub `P cancel`, or the
  flag read back by the renewal) stops the pipeline at its next step; an entry that another pod took
  over stops this run (its outcome is discarded).
- Finish (Lua): result or error, XACK + XDEL, publish `P done`: only if the job is not final yet;
  `diffusion_queue_executions_total{result}` counts each outcome, `discarded` for duplicates.
- SIGTERM (`drain`): stop pulling, finish the running job; the rest stays in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any, cast

from prometheus_client import Counter
from redis.exceptions import RedisError

from diffusion_runtime.api.errors import Rejected, error_detail
from diffusion_runtime.api.serving import (
    ImageServing,
    build_images_response,
    decode_edit_inputs,
    edit_call,
    generation_call,
    record_inference,
    record_result,
)
from diffusion_runtime.api.videos import reference
from diffusion_runtime.api.videos.serving import ENDPOINT as VIDEOS_ENDPOINT
from diffusion_runtime.api.videos.serving import record_video, video_call
from diffusion_runtime.contract.queue import EXECUTION_RESULTS, QUEUE_EXECUTIONS_METRIC
from diffusion_runtime.engine.errors import Cancelled, EngineError, InvalidInput, QueueFull, Unavailable
from diffusion_runtime.engine.imaging import decode_upload
from diffusion_runtime.engine.params import (
    EditParams,
    EncodedResult,
    GenerationResult,
    VideoParams,
)
from diffusion_runtime.engine.scheduler import Work
from diffusion_runtime.engine.video import encode_video
from diffusion_runtime.queue.spec import generation_params, output_format, video_params
from diffusion_runtime.queue.store import QueueStore, Started, done_message, new_result_id

log = logging.getLogger("diffusion_runtime")
PROGRESS_SECONDS = 0.25  # step progress reaches the store at most this often
CONSUMER_GC_SECONDS = 300.0  # forget consumers with nothing pending after this idle time
RETRY_SECONDS = 1.0


def consumer_name() -> str:
    """HOSTNAME (the pod's name) and the process id: unique per process, readable in XINFO."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}.{os.getpid()}"


class QueueWorker:
    def __init__(self, serving: ImageServing, url: str, consumer: str | None = None):
        self.serving = serving
        self.state = serving.state
        cfg = self.state.config.queue
        assert cfg is not None, "QueueWorker without a queue section"
        self.cfg = cfg
        self.store = QueueStore(cfg, url, self.state.config.server.job_ttl_seconds)
        self.consumer = consumer or consumer_name()
        self.executions = Counter(
            QUEUE_EXECUTIONS_METRIC,
            "Queue jobs this pod ran, by outcome: succeeded|failed|cancelled, and discarded (finished "
            "elsewhere first: not stored).",
            ["result"], registry=self.state.metrics.registry,
        )  # fmt: skip
        for r in EXECUTION_RESULTS:
            self.executions.labels(result=r)
        self.current: tuple[str, Work] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._pull_task: asyncio.Task | None = None

    async def start(self) -> None:
        log.info("queue worker %s: pulling from %s (group workers)", self.consumer, self.cfg.stream)
        self._pull_task = asyncio.create_task(self._pull())
        self._tasks = [self._pull_task, asyncio.create_task(self._listen_cancels())]

    async def drain(self, deadline: float) -> None:
        """Stop pulling; return when the running job is finished (or at `deadline`)."""
        self._stop.set()
        if self._pull_task is not None:
            await asyncio.wait({self._pull_task}, timeout=max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.store.close()

    # ------------------------------------------------------------ pulling

    def _pulling(self) -> bool:
        return not self._stop.is_set() and self.state.ready

    async def _pull(self) -> None:
        sched = self.serving.sched
        gc_at = time.monotonic() + CONSUMER_GC_SECONDS
        while not self._stop.is_set():
            try:
                if not self.state.ready:
                    await asyncio.sleep(0.2)  # loading, warming up (draining sets _stop)
                    continue
                await sched.wait_idle()
                if not self._pulling():
                    continue
                got: tuple[Any, ...] | None = await self.store.reclaim(
                    self.consumer, self.cfg.claim_idle_seconds
                )
                if got is not None:
                    log.warning(
                        "queue: reclaimed job %s (entry %s): its pod stopped renewing it", got[1], got[0]
                    )
                else:
                    got = await self.store.read(self.consumer)
                if got is None:
                    if time.monotonic() > gc_at:
                        gc_at = time.monotonic() + CONSUMER_GC_SECONDS
                        await self.store.forget_idle_consumers(CONSUMER_GC_SECONDS)
                    continue
                if not self._pulling():  # SIGTERM while the read waited: give the job back
                    await self.store.release(got[0], got[1], self.consumer)
                    continue
                await self._execute(*got)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("queue: %s: %s; retrying in %gs", type(e).__name__, e, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # noqa: BLE001 - the loop must survive one bad job
                log.exception("queue: unexpected error in the pull loop")
                await asyncio.sleep(RETRY_SECONDS)

    # ------------------------------------------------------------ one job

    def _work(self, spec: dict[str, Any], image: bytes | None, mask: bytes | None) -> tuple[Work, Any]:
        if spec["endpoint"] == VIDEOS_ENDPOINT:
            return self._video_work(spec, image)
        params = generation_params(spec)
        output = output_format(spec)
        if spec["endpoint"] == "edits":
            if image is None:
                raise InvalidInput("image: the job's upload is missing from the queue", param="image")
            img, msk = decode_edit_inputs(image, mask)
            edit = EditParams(
                **{k: getattr(params, k) for k in spec["params"]},
                image=img,
                mask=msk,
                strength=spec["strength"],
            )
            self.state.loaded().prepare_edit(edit.kind)
            return self.serving.new_work("edits", edit_call(self.state, edit, output), edit.run_steps), edit
        call = generation_call(self.state, params, output)
        return self.serving.new_work("generations", call, params.run_steps), params

    def _video_work(self, spec: dict[str, Any], image: bytes | None) -> tuple[Work, VideoParams]:
        """A clip: the front door checked it against the pipeline its config names (if any); the
        loaded pipeline's own rules are checked here (frame count, first frame sent exactly when it
        takes one: else the job fails with a 400). `image`: the fitted first frame, PNG."""
        params = video_params(spec)
        engine = self.state.loaded()
        reference.check_reference(engine.pipeline_name, image is not None)
        if image is not None:
            params = dataclasses.replace(params, image=decode_upload(image, reference.PARAM))
        multiple = engine.frame_multiple
        if engine.modality == "video" and (params.frames - 1) % multiple:
            raise InvalidInput(
                f"num_frames: {params.frames} is not a frame count {engine.pipeline_name} renders "
                f"(k*{multiple}+1)",
                param="num_frames",
            )
        return self.serving.new_work(
            VIDEOS_ENDPOINT, video_call(self.state, params), params.run_steps
        ), params

    async def _execute(self, entry: str, job_id: str, spec: dict[str, Any] | None = None) -> None:
        """Run one job. A generation's first delivery (`spec` read with the entry) is submitted at
        once and its START runs beside the pipeline: no round trip before the first step. Edits (their
        uploads are in the hash) and redeliveries (attempts decide) START first."""
        sched = self.serving.sched
        start_task: asyncio.Task | None = None
        image = mask = None
        if spec is not None and spec.get("endpoint") == "generations":
            start_task = asyncio.create_task(
                self._retrying(lambda: self.store.start(entry, job_id, self.consumer))
            )
        else:
            started = await self.store.start(entry, job_id, self.consumer)
            if started.outcome == "exhausted":
                log.error("queue: job %s failed: %s", job_id, started.reason)
                return
            if started.outcome != "run" or started.spec is None:
                return  # cancelled while queued, or expired: nothing to run
            if started.attempt > 1:
                log.warning("queue: job %s: attempt %d of %d", job_id, started.attempt, self.cfg.max_attempts)
            spec, image, mask = started.spec, started.image, started.mask
        try:
            work, params = self._work(spec, image, mask)
            sched.submit(work)
        except (Unavailable, QueueFull) as e:  # a direct request or SIGTERM came first: back in line
            log.info("queue: job %s given back (%s)", job_id, e.message)
            if start_task is not None:
                await start_task
            await self.store.release(entry, job_id, self.consumer)
            return
        except (Rejected, EngineError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, Rejected | EngineError):
                r = e if isinstance(e, Rejected) else Rejected.of(e)
            else:  # a spec this runtime cannot read (another version's front door?): the job fails
                r = Rejected(500, f"malformed job request ({type(e).__name__}: {e})")
            if start_task is not None and not await self._started(start_task, job_id):
                return
            await self._finish(entry, job_id, spec, "failed", error=(r.status, r.message, r.param))
            return
        if start_task is not None:
            started = await start_task
            if not isinstance(started, Started) or started.outcome != "run":
                sched.withdraw(work)  # cancelled or gone before it started (or the store is away)
                self.executions.labels(result="discarded").inc()
                return
        if started.cancel_requested:
            sched.withdraw(work)
        self.current = (job_id, work)
        lost = asyncio.Event()
        monitor = asyncio.create_task(self._monitor(entry, job_id, work, lost))
        status, result = "failed", None
        error: tuple[int, str, str | None] | None = None
        try:
            result = await asyncio.shield(work.future)
            status = "succeeded"
        except Cancelled:
            status = "cancelled"
            error = (400, "cancelled by DELETE before it finished", None)
        except InvalidInput as e:
            error = (400, e.message, e.param)
        except Exception as e:  # noqa: BLE001 - recorded in the job
            log.error("queue: job %s failed: %s: %s", job_id, type(e).__name__, e)
            error = (500, f"generation failed ({type(e).__name__}: {e})", None)
        finally:
            monitor.cancel()
            self.current = None
        if lost.is_set():  # another pod owns it now: whatever happened here is not the job's outcome
            self.executions.labels(result="discarded").inc()
            log.warning("queue: job %s was taken over by another pod; this run is discarded", job_id)
            return
        await self._finish(entry, job_id, spec, status, result=result, work=work, params=params,
                           created=started.created_at, error=error)  # fmt: skip

    async def _started(self, task: asyncio.Task, job_id: str) -> bool:
        started = await task
        return isinstance(started, Started) and started.outcome == "run"

    async def _finish(
        self, entry: str, job_id: str, spec: dict[str, Any], status: str, *,
        result: EncodedResult | GenerationResult | None = None,
        work: Work | None = None, params: Any = None, created: float = 0.0,
        error: tuple[int, str, str | None] | None = None,
    ) -> None:  # fmt: skip
        body, err, err_status = "", "", 0
        wait = None
        if work is not None and work.started:
            wait = max(0.0, time.time() - (time.perf_counter() - work.started) - created)
        if result is not None and spec["endpoint"] == VIDEOS_ENDPOINT:
            stored = await self._store_clip(job_id, cast(GenerationResult, result), params)
            if stored is None:  # taken over, deleted, or the store stayed away: not this run's outcome
                self.executions.labels(result="discarded").inc()
                return
            body = stored
        elif result is not None:
            images = cast(EncodedResult, result)
            record_result(self.state.metrics, images, params)
            rids: list[str] = []
            if spec["response_format"] == "url":
                rids = [new_result_id(spec["output_format"]) for _ in images.images]
                await self._retrying(
                    lambda: self.store.put_results(
                        list(zip(rids, images.images, strict=True)), spec.get("owner")
                    )
                )
            ids = iter(rids)
            response = build_images_response(
                images, params, spec["output_format"], spec["response_format"], spec["base_url"],
                put=lambda _b, _f: next(ids), queue_wait=wait or 0.0, total=time.time() - created,
            )  # fmt: skip
            body = response.model_dump_json()
        if error is not None:
            err_status = error[0]
            err = error_detail(error[0], error[1], error[2]).model_dump_json()
        reply = spec.get("reply") or None  # a sync job: its front door gets the result with the notice
        message = done_message(
            job_id, status, wait, bool(spec.get("webhook")), bool(spec.get("sync")), err_status,
            payload=(body or err) if reply else "",
        )  # fmt: skip
        first = await self._retrying(
            lambda: self.store.finalize(
                entry,
                job_id,
                status,
                result=body,
                error=err,
                error_status=err_status,
                message=message,
                channel=reply,
            )
        )
        self.executions.labels(result=status if first else "discarded").inc()
        log.debug(
            "queue: job %s %s%s", job_id, status, "" if first else " (already final elsewhere: discarded)"
        )

    async def _store_clip(self, job_id: str, result: GenerationResult, params: VideoParams) -> str | None:
        """Encode the clip (a worker thread) and keep it in the store; the job's result JSON, or None when
        the job is no longer this pod's (nothing kept)."""
        s = self.state.config.server
        record_inference(self.state.metrics, result)
        video = await asyncio.to_thread(encode_video, result.images[0], params.fps, s.video_crf)
        reason = f"the stored clips exceeded {s.video_store_max_bytes} bytes (server.video_store_max_bytes): oldest out first"
        evicted = await self._retrying(
            lambda: self.store.store_clip(
                job_id, video.mp4, video.thumbnail, self.consumer, s.video_store_max_bytes, reason
            )
        )
        if evicted is None or evicted is False:
            return None
        for old in evicted:
            log.info("queue: clip %s evicted: %s", old, reason)
        record_video(self.state.metrics, job_id, result, video)
        return json.dumps({"bytes": len(video.mp4), "cached_steps": result.cached_steps})

    async def _retrying(self, op: Any) -> Any:
        """A store write that must land: retried while the server is unreachable, up to the request
        timeout (after that the job is redelivered by XAUTOCLAIM; its finish is idempotent)."""
        deadline = time.monotonic() + self.state.config.server.request_timeout_seconds
        while True:
            try:
                return await op()
            except (RedisError, OSError) as e:
                if time.monotonic() > deadline:
                    log.error("queue: giving up a store write: %s", e)
                    return False
                await asyncio.sleep(RETRY_SECONDS)

    async def _monitor(self, entry: str, job_id: str, work: Work, lost: asyncio.Event) -> None:
        """Step progress and renewal while the job runs; stop it when cancelled or taken over."""
        renew = self.cfg.claim_idle_seconds / 3
        # START just renewed it: the first write is the first step's progress (a short job makes none)
        next_renew, last_step = time.monotonic() + renew, 0
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            now = time.monotonic()
            if work.step != last_step or now >= next_renew:
                step = work.step
                try:
                    ours, cancel = await self.store.heartbeat(entry, job_id, self.consumer, step)
                except (RedisError, OSError) as e:
                    log.warning("queue: renewing job %s failed: %s", job_id, e)
                else:
                    last_step, next_renew = step, now + renew
                    if not ours:
                        lost.set()
                        self.serving.sched.withdraw(work)
                        return
                    if cancel:
                        self.serving.sched.withdraw(work)

    async def _listen_cancels(self) -> None:
        """One subscription to `P cancel`: a DELETE reaches the running pipeline at its next step."""
        while True:
            ps = self.store.r.pubsub()
            try:
                await ps.subscribe(self.store.cancel_channel)
                while True:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    job_id = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    current = self.current
                    if current is not None and current[0] == job_id:
                        log.info("queue: job %s cancelled while running", job_id)
                        self.serving.sched.withdraw(current[1])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                await asyncio.sleep(RETRY_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await ps.aclose()


def worker_serving(url: str) -> Any:
    """The runtime's serving factory in queue mode: this pod's scheduler plus a `QueueWorker`."""

    class WorkerServing(ImageServing):
        worker: QueueWorker

        async def startup(self) -> None:
            await super().startup()
            self.worker = QueueWorker(self, url)
            await self.worker.start()

        async def drain(self, deadline: float) -> None:
            await self.worker.drain(deadline)
            await super().drain(deadline)

        async def shutdown(self) -> None:
            await self.worker.close()
            await super().shutdown()

    return WorkerServing
