"""API keys on the real node, pods and all: `samples/tiny-cpu.yaml` with `spec.server.auth` naming a
Secret; the official `openai` client through the Service needs the key; editing the Secret rotates it
in the running pod (the kubelet refreshes the projected volume, the runtime re-reads the file): the
new key is accepted, the old one refused, the pod neither restarted nor replaced.

The kubelet writes a changed Secret into a projected volume on its next sync of the pod (up to its
sync period, 1 minute by default, plus its Secret cache's TTL), so the test waits up to 3 minutes and
prints how long it took.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import yaml
from diffusion_dev import wait_for
from test_cluster_realpods import (
    _apply,
    _dd_ready,
    _diagnose,
    _pods,
    _sample,
    operator_release,
    workload_ns,
)

pytestmark = pytest.mark.cluster
__all__ = ["operator_release", "workload_ns"]  # the fixtures, shared with the quickstart's module
OLD, NEW = "sk-real-pod-old-6f1c2a", "sk-real-pod-new-93be07"
SMALL = {"size": "64x64", "extra_body": {"num_inference_steps": 2, "seed": 1}}


def _secret(cluster, ns: str, value: str) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "api-keys"},
        "stringData": {"team-a": value},
    }
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))


def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def _accepts(base: str, key: str) -> bool:
    try:
        _client(base, key).models.list()
    except openai.AuthenticationError:
        return False
    return True


def test_a_key_rotated_in_its_secret_takes_effect_without_a_restart(
    cluster, node, workload_ns, operator_release
):
    ns = workload_ns
    doc = _sample()
    name = doc["metadata"]["name"] = "tiny-auth"
    doc["spec"]["server"]["auth"] = {
        "keys": [{"name": "team-a", "secretRef": {"name": "api-keys", "key": "team-a"}}]
    }
    _secret(cluster, ns, OLD)
    _apply(cluster, ns, doc)
    try:
        wait_for(lambda: _dd_ready(cluster, ns, name), 600, f"dd/{name} Ready", interval=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    (pod,) = _pods(cluster, ns, name)
    uid = pod["metadata"]["uid"]
    base = cluster.service_url(ns, name)

    assert _client(base, OLD).images.generate(prompt="a cat", **SMALL).data[0].b64_json
    with pytest.raises(openai.AuthenticationError):
        _client(base, NEW).images.generate(prompt="a cat", **SMALL)
    assert (
        httpx.post(base + "/v1/images/generations", json={"prompt": "a cat"}, timeout=30).status_code == 401
    )
    assert httpx.get(base + "/ready", timeout=10).status_code == 200  # probes need no key

    _secret(cluster, ns, NEW)
    t0 = time.monotonic()
    wait_for(lambda: _accepts(base, NEW), 180, "the rotated key to be accepted", interval=1)
    took = time.monotonic() - t0
    assert not _accepts(base, OLD)
    assert _client(base, NEW).images.generate(prompt="a cat", **SMALL).data[0].b64_json

    (after,) = _pods(cluster, ns, name)
    assert after["metadata"]["uid"] == uid, "the pod was replaced"
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0, after["status"]["containerStatuses"]
    logs = cluster.kubectl("logs", after["metadata"]["name"], "-n", ns).stdout
    assert "api keys reloaded" in logs and OLD not in logs and NEW not in logs, logs[-2000:]
    print(f"dd {name}: key rotated in its Secret, accepted by the same pod after {took:.1f}s, no restart")
