"""The shared work queue in Redis: one stream of job ids, one hash per job, results as keys.

Key layout (prefix `P` = `QueueConfig.prefix`, `dq:{name}:`; docs/queue.md):

- `P work` (stream, `QueueConfig.stream`): one entry `{j: JOB_ID}` per job not yet finished; consumer
  group `workers` (`QUEUE_GROUP`). An entry is acknowledged AND deleted when its job finishes or is
  cancelled, so the stream's length is waiting + running (the autoscaling signal) and its pending
  entries are the started ones.
- `P job:ID` (hash): the request (`spec`, JSON), the edit uploads (`image`, `mask`: bytes), `status`,
  step progress, `attempts`, `owner`, timestamps, `result`/`error` (JSON), `entry` (its stream entry).
  No TTL while unfinished; `server.job_ttl_seconds` once finished (uploads dropped then).
- `P result:RID` (string): one `response_format: url` image, TTL `server.job_ttl_seconds`.
- `P stats` (hash): `redeliveries`, `exhausted` counters.
- `P hook:ID` (string): which front door delivers an async job's webhook (SET NX).
- channels `P done` (a job finished: JSON `{id, status, wait, webhook, sync}`) and `P cancel` (a job id
  whose running pipeline should stop).

Every transition is one Lua script, so a job is started only while queued and finished at most once.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from diffusion_runtime.contract.config import QUEUE_GROUP, QueueConfig

CONNECT_TIMEOUT = 2.0  # seconds: an unreachable server answers 503 within about this
SOCKET_TIMEOUT = 5.0  # seconds: above READ_BLOCK_MS
READ_BLOCK_MS = 1000  # a worker's blocking read; SIGTERM stops pulling within this
FINAL = ("succeeded", "failed", "cancelled")
JOB_FIELDS = (
    "endpoint", "status", "step", "total_steps", "attempts", "owner", "created_at", "started_at",
    "finished_at", "result", "error", "cancel_requested", "cancel_step", "webhook", "sync", "worker",
)  # fmt: skip

# ---------------------------------------------------------------- scripts (atomic transitions)

_GROUP = """
local ok = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
"""

# KEYS job, stream; ARGV group, job_id, max_waiting, field, value, ...
ENQUEUE = (
    _GROUP.replace("KEYS[1]", "KEYS[2]")
    + """
local len = redis.call('XLEN', KEYS[2])
local pending = redis.call('XPENDING', KEYS[2], ARGV[1])[1]
local waiting = len - pending
if waiting >= tonumber(ARGV[3]) then return {0, waiting} end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local entry = redis.call('XADD', KEYS[2], '*', 'j', ARGV[2])
redis.call('HSET', KEYS[1], 'entry', entry)
return {1, waiting + 1}
"""
)

# KEYS job, stream, stats; ARGV group, entry, consumer, now, max_attempts, ttl, done_channel, job_id
START = """
local function drop() redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[2], ARGV[2]) end
if redis.call('EXISTS', KEYS[1]) == 0 then drop(); return {'gone'} end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then drop(); return {'final'} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local max = tonumber(ARGV[5])
local prev = redis.call('HGET', KEYS[1], 'worker')
if attempts > 1 then redis.call('HINCRBY', KEYS[3], 'redeliveries', 1) end
if attempts > max then
  local msg = 'job started ' .. (attempts - 1) .. ' times and each time the pod running it stopped before '
    .. 'finishing it (last: ' .. (prev or '?') .. '); queue.max_attempts is ' .. max
  local err = cjson.encode({message = msg, type = 'server_error', param = cjson.null, code = 'attempts_exhausted'})
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'error_status', '500', 'finished_at', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HDEL', KEYS[1], 'image', 'mask')
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('HINCRBY', KEYS[3], 'exhausted', 1)
  drop()
  local sync = redis.call('HGET', KEYS[1], 'sync')
  local hook = redis.call('HGET', KEYS[1], 'webhook')
  redis.call('PUBLISH', ARGV[7], cjson.encode({id = ARGV[8], status = 'failed', wait = cjson.null,
    webhook = (hook ~= false and hook ~= ''), sync = (sync == '1')}))
  return {'exhausted', msg}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'step', '0', 'started_at', ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'spec', 'image', 'mask', 'created_at', 'cancel_requested')
return {'run', v[1], v[2] or '', v[3] or '', v[4], v[5] or '0', attempts}
"""

# KEYS job, stream; ARGV group, entry, consumer, step -> {'ok', cancel_requested} | {'lost', status}
HEARTBEAT = """
local st = redis.call('HGET', KEYS[1], 'status')
local p = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
if st ~= 'running' or #p == 0 or p[1][2] ~= ARGV[3] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] then
  return {'lost', st or 'gone'}
end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
redis.call('HSET', KEYS[1], 'step', ARGV[4])
return {'ok', redis.call('HGET', KEYS[1], 'cancel_requested') or '0'}
"""

# KEYS job, stream; ARGV group, entry, status, result, error, error_status, now, ttl, channel, message
# -> 1 finished now, 0 it was already final (a duplicate: discarded)
FINALIZE = """
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5], 'error_status', ARGV[6],
  'finished_at', ARGV[7])
local total = redis.call('HGET', KEYS[1], 'total_steps')
if ARGV[3] == 'succeeded' then redis.call('HSET', KEYS[1], 'step', total) end
redis.call('HDEL', KEYS[1], 'image', 'mask')
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('PUBLISH', ARGV[9], ARGV[10])
return 1
"""

# KEYS job, stream; ARGV group, now, ttl, done_channel, message, cancel_channel, job_id, error
# -> 'gone' | a final status | 'cancelled' (was queued) | 'running' (the worker is told)
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return st end
if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'cancel_step', redis.call('HGET', KEYS[1], 'step') or '0')
end
if st == 'queued' then
  local entry = redis.call('HGET', KEYS[1], 'entry')
  redis.call('XACK', KEYS[2], ARGV[1], entry)
  redis.call('XDEL', KEYS[2], entry)
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'error', ARGV[8], 'error_status', '400', 'finished_at', ARGV[2])
  redis.call('HDEL', KEYS[1], 'image', 'mask')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 'cancelled'
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 'running'
"""

# KEYS job, stream; ARGV group, entry, consumer, job_id: give back a job this worker took but did not
# run (SIGTERM between read and start, or the scheduler refused it): a fresh entry at the stream's end
RELEASE = """
local st = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if st == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[3] then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HSET', KEYS[1], 'status', 'queued', 'step', '0')
  redis.call('HDEL', KEYS[1], 'started_at', 'worker')
elseif st ~= 'queued' then return 0 end
local entry = redis.call('XADD', KEYS[2], '*', 'j', ARGV[4])
redis.call('HSET', KEYS[1], 'entry', entry)
return 1
"""

# KEYS stream, job; ARGV group -> 1-based place among the entries not yet delivered (0: not waiting)
POSITION = """
local entry = redis.call('HGET', KEYS[2], 'entry')
if not entry then return 0 end
local last = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  for i = 1, #g, 2 do if g[i] == 'name' and g[i + 1] == ARGV[1] then
    for k = 1, #g, 2 do if g[k] == 'last-delivered-id' then last = g[k + 1] end end
  end end
end
return #redis.call('XRANGE', KEYS[1], '(' .. last, entry)
"""

# KEYS stream; ARGV group -> {length, pending}
DEPTH = (
    _GROUP
    + """
return {redis.call('XLEN', KEYS[1]), redis.call('XPENDING', KEYS[1], ARGV[1])[1]}
"""
)


def _s(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _f(v: Any) -> float | None:
    s = _s(v)
    return float(s) if s not in (None, "") else None


def new_job_id() -> str:
    return "imgjob_" + uuid.uuid4().hex


def new_result_id(fmt: str) -> str:
    return f"img_{uuid.uuid4().hex}.{fmt}"


@dataclass
class Started:
    """What START answered: run it (`spec` + uploads), or why not."""

    outcome: str  # run | final | gone | exhausted
    spec: dict[str, Any] | None = None
    image: bytes | None = None
    mask: bytes | None = None
    created_at: float = 0.0
    cancel_requested: bool = False
    attempt: int = 0
    reason: str = ""


def client_options() -> dict[str, Any]:
    """No retries inside the client: an unreachable server is an answer (503) at once, not a hang."""
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 0,
    }


class QueueStore:
    """One deployment's queue in one Redis server (redis.asyncio; every transition a Lua script)."""

    def __init__(self, cfg: QueueConfig, url: str, job_ttl_seconds: float):
        from redis.asyncio.retry import Retry

        self.cfg = cfg
        self.ttl = max(1, int(job_ttl_seconds))
        opts = client_options()
        opts["retry"] = Retry(NoBackoff(), 0)
        self.r = aioredis.Redis.from_url(url, **opts)
        p = cfg.prefix
        self.stream = cfg.stream
        self.stats = p + "stats"
        self.done_channel = p + "done"
        self.cancel_channel = p + "cancel"
        self._job_prefix = p + "job:"
        self._result_prefix = p + "result:"
        self._hook_prefix = p + "hook:"
        self._enqueue = self.r.register_script(ENQUEUE)
        self._start = self.r.register_script(START)
        self._heartbeat = self.r.register_script(HEARTBEAT)
        self._finalize = self.r.register_script(FINALIZE)
        self._cancel = self.r.register_script(CANCEL)
        self._release = self.r.register_script(RELEASE)
        self._position = self.r.register_script(POSITION)
        self._depth = self.r.register_script(DEPTH)

    def job_key(self, job_id: str) -> str:
        return self._job_prefix + job_id

    def result_key(self, rid: str) -> str:
        return self._result_prefix + rid

    async def close(self) -> None:
        await self.r.aclose()

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(self.stream, QUEUE_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ------------------------------------------------------------ front door

    async def enqueue(
        self, job_id: str, spec: dict[str, Any], *, endpoint: str, total_steps: int, owner: str | None,
        webhook: str | None, sync: bool, image: bytes | None = None, mask: bytes | None = None,
    ) -> tuple[bool, int]:  # fmt: skip
        """Add the job unless `max_waiting` jobs wait; (added, jobs waiting incl. this one)."""
        fields: dict[str, Any] = {
            "spec": json.dumps(spec), "endpoint": endpoint, "status": "queued", "step": 0,
            "total_steps": total_steps, "attempts": 0, "owner": owner or "", "created_at": repr(time.time()),
            "cancel_requested": 0, "webhook": webhook or "", "sync": int(sync),
        }  # fmt: skip
        if image is not None:
            fields["image"] = image
        if mask is not None:
            fields["mask"] = mask
        flat: list[Any] = [QUEUE_GROUP, job_id, self.cfg.max_waiting]
        for k, v in fields.items():
            flat += [k, v]
        added, waiting = await self._enqueue(keys=[self.job_key(job_id), self.stream], args=flat)
        return bool(added), int(waiting)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        values = await self.r.hmget(self.job_key(job_id), [*JOB_FIELDS, "error_status"])
        if values[0] is None:
            return None
        return dict(zip([*JOB_FIELDS, "error_status"], [_s(v) for v in values], strict=True))

    async def position(self, job_id: str) -> int:
        return int(await self._position(keys=[self.stream, self.job_key(job_id)], args=[QUEUE_GROUP]))

    async def cancel(self, job_id: str, message: str, error: str) -> str:
        out = await self._cancel(
            keys=[self.job_key(job_id), self.stream],
            args=[QUEUE_GROUP, repr(time.time()), self.ttl, self.done_channel, message, self.cancel_channel,
                  job_id, error],
        )  # fmt: skip
        return str(_s(out))

    async def forget(self, job_id: str) -> None:
        await self.r.delete(self.job_key(job_id))

    async def result(self, rid: str) -> bytes | None:
        data: Any = await self.r.get(self.result_key(rid))
        return bytes(data) if data is not None else None

    async def depth(self) -> tuple[int, int]:
        """(waiting, running)."""
        length, pending = await self._depth(keys=[self.stream], args=[QUEUE_GROUP])
        return max(0, int(length) - int(pending)), int(pending)

    async def claim_webhook(self, job_id: str) -> bool:
        return bool(await self.r.set(self._hook_prefix + job_id, "1", nx=True, ex=self.ttl))

    # ------------------------------------------------------------ workers

    async def read(self, consumer: str, block_ms: int = READ_BLOCK_MS) -> tuple[str, str] | None:
        """The next undelivered entry for this consumer: (entry id, job id), or None after block_ms."""
        try:
            out: Any = await self.r.xreadgroup(
                QUEUE_GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return None
        for _, entries in out or []:
            for entry_id, fields in entries:
                return _s(entry_id) or "", _s(fields.get(b"j")) or ""
        return None

    async def reclaim(self, consumer: str, min_idle_seconds: float) -> tuple[str, str] | None:
        """An entry whose consumer stopped renewing it (a dead pod), now this consumer's."""
        try:
            claimed: Any = await self.r.xautoclaim(
                self.stream, QUEUE_GROUP, consumer, int(min_idle_seconds * 1000), start_id="0-0", count=1
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_group()
            return None
        for entry_id, fields in claimed[1]:
            if fields:
                return _s(entry_id) or "", _s(fields.get(b"j")) or ""
        return None

    async def start(self, entry: str, job_id: str, consumer: str) -> Started:
        out = await self._start(
            keys=[self.job_key(job_id), self.stream, self.stats],
            args=[QUEUE_GROUP, entry, consumer, repr(time.time()), self.cfg.max_attempts, self.ttl,
                  self.done_channel, job_id],
        )  # fmt: skip
        outcome = str(_s(out[0]))
        if outcome == "exhausted":
            return Started(outcome, reason=str(_s(out[1])))
        if outcome != "run":
            return Started(outcome)
        return Started(
            "run", spec=json.loads(_s(out[1]) or "{}"), image=bytes(out[2]) or None, mask=bytes(out[3]) or None,
            created_at=float(_s(out[4]) or 0), cancel_requested=_s(out[5]) == "1", attempt=int(out[6]),
        )  # fmt: skip

    async def heartbeat(self, entry: str, job_id: str, consumer: str, step: int) -> tuple[bool, bool]:
        """Renew the entry (still ours?, cancel requested?)."""
        out = await self._heartbeat(
            keys=[self.job_key(job_id), self.stream], args=[QUEUE_GROUP, entry, consumer, step]
        )
        return _s(out[0]) == "ok", _s(out[1]) == "1"

    async def put_results(self, images: list[tuple[str, bytes]]) -> None:
        async with self.r.pipeline(transaction=False) as p:
            for rid, data in images:
                p.set(self.result_key(rid), data, ex=self.ttl)
            await p.execute()

    async def finalize(
        self, entry: str, job_id: str, status: str, *, result: str = "", error: str = "", error_status: int = 0,
        message: str,
    ) -> bool:  # fmt: skip
        out = await self._finalize(
            keys=[self.job_key(job_id), self.stream],
            args=[QUEUE_GROUP, entry, status, result, error, error_status, repr(time.time()), self.ttl,
                  self.done_channel, message],
        )  # fmt: skip
        return bool(out)

    async def release(self, entry: str, job_id: str, consumer: str) -> bool:
        out = await self._release(
            keys=[self.job_key(job_id), self.stream], args=[QUEUE_GROUP, entry, consumer, job_id]
        )
        return bool(out)

    async def forget_idle_consumers(self, idle_seconds: float) -> int:
        """Drop consumers (gone pods) with nothing pending, idle this long: the group stays small."""
        n = 0
        for c in await self.r.xinfo_consumers(self.stream, QUEUE_GROUP):
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > idle_seconds * 1000:
                name = _s(c.get("name")) or ""
                await self.r.xgroup_delconsumer(self.stream, QUEUE_GROUP, name)
                n += 1
        return n


def sync_client(url: str) -> redis.Redis:
    """A blocking client (metrics scrapes run in prometheus_client's thread)."""
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


def done_message(job_id: str, status: str, wait: float | None, webhook: bool, sync: bool) -> str:
    return json.dumps({"id": job_id, "status": status, "wait": wait, "webhook": webhook, "sync": sync})
