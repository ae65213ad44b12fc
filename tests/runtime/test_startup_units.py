"""The runtime's start line (`diffusion-runtime ready: {...}`): cold or warm, the record, its parser."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from diffusion_runtime.startup import (
    COLD,
    READY_PREFIX,
    WARM,
    parse_ready_line,
    ready_line,
    start_kind,
    summary,
)


@pytest.mark.parametrize(
    "downloaded, compile, cache, kind",
    [
        (False, False, "off", WARM),  # model from local files, nothing to compile
        (True, False, "off", COLD),  # fetched from the Hub
        (False, True, "hit", WARM),  # artifacts restored
        (True, True, "hit", COLD),  # restored, but the model was fetched
        (False, True, "miss", COLD),
        (False, True, "corrupt", COLD),
        (False, True, "error", COLD),
        (False, True, "off", COLD),  # compile without a compile cache: compiled from scratch
    ],
)
def test_cold_means_a_cache_could_have_saved_work(downloaded, compile, cache, kind):
    assert start_kind(downloaded, compile, cache) == kind


def record(**over) -> dict:
    args = dict(
        started=1_800_000_000.0, ready=1_800_000_048.5, model_downloaded=False, compile=True,
        compile_cache="miss", download_seconds=0.0, load_seconds=2.5, warmup_seconds=37.9,
        compile_seconds=36.7,
    )  # fmt: skip
    args.update(over)
    return summary(**args)


def test_summary_seconds_from_process_start_to_ready_and_when():
    r = record()
    assert r["start"] == COLD and r["seconds"] == 48.5
    assert r["at"] == "2027-01-15T08:00:48Z"
    assert (r["model"], r["compile"], r["compileCache"]) == ("local", True, "miss")
    assert record(compile_cache="hit")["start"] == WARM
    assert record(model_downloaded=True, compile_cache="hit")["model"] == "downloaded"


def test_the_line_round_trips_and_is_found_in_a_log():
    r = record(compile_cache="hit")
    line = ready_line(r)
    assert line.startswith(READY_PREFIX) and "\n" not in line
    log = "\n".join(
        [
            "INFO model loaded in 2.50s",
            "diffusion-runtime ready: not json",  # a broken one is skipped
            f"2026-11-27T10:00:00.123456789Z {line}",  # kubectl logs --timestamps puts a prefix before it
            ready_line(record(compile_cache="miss")),  # a later one: the first well-formed line counts
        ]
    )
    assert parse_ready_line(log) == r
    assert parse_ready_line("INFO nothing here\n") is None
    assert parse_ready_line("") is None


@pytest.mark.parametrize(
    "change",
    [
        {"start": "lukewarm"},
        {"seconds": -1},
        {"seconds": "12"},
        {"seconds": True},
        {"seconds": float("inf")},
        {"compileCache": "maybe"},
        {"model": "borrowed"},
        {"compile": "yes"},
        {"at": "yesterday"},
        {"loadSeconds": None},
    ],
)
def test_a_record_that_does_not_fit_the_status_schema_is_ignored(change):
    bad = {**record(), **change}
    line = READY_PREFIX + json.dumps(bad)
    assert parse_ready_line(line) is None


def test_process_start_time_is_when_the_process_started():
    before = time.time()
    code = "import time, diffusion_runtime.startup as s; print(s.process_start_time(), time.time())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    started, printed = map(float, out.stdout.split())
    # the kernel's start time (clock ticks since boot, so within ~1 s): after we spawned it, before it printed
    assert before - 1.0 <= started <= printed
