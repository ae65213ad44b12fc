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
JOB_ACTIVE_DEADLINE_SECONDS = 6 * 3600  # a stuck download fails instead of holding the claim for ever


def claim_name(spec) -> str:
    return f"{spec.name}-model-cache"


def cache_subpath(spec) -> str:
    """Folder of this model inside the claim: org--name/revision[/variant] (the runtime's own layout,
    `diffusion_runtime.download.local_folder`; several revisions can coexist)."""
    path = local_folder(spec.model.uri[len("hf://") :], spec.model.revision)
    variant = spec.model_cache.variant
    return f"{path}/{variant}" if variant else path  # the spec's pattern keeps it one plain segment


def model_path_in_pod(spec) -> str:
    return f"{MODEL_CACHE_MOUNT}/{cache_subpath(spec)}"


def job_name(spec, job_spec: dict) -> str:
    """`<name>-download-<hash of the Job's spec>` (at most 63 characters: it becomes a pod label). A Job's
    template cannot change, so any change (revision, image, token, node selection) is a new Job; a
    download already complete on the claim then finishes at once (the completion marker)."""
    digest = stable_hash(job_spec)[:8]
    return f"{spec.name[: 63 - len('-download-') - 8]}-download-{digest}"


def build_model_cache_pvc(spec, owner: dict) -> dict:
    cache = spec.model_cache
    pvc_spec: dict = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        pvc_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(claim_name(spec), spec, owner),
        "spec": pvc_spec,
    }


def build_download_job(spec, owner: dict) -> dict:
    cache = spec.model_cache
    dest = model_path_in_pod(spec)
    args = ["download", "--model", spec.model.uri, "--dest", dest, "--termination-log", TERMINATION_LOG]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if cache.variant:
        args += ["--variant", cache.variant]
    env: list[dict] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    env += [dict(e) for e in spec.env]  # HF_ENDPOINT (a mirror), proxies: as for the serving pods
    if spec.model.token_secret:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": spec.model.token_secret, "key": spec.model.token_key}},
            }
        )
    container: dict = {
        "name": DOWNLOAD_CONTAINER,
        "image": spec.image,
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
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_labels = download_pod_labels(spec)
    pod_spec: dict = {
        "restartPolicy": "Never",  # a failed attempt is a new pod (the Job's backoff), its log kept
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "serviceAccountName": spec.service_account or "default",
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": claim_name(spec)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if cache.access_mode == "ReadWriteOnce":
        # a re-download while pods serve: the volume is attached to their node, so go there
        pod_spec["affinity"] = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": selector(spec.name)}}}
        ]}}  # fmt: skip
    job_spec = {
        "backoffLimit": cache.backoff_limit,
        "activeDeadlineSeconds": JOB_ACTIVE_DEADLINE_SECONDS,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    meta = metadata(job_name(spec, job_spec), spec, owner)
    meta["labels"] = {**meta["labels"], DOWNLOAD_LABEL: "model-download"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def download_pod_labels(spec) -> dict[str, str]:
    """Not the serving pods' labels: the Service, PDB and Deployment must never select a download pod."""
    return {
        "app.kubernetes.io/name": "diffusion-model-download",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "diffusion.dev/deployment": spec.name,
        DOWNLOAD_LABEL: "model-download",
    }
