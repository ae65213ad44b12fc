"""A bounded closed-loop load on the image API (the autoscaling test and `bench/autoscale.py`).

Each client sends one request after another until stopped. A 429 or 503 with `Retry-After` is
retried after the advised wait (capped), as the API asks clients to do; anything else is a lost
request and recorded with its reason. Every request ends as a 200 or as a failure: the counts say
how many were answered, how many needed retries and how many were lost.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from email.message import Message

DEFAULT_BODY = {"prompt": "a lighthouse at dusk", "size": "64x64", "seed": 3, "num_inference_steps": 8}


def post(url: str, body: dict, timeout: float) -> tuple[int, Message, bytes]:
    """One POST; (status, headers, body), status 0 when the connection failed (refused, reset).
    The headers are looked up case-insensitively (servers send `retry-after` in lower case)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, Message(), repr(exc).encode()


@dataclass(eq=False)
class ClosedLoopLoad:
    url: str
    clients: int = 4
    body: dict = field(default_factory=lambda: dict(DEFAULT_BODY))
    timeout: float = 120.0
    max_retries: int = 60
    max_retry_wait: float = 2.0
    think: float = 0.0  # seconds a client waits after each answered request (0: the next one at once)
    counts: Counter = field(default_factory=Counter)  # "200", "429 retried", "503 retried", "lost"
    failures: list[str] = field(default_factory=list)
    started_at: float = 0.0
    stopped_at: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _count(self, key: str, failure: str = "") -> None:
        with self._lock:
            self.counts[key] += 1
            if failure:
                self.failures.append(failure)

    def _client(self) -> None:
        while not self._stop.is_set():
            for _ in range(self.max_retries):
                code, headers, body = post(self.url, self.body, self.timeout)
                if code == 200:
                    self._count("200")
                    self._stop.wait(self.think)
                    break
                retry_after = headers.get("Retry-After")
                if code in (429, 503) and retry_after:
                    self._count(f"{code} retried")
                    time.sleep(min(float(retry_after), self.max_retry_wait))
                    continue
                self._count("lost", f"{code}: {body[:200]!r}")
                break
            else:
                self._count("lost", f"still refused after {self.max_retries} retries")

    def start(self) -> ClosedLoopLoad:
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for th in self._threads:
            th.start()
        return self

    def stop(self, join_timeout: float = 150.0) -> None:
        """Stop sending; requests in flight finish (their answers are counted)."""
        self._stop.set()
        for th in self._threads:
            th.join(join_timeout)
        self.stopped_at = time.monotonic()

    def summary(self) -> str:
        return ", ".join(f"{n} x {k}" for k, n in sorted(self.counts.items())) or "no requests"
