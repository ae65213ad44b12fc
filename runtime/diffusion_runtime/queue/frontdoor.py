"""`diffusion-runtime front-door`: the OpenAI-compatible API of a deployment, in front of its queue.

The same app, routes, protocol and checks as the runtime (`api.app.create_app`), over another
backend: `QueueServing` validates exactly as a runtime does, then enqueues. Async submissions answer
202 + job; sync ones are held until their job finishes (up to `server.request_timeout_seconds`, even
while no runtime pod exists: scale from zero). Jobs and `url` results are read from Redis, so any
replica answers for any job. One pub/sub subscription per process (`P done` and this process's
`P reply:ID`, where a sync job's answer arrives with its notice) wakes the requests waiting here;
nothing polls. Redis unreachable: 503 + Retry-After at once, /ready 503.

Metrics (`contract.queue` names): the queue's waiting/running/demand gauges and the redeliveries
counter are read from Redis at scrape time (every replica exports the same values, zero runtime pods
included), the wait-time histogram counts the jobs this replica enqueued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis.exceptions import RedisError, ResponseError

from diffusion_runtime.api.auth import key_name
from diffusion_runtime.api.errors import Rejected, error_detail
from diffusion_runtime.api.protocol import (
    EditRequestFields,
    ErrorDetail,
    ImageRequestFields,
    ImageResultEvent,
    ImagesResponse,
    JobProgress,
    JobStatus,
    Protocol,
    prefers_async,
)
from diffusion_runtime.api.serving import (
    DELETE_WAIT_SECONDS,
    JOBS_PATH,
    EditInput,
    Endpoint,
    ImageServing,
    _json,
    listen_for_disconnect,
)
from diffusion_runtime.api.state import Phase, RuntimeState
from diffusion_runtime.api.videos.serving import ENDPOINT as VIDEOS_ENDPOINT
from diffusion_runtime.contract.config import (
    QUEUE_GROUP,
    QUEUE_URL_ENV,
    ConfigError,
    QueueConfig,
    RuntimeConfig,
)
from diffusion_runtime.contract.queue import (
    QUEUE_DEMAND_METRIC,
    QUEUE_EXHAUSTED_METRIC,
    QUEUE_JOB_WAIT_METRIC,
    QUEUE_REDELIVERIES_METRIC,
    QUEUE_RUNNING_METRIC,
    QUEUE_SERVER_CLIENTS_METRIC,
    QUEUE_SERVER_MAXMEMORY_METRIC,
    QUEUE_SERVER_MEMORY_METRIC,
    QUEUE_SERVER_PERSISTENCE_METRIC,
    QUEUE_UP_METRIC,
    QUEUE_WAITING_METRIC,
)
from diffusion_runtime.engine.errors import Unavailable
from diffusion_runtime.engine.imaging import MEDIA_TYPES
from diffusion_runtime.engine.params import EditParams, GenerationParams
from diffusion_runtime.metrics import LATENCY_BUCKETS, RuntimeMetrics
from diffusion_runtime.queue.spec import job_spec
from diffusion_runtime.queue.store import (
    DEPTH,
    FINAL,
    QueueStore,
    done_message,
    new_job_id,
    parse_done,
    sync_client,
)
from diffusion_runtime.queue.videos import QueueVideoServing
from diffusion_runtime.queue.views import job_view, video_view

log = logging.getLogger("diffusion_runtime")
QUEUE_RETRY_AFTER = 2  # seconds: Retry-After while the queue server is unreachable
FULL_RETRY_AFTER = 5  # seconds: Retry-After of a 429 (queue.max_waiting jobs wait)
HEALTH_SECONDS = 1.0  # how often the front door pings the queue server (/ready)


@dataclass
class FrontDoorState(RuntimeState):
    """A front door is ready while it reaches the queue server (it has no model to load)."""

    queue_up: bool = False

    @property
    def ready(self) -> bool:
        return self.phase == Phase.READY and not self.draining and self.queue_up

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        return "ready" if self.queue_up else "queue server unreachable"


class QueueCollector:
    """The queue's gauges and counters, read from Redis at each scrape (prometheus_client's thread)."""

    def __init__(self, url: str, cfg: QueueConfig):
        self.cfg = cfg
        self.client = sync_client(url)
        self.depth = self.client.register_script(DEPTH)

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(QUEUE_UP_METRIC, "1 when this scrape reached the queue server.")
        try:
            length, pending = self.depth(keys=[self.cfg.stream], args=[QUEUE_GROUP])
            stats = self.client.hgetall(self.cfg.prefix + "stats")
        except (RedisError, OSError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        running = int(pending)
        waiting = max(0, int(length) - running)
        for name, doc, value in (
            (QUEUE_WAITING_METRIC, "Jobs in the queue not yet started.", waiting),
            (QUEUE_RUNNING_METRIC, "Jobs started by a runtime pod and not finished.", running),
            (QUEUE_DEMAND_METRIC, "Waiting + running jobs: the autoscaling signal (correct at zero pods).",
             waiting + running),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        yield from self._server_info()
        for name, doc, key in (
            (QUEUE_REDELIVERIES_METRIC, "Jobs started again after their pod stopped renewing them.", b"redeliveries"),
            (QUEUE_EXHAUSTED_METRIC, "Jobs failed after queue.max_attempts starts.", b"exhausted"),
        ):  # fmt: skip
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(stats.get(key, 0)))
            yield c

    def _server_info(self) -> Iterator[Any]:
        """The queue server's own health from INFO (left out where a managed server's ACL refuses INFO:
        the queue's figures above do not depend on it)."""
        try:
            info = self.client.info()
        except (RedisError, OSError):
            return
        persistence_ok = (
            info.get("aof_last_write_status", "ok") == "ok"
            and info.get("rdb_last_bgsave_status", "ok") == "ok"
        )
        for name, doc, value in (
            (QUEUE_SERVER_MEMORY_METRIC, "The queue server's used memory (INFO used_memory).",
             info.get("used_memory", 0)),
            (QUEUE_SERVER_MAXMEMORY_METRIC, "The queue server's memory limit (INFO maxmemory; 0 = none).",
             info.get("maxmemory", 0)),
            (QUEUE_SERVER_CLIENTS_METRIC, "Clients connected to the queue server (INFO connected_clients).",
             info.get("connected_clients", 0)),
            (QUEUE_SERVER_PERSISTENCE_METRIC, "1 when the queue server's last AOF write and RDB save succeeded.",
             1 if persistence_ok else 0),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


class QueueServing(ImageServing):
    """The image routes' backend in the front door: the shared queue instead of a local scheduler."""

    videos_class = QueueVideoServing  # /v1/videos: clips are queue jobs too (queue.videos)

    def __init__(self, state: RuntimeState, protocol: Protocol):
        super().__init__(state, protocol)
        q = state.config.queue
        url = os.environ.get(QUEUE_URL_ENV, "")
        assert q is not None and url, "front door without a queue"
        self.cfg = q
        self.store = QueueStore(q, url, state.config.server.job_ttl_seconds)
        self.waiters: dict[str, list[asyncio.Future]] = collections.defaultdict(list)
        self.mine: collections.OrderedDict[str, str] = collections.OrderedDict()  # job -> endpoint
        self.job_wait = Histogram(
            QUEUE_JOB_WAIT_METRIC, "Time a job this front door enqueued waited for a runtime pod to start it.",
            buckets=LATENCY_BUCKETS, registry=state.metrics.registry,
        )  # fmt: skip
        state.metrics.registry.register(QueueCollector(url, q))
        self._tasks: list[asyncio.Task] = []
        self._hooks: set[asyncio.Task] = set()
        # this process's channel: the workers publish a sync job's result here, with its notice
        self.reply_channel = self.store.reply_prefix + uuid.uuid4().hex

    @property
    def fd_state(self) -> FrontDoorState:
        return cast(FrontDoorState, self.state)

    # ------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        self._tasks = [asyncio.create_task(self._health()), asyncio.create_task(self._listen())]

    async def shutdown(self) -> None:
        for t in [*self._tasks, *self._hooks]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._hooks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.store.close()

    @property
    def idle(self) -> bool:
        return not any(self.waiters.values())

    def _set_up(self, up: bool, why: str = "") -> None:
        st = self.fd_state
        if st.queue_up != up:
            log.warning("queue server %s%s", "reachable" if up else "unreachable", f": {why}" if why else "")
        st.queue_up = up
        st.error = None if up else f"queue server unreachable{': ' + why if why else ''}"
        st.metrics.ready.set(1 if st.ready else 0)

    async def _health(self) -> None:
        while True:
            try:
                await self.store.ping()
                await self.store.ensure_group()
                self._set_up(True)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                self._set_up(False, f"{type(e).__name__}: {e}")
            await asyncio.sleep(HEALTH_SECONDS)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """A Redis failure inside is the answer 503 + Retry-After (and /ready 503 until it is back)."""
        try:
            yield
        except ResponseError as e:
            raise Rejected(
                503, f"queue server refused the operation ({e})", retry_after=QUEUE_RETRY_AFTER
            ) from e
        except (RedisError, OSError) as e:
            self._set_up(False, f"{type(e).__name__}: {e}")
            raise Rejected(
                503,
                f"queue server unreachable ({type(e).__name__}); retry shortly",
                retry_after=QUEUE_RETRY_AFTER,
            ) from e

    def admit(self) -> None:
        self.state.accepting()
        if not self.fd_state.queue_up:
            raise Unavailable(
                f"queue server unreachable ({self.fd_state.error or 'not connected yet'})",
                retry_after=QUEUE_RETRY_AFTER,
            )

    # ------------------------------------------------------------ completions (one subscription)

    async def _listen(self) -> None:
        while True:
            ps = self.store.r.pubsub()
            try:
                await ps.subscribe(self.store.done_channel, self.reply_channel)
                await self._resync()
                while True:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        try:
                            notice, payload = parse_done(msg["data"])
                        except ValueError:
                            log.warning("queue: ignored a malformed notice on %s", msg.get("channel"))
                            continue
                        self._on_done(notice, payload)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                self._set_up(False, f"{type(e).__name__}: {e}")
                await asyncio.sleep(HEALTH_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await ps.aclose()

    async def _resync(self) -> None:
        """After (re)subscribing: jobs that finished while this process was not listening."""
        for job_id in [j for j, fs in self.waiters.items() if fs]:
            h = await self.store.job(job_id)
            if h is None or h["status"] in FINAL:
                status = h["status"] if h else "gone"
                self._on_done({"id": job_id, "status": status, "wait": None, "webhook": False, "sync": True})

    def _on_done(self, msg: dict[str, Any], payload: bytes | None = None) -> None:
        job_id = str(msg.get("id"))
        for fut in self.waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result((msg, payload))
        endpoint = self.mine.pop(job_id, None)
        if endpoint is not None:
            if msg.get("wait") is not None:
                self.job_wait.observe(float(msg["wait"]))
            if not msg.get("sync"):
                self.state.metrics.jobs.labels(endpoint=endpoint, status=msg.get("status", "failed")).inc()
        if msg.get("webhook") and not msg.get("sync"):
            self._background(self._job_webhook(job_id))

    async def _job_webhook(self, job_id: str) -> None:
        """One front door delivers an async job's webhook (SET NX), its JobStatus as the body."""
        try:
            if not await self.store.claim_webhook(job_id):
                return
            h = await self.store.job(job_id)
            if h is None or not h.get("webhook"):
                return
            if h["endpoint"] == VIDEOS_ENDPOINT:
                body = _json(video_view(job_id, h, None, self.store.ttl))
            else:
                body = _json(job_view(job_id, h, None))
        except (RedisError, OSError) as e:
            log.warning("webhook of job %s not sent: %s", job_id, e)
            return
        await self.webhooks.deliver(h["webhook"], body, self._webhook_outcome)

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    @contextlib.contextmanager
    def waiting_for(self, job_id: str) -> Iterator[asyncio.Future]:
        """A future set when the job's notice arrives (while inside)."""
        fut = self._waiter(job_id)
        try:
            yield fut
        finally:
            self._drop_waiter(job_id, fut)

    def remember(self, job_id: str, endpoint: str) -> None:
        """A job this replica enqueued (its wait time and outcome are counted here)."""
        self.mine[job_id] = endpoint
        while len(self.mine) > self.cfg.max_waiting:
            self.mine.popitem(last=False)

    def queue_full(self, waiting: int) -> Rejected:
        cap = self.state.config.server.max_retry_after_seconds
        return Rejected(
            429, f"queue full ({waiting} jobs waiting; queue.max_waiting {self.cfg.max_waiting})",
            retry_after=FULL_RETRY_AFTER if cap is None else min(cap, FULL_RETRY_AFTER),
        )  # fmt: skip

    def _waiter(self, job_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[job_id].append(fut)
        return fut

    def _drop_waiter(self, job_id: str, fut: asyncio.Future) -> None:
        fs = self.waiters.get(job_id)
        if fs is not None:
            with contextlib.suppress(ValueError):
                fs.remove(fut)
            if not fs:
                self.waiters.pop(job_id, None)

    # ------------------------------------------------------------ submitting

    async def run_generation(
        self, req: ImageRequestFields, params: GenerationParams, request: Request, prefer: str
    ) -> ImagesResponse | Response:
        return await self._submit("generations", params, req, request, prefer)

    async def run_edit(
        self, req: ImageRequestFields, base: GenerationParams, edit: EditInput, request: Request, prefer: str
    ) -> ImagesResponse | Response:
        params = EditParams.of(base, edit.image, edit.mask, cast(EditRequestFields, req).strength)
        return await self._submit("edits", params, req, request, prefer, edit)

    async def _submit(
        self, endpoint: Endpoint, params: GenerationParams, req: ImageRequestFields, request: Request,
        prefer: str, edit: EditInput | None = None,
    ) -> ImagesResponse | Response:  # fmt: skip
        t0 = request.scope.get("t0", time.perf_counter())
        self.admit()
        if req.webhook:
            await self.check_webhook(req.webhook)
        sync = not prefers_async(prefer)
        job_id = new_job_id()
        owner = key_name(request)
        spec = job_spec(endpoint, params, req, str(request.base_url), self.reply_channel if sync else None)
        spec["owner"] = owner  # url results belong to it too
        fut = self._waiter(job_id) if sync else None
        try:
            with self.guard():
                added, waiting = await self.store.enqueue(
                    job_id, spec, endpoint=endpoint, total_steps=params.run_steps, owner=owner,
                    webhook=req.webhook, sync=sync, image=edit.image_bytes if edit else None,
                    mask=edit.mask_bytes if edit else None,
                )  # fmt: skip
        except BaseException:
            if fut is not None:
                self._drop_waiter(job_id, fut)
            raise
        if not added:
            if fut is not None:
                self._drop_waiter(job_id, fut)
            raise self.queue_full(waiting)
        self.remember(job_id, endpoint)
        if fut is None:
            view = JobStatus(
                id=job_id, endpoint=endpoint, status="queued", created_at=time.time(), queue_position=waiting,
                progress=JobProgress(step=0, total_steps=params.run_steps, cancel_requested_at_step=None),
                result=None,
                error=None,
            )  # fmt: skip
            self.finish(endpoint, 202, t0, owner)
            return JSONResponse(
                _json(view), status_code=202,
                headers={"Location": f"{JOBS_PATH}/{job_id}", "Preference-Applied": "respond-async"},
            )  # fmt: skip
        try:
            body = await self._wait_sync(job_id, fut, request)
        finally:
            self._drop_waiter(job_id, fut)
        self.finish(endpoint, 200, t0, owner)
        if req.webhook:
            event = ImageResultEvent(
                endpoint=endpoint, result=ImagesResponse.model_validate_json(bytes(body.body))
            )
            task = asyncio.create_task(
                self.webhooks.deliver(req.webhook, _json(event), self._webhook_outcome)
            )
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return body

    async def _wait_sync(self, job_id: str, fut: asyncio.Future, request: Request) -> Response:
        timeout = self.state.config.server.request_timeout_seconds
        watcher = asyncio.create_task(listen_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({fut, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if fut not in done:
            why = "client disconnected" if watcher in done else f"timed out after {timeout:g}s"
            with contextlib.suppress(Rejected), self.guard():
                notice = done_message(job_id, "cancelled", None, False, True)
                await self.store.cancel(
                    job_id, notice, error_detail(400, f"cancelled: {why}").model_dump_json()
                )
            if watcher in done:
                raise Rejected(499, "client disconnected")
            raise Rejected(504, f"request timed out after {timeout:g}s (request_timeout_seconds)")
        msg, payload = fut.result()
        h: dict[str, Any] | None
        if payload is not None:  # the notice carried the outcome (the record expires: SYNC_RECORD_TTL)
            if msg["status"] == "succeeded":
                return Response(content=payload, media_type="application/json")
            h = {"status": msg["status"], "error": payload.decode(), "error_status": msg.get("error_status")}
        else:
            with self.guard():
                h = await self.store.take(job_id)  # a sync job has no id to poll: its record goes now
            if h is None:
                raise Rejected(500, f"job {job_id} vanished from the queue server before its result was read")
            if h["status"] == "succeeded" and h.get("result"):
                # the worker's JSON as stored (the same ImagesResponse model): no parse and re-encode here
                return Response(content=h["result"], media_type="application/json")
        err = ErrorDetail.model_validate_json(h["error"]) if h.get("error") else None
        status = int(h.get("error_status") or 500)
        raise Rejected(
            status if status >= 400 else 500,
            err.message if err else f"job {h['status']}",
            param=err.param if err else None,
        )

    # ------------------------------------------------------------ jobs and results from any replica

    def _unknown(self, job_id: str) -> str:
        return (
            f"job {job_id!r} is not known: never submitted, or finished more than "
            f"{self.state.config.server.job_ttl_seconds:g}s ago (server.job_ttl_seconds)"
        )

    async def _job(self, job_id: str, owner: str | None) -> dict[str, Any]:
        with self.guard():
            h = await self.store.job(job_id)
        if (
            h is None or (h.get("owner") or None) != owner or h.get("sync") == "1"
            or h["endpoint"] == VIDEOS_ENDPOINT
        ):  # fmt: skip
            raise Rejected(404, self._unknown(job_id), param="job_id")
        return h

    async def get_job(self, job_id: str, owner: str | None) -> JobStatus:
        h = await self._job(job_id, owner)
        position = None
        if h["status"] == "queued":
            with self.guard():
                position = await self.store.position(job_id) or None
        return job_view(job_id, h, position)

    async def cancel_job(self, job_id: str, owner: str | None) -> JobStatus:
        h = await self._job(job_id, owner)
        await self.stop(job_id, h, "cancelled by DELETE before it started", bool(h.get("webhook")))
        return await self.get_job(job_id, owner)

    async def stop(self, job_id: str, h: dict[str, Any], why: str, webhook: bool) -> None:
        """Cancel an unfinished job: a queued one ends now (error `why`), a running one stops at its
        next step (waited for up to DELETE_WAIT_SECONDS)."""
        if h["status"] in FINAL:
            return
        with self.waiting_for(job_id) as fut:
            err = error_detail(400, why).model_dump_json()
            with self.guard():
                notice = done_message(job_id, "cancelled", None, webhook, False)
                out = await self.store.cancel(job_id, notice, err)
            if out == "running":
                await asyncio.wait({fut}, timeout=DELETE_WAIT_SECONDS)

    async def get_result(self, result_id: str, owner: str | None) -> tuple[bytes, str]:
        fmt = result_id.rsplit(".", 1)[-1]
        item = None
        if fmt in MEDIA_TYPES:
            with self.guard():
                item = await self.store.result(result_id)
        if item is None or item[1] != owner:
            raise Rejected(
                404,
                f"result {result_id!r} is not known: results are kept "
                f"{self.state.config.server.job_ttl_seconds:g}s (server.job_ttl_seconds)",
                param="result_id",
            )
        return item[0], fmt


def run_front_door(config: RuntimeConfig) -> int:
    """Serve the front door until SIGTERM (then: /ready 503, held sync requests finish, exit 0)."""
    from diffusion_runtime.contract.config import validate
    from diffusion_runtime.serve import exit_line, open_listeners

    try:
        validate(config)
    except ConfigError as e:
        return exit_line(str(e), 2)
    if config.queue is None:
        return exit_line("front-door: the config has no queue: section (queue.name)", 2)
    if not os.environ.get(QUEUE_URL_ENV):
        return exit_line(
            f"front-door: {QUEUE_URL_ENV} is empty; set it to redis://[:password@]host:port/db", 2
        )
    metrics = RuntimeMetrics()
    metrics.set_info(model=config.model.uri, role="front-door", queue=config.queue.stream)
    state = FrontDoorState(config=config, metrics=metrics, phase=Phase.READY)
    try:
        server, metrics_server = open_listeners(state, QueueServing, title="diffusion-front-door")
    except ConfigError as e:
        return exit_line(str(e), 2)
    s = config.server
    log.info("front door for queue %s on %s:%d", config.queue.stream, s.host, s.port)
    try:
        server.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
    if not server.started:
        return exit_line(f"cannot listen on {s.host}:{s.port}", 2)
    return 0
