"""One real node for the local cluster: containerd + runc + kubelet + kube-proxy on this machine.

Layout and rules:
- The node is named `diffusion-dev-node`; its address is the bridge `ddev0` (10.245.0.1/24), which
  exists only on this machine. Pods get addresses from 10.245.0.0/24 (CNI bridge + host-local)
  and a route to the Service range only: no default route. The host forwards what comes in on the
  bridge (`net.ipv4.conf.ddev0.forwarding`; `net.ipv4.ip_forward` stays as it was) only back out of it
  (a first mangle FORWARD rule drops the rest), so a pod reaches another pod through its Service's ClusterIP
  (kube-proxy's DNAT, and `masqueradeAll` so the reply comes back through the host) and no pod
  traffic leaves the machine. The apiserver listens on the bridge address, so pods reach it through
  the `kubernetes` Service; host clients use the same address (a local one).
- kubelet authenticates with a client certificate from the cluster CA (`system:node:<name>`), so the
  Node authorizer and NodeRestriction apply; kube-proxy as `system:kube-proxy`; the apiserver
  reaches the kubelet (logs, exec, port-forward) with its own client certificate and checks the
  kubelet's serving certificate against the CA.
- containerd keeps its content store and snapshots in the user cache (images imported once stay);
  its state, sockets, the kubelet root, pod logs and CNI state live in the cluster's run dir.
- One real node per machine (kubelet and kube-proxy own machine-wide iptables chains): a lock
  serialises them. Before changing anything the node records the host state (`hoststate`) in a
  file; `stop()` removes every pod through the CRI (so CNI DEL runs), stops the processes and puts
  the host back. A run killed with SIGKILL is cleaned up by the next node start (or `down`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from . import hoststate, hosttools
from .build import cache_home
from .components import Component, ComponentError, free_port, log_tail, wait_for
from .pki import PKI, ClientCert, NodeCerts, make_node_certs

NODE_NAME = "diffusion-dev-node"
BRIDGE = "ddev0"
NODE_IP = "10.245.0.1"
POD_SUBNET = "10.245.0.0/24"
CGROUP_ROOT = f"/{hoststate.KUBELET_CGROUP}"
NODE_LABEL = "diffusion.dev/node-profile"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
STOP_ORDER = ("kubelet", "kube-proxy", "containerd")
# the first rule of mangle FORWARD while a node runs (before filter FORWARD, where kube-proxy's
# jumps accept what its Services mark): what came in on the bridge leaves only through it
FORWARD_DROP = ("-i", BRIDGE, "!", "-o", BRIDGE, "-m", "comment", "--comment", "diffusion-dev: pods stay on the bridge",
                "-j", "DROP")  # fmt: skip
LOCK_WAIT_SECONDS = 1800  # another session's node (tests on a shared machine): wait this long


class NodeError(RuntimeError):
    """The real node cannot run here; the message says why and what to do."""


def node_home() -> Path:
    return cache_home() / "node"


def lock_path() -> Path:
    """One real node per machine, whatever project cache a run uses: the lock is machine-wide."""
    return Path("/run/lock/diffusion-dev-node.lock")


def baseline_path() -> Path:
    """The host state recorded before the node starts, for the next run to put back after a crash.

    Machine-wide like the lock (not in the project cache): a run with another cache folder
    (DIFFUSION_OPERATOR_CACHE) still finds and restores what a crashed node changed. /run is cleared
    at boot, as is the host state it records."""
    return Path("/run/diffusion-dev/host-baseline.json")


def check_host() -> None:
    """Root, cgroups, and the Debian packages the node uses; raises NodeError naming what is missing."""
    if os.geteuid() != 0:
        raise NodeError("the real node needs root (containerd, kubelet); run as root or pass --no-real-node")
    try:
        hosttools.require("node", hint=", or pass --no-real-node")
    except hosttools.ToolMissing as exc:
        raise NodeError(str(exc)) from None
    if not Path("/sys/fs/cgroup").is_dir():
        raise NodeError("no /sys/fs/cgroup: the real node needs cgroups")


def cni_bin_dirs() -> list[str]:
    return [d for d in CNI_BIN_DIRS if os.path.isfile(os.path.join(d, "bridge"))]


# ---------------------------------------------------------------- configuration (pure) -------


def containerd_config(
    root: Path, state: Path, sock: Path, cni_conf: Path, pause_ref: str, runc_root: Path
) -> str:
    """containerd 2.x config (version 3): CRI with runc (cgroupfs), CNI from Debian, our pause image."""
    q = json.dumps  # TOML basic strings accept JSON string syntax
    disabled = [
        "io.containerd.internal.v1.opt",  # would create /opt/containerd
        "io.containerd.nri.v1.nri",  # would create /var/run/nri
        "io.containerd.snapshotter.v1.blockfile",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.erofs",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.internal.v1.tracing",
    ]
    return f"""version = 3
root = {q(str(root))}
state = {q(str(state))}
disabled_plugins = {json.dumps(disabled)}

[grpc]
  address = {q(str(sock))}

[ttrpc]
  address = {q(str(sock) + ".ttrpc")}

[debug]
  level = "warn"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = {q(pause_ref)}

[plugins.'io.containerd.cri.v1.runtime']
  # root lacks CAP_SYS_RESOURCE on these VMs: without this every sandbox fails with
  # "failed to update /proc/self/oom_score_adj: Permission denied"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = {q(hosttools.path_of("/usr/sbin/runc"))}
        Root = {q(str(runc_root))}
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = {json.dumps(cni_bin_dirs())}
    conf_dir = {q(str(cni_conf))}
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(ipam_dir: Path, service_cidr: str) -> dict:
    """Bridge + host-local: no gateway on the pods' side beyond the Service range, no masquerade."""
    return {
        "cniVersion": "1.0.0",
        "name": "diffusion-dev",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                # the bridge address is set up by the node itself (the apiserver binds it before
                # any pod exists); isGateway false also keeps the plugin off net.ipv4.ip_forward
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "10.245.0.10", "gateway": NODE_IP}]],
                    "routes": [{"dst": service_cidr, "gw": NODE_IP}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def kubelet_config(
    certs: NodeCerts, ca: Path, sock: Path, port: int, healthz_port: int, pod_logs: Path, resolv: Path
) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(certs.kubelet_serving.cert),
        "tlsPrivateKeyFile": str(certs.kubelet_serving.key),
        "containerRuntimeEndpoint": f"unix://{sock}",
        # these VMs: cgroup v1 hierarchy, no systemd, no swap accounting
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": CGROUP_ROOT,
        "failCgroupV1": False,
        "failSwapOn": False,
        "podLogsDir": str(pod_logs),
        "resolvConf": str(resolv),
        "registerNode": True,
        "nodeStatusUpdateFrequency": "4s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "60s",
        "maxPods": 30,
        "serializeImagePulls": False,
        # images are imported, never pulled: never garbage-collect them, never evict for disk
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        # a disk that was nearly full for a moment (an image's layers unpacked during its import) lifts
        # its DiskPressure taint 10 s after it recovered, not after the default 5 min, which outlasted
        # helm's wait for the operator's pod on a cold machine (fresh_machine_session9-disk-pressure.json)
        "evictionPressureTransitionPeriod": "10s",
        "protectKernelDefaults": False,
        "shutdownGracePeriod": "0s",
        "logging": {"format": "text"},
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_SUBNET,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # NodePorts only on the bridge, never on the machine's own interfaces or 127.0.0.1
        "nodePortAddresses": [POD_SUBNET],
        # masqueradeAll: a pod -> ClusterIP -> pod connection is SNATed to the bridge address, so the
        # reply returns through the host's conntrack (the bridge does not pass frames to iptables)
        "iptables": {"localhostNodePorts": False, "masqueradeAll": True, "syncPeriod": "10s"},
        # 0: leave the conntrack sysctls as they are
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def pause_archive(pause_bin: Path, ref: str, out: Path) -> None:
    """A one-layer image holding the static pause binary, as a docker-archive tar (pure I/O)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = pause_bin.read_bytes()
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": [f"{diff_id}/layer.tar"]}]
    with tarfile.open(out, "w") as tar:
        for name, payload in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))


def pki_client(stem: Path) -> ClientCert:
    """A certificate/key pair by file stem (pure; the files need not exist)."""
    return ClientCert(cert=stem.with_suffix(".crt"), key=stem.with_suffix(".key"))


def pause_ref(pause_bin: Path) -> str:
    return f"localhost/diffusion-dev/pause:{hashlib.sha256(pause_bin.read_bytes()).hexdigest()[:12]}"


# ---------------------------------------------------------------- the node --------------------


def _pids_with(needle: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                "utf-8", "replace"
            ):
                out.append(int(pid))
    return out


def make_cgroup_root(root: str) -> None:
    """Create `root` in every cgroup v1 hierarchy (cpuset: with the parent's cpus and mems)."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in sorted(base.iterdir()) if base.is_dir() else []:
        if not hierarchy.is_dir() or hierarchy.name == "unified" or not (hierarchy / "cgroup.procs").exists():
            continue
        path = hierarchy / root.lstrip("/")
        path.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not (path / name).read_text().strip():
                    (path / name).write_text((hierarchy / name).read_text())


def _kill_cgroup_tree(root: str) -> int:
    """SIGKILL every process in the cgroup subtree `root` of every v1/v2 hierarchy."""
    killed = 0
    base = Path("/sys/fs/cgroup")
    for hierarchy in base.iterdir() if base.is_dir() else []:
        top = hierarchy / root.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in os.walk(top):
            with contextlib.suppress(OSError):
                for pid in (Path(dirpath) / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                        killed += 1
    return killed


def recover_stale(progress: Callable[[str], None]) -> list[str]:
    """Clean up after a node whose process died without stopping it (SIGKILL, power loss...).

    Call with the node lock held. Kills the leftover shims and containers of the recorded run and
    restores the recorded host baseline.
    """
    path = baseline_path()
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
        before = hoststate.Snapshot.from_json(record["snapshot"])
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return ["dropped an unreadable host baseline"]
    progress(f"[node] a previous node (pid {record.get('pid')}) did not stop cleanly: restoring the host")
    run_dir = record.get("run_dir", "")
    for _ in range(3):
        pids = _pids_with(run_dir) if run_dir else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _kill_cgroup_tree(CGROUP_ROOT)
        if not pids:
            break
        time.sleep(0.5)
    log = hoststate.restore(before, tuple(Path(p) for p in record.get("mount_roots", [])))
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    path.unlink(missing_ok=True)
    return log


class NodeClient:
    """ctr and crictl against a node's containerd socket (usable from any process)."""

    def __init__(self, bin_dir: Path, sock: Path) -> None:
        self.bin_dir = bin_dir
        self.sock = sock

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / "ctr"), "--address", str(self.sock), "--namespace", "k8s.io", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / "crictl"), "--runtime-endpoint", f"unix://{self.sock}",
               "--image-endpoint", f"unix://{self.sock}", "--timeout", "60s", *args]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise NodeError(f"crictl {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc

    def images(self) -> set[str]:
        return set(self.ctr("images", "ls", "-q").stdout.split())

    def import_archive(self, archive: Path) -> None:
        self.ctr(
            "images", "import", "--no-unpack=false", "--snapshotter", "overlayfs", str(archive), timeout=1800
        )


class RealNode(NodeClient):
    """containerd + kubelet + kube-proxy registered with a LocalCluster's apiserver."""

    def __init__(
        self, bin_dir: Path, workdir: Path, progress: Callable[[str], None], timeout: float = 90
    ) -> None:
        self.dir = workdir / "node"
        super().__init__(bin_dir, self.dir / "containerd.sock")
        self.progress = progress
        self.timeout = timeout
        self.components: dict[str, Component] = {}
        self.timings: dict[str, float] = {}
        self.baseline: hoststate.Snapshot | None = None
        self.leftovers: list[str] = []  # what stop() could not put back (empty when clean)
        self.restored: list[str] = []  # what stop() put back
        self._lock_fd: int | None = None
        self.containerd_root = node_home() / "containerd"
        self.pause_ref = ""

    # ---------------------------------------------------------- phase 1: before the apiserver
    def prepare(self) -> None:
        """Lock, record the host, create the bridge (the apiserver binds its address)."""
        check_host()
        t = time.monotonic()
        lock_path().parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            self.progress(f"[node] another real node runs on this machine (pid {holder}); waiting for it")
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise NodeError(
                            f"another real node (pid {holder}) has held {lock_path()} for {LOCK_WAIT_SECONDS}s: "
                            "one real node per machine; stop it (diffusion-dev down) or use --no-real-node"
                        ) from None
                    time.sleep(1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        for line in recover_stale(self.progress):
            self.progress(f"[node] recovery: {line}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.baseline = hoststate.snapshot()
        node_home().mkdir(parents=True, exist_ok=True)
        baseline_path().parent.mkdir(parents=True, exist_ok=True)
        tmp = baseline_path().with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "run_dir": str(self.dir),
                    "mount_roots": [str(self.dir), str(self.containerd_root)],
                    "snapshot": self.baseline.to_json(),
                }
            )
        )
        tmp.replace(baseline_path())
        for cmd in (
            ["ip", "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE],
            ["ip", "link", "set", BRIDGE, "up"],
            # pod -> ClusterIP -> pod: forwarded from the bridge back onto it, nowhere else (the rule
            # first, then forwarding on the bridge only; both go with the bridge and the iptables restore)
            ["iptables", "-w", "-t", "mangle", "-I", "FORWARD", "1", *FORWARD_DROP],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise NodeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding").write_text("1\n")
        self.timings["prepare"] = round(time.monotonic() - t, 2)

    def make_certs(self, pki: PKI) -> None:
        """Sign the node's certificates with the cluster CA (before the apiserver starts: it needs
        its kubelet client certificate)."""
        self.certs: NodeCerts = make_node_certs(pki.ca_cert.parent, NODE_NAME, NODE_IP)

    # ---------------------------------------------------------- phase 2: the node itself
    def start(self, pki: PKI, write_kubeconfig: Callable[[Path, str, dict], Path], api_get: Callable[[str], dict],
              env: dict[str, str], service_cidr: str) -> None:  # fmt: skip
        t0 = time.monotonic()
        d, b = self.dir, self.bin_dir
        certs = self.certs

        def kubeconfig(name: str, cert: Path, key: Path) -> Path:
            user = {"client-certificate": str(cert), "client-key": str(key)}
            return write_kubeconfig(d / f"{name}.kubeconfig", name, user)

        kubelet_kc = kubeconfig("kubelet", certs.kubelet_client.cert, certs.kubelet_client.key)
        proxy_kc = kubeconfig("kube-proxy", certs.kube_proxy.cert, certs.kube_proxy.key)
        (d / "cni").mkdir(parents=True, exist_ok=True)
        (d / "cni" / "10-diffusion-dev.conflist").write_text(
            json.dumps(cni_config(d / "cni-ipam", service_cidr))
        )
        self.pause_ref = pause_ref(b / "pause")
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        (d / "containerd.toml").write_text(
            containerd_config(
                self.containerd_root, d / "containerd-state", self.sock, d / "cni", self.pause_ref, d / "runc"
            )  # fmt: skip
        )
        # pods resolve nothing outside: an empty resolv.conf (no cluster DNS in this cluster)
        (d / "resolv.conf").write_text("")
        ports = {"kubelet": free_port(), "kubelet-healthz": free_port(), "proxy-healthz": free_port(),
                 "proxy-metrics": free_port()}  # fmt: skip
        self.ports = ports
        (d / "kubelet.yaml").write_text(
            yaml.safe_dump(
                kubelet_config(
                    certs,
                    pki.ca_cert,
                    self.sock,
                    ports["kubelet"],
                    ports["kubelet-healthz"],
                    d / "pod-logs",
                    d / "resolv.conf",
                )  # fmt: skip
            )
        )
        (d / "kube-proxy.yaml").write_text(
            yaml.safe_dump(kube_proxy_config(proxy_kc, ports["proxy-healthz"], ports["proxy-metrics"]))
        )
        node_env = dict(env, PATH=f"{b}:/usr/sbin:/usr/bin:/sbin:/bin")
        logs = d / "logs"
        containerd = Component(
            "containerd", [str(b / "containerd"), "--config", str(d / "containerd.toml")], logs / "containerd.log",
            health=lambda: self.ctr("version", check=False).returncode == 0,
        )  # fmt: skip
        kubelet = Component(
            "kubelet",
            [
                str(b / "kubelet"),
                f"--config={d / 'kubelet.yaml'}",
                f"--kubeconfig={kubelet_kc}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--root-dir={d / 'kubelet'}",
                f"--cert-dir={d / 'kubelet-pki'}",
                f"--node-labels={NODE_LABEL}=real",
                "--v=1",
            ],
            logs / "kubelet.log",
        )
        proxy = Component(
            "kube-proxy", [str(b / "kube-proxy"), f"--config={d / 'kube-proxy.yaml'}", "--v=1"],
            logs / "kube-proxy.log",
        )  # fmt: skip
        self.components = {c.name: c for c in (containerd, kubelet, proxy)}
        t = time.monotonic()
        self._start_wait(containerd, node_env)
        self.timings["containerd"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        # a previous run's pods in the persistent store would come back: remove them first
        self.remove_pods()
        self.import_pause()
        self.timings["pause-image"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        make_cgroup_root(CGROUP_ROOT)  # kubelet wants its cgroup root to exist in every hierarchy
        kubelet.start(node_env)
        proxy.start(node_env)
        self._wait_ready(api_get)
        self.timings["kubelet"] = round(time.monotonic() - t, 2)
        self.timings["node"] = round(time.monotonic() - t0, 2)

    def _start_wait(self, comp: Component, env: dict[str, str]) -> None:
        comp.start(env)
        deadline = time.monotonic() + self.timeout
        while not (comp.health and comp.health()):
            comp.check_running()
            if time.monotonic() > deadline:
                raise ComponentError(comp.name, f"not ready after {self.timeout:.0f}s", log_tail(comp.log))
            time.sleep(0.1)

    def _wait_ready(self, api_get: Callable[[str], dict]) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            for comp in self.components.values():
                comp.check_running()
            with contextlib.suppress(RuntimeError):
                node = api_get(f"/api/v1/nodes/{NODE_NAME}")
                conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
                taints = {t["key"] for t in node.get("spec", {}).get("taints", [])}
                if conds.get("Ready") == "True" and not taints & {
                    "node.kubernetes.io/not-ready",
                    "node.kubernetes.io/unreachable",
                }:
                    return
            if time.monotonic() > deadline:
                raise ComponentError("kubelet", f"node {NODE_NAME} not Ready after {self.timeout:.0f}s",
                                     log_tail(self.components["kubelet"].log))  # fmt: skip
            time.sleep(0.2)

    def import_pause(self) -> None:
        if self.pause_ref in self.images():
            return
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            archive = Path(tmp) / "pause.tar"
            pause_archive(self.bin_dir / "pause", self.pause_ref, archive)
            self.import_archive(archive)

    def remove_pods(self) -> None:
        """Stop and remove every pod sandbox through the CRI: CNI DEL, netns and mounts go with it."""
        if self.components.get("containerd") is None or self.components["containerd"].proc is None:
            return
        if self.components["containerd"].proc.poll() is not None:
            return
        self.crictl("rmp", "--all", "--force", check=False, timeout=180)

    # ---------------------------------------------------------- teardown
    def stop(self) -> None:
        if self._lock_fd is None:
            return
        try:
            self._teardown()
        finally:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _teardown(self) -> None:
        t = time.monotonic()
        for name in ("kubelet", "kube-proxy"):
            comp = self.components.get(name)
            if comp is not None:
                comp.stop()
        with contextlib.suppress(Exception):
            self.remove_pods()
        comp = self.components.get("containerd")
        if comp is not None:
            comp.stop()
        # shims are daemons (re-parented to init): find them by our socket address
        for _ in range(20):
            pids = _pids_with(str(self.sock))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(0.1)
        _kill_cgroup_tree(CGROUP_ROOT)
        if self.baseline is not None:
            left = self.baseline.processes
            with contextlib.suppress(TimeoutError):  # what still runs is reported by the diff below
                wait_for(lambda: hoststate._processes() == left, 10, "node processes to exit")
            self.restored = hoststate.restore(self.baseline, (self.dir, self.containerd_root))
            self.leftovers = hoststate.diff(self.baseline, hoststate.snapshot())
            if self.leftovers:
                self.progress(f"[node] host state not fully restored: {self.leftovers}")
        shutil.rmtree(self.dir, ignore_errors=True)
        baseline_path().unlink(missing_ok=True)
        self.timings["stop"] = round(time.monotonic() - t, 2)

    def pids(self) -> dict[str, int]:
        return {n: c.proc.pid for n, c in self.components.items() if c.proc is not None}
