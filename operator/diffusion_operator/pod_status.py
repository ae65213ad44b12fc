"""What a serving pod is doing, from its status as the kubelet reports it: pending, starting (running,
not yet ready), ready, or failing, and for a failing pod why, in its own words (the termination
message, else the container state's reason and message). Pure: the Ready condition (status.py) and
the Warning events (controller/report.py) are built from it.

A failure is one of (the Ready condition's reason):
- `QualityGateFailed`: the termination message is the runtime's gate line (contract.lines.GATE_FAILED);
- `OOMKilled`: the container ran out of memory;
- `StartupBudgetExceeded`: the container was stopped (exit 0, 137 or 143, no message of its own) after
  running for the startup probe's whole budget without turning ready: the kubelet killed it;
- `ImagePullBackOff`: the image cannot be pulled (`ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`);
- `CrashLoopBackOff`: the container exited non-zero and was restarted (a refused config, a missing
  model, a load error: the runtime's one line says which) or waits in the kubelet's back-off;
- `ContainerExited`: it exited non-zero once and was not restarted yet;
- another waiting reason of the kubelet (`CreateContainerConfigError`, ...) or `Evicted`, as it says.
A container restarted after a failure that is running again but not ready is still failing (the last
termination is why): "warming up" is only said of a pod with no failure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from diffusion_runtime.contract.lines import GATE_FAILED

PENDING, STARTING, READY, FAILING = "pending", "starting", "ready", "failing"
TERMINATING = "terminating"  # being deleted (a rollout, a scale-down): its exit is no failure
# waiting reasons of a container that is on its way (not a failure)
STARTING_REASONS = ("", "ContainerCreating", "PodInitializing")
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
KILLED_EXIT_CODES = (0, 137, 143)  # SIGKILL, SIGTERM (a runtime that drains exits 0)
MESSAGE_LIMIT = 300  # characters of a termination message kept (a log tail can be 2 KiB)


@dataclass(frozen=True)
class Failure:
    """Why a pod fails: `reason` (CamelCase, the Ready condition's), `message` (one line, the pod's own
    words) and `cause` (what stays the same while the pod loops through back-off and restarts: one
    Warning event per distinct cause)."""

    reason: str
    message: str
    cause: str

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "cause": self.cause}


def one_line(text: str | None) -> str:
    """The last non-empty line of a termination message (with FallbackToLogsOnError, a log tail)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    for prefix in ("diffusion-runtime: ",):
        if line.startswith(prefix):
            line = line[len(prefix) :]
    return line if len(line) <= MESSAGE_LIMIT else line[: MESSAGE_LIMIT - 3] + "..."


def _seconds(start: str | None, end: str | None) -> float | None:
    try:
        a = dt.datetime.strptime(str(start), "%Y-%m-%dT%H:%M:%SZ")
        b = dt.datetime.strptime(str(end), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return (b - a).total_seconds()


def startup_budget(pod: Mapping, container: str) -> float | None:
    """Seconds the startup probe of `container` allows (initial delay + period x failure threshold)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container and c.get("startupProbe"):
            probe = c["startupProbe"]
            period = float(probe.get("periodSeconds", 10))
            return float(probe.get("initialDelaySeconds", 0)) + period * float(
                probe.get("failureThreshold", 3)
            )
    return None


def termination_failure(term: Mapping, budget: float | None, restarted: bool) -> Failure | None:
    """The failure a terminated container state (`state.terminated` or `lastState.terminated`) shows;
    None for a clean exit that is not a kill after the startup budget."""
    code = int(term.get("exitCode", 0) or 0)
    reason = str(term.get("reason") or "")
    own = one_line(term.get("message"))
    gate = next((line for line in (term.get("message") or "").splitlines() if GATE_FAILED in line), None)
    if gate is not None:
        line = gate[gate.index(GATE_FAILED) :].strip()
        return Failure("QualityGateFailed", line, f"QualityGateFailed: {line}")
    if reason == "OOMKilled":
        message = f"out of memory (OOMKilled, exit code {code}): the container's memory limit is too small"
        return Failure("OOMKilled", message, "OOMKilled")
    ran = _seconds(term.get("startedAt"), term.get("finishedAt"))
    if (
        code in KILLED_EXIT_CODES
        and budget is not None
        and ran is not None
        and ran >= budget * 0.9
        and (code != 0 or reason == "Completed")
    ):
        message = (
            f"stopped after {ran:.0f} s without turning ready: the startup probe's budget ({budget:.0f} s, "
            f"spec.startupTimeoutSeconds) ran out (exit code {code})"
        )
        if own and code != 0:
            message += f"; last line: {own}"
        return Failure("StartupBudgetExceeded", message, "StartupBudgetExceeded")
    if code == 0:
        return None
    message = f"{own or reason or 'exited'} (exit code {code})"
    return Failure(
        "CrashLoopBackOff" if restarted else "ContainerExited", message, f"exit {code}: {own or reason}"
    )


def container_failure(cs: Mapping, budget: float | None, ready: bool) -> Failure | None:
    """The failure one container status shows (`status.containerStatuses[]`), None when it has none."""
    state = cs.get("state") or {}
    waiting = state.get("waiting") or {}
    wreason = str(waiting.get("reason") or "")
    if wreason in IMAGE_PULL_REASONS:
        image = str(cs.get("image") or "")
        message = f"{wreason}: {one_line(waiting.get('message')) or f'cannot pull image {image}'}"
        return Failure("ImagePullBackOff", message, f"ImagePull: {image}")
    restarts = int(cs.get("restartCount", 0) or 0)
    if state.get("terminated"):
        return termination_failure(state["terminated"], budget, restarts > 0)
    last = (cs.get("lastState") or {}).get("terminated")
    if last and not ready and (wreason == "CrashLoopBackOff" or "running" in state or restarts > 0):
        found = termination_failure(last, budget, True)
        if found is not None:
            return found
    if wreason == "CrashLoopBackOff":
        message = one_line(waiting.get("message")) or "back-off restarting the failed container"
        return Failure("CrashLoopBackOff", message, f"CrashLoopBackOff: {message}")
    if wreason not in STARTING_REASONS:
        message = f"{wreason}: {one_line(waiting.get('message'))}".rstrip(": ")
        return Failure(wreason, message, message)
    return None


def pod_failure(pod: Mapping) -> Failure | None:
    """Why the pod fails (its first failing container, init containers first), None when it does not."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    if status.get("phase") == "Failed" or status.get("reason") == "Evicted":
        reason = str(status.get("reason") or "PodFailed")
        message = f"{reason}: {one_line(status.get('message'))}".rstrip(": ")
        return Failure(reason, message, message)
    for field in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(field) or []:
            budget = startup_budget(pod, str(cs.get("name", "")))
            found = container_failure(cs, budget, bool(cs.get("ready")))
            if found is not None:
                return found
    return None


def pod_state(pod: Mapping) -> str:
    """pending (not scheduled, or containers being created), starting (running, not yet ready, no
    failure), ready, failing, or terminating."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return TERMINATING
    if pod_failure(pod) is not None:
        return FAILING
    if any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
        return READY
    statuses = status.get("containerStatuses") or []
    if status.get("phase") == "Running" and any("running" in (cs.get("state") or {}) for cs in statuses):
        return STARTING
    return PENDING


def pending_message(pod: Mapping) -> str:
    """Why a pending pod waits: the scheduler's message when it is not scheduled."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return f"not scheduled: {one_line(c.get('message')) or c.get('reason') or 'pending'}"
    return "pending: being scheduled or its containers created"


@dataclass(frozen=True)
class PodSummary:
    """The CR's pods at a glance: the failing ones (pod name, failure) and counts of the others."""

    failures: tuple[tuple[str, Failure], ...]
    starting: int
    pending: int
    pending_note: str = ""

    def causes(self) -> list[Failure]:
        """One failure per distinct cause, in pod-name order."""
        seen: dict[str, Failure] = {}
        for _, failure in self.failures:
            seen.setdefault(failure.cause, failure)
        return list(seen.values())


def summarize(views: Iterable[Mapping[str, Any]]) -> PodSummary:
    """The summary of pod views (informers' `pod_view`: `state`, `failure`, `pendingNote` per pod)."""
    failures = []
    starting = pending = 0
    note = ""
    for view in sorted(views, key=lambda v: str((v.get("metadata") or {}).get("name", ""))):
        name = str((view.get("metadata") or {}).get("name", ""))
        state = view.get("state")
        if state == FAILING and view.get("problem"):
            p = view["problem"]
            failures.append((name, Failure(p["reason"], p["message"], p["cause"])))
        elif state == STARTING:
            starting += 1
        elif state == PENDING:
            pending += 1
            note = note or str(view.get("pendingNote") or "")
    return PodSummary(tuple(failures), starting, pending, note)
