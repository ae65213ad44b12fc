"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection` does it.

One operator replica reconciles; the others wait. The lease record lives in one named Lease; every
write is a PUT carrying the resourceVersion that was read, so two candidates racing for an expired
lease cannot both win (the API server answers the loser 409 Conflict).

Timing (client-go's defaults and meaning):

- `lease_duration` (15 s): a candidate takes a lease over only when its record has not changed for
  this long, *as observed on the candidate's own clock* (the record's renewTime is never compared
  with local time: no clock sync is assumed, only similar clock rates).
- `renew_deadline` (10 s): the leader gives up when it could not renew for this long. Being shorter
  than `lease_duration`, the leader has stopped (fenced its own writes) before any standby may take
  over.
- `retry_period` (2 s): how often the leader renews and a standby retries.

Fence: `is_leader()` is true only while the last successful renew is younger than `renew_deadline`,
checked before every write the operator sends (kube.py's write guard), so a leader cut off from the
API server stops writing at the deadline even before its renew loop notices.

Release: on a clean stop the leader writes an empty holder (and a 1 s duration) so a standby takes
over at its next retry instead of waiting for the lease to expire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from diffusion_operator.kube import ApiError
from diffusion_operator.resources import LEASE

log = logging.getLogger("diffusion_operator")

LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str
    identity: str
    lease_duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD

    def __post_init__(self) -> None:
        if not (0 < self.retry_period < self.renew_deadline < self.lease_duration):
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, got "
                f"{self.retry_period} / {self.renew_deadline} / {self.lease_duration}"
            )


def micro_time(at: datetime | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds)."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquire, renew and release one Lease. `run()` blocks (a thread's target): it waits until this
    candidate holds the lease, calls `on_started`, renews every retry period, and calls `on_stopped`
    when it loses the lease (renew deadline passed, or another holder); `stop()` ends it and releases
    a held lease."""

    def __init__(
        self,
        client,  # a kube.Kube (request/path): the lease is read and written with plain REST
        config: LeaseConfig,
        on_started: Callable[[], None] = lambda: None,
        on_stopped: Callable[[], None] = lambda: None,
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.config = config
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.on_change = on_change
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._observed: tuple | None = None  # the lease record last seen (holder, renewTime, transitions)
        self._observed_at = 0.0  # local clock when that record was first seen
        self._observed_rv: str | None = None
        self._renewed_at: float | None = None  # local clock of our last successful acquire/renew
        self._leading = False
        self.transitions = 0  # leaseTransitions of the record we last wrote
        self.acquired_at: float | None = None
        self.holder: str = ""  # the holder the last read showed

    # ---- state ----------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Held and renewed within the renew deadline (the write fence)."""
        with self._lock:
            return (
                self._leading
                and self._renewed_at is not None
                and self.clock() - self._renewed_at < self.config.renew_deadline
            )

    @property
    def path(self) -> str:
        return f"{LEASE.collection(self.config.namespace)}/{self.config.name}"

    # ---- one attempt ----------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """One read and (when allowed) one conditional write; True when we hold the lease after it."""
        cfg = self.config
        now_local = self.clock()
        lease = self.client.request("GET", self.path)
        spec_out = {
            "holderIdentity": cfg.identity,
            "leaseDurationSeconds": max(1, round(cfg.lease_duration)),
            "renewTime": micro_time(),
        }
        if lease is None:  # nobody ever held it (the chart creates it empty; a plain install may not)
            body = {
                "apiVersion": LEASE.api_version,
                "kind": LEASE.kind,
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": {**spec_out, "acquireTime": spec_out["renewTime"], "leaseTransitions": 0},
            }
            try:
                written = self.client.request("POST", LEASE.collection(cfg.namespace), body=body)
            except ApiError as error:
                if error.status == 409:  # created by another candidate in between
                    return False
                raise
            self._record(written, now_local)
            return self._won(now_local, 0)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (
            holder,
            spec.get("renewTime"),
            spec.get("leaseTransitions"),
            spec.get("leaseDurationSeconds"),
        )
        if record != self._observed:
            self._observed = record
            self._observed_at = now_local
        self.holder = holder
        duration = float(spec.get("leaseDurationSeconds") or cfg.lease_duration)
        ours = holder == cfg.identity
        if holder and not ours and now_local < self._observed_at + duration:
            self._lost_if_leading()
            return False  # held by a live leader
        transitions = int(spec.get("leaseTransitions") or 0)
        out = dict(spec)
        out.update(spec_out)
        if not ours:
            transitions += 1
            out["acquireTime"] = spec_out["renewTime"]
        out["leaseTransitions"] = transitions
        body = {**lease, "spec": out}  # metadata carries the resourceVersion read: a conditional update
        try:
            written = self.client.request("PUT", self.path, body=body)
        except ApiError as error:
            if error.status == 409:  # someone wrote in between: read again next round
                return False
            raise
        if written is None:
            return False
        self._record(written, now_local)
        return self._won(now_local, transitions)

    def _record(self, lease: dict, now_local: float) -> None:
        spec = lease.get("spec") or {}
        self._observed = (
            spec.get("holderIdentity") or "",
            spec.get("renewTime"),
            spec.get("leaseTransitions"),
            spec.get("leaseDurationSeconds"),
        )
        self._observed_at = now_local
        self._observed_rv = (lease.get("metadata") or {}).get("resourceVersion")
        self.holder = self._observed[0]

    def _won(self, now_local: float, transitions: int) -> bool:
        with self._lock:
            started = not self._leading
            self._leading = True
            self._renewed_at = now_local
            self.transitions = transitions
        if started:
            self.acquired_at = now_local
            log.info(
                f"leader election: {self.config.identity} leads (lease {self.config.namespace}/"
                f"{self.config.name}, transitions {transitions})"
            )
            self.on_change(True)
            self.on_started()
        return True

    def _lost_if_leading(self) -> None:
        with self._lock:
            was = self._leading
            self._leading = False
        if was:
            log.error(f"leader election: {self.config.identity} lost the lease (holder now {self.holder!r})")
            self.on_change(False)
            self.on_stopped()

    # ---- loops ----------------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.config
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except ApiError as error:
                log.warning(f"leader election: lease {cfg.namespace}/{cfg.name}: {error}")
            except Exception as error:  # a bug must not end the loop (renewals would stop silently)
                log.exception(f"leader election: lease {cfg.namespace}/{cfg.name}: {error}")
            with self._lock:
                leading, renewed = self._leading, self._renewed_at
            if leading and renewed is not None and self.clock() - renewed >= cfg.renew_deadline:
                self._lost_if_leading()  # could not renew within the deadline: stop before it expires
            self._stop.wait(cfg.retry_period)
        self.release()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="leader-election", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> bool:
        """Give a held lease up (empty holder, 1 s duration): a standby takes over at its next retry.
        The caller must have stopped writing first. True when released."""
        with self._lock:
            was = self._leading
            self._leading = False
        if not was:
            return False
        self.on_change(False)
        try:
            lease = self.client.request("GET", self.path)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.config.identity:
                return False
            spec = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": micro_time(),
            }
            self.client.request("PUT", self.path, body={**lease, "spec": spec})
        except ApiError as error:
            log.warning(
                f"leader election: release of {self.config.namespace}/{self.config.name} failed: {error}"
            )
            return False
        log.info(f"leader election: {self.config.identity} released the lease")
        return True
