"""The queue store's transitions against a real redis-server: enqueue bounds, start/renew/finish at
most once, cancel, reclaim of a dead consumer's entry, attempts, positions, depth, give-back."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from diffusion_runtime.contract.config import QUEUE_GROUP, QueueConfig
from diffusion_runtime.queue.store import QueueStore, done_message, new_job_id, new_video_id

pytestmark = pytest.mark.runtime


def run(coro):
    return asyncio.run(coro)


def store_for(redis_server, **kw) -> QueueStore:
    return QueueStore(QueueConfig(name="ns/dd", **kw), redis_server.url, job_ttl_seconds=60)


async def _enqueue(s: QueueStore, owner: str | None = None, **kw) -> tuple[str, bool, int]:
    jid = new_job_id()
    added, waiting = await s.enqueue(
        jid, {"endpoint": "generations"}, endpoint="generations", total_steps=4, owner=owner,
        webhook=None, sync=False, **kw,
    )  # fmt: skip
    return jid, added, waiting


def test_enqueue_start_finish_once_and_depth(redis_server):
    async def main():
        s = store_for(redis_server)
        jid, added, waiting = await _enqueue(s, owner="alice", image=b"\x00\xffPNG")
        assert added and waiting == 1
        assert await s.depth() == (1, 0)
        assert await s.position(jid) == 1
        entry, got, spec = await s.read("a")
        assert spec == {"endpoint": "generations"}  # the request rides the entry
        assert got == jid
        st = await s.start(entry, jid, "a")
        assert st.outcome == "run" and st.attempt == 1 and st.image == b"\x00\xffPNG" and st.mask is None
        assert await s.depth() == (0, 1)
        job = await s.job(jid)
        assert job["status"] == "running" and job["worker"] == "a" and job["owner"] == "alice"
        assert await s.heartbeat(entry, jid, "a", 2) == (True, False)
        assert (await s.job(jid))["step"] == "2"
        msg = done_message(jid, "succeeded", 0.1, False, False)
        assert await s.finalize(entry, jid, "succeeded", result='{"x":1}', message=msg) is True
        assert await s.finalize(entry, jid, "failed", error="{}", error_status=500, message=msg) is False
        job = await s.job(jid)
        assert job["status"] == "succeeded" and job["result"] == '{"x":1}' and job["step"] == "4"
        assert await s.depth() == (0, 0)
        r = redis_server.client()
        assert 0 < r.ttl(s.job_key(jid)) <= 60
        assert r.hget(s.job_key(jid), "image") is None  # the upload goes with the job's end
        assert r.xlen(s.stream) == 0
        await s.close()

    run(main())


def test_max_waiting_refuses_and_counts_only_unstarted(redis_server):
    async def main():
        s = store_for(redis_server, max_waiting=2)
        a, ok_a, _ = await _enqueue(s)
        _, ok_b, _ = await _enqueue(s)
        _, ok_c, waiting = await _enqueue(s)
        assert (ok_a, ok_b, ok_c, waiting) == (True, True, False, 2)
        entry, jid, _ = await s.read("w")
        assert jid == a and (await s.start(entry, jid, "w")).outcome == "run"
        _, ok_d, waiting = await _enqueue(s)  # a started job no longer waits
        assert ok_d and waiting == 2
        await s.close()

    run(main())


def test_cancel_queued_leaves_the_stream_and_a_delivered_copy_does_not_start(redis_server):
    async def main():
        s = store_for(redis_server)
        jid, _, _ = await _enqueue(s)
        entry, got, _ = await s.read("w")  # delivered, not started yet
        assert got == jid
        err = json.dumps(
            {"message": "cancelled", "type": "invalid_request_error", "param": None, "code": None}
        )
        assert await s.cancel(jid, done_message(jid, "cancelled", None, False, False), err) == "cancelled"
        assert await s.depth() == (0, 0)
        assert (await s.start(entry, jid, "w")).outcome == "final"
        job = await s.job(jid)
        assert job["status"] == "cancelled" and job["cancel_requested"] == "1"
        assert await s.cancel(jid, "", err) == "cancelled"  # final: unchanged
        assert await s.cancel("imgjob_nope", "", err) == "gone"
        await s.close()

    run(main())


def test_cancel_running_tells_the_worker(redis_server):
    async def main():
        s = store_for(redis_server)
        jid, _, _ = await _enqueue(s)
        entry, _, _ = await s.read("w")
        await s.start(entry, jid, "w")
        ps = s.r.pubsub()
        await ps.subscribe(s.cancel_channel)
        await ps.get_message(timeout=1)  # the subscribe confirmation
        assert await s.cancel(jid, "", "{}") == "running"
        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=2)
        assert msg is not None and msg["data"] == jid.encode()
        assert await s.heartbeat(entry, jid, "w", 1) == (True, True)  # the flag too
        await ps.aclose()
        await s.close()

    run(main())


def test_dead_consumer_entry_is_reclaimed_and_attempts_end_in_failed(redis_server):
    async def main():
        s = store_for(redis_server, max_attempts=2)
        jid, _, _ = await _enqueue(s)
        entry, _, _ = await s.read("dead-1")
        assert (await s.start(entry, jid, "dead-1")).attempt == 1
        assert await s.reclaim("b", 5.0) is None  # not idle long enough
        await asyncio.sleep(0.3)
        got = await s.reclaim("dead-2", 0.2)
        assert got == (entry, jid)
        st = await s.start(entry, jid, "dead-2")
        assert st.outcome == "run" and st.attempt == 2
        assert await s.heartbeat(entry, jid, "dead-1", 3) == (False, False)  # the old owner lost it
        await asyncio.sleep(0.3)
        assert await s.reclaim("c", 0.2) == (entry, jid)
        st = await s.start(entry, jid, "c")
        assert st.outcome == "exhausted" and "queue.max_attempts is 2" in st.reason and "dead-2" in st.reason
        job = await s.job(jid)
        assert job["status"] == "failed" and "max_attempts" in json.loads(job["error"])["message"]
        assert job["attempts"] == "2"
        stats = redis_server.client().hgetall(s.stats)
        assert stats == {b"redeliveries": b"2", b"exhausted": b"1"}
        assert await s.depth() == (0, 0)
        # the first owner finishing late changes nothing: at most one completion
        assert await s.finalize(entry, jid, "succeeded", result="{}", message="") is False
        assert (await s.job(jid))["status"] == "failed"
        await s.close()

    run(main())


def test_positions_and_give_back(redis_server):
    async def main():
        s = store_for(redis_server)
        ids = [(await _enqueue(s))[0] for _ in range(3)]
        assert [await s.position(j) for j in ids] == [1, 2, 3]
        assert await s.positions(ids[::-1]) == [3, 2, 1]  # the same, in one round trip
        entry, jid, _ = await s.read("w")
        assert jid == ids[0]
        assert [await s.position(j) for j in ids[1:]] == [1, 2]
        assert await s.positions(ids) == [0, 1, 2] and await s.positions([]) == []  # 0: not waiting
        assert await s.release(entry, jid, "w") is True  # SIGTERM between read and start
        assert await s.depth() == (3, 0)
        assert await s.position(jid) == 3  # back in line, at the end
        assert (await s.job(jid))["status"] == "queued"
        # started, then refused by the scheduler: given back with its attempt undone
        entry, jid, _ = await s.read("w")
        await s.start(entry, jid, "w")
        assert await s.release(entry, jid, "w") is True
        job = await s.job(jid)
        assert job["status"] == "queued" and job["attempts"] == "0"
        await s.close()

    run(main())


def test_two_deployments_share_a_server_without_seeing_each_other(redis_server):
    async def main():
        a = QueueStore(QueueConfig(name="ns/a"), redis_server.url, 60)
        b = QueueStore(QueueConfig(name="ns/b"), redis_server.url, 60)
        jid, _, _ = await _enqueue(a)
        assert await b.read("w", block_ms=100) is None
        assert await b.job(jid) is None
        assert (await a.read("w"))[1] == jid
        assert redis_server.client().xinfo_groups(a.stream)[0]["name"] == QUEUE_GROUP.encode()
        await a.close()
        await b.close()

    run(main())


def test_unreachable_server_fails_fast(tmp_path):
    from fixtures_queue import _free_port
    from redis.exceptions import ConnectionError

    async def main():
        s = QueueStore(QueueConfig(name="x"), f"redis://127.0.0.1:{_free_port()}/0", 60)
        t0 = time.monotonic()
        with pytest.raises(ConnectionError):
            await s.depth()
        assert time.monotonic() - t0 < 3
        await s.close()

    run(main())


def test_sync_notice_carries_the_outcome_to_its_front_door(redis_server):
    from diffusion_runtime.queue.store import parse_done

    async def main():
        s = store_for(redis_server)
        reply = s.reply_prefix + "fd1"
        ps = s.r.pubsub()
        await ps.subscribe(reply, s.done_channel)
        for _ in range(2):
            await ps.get_message(timeout=1)
        jid, _, _ = await _enqueue(s)
        entry, _, _ = await s.read("w")
        await s.start(entry, jid, "w")
        body = '{"data": [{"b64_json": "AAAA"}]}'
        msg = done_message(jid, "succeeded", 0.5, False, True, payload=body)
        assert await s.finalize(entry, jid, "succeeded", result=body, message=msg, channel=reply)
        got = await ps.get_message(ignore_subscribe_messages=True, timeout=2)
        assert got is not None and got["channel"] == reply.encode()  # only there, not on P done
        notice, payload = parse_done(got["data"])
        assert notice["id"] == jid and notice["status"] == "succeeded" and payload == body.encode()
        assert await ps.get_message(ignore_subscribe_messages=True, timeout=0.3) is None
        assert parse_done(done_message(jid, "failed", None, True, False)) == (
            {"id": jid, "status": "failed", "wait": None, "webhook": True, "sync": False, "error_status": 0},
            None,
        )
        await ps.aclose()
        await s.close()

    run(main())


async def _running_video(s: QueueStore, consumer: str = "w") -> tuple[str, str]:
    vid = new_video_id()
    added, _ = await s.enqueue(
        vid, {"endpoint": "videos"}, endpoint="videos", total_steps=2, owner=None, webhook=None, sync=False
    )
    assert added
    entry, got, _ = await s.read(consumer)
    assert got == vid
    assert (await s.start(entry, vid, consumer)).outcome == "run"
    return vid, entry


def test_clips_are_bounded_by_bytes_oldest_out_and_the_evicted_job_says_why(redis_server):
    async def main():
        s = store_for(redis_server)
        r = redis_server.client()
        kept: list[str] = []
        for i in range(4):  # 4 clips of 400 + 100 bytes under a 1200-byte bound: two fit
            vid, entry = await _running_video(s)
            evicted = await s.store_clip(
                vid, bytes([i]) * 400, b"t" * 100, "w", 1200, "over the bound (setting)"
            )
            assert evicted == ([kept[i - 2]] if i >= 2 else [])  # the oldest kept one goes
            kept.append(vid)
            await s.finalize(
                entry, vid, "succeeded", result="{}", message=done_message(vid, "succeeded", 0, False, False)
            )
            time.sleep(0.002)  # distinct finish times
        assert [await s.clip(v, "m") is not None for v in kept] == [False, False, True, True]
        assert await s.clip(kept[3], "m") == bytes([3]) * 400 and await s.clip(kept[3], "t") == b"t" * 100
        assert (await s.job(kept[0]))["evicted"] == "over the bound (setting)"
        assert (await s.job(kept[3]))["evicted"] is None
        assert sorted(r.hkeys(s.clip_bytes)) == sorted(v.encode() for v in kept[2:])
        assert 0 < r.ttl(s.clip_key(kept[3])) <= 60

    run(main())


def test_the_newest_clip_stays_whatever_its_size(redis_server):
    async def main():
        s = store_for(redis_server)
        a, _ = await _running_video(s)
        assert await s.store_clip(a, b"a" * 100, b"", "w", 1000, "why") == []
        b, _ = await _running_video(s)
        assert await s.store_clip(b, b"b" * 5000, b"", "w", 1000, "why") == [a]
        assert await s.clip(b, "m") == b"b" * 5000

    run(main())


def test_a_clip_is_stored_only_while_its_job_runs_on_that_worker(redis_server):
    async def main():
        s = store_for(redis_server)
        vid, _ = await _running_video(s, "w1")
        assert await s.store_clip(vid, b"m", b"t", "w2", 1000, "why") is None  # another worker's job
        await s.drop_video(vid, None)  # deleted while it ran
        assert await s.store_clip(vid, b"m", b"t", "w1", 1000, "why") is None
        assert await s.clip(vid, "m") is None
        assert redis_server.client().exists(s.clip_key(vid)) == 0

    run(main())


def test_the_owner_index_lists_a_keys_clips_and_forgets_dropped_ones(redis_server):
    async def main():
        s = store_for(redis_server)
        mine, _ = await _running_video(s)
        theirs, _ = await _running_video(s)
        now = time.time()
        await s.index_video("alice", mine, now, 600)
        await s.index_video("bob", theirs, now, 600)
        assert [v for v, _ in await s.owned_videos("alice")] == [mine]
        assert [v for v, _ in await s.owned_videos(None)] == []
        await s.drop_video(mine, "alice")
        assert await s.owned_videos("alice") == []
        assert await s.job(mine) is None
        # an id whose job expired is dropped from the index when listed
        await s.index_video("bob", "video_gone", now, 600)
        assert [v for v, _ in await s.owned_videos("bob")] == [theirs]
        assert redis_server.client().zrange(s.owner_key("bob"), 0, -1) == [theirs.encode()]

    run(main())
