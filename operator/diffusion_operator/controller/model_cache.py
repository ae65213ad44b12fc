"""status.modelCache (spec.model.cache): the download Job's phase, with bytes and files from its pods'
progress lines (the log tail of the running pod, the termination message of a finished one).

Job and claim events trigger reconciles; while Pending or Downloading the CR is also looked at again
every MODEL_CACHE_POLL_SECONDS (bytes move without events). Once finished, no pods are read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from diffusion_operator import builders
from diffusion_operator import cache_status as cache_statuses
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders import modelcache
from diffusion_operator.kube import ApiError, KubeClient

log = logging.getLogger("diffusion_operator")

# while the model cache downloads, status (bytes) is refreshed this often; Job events cover the phases
MODEL_CACHE_POLL_SECONDS = 10.0
DOWNLOAD_LOG_TAIL_LINES = 20

Observe = Callable[[dict, bool], "dict | None"]  # (desired object, fresh) -> the live object


def is_ready(cache: dict | None) -> bool:
    """No model cache, or its download is complete: the serving children may use it."""
    return cache is None or cache["phase"] == cache_statuses.CACHE_READY


def downloading(cache: dict | None) -> bool:
    return cache is not None and cache["phase"] in (cache_statuses.PENDING, cache_statuses.DOWNLOADING)


def model_cache_status(
    client: KubeClient,
    observe: Observe,
    dd: DiffusionDeployment,
    cr: dict,
    old_status: dict,
    fresh: bool,
    first: bool,
) -> dict:
    """status.modelCache: the download Job's phase, with bytes from its pods' progress lines."""
    job_obj = builders.build_download_job(dd, cr)
    pvc_obj = builders.build_model_cache_pvc(dd, cr)
    job_name = job_obj["metadata"]["name"]
    job = pvc = None
    if not first:
        job, pvc = observe(job_obj, fresh), observe(pvc_obj, fresh)
    old = old_status.get("modelCache") or {}
    done = job is not None and cache_statuses.job_finished(job)
    if (
        done
        and old.get("jobName") == job_name
        and old.get("phase") in (cache_statuses.CACHE_READY, cache_statuses.FAILED)
    ):
        pods: list[dict] | None = None  # finished before: the figures in status stay as they were
    else:
        pods = _download_pods(client, dd.namespace, job_name) if job is not None else None
    tail = None
    running = [p for p in pods or [] if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        try:
            tail = client.pod_log(
                dd.namespace, running[-1]["metadata"]["name"], modelcache.DOWNLOAD_CONTAINER,
                DOWNLOAD_LOG_TAIL_LINES,
            )  # fmt: skip
        except ApiError as error:
            log.debug(f"download log of {job_name} unreadable: {error}")
    status = cache_statuses.model_cache_status(
        pvc_obj["metadata"]["name"], job_name, modelcache.model_path_in_pod(dd), job, pvc, pods, tail
    )
    if pods is None and old.get("jobName") == job_name and old.get("phase") == status["phase"]:
        status = {**old, **{k: v for k, v in status.items() if k in ("phase", "message", "failedAttempts")}}
    return status


def _download_pods(client: KubeClient, namespace: str, job_name: str) -> list[dict] | None:
    """The Job's pods (read-only; None when they cannot be read: the phase does not need them)."""
    try:
        return client.pods(namespace, f"job-name={job_name}")
    except ApiError as error:
        log.debug(f"pods of {job_name} unreadable: {error}")
        return None
