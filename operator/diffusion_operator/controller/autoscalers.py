"""Autoscalers (spec.autoscaling): KEDA discovery, what the cluster or the operator's configuration
lacks for the chosen engine, and deleting the autoscaler no longer wanted (an HPA and KEDA's HPA must
never drive one Deployment).

Whether KEDA is installed is read from API discovery (`/apis/keda.sh/v1alpha1`, no RBAC needed), cached
`discovery_ttl` seconds: KEDA installed after the operator started is seen within it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.controller.informers import Informers, owned_by
from diffusion_operator.kube import KubeClient
from diffusion_operator.resources import HPA, SCALED_OBJECT
from diffusion_operator.validation import FieldError

# API discovery of keda.sh/v1alpha1 is cached this long; a CR refused for its absence is looked at
# again after it
DISCOVERY_TTL = 30.0
# the autoscaler object of each engine (spec.autoscaling.engine): the other one is deleted
AUTOSCALERS = {"hpa": HPA, "keda": SCALED_OBJECT}
KEDA_FLAG = "--keda-prometheus-address"
KEDA_CHART_VALUE = "autoscaling.keda.prometheusAddress"


class Autoscalers:
    def __init__(
        self,
        client: Callable[[], KubeClient],
        informers: Informers,
        keda_prometheus_address: str,
        discovery_ttl: float = DISCOVERY_TTL,
    ) -> None:
        self._client = client
        self._informers = informers
        # the Prometheus the ScaledObjects' triggers query (engine keda); empty: engine keda is refused
        self.keda_prometheus_address = keda_prometheus_address
        self.discovery_ttl = discovery_ttl
        self._lock = threading.Lock()
        self._keda_seen: tuple[float, bool] | None = None  # (monotonic time, served)

    def keda_available(self) -> bool:
        """Whether the API server serves keda.sh/v1alpha1 scaledobjects (discovery, cached)."""
        now = time.monotonic()
        with self._lock:
            seen = self._keda_seen
        if seen is not None and now - seen[0] < self.discovery_ttl:
            return seen[1]
        resources = self._client().api_resources(SCALED_OBJECT.api_version)
        served = resources is not None and SCALED_OBJECT.plural in resources
        with self._lock:
            self._keda_seen = (now, served)
        return served

    def engine_errors(self, dd: DiffusionDeployment) -> list[FieldError]:
        """What the cluster or the operator's configuration lacks for the spec's autoscaling engine."""
        if dd.spec.autoscaling is None or dd.spec.autoscaling.engine != "keda":
            return []
        errors = []
        if not self.keda_available():
            errors.append(
                FieldError(
                    "spec.autoscaling.engine",
                    f"keda needs KEDA's ScaledObject CRD ({SCALED_OBJECT.plural}.{SCALED_OBJECT.api_version}), "
                    "which this cluster does not serve: install KEDA, or use engine hpa",
                )
            )
        if not self.keda_prometheus_address:
            errors.append(
                FieldError(
                    "spec.autoscaling.engine",
                    f"keda needs the Prometheus address its trigger queries: run the operator with {KEDA_FLAG} "
                    f"(chart value {KEDA_CHART_VALUE})",
                )
            )
        return errors

    def refresh(self, crs: list[dict]) -> None:
        """Before a resync's pass (which reads the caches): each CR's ScaledObject, read one by one (they
        are not watched nor listed: KEDA's CRD may come and go), only where KEDA is served."""
        if not crs or not self.keda_available():
            return
        for cr in crs:
            namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
            obj = self._client().get(SCALED_OBJECT.api_version, SCALED_OBJECT.kind, namespace, name)
            if obj is None:
                self._informers.forget_child(SCALED_OBJECT.kind, namespace, name)
            else:
                self._informers.remember_child({"apiVersion": SCALED_OBJECT.api_version, **obj})

    def delete_unwanted(self, cr: dict, dd: DiffusionDeployment, fresh: bool) -> None:
        """Delete the autoscaler no longer wanted: both when spec.autoscaling is removed, the other
        engine's when the engine is switched. ScaledObjects are looked up only when KEDA is served
        (discovery), else there are none."""
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        wanted = dd.spec.autoscaling.engine if dd.spec.autoscaling is not None else None
        for engine, resource in AUTOSCALERS.items():
            if engine == wanted or (engine == "keda" and not self.keda_available()):
                continue
            api_version, kind = resource.api_version, resource.kind
            # not fresh: every HPA of ours is in the cache (kopf lists and watches them); ScaledObjects
            # are not watched (their CRD may come and go), the cache holds our own applies and the
            # fresh passes (start, resync) read the API server
            obj = self._client().get(api_version, kind, namespace, name) if fresh else None
            obj = obj or self._informers.child(kind, namespace, name)
            if obj is not None and owned_by(obj, cr):
                self._client().delete(api_version, kind, namespace, name)
                self._informers.forget_child(kind, namespace, name)
