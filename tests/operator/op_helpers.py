"""Shared helpers of the operator tests (no fixtures here)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from diffusion_operator import rbac
from diffusion_operator.runner import DEFAULT_LEASE_NAME
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
OWNER = {
    "apiVersion": "diffusion.dev/v1alpha1",
    "kind": "DiffusionDeployment",
    "metadata": {"name": "x", "namespace": "ns", "uid": "0000-uid"},
}


def sample(name: str) -> dict:
    return yaml.safe_load((SAMPLES / name).read_text())


def owner_for(doc: dict, namespace: str = "ns") -> dict:
    return {
        "apiVersion": doc["apiVersion"],
        "kind": doc["kind"],
        "metadata": {"name": doc["metadata"]["name"], "namespace": namespace, "uid": "uid-1"},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_binary() -> str:
    candidate = Path(sys.executable).parent / "diffusion-operator"
    if not candidate.exists():
        pytest.fail(
            f"{candidate} missing: install the project (pip install -e .[operator,dev])", pytrace=False
        )
    return str(candidate)


class OperatorProcess:
    """`diffusion-operator run` as a subprocess with its log captured; fails loudly if it dies."""

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str],
        log: Path,
        resync: float = 2.0,
        args=(),
        identity: str = "test-operator",
        apply_crd: bool = False,
    ) -> None:
        """`identity`: the leader-election identity; a restarted process with the same one takes its
        lease back at once, as a restarted container of one pod does (two instances side by side need two
        identities). `apply_crd`: off by default, the session's CRD fixture owns the CRD."""
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = log
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.resync = resync
        self.args = list(args)
        self.identity = identity
        self.apply_crd = apply_crd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> OperatorProcess:
        cmd = [operator_binary(), "run", "--bind", "127.0.0.1"]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        cmd += [
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            "--resync-seconds",
            str(self.resync),
            "--leader-identity",
            self.identity,
            *([] if self.apply_crd else ["--no-apply-crd"]),
            *self.args,
        ]
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"operator not healthy after {timeout}s:\n{self.log()[-4000:]}", pytrace=False)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def healthz(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as r:
            return json.loads(r.read())

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}", pytrace=False)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def samples(self) -> dict[tuple[str, tuple], float]:
        """Every sample as {(name, sorted label items): value}."""
        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def writes(self) -> float:
        return sum(
            v for (name, _), v in self.samples().items() if name == "diffusion_operator_api_writes_total"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def get_json(cluster, *args) -> dict | None:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def restricted_kubeconfig(cluster, namespace: str, tmp_path: Path, role: dict | None = None) -> Path:
    """A kubeconfig whose token is ServiceAccount `diffusion-operator`'s in `namespace`, bound to `role`
    (default: exactly the operator's declared namespaced rules, rbac.role) and, as the chart does, to
    get/update of the one leader-election Lease (created here empty, as the chart creates it), and to
    nothing else."""
    cluster.kubectl("create", "serviceaccount", "diffusion-operator", "-n", namespace)
    cluster.apply(role if role is not None else rbac.role("diffusion-operator", namespace))
    cluster.kubectl(
        "create", "rolebinding", "diffusion-operator", "-n", namespace,
        "--role=diffusion-operator", f"--serviceaccount={namespace}:diffusion-operator",
    )  # fmt: skip
    cluster.apply(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": DEFAULT_LEASE_NAME, "namespace": namespace},
            "spec": {},
        }
    )
    cluster.apply(rbac.lease_role("diffusion-operator-leader", namespace, DEFAULT_LEASE_NAME))
    cluster.kubectl(
        "create", "rolebinding", "diffusion-operator-leader", "-n", namespace,
        "--role=diffusion-operator-leader", f"--serviceaccount={namespace}:diffusion-operator",
    )  # fmt: skip
    token = cluster.token_for(namespace, "diffusion-operator")
    return cluster.kubeconfig_for_token(token, tmp_path / "restricted.kubeconfig")


def deliver_watch(kube, rec) -> None:
    """Hand the fake API server's watch events to the reconciler as kopf's handlers do (handlers.py):
    the CR's to `on_cr_event`, its children's (not Events) to `on_child_event`."""

    def deliver(event: str, obj: dict) -> None:
        if obj["kind"] == "DiffusionDeployment":
            rec.on_cr_event(event, obj)
        elif obj["kind"] != "Event":
            rec.on_child_event(event, obj)

    kube.watch(deliver)
