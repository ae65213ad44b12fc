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

import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from . import images
from .build import repo_root
from .monitoring import NAMESPACE as MONITORING_NAMESPACE
from .real_node import NodeClient

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
    return helm(cluster, *args).stdout


def queue_sets(
    release: str, storage_class: str, secret_namespaces: list[str], size: str = "1Gi"
) -> list[str]:
    """`--set`s of the chart's queue server (queue.enabled) for the local cluster: its URL Secret in
    `secret_namespaces`, its data on a claim of `storage_class` (a pre-bound local volume:
    workloads.queue_volume for `queue_claim(release)`). Then `point_queue_secrets_at_pod`."""
    return [
        "queue.enabled=true",
        f"queue.secretNamespaces={{{','.join(secret_namespaces)}}}",
        f"queue.persistence.storageClassName={storage_class}",
        f"queue.persistence.size={size}",
    ]


def queue_claim(release: str) -> str:
    """The claim of the chart's queue server (volumeClaimTemplates `data` of `<fullname>-queue`)."""
    return f"data-{queue_statefulset(release)}-0"


def queue_statefulset(release: str) -> str:
    fullname = (release if "diffusion-operator" in release else f"{release}-diffusion-operator")[:63]
    return f"{fullname}-queue"[:63]


def point_queue_secrets_at_pod(cluster, release: str, operator_ns: str, namespaces: list[str]) -> str:
    """The local cluster keeps the host's net.ipv4.ip_forward off (pods have no route off the machine),
    and no cluster DNS: a pod reaches another pod directly over the node's bridge, but not through a
    ClusterIP (kube-proxy's DNAT would need the host to forward). So here the URL Secrets the chart
    wrote name the queue server pod's own address (stable while that pod lives: the tests do not
    restart it). Run it after `helm install --wait` and before the pods that read the Secret start.
    Returns the address."""
    import base64
    import json

    pod = json.loads(
        cluster.kubectl(
            "get", "pod", f"{queue_statefulset(release)}-0", "-n", operator_ns, "-o", "json"
        ).stdout
    )
    ip = pod["status"]["podIP"]
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["queue"]
    for ns in namespaces:
        secret = json.loads(
            cluster.kubectl("get", "secret", values["secretName"], "-n", ns, "-o", "json").stdout
        )
        password = base64.b64decode(secret["data"]["password"]).decode()
        patch = {"stringData": {"url": f"redis://:{password}@{ip}:{port}/0", "address": f"{ip}:{port}"}}
        cluster.kubectl(
            "patch", "secret", values["secretName"], "-n", ns, "--type", "merge", "-p", json.dumps(patch)
        )
    return f"{ip}:{port}"
