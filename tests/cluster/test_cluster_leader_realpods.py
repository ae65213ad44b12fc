"""The chart's two operator replicas as real pods on the real node: SIGKILL of the leader while a CR's
rollout is in flight -> another replica takes the Lease over and finishes it; one writer at a time.

Which replica: the standby, or the pod the Deployment creates in the killed one's place. Both are
candidates, and a candidate takes a lease over a lease duration after it first saw the record unchanged
(client-go's rule, `diffusion_operator.leader`): the standby saw the dead leader's last renewal up to a
retry period after it, the replacement sees it when it starts, so on a machine where the replacement
starts within a few seconds either may win. A CI run timed out waiting for the standby by name (most
likely the replacement had won; the failure printed nothing more, and now prints the lease, the pods
and their logs); here the standby led 14.6-15.0 s after the kill in 4 runs of 4. Either is right: the
test names the winner and checks it.

The leader's container is SIGKILLed through containerd (`ctr task kill -s SIGKILL`: no SIGTERM, no
release) and its pod force-deleted at once, as when its node is lost: the kubelet would otherwise
restart the container under the same pod name, which takes its lease back at once (see
tests/operator/test_leader_cluster.py). The CR's pods are kwok fakes (the rollout is the operator's
and the Deployment controller's work, not a model load).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from diffusion_dev import on_fake_cpu_node, wait_for
from diffusion_dev.fake_nodes import PROFILE_LABEL
from diffusion_dev.install import helm, install_operator, load_images
from diffusion_dev.real_node import NODE_NAME
from diffusion_operator.kube import status_manager
from fixtures_cluster import REAL_NODE_OFF, switched_off

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
OPERATOR_NS = "leader-system"


def _json(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


PROFILE_LABEL_GATE = "diffusion.dev/test-rollout-gate"  # set on the kwok CPU nodes once a successor leads


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_sigkill_of_the_leader_pod_mid_rollout_another_replica_finishes_it(
    cluster, namespace, record_property
):
    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    load_images(cluster.node, targets=("operator",))
    release = f"ha-{uuid.uuid4().hex[:5]}"
    fullname = f"{release}-diffusion-operator"
    install_operator(cluster, OPERATOR_NS, release)
    try:
        selector = f"app.kubernetes.io/instance={release}"
        pods = _json(cluster, "pods", "-n", OPERATOR_NS, "-l", selector)["items"]
        assert len(pods) == 2 and all(p["spec"]["nodeName"] == NODE_NAME for p in pods)
        names = {p["metadata"]["name"] for p in pods}

        def lease() -> dict:
            return _json(cluster, "lease", fullname, "-n", OPERATOR_NS)["spec"]

        leader = wait_for(
            lambda: lease().get("holderIdentity") in names and lease()["holderIdentity"], 60, "a leader"
        )
        (standby,) = names - {leader}

        doc = on_fake_cpu_node(yaml.safe_load((REPO / "samples" / "tiny-cpu.yaml").read_text()))
        doc["metadata"] = {"name": "ha"}
        doc["spec"]["replicas"] = 2
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

        def converged(generation: int | None = None):
            obj = _json(cluster, "dd", "ha", "-n", namespace, "--show-managed-fields")
            st = obj.get("status") or {}
            conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
            gen = obj["metadata"]["generation"]
            done = (
                conds.get("Ready") == "True"
                and st.get("observedGeneration") == gen
                and st.get("updatedReplicas") == 2
                and st.get("readyReplicas") == 2
            )
            return obj if done and (generation is None or gen == generation) else None

        wait_for(converged, 120, "dd/ha Ready under the first leader")

        # a rollout (a new pod template), and the leader SIGKILLed right after it started. kwok readies
        # pods at once, so the whole rollout could finish before the kill (and the successor would have
        # nothing left to do): the new pods ask for a node label that is set only once the successor leads
        gate = {PROFILE_LABEL_GATE: uuid.uuid4().hex[:8]}
        template = doc["spec"]["template"]
        patch = {"spec": {"template": {"env": [{"name": "ROLLOUT", "value": "2"}],
                                       "nodeSelector": {**template["nodeSelector"], **gate}}}}  # fmt: skip
        cluster.kubectl("patch", "dd", "ha", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
        generation = _json(cluster, "dd", "ha", "-n", namespace)["metadata"]["generation"]
        wait_for(
            lambda: _json(cluster, "deployment", "ha", "-n", namespace)["metadata"]["generation"] > 1,
            30,
            "the leader to start the rollout",
            interval=0.05,
        )
        pod = _json(cluster, "pod", leader, "-n", OPERATOR_NS)
        container = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        killed = time.monotonic()
        cluster.node.ctr("tasks", "kill", "--signal", "SIGKILL", container)
        # its node lost, in effect: no restart under the same name
        cluster.kubectl(
            "delete", "pod", leader, "-n", OPERATOR_NS, "--grace-period=0", "--force", check=False
        )

        def diagnose() -> str:
            """The lease, every operator pod (restarts, phase, age) and the tail of each one's log."""
            lines = [f"killed {leader} at +0 s (now +{time.monotonic() - killed:.1f} s); lease: {lease()}"]
            for p in _json(cluster, "pods", "-n", OPERATOR_NS, "-l", selector)["items"]:
                statuses = p["status"].get("containerStatuses") or [{}]
                lines.append(f"pod {p['metadata']['name']}: phase {p['status'].get('phase')}, created "
                             f"{p['metadata']['creationTimestamp']}, restarts {statuses[0].get('restartCount')}, "
                             f"deleting {bool(p['metadata'].get('deletionTimestamp'))}")  # fmt: skip
                log = cluster.kubectl(
                    "logs", p["metadata"]["name"], "-n", OPERATOR_NS, "--tail=15", check=False
                )
                lines += [f"  | {line}" for line in (log.stdout + log.stderr).splitlines()]
            return "\n".join(lines)

        def new_holder() -> str | None:
            holder = lease().get("holderIdentity")
            return holder if holder and holder != leader else None

        try:
            successor = wait_for(new_holder, 60, "another replica to take over", interval=0.1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        takeover = time.monotonic() - killed
        # the standby, or the killed pod's replacement (a new name): never a stranger
        replicas = {
            p["metadata"]["name"] for p in _json(cluster, "pods", "-n", OPERATOR_NS, "-l", selector)["items"]
        }
        assert successor == standby or (successor in replicas and successor not in names), (
            successor,
            diagnose(),
        )
        mid = _json(cluster, "dd", "ha", "-n", namespace)["status"]
        assert converged(generation) is None, f"the rollout was over before the kill: {mid}"
        ((gate_key, gate_value),) = gate.items()
        cluster.kubectl(
            "label", "nodes", "-l", f"{PROFILE_LABEL}=cpu", f"{gate_key}={gate_value}", "--overwrite"
        )
        obj = wait_for(
            lambda: converged(generation), 120, "the rollout finished by the new leader", interval=0.2
        )
        finished = time.monotonic() - killed
        record_property("takeover_s", round(takeover, 2))
        record_property("rollout_finished_after_kill_s", round(finished, 2))
        print(
            f"\nreal pods: {'the standby' if successor == standby else 'the replacement pod'} led {takeover:.1f} s after the SIGKILL; the rollout was finished {finished:.1f} s after it"
        )
        assert takeover <= 15 + 2 * 2 + 3, (takeover, diagnose())

        # one writer at a time: the killed leader's last status write precedes the successor's acquisition
        status = {
            m["manager"]: m for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"
        }
        assert status_manager(successor) in status, list(status)
        acquired = _time(lease()["acquireTime"])
        if status_manager(leader) in status:
            assert _time(status[status_manager(leader)]["time"]) <= acquired, (status, acquired)
        assert _time(status[status_manager(successor)]["time"]) >= acquired.replace(microsecond=0)
        assert set(status) <= {status_manager(leader), status_manager(successor)}, list(status)
    finally:
        cluster.kubectl("label", "nodes", "-l", f"{PROFILE_LABEL}=cpu", f"{PROFILE_LABEL_GATE}-", check=False)
        cluster.kubectl("delete", "dd", "--all", "-n", namespace, "--wait=false", check=False)
        helm(cluster, "uninstall", release, "--namespace", OPERATOR_NS, "--wait", "--ignore-not-found")
