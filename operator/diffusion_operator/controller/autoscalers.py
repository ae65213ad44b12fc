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
from diffusion_operator.builders.frontdoor import FRONT_DOOR_SUFFIX
from diffusion_operator.builders.keda import TRIGGER_AUTHENTICATION
from diffusion_operator.controller.informers import Informers, owned_by
from diffusion_operator.kube import KubeClient
from diffusion_operator.resources import HPA, SCALED_OBJECT, Resource, row
from diffusion_operator.validation import FieldError

# API discovery of keda.sh/v1alpha1 is cached this long; a CR refused for its absence is looked at
# again after it
DISCOVERY_TTL = 30.0
# the autoscaler object of each engine (spec.autoscaling.engine): the other one is deleted
AUTOSCALERS = {"hpa": HPA, "keda": SCALED_OBJECT}
# the front door's children (spec.queue), deleted when the queue is turned off
FRONT_DOOR_KINDS = (
    row("apps/v1", "Deployment"),
    row("v1", "Service"),
    row("policy/v1", "PodDisruptionBudget"),
)
TRIGGER_AUTH = row(SCALED_OBJECT.api_version, TRIGGER_AUTHENTICATION)
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
        self._keda_seen: tuple[float, list[str]] | None = None  # (monotonic time, resources served)

    def keda_available(self) -> bool:
        """Whether the API server serves keda.sh/v1alpha1 scaledobjects (discovery, cached)."""
        return SCALED_OBJECT.plural in self._keda_resources()

    def _keda_resources(self) -> list[str]:
        """The resources keda.sh/v1alpha1 serves ([] when none), from discovery, cached."""
        now = time.monotonic()
        with self._lock:
            seen = self._keda_seen
        if seen is not None and now - seen[0] < self.discovery_ttl:
            return seen[1]
        served = self._client().api_resources(SCALED_OBJECT.api_version) or []
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
        elif dd.spec.queue is not None and TRIGGER_AUTH.plural not in self._keda_resources():
            errors.append(
                FieldError(
                    "spec.autoscaling.engine",
                    f"keda with spec.queue needs KEDA's TriggerAuthentication CRD ({TRIGGER_AUTH.plural}."
                    f"{TRIGGER_AUTH.api_version}), which this cluster does not serve: install KEDA, or use "
                    "engine hpa",
                )
            )
        if not self.keda_prometheus_address and dd.spec.queue is None:  # with a queue KEDA reads Redis
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

    def _delete_owned(self, cr: dict, res: Resource, name: str, fresh: bool) -> None:
        """Delete child `name` of kind `res` if it exists and `cr` owns it."""
        namespace = cr["metadata"]["namespace"]
        # not fresh: watched kinds are in the cache (kopf lists and watches them); the others hold our
        # own applies and the fresh passes (start, resync) read the API server
        obj = self._client().get(res.api_version, res.kind, namespace, name) if fresh else None
        obj = obj or self._informers.child(res.kind, namespace, name)
        if obj is not None and owned_by(obj, cr):
            self._client().delete(res.api_version, res.kind, namespace, name)
            self._informers.forget_child(res.kind, namespace, name)

    def delete_unwanted_front_door(self, cr: dict, dd: DiffusionDeployment, fresh: bool) -> None:
        """spec.queue removed: the front door (Deployment, Service, PDB) goes; the queue's KEDA
        TriggerAuthentication goes whenever the ScaledObject does not read the queue."""
        name = cr["metadata"]["name"]
        if dd.spec.queue is None:
            for kind in FRONT_DOOR_KINDS:
                self._delete_owned(cr, kind, name + FRONT_DOOR_SUFFIX, fresh)
        a = dd.spec.autoscaling
        keda_queue = dd.spec.queue is not None and a is not None and a.engine == "keda"
        if not keda_queue and TRIGGER_AUTH.plural in self._keda_resources():
            self._delete_owned(cr, TRIGGER_AUTH, f"{name}-queue", fresh)

    def delete_unwanted(self, cr: dict, dd: DiffusionDeployment, fresh: bool) -> None:
        """Delete the autoscaler no longer wanted: both when spec.autoscaling is removed, the other
        engine's when the engine is switched. ScaledObjects are looked up only when KEDA is served
        (discovery), else there are none."""
        name = cr["metadata"]["name"]
        wanted = dd.spec.autoscaling.engine if dd.spec.autoscaling is not None else None
        for engine, res in AUTOSCALERS.items():
            if engine == wanted or (engine == "keda" and not self.keda_available()):
                continue
            self._delete_owned(cr, res, name, fresh)
