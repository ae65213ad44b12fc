"""Webhook units: the address classifier, the fence (hosts, CIDRs, the rule a refusal names), Standard
Webhooks signatures verified by the `standardwebhooks` package, the backoff, and the CR fields
(spec.server.webhookAllow -> runtime.yaml, spec.server.webhookSecretRef -> DIFFUSION_WEBHOOK_SECRET).
Nothing here opens a socket except name resolution of `localhost`."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import socket
import threading

import pytest
import yaml
from diffusion_runtime.api.webhooks import Delivery, Fence, Refused, classify, load_secret, sign
from diffusion_runtime.contract.config import ConfigError, config_from_dict, validate
from standardwebhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "'this network' (0.0.0.0/8)"),
        ("0.1.2.3", "'this network' (0.0.0.0/8)"),
        ("::", "unspecified"),
        ("10.1.2.3", "private (RFC 1918)"),
        ("172.16.0.1", "private (RFC 1918)"),
        ("172.31.255.255", "private (RFC 1918)"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("fd00::1", "private (unique local, fc00::/7)"),
        ("100.64.0.1", "shared (carrier-grade NAT, 100.64.0.0/10)"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),  # TEST-NET-1: documentation, not global
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("172.32.0.1", None),  # just outside 172.16/12
        ("100.128.0.1", None),  # just outside 100.64/10
        ("2606:4700:4700::1111", None),
    ],
)
def test_classify(address, what):
    assert classify(address) == what


def test_a_refusal_names_the_address_the_rule_and_the_setting():
    with pytest.raises(Refused) as e:
        Fence([]).check("http://127.0.0.1:9/x")
    assert str(e.value) == (
        "webhook http://127.0.0.1:9/x resolves to 127.0.0.1, a loopback address; allow it in server.webhook_allow"
    )
    with pytest.raises(Refused, match="169.254.169.254, a link-local address"):
        Fence([]).check("http://169.254.169.254/latest/meta-data")
    with pytest.raises(Refused, match="a loopback address"):
        Fence([]).check("http://localhost:9/x")  # after resolution
    with pytest.raises(Refused, match="a loopback address"):
        Fence([]).check("http://0x7f000001:9/x")  # a spelling of 127.0.0.1 that getaddrinfo accepts
    with pytest.raises(Refused, match="does not resolve"):
        Fence([]).check("https://" + "0" * 3000)  # a label too long to encode (found by the fuzzer)
    with pytest.raises(Refused, match="does not resolve"):
        Fence([]).check("http://a..b/")
    with pytest.raises(Refused, match="only http:// and https://"):
        Fence([]).check("ftp://example.com/x")


def test_allowed_networks_and_hosts():
    fence = Fence(["127.0.0.1/32", "10.0.0.0/8"])
    fence.check("http://127.0.0.1:9/x")
    fence.check("http://10.2.3.4/x")
    with pytest.raises(Refused, match="127.0.0.2, a loopback address"):
        fence.check("http://127.0.0.2:9/x")
    with pytest.raises(Refused, match="192.168.0.1"):
        fence.check("http://192.168.0.1/")
    addresses = {i[4][0] for i in socket.getaddrinfo("localhost", 9, type=socket.SOCK_STREAM)}
    Fence(["localhost"]).check("http://LOCALHOST:9/x")  # a host name allows whatever it resolves to
    Fence(["127.0.0.0/8", "::1/128"]).check("http://localhost:9/x")
    if "::1" in addresses:  # every address is checked: 127.0.0.1 allowed, ::1 not
        with pytest.raises(Refused, match="::1, a loopback"):
            Fence(["127.0.0.0/8"]).check("http://localhost:9/x")


def test_signatures_verify_with_the_standardwebhooks_package():
    key = load_secret(SECRET)
    assert key == b"0123456789abcdef0123456789abcdef"
    assert load_secret(SECRET.removeprefix("whsec_")) == key
    assert load_secret(None) is None and load_secret("") is None
    with pytest.raises(ValueError, match="DIFFUSION_WEBHOOK_SECRET"):
        load_secret("whsec_not base64!")
    body = json.dumps({"id": "imgjob_1", "status": "succeeded"}).encode()
    headers = Delivery(Fence([]), key).headers("msg_1", body)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-signature"] == sign(key, "msg_1", int(headers["webhook-timestamp"]), body)
    assert Webhook(SECRET).verify(body, headers) == {"id": "imgjob_1", "status": "succeeded"}
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook(SECRET).verify(body + b" ", headers)
    assert "webhook-signature" not in Delivery(Fence([]), None).headers("msg_1", body)  # no secret: unsigned


def test_backoff_is_full_jitter_capped():
    d = Delivery(Fence([]), None, backoff_base=1.0, backoff_max=4.0)
    for attempt in range(8):
        for _ in range(50):
            assert 0 <= d.backoff(attempt) <= min(4.0, 2**attempt)


def test_the_settings_are_checked():
    with pytest.raises(ConfigError, match="server.webhook_attempts"):
        validate(config_from_dict({"model": {"uri": "/m"}, "server": {"webhook_attempts": 0}}))
    with pytest.raises(ConfigError, match="server.webhook_allow"):
        validate(config_from_dict({"model": {"uri": "/m"}, "server": {"webhook_allow": [" "]}}))
    for bad in ("10.0.0.0/33", "hooks/internal", "http://hooks.internal", "a b"):
        with pytest.raises(ConfigError, match="server.webhook_allow.*neither an address"):
            validate(config_from_dict({"model": {"uri": "/m"}, "server": {"webhook_allow": [bad]}}))
    ok = ["10.0.0.0/8", "fd00::/8", "127.0.0.1", "hooks.internal", "receiver.ns.svc.cluster.local."]
    assert validate(
        config_from_dict({"model": {"uri": "/m"}, "server": {"webhook_allow": ok}})
    ).server.webhook_allow
    cfg = validate(config_from_dict({"model": {"uri": "/m"}}))
    assert cfg.server.webhook_allow == [] and cfg.server.webhook_attempts == 5


def test_the_cr_fields_render_into_runtime_yaml_and_the_secret_reference():
    from diffusion_operator import builders, validation

    spec = {
        "model": {"uri": "/models/tiny"},
        "gpu": {"count": 0},
        "server": {"webhookAllow": ["10.0.0.0/8", "hooks.internal"], "webhookSecretRef": {"name": "hooks"}},
    }
    parsed = validation.parse("tiny", "ns", spec)
    assert parsed.ok and parsed.cr is not None, parsed.errors
    owner = {"metadata": {"name": "tiny", "uid": "u"}}
    text = builders.build_configmap(parsed.cr, owner)["data"]["runtime.yaml"]
    runtime = yaml.safe_load(text)
    assert runtime["server"]["webhook_allow"] == ["10.0.0.0/8", "hooks.internal"]
    assert "webhook_secret" not in text and "hooks\n" not in text  # the Secret reaches only the env
    env = builders.deployment.build_env(parsed.cr)
    assert {
        "name": "DIFFUSION_WEBHOOK_SECRET",
        "valueFrom": {"secretKeyRef": {"name": "hooks", "key": "secret"}},
    } in env
    assert validation.cr_field("server.webhook_allow") == "spec.server.webhookAllow"
    refused = validation.parse("tiny", "ns", {**spec, "server": {"webhookAllow": ["10.0.0.0/33"]}})
    assert [e.field for e in refused.errors] == ["spec.server.webhookAllow"], refused.errors
    unset = validation.parse("tiny", "ns", {**spec, "server": {}})
    assert unset.cr is not None
    text = builders.build_configmap(unset.cr, owner)["data"]["runtime.yaml"]
    # unset: the runtime's default, nothing allowed
    assert yaml.safe_load(text)["server"]["webhook_allow"] == []
    assert not [e for e in builders.deployment.build_env(unset.cr) if e["name"] == "DIFFUSION_WEBHOOK_SECRET"]


class _Trap(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        self.connections = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def verify_request(self, request, client_address):
        self.connections += 1
        return False  # counted, never served


_getaddrinfo = socket.getaddrinfo


def _resolving_to(address: str):
    """getaddrinfo with *.example names resolving to `address` (others as usual)."""

    def getaddrinfo(host, port, *args, **kwargs):
        if not str(host).endswith(".example"):
            return _getaddrinfo(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    return getaddrinfo


def test_delivery_resolves_again_and_refuses_a_rebound_name(monkeypatch):
    """Checked at submission as public, the name resolves to loopback at delivery: refused, no connection."""
    trap = _Trap()
    try:
        url = f"http://rebind.example:{trap.server_address[1]}/x"
        monkeypatch.setattr(socket, "getaddrinfo", _resolving_to("8.8.8.8"))
        Fence([]).check(url)  # the submission check passes
        monkeypatch.setattr(socket, "getaddrinfo", _resolving_to("127.0.0.1"))
        outcomes: list[str] = []
        ok = asyncio.run(Delivery(Fence([]), None).deliver(url, {"id": "j"}, outcomes.append))
        assert not ok and outcomes == ["refused"] and trap.connections == 0
    finally:
        trap.shutdown()
        trap.server_close()


def test_the_connected_peer_is_checked_before_anything_is_sent(monkeypatch):
    """Should the connection land elsewhere than the checked address, nothing is sent."""
    trap = _Trap()
    real = socket.create_connection
    try:
        monkeypatch.setattr(socket, "getaddrinfo", _resolving_to("8.8.8.8"))
        monkeypatch.setattr(
            socket,
            "create_connection",
            lambda addr, *a, **k: real(("127.0.0.1", trap.server_address[1]), *a, **k),
        )
        outcomes: list[str] = []
        url = f"http://public.example:{trap.server_address[1]}/x"
        assert not asyncio.run(Delivery(Fence([]), None).deliver(url, {"id": "j"}, outcomes.append))
        assert outcomes == ["refused"]
    finally:
        trap.shutdown()
        trap.server_close()
