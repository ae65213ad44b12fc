"""Webhook deliveries: a destination fence, Standard Webhooks signatures, bounded retries.

- **Fence**: a webhook URL is http(s); its host is resolved once and every address checked. Loopback,
  link-local (169.254.169.254 included), private, shared (100.64/10), unspecified, multicast and
  reserved addresses are refused unless `server.webhook_allow` names the host or a network that holds
  the address; public addresses are allowed. Checked at submission (400 naming the rule) and again
  at delivery, where the connection goes to the checked address (Host header and TLS SNI are the
  name's), and the connected peer is checked once more: no DNS rebinding. Redirects are not followed.
- **Signing** (https://www.standardwebhooks.com): `webhook-id`, `webhook-timestamp`,
  `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the secret of
  `DIFFUSION_WEBHOOK_SECRET` (`whsec_<base64>`); without it, deliveries are unsigned.
- **Retries**: 5xx, 429, timeouts and connection errors are retried up to `server.webhook_attempts`
  times in all, with exponential backoff and full jitter; the same `webhook-id` on every attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from diffusion_runtime.contract.networks import NON_PUBLIC

log = logging.getLogger("diffusion_runtime")

SECRET_ENV = "DIFFUSION_WEBHOOK_SECRET"
SECRET_PREFIX = "whsec_"
Outcome = Literal["delivered", "refused", "failed", "retried"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (network, what it is), most specific reasons first; anything else that is not global is "reserved"
_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what) for net, what in NON_PUBLIC
)


def classify(address: str | IPAddress) -> str | None:
    """What a non-public address is ("loopback", "link-local", ...), None for a public one."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for net, what in _REFUSED:
        if ip.version == net.version and ip in net:
            return what
    if not ip.is_global:
        return "reserved"
    return None


class Refused(Exception):
    """A webhook URL the fence does not allow; the message names the rule."""


class WebhookFailed(Exception):
    """One failed attempt; `retry` says whether another attempt may succeed."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str


def parse_allow(entries: list[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """server.webhook_allow -> (host names, networks); an entry that parses as an address/CIDR is one."""
    hosts, nets = set(), []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(e.strip(), strict=False))
        except ValueError:
            hosts.add(e.strip().lower().rstrip("."))
    return frozenset(hosts), tuple(nets)


class Fence:
    """Where webhooks may go: public addresses, plus the hosts and networks of server.webhook_allow."""

    def __init__(self, allow: list[str]):
        self.hosts, self.nets = parse_allow(allow)

    def target(self, url: str) -> Target:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise Refused(f"webhook {url}: {e}") from e
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused(f"webhook {url}: only http:// and https:// URLs with a host are delivered")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(
            url, parts.scheme, parts.hostname.lower().rstrip("."), port or (443 if parts.scheme == "https" else 80),
            path,
        )  # fmt: skip

    def check_address(self, target: Target, address: str) -> None:
        """Refused unless public, or the host / a network holding the address is allowed."""
        if target.host in self.hosts:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip.version == n.version and ip in n for n in self.nets):
            return
        what = classify(ip)
        if what is not None:
            raise Refused(
                f"webhook {target.url} resolves to {ip}, a {what} address; allow it in server.webhook_allow"
            )

    def resolve(self, target: Target) -> list[str]:
        """Every address of the host, each checked; the ones to connect to, in order."""
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as e:  # gaierror; an over-long label fails to encode
            raise Refused(f"webhook {target.url}: host {target.host[:255]!r} does not resolve ({e})") from e
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for a in addresses:
            self.check_address(target, a)
        return addresses

    def check(self, url: str) -> Target:
        """The submission check: parse, resolve, check every address (raises Refused)."""
        target = self.target(url)
        self.resolve(target)
        return target


def load_secret(value: str | None) -> bytes | None:
    """The HMAC key of `whsec_<base64>` (the prefix optional); None when unset or empty."""
    if not value or not value.strip():
        return None
    raw = value.strip()
    raw = raw[len(SECRET_PREFIX) :] if raw.startswith(SECRET_PREFIX) else raw
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(
            f"{SECRET_ENV} is not a Standard Webhooks secret (whsec_ followed by base64): {e}"
        ) from e


def secret_from_env() -> bytes | None:
    return load_secret(os.environ.get(SECRET_ENV))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, to_sign, hashlib.sha256).digest()).decode("ascii")


@dataclass
class Delivery:
    """The settings of delivery: the fence, the key (None: unsigned), attempts, backoff, timeout."""

    fence: Fence
    key: bytes | None
    attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    timeout: float = 10.0

    def headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        ts = int(time.time())
        h = {
            "content-type": "application/json",
            "user-agent": "diffusion-runtime",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
        }
        if self.key is not None:
            h["webhook-signature"] = sign(self.key, msg_id, ts, body)
        return h

    def post_once(self, target: Target, msg_id: str, body: bytes) -> int:
        """One attempt: resolve, check, connect to a checked address, check the peer, POST."""
        addresses = self.fence.resolve(target)  # Refused propagates: not retried
        errors = []
        for address in addresses:
            conn = _connection(target, address, self.timeout)
            try:
                conn.connect()
                assert conn.sock is not None
                self.fence.check_address(target, str(conn.sock.getpeername()[0]))
                conn.request("POST", target.path, body=body, headers=self.headers(msg_id, body))
                resp = conn.getresponse()
                resp.read(1 << 16)
                return int(resp.status)
            except Refused:
                raise
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{address}: {type(e).__name__}: {e}")
            finally:
                conn.close()
        raise WebhookFailed("; ".join(errors) or "no address", retry=True)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)] (attempt 0 is the first retry)."""
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    async def deliver(
        self, url: str, payload: dict[str, Any], on_outcome: Callable[[Outcome], None] | None = None
    ) -> bool:
        """POST `payload` to `url` with retries; outcomes reported (retried per retry, then one of
        delivered / failed / refused)."""

        def report(outcome: Outcome) -> None:
            if on_outcome is not None:
                on_outcome(outcome)

        body = json.dumps(payload).encode()
        msg_id = "msg_" + uuid.uuid4().hex
        what = f"webhook {url} ({msg_id}, job {payload.get('id')})"
        try:
            target = self.fence.target(url)
        except Refused as e:
            log.warning("%s refused: %s", what, e)
            report("refused")
            return False
        for attempt in range(self.attempts):
            try:
                status = await asyncio.to_thread(self.post_once, target, msg_id, body)
                if 200 <= status < 300:
                    report("delivered")
                    return True
                retry = status >= 500 or status == 429
                failure = f"answered {status}" + (
                    " (redirects are not followed)" if 300 <= status < 400 else ""
                )
            except Refused as e:
                log.warning("%s refused: %s", what, e)
                report("refused")
                return False
            except WebhookFailed as e:
                retry, failure = e.retry, str(e)
            except Exception as e:  # noqa: BLE001 - a receiver's failure is its own
                retry, failure = True, f"{type(e).__name__}: {e}"
            last = attempt + 1 >= self.attempts
            if not retry or last:
                log.warning("%s failed after %d attempt(s): %s", what, attempt + 1, failure)
                report("failed")
                return False
            delay = self.backoff(attempt)
            log.info("%s attempt %d %s; retrying in %.2fs", what, attempt + 1, failure, delay)
            report("retried")
            await asyncio.sleep(delay)
        return False  # not reached: the loop returns on its last attempt


def _connection(target: Target, address: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to `address` that speaks to the host by name: Host header and (https) SNI and
    certificate check are the name's."""
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)

    def create_connection(_addr: Any, timeout: Any = None, source_address: Any = None) -> socket.socket:
        return socket.create_connection((address, target.port), timeout, source_address)

    conn._create_connection = create_connection  # type: ignore[attr-defined]  # the checked address, not a new lookup
    return conn
