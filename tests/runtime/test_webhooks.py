"""Webhooks against a real `diffusion-runtime serve` on the tiny model: the destination fence, Standard
Webhooks signatures checked with the `standardwebhooks` package, retries and failures, by real
receivers. Only loopback traffic: the server allows 127.0.0.2/32 (its receivers listen there); a
trap listener on 127.0.0.1, which is not allowed, counts every connection it gets and must get none.
169.254.169.254 is refused at submission, before any connection is made.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from fixtures_runtime import start_runtime
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"
ASYNC = {"Prefer": "respond-async"}
SECRET = "whsec_" + base64.b64encode(b"diffusion-operator webhook test secret").decode()
ALLOWED = "127.0.0.2"  # loopback, allowed by the server's webhook_allow
SERVER = {
    "webhook_allow": [f"{ALLOWED}/32"],
    "webhook_attempts": 3,
    "webhook_backoff_seconds": 0.05,
    "webhook_backoff_max_seconds": 0.2,
    "webhook_timeout_seconds": 1.0,
}
JOB = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "seed": 7}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        srv: Receiver = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers["content-length"]))
        with srv.lock:
            srv.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = srv.statuses[min(len(srv.received), len(srv.statuses)) - 1]
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", srv.location)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver answering `statuses` in turn (the last one repeated); counts connections."""

    def __init__(self, host: str, statuses: tuple[int, ...] = (204,), location: str = ""):
        super().__init__((host, 0), _Handler)
        self.statuses, self.location = statuses, location
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.connections = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.lock:
            self.connections += 1
        return True

    def url(self, path: str = "/hook") -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def hook_server(tiny_model_dir, tmp_path_factory):
    rp = start_runtime(
        tiny_model_dir, tmp_path_factory.mktemp("webhooks"), server=SERVER,
        extra_env={"DIFFUSION_WEBHOOK_SECRET": SECRET},
    )  # fmt: skip
    yield rp
    rp.stop()


@pytest.fixture
def trap():
    """A loopback listener the server must never reach (127.0.0.1 is not allowed)."""
    t = Receiver("127.0.0.1")
    yield t
    t.close()
    assert t.connections == 0 and t.received == [], "a refused destination was reached"


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(*statuses: int, location: str = "") -> Receiver:
        made.append(Receiver(ALLOWED, statuses or (204,), location))
        return made[-1]

    yield make
    for r in made:
        r.close()


def deliveries(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "diffusion_webhook_deliveries_total":
                out[s.labels["result"]] = s.value
    return out


def wait_for(
    url: str, before: dict[str, float], result: str, n: int = 1, timeout: float = 60
) -> dict[str, float]:
    """Wait until the counter of `result` grew by n; the other counters' growth."""
    deadline = time.monotonic() + timeout
    while True:
        now = deliveries(url)
        if now.get(result, 0) - before.get(result, 0) >= n:
            return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
        assert time.monotonic() < deadline, f"{result} never counted: {before} -> {now}"
        time.sleep(0.05)


def submit(url: str, webhook: str, sync: bool = False) -> httpx.Response:
    headers = {} if sync else ASYNC
    return httpx.post(url + GEN, json={**JOB, "webhook": webhook}, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("target", "rule"),
    [
        ("http://127.0.0.1:{port}/x", "resolves to 127.0.0.1, a loopback address"),
        ("http://localhost:{port}/x", "a loopback address"),  # a name that resolves to loopback
        ("http://[::1]:{port}/x", "resolves to ::1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254, a link-local address"),
        ("https://10.0.0.1/x", "resolves to 10.0.0.1, a private (RFC 1918) address"),
    ],
)
def test_refused_destinations_are_a_400_at_submission_and_never_reached(hook_server, trap, target, rule):
    url = target.format(port=trap.server_address[1])
    before = deliveries(hook_server.url)
    for sync in (False, True):
        r = submit(hook_server.url, url, sync=sync)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "webhook" and err["type"] == "invalid_request_error"
        assert rule in err["message"] and "allow it in server.webhook_allow" in err["message"], err
        assert err["message"].startswith(f"webhook {url} ")
    assert wait_for(hook_server.url, before, "refused", 2) == {"refused": 2}
    time.sleep(0.2)  # nothing was queued, nothing is on its way


def test_an_allowed_receiver_gets_a_signed_delivery(hook_server, receivers):
    rec = receivers(204)
    before = deliveries(hook_server.url)
    r = submit(hook_server.url, rec.url())
    assert r.status_code == 202, r.text
    assert wait_for(hook_server.url, before, "delivered") == {"delivered": 1}
    [(headers, body)] = rec.received
    payload = Webhook(SECRET).verify(body, headers)  # the standardwebhooks package accepts it
    assert payload["id"] == r.json()["id"] and payload["status"] == "succeeded"
    assert (
        headers["webhook-id"].startswith("msg_") and abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    )
    assert headers["host"] == f"{ALLOWED}:{rec.server_address[1]}"


def test_the_sync_request_webhook_is_fenced_and_signed(hook_server, receivers):
    rec = receivers(200)
    before = deliveries(hook_server.url)
    r = submit(hook_server.url, rec.url(), sync=True)
    assert r.status_code == 200, r.text
    assert wait_for(hook_server.url, before, "delivered") == {"delivered": 1}
    [(headers, body)] = rec.received
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["object"] == "image.result" and payload["status"] == "succeeded"
    assert payload["result"]["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]


def test_a_redirect_is_not_followed(hook_server, receivers, trap):
    rec = receivers(302, location=trap.url("/internal-admin"))
    before = deliveries(hook_server.url)
    assert submit(hook_server.url, rec.url()).status_code == 202
    assert wait_for(hook_server.url, before, "failed") == {"failed": 1}  # a 3xx fails, not retried
    assert len(rec.received) == 1
    assert "302 (redirects are not followed)" in hook_server.log()


def test_500_twice_then_200_is_one_delivery_on_the_third_attempt(hook_server, receivers):
    rec = receivers(500, 500, 200)
    before = deliveries(hook_server.url)
    assert submit(hook_server.url, rec.url()).status_code == 202
    assert wait_for(hook_server.url, before, "delivered") == {"retried": 2, "delivered": 1}
    assert len(rec.received) == 3
    assert len({h["webhook-id"] for h, _ in rec.received}) == 1  # one message, three attempts
    for headers, body in rec.received:
        Webhook(SECRET).verify(body, headers)


def test_a_4xx_is_not_retried_and_429_is(hook_server, receivers):
    rec = receivers(404)
    before = deliveries(hook_server.url)
    assert submit(hook_server.url, rec.url()).status_code == 202
    assert wait_for(hook_server.url, before, "failed") == {"failed": 1}
    assert len(rec.received) == 1
    rec = receivers(429)
    before = deliveries(hook_server.url)
    assert submit(hook_server.url, rec.url()).status_code == 202
    assert wait_for(hook_server.url, before, "failed") == {"retried": 2, "failed": 1}
    assert len(rec.received) == 3  # webhook_attempts


def test_timeouts_and_unreachable_receivers_end_in_the_failure_counter(hook_server):
    silent = socket.socket()
    silent.bind((ALLOWED, 0))
    silent.listen(16)  # connections complete in the backlog; nobody ever answers
    closed = socket.socket()
    closed.bind((ALLOWED, 0))  # bound, not listening: connection refused
    try:
        for sock in (silent, closed):
            before = deliveries(hook_server.url)
            port = sock.getsockname()[1]
            assert submit(hook_server.url, f"http://{ALLOWED}:{port}/hook").status_code == 202
            assert wait_for(hook_server.url, before, "failed") == {"retried": 2, "failed": 1}
        log = hook_server.log()
        assert "timed out" in log and "ConnectionRefusedError" in log
    finally:
        silent.close()
        closed.close()


def test_no_secret_means_unsigned_deliveries(tiny_model_dir, tmp_path, receivers):
    rp = start_runtime(tiny_model_dir, tmp_path / "unsigned", server={"webhook_allow": [ALLOWED]})
    try:
        rec = receivers(204)
        assert submit(rp.url, rec.url(), sync=True).status_code == 200
        wait_for(rp.url, {}, "delivered")
        [(headers, body)] = rec.received
        assert "webhook-signature" not in headers and headers["webhook-id"].startswith("msg_")
        assert json.loads(body)["object"] == "image.result"
    finally:
        rp.stop()


def test_a_malformed_secret_stops_the_server(tiny_model_dir, tmp_path):
    rp = start_runtime(
        tiny_model_dir,
        tmp_path / "bad-secret",
        wait=False,
        extra_env={"DIFFUSION_WEBHOOK_SECRET": "whsec_no!"},
    )
    try:
        assert rp.wait_exit(120) != 0
        assert "DIFFUSION_WEBHOOK_SECRET is not a Standard Webhooks secret" in rp.log()
    finally:
        rp.stop(timeout=10)
