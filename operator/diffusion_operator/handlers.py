"""Thin kopf handlers: each watch event of a DiffusionDeployment, of one of its children or of a
serving pod is handed to the one `Reconciler` (kopf's `memo`), which caches the object and queues the
CR's key; the reconciler's workers do the work (see controller/). The watches are the watched rows of
the resource table (resources.py)."""

from __future__ import annotations

from typing import Any

import kopf

from diffusion_operator.resources import MANAGED_LABELS, RESOURCES, Watch


def _object(event: Any, body: Any) -> Any:
    obj = event.get("object")
    return obj if isinstance(obj, dict) else body


async def on_diffusiondeployment(event: Any, body: Any, memo: Any, **_: Any) -> None:
    memo.reconciler.on_cr_event(event.get("type"), _object(event, body))


async def on_child(event: Any, body: Any, memo: Any, **_: Any) -> None:
    memo.reconciler.on_child_event(event.get("type"), _object(event, body))


async def on_pod(event: Any, body: Any, memo: Any, **_: Any) -> None:
    """Serving pods (read-only): a failed quality gate shows in their termination message."""
    memo.reconciler.on_pod_event(event.get("type"), _object(event, body))


HANDLERS = {Watch.CR: on_diffusiondeployment, Watch.CHILD: on_child, Watch.POD: on_pod}

for _resource in RESOURCES:
    if _resource.watch is None:
        continue
    kopf.on.event(
        group=_resource.group,
        version=_resource.version,
        plural=_resource.plural,
        labels=None if _resource.watch is Watch.CR else MANAGED_LABELS,
        id=f"{_resource.watch.value}-{_resource.plural}",
    )(HANDLERS[_resource.watch])
