"""The shared work queue in Redis: one stream of job ids, one hash per job, results as keys.

Key layout (prefix `P` = `QueueConfig.prefix`, `dq:{name}:`; docs/queue.md):

- `P work` (stream, `QueueConfig.stream`): one entry `{j: JOB_ID, s: SPEC}` per job not yet finished; consumer
  group `workers` (`QUEUE_GROUP`). An entry is acknowledged AND deleted when its job finishes or is
  cancelled, so the stream's length is waiting + running (the autoscaling signal) and its pending
  entries are the started ones.
- `P job:ID` (hash): the request (`spec`, JSON), the edit uploads (`image`, `mask`: bytes), `status`,
  step progress, `attempts`, `owner`, timestamps, `result`/`error` (JSON), `entry` (its stream entry).
  No TTL while unfinished; `server.job_ttl_seconds` once finished (uploads dropped then; a sync
  job's: `SYNC_RECORD_TTL`, its answer rides the notice).
- `P result:RID` (hash: `d` the image, `o` its owner's key name): one `response_format: url` image,
  TTL `server.job_ttl_seconds`.
- `P clip:VID` (hash: `m` the MP4, `t` its thumbnail): a finished video job's content (docs/video.md),
  TTL `server.job_ttl_seconds`; `P clips` (sorted set: video id -> finished at) and `P clipbytes`
  (hash: video id -> bytes) bound them by `server.video_store_max_bytes`, oldest out first (the
  evicted job's hash says why: `evicted`).
- `P videos:OWNER` (sorted set: video id -> created at): one key name's clips, for GET /v1/videos.
- `P stats` (hash): `redeliveries`, `exhausted` counters.
- `P hook:ID` (string): which front door delivers an async job's webhook (SET NX).
- channels `P done` (a job finished: JSON `{id, status, wait, webhook, sync}`), `P reply:FRONT_DOOR` (a
  sync job finished: the same line, then its result or error, to the front-door process holding
  the request) and `P cancel` (a job id whose running pipeline should stop).

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
SYNC_RECORD_TTL = 60  # seconds a finished sync job's record is kept (its answer normally rides the notice)
JOB_FIELDS = (
    "endpoint", "status", "step", "total_steps", "attempts", "owner", "created_at", "started_at",
    "finished_at", "result", "error", "cancel_requested", "cancel_step", "webhook", "sync", "worker",
    "spec", "evicted", "error_status",
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
local entry = redis.call('XADD', KEYS[2], '*', 'j', ARGV[2], 's', redis.call('HGET', KEYS[1], 'spec'))
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

# KEYS job, stream; ARGV group, entry, status, result, error, error_status, now, ttl, channel, message,
# sync_ttl (a sync job's record: only its front door reads it, once, if the notice was missed)
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
local ttl = tonumber(ARGV[8])
if redis.call('HGET', KEYS[1], 'sync') == '1' then ttl = math.min(ttl, tonumber(ARGV[11])) end
redis.call('EXPIRE', KEYS[1], ttl)
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
  if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
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
local entry = redis.call('XADD', KEYS[2], '*', 'j', ARGV[4], 's', redis.call('HGET', KEYS[1], 'spec'))
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

# KEYS clip, clips, clipbytes, job; ARGV video_id, mp4, thumbnail, ttl, now, max_bytes, clip prefix,
# job prefix, consumer, reason -> evicted video ids, or -1 (the job is no longer this worker's: nothing
# stored). All keys share the deployment's {hash tag}.
STORE_CLIP = """
if redis.call('HGET', KEYS[4], 'status') ~= 'running' or redis.call('HGET', KEYS[4], 'worker') ~= ARGV[9] then
  return -1
end
redis.call('HSET', KEYS[1], 'm', ARGV[2], 't', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], string.len(ARGV[2]) + string.len(ARGV[3]))
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[5]) - tonumber(ARGV[4])))) do
  redis.call('ZREM', KEYS[2], old)
  redis.call('HDEL', KEYS[3], old)
end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(v) end
local evicted = {}
while total > tonumber(ARGV[6]) and redis.call('ZCARD', KEYS[2]) > 1 do
  local old = redis.call('ZPOPMIN', KEYS[2])[1]
  total = total - tonumber(redis.call('HGET', KEYS[3], old) or '0')
  redis.call('HDEL', KEYS[3], old)
  redis.call('DEL', ARGV[7] .. old)
  if redis.call('EXISTS', ARGV[8] .. old) == 1 then redis.call('HSET', ARGV[8] .. old, 'evicted', ARGV[10]) end
  evicted[#evicted + 1] = old
end
return evicted
"""

# KEYS job, clip, clips, clipbytes, owner index; ARGV video_id: a video job and its content, gone
DROP_VIDEO = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
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


def _job_fields(values: Any) -> dict[str, Any] | None:
    """A job hash as HMGET of JOB_FIELDS returned it; None when the job is gone."""
    if values[0] is None:
        return None
    return dict(zip(JOB_FIELDS, [_s(v) for v in values], strict=True))


def new_job_id() -> str:
    return "imgjob_" + uuid.uuid4().hex


def new_video_id() -> str:
    return "video_" + uuid.uuid4().hex


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
        self.reply_prefix = p + "reply:"
        self._clip_prefix = p + "clip:"
        self.clips = p + "clips"
        self.clip_bytes = p + "clipbytes"
        self._owner_prefix = p + "videos:"
        self._enqueue = self.r.register_script(ENQUEUE)
        self._start = self.r.register_script(START)
        self._heartbeat = self.r.register_script(HEARTBEAT)
        self._finalize = self.r.register_script(FINALIZE)
        self._cancel = self.r.register_script(CANCEL)
        self._release = self.r.register_script(RELEASE)
        self._position = self.r.register_script(POSITION)
        self._depth = self.r.register_script(DEPTH)
        self._store_clip = self.r.register_script(STORE_CLIP)
        self._drop_video = self.r.register_script(DROP_VIDEO)

    def job_key(self, job_id: str) -> str:
        return self._job_prefix + job_id

    def result_key(self, rid: str) -> str:
        return self._result_prefix + rid

    def clip_key(self, video_id: str) -> str:
        return self._clip_prefix + video_id

    def owner_key(self, owner: str | None) -> str:
        return self._owner_prefix + (owner or "")

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
        return _job_fields(await self.r.hmget(self.job_key(job_id), list(JOB_FIELDS)))

    async def position(self, job_id: str) -> int:
        return int(await self._position(keys=[self.stream, self.job_key(job_id)], args=[QUEUE_GROUP]))

    async def positions(self, job_ids: list[str]) -> list[int]:
        """`position` of each job, in one round trip."""
        if not job_ids:
            return []
        async with self.r.pipeline(transaction=False) as p:
            for job_id in job_ids:
                await self._position(keys=[self.stream, self.job_key(job_id)], args=[QUEUE_GROUP], client=p)
            return [int(v) for v in await p.execute()]

    async def cancel(self, job_id: str, message: str, error: str) -> str:
        out = await self._cancel(
            keys=[self.job_key(job_id), self.stream],
            args=[QUEUE_GROUP, repr(time.time()), self.ttl, self.done_channel, message, self.cancel_channel,
                  job_id, error],
        )  # fmt: skip
        return str(_s(out))

    async def take(self, job_id: str) -> dict[str, Any] | None:
        """Read a finished sync job and delete its record (nobody can poll it): one round trip."""
        async with self.r.pipeline(transaction=True) as p:
            p.hmget(self.job_key(job_id), ["status", "result", "error", "error_status"])
            p.delete(self.job_key(job_id))
            values, _ = await p.execute()
        if values[0] is None:
            return None
        return dict(zip(["status", "result", "error", "error_status"], [_s(v) for v in values], strict=True))

    async def result(self, rid: str) -> tuple[bytes, str | None] | None:
        """A url result and its owner (the key name that created it; None: auth off)."""
        values: Any = await self.r.hmget(self.result_key(rid), ["d", "o"])
        data, owner = values
        return (bytes(data), _s(owner) or None) if data is not None else None

    async def depth(self) -> tuple[int, int]:
        """(waiting, running)."""
        length, pending = await self._depth(keys=[self.stream], args=[QUEUE_GROUP])
        return max(0, int(length) - int(pending)), int(pending)

    # ------------------------------------------------------------ videos (front door)

    async def index_video(
        self, owner: str | None, video_id: str, created_at: float, keep_seconds: float
    ) -> None:
        """List the clip under its owner; entries older than `keep_seconds` (run time + TTL) go."""
        key = self.owner_key(owner)
        async with self.r.pipeline(transaction=True) as p:
            p.zadd(key, {video_id: created_at})
            p.zremrangebyscore(key, "-inf", f"({created_at - keep_seconds}")
            p.expire(key, max(1, int(keep_seconds)))
            await p.execute()

    async def owned_videos(self, owner: str | None) -> list[tuple[str, dict[str, Any]]]:
        """The owner's video jobs, oldest first (ids whose job hash is gone are dropped from the index)."""
        key = self.owner_key(owner)
        ids = [_s(v) or "" for v in await self.r.zrange(key, 0, -1)]
        async with self.r.pipeline(transaction=False) as p:  # one round trip for the whole list
            for vid in ids:
                p.hmget(self.job_key(vid), list(JOB_FIELDS))
            rows = await p.execute() if ids else []
        out: list[tuple[str, dict[str, Any]]] = []
        gone: list[str] = []
        for vid, values in zip(ids, rows, strict=True):
            h = _job_fields(values)
            (out.append((vid, h)) if h is not None else gone.append(vid))
        if gone:
            await self.r.zrem(key, *gone)
        return out

    async def clip(self, video_id: str, field: str) -> bytes | None:
        """`m` the MP4 or `t` the thumbnail of a finished clip; None once expired or evicted."""
        data: Any = await self.r.hget(self.clip_key(video_id), field)
        return bytes(data) if data is not None else None

    async def drop_video(self, video_id: str, owner: str | None) -> None:
        await self._drop_video(
            keys=[self.job_key(video_id), self.clip_key(video_id), self.clips, self.clip_bytes,
                  self.owner_key(owner)],
            args=[video_id],
        )  # fmt: skip

    async def claim_webhook(self, job_id: str) -> bool:
        return bool(await self.r.set(self._hook_prefix + job_id, "1", nx=True, ex=self.ttl))

    # ------------------------------------------------------------ workers

    async def read(
        self, consumer: str, block_ms: int = READ_BLOCK_MS
    ) -> tuple[str, str, dict[str, Any] | None] | None:
        """The next undelivered entry for this consumer: (entry id, job id, its request spec), or None
        after block_ms."""
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
                spec = fields.get(b"s")
                return _s(entry_id) or "", _s(fields.get(b"j")) or "", json.loads(spec) if spec else None
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

    async def put_results(self, images: list[tuple[str, bytes]], owner: str | None) -> None:
        async with self.r.pipeline(transaction=False) as p:
            for rid, data in images:
                p.hset(self.result_key(rid), mapping={"d": data, "o": owner or ""})
                p.expire(self.result_key(rid), self.ttl)
            await p.execute()

    async def store_clip(
        self, video_id: str, mp4: bytes, thumbnail: bytes, consumer: str, max_bytes: int, reason: str
    ) -> list[str] | None:
        """Keep a clip's content while its job is still this worker's (None: it is not: nothing kept);
        the evicted clips' ids (the bound `max_bytes`, oldest out first)."""
        out = await self._store_clip(
            keys=[self.clip_key(video_id), self.clips, self.clip_bytes, self.job_key(video_id)],
            args=[video_id, mp4, thumbnail, self.ttl, repr(time.time()), max_bytes, self._clip_prefix,
                  self._job_prefix, consumer, reason],
        )  # fmt: skip
        if out == -1:
            return None
        return [_s(v) or "" for v in out]

    async def finalize(
        self, entry: str, job_id: str, status: str, *, result: str = "", error: str = "", error_status: int = 0,
        message: str, channel: str | None = None,
    ) -> bool:  # fmt: skip
        """Finish the job unless it is final already (then False: a duplicate); publish `message` on
        `channel` (default `P done`)."""
        out = await self._finalize(
            keys=[self.job_key(job_id), self.stream],
            args=[QUEUE_GROUP, entry, status, result, error, error_status, repr(time.time()), self.ttl,
                  channel or self.done_channel, message, SYNC_RECORD_TTL],
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


def done_message(
    job_id: str,
    status: str,
    wait: float | None,
    webhook: bool,
    sync: bool,
    error_status: int = 0,
    payload: str = "",
) -> str:
    """A finished job's notice: one JSON line, then (sync jobs, on their front door's reply channel)
    the result or error JSON as stored, so the held request answers without reading it back."""
    head = json.dumps(
        {
            "id": job_id,
            "status": status,
            "wait": wait,
            "webhook": webhook,
            "sync": sync,
            "error_status": error_status,
        }
    )
    return head + "\n" + payload if payload else head


def parse_done(data: bytes | str) -> tuple[dict[str, Any], bytes | None]:
    raw = data.encode() if isinstance(data, str) else data
    head, sep, payload = raw.partition(b"\n")
    return json.loads(head), payload if sep else None
