"""Model cache (`spec.model.cache`): PersistentVolumeClaim `<name>-model-cache` and the download Job.

The Job runs the runtime image's `diffusion-runtime download` into `<claim>/<repo>/<revision>[/<variant>]`
(docs/contracts.md, "Model download"): the token by secretKeyRef only, retries by the Job's
backoffLimit, progress as JSON lines in its log, the last line as the pod's termination message. Its
name carries a hash of what it downloads, so a new revision is a new Job (a Job's template is
immutable) and a finished one is never rerun. The serving pods mount the claim read-only at
`MODEL_CACHE_MOUNT` with HF_HUB_OFFLINE=1 and model.uri pointing at the same folder.
"""

from __future__ import annotations

from diffusion_runtime.contract.lines import local_folder

from diffusion_operator.api.funcs import template_env, token_secret, tolerations
from diffusion_operator.api.types import (
    DEFAULT_ADAPTER_WEIGHT,
    AdapterSpec,
    DiffusionDeployment,
    ModelCacheSpec,
)
from diffusion_operator.builders.common import (
    MANAGED_BY,
    container_security_context,
    metadata,
    pod_security_context,
    selector,
)
from diffusion_operator.hashing import stable_hash

MODEL_CACHE_MOUNT = "/models/cache"
DOWNLOAD_CONTAINER = "download"
DOWNLOAD_LABEL = "diffusion.dev/component"  # value "model-download" on the Job and its pod
TERMINATION_LOG = "/dev/termination-log"
ADAPTERS_FOLDER = "adapters"  # hf:// adapters in the claim: adapters/<name>/<weight file>
JOB_ACTIVE_DEADLINE_SECONDS = 6 * 3600  # a stuck download fails instead of holding the claim for ever


def claim_name(dd: DiffusionDeployment) -> str:
    return f"{dd.name}-model-cache"


def _cache(dd: DiffusionDeployment) -> ModelCacheSpec:
    cache = dd.spec.model.cache
    if cache is None:
        raise ValueError(f"{dd.namespace}/{dd.name} has no spec.model.cache")
    return cache


def cache_subpath(dd: DiffusionDeployment) -> str:
    """Folder of this model inside the claim: org--name/revision[/variant] (the runtime's own layout,
    `diffusion_runtime.contract.lines.local_folder`; several revisions can coexist)."""
    path = local_folder(dd.spec.model.uri[len("hf://") :], dd.spec.model.revision)
    variant = _cache(dd).variant
    return f"{path}/{variant}" if variant else path  # the spec's pattern keeps it one plain segment


def model_path_in_pod(dd: DiffusionDeployment) -> str:
    return f"{MODEL_CACHE_MOUNT}/{cache_subpath(dd)}"


def hub_adapters(dd: DiffusionDeployment) -> list[AdapterSpec]:
    """The hf:// adapters: the download Job fetches them into the claim beside the model."""
    return [a for a in dd.spec.adapters or () if a.uri.startswith("hf://")]


def adapter_folder_in_pod(a: AdapterSpec) -> str:
    """An hf:// adapter's folder in the claim: adapters/<name>, one per adapter (its own completion
    marker: a new uri, revision or weight file for that name is fetched again; model folders are
    org--name/revision, so the two never meet)."""
    return f"{MODEL_CACHE_MOUNT}/{ADAPTERS_FOLDER}/{a.name}"


def adapter_weight(a: AdapterSpec) -> str:
    return a.weight_name or DEFAULT_ADAPTER_WEIGHT


def job_name(dd: DiffusionDeployment, job_spec: dict) -> str:
    """`<name>-download-<hash of the Job's spec>` (at most 63 characters: it becomes a pod label). A Job's
    template cannot change, so any change (revision, image, token, node selection) is a new Job; a
    download already complete on the claim then finishes at once (the completion marker)."""
    digest = stable_hash(job_spec)[:8]
    return f"{dd.name[: 63 - len('-download-') - 8]}-download-{digest}"


def build_model_cache_pvc(dd: DiffusionDeployment, owner: dict) -> dict:
    cache = _cache(dd)
    pvc_spec: dict = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": str(cache.size)}},
    }
    if cache.storage_class_name:
        pvc_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(claim_name(dd), dd, owner),
        "spec": pvc_spec,
    }


def build_download_job(dd: DiffusionDeployment, owner: dict) -> dict:
    spec, cache = dd.spec, _cache(dd)
    dest = model_path_in_pod(dd)
    args = ["download", "--model", spec.model.uri, "--dest", dest, "--termination-log", TERMINATION_LOG]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if cache.variant:
        args += ["--variant", cache.variant]
    for a in hub_adapters(dd):  # each one's weight file at one commit, verified, its own marker
        args += ["--adapter", a.uri, a.revision or "main", adapter_weight(a), adapter_folder_in_pod(a)]
    env: list[dict] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    env += template_env(spec)  # HF_ENDPOINT (a mirror), proxies: as for the serving pods
    token = token_secret(spec)
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token[0], "key": token[1]}}})
    container: dict = {
        "name": DOWNLOAD_CONTAINER,
        "image": spec.template.image,
        "command": ["diffusion-runtime"],
        "args": args,
        "env": env,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security_context(),
    }
    if spec.template.image_pull_policy:
        container["imagePullPolicy"] = spec.template.image_pull_policy
    pod_labels = download_pod_labels(dd)
    pod_spec: dict = {
        "restartPolicy": "Never",  # a failed attempt is a new pod (the Job's backoff), its log kept
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "serviceAccountName": spec.template.service_account_name or "default",
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim_name(dd)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.template.node_selector:
        pod_spec["nodeSelector"] = dict(spec.template.node_selector)
    if spec.template.tolerations:
        pod_spec["tolerations"] = tolerations(spec)
    if cache.access_mode == "ReadWriteOnce":
        # a re-download while pods serve: the volume is attached to their node, so go there
        pod_spec["affinity"] = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": selector(dd.name)}}}
        ]}}  # fmt: skip
    job_spec = {
        "backoffLimit": cache.backoff_limit,
        "activeDeadlineSeconds": JOB_ACTIVE_DEADLINE_SECONDS,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    meta = metadata(job_name(dd, job_spec), dd, owner)
    meta["labels"] = {**meta["labels"], DOWNLOAD_LABEL: "model-download"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def download_pod_labels(dd: DiffusionDeployment) -> dict[str, str]:
    """Not the serving pods' labels: the Service, PDB and Deployment must never select a download pod."""
    return {
        "app.kubernetes.io/name": "diffusion-model-download",
        "app.kubernetes.io/instance": dd.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "diffusion.dev/deployment": dd.name,
        DOWNLOAD_LABEL: "model-download",
    }
