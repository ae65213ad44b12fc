"""The controller, one concern per file (as CloudNativePG's internal/controller/cluster_*.go):

- reconciler.py   orchestration: the `Reconciler` (kopf's memo) and its short reconcile over the stages
- loop.py         the work loop: workers, backoff, the echo skip check, the periodic resync
- workqueue.py    the keyed work queue the loop runs (client-go's workqueue, in small)
- informers.py    caches of CRs, children and serving pods; what a watch event queues
- apply.py        spec hash, drift, dry run, server-side apply (diff.py: desired subset of observed)
- model_cache.py  status.modelCache from the download Job and its pods
- startup.py      status.startup from the start lines in Ready pods' logs
- rollback.py     the last good revision, and restoring it when a new revision's pods fail
- autoscalers.py  KEDA discovery, the engine's errors, deleting the autoscaler no longer wanted
- report.py       status and events (the glue to status.py and cache_status.py)

What kopf does and what this package does: docs/operator.md ("Reconcile").
"""

from diffusion_operator.controller.reconciler import Reconciler

__all__ = ["Reconciler"]
