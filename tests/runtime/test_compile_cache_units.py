"""The compile-artifact cache file protocol on real files: key, restore, publish, corruption, races."""

from __future__ import annotations

import json
import logging
import tarfile
import threading
from pathlib import Path

import pytest
from diffusion_runtime.engine.compile_cache import MAGIC, CompileCache, _read, cache_key


def _fill(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _cache(root: Path, local: Path, key: str = "k1") -> CompileCache:
    local.mkdir(parents=True, exist_ok=True)
    return CompileCache(root=root, key=key, facts={"what": "test"}, local=local)


ARTIFACTS = {
    "fxgraph/ab/entry": b"graph" * 100,
    "ab/kernel.so": b"\x7fELF" + bytes(range(256)),
    "x.py": b"ok",
}


def test_key_is_stable_and_sees_every_fact():
    facts = {"model": {"uri": "a", "revision": None}, "dtype": "bfloat16", "warmup": [1, 2]}
    same = {"warmup": [1, 2], "dtype": "bfloat16", "model": {"revision": None, "uri": "a"}}
    assert cache_key(facts) == cache_key(same)
    assert cache_key(facts) != cache_key({**facts, "dtype": "float32"})
    assert cache_key(facts) != cache_key({**facts, "model": {"uri": "a", "revision": "v2"}})


def test_miss_then_publish_then_hit_restores_every_file(tmp_path):
    root = tmp_path / "shared"
    first = _cache(root, tmp_path / "p1")
    assert first.restore() == "miss"
    _fill(first.use_local_folder(), {**ARTIFACTS, "locks/l.lock": b""})
    assert first.publish() is True
    assert first.path.is_file() and not list(root.glob(".*.tmp"))

    second = _cache(root, tmp_path / "p2")
    assert second.restore() == "hit"
    local = second.use_local_folder()
    for rel, data in ARTIFACTS.items():
        assert (local / rel).read_bytes() == data
    assert not (local / "locks").exists()  # process-local lock files are not shipped
    assert second.publish() is False  # a hit writes nothing


def test_other_key_is_a_miss(tmp_path):
    root = tmp_path / "shared"
    first = _cache(root, tmp_path / "p1", key="k1")
    first.restore()
    _fill(first.use_local_folder(), ARTIFACTS)
    first.publish()
    assert _cache(root, tmp_path / "p2", key="k2").restore() == "miss"


def test_first_writer_wins(tmp_path):
    root = tmp_path / "shared"
    writers = [_cache(root, tmp_path / f"p{i}") for i in range(6)]
    for i, w in enumerate(writers):
        assert w.restore() == "miss"
        _fill(w.use_local_folder(), {"who": str(i).encode()})
    barrier = threading.Barrier(len(writers))
    results: list[bool] = []

    def publish(w: CompileCache) -> None:
        barrier.wait()
        results.append(w.publish())

    threads = [threading.Thread(target=publish, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    reader = _cache(root, tmp_path / "reader")
    assert reader.restore() == "hit"
    winner = int((reader.use_local_folder() / "who").read_bytes())
    assert writers[winner].published
    assert not list(root.glob(".*.tmp"))


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip_byte", "garbage", "other_key", "empty"],
)
def test_damaged_file_is_ignored_with_one_warning_then_replaced(tmp_path, caplog, damage):
    root = tmp_path / "shared"
    first = _cache(root, tmp_path / "p1")
    first.restore()
    _fill(first.use_local_folder(), ARTIFACTS)
    first.publish()
    data = first.path.read_bytes()
    if damage == "truncate":
        first.path.write_bytes(data[: len(data) - 100])
    elif damage == "flip_byte":
        first.path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "garbage":
        first.path.write_bytes(b"\x00\x01not a cache file at all")
    elif damage == "empty":
        first.path.write_bytes(b"")
    else:
        header, _, payload = data.partition(b"\n")
        h = json.loads(header)
        h["key"] = "someone-else"
        first.path.write_bytes(json.dumps(h).encode() + b"\n" + payload)

    second = _cache(root, tmp_path / "p2")
    with caplog.at_level(logging.INFO, logger="diffusion_runtime"):
        assert second.restore() == "corrupt"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(second.path) in warnings[0].getMessage()
    assert not any(second.use_local_folder().iterdir())  # nothing half-restored
    # the process compiles (simulated), then replaces the damaged file with a valid one
    _fill(second.use_local_folder(), {"fresh": b"recompiled"})
    assert second.publish() is True
    assert _read(second.path, "k1")
    third = _cache(root, tmp_path / "p3")
    assert third.restore() == "hit"
    assert (third.use_local_folder() / "fresh").read_bytes() == b"recompiled"


def test_a_payload_escaping_the_folder_is_refused(tmp_path):
    """A checksum-valid file whose tar tries to write outside the local folder is refused, not unpacked."""
    import hashlib
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    payload = buf.getvalue()
    header = {
        "magic": MAGIC,
        "key": "k1",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    root = tmp_path / "shared"
    root.mkdir()
    (root / "k1.ccache").write_bytes(json.dumps(header).encode() + b"\n" + payload)
    cache = _cache(root, tmp_path / "local" / "inductor")
    assert cache.restore() == "corrupt"
    assert not (tmp_path / "local" / "escaped").exists()


def test_without_tarfiles_data_filter_the_same_files_restore_and_an_escape_is_refused(tmp_path, monkeypatch):
    """Python before 3.11.4 (Debian bookworm's python3, the runtime image's base in the dev cluster) has
    no `filter=` for extractall: the restore checks the members itself."""
    monkeypatch.delattr(tarfile, "data_filter")
    root = tmp_path / "shared"
    writer = _cache(root, tmp_path / "a" / "inductor")
    assert writer.restore() == "miss"
    _fill(writer.use_local_folder(), ARTIFACTS)
    assert writer.publish()
    reader = _cache(root, tmp_path / "b" / "inductor")
    assert reader.restore() == "hit"
    for rel, data in ARTIFACTS.items():
        assert (reader.use_local_folder() / rel).read_bytes() == data
    (tmp_path / "escape").mkdir()
    test_a_payload_escaping_the_folder_is_refused(tmp_path / "escape")


def test_unwritable_shared_folder_is_a_warning_not_a_crash(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = _cache(blocker / "sub", tmp_path / "p1")
    with caplog.at_level(logging.WARNING, logger="diffusion_runtime"):
        assert cache.restore() == "error"
        _fill(cache.use_local_folder(), ARTIFACTS)
        assert cache.publish() is False
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "cannot read" in messages[0] and "cannot save" in messages[1]
