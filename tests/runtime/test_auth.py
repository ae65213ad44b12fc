"""API keys against a real `diffusion-runtime serve` on the tiny model, through the official `openai`
client: the right key works, a wrong or missing one is `openai.AuthenticationError` (401, OpenAI's
error body), a job or url result is another key's 404, a key file rewritten in place or swapped the
way the kubelet swaps a projected Secret takes effect without a restart, and the metrics and the log
carry key names, never keys. /health, /ready and /metrics stay open.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import openai
import pytest
from fixtures_runtime import start_runtime
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"
JOBS = "/v1/images/jobs"
KEYS = {"team-a": "sk-team-a-0123456789abcdef", "team-b": "sk-team-b-fedcba9876543210"}
SMALL = {"size": "64x64", "extra_body": {"num_inference_steps": 2, "seed": 1}}


def write_atomic(folder: Path, name: str, value: str) -> None:
    """What the kubelet does to a projected volume: new file, then a rename over the old name."""
    tmp = folder / f"..tmp-{name}"
    tmp.write_text(value + "\n")
    os.replace(tmp, folder / name)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("api-keys")
    for name, key in KEYS.items():
        write_atomic(folder, name, key)
    (folder / "..data").mkdir()  # the kubelet's own entries are not keys
    return folder


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, keys_dir):
    rp = start_runtime(
        tiny_model_dir, tmp_path_factory.mktemp("auth"),
        server={"auth_keys_dir": str(keys_dir), "max_steps": 50},
    )  # fmt: skip
    yield rp
    rp.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_right_key_works_wrong_or_missing_key_is_authentication_error(server):
    r = client(server, KEYS["team-a"]).images.generate(prompt="a cat", **SMALL)
    assert r.data[0].b64_json
    assert [m.id for m in client(server, KEYS["team-b"]).models.list().data]

    with pytest.raises(openai.AuthenticationError) as e:
        client(server, "sk-not-a-key").images.generate(prompt="a cat", **SMALL)
    assert e.value.status_code == 401
    body = e.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key", body
    assert body["type"] == "invalid_request_error"
    assert "sk-not-a-key" not in e.value.message  # never echoed
    assert e.value.response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-not-a-key").models.list()
    with pytest.raises(openai.AuthenticationError):  # a key that is another key's prefix
        client(server, KEYS["team-a"][:-1]).models.list()

    # no Authorization header at all (the openai client always sends one)
    for method, path in (("POST", GEN), ("GET", "/v1/models"), ("GET", JOBS + "/x"), ("DELETE", JOBS + "/x")):
        r = httpx.request(method, server.url + path, json={"prompt": "a cat"}, timeout=30)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic x"}).status_code == 401


def test_health_ready_metrics_and_openapi_need_no_key(server):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    assert httpx.get(server.metrics_url, timeout=10).status_code == 200
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API key (docs/security.md).",
    }  # fmt: skip
    for path, item in doc["paths"].items():
        for op in item.values():
            if path.startswith("/v1/"):
                assert op["security"] == [{"bearerAuth": []}] and "401" in op["responses"], path
            else:
                assert "security" not in op, path


def test_a_job_is_only_its_keys(server):
    a, b = auth(KEYS["team-a"]), auth(KEYS["team-b"])
    r = httpx.post(
        server.url + GEN, headers={**a, "Prefer": "respond-async"}, timeout=60,
        json={"prompt": "a cat", "size": "64x64", "num_inference_steps": 30},
    )  # fmt: skip
    assert r.status_code == 202, r.text
    job = r.json()["id"]

    with pytest.raises(openai.NotFoundError):  # key B: the same 404 as an unknown job
        client(server, KEYS["team-b"]).get(f"/images/jobs/{job}", cast_to=object)
    unknown = httpx.get(f"{server.url}{JOBS}/imgjob_unknown", headers=b, timeout=10)
    as_b = httpx.get(f"{server.url}{JOBS}/{job}", headers=b, timeout=10)
    assert as_b.status_code == unknown.status_code == 404
    assert as_b.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
        "imgjob_unknown", job
    )
    cancel = httpx.delete(f"{server.url}{JOBS}/{job}", headers=b, timeout=10)
    assert cancel.status_code == 404, cancel.text
    assert httpx.get(f"{server.url}{JOBS}/{job}", timeout=10).status_code == 401

    deadline = time.monotonic() + 120
    while True:  # key A sees it, never cancelled, through to success
        view = client(server, KEYS["team-a"]).get(f"/images/jobs/{job}", cast_to=object)
        assert isinstance(view, dict) and view["cancel_requested"] is False, view
        if view["status"] == "succeeded":
            break
        assert view["status"] in ("queued", "running"), view
        assert time.monotonic() < deadline, view
        time.sleep(0.2)

    # url results: the creating key only
    r = client(server, KEYS["team-a"]).images.generate(prompt="a cat", response_format="url", **SMALL)
    url = r.data[0].url
    assert url and url.startswith(server.url + "/v1/images/results/")
    assert httpx.get(url, headers=a, timeout=10).content.startswith(b"\x89PNG")
    assert httpx.get(url, headers=b, timeout=10).status_code == 404
    assert httpx.get(url, timeout=10).status_code == 401


def test_rotation_by_rewriting_the_file_needs_no_restart(server, keys_dir):
    pid = server.proc.pid
    old, new = "sk-rotating-old-111111", "sk-rotating-new-222222"
    write_atomic(keys_dir, "rotating", old)  # a key added while serving
    assert client(server, old).models.list().data

    write_atomic(keys_dir, "rotating", new)  # the kubelet's swap
    assert client(server, new).images.generate(prompt="a cat", **SMALL).data
    with pytest.raises(openai.AuthenticationError):
        client(server, old).models.list()

    newer = "sk-rotating-in-place-3333"  # written in place (another size: seen even within one mtime tick)
    (keys_dir / "rotating").write_text(newer)
    assert client(server, newer).models.list().data
    with pytest.raises(openai.AuthenticationError):
        client(server, new).models.list()

    (keys_dir / "rotating").unlink()  # a key removed
    with pytest.raises(openai.AuthenticationError):
        client(server, newer).models.list()
    assert client(server, KEYS["team-a"]).models.list().data  # the others untouched
    assert server.proc.poll() is None and server.proc.pid == pid
    assert "api keys reloaded" in server.log()


def test_metrics_and_log_carry_the_key_name_never_the_key(server):
    client(server, KEYS["team-b"]).images.generate(prompt="a cat", **SMALL)
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong-for-metrics").images.generate(prompt="a cat", **SMALL)
    text = httpx.get(server.metrics_url, timeout=10).text
    counted: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "diffusion_requests_total":
                counted[(s.labels["key"], s.labels["status"])] = s.value
    assert counted[("team-b", "200")] >= 1, counted
    assert counted[("team-a", "200")] >= 1 and counted[("team-a", "202")] >= 1, counted
    assert counted[("", "401")] >= 1, counted  # no valid key: no name
    log = server.log()
    assert "team-a" in log and "invalid API key" in log
    for secret in (*KEYS.values(), "sk-wrong-for-metrics", "sk-rotating"):
        assert secret not in text, secret
        assert secret not in log, secret


@pytest.mark.parametrize(("make", "message"), [(False, "cannot read"), (True, "no key file")])
def test_a_keys_folder_missing_or_without_keys_stops_the_server(tiny_model_dir, tmp_path, make, message):
    folder = tmp_path / "keys"
    if make:
        folder.mkdir()
        (folder / "..data").mkdir()
    rp = start_runtime(tiny_model_dir, tmp_path / "rt", server={"auth_keys_dir": str(folder)}, wait=False)
    assert rp.wait_exit(120) == 2
    assert f"diffusion-runtime: server.auth_keys_dir: {message}" in rp.log(), rp.log_tail()
