"""Apply: the spec hash on each desired child, drift detection, dry run, server-side apply.

Drift: each desired child carries `diffusion.dev/spec-hash` (hash of the whole desired object, as
CloudNativePG does for its poolers). A child is applied when that hash differs (the CR changed,
including a field that was removed: server-side apply under our one field manager then drops the
fields we no longer send) or when a value we set differs in the live object (someone else edited or
removed it; the forced apply puts it back). An idle reconcile makes no write.

A new CR's children are applied at once (one round trip, not four); when children already exist,
every change is first sent as a dry run, so a refused change leaves the running children as they were.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from diffusion_operator.controller.diff import is_subset
from diffusion_operator.hashing import stable_hash
from diffusion_operator.kube import ApiError, KubeClient

SPEC_HASH_ANNOTATION = "diffusion.dev/spec-hash"
# a new CR's children are applied in parallel, by one pool shared by the reconcile workers: after a
# restart with many new CRs it carries every first apply (4 children each), so it is as wide as the
# workers (runner.py's --workers, default 16), not 4 (which serialized a restart's first pass)
APPLY_THREADS = 16


Slot = tuple[str, str]  # (kind, name): one desired child of a CR (two Deployments with spec.queue)


def slot(obj: dict) -> Slot:
    return obj["kind"], obj["metadata"]["name"]


def with_spec_hash(obj: dict) -> dict:
    """`obj` with the hash of its whole desired content in an annotation (computed without it)."""
    digest = stable_hash(obj)
    meta = obj["metadata"]
    meta["annotations"] = {**meta.get("annotations", {}), SPEC_HASH_ANNOTATION: digest}
    return obj


def needs_apply(desired: dict, observed: dict | None) -> bool:
    """Apply when missing, when the desired object changed (hash), or when a value we set was edited."""
    if observed is None:
        return True
    want = desired["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    have = ((observed.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    return want != have or not is_subset(desired, observed)


class Applier:
    """Server-side applies of children; every answer goes into the informer cache (`remember`)."""

    def __init__(
        self, client: Callable[[], KubeClient], remember: Callable[[dict], bool], threads: int = APPLY_THREADS
    ) -> None:
        self._client = client
        self.threads = threads
        self._remember = remember
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def apply(self, obj: dict, dry_run: bool = False) -> dict:
        try:
            answer = self._client().apply(obj, dry_run=dry_run)
        except ApiError as error:
            error.kind_name = f"{obj['kind']} {obj['metadata']['name']}"
            raise
        if not dry_run:
            self._remember(answer)
        return answer

    def apply_changes(
        self, stale: list[dict], observed: dict[Slot, dict | None], applied: list[str], first: bool
    ) -> None:
        """Apply the `stale` children, recording each answer in `observed` (by slot) and its kind/name in
        `applied`; raises the first ApiError (after a dry run refused, nothing was changed)."""
        if first:  # nothing exists yet: every child at once
            answers = self.apply_parallel(stale)
            observed.update(answers)
            applied += [f"{kind}/{name}" for kind, name in answers]
            return
        if any(observed[slot(obj)] is not None for obj in stale):
            for obj in stale:  # running children stay as they are unless every change passes
                self.apply(obj, dry_run=True)
        for obj in stale:
            observed[slot(obj)] = self.apply(obj)
            applied.append("/".join(slot(obj)))

    def apply_parallel(self, objs: list[dict]) -> dict[Slot, dict]:
        """Apply independent objects concurrently; on errors, the first failing one in `objs` order
        is raised (after every request finished), so a permanent error wins over nothing."""
        if len(objs) <= 1:
            return {slot(o): self.apply(o) for o in objs}
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="apply")
            pool = self._pool
        futures = [(slot(o), pool.submit(self.apply, o)) for o in objs]
        answers: dict[Slot, dict] = {}
        errors: list[ApiError] = []
        for kind, future in futures:
            try:
                answers[kind] = future.result()
            except ApiError as error:
                errors.append(error)
        transient = [e for e in errors if not e.permanent]
        if transient:
            raise transient[0]
        if errors:
            raise errors[0]
        return answers

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
