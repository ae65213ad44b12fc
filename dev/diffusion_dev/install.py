"""The real-cluster path a user takes, on the local cluster: images loaded, chart installed.

- `load_images`: the Dockerfile's images built here (buildah) are imported into the real node and
  also tagged with the names a user's cluster would pull (the chart's operator image, the CRD's
  default runtime image), the way `kind load docker-image` does. So `helm install` with the chart's
  defaults and `kubectl apply -f samples/tiny-cpu.yaml` run unchanged: the kubelet finds the
  image locally (IfNotPresent) and never pulls.
- `install_operator`: `helm install` of the chart into a namespace that enforces PodSecurity
  `restricted`; the operator runs in the cluster with its own image and ServiceAccount.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from . import images
from .build import repo_root
from .cluster import SERVICE_CIDR
from .monitoring import NAMESPACE as MONITORING_NAMESPACE
from .real_node import NodeClient

# the queue server's Service in the local cluster: a fixed address in the Service range's static band
# (its first 16 addresses, which the apiserver leaves to fixed ones; .1 is the `kubernetes` Service)
QUEUE_CLUSTER_IP = str(ipaddress.ip_network(SERVICE_CIDR)[12])

CHART = repo_root() / "charts" / "diffusion-operator"


def default_image_names() -> dict[str, str]:
    """target -> the image name a user's cluster pulls (one source each: the chart, the CRD spec)."""
    from diffusion_operator.api.defaults import DEFAULT_IMAGE

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    tag = values["image"].get("tag") or chart["appVersion"]
    queue_tag = values["queue"]["image"].get("tag") or chart["appVersion"]
    return {
        "operator": f"{values['image']['repository']}:{tag}",
        "runtime": DEFAULT_IMAGE,
        "queue": f"{values['queue']['image']['repository']}:{queue_tag}",
    }


def load_images(
    node: NodeClient,
    targets: tuple[str, ...] = images.SERVING_TARGETS,
    progress: Callable[[str], None] = images._stderr,
) -> dict[str, images.Image]:
    """Build (cached), import into the node and tag with the default names."""
    names = default_image_names()
    built = images.ensure(targets, node=node, progress=progress, aliases=names)
    for target, image in built.items():
        node.ctr("images", "tag", "--force", image.ref, names[target])
    return built


def restricted(cluster, namespace: str) -> None:
    cluster.kubectl("create", "namespace", namespace, check=False)
    cluster.kubectl(
        "label", "namespace", namespace, "--overwrite",
        "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=latest",
    )  # fmt: skip


def helm(cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [str(Path(cluster.bin_dir) / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args[:2])} failed: {proc.stderr.strip()[-3000:]}")
    return proc


def install_operator(cluster, namespace: str, release: str = "diffusion-operator", *sets: str) -> str:
    """`helm install` the chart (all namespaces watched) into a restricted namespace; waits for Ready.
    The serving pods' NetworkPolicy names the local metrics pipeline's namespace as the monitoring one."""
    restricted(cluster, namespace)
    args = ["install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "180s"]
    args += ["--set", f"networkPolicy.monitoringNamespace={MONITORING_NAMESPACE}"]
    for s in sets:
        args += ["--set", s]
    try:
        return helm(cluster, *args).stdout
    except RuntimeError as error:  # helm's "context deadline exceeded" names nothing: say what waits
        raise RuntimeError(f"{error}\n{why_not_ready(cluster, namespace)}") from None


def why_not_ready(cluster, namespace: str) -> str:
    """What a release waits for: the namespace's pods and its recent events, the nodes' taints and
    conditions (a DiskPressure taint stays for kubelet's evictionPressureTransitionPeriod)."""
    parts = []
    for title, args in (
        ("pods", ("get", "pods", "-n", namespace, "-o", "wide")),
        ("events", ("get", "events", "-n", namespace, "--sort-by=.lastTimestamp")),
        (
            "nodes",
            (
                "get", "nodes", "-o",
                "custom-columns=NAME:.metadata.name,TAINTS:.spec.taints[*].key,"
                "TRUE-CONDITIONS:.status.conditions[?(@.status=='True')].type",
            ),
        ),
    ):  # fmt: skip
        proc = cluster.kubectl(*args, check=False)
        text = (proc.stdout or proc.stderr).strip().splitlines()
        parts.append(f"{title}:\n" + "\n".join(text[-15:]))
    return "\n".join(parts)


def install_with_queue(
    cluster, namespace: str, release: str, secret_namespaces: list[str], *sets: str, size: str = "1Gi"
) -> dict:
    """`install_operator` with the chart's queue server (queue.enabled) for the local cluster: its data
    on a `local` volume pre-bound to its claim (`queue_claim`; the cluster has no dynamic provisioner),
    its URL Secret in `secret_namespaces`, and its Service at `QUEUE_CLUSTER_IP`: the local cluster has no
    cluster DNS, so the Secret names that address (pods reach it through kube-proxy, `real_node`; it
    stays when the server's pod is replaced). Returns the volume (Retain: delete it after; removed here if the install fails)."""
    from .workloads import STORAGE_CLASS, queue_data_dir, queue_volume

    volume = queue_volume(namespace, queue_claim(release), queue_data_dir(release), size)
    cluster.apply([volume])
    try:
        install_operator(
            cluster, namespace, release,
            "queue.enabled=true",
            f"queue.service.clusterIP={QUEUE_CLUSTER_IP}",
            f"queue.secretNamespaces={{{','.join(secret_namespaces)}}}",
            f"queue.persistence.storageClassName={STORAGE_CLASS}",
            f"queue.persistence.size={size}",
            *sets,
        )  # fmt: skip
    except BaseException:
        cluster.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false", check=False)
        raise
    return volume


def queue_claim(release: str) -> str:
    """The claim of the chart's queue server (volumeClaimTemplates `data` of `<fullname>-queue`)."""
    return f"data-{queue_statefulset(release)}-0"


def queue_statefulset(release: str) -> str:
    fullname = (release if "diffusion-operator" in release else f"{release}-diffusion-operator")[:63]
    return f"{fullname}-queue"[:63]
