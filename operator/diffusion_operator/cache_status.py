"""`status.modelCache` from what the API server shows of the download (pure functions, no API calls).

The phase comes from the Job's own status (conditions Complete / Failed, counts active / failed) and
the claim's phase; bytes and files from the download's JSON progress lines
(`diffusion_runtime.contract.lines.parse_progress_line`, the one format): the running pod's log tail while it
downloads, a finished pod's termination message (its last line) after. Pods and logs are optional
inputs: without them (no access, no log on that node) the phase is still exact, the bytes are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffusion_runtime.contract.lines import last_progress

from diffusion_operator.api.status_types import ModelCacheStatus
from diffusion_operator.status import READY, condition, dump, now

PENDING, DOWNLOADING, CACHE_READY, FAILED = "Pending", "Downloading", "Ready", "Failed"
WAITING_REASON = "WaitingForModelCache"


def _job_condition(job: Mapping, type_: str) -> Mapping | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def job_finished(job: Mapping) -> bool:
    return _job_condition(job, "Complete") is not None or _job_condition(job, "Failed") is not None


def _termination(pod: Mapping) -> tuple[str, str]:
    """(reason, message) of the download container's termination, ('', '') while it runs."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return str(term.get("reason", "")), str(term.get("message", ""))
    return "", ""


def _created(obj: Mapping) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp", ""))


def model_cache_status(
    claim: str,
    job_name: str,
    path: str,
    job: Mapping | None,
    pvc: Mapping | None,
    pods: Sequence[Mapping] | None = None,
    log_tail: str | None = None,
) -> dict[str, Any]:
    """status.modelCache: phase Pending | Downloading | Ready | Failed, bytes/files when known."""
    out: dict[str, Any] = {"claimName": claim, "jobName": job_name, "path": path}
    jstatus = (job or {}).get("status") or {}
    failed = int(jstatus.get("failed", 0) or 0)
    if failed:
        out["failedAttempts"] = failed
    pods = sorted(pods or [], key=_created)
    finished = [p for p in pods if _termination(p)[0]]
    last_error = None
    for pod in reversed(finished):
        record = last_progress(_termination(pod)[1])
        if record is not None and record.get("modelDownload") == "Failed":
            last_error = record
            break
    record = last_progress(log_tail or "")
    if record is None and finished:
        record = last_progress(_termination(finished[-1])[1])

    if job is None:
        out.update(phase=PENDING, message="creating the download Job")
    elif _job_condition(job, "Complete") or int(jstatus.get("succeeded", 0) or 0) > 0:
        out.update(phase=CACHE_READY, message="complete and verified")
    elif (cond := _job_condition(job, "Failed")) is not None:
        why = (last_error or {}).get("error") or cond.get("message") or cond.get("reason") or "failed"
        out.update(phase=FAILED, message=f"download failed after {failed} attempt(s): {why}")
    elif pvc is not None and (pvc.get("status") or {}).get("phase") not in (None, "Bound"):
        out.update(phase=PENDING, message=f"claim {claim} is {(pvc.get('status') or {}).get('phase')}")
    elif int(jstatus.get("active", 0) or 0) > 0 and (
        not pods or any((p.get("status") or {}).get("phase") == "Running" for p in pods)
    ):
        message = "downloading"
        if last_error is not None:
            message = f"attempt {failed} failed ({last_error.get('error')}); retrying"
        out.update(phase=DOWNLOADING, message=message)
    else:
        message = "waiting for the download pod"
        if last_error is not None:
            message = f"attempt {failed} failed ({last_error.get('error')}); waiting for the next attempt"
        out.update(phase=PENDING, message=message)

    if record is not None:
        for key in ("bytesDone", "bytesTotal", "filesDone", "filesTotal"):
            if _count(record.get(key)):
                out[key] = record[key]
        if isinstance(record.get("commit"), str):
            out["commit"] = record["commit"]
        seconds = record.get("seconds")
        if record.get("modelDownload") == "Complete" and (_count(seconds) or isinstance(seconds, float)):
            out["downloadSeconds"] = seconds
    if out["phase"] == CACHE_READY and "bytesTotal" in out:
        out["bytesDone"] = out["bytesTotal"]
    return dump(ModelCacheStatus.model_validate(out))


def _count(value: Any) -> bool:
    """A count from a progress line (a log: anything may be there)."""
    return isinstance(value, int) and not isinstance(value, bool)


def gate_ready_condition(status: dict, cache: Mapping, generation: int) -> dict:
    """While the cache is not Ready, Ready=False says so (the pods are held back, not failing)."""
    if cache.get("phase") == CACHE_READY:
        return status
    done, total = cache.get("bytesDone"), cache.get("bytesTotal")
    progress = f" ({done}/{total} bytes)" if done is not None and total else ""
    message = f"model cache {cache.get('phase')}{progress}: {cache.get('message', '')}"
    conditions = []
    for cond in status.get("conditions") or []:
        if cond.get("type") == READY and cond.get("status") != "True":
            new = condition(READY, False, WAITING_REASON, message, generation)
            new["lastTransitionTime"] = cond.get("lastTransitionTime") or now()
            cond = new
        conditions.append(cond)
    return {**status, "conditions": conditions}


# events on transitions: (reason, type) per phase
PHASE_EVENTS = {
    DOWNLOADING: ("ModelDownloading", "Normal"),
    CACHE_READY: ("ModelCached", "Normal"),
    FAILED: ("ModelDownloadFailed", "Warning"),
}


def cache_events(old: Mapping | None, new: Mapping) -> list[tuple[str, str, str]]:
    """(type, reason, message) events for what changed: a new phase, a new failed attempt."""
    old = old or {}
    events = []
    if new.get("phase") != old.get("phase") and new.get("phase") in PHASE_EVENTS:
        reason, type_ = PHASE_EVENTS[str(new["phase"])]
        events.append((type_, reason, f"model cache {new['phase']}: {new.get('message', '')}"))
    if (
        int(new.get("failedAttempts", 0) or 0) > int(old.get("failedAttempts", 0) or 0)
        and new.get("phase") != FAILED
    ):
        events.append(("Warning", "ModelDownloadRetry", str(new.get("message", ""))))
    return events
