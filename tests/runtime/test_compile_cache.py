"""Compile-artifact cache with real `diffusion-runtime serve` processes (`compile: true`, tiny model).

Each process gets its own empty local inductor folder (as each pod has its own /tmp); only the shared
`compile_cache_dir` carries artifacts from one process to the next.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from diffusion_runtime.engine.compile_cache import SUFFIX, _read
from diffusion_runtime.startup import parse_ready_line
from test_runtime_server import generate, png_of, scrape, value

pytestmark = pytest.mark.runtime

BODY = {"size": "64x64", "num_inference_steps": 4, "seed": 5}


def _start(factory, monkeypatch, tmp_path, name: str, shared):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"inductor-{name}"))
    spawned = time.time()
    rp = factory(name, compile=True, compile_cache_dir=str(shared), warmup={"steps": 4}, wait=False)
    rp.wait_ready(timeout=900)  # a cold CPU compile on a loaded 2-core machine takes minutes
    rp.outside_seconds = time.time() - spawned
    return rp


def _start_line(rp, kind: str, cache: str) -> dict:
    """The runtime's start line (status.startup's source): cold or warm, and its seconds from process
    start to ready lie within what this test saw from spawning it to /ready answering 200."""
    record = parse_ready_line(rp.log())
    assert record is not None, rp.log_tail()
    assert (record["start"], record["compileCache"], record["compile"], record["model"]) == (
        kind, cache, True, "local",
    )  # fmt: skip
    assert (
        0 < record["compileSeconds"] < record["warmupSeconds"] < record["seconds"] <= rp.outside_seconds + 1
    )
    return record


def _pixels(rp) -> np.ndarray:
    r = generate(rp.url, **BODY)
    assert r.status_code == 200, r.text
    _, img = png_of(r.json()["data"][0])
    return np.asarray(img, dtype=np.int16)


def test_second_process_loads_the_first_ones_artifacts_and_a_corrupt_file_recompiles(
    runtime_server_factory, monkeypatch, tmp_path
):
    shared = tmp_path / "compile-cache"

    cold = _start(runtime_server_factory, monkeypatch, tmp_path, "cold", shared)
    m = scrape(cold.metrics_url)
    assert value(m, "diffusion_compile_cache_lookups_total", result="miss") == 1
    assert value(m, "diffusion_compile_cache_saves_total") == 1
    assert value(m, "diffusion_compile_seconds") > 0
    files = list(shared.glob(f"*{SUFFIX}"))
    assert len(files) == 1, files
    key = files[0].name.removesuffix(SUFFIX)
    assert _read(files[0], key)  # a complete, checksummed artifact
    cold_start = _start_line(cold, "cold", "miss")
    cold_pixels = _pixels(cold)
    cold.stop()

    warm = _start(runtime_server_factory, monkeypatch, tmp_path, "warm", shared)
    m = scrape(warm.metrics_url)
    assert value(m, "diffusion_compile_cache_lookups_total", result="hit") == 1
    assert value(m, "diffusion_compile_cache_lookups_total", result="miss") == 0
    assert value(m, "diffusion_compile_cache_saves_total") == 0
    assert "compile cache: hit" in warm.log()
    warm_start = _start_line(warm, "warm", "hit")
    assert warm_start["compileSeconds"] < cold_start["compileSeconds"]
    warm_pixels = _pixels(warm)
    assert np.abs(warm_pixels - cold_pixels).max() <= 1, "restored kernels give another image"
    warm.stop()

    # damage the shared file: the next process warns once, recompiles, turns Ready and replaces it
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    healed = _start(runtime_server_factory, monkeypatch, tmp_path, "healed", shared)
    m = scrape(healed.metrics_url)
    assert value(m, "diffusion_compile_cache_lookups_total", result="corrupt") == 1
    assert value(m, "diffusion_compile_cache_saves_total") == 1
    _start_line(healed, "cold", "corrupt")
    warnings = [ln for ln in healed.log().splitlines() if "compile cache" in ln and "WARNING" in ln.upper()]
    assert len(warnings) == 1, healed.log_tail()
    assert "checksum mismatch" in warnings[0]
    assert np.abs(_pixels(healed) - cold_pixels).max() <= 1
    assert _read(files[0], key)  # replaced by a valid artifact


def test_compile_cache_dir_must_be_absolute(tmp_path):
    from diffusion_runtime.contract.config import ConfigError, config_from_dict, validate

    raw = {"model": {"uri": "/m"}, "compile": True, "compile_cache_dir": "relative/path"}
    with pytest.raises(ConfigError, match="compile_cache_dir: expected an absolute path"):
        validate(config_from_dict(raw))
