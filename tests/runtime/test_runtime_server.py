"""The runtime as users and Kubernetes see it: a real `diffusion-runtime serve` process, real HTTP.

The tiny random-weight FluxPipeline (64x64, 8 steps: ~0.1 s per image) keeps this file fast on two
shared cores. cache-dit runs with a static computation mask, so cached steps are really > 0.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fixtures_runtime import STATIC_CACHE_DIT, start_runtime
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"


def scrape(url: str) -> dict[str, list]:
    """name -> [(labels, value)] for every sample, parsed by prometheus_client's own parser."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: dict, name: str, **labels) -> float:
    for lab, v in metrics.get(name, []):
        if all(lab.get(k) == val for k, val in labels.items()):
            return v
    raise AssertionError(f"{name}{labels} not exported; have {sorted(metrics)}")


def png_of(item: dict) -> tuple[bytes, Image.Image]:
    raw = base64.b64decode(item["b64_json"])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return raw, img


def generate(url: str, timeout: float = 120, **body) -> httpx.Response:
    body.setdefault("prompt", "a photo of a cat")
    return httpx.post(url + GEN, json=body, timeout=timeout)


# ---------------------------------------------------------------- images


def test_png_of_requested_size_and_same_seed_same_bytes(runtime_server):
    url = runtime_server.url
    r1 = generate(url, size="64x48", num_inference_steps=8, seed=7)
    assert r1.status_code == 200, r1.text
    body = r1.json()
    raw1, img = png_of(body["data"][0])
    assert img.size == (64, 48) and img.mode == "RGB"
    assert body["seed"] == 7 and body["size"] == "64x48"
    assert body["cache"]["cached_steps"] > 0 and body["cache"]["computed_steps"] > 0
    assert body["cache"]["cached_steps"] + body["cache"]["computed_steps"] == 8
    assert body["timings"]["inference_seconds"] > 0
    raw2, _ = png_of(generate(url, size="64x48", num_inference_steps=8, seed=7).json()["data"][0])
    assert raw1 == raw2, "same seed must give identical PNG bytes"
    raw3, _ = png_of(generate(url, size="64x48", num_inference_steps=8, seed=8).json()["data"][0])
    assert raw3 != raw1, "another seed must give another image"
    pixels = list(img.get_flattened_data())
    assert len(set(pixels)) > 50, "a real decoded image, not a flat fill"


def test_n_images_and_prompt_changes_image(runtime_server):
    r = generate(runtime_server.url, n=2, size="64x64", num_inference_steps=8, seed=1)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    a, _ = png_of(data[0])
    b, _ = png_of(data[1])
    assert a != b
    other = generate(
        runtime_server.url, prompt="a red dog", size="64x64", num_inference_steps=8, seed=1
    ).json()
    assert png_of(other["data"][0])[0] != a


# ---------------------------------------------------------------- metrics


def test_metrics_parsed_on_both_listeners(runtime_server, tiny_model_dir):
    url = runtime_server.url
    before = scrape(url + "/metrics")
    n200 = (
        value(before, "diffusion_request_duration_seconds_count", endpoint="generations", status="200")
        if any(
            lab.get("status") == "200" and lab.get("endpoint") == "generations"
            for lab, _ in before.get("diffusion_request_duration_seconds_count", [])
        )
        else 0.0
    )
    cached0 = value(before, "diffusion_cache_steps_total", result="cached")
    assert generate(url, size="64x64", num_inference_steps=8, seed=3).status_code == 200
    assert generate(url, prompt="", size="64x64").status_code == 400
    m = scrape(url + "/metrics")
    assert (
        value(m, "diffusion_request_duration_seconds_count", endpoint="generations", status="200") == n200 + 1
    )
    assert value(m, "diffusion_request_duration_seconds_count", endpoint="generations", status="400") >= 1
    assert value(m, "diffusion_requests_total", endpoint="generations", status="200") >= n200 + 1
    assert value(m, "diffusion_cache_steps_total", result="cached") == cached0 + 3  # mask 11101001
    assert value(m, "diffusion_cache_steps_total", result="computed") > 0
    assert value(m, "diffusion_queue_depth") == 0
    assert value(m, "diffusion_requests_in_flight") == 0
    assert value(m, "diffusion_demand_requests") == 0
    assert value(m, "diffusion_model_load_seconds") > 0
    assert value(m, "diffusion_warmup_seconds") > 0
    assert value(m, "diffusion_images_generated_total") >= 1
    assert value(m, "diffusion_queue_wait_seconds_count") >= 1
    assert value(m, "diffusion_inference_duration_seconds_count") >= 1
    assert value(m, "diffusion_step_duration_seconds_count") >= 8
    assert value(m, "diffusion_gpu_memory_allocated_bytes") > 10 * 2**20  # process RSS on CPU
    assert (
        value(m, "diffusion_gpu_memory_peak_bytes") >= value(m, "diffusion_gpu_memory_allocated_bytes") * 0.5
    )
    assert value(m, "diffusion_gpu_memory_reserved_bytes") > 0
    info = m["diffusion_runtime_info"][0][0]
    assert info["pipeline"] == "FluxPipeline" and info["device"] == "cpu" and info["quant"] == "none"
    assert info["cache"].startswith("DBCache_F1B0") and "SCM11101001_static" in info["cache"]
    assert info["compile"] == "false" and info["model"] == str(tiny_model_dir)
    # the second listener serves the same registry
    m2 = scrape(runtime_server.metrics_url)
    assert value(m2, "diffusion_cache_steps_total", result="cached") == value(
        m, "diffusion_cache_steps_total", result="cached"
    )


def test_health_ready_openapi(runtime_server):
    url = runtime_server.url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/ready").status_code == 200
    schema = httpx.get(url + "/openapi.json").json()
    assert GEN in schema["paths"]
    props = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    for f in (
        "prompt",
        "n",
        "size",
        "response_format",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "negative_prompt",
    ):
        assert f in props


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"prompt": "a cat", "size": ', "malformed JSON"),
        (b"not json at all", "malformed JSON"),
        (b"[1, 2]", "body"),
        (b"", "body is required"),
        (json.dumps({"prompt": ""}).encode(), "prompt"),
        (json.dumps({"prompt": "   "}).encode(), "prompt"),
        (json.dumps({"size": "64x64"}).encode(), "prompt"),
        (json.dumps({"prompt": 5}).encode(), "prompt"),
        (json.dumps({"prompt": "a", "size": "65x64"}).encode(), "multiples of 16"),
        (json.dumps({"prompt": "a", "size": "big"}).encode(), "size"),
        (json.dumps({"prompt": "a", "size": "0x64"}).encode(), "size"),
        (json.dumps({"prompt": "a", "size": "4096x4096"}).encode(), "max_pixels"),
        (json.dumps({"prompt": "a", "num_inference_steps": 0}).encode(), "num_inference_steps"),
        (json.dumps({"prompt": "a", "num_inference_steps": 51}).encode(), "num_inference_steps"),
        (json.dumps({"prompt": "a", "n": 5}).encode(), "n:"),
        (json.dumps({"prompt": "a", "n": 0}).encode(), "n:"),
        (json.dumps({"prompt": "a", "seed": -1}).encode(), "seed"),
        (json.dumps({"prompt": "a", "response_format": "file"}).encode(), "response_format"),
        (json.dumps({"prompt": "a", "output_format": "gif"}).encode(), "output_format"),
        (json.dumps({"prompt": "a", "seed": True}).encode(), "seed"),
        (json.dumps({"prompt": "a", "guidance_scale": "high"}).encode(), "guidance_scale"),
        (json.dumps({"prompt": "a", "num_steps": 4}).encode(), "num_steps"),
        (b'{"prompt": "a", "guidance_scale": NaN}', "guidance_scale"),
    ],
)
def test_bad_input_is_4xx_with_reason(runtime_server, body, needle):
    r = httpx.post(
        runtime_server.url + GEN, content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    msg = r.json()["error"]["message"]
    assert needle in msg, msg


def test_alive_after_bad_input(runtime_server):
    assert generate(runtime_server.url, size="64x64", num_inference_steps=4, seed=1).status_code == 200


# ---------------------------------------------------------------- readiness, load, shutdown


def test_not_ready_until_warmup_done(runtime_server_factory):
    rp = runtime_server_factory("slow-warmup", wait=False, warmup={"resolutions": ["128x128", "64x64"], "steps": 40},
                                server={"max_steps": 200})  # fmt: skip
    saw_unready = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert rp.proc.poll() is None, rp.log_tail()
        try:
            h = httpx.get(rp.url + "/health", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        assert h.status_code == 200
        r = httpx.get(rp.url + "/ready", timeout=2)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["status"] in ("loading", "warming up")
        if saw_unready is None:
            saw_unready = r.json()["status"]
            # no admission before ready: 503 with Retry-After, not a queued request
            g = generate(rp.url, size="64x64", num_inference_steps=4)
            assert g.status_code == 503 and int(g.headers["Retry-After"]) >= 1
            m = scrape(rp.url + "/metrics")
            assert value(m, "diffusion_ready") == 0
        time.sleep(0.05)
    assert saw_unready, "the server was never observed alive-but-unready"
    m = scrape(rp.url + "/metrics")
    assert value(m, "diffusion_ready") == 1
    assert value(m, "diffusion_warmup_seconds") > 0  # readiness came after the warmup finished
    assert "warmup done" in rp.log()


def test_50_concurrent_requests_with_max_queue_4(runtime_server_factory):
    rp = runtime_server_factory("queue4", server={"max_queue": 4})

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=60)) as c:
            reqs = [c.post(rp.url + GEN, json={"prompt": f"cat {i}", "size": "64x64", "num_inference_steps": 8,
                                                "seed": i}) for i in range(50)]  # fmt: skip
            return await asyncio.gather(*reqs)

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert all(c < 500 for c in codes), codes
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) >= 4, codes  # 4 queue slots (+1 running)
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "queue full" in r.json()["error"]["message"]
    assert httpx.get(rp.url + "/health").status_code == 200
    assert generate(rp.url, size="64x64", num_inference_steps=4).status_code == 200
    m = scrape(rp.url + "/metrics")
    assert value(m, "diffusion_requests_total", status="429") == codes.count(429)
    assert value(m, "diffusion_queue_depth") == 0


def _post_in_thread(url: str, results: dict, key: str, timeout: float = 120, **body) -> threading.Thread:
    def run():
        try:
            results[key] = generate(url, timeout=timeout, **body)
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            results[key] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_metric(url: str, name: str, want: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value(scrape(url + "/metrics"), name) == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {want}")


LONG = {"size": "256x256", "num_inference_steps": 200, "n": 4}  # ~7 s on one core


def test_sigterm_finishes_in_flight_and_exits_0(runtime_server_factory):
    rp = runtime_server_factory("sigterm", server={"max_steps": 200, "max_pixels": 256 * 256})
    results: dict = {}
    t1 = _post_in_thread(rp.url, results, "running", seed=1, **LONG)
    _wait_metric(rp.url, "diffusion_requests_in_flight", 1)
    t2 = _post_in_thread(rp.url, results, "queued", size="64x64", num_inference_steps=8, seed=2)
    _wait_metric(rp.url, "diffusion_queue_depth", 1)
    rp.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if rp.proc.poll() is None and "running" not in results:
        r = httpx.get(rp.url + "/ready", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "draining"
        g = generate(rp.url, size="64x64", num_inference_steps=4)
        assert g.status_code == 503 and "shutting down" in g.json()["error"]["message"]
    t1.join(120)
    t2.join(120)
    assert isinstance(results["running"], httpx.Response) and results["running"].status_code == 200, results
    assert len(results["running"].json()["data"]) == 4
    assert isinstance(results["queued"], httpx.Response) and results["queued"].status_code == 200, results
    assert rp.wait_exit(60) == 0, rp.log_tail()


def test_disconnected_client_frees_its_queue_slot(runtime_server_factory):
    rp = runtime_server_factory(
        "disconnect", server={"max_queue": 1, "max_steps": 200, "max_pixels": 256 * 256}
    )
    results: dict = {}
    t1 = _post_in_thread(rp.url, results, "running", seed=1, **LONG)
    _wait_metric(rp.url, "diffusion_requests_in_flight", 1)
    # the queued client gives up after 1 s and closes its connection
    t2 = _post_in_thread(rp.url, results, "impatient", timeout=1.0, size="64x64", num_inference_steps=8)
    _wait_metric(rp.url, "diffusion_queue_depth", 1)
    full = generate(rp.url, size="64x64", num_inference_steps=8)
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    t2.join(30)
    assert isinstance(results["impatient"], httpx.TimeoutException)
    _wait_metric(rp.url, "diffusion_queue_depth", 0, timeout=10)
    assert value(scrape(rp.url + "/metrics"), "diffusion_requests_in_flight") == 1, (
        "the long job is still running"
    )
    t3 = _post_in_thread(rp.url, results, "next", size="64x64", num_inference_steps=8, seed=5)
    _wait_metric(rp.url, "diffusion_queue_depth", 1)  # admitted into the freed slot
    t1.join(120)
    t3.join(120)
    assert results["running"].status_code == 200 and results["next"].status_code == 200
    m = scrape(rp.url + "/metrics")
    assert value(m, "diffusion_requests_total", status="499") == 1


def test_request_timeout_is_504_and_stops_the_generation(runtime_server_factory):
    rp = runtime_server_factory(
        "timeout", server={"request_timeout_seconds": 1, "max_steps": 200, "max_pixels": 256 * 256}
    )
    t0 = time.monotonic()
    r = generate(rp.url, seed=1, **LONG)
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10
    # the running generation was stopped at its next step, so the pipeline is free again soon
    _wait_metric(rp.url, "diffusion_requests_in_flight", 0, timeout=10)
    ok = generate(rp.url, size="64x64", num_inference_steps=4, seed=2)
    assert ok.status_code == 200


# ---------------------------------------------------------------- optimizations and their errors


def test_int8_weight_only_on_cpu_serves_images(runtime_server_factory):
    cd = {
        **STATIC_CACHE_DIT,
        "quantize_config": {"quant_type": "int8_weight_only", "exclude_layers": ["embedder", "embed"]},
    }
    rp = runtime_server_factory("int8", cache_dit=cd)
    r = generate(rp.url, size="64x64", num_inference_steps=8, seed=4)
    assert r.status_code == 200, r.text
    _, img = png_of(r.json()["data"][0])
    assert img.size == (64, 64)
    assert r.json()["cache"]["cached_steps"] == 3
    info = scrape(rp.url + "/metrics")["diffusion_runtime_info"][0][0]
    assert info["quant"] == "int8_weight_only"
    assert "quantized" in rp.log() and "torchao int8_weight_only" in rp.log()


def test_compile_true_serves_images_close_to_eager(runtime_server, runtime_server_factory):
    """`compile: true` with cache-dit: warmup compiles, then serves what eager serves (up to float noise)."""
    import numpy as np

    rp = runtime_server_factory("compiled", cache_dit=STATIC_CACHE_DIT, compile=True)
    body = {"size": "64x64", "num_inference_steps": 8, "seed": 11}
    compiled = generate(rp.url, **body)
    eager = generate(runtime_server.url, **body)
    assert compiled.status_code == eager.status_code == 200, compiled.text
    assert compiled.json()["cache"]["cached_steps"] == 3
    _, a = png_of(compiled.json()["data"][0])
    _, b = png_of(eager.json()["data"][0])
    assert a.size == b.size == (64, 64)
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.mean() < 2.0, f"compiled image differs from eager: mean abs diff {diff.mean():.2f}/255"
    metrics = scrape(rp.url + "/metrics")
    assert metrics["diffusion_runtime_info"][0][0]["compile"] == "true"
    assert metrics["diffusion_warmup_seconds"][0][1] > 0


def _runtime_error_lines(rp) -> list[str]:
    return [ln for ln in rp.log().splitlines() if ln.startswith("diffusion-runtime:")]


def test_float8_on_cpu_exits_nonzero_with_one_line(tiny_model_dir, tmp_path):
    rp = start_runtime(
        tiny_model_dir, tmp_path, cache_dit={"quantize_config": {"quant_type": "float8_per_row"}}, wait=False
    )
    code = rp.wait_exit(120)
    assert code != 0
    lines = _runtime_error_lines(rp)
    assert len(lines) == 1, rp.log_tail()
    assert "quantize_config.quant_type=float8_per_row" in lines[0] and "cpu" in lines[0]


def test_fn_bn_over_block_count_exits_with_fields_and_count(tiny_model_dir, tmp_path):
    """cache-dit's rule: Fn <= len(blocks) and Bn <= len(blocks), each on its own; the tiny FLUX's
    2 + 4 blocks are one list of 6 (dummy blocks, cache-dit's default)."""
    cd = {"cache_config": {"Fn_compute_blocks": 7, "Bn_compute_blocks": 0}}
    rp = start_runtime(tiny_model_dir, tmp_path, cache_dit=cd, wait=False)
    assert rp.wait_exit(120) != 0
    lines = _runtime_error_lines(rp)
    assert len(lines) == 1, rp.log_tail()
    line = lines[0]
    assert "cache_config.Fn_compute_blocks: 7 exceeds the 6 blocks" in line, line


def test_missing_model_exits_with_one_line(tiny_model_dir, tmp_path):
    rp = start_runtime(tmp_path / "no-such-model", tmp_path / "a", wait=False)
    assert rp.wait_exit(120) != 0
    lines = _runtime_error_lines(rp)
    assert len(lines) == 1 and "does not exist" in lines[0], rp.log_tail()
    # a hub id while offline (HF_HUB_OFFLINE=1 in the fixture env): one clear line, no hang
    rp = start_runtime("hf://no-such-org/no-such-model", tmp_path / "b", wait=False)
    assert rp.wait_exit(120) != 0
    lines = _runtime_error_lines(rp)
    assert len(lines) == 1 and "Hugging Face Hub" in lines[0], rp.log_tail()


# ---------------------------------------------------------------- CLI


def test_cli_generate_writes_png(tiny_model_dir, tmp_path):
    import yaml

    (tmp_path / "cd.yaml").write_text(yaml.safe_dump(STATIC_CACHE_DIT))
    out = tmp_path / "out" / "cat.png"
    cmd = [sys.executable, "-m", "diffusion_runtime", "generate", "--model", f"file://{tiny_model_dir}",
           "--prompt", "a cat", "--size", "64x32", "--steps", "8", "--seed", "3",
           "--cache-dit-config", str(tmp_path / "cd.yaml"), "--output", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Image.open(out).size == (64, 32)
    assert "cached steps 3" in res.stdout
    bad = subprocess.run(
        cmd[:-2] + ["--size", "65x64", "--output", str(out)], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "multiples of 16" in bad.stderr
