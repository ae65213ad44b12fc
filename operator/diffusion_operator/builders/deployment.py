"""Deployment `<name>`: the runtime pods (GPU resources, node selection, probes, restricted security)."""

from __future__ import annotations

import copy
import math

from diffusion_runtime.contract.config import QUEUE_URL_ENV

from diffusion_operator.api.funcs import (
    device_type,
    max_unavailable,
    model_pvc,
    queue_url_secret,
    replicas,
    required_capability,
    startup_budget_seconds,
    template_env,
    token_secret,
)
from diffusion_operator.api.funcs import tolerations as tolerations_of
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import (
    CONFIG_HASH_ANNOTATION,
    HTTP_PORT,
    METRICS_PORT,
    container_security_context,
    labels,
    metadata,
    pod_security_context,
    selector,
)
from diffusion_operator.builders.configmap import (
    API_KEYS_MOUNT,
    COMPILE_CACHE_MOUNT,
    CONFIG_DIR,
    MODELS_DIR,
    adapter_claim,
    configmap_name,
)
from diffusion_operator.builders.modelcache import MODEL_CACHE_MOUNT, claim_name
from diffusion_operator.hashing import config_hash

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
GPU_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
STARTUP_PERIOD_SECONDS = 10
PRESTOP_SLEEP_SECONDS = 5
CACHE_DIR = "/var/cache/diffusion"
RUNTIME_CONTAINER = "runtime"  # the serving container (the operator reads its start line from its log)


def capability_node_terms(floor: tuple[int, int]) -> list[dict]:
    """Compute capability >= floor: major > M, or major == M and minor >= m (terms are ORed)."""
    major, minor = floor
    terms = [{"matchExpressions": [{"key": GPU_MAJOR_LABEL, "operator": "Gt", "values": [str(major)]}]}]
    same_major = [{"key": GPU_MAJOR_LABEL, "operator": "In", "values": [str(major)]}]
    if minor > 0:
        same_major.append({"key": GPU_MINOR_LABEL, "operator": "Gt", "values": [str(minor - 1)]})
    terms.append({"matchExpressions": same_major})
    return terms


def merge_required_terms(user_terms: list[dict], ours: list[dict]) -> list[dict]:
    """AND of two ORed term lists: every (user, ours) pair, expressions concatenated."""
    if not user_terms:
        return ours
    merged = []
    for u in user_terms:
        for o in ours:
            term = copy.deepcopy(u)
            term["matchExpressions"] = list(u.get("matchExpressions", [])) + o["matchExpressions"]
            merged.append(term)
    return merged


def build_affinity(dd: DiffusionDeployment) -> dict | None:
    affinity = copy.deepcopy(dd.spec.template.affinity) if dd.spec.template.affinity else {}
    floor = required_capability(dd.spec)
    if floor is not None and dd.spec.gpu.count > 0:
        node = affinity.setdefault("nodeAffinity", {})
        required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
        required["nodeSelectorTerms"] = merge_required_terms(
            required.get("nodeSelectorTerms", []), capability_node_terms(floor)
        )
    return affinity or None


def build_tolerations(dd: DiffusionDeployment) -> list[dict]:
    tolerations = []
    if dd.spec.gpu.count > 0:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += tolerations_of(dd.spec)
    return tolerations


def build_resources(dd: DiffusionDeployment) -> dict:
    resources = dd.spec.template.resources
    out = resources.model_dump(by_alias=True, exclude_none=True) if resources else {}
    if dd.spec.gpu.count > 0:
        out.setdefault("limits", {})[GPU_RESOURCE] = str(dd.spec.gpu.count)
    return out


def startup_failure_threshold(dd: DiffusionDeployment) -> int:
    return max(1, math.ceil(startup_budget_seconds(dd.spec) / STARTUP_PERIOD_SECONDS))


def secret_env(name: str, secret: str, key: str) -> dict:
    """An environment variable from a Secret by reference (the value never sits in a spec)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def shared_secret_env(dd: DiffusionDeployment) -> list[dict]:
    """The Secrets both the runtime pods and the front door read: the webhook signing secret, the queue URL."""
    env = []
    hook = dd.spec.server.webhook_secret_ref
    if hook is not None:
        env.append(secret_env("DIFFUSION_WEBHOOK_SECRET", hook.name, hook.key))
    queue = queue_url_secret(dd.spec)
    if queue is not None:
        env.append(secret_env(QUEUE_URL_ENV, *queue))
    return env


def build_env(dd: DiffusionDeployment) -> list[dict]:
    env: list[dict] = [
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/inductor"},
        {"name": "HOME", "value": CACHE_DIR},
    ]
    token = token_secret(dd.spec)
    if token is not None:
        env.append(secret_env("HF_TOKEN", *token))
    env += shared_secret_env(dd)
    if dd.spec.model.cache is not None:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # the cache is complete: never download
    env += template_env(dd.spec)
    return env


def shm_size(dd: DiffusionDeployment) -> str:
    """/dev/shm follows where the ranks run: on GPUs one rank per GPU, each with NCCL's shared-memory
    buffers and pinned host copies, so 8Gi per GPU; on CPU 1Gi whatever the rank count, since gloo
    talks TCP between CPU ranks (measured: one 4 KiB semaphore per rank in /dev/shm, docs/multi-gpu.md).
    template.shmSize wins."""
    if dd.spec.template.shm_size is not None and str(dd.spec.template.shm_size):
        return str(dd.spec.template.shm_size)
    return f"{8 * dd.spec.gpu.count}Gi" if device_type(dd.spec) == "cuda" else "1Gi"


API_KEYS_MODE = 0o440  # owner and the pod's fsGroup read the key files; nobody else


def api_keys_volume(dd: DiffusionDeployment) -> dict | None:
    """spec.server.auth's keys as files named after the keys, one projected source per Secret. Not
    environment variables: the kubelet refreshes a projected Secret volume when the Secret changes,
    so editing a Secret rotates its key in running pods (the runtime re-reads changed files)."""
    auth = dd.spec.server.auth
    if auth is None:
        return None
    items: dict[str, list[dict]] = {}
    for key in auth.keys:
        items.setdefault(key.secret_ref.name, []).append({"key": key.secret_ref.key, "path": key.name})
    sources = [{"secret": {"name": name, "items": paths}} for name, paths in items.items()]
    return {"name": "api-keys", "projected": {"sources": sources, "defaultMode": API_KEYS_MODE}}


def build_volumes(dd: DiffusionDeployment) -> tuple[list[dict], list[dict]]:
    shm = shm_size(dd)
    volumes: list[dict] = [
        {"name": "config", "configMap": {"name": configmap_name(dd)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    pvc = model_pvc(dd.spec)
    if pvc is not None:
        claim, _ = pvc
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True})
    # pvc:// adapters: each other claim mounted read-only at /models/<claim>, as a pvc:// model's
    adapter_claims = [c for a in dd.spec.adapters or () if (c := adapter_claim(a)) is not None]
    for i, other in enumerate(dict.fromkeys(c for c in adapter_claims if pvc is None or c != pvc[0])):
        volumes.append(
            {"name": f"adapters-{i}", "persistentVolumeClaim": {"claimName": other, "readOnly": True}}
        )
        mounts.append({"name": f"adapters-{i}", "mountPath": f"{MODELS_DIR}/{other}", "readOnly": True})
    if dd.spec.model.cache is not None:
        volumes.append(
            {
                "name": "model-cache",
                "persistentVolumeClaim": {"claimName": claim_name(dd), "readOnly": True},
            }
        )
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True})
    keys = api_keys_volume(dd)
    if keys is not None:
        volumes.append(keys)
        mounts.append({"name": keys["name"], "mountPath": API_KEYS_MOUNT, "readOnly": True})
    if dd.spec.compile_cache is not None:
        claim = dd.spec.compile_cache.claim_name
        volumes.append({"name": "compile-cache", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "compile-cache", "mountPath": COMPILE_CACHE_MOUNT})
    return volumes, mounts


def same_node_affinity(dd: DiffusionDeployment, affinity: dict | None) -> dict | None:
    """A ReadWriteOnce model cache attaches to one node: every replica goes where the others are (the
    first one may go anywhere: a pod that matches its own required term schedules alone)."""
    if dd.spec.model.cache is None or dd.spec.model.cache.access_mode != "ReadWriteOnce":
        return affinity
    out = copy.deepcopy(affinity) if affinity else {}
    required = out.setdefault("podAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", []
    )
    required.append(
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector(dd.name)}}
    )
    return out


def build_deployment(
    dd: DiffusionDeployment, owner: dict, configmap: dict, model_cache_ready: bool = True
) -> dict:
    """`model_cache_ready` False (spec.model.cache not complete yet): 0 replicas, so no pod holds a GPU
    waiting for the model, and none ever serves a partial download."""
    spec = dd.spec
    volumes, mounts = build_volumes(dd)
    container = {
        "name": RUNTIME_CONTAINER,
        "image": spec.template.image,
        "command": ["diffusion-runtime"],
        "args": ["serve", "--config", f"{CONFIG_DIR}/runtime.yaml"],
        # the runtime's last stderr line names a bad setting (float8 on an old GPU, Fn+Bn too large):
        # it becomes the container's termination message, shown by `kubectl describe pod`
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": build_env(dd),
        "resources": build_resources(dd),
        "volumeMounts": mounts,
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": startup_failure_threshold(dd),
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        # the endpoints controller and kube-proxy need a moment to take a terminating pod out of
        # its Service: wait before SIGTERM, so no new connection reaches a process that is exiting
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "securityContext": container_security_context(),
    }
    if spec.template.image_pull_policy:
        container["imagePullPolicy"] = spec.template.image_pull_policy

    pod_spec: dict = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.server.request_timeout_seconds + 30,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    # always sent: the API server mirrors it into the deprecated `serviceAccount`, which would bring a
    # removed serviceAccountName back (server-side apply cannot remove a field that has an alias)
    pod_spec["serviceAccountName"] = spec.template.service_account_name or "default"
    node_selector = dict(spec.template.node_selector or {})
    if spec.gpu.product and spec.gpu.count > 0:
        node_selector[GPU_PRODUCT_LABEL] = spec.gpu.product
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = build_tolerations(dd)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = same_node_affinity(dd, build_affinity(dd))
    if affinity:
        pod_spec["affinity"] = affinity

    deployment_spec: dict = {
        "selector": {"matchLabels": selector(dd.name)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": spec.rollout.max_surge, "maxUnavailable": max_unavailable(spec)},
        },
        "template": {
            "metadata": {
                "labels": labels(dd.name),
                "annotations": {CONFIG_HASH_ANNOTATION: config_hash(configmap["data"])},
            },
            "spec": pod_spec,
        },
    }
    if not model_cache_ready:
        deployment_spec = {"replicas": 0, **deployment_spec}
    elif spec.autoscaling is None:
        deployment_spec = {"replicas": replicas(spec), **deployment_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(dd.name, dd, owner),
        "spec": deployment_spec,
    }
