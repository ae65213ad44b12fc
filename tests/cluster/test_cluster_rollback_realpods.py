"""Automatic rollback with real pods, the default rollout (`maxSurge: 0`) and one replica: a change that
fails the quality gate, and a change to an image that cannot start, are undone by the operator, which
restores the previous configuration; the time without a ready pod is measured. And the sample with a
model URI that does not exist: within one restart Ready=False names the pod's termination message and
an event says the same.

The in-cluster operator (chart), the runtime image built from the Dockerfile, the tiny model from the
CR's pvc:// source (fixtures of test_cluster_realpods.py). Measured figures are printed; with
BENCH_RESULTS_DIR set (e.g. `BENCH_RESULTS_DIR=bench/results`, how the committed
bench/results/rollback_realpods.json was made) they are written to rollback_realpods.json there. A test
run never rewrites a committed result file by itself (the docs quote it: tests/test_figures.py).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from diffusion_dev import wait_for
from test_cluster_realpods import (  # noqa: F401
    REPO,
    SAMPLE,
    _apply,
    _diagnose,
    _json,
    _pods,
    _post,
    _sample,
    operator_release,
    workload_ns,
)

pytestmark = pytest.mark.cluster

GATE = {"prompts": ["a photo of a cat"], "seeds": [0], "minPSNR": 45.0}
RESULTS_DIR = os.environ.get("BENCH_RESULTS_DIR")


def _conditions(dd: dict) -> dict:
    return {c["type"]: c for c in dd.get("status", {}).get("conditions", [])}


def _record(key: str, value: dict) -> None:
    print(f"\n{key}: {json.dumps(value, sort_keys=True)}")
    if not RESULTS_DIR:
        return
    results = Path(RESULTS_DIR) / "rollback_realpods.json"
    data = json.loads(results.read_text()) if results.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    data[key] = {**value, "commit": commit.stdout.strip(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "where": "the local cluster's real node (CPU pods, the tiny model)"}  # fmt: skip
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class ReadyWatch:
    """Polls the CR's pods every 0.5 s: the stretches with no ready pod (a pod is ready when its Ready
    condition is True and it is not being deleted: what the Service routes to)."""

    def __init__(self, cluster, ns: str, name: str) -> None:
        self.cluster, self.ns, self.name = cluster, ns, name
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ready(self) -> int:
        out = self.cluster.kubectl(
            "get", "pods", "-n", self.ns, "-l", f"app.kubernetes.io/instance={self.name}", "-o", "json",
            check=False,
        )  # fmt: skip
        if out.returncode != 0:
            return -1
        return sum(
            1
            for p in json.loads(out.stdout)["items"]
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self._ready()
            if n >= 0:
                self.samples.append((time.monotonic(), n))
            time.sleep(0.5)

    def start(self) -> ReadyWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def without_ready(self) -> float:
        """Seconds with no ready pod (from the first sample with none to the next with one)."""
        total, since = 0.0, None
        for t, n in self.samples:
            if n == 0 and since is None:
                since = t
            elif n > 0 and since is not None:
                total += t - since
                since = None
        if since is not None:
            total += self.samples[-1][0] - since
        return total


def _serve(cluster, ns: str, doc: dict) -> tuple[dict, str]:
    name = doc["metadata"]["name"]
    _apply(cluster, ns, doc)
    try:
        dd = wait_for(
            lambda: (
                (d := _json(cluster, "get", "dd", name, "-n", ns))
                and _conditions(d).get("Ready", {}).get("status") == "True"
                and d
            ),
            600,
            f"dd/{name} Ready",
            interval=2,
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    wait_for(
        lambda: (
            cluster.kubectl("get", "configmap", f"{name}-last-good", "-n", ns, check=False).returncode == 0
        ),
        60,
        "the last good revision kept",
        interval=1,
    )
    url = f"{cluster.service_url(ns, name)}/v1/images/generations"
    assert _post(url)[0] == 200
    return dd, url


def _rolled_back(cluster, ns: str, name: str, good_hash: str, timeout: float, seen: dict) -> dict:
    """Wait for RolledBack=True and Ready=True on the good configuration; `seen["rolled_back"]`: when
    RolledBack=True was first seen (time.monotonic)."""

    def back():
        dd = _json(cluster, "get", "dd", name, "-n", ns)
        c = _conditions(dd)
        if c.get("RolledBack", {}).get("status") == "True":
            seen.setdefault("rolled_back", time.monotonic())
            if c.get("Ready", {}).get("status") == "True" and dd["status"].get("configHash") == good_hash:
                return dd
        return None

    try:
        return wait_for(back, timeout, f"dd/{name} RolledBack and Ready again", interval=1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None


@pytest.mark.parametrize("change", ["quality-gate", "image"])
def test_a_failing_revision_with_max_surge_0_is_rolled_back_and_the_previous_config_serves(
    cluster,
    node,
    workload_ns,  # noqa: F811 - the fixture imported above
    operator_release,  # noqa: F811
    change,
):
    ns = workload_ns
    good = _sample()
    good["spec"]["qualityGate"] = GATE
    assert "rollout" not in good["spec"]  # the default: maxSurge 0, maxUnavailable 1
    name = good["metadata"]["name"]
    dd, url = _serve(cluster, ns, good)
    good_hash = dd["status"]["configHash"]
    good_config = _json(cluster, "get", "configmap", f"{name}-config", "-n", ns)["data"]
    good_template = _json(cluster, "get", "deployment", name, "-n", ns)["spec"]["template"]
    assert _json(cluster, "get", "deployment", name, "-n", ns)["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0,
        "maxUnavailable": 1,
    }

    bad = copy.deepcopy(good)
    if change == "quality-gate":  # a 6-of-8 cached mask: about 42 dB against the gate's 45
        bad["spec"]["cacheDit"]["cache_config"].update(
            steps_computation_mask=[1, 0, 0, 0, 0, 0, 0, 1], max_warmup_steps=1
        )
        reason, words = "QualityGateFailed", "< min 45"
    else:  # a tag that does not exist (the node has no registry to pull from)
        bad["spec"]["template"]["image"] = "registry.invalid/diffusion-operator/runtime:no-such-tag"
        reason, words = "ImagePullBackOff", "registry.invalid/diffusion-operator/runtime:no-such-tag"
    watch = ReadyWatch(cluster, ns, name).start()
    started = time.monotonic()
    _apply(cluster, ns, bad)
    seen: dict[str, float] = {}
    try:
        dd = _rolled_back(cluster, ns, name, good_hash, 600, seen)
    finally:
        watch.stop()
    took = time.monotonic() - started
    cond = _conditions(dd)["RolledBack"]
    assert cond["reason"] == reason and words in cond["message"], cond
    # the spec as written, the previous configuration applied and serving
    assert dd["spec"] == _json(cluster, "get", "dd", name, "-n", ns)["spec"]
    assert dd["spec"]["cacheDit"] == bad["spec"]["cacheDit"]
    assert dd["spec"]["template"].get("image") == bad["spec"]["template"].get("image")
    assert _json(cluster, "get", "configmap", f"{name}-config", "-n", ns)["data"] == good_config
    assert _json(cluster, "get", "deployment", name, "-n", ns)["spec"]["template"] == good_template
    code, _headers, body = _post(url)
    assert code == 200, body[:300]
    events = _json(cluster, "get", "events", "-n", ns, "--field-selector", "reason=RolledBack")["items"]
    assert len(events) == 1 and words in events[0]["message"], json.dumps(events)[:2000]
    if reason == "QualityGateFailed":
        gate = _conditions(dd)["QualityGate"]
        assert gate["status"] == "False" and "PSNR" in gate["message"], gate

    # not retried: the template stays restored, one pod of the good configuration serves
    generation = _json(cluster, "get", "deployment", name, "-n", ns)["metadata"]["generation"]
    time.sleep(20)
    dep = _json(cluster, "get", "deployment", name, "-n", ns)
    assert dep["metadata"]["generation"] == generation and dep["spec"]["template"] == good_template
    pods = [p for p in _pods(cluster, ns, name) if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    outage = watch.without_ready()
    figures = {
        "without_ready_pod_seconds": round(outage, 1),
        "apply_to_rolled_back_and_ready_seconds": round(took, 1),
        # the failing pod's part (old pod's stop, new pod's start up to its failure) and the restored pod's
        "apply_to_rolled_back_seconds": round(seen["rolled_back"] - started, 1),
        "rolled_back_to_ready_seconds": round(started + took - seen["rolled_back"], 1),
        "reason": reason,
        "message": cond["message"],
        "rollout": {"maxSurge": 0, "maxUnavailable": 1, "replicas": 1},
    }
    _record(change, figures)
    print(f"\n{change}: {json.dumps(figures)}")
    assert outage > 0  # maxSurge 0: the serving pod goes first


def test_the_sample_with_a_missing_model_says_why_within_one_restart(
    cluster,
    node,
    workload_ns,  # noqa: F811
    operator_release,  # noqa: F811
):
    ns = workload_ns
    doc = yaml.safe_load(SAMPLE.read_text())  # as written: file:///models/tiny-flux, not in the image
    name = doc["metadata"]["name"]
    started = time.monotonic()
    _apply(cluster, ns, doc)

    def says_why():
        dd = _json(cluster, "get", "dd", name, "-n", ns)
        ready = _conditions(dd).get("Ready", {})
        if ready.get("status") == "False" and "does not exist" in ready.get("message", ""):
            return dd, _pods(cluster, ns, name)
        return None

    try:
        dd, pods = wait_for(
            says_why, 300, f"dd/{name} Ready=False naming the termination message", interval=1
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    took = time.monotonic() - started
    restarts = [cs.get("restartCount", 0) for p in pods for cs in p["status"].get("containerStatuses", [])]
    assert restarts and max(restarts) <= 1, restarts
    ready = _conditions(dd)["Ready"]
    terms = [
        (cs.get("lastState") or {}).get("terminated") or (cs.get("state") or {}).get("terminated") or {}
        for p in pods
        for cs in p["status"].get("containerStatuses", [])
    ]
    message = next(t["message"].strip() for t in terms if t.get("message"))
    assert message.splitlines()[-1] in ready["message"], (message, ready)
    assert ready["reason"] in ("CrashLoopBackOff", "ContainerExited"), ready
    assert "warming up" not in ready["message"]
    assert "RolledBack" not in _conditions(dd)  # it never served: nothing to go back to

    def event():
        items = _json(cluster, "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
        return [e for e in items["items"] if e["type"] == "Warning" and "does not exist" in e["message"]]

    events = wait_for(event, 30, "a Warning event naming the termination message", interval=1)
    assert len(events) == 1 and message.splitlines()[-1] in events[0]["message"], events
    table = cluster.kubectl("get", "dd", name, "-n", ns).stdout
    assert ready["reason"] in table, table
    _record("missing-model", {"apply_to_ready_false_named_seconds": round(took, 1), "restarts": max(restarts),
                              "ready": ready, "event": events[0]["message"]})  # fmt: skip
    print(
        f"\nmissing model: Ready=False named after {took:.1f} s, {max(restarts)} restart(s): {ready['message']}"
    )
