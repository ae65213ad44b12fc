"""Address ranges that are not public, with what each is: the webhook fence refuses them unless
`server.webhook_allow` lists them (`api/webhooks.py`), and the operator's NetworkPolicy leaves them out
of its public egress (`builders/networkpolicy.py`). Torch-free."""

from __future__ import annotations

# (network, what it is), most specific reasons first; anything else that Python's `ipaddress` does not
# call global is "reserved" for the fence
NON_PUBLIC: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
    ("::/128", "unspecified"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("fc00::/7", "private (unique local, fc00::/7)"),
    ("100.64.0.0/10", "shared (carrier-grade NAT, 100.64.0.0/10)"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
