"""Parallel replicas on CPU: real `diffusion-runtime serve` processes that start their own gloo ranks.

Each ranked server below is one `serve` process (rank 0, HTTP) plus the ranks it starts itself. The
reference image comes from the single-process `diffusion-runtime generate` command with the same
model, seed and cache-dit cache settings: cache-dit's Ulysses (and Ulysses x TP) must reproduce it
within float tolerance (one 8-bit level after PNG quantisation).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fixtures_runtime import STATIC_CACHE_DIT, RuntimeProcess, make_tiny_model, start_runtime
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"
PROMPT = "a photo of a cat"
READY_TIMEOUT = 420  # 4 ranks load on 2 shared cores
LONG = {"size": "1024x1024", "num_inference_steps": 50}  # many seconds on the tiny model
LONG_REQUESTS = {"max_pixels": 1024 * 1024, "request_timeout_seconds": 3}


def scrape(url: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def metric(m: dict, name: str, **labels: str) -> float:
    for lab, v in m.get(name, []):
        if all(lab.get(k) == val for k, val in labels.items()):
            return v
    raise AssertionError(f"{name}{labels} not exported")


def pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    img.load()
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def post(url: str, timeout: float = 300, **body: Any) -> httpx.Response:
    body.setdefault("prompt", PROMPT)
    return httpx.post(url + GEN, json=body, timeout=timeout)


def start_ranked(model_dir: Path, workdir: Path, cache_dit: dict[str, Any], **kwargs: Any) -> RuntimeProcess:
    rp = start_runtime(model_dir, workdir, cache_dit=cache_dit, wait=False, **kwargs)
    try:
        rp.wait_ready(timeout=READY_TIMEOUT)
    except Exception:
        rp.stop(timeout=20)
        raise
    return rp


def rank_pids(rp: RuntimeProcess) -> dict[int, int]:
    return {int(r): int(p) for r, p in re.findall(r"started rank (\d+) \(pid (\d+)\)", rp.log())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def reference_png(model_dir: Path, workdir: Path, seed: int, cache_dit: dict[str, Any] | None) -> bytes:
    """The single-process image: `diffusion-runtime generate` (one process, no torch.distributed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"ref-{seed}.png"
    args = [sys.executable, "-m", "diffusion_runtime", "generate", "--model", str(model_dir),
            "--prompt", PROMPT, "--size", "64x64", "--steps", "8", "--seed", str(seed),
            "--device", "cpu", "--dtype", "float32", "--output", str(out)]  # fmt: skip
    if cache_dit is not None:
        (workdir / "ref-cache-dit.yaml").write_text(yaml.safe_dump(cache_dit))
        args += ["--cache-dit-config", str(workdir / "ref-cache-dit.yaml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return out.read_bytes()


def assert_same_image(got: bytes, want: bytes) -> None:
    a, b = pixels(got), pixels(want)
    assert a.shape == b.shape == (64, 64, 3)
    diff = np.abs(a - b)
    # float32 results agree to ~2e-6 on a 0..1 scale: at most one 8-bit rounding step apart
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.4f})"
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50, "a real decoded image, not a flat fill"


@pytest.fixture(scope="module")
def tiny_heads4_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-heads4") / "flux-tiny-heads4", "tiny-heads4")


@pytest.fixture(scope="module")
def ulysses_cached(tiny_model_dir, tmp_path_factory):
    """Ulysses 2 with DBCache (static mask: cached steps on every call), short request timeout."""
    cd = {**STATIC_CACHE_DIT, "parallelism_config": {"ulysses_size": 2}}
    rp = start_ranked(tiny_model_dir, tmp_path_factory.mktemp("u2-cached"), cd, server=LONG_REQUESTS)
    yield rp
    rp.stop(timeout=60)


# ---------------------------------------------------------------- same image as one process


def test_ulysses2_gives_the_single_process_image_and_ranks_go_with_rank0(tiny_model_dir, tmp_path):
    rp = start_ranked(tiny_model_dir, tmp_path / "u2", {"parallelism_config": {"ulysses_size": 2}})
    try:
        r = post(rp.url, size="64x64", num_inference_steps=8, seed=11)
        assert r.status_code == 200, r.text
        got = base64.b64decode(r.json()["data"][0]["b64_json"])
        m = scrape(rp.url)
        info = m["diffusion_runtime_info"][0][0]
        assert info["world_size"] == "2" and info["ulysses_size"] == "2"
        assert info["ring_size"] == "1" and info["tp_size"] == "1"
        assert info["cache"].endswith("Ulysses2"), info["cache"]  # cache-dit's own tag of the layout
        assert metric(m, "diffusion_step_duration_seconds_count") >= 8
        pids = rank_pids(rp)
        assert list(pids) == [1] and alive(pids[1])
        assert "rank 1/2 loaded FluxPipeline" in rp.log()
        rp.proc.kill()  # rank 0 gone without a word (OOM kill): rank 1 must not linger
        rp.wait_exit(timeout=30)
        deadline = time.monotonic() + 20
        while alive(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids[1]), "rank 1 outlived rank 0"
    finally:
        rp.stop(timeout=10)
    assert_same_image(got, reference_png(tiny_model_dir, tmp_path / "ref", 11, None))
    other = reference_png(tiny_model_dir, tmp_path / "ref", 12, None)
    assert np.abs(pixels(got) - pixels(other)).max() > 8, "another seed gives another image"


def test_ulysses2_with_dbcache_gives_the_single_process_image(ulysses_cached, tiny_model_dir, tmp_path):
    url = ulysses_cached.url
    before = metric(scrape(url), "diffusion_cache_steps_total", result="cached")
    r = post(url, size="64x64", num_inference_steps=8, seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cache"] == {"cached_steps": 3, "computed_steps": 5}  # mask 11101001
    after = metric(scrape(url), "diffusion_cache_steps_total", result="cached")
    assert after - before == 3
    got = base64.b64decode(body["data"][0]["b64_json"])
    assert_same_image(got, reference_png(tiny_model_dir, tmp_path, 5, STATIC_CACHE_DIT))


def test_timeout_stops_every_rank_at_the_same_step(ulysses_cached):
    """A request past request_timeout_seconds (3 s) is cancelled on all ranks at one step boundary;
    the ranks stay in step: the next request is served."""
    url = ulysses_cached.url
    t0 = time.monotonic()
    r = post(url, seed=1, **LONG)
    assert r.status_code == 504, r.text[:300]
    assert time.monotonic() - t0 < 60
    ok = post(url, size="64x64", num_inference_steps=8, seed=2)
    assert ok.status_code == 200, ok.text
    assert ulysses_cached.proc.poll() is None
    assert all(alive(p) for p in rank_pids(ulysses_cached).values())


def test_an_edit_on_ulysses2_gives_the_single_process_edit(ulysses_cached, runtime_server):
    """/v1/images/edits (image-to-image) ships the decoded image to every rank: the same image as
    one process with the same cache-dit config (`runtime_server`: STATIC_CACHE_DIT, no ranks)."""
    source = base64.b64decode(
        post(ulysses_cached.url, size="64x64", num_inference_steps=8, seed=9).json()["data"][0]["b64_json"]
    )
    form = {"prompt": "a dog", "num_inference_steps": "8", "strength": "0.75", "seed": "4", "size": "64x64"}
    edits = []
    for url in (ulysses_cached.url, runtime_server.url):
        r = httpx.post(
            url + "/v1/images/edits", files={"image": ("in.png", source, "image/png")}, data=form, timeout=120
        )
        assert r.status_code == 200, r.text[:300]
        edits.append(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert_same_image(edits[0], edits[1])
    assert np.abs(pixels(edits[0]) - pixels(source)).max() > 8, "the edit changed the image"


def test_a_stuck_rank_ends_the_serve_process_after_the_collective_timeout(ulysses_cached):
    """A rank that stops answering (SIGSTOP) never hangs the pod: rank 0's collective times out after
    request_timeout_seconds + 60 s and the pod ends with one line. Runs last on this server."""
    rp = ulysses_cached
    pid = rank_pids(rp)[1]
    worker = threading.Thread(target=lambda: post(rp.url, seed=6, **LONG), daemon=True)
    worker.start()
    _in_flight(rp.url)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        code = rp.wait_exit(timeout=150)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    last = [ln for ln in rp.log().splitlines() if ln.strip()][-1]
    assert code == 1
    assert 60 <= took <= 120, took  # the collective timeout: 3 s + 60 s
    assert last.startswith("diffusion-runtime: a collective failed during generate"), last
    assert "ranks are out of step, stopping" in last


def test_hybrid_ulysses2_tp2_on_four_ranks(tiny_heads4_dir, tmp_path):
    cd = {**STATIC_CACHE_DIT, "parallelism_config": {"ulysses_size": 2, "tp_size": 2}}
    rp = start_ranked(tiny_heads4_dir, tmp_path / "hybrid", cd)
    try:
        r = post(rp.url, size="64x64", num_inference_steps=8, seed=21)
        assert r.status_code == 200, r.text
        assert r.json()["cache"]["cached_steps"] == 3
        info = scrape(rp.url)["diffusion_runtime_info"][0][0]
        assert (info["world_size"], info["ulysses_size"], info["tp_size"]) == ("4", "2", "2")
        assert sorted(rank_pids(rp)) == [1, 2, 3]
    finally:
        assert rp.stop(timeout=90) == 0, rp.log_tail()
    got = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert_same_image(got, reference_png(tiny_heads4_dir, tmp_path / "ref", 21, STATIC_CACHE_DIT))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("pc", "needle"),
    [
        ({"ring_size": 2}, "parallelism_config.ring_size: ring attention (ring_size=2) needs CUDA kernels"),
        ({"tp_size": 2}, "parallelism_config.tp_size: tensor parallelism alone (tp_size=2)"),
        (
            {"ulysses_size": 2, "ulysses_float8": True},
            "parallelism_config.ulysses_float8: needs bfloat16 CUDA GPUs",
        ),
        ({"ulysses_size": 2, "use_ray": True}, "parallelism_config.use_ray: the runtime starts one rank"),
    ],
)
def test_layouts_cpu_cannot_run_are_refused_in_one_line(tiny_model_dir, tmp_path, pc, needle):
    rp = start_runtime(tiny_model_dir, tmp_path, cache_dit={"parallelism_config": pc}, wait=False)
    code = rp.wait_exit(timeout=120)
    lines = [ln for ln in rp.log().splitlines() if ln.strip()]
    assert code == 2, rp.log_tail()
    assert lines[-1].startswith("diffusion-runtime: ") and needle in lines[-1], lines[-1]
    assert "started rank" not in rp.log()


def test_heads_not_divisible_by_the_layout_is_refused_before_serving(tiny_model_dir, tmp_path):
    """The tiny model has 2 heads: Ulysses 2 x TP 2 would fail inside cache-dit at the first step."""
    rp = start_runtime(
        tiny_model_dir,
        tmp_path,
        cache_dit={"parallelism_config": {"ulysses_size": 2, "tp_size": 2}},
        wait=False,
    )
    code = rp.wait_exit(timeout=120)
    last = [ln for ln in rp.log().splitlines() if ln.strip()][-1]
    assert code == 2
    assert last.startswith("diffusion-runtime: cache-dit config: parallelism_config: FluxTransformer2DModel")
    assert "has 2 attention heads, not divisible by ulysses_size x tp_size = 4" in last, rp.log_tail()
    assert "started rank" not in rp.log()  # refused from the model folder, before any rank starts


# ---------------------------------------------------------------- lifecycle across ranks


def _in_flight(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(scrape(url), "diffusion_requests_in_flight") == 1:
            return
        time.sleep(0.05)
    raise AssertionError("the request never started")


def test_sigterm_drains_the_running_request_on_all_ranks(tiny_model_dir, tmp_path):
    rp = start_ranked(
        tiny_model_dir,
        tmp_path,
        {"parallelism_config": {"ulysses_size": 2}},
        server={"max_pixels": 1024 * 1024},
    )
    pids = rank_pids(rp)
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(r=post(rp.url, seed=3, **LONG)))
    worker.start()
    try:
        _in_flight(rp.url)
        rp.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(rp.url + "/ready", timeout=5).status_code == 503  # not ready while draining
        worker.join(timeout=300)
        r = result["r"]
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["data"]) == 1
        assert rp.wait_exit(timeout=60) == 0, rp.log_tail()
    finally:
        rp.stop(timeout=10)
    assert "rank 1: stop" in rp.log()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids.values())


def test_a_killed_rank_ends_the_serve_process_with_one_line(tiny_model_dir, tmp_path):
    rp = start_ranked(
        tiny_model_dir,
        tmp_path,
        {"parallelism_config": {"ulysses_size": 2}},
        server={"max_pixels": 1024 * 1024},
    )
    pid = rank_pids(rp)[1]
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["r"] = post(rp.url, seed=4, **LONG)
        except httpx.HTTPError as e:
            result["error"] = e

    worker = threading.Thread(target=call)
    worker.start()
    try:
        _in_flight(rp.url)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        code = rp.wait_exit(timeout=30)
        took = time.monotonic() - t0
    finally:
        rp.stop(timeout=10)
        worker.join(timeout=30)
    last = [ln for ln in rp.log().splitlines() if ln.strip()][-1]
    assert code == 1
    assert took < 10, f"took {took:.1f}s to notice"
    assert last.startswith(f"diffusion-runtime: rank 1 (pid {pid}) was killed by SIGKILL"), last
    assert "needs every rank" in last
    assert "r" not in result or result["r"].status_code != 200  # the in-flight request did not succeed


def test_a_batch_on_ulysses2_gives_each_request_its_single_process_image(tiny_model_dir, tmp_path):
    """server.max_batch on a ranked pod: rank 0's scheduler ships the whole batch (GenerateBatch) to
    every rank; each request's image is the single-process one of its seed."""
    cd = {**STATIC_CACHE_DIT, "parallelism_config": {"ulysses_size": 2}}
    rp = start_ranked(
        tiny_model_dir, tmp_path / "u2-batch", cd, server={"max_batch": 2, "max_batch_delay_seconds": 1.0}
    )
    try:
        out: dict[int, httpx.Response] = {}

        def send(seed: int) -> None:
            out[seed] = post(rp.url, size="64x64", num_inference_steps=8, seed=seed)

        threads = [threading.Thread(target=send, args=(s,)) for s in (21, 22)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        m = scrape(rp.url)
        assert metric(m, "diffusion_batch_size_count") == 1, "both requests in one pipeline call"
        assert metric(m, "diffusion_batch_size_sum") == 2
    finally:
        rp.stop(timeout=60)
    for seed in (21, 22):
        assert out[seed].status_code == 200, out[seed].text
        got = base64.b64decode(out[seed].json()["data"][0]["b64_json"])
        assert_same_image(got, reference_png(tiny_model_dir, tmp_path / "ref", seed, STATIC_CACHE_DIT))
