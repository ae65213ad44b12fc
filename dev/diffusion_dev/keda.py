"""KEDA's own ScaledObject and TriggerAuthentication CRDs (for tests of the ScaledObjects the operator renders), taken from KEDA's released Go module through the Go module proxy
(`go mod download`, the ordinary client) and kept in the per-user cache next to the built binaries:
`$XDG_CACHE_HOME/diffusion-operator/keda/<version>/keda.sh_scaledobjects.yaml`.

KEDA itself (`Keda`, for the real-pod tests of engine keda): its operator and metrics API server built
from the same released module (`keda_binaries`, cached per version; not part of the bootstrap: the
first test that needs KEDA builds it) and run as host processes next to the control plane, installed
with KEDA's own CRDs, ServiceAccount and RBAC from that module.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .build import cache_home
from .components import Component, ComponentError, free_port, log_tail, wait_for
from .pki import make_serving_cert

KEDA_MODULE = "github.com/kedacore/keda/v2"
KEDA_VERSION = "v2.21.0"  # the newest v2 release on the proxy when this was written
CRD_IN_MODULE = "config/crd/bases/keda.sh_scaledobjects.yaml"
# spec.queue with engine keda: the ScaledObject's triggers authenticate through a TriggerAuthentication
TRIGGER_AUTH_CRD_IN_MODULE = "config/crd/bases/keda.sh_triggerauthentications.yaml"


def keda_scaledobject_crd(version: str = KEDA_VERSION) -> Path:
    """The ScaledObject CRD file, downloaded once per version (file-locked: concurrent test sessions share it)."""
    return keda_crd(CRD_IN_MODULE, version)


def keda_triggerauthentication_crd(version: str = KEDA_VERSION) -> Path:
    """The TriggerAuthentication CRD file, from the same module download."""
    return keda_crd(TRIGGER_AUTH_CRD_IN_MODULE, version)


def keda_crd(in_module: str, version: str = KEDA_VERSION) -> Path:
    """A CRD file of KEDA's module (`in_module`), downloaded once per version (file-locked)."""
    target = cache_home() / "keda" / version / Path(in_module).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        go = shutil.which("go")
        if go is None:
            raise RuntimeError("go not found: needed to download KEDA's module for its ScaledObject CRD")
        print(
            f"downloading {KEDA_MODULE}@{version} from the Go module proxy (its ScaledObject CRD)", flush=True
        )
        with tempfile.TemporaryDirectory() as empty:  # outside any module: a plain download
            out = subprocess.run(
                [go, "mod", "download", "-json", f"{KEDA_MODULE}@{version}"],
                cwd=empty,
                env={**os.environ, "GOFLAGS": "-mod=mod"},
                capture_output=True,
                text=True,
                timeout=600,
            )
        if out.returncode != 0:
            raise RuntimeError(f"go mod download {KEDA_MODULE}@{version} failed: {out.stdout}{out.stderr}")
        source = Path(json.loads(out.stdout)["Dir"]) / in_module
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return target


# ---------------------------------------------------------------- KEDA itself, for the real-pod tests

KEDA_NAMESPACE = "keda"  # KEDA's own manifests name it
KEDA_SA = "keda-operator"  # KEDA's manifests run the operator and the metrics server under this one
EXTERNAL_METRICS_API = "v1beta1.external.metrics.k8s.io"
METRICS_SERVICE = "keda-metrics-apiserver"
# KEDA's own manifests, from its module: namespace, CRDs, ServiceAccount, RBAC (their least privilege)
MANIFESTS = (
    "config/general/namespace.yaml",
    "config/service_account/service_account.yaml",
    "config/rbac/role.yaml",
    "config/rbac/role_binding.yaml",
    "config/metrics-server/role.yaml",
    "config/metrics-server/role_binding.yaml",
)
CRD_DIR = "config/crd/bases"
BINARIES = {"keda-operator": "./cmd/operator", "keda-adapter": "./cmd/adapter"}


@functools.cache
def keda_source(version: str = KEDA_VERSION) -> Path:
    """KEDA's module source (the Go module cache: read-only), downloaded through the module proxy."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go not found: needed to download KEDA's module")
    with tempfile.TemporaryDirectory() as empty:
        out = subprocess.run(
            [go, "mod", "download", "-json", f"{KEDA_MODULE}@{version}"],
            cwd=empty, env={**os.environ, "GOFLAGS": "-mod=mod"}, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"go mod download {KEDA_MODULE}@{version} failed: {out.stdout}{out.stderr}")
    return Path(json.loads(out.stdout)["Dir"])


def keda_binaries(progress: Callable[[str], None] = print, version: str = KEDA_VERSION) -> Path:
    """keda-operator and keda-adapter (KEDA's metrics API server), built once per version from the
    released module (`go build` in a writable copy of it) into the per-user cache (file-locked)."""
    out = cache_home() / "keda" / version / "bin"
    if all(os.access(out / b, os.X_OK) for b in BINARIES):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(os.access(out / b, os.X_OK) for b in BINARIES):
            return out
        src = keda_source(version)
        t0 = time.monotonic()
        progress(f"[keda] building KEDA {version} (operator, metrics API server): a cold build takes minutes")
        with tempfile.TemporaryDirectory(prefix="keda-src-") as tmp:
            work = Path(tmp) / "src"
            shutil.copytree(src, work)
            for path in [work, *work.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
            staging = out.with_name(f"bin.partial-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            ldflags = f"-X github.com/kedacore/keda/v2/version.Version={version.lstrip('v')}"
            done = threading.Event()

            def heartbeat() -> None:
                while not done.wait(30):
                    progress(f"[keda] still compiling, {time.monotonic() - t0:.0f}s elapsed")

            threading.Thread(target=heartbeat, daemon=True).start()
            try:
                for name, package in BINARIES.items():
                    build = subprocess.run(
                        [shutil.which("go") or "go", "build", "-trimpath", "-ldflags", ldflags, "-o",
                         str(staging / name), package],
                        cwd=work, env=dict(os.environ), capture_output=True, text=True, timeout=3600,
                    )  # fmt: skip
                    if build.returncode != 0:
                        raise RuntimeError(f"go build of KEDA's {package} failed:\n{build.stderr[-4000:]}")
            finally:
                done.set()
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        progress(f"[keda] built in {time.monotonic() - t0:.0f}s")
    return out


def keda_manifests(version: str = KEDA_VERSION) -> tuple[list[dict], list[dict]]:
    """(KEDA's CRDs, its namespace + ServiceAccount + RBAC), as its release ships them."""
    src = keda_source(version)
    crds = [d for f in sorted((src / CRD_DIR).glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    rest = [d for f in MANIFESTS for d in yaml.safe_load_all((src / f).read_text()) if d]
    return crds, rest


@dataclass(eq=False)
class Keda:
    """KEDA (operator + metrics API server) as two host processes next to a started `LocalCluster`
    with the real node, like the metrics pipeline's adapter: each with the ServiceAccount token of
    KEDA's own manifests, the metrics server registered as `v1beta1.external.metrics.k8s.io`
    (selector-less Service + Endpoints at `address`), the two talking gRPC over mutual TLS with a
    certificate of the cluster CA. `stop()` removes what `start()` added (processes, APIService,
    CRDs, namespace), so the cluster is left as found."""

    cluster: Any
    address: str  # where the metrics server listens: the real node's bridge address
    progress: Callable[[str], None] = print
    components: dict[str, Component] = field(default_factory=dict)
    crd_names: list[str] = field(default_factory=list)

    def start(self, timeout: float = 120) -> None:
        c = self.cluster
        bins = keda_binaries(self.progress)
        crds, rbac = keda_manifests()
        self.crd_names = [d["metadata"]["name"] for d in crds]
        # server-side: KEDA's CRDs are too large for client-side apply's last-applied annotation
        c.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}),
        )  # fmt: skip
        for name in self.crd_names:
            c.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
        c.apply(rbac)
        w: Path = c.workdir / "keda"
        certs = w / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        token = w / "keda-operator.token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(c.token_for(KEDA_NAMESPACE, KEDA_SA, "720h"))
        kubeconfig = c.kubeconfig_for_token_file(token, w / "keda.kubeconfig")
        serving = make_serving_cert(
            c.pki.ca_cert.parent, "keda",
            dns=(f"{METRICS_SERVICE}.{KEDA_NAMESPACE}.svc", f"keda-operator.{KEDA_NAMESPACE}.svc", "localhost"),
            ips=(self.address, "127.0.0.1"), client=True,
        )  # fmt: skip
        shutil.copyfile(serving.cert, certs / "tls.crt")
        shutil.copyfile(serving.key, certs / "tls.key")
        shutil.copyfile(c.pki.ca_cert, certs / "ca.crt")
        grpc, probe, metrics, api = free_port(), free_port(), free_port(), free_port()
        env = {
            **os.environ, "KUBECONFIG": str(kubeconfig), "WATCH_NAMESPACE": "",
            "KEDA_CLUSTER_OBJECT_NAMESPACE": KEDA_NAMESPACE, "POD_NAMESPACE": KEDA_NAMESPACE,
        }  # fmt: skip
        logs = c.workdir / "logs"
        (w / "ca").mkdir(exist_ok=True)
        operator = Component(
            "keda-operator",
            [
                str(bins / "keda-operator"), "--leader-elect=false", "--enable-cert-rotation=false",
                f"--cert-dir={certs}", f"--ca-dir={w / 'ca'}", f"--metrics-service-bind-address=127.0.0.1:{grpc}",
                f"--health-probe-bind-address=127.0.0.1:{probe}", f"--metrics-bind-address=127.0.0.1:{metrics}",
                "--zap-log-level=info",
            ],
            logs / "keda-operator.log",
            health=lambda: c._http_ok(f"http://127.0.0.1:{probe}/readyz", None, b"ok"),
        )  # fmt: skip
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        adapter = Component(
            "keda-adapter",
            [
                str(bins / "keda-adapter"), f"--secure-port={api}", f"--bind-address={self.address}",
                f"--cert-dir={certs}", f"--tls-cert-file={certs / 'tls.crt'}",
                f"--tls-private-key-file={certs / 'tls.key'}", f"--metrics-service-address=127.0.0.1:{grpc}",
                "--metrics-service-grpc-authority=localhost", f"--lister-kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--zap-log-level=info",
            ],
            logs / "keda-adapter.log",
            health=lambda: c._http_ok(f"https://{self.address}:{api}/readyz", insecure, b"ok"),
        )  # fmt: skip
        self.components = {"keda-operator": operator, "keda-adapter": adapter}
        self.progress("[keda] starting the KEDA operator and metrics API server")
        c._start_and_wait([operator], env, "keda-operator")
        c._start_and_wait([adapter], env, "keda-adapter")
        c.apply(self.aggregation(c.pki.ca_cert.read_bytes(), api))
        try:
            wait_for(self._available, timeout, f"{EXTERNAL_METRICS_API} Available", interval=0.5)
        except TimeoutError as exc:
            raise ComponentError("keda-adapter", str(exc), log_tail(adapter.log)) from None

    def aggregation(self, ca_pem: bytes, port: int) -> list[dict]:
        meta = {"name": METRICS_SERVICE, "namespace": KEDA_NAMESPACE}
        return [
            {"apiVersion": "v1", "kind": "Service", "metadata": meta,
             "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]}},
            {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
             "subsets": [{"addresses": [{"ip": self.address}], "ports": [{"name": "https", "port": port}]}]},
            {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
             "metadata": {"name": EXTERNAL_METRICS_API},
             "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1",
                      "service": {"name": METRICS_SERVICE, "namespace": KEDA_NAMESPACE, "port": 443},
                      "caBundle": base64.b64encode(ca_pem).decode(), "groupPriorityMinimum": 100,
                      "versionPriority": 100}},
        ]  # fmt: skip

    def _available(self) -> bool:
        svc = self.cluster.api_get(f"/apis/apiregistration.k8s.io/v1/apiservices/{EXTERNAL_METRICS_API}")
        conds = {x["type"]: x["status"] for x in svc.get("status", {}).get("conditions", [])}
        return conds.get("Available") == "True"

    def diagnose(self) -> str:
        return "\n".join(f"--- {c.name} log ---\n{log_tail(c.log, 30)}" for c in self.components.values())

    def stop(self) -> None:
        for name in ("keda-adapter", "keda-operator"):
            comp = self.components.get(name)
            if comp is not None:
                comp.stop()
        c = self.cluster
        c.kubectl("delete", "apiservice", EXTERNAL_METRICS_API, "--ignore-not-found", check=False)
        for name in self.crd_names:
            c.kubectl("delete", "crd", name, "--ignore-not-found", "--wait=false", check=False)
        c.kubectl("delete", "namespace", KEDA_NAMESPACE, "--ignore-not-found", "--wait=false", check=False)
        for kind in ("clusterrole", "clusterrolebinding"):
            c.kubectl("delete", kind, "-l", "app.kubernetes.io/part-of=keda-operator", "--ignore-not-found",
                      check=False)  # fmt: skip
        c.kubectl("delete", "clusterrole", "keda-operator", "--ignore-not-found", check=False)
        c.kubectl("delete", "clusterrolebinding", "keda-operator", "--ignore-not-found", check=False)
        c.kubectl("delete", "rolebinding", "keda-auth-reader", "-n", "kube-system", "--ignore-not-found",
                  check=False)  # fmt: skip
