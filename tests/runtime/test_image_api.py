"""The image API as OpenAI clients and gateways use it: the official `openai` client, edits, output
formats, async jobs with cancellation and webhooks, bad uploads. A real `diffusion-runtime serve`
on the tiny model (64x64, a few steps), shared by this module.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time

import httpx
import openai
import pytest
from fixtures_runtime import free_port, start_runtime
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"
EDITS = "/v1/images/edits"
JOBS = "/v1/images/jobs"
ASYNC = {"Prefer": "respond-async"}
# webhook receivers here listen on loopback, refused unless allowed (test_webhooks.py): allowed
LIMITS = {"max_steps": 200, "max_pixels": 256 * 256, "max_n": 4, "max_queue": 8,
          "webhook_allow": ["127.0.0.1/32"]}  # fmt: skip
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def api_server(tiny_model_dir, tmp_path_factory):
    rp = start_runtime(tiny_model_dir, tmp_path_factory.mktemp("image-api"), server=LIMITS)
    yield rp
    rp.stop()


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def decode(b64: str, fmt: str) -> tuple[bytes, Image.Image]:
    raw = base64.b64decode(b64)
    assert raw.startswith(MAGIC[fmt]), raw[:12]
    img = Image.open(io.BytesIO(raw))
    img.load()
    assert img.format == PIL_FORMAT[fmt]
    return raw, img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def source_png(client) -> bytes:
    r = client.images.generate(
        prompt="a red house", size="64x64", extra_body={"seed": 1, "num_inference_steps": 4}
    )
    assert r.data and r.data[0].b64_json
    return decode(r.data[0].b64_json, "png")[0]


def assert_alive(url: str) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    r = httpx.post(
        url + GEN, json={"prompt": "still here", "size": "64x64", "num_inference_steps": 2}, timeout=60
    )
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- the official openai client


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_openai_generate_formats_deterministic(client, fmt):
    kw = dict(prompt="a lighthouse at dusk", size="64x48", output_format=fmt, response_format="b64_json")
    extra = {"seed": 7, "num_inference_steps": 4}
    r1 = client.images.generate(**kw, extra_body=extra)
    r2 = client.images.generate(**kw, extra_body=extra)
    assert r1.output_format == fmt
    raw1, img = decode(r1.data[0].b64_json, fmt)
    raw2, _ = decode(r2.data[0].b64_json, fmt)
    assert img.size == (64, 48)
    assert raw1 == raw2, "same seed, same bytes"
    raw3, _ = decode(client.images.generate(**kw, extra_body={**extra, "seed": 8}).data[0].b64_json, fmt)
    assert raw3 != raw1, "another seed, another image"


def test_output_compression_is_jpeg_quality(client):
    def size(q: int) -> int:
        r = client.images.generate(
            prompt="a lighthouse", size="64x64", output_format="jpeg", output_compression=q,
            extra_body={"seed": 7, "num_inference_steps": 4},
        )  # fmt: skip
        return len(base64.b64decode(r.data[0].b64_json))

    assert size(10) < size(95)


def test_openai_edit_png_deterministic(client, source_png):
    def edit() -> bytes:
        r = client.images.edit(
            image=("house.png", source_png, "image/png"), prompt="a blue house", size="64x64",
            extra_body={"seed": 3, "num_inference_steps": 4, "strength": 0.75},
        )  # fmt: skip
        raw, img = decode(r.data[0].b64_json, "png")
        assert img.size == (64, 64)
        return raw

    a, b = edit(), edit()
    assert a == b, "same seed, same edit"
    assert a != source_png


def test_openai_edit_with_mask_changes_only_through_inpaint(client, source_png, api_server):
    before = metric(api_server.url, "diffusion_requests_total", endpoint="edits", status="200")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = edit here (OpenAI's convention)
    mask_png = png_bytes(mask)

    def edit() -> bytes:
        r = client.images.edit(
            image=("house.png", source_png, "image/png"), mask=("mask.png", mask_png, "image/png"),
            prompt="a window", extra_body={"seed": 5, "num_inference_steps": 4},
        )  # fmt: skip
        raw, img = decode(r.data[0].b64_json, "png")
        assert img.size == (64, 64)  # default size: the image's own
        return raw

    a, b = edit(), edit()
    assert a == b
    plain = client.images.edit(
        image=("house.png", source_png, "image/png"), prompt="a window",
        extra_body={"seed": 5, "num_inference_steps": 4},
    )  # fmt: skip
    assert base64.b64decode(plain.data[0].b64_json) != a, "the mask selects the inpaint variant"
    assert metric(api_server.url, "diffusion_requests_total", endpoint="edits", status="200") == before + 3


def test_models_list_and_retrieve(client, tiny_model_dir):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [str(tiny_model_dir)]
    assert client.models.retrieve(str(tiny_model_dir)).id == str(tiny_model_dir)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert "not served here" in str(e.value)


def test_edit_is_cached_by_cache_dit_and_leaves_generation_intact(runtime_server, source_png):
    """The static cache-dit mask (11101001, 3 of 8 cached) applies to edits as to generations."""
    url = runtime_server.url
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 8, "seed": 21}
    g1 = httpx.post(url + GEN, json=body, timeout=60).json()
    r = httpx.post(
        url + EDITS, files={"image": ("in.png", source_png, "image/png")},
        data={"prompt": "a dog", "num_inference_steps": "8", "strength": "1.0", "seed": "2"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["cache"] == {"cached_steps": 3, "computed_steps": 5}
    g2 = httpx.post(url + GEN, json=body, timeout=60).json()
    assert g1["data"][0]["b64_json"] == g2["data"][0]["b64_json"], "an edit must not disturb the cache"


def test_response_format_url_serves_the_image(api_server):
    r = httpx.post(
        api_server.url + GEN,
        json={"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "response_format": "url",
              "output_format": "webp", "n": 2},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    urls = [d["url"] for d in r.json()["data"]]
    assert len(urls) == 2 and all(u.startswith(api_server.url + "/v1/images/results/") for u in urls)
    got = httpx.get(urls[0], timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    missing = httpx.get(api_server.url + "/v1/images/results/img_nope.png", timeout=10)
    assert missing.status_code == 404 and "not known to this pod" in missing.json()["error"]["message"]


def test_openapi_states_the_configured_limits(api_server):
    doc = httpx.get(api_server.url + "/openapi.json", timeout=10).json()
    props = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert props["n"]["maximum"] == LIMITS["max_n"]
    steps = next(v for v in props["num_inference_steps"]["anyOf"] if v.get("type") == "integer")
    assert steps["maximum"] == LIMITS["max_steps"] and steps["minimum"] == 1
    size = next(v for v in props["size"]["anyOf"] if v.get("type") == "string")
    assert size["x-max-pixels"] == LIMITS["max_pixels"] and size["format"] == "image-size"
    assert props["prompt"]["minLength"] == 1 and props["prompt"]["maxLength"] > 0
    form = doc["paths"][EDITS]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "strength", "n", "size"} <= set(form["properties"])
    assert form["properties"]["n"]["maximum"] == LIMITS["max_n"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for code, answer in op["responses"].items():
                if code.startswith(("4", "5")) and path != "/ready":
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (method, path, code)
    gen = doc["paths"][GEN]["post"]["responses"]
    assert {"200", "202", "400", "413", "415", "429", "500", "503", "504"} <= set(gen)
    assert {"200", "404"} <= set(doc["paths"][JOBS + "/{job_id}"]["delete"]["responses"])


# ---------------------------------------------------------------- async jobs


def _job(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}{JOBS}/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_async_jobs_positions_progress_cancel_and_results(api_server):
    url = api_server.url
    long = {"prompt": "a long one", "size": "256x256", "num_inference_steps": 200, "n": 4, "seed": 1}
    a = httpx.post(url + GEN, json=long, headers=ASYNC, timeout=10)
    assert a.status_code == 202, a.text
    assert a.headers["location"] == f"{JOBS}/{a.json()['id']}"
    a_id = a.json()["id"]
    deadline = time.monotonic() + 60
    while _job(url, a_id)["progress"]["step"] < 1:
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.02)
    short_ids = []
    for i in range(4):
        r = httpx.post(
            url + GEN, json={"prompt": f"cat {i}", "size": "64x64", "num_inference_steps": 4, "seed": 10 + i},
            headers=ASYNC, timeout=10,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued" and r.json()["queue_position"] == i + 1
        short_ids.append(r.json()["id"])
    assert metric(url, "diffusion_demand_requests") == 5  # 4 waiting + 1 running now
    # the autoscalers' signal: request-seconds of demand, growing at 5 per second while the 5 stay (the long
    # job runs 200 steps); bounds from the client's clock around the two scrapes
    t0 = time.monotonic()
    first = metric(url, "diffusion_demand_request_seconds_total")
    t1 = time.monotonic()
    time.sleep(0.5)
    t2 = time.monotonic()
    second = metric(url, "diffusion_demand_request_seconds_total")
    t3 = time.monotonic()
    assert metric(url, "diffusion_demand_requests") == 5
    assert 5 * (t2 - t1) <= second - first <= 5 * (t3 - t0), (first, second, t0, t1, t2, t3)
    assert metric(url, "diffusion_queue_depth") == 4
    running = _job(url, a_id)
    assert running["status"] == "running" and running["progress"]["total_steps"] == 200

    # cancel the running job: it stops at its next step and the next job gets the pipeline
    seen = _job(url, a_id)["progress"]["step"]
    d = httpx.delete(f"{url}{JOBS}/{a_id}", timeout=30)
    assert d.status_code == 200, d.text
    cancelled = d.json()
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"] is True
    progress = cancelled["progress"]
    assert (
        seen
        <= progress["cancel_requested_at_step"]
        <= progress["step"]
        <= progress["cancel_requested_at_step"] + 1
    )
    assert progress["step"] < progress["total_steps"]
    assert "cancelled" in cancelled["error"]["message"] and cancelled["result"] is None

    last_pos = {j: i + 1 for i, j in enumerate(short_ids)}
    done: dict[str, dict] = {}
    deadline = time.monotonic() + 120
    while len(done) < len(short_ids):
        assert time.monotonic() < deadline, f"jobs not done: {set(short_ids) - set(done)}"
        for j in short_ids:
            if j in done:
                continue
            st = _job(url, j)
            if st["status"] == "queued":
                assert st["queue_position"] <= last_pos[j], "a waiting job's position went up"
                last_pos[j] = st["queue_position"]
            elif st["status"] in ("succeeded", "failed", "cancelled"):
                done[j] = st
        time.sleep(0.02)
    for j in short_ids:
        st = done[j]
        assert st["status"] == "succeeded", st
        assert st["progress"] == {"step": 4, "total_steps": 4, "cancel_requested_at_step": None}
        res = st["result"]
        assert res["size"] == "64x64" and res["num_inference_steps"] == 4 and len(res["data"]) == 1
        decode(res["data"][0]["b64_json"], "png")
    # a finished job is still readable; deleting it changes nothing
    again = httpx.delete(f"{url}{JOBS}/{short_ids[0]}", timeout=10).json()
    assert again["status"] == "succeeded" and again["result"] is not None
    assert metric(url, "diffusion_jobs_total", endpoint="generations", status="cancelled") >= 1
    assert metric(url, "diffusion_jobs_total", endpoint="generations", status="succeeded") >= 4
    assert metric(url, "diffusion_demand_requests") == 0
    idle = metric(url, "diffusion_demand_request_seconds_total")
    time.sleep(0.2)
    assert metric(url, "diffusion_demand_request_seconds_total") == idle  # no demand, no growth


def test_async_edit_job_and_queued_cancel(api_server, source_png):
    url = api_server.url
    long = {"prompt": "a long one", "size": "256x256", "num_inference_steps": 200, "n": 4, "seed": 1}
    a = httpx.post(url + GEN, json=long, headers=ASYNC, timeout=10).json()
    e = httpx.post(
        url + EDITS, files={"image": ("in.png", source_png, "image/png")},
        data={"prompt": "a blue house", "num_inference_steps": "4", "seed": "3"}, headers=ASYNC, timeout=10,
    )  # fmt: skip
    assert e.status_code == 202, e.text
    assert e.json()["endpoint"] == "edits" and e.json()["status"] == "queued"
    q = httpx.post(url + GEN, json={"prompt": "never", "size": "64x64"}, headers=ASYNC, timeout=10).json()
    gone = httpx.delete(f"{url}{JOBS}/{q['id']}", timeout=10).json()
    assert gone["status"] == "cancelled" and gone["progress"]["step"] == 0  # left the queue unrun
    assert gone["progress"]["cancel_requested_at_step"] == 0
    httpx.delete(f"{url}{JOBS}/{a['id']}", timeout=30)
    deadline = time.monotonic() + 60
    while (st := _job(url, e.json()["id"]))["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert st["status"] == "succeeded", st
    assert st["progress"] == {
        "step": 3,
        "total_steps": 3,
        "cancel_requested_at_step": None,
    }  # strength 0.6 of 4: 4 - int(4 * 0.4) steps run
    decode(st["result"]["data"][0]["b64_json"], "png")


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []
    event = threading.Event()

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()
        type(self).event.set()

    def log_message(self, *args):
        pass


def test_webhook_on_loopback_receives_the_result(api_server):
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        r = httpx.post(
            api_server.url + GEN,
            json={"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "seed": 4,
                  "webhook": f"http://127.0.0.1:{port}/done"},
            headers=ASYNC, timeout=10,
        )  # fmt: skip
        assert r.status_code == 202, r.text
        assert _Hook.event.wait(60), "no webhook delivery"
        payload = _Hook.received[0]
        assert payload["id"] == r.json()["id"] and payload["status"] == "succeeded"
        assert payload["result"]["seed"] == 4
        decode(payload["result"]["data"][0]["b64_json"], "png")
        deadline = time.monotonic() + 10
        while metric(api_server.url, "diffusion_webhook_deliveries_total", result="delivered") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()


class _SyncHook(_Hook):
    received: list[dict] = []
    event = threading.Event()


def test_webhook_of_a_sync_request_receives_the_images_response(api_server):
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _SyncHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = httpx.post(
            api_server.url + GEN,
            json={"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "seed": 5,
                  "webhook": f"http://127.0.0.1:{port}/done"},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert _SyncHook.event.wait(60), "no webhook delivery"
        payload = _SyncHook.received[0]
        assert payload["object"] == "image.result" and payload["id"] is None
        assert payload["endpoint"] == "generations" and payload["status"] == "succeeded"
        assert payload["result"]["seed"] == 5 and payload["result"]["size"] == "64x64"
        assert payload["result"]["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- bad input


def _edit(url: str, files: dict, data: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(url + EDITS, files=files, data=data or {"prompt": "a dog"}, timeout=120, **kw)


def test_non_image_upload_is_400(api_server):
    r = _edit(api_server.url, {"image": ("notes.png", b"this is not an image at all", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert "not a readable PNG, JPEG or WebP" in r.json()["error"]["message"]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    r = _edit(api_server.url, {"image": ("a.gif", gif.getvalue(), "image/gif")})
    assert r.status_code == 400 and "GIF images are not accepted" in r.json()["error"]["message"]
    assert_alive(api_server.url)


def test_50_mb_upload_is_413_before_it_is_read(api_server):
    big = b"\0" * (50 * 1000 * 1000)
    r = _edit(api_server.url, {"image": ("big.png", big, "image/png")})
    assert r.status_code == 413, r.text
    assert "exceeds" in r.json()["error"]["message"] and "max_upload_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the bound applies while streaming
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        for _ in range(50):
            yield b"\0" * 1_000_000
        yield b"\r\n" + boundary + b"--\r\n"

    r = httpx.post(
        api_server.url + EDITS, content=chunks(), timeout=120,
        headers={"content-type": "multipart/form-data; boundary=b0undary"},
    )  # fmt: skip
    assert r.status_code == 413, r.text
    assert metric(api_server.url, "diffusion_requests_total", endpoint="edits", status="413") >= 2
    assert_alive(api_server.url)


def test_mask_of_another_size_is_400(api_server, source_png):
    mask = png_bytes(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    r = _edit(
        api_server.url,
        {"image": ("in.png", source_png, "image/png"), "mask": ("mask.png", mask, "image/png")},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    assert "32x32 does not match the image's 64x64" in r.json()["error"]["message"]
    assert_alive(api_server.url)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_unknown_job_is_404_with_reason(api_server, method):
    r = httpx.request(method, f"{api_server.url}{JOBS}/imgjob_nope", timeout=10)
    assert r.status_code == 404
    assert "not known to this pod" in r.json()["error"]["message"]
    assert_alive(api_server.url)


@pytest.mark.parametrize(
    "kwargs, status, needle",
    [
        ({"json": {"prompt": "a"}}, 415, "multipart/form-data"),
        ({"data": {"prompt": "a"}}, 415, "multipart/form-data"),  # urlencoded
        ({"files": {"mask": ("m.png", b"x", "image/png")}, "data": {"prompt": "a"}}, 400, "image: required"),
        ({"files": {"image": ("a.png", b"x", "image/png")}, "data": {"prompt": ""}}, 400, "prompt"),
        ({"files": {"image": ("a.png", b"x", "image/png")}, "data": {"prompt": "a", "n": "9"}}, 400, "n:"),
        ({"files": {"image": ("a.png", b"x", "image/png")}, "data": {"prompt": "a", "strength": "0"}}, 400, "strength"),
        ({"files": {"image": ("a.png", b"x", "image/png")}, "data": {"prompt": "a", "extra": "1"}}, 400, "extra"),
        ({"files": [("image", ("a.png", b"x", "image/png")), ("image", ("b.png", b"y", "image/png"))],
          "data": {"prompt": "a"}}, 400, "one image per request"),
    ],
)  # fmt: skip
def test_bad_edit_requests_are_4xx_naming_the_field(api_server, kwargs, status, needle):
    r = httpx.post(api_server.url + EDITS, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"], r.json()


def test_generation_with_wrong_media_type_is_415(api_server):
    r = httpx.post(
        api_server.url + GEN, content=b"prompt=a", headers={"content-type": "text/plain"}, timeout=10
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


# ---------------------------------------------------------------- serve --model without a config


def test_serve_without_config_warms_up_small_on_cpu_and_logs_the_plan(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffusion_runtime", "serve", "--model", str(tiny_model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--device", "cpu"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(60)
    text = log.read_text()
    assert "warmup plan: 256x256 x 4 steps, from the cpu defaults (no --config)" in text, text
    assert "warmup 1/1: 256x256, 4 steps" in text and "warmup 1/1: 256x256 done in" in text
