"""Thin kopf handlers: each watch event of a DiffusionDeployment or of one of its children is handed
to the one `Reconciler` (kopf's `memo`), which caches the object and queues the CR's key; the
reconciler's workers do the work (see reconciler.py)."""

from __future__ import annotations

from typing import Any

import kopf

from diffusion_operator.reconciler import CHILD_KINDS, GROUP, MANAGED_LABELS, PLURAL, VERSION


def _object(event: Any, body: Any) -> Any:
    obj = event.get("object")
    return obj if isinstance(obj, dict) else body


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_diffusiondeployment(event: Any, body: Any, memo: Any, **_: Any) -> None:
    memo.reconciler.on_cr_event(event.get("type"), _object(event, body))


async def on_child(event: Any, body: Any, memo: Any, **_: Any) -> None:
    memo.reconciler.on_child_event(event.get("type"), _object(event, body))


@kopf.on.event("", "v1", "pods", labels=MANAGED_LABELS)
async def on_pod(event: Any, body: Any, memo: Any, **_: Any) -> None:
    """Serving pods (read-only): a failed quality gate shows in their termination message."""
    memo.reconciler.on_pod_event(event.get("type"), _object(event, body))


for _api, _kind, _plural in CHILD_KINDS:
    _group, _, _version = _api.rpartition("/")
    kopf.on.event(
        group=_group, version=_version, plural=_plural, labels=MANAGED_LABELS, id=f"child-{_plural}"
    )(on_child)
