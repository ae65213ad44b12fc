"""A small synchronous Kubernetes REST client (server-side apply, status patches, events).

Auth and TLS come from the official client's configuration loader (kubeconfig or in-cluster
service account); requests go through its urllib3 pool. Every write is counted in metrics.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import urllib3

from diffusion_operator.api.group import API_VERSION, KIND
from diffusion_operator.builders.common import FIELD_MANAGER
from diffusion_operator.metrics import OperatorMetrics
from diffusion_operator.resources import collection_path


class ApiError(Exception):
    """A refused request: `reason` is the API server's message, `code` its Status reason (Invalid, ...)."""

    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        self.status = status
        self.body = body
        self.kind_name = ""  # the object it was about ("Deployment web"), set by the reconciler
        self.reason: str = body
        self.code: str = ""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self.reason = str(parsed.get("message", body))
            self.code = str(parsed.get("reason", ""))
        if not self.code:
            self.code = STATUS_REASONS.get(status, f"HTTP{status}")
        super().__init__(f"{method} {path}: HTTP {status}: {self.reason}")

    @property
    def permanent(self) -> bool:
        """4xx other than conflicts and throttling will not fix themselves by retrying."""
        return 400 <= self.status < 500 and self.status not in (409, 429)


STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    422: "Invalid",
    429: "TooManyRequests",
}


class KubeClient(Protocol):
    """What the reconciler needs from the API server: `Kube` here, an in-memory fake in the tests."""

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None: ...

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict]: ...

    def apply(self, obj: dict, dry_run: bool = False) -> dict: ...

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...

    def patch_status(self, namespace: str, name: str, status: dict) -> dict: ...

    def post_event(self, owner: dict, event_type: str, reason: str, message: str) -> None: ...

    def pods(self, namespace: str, label_selector: str) -> builtins.list[dict]: ...

    def pod_log(
        self,
        namespace: str,
        name: str,
        container: str,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
    ) -> str | None: ...

    def api_resources(self, api_version: str) -> builtins.list[str] | None: ...

    def object_metric(self, namespace: str, kind: str, name: str, metric: str) -> float | None: ...


def load_configuration():
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return configuration


class NotLeader(ApiError):
    """A write refused by the operator itself: this instance does not hold the leader lease (or could
    not renew it within the renew deadline). Never sent to the API server."""

    def __init__(self, method: str, path: str) -> None:
        super().__init__(503, "this operator instance is not the leader: write not sent", method, path)


def status_manager(instance: str) -> str:
    """The field manager of status writes: names the operator instance (pod) that wrote, so the
    CR's managedFields show which replica did the work. (Children are applied under the one constant
    FIELD_MANAGER: server-side apply removes the fields a manager stops sending only when no other
    manager owns them, so a per-instance apply manager would leave a former leader's fields behind.)"""
    return f"{FIELD_MANAGER}@{instance}"[:128] if instance else FIELD_MANAGER


class Kube:
    def __init__(
        self,
        configuration=None,
        metrics: OperatorMetrics | None = None,
        write_guard: Callable[[], bool] | None = None,
        instance: str = "",
        pool_size: int | None = None,
    ) -> None:
        """`write_guard`: called before every write; False refuses it (NotLeader): the leader fence.
        `instance`: this operator's identity (leader election), in status writes and events.
        `pool_size`: connections kept open to the API server (the client's default is 5 per CPU): at
        least the threads that send requests at once, or every request past it opens a new TLS
        connection (urllib3 discards the extra ones: "Connection pool is full")."""
        from kubernetes.client import ApiClient

        self.metrics = metrics if metrics is not None else OperatorMetrics()  # counts the writes
        self.write_guard = write_guard
        self.instance = instance

        self.configuration = configuration or load_configuration()
        if pool_size is not None:
            self.configuration.connection_pool_maxsize = max(
                pool_size, self.configuration.connection_pool_maxsize or 0
            )
        self.api_client = ApiClient(self.configuration)
        self.pool = self.api_client.rest_client.pool_manager
        if not self.configuration.verify_ssl:  # insecure-skip-tls-verify: warned once here, not per request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            logging.getLogger("diffusion_operator").warning("TLS verification of the API server is disabled")

    def _headers(self, content_type: str | None) -> dict[str, str]:
        cfg = self.configuration
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)
        headers = {"Accept": "application/json", "User-Agent": "diffusion-operator"}
        if content_type:
            headers["Content-Type"] = content_type
        for auth in cfg.auth_settings().values():
            headers[auth["key"]] = auth["value"]
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict | None = None,
        content_type: str | None = None,
    ) -> dict | None:
        if method != "GET" and self.write_guard is not None and not self.write_guard():
            raise NotLeader(method, path)
        url = self.configuration.host.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        if body is not None and content_type is None:
            content_type = "application/json"
        started = time.perf_counter()
        try:
            response = self.pool.request(
                method, url, body=data, headers=self._headers(content_type), timeout=30.0, retries=False
            )
        except (OSError, urllib3.exceptions.HTTPError) as error:  # the API server away: retried
            raise ApiError(503, f"connection to the API server failed: {error}", method, path) from error
        finally:
            self.metrics.api_request_duration.labels(verb=method).observe(time.perf_counter() - started)
        if method != "GET":
            self.metrics.api_writes.labels(verb=method).inc()
        text = response.data.decode() if response.data else ""
        if response.status == 404 and method in ("GET", "DELETE"):
            return None
        if response.status >= 300:
            raise ApiError(response.status, text, method, path)
        return json.loads(text) if text else {}

    def _write(self, method: str, path: str, **kwargs: Any) -> dict:
        """A write whose answer is the object (the API server always sends one back)."""
        out = self.request(method, path, **kwargs)
        if out is None:  # only GET and DELETE map 404 to None
            raise ApiError(404, "", method, path)
        return out

    @staticmethod
    def collection(api_version: str, kind: str, namespace: str | None) -> str:
        """The collection path (from the resource table); namespace None: across every namespace."""
        return collection_path(api_version, kind, namespace)

    def path(self, api_version: str, kind: str, namespace: str, name: str) -> str:
        return f"{self.collection(api_version, kind, namespace)}/{urllib.parse.quote(name)}"

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        return self.request("GET", self.path(api_version, kind, namespace, name))

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        out = self.request("GET", self.collection(api_version, kind, namespace), query=query) or {}
        items: list[dict] = out.get("items") or []
        kind_api = {"apiVersion": api_version, "kind": kind}
        return [{**kind_api, **item} for item in items]  # list items carry no kind

    def apply(self, obj: dict, dry_run: bool = False) -> dict:
        """Server-side apply under the operator's one field manager (force: we own these objects).

        Fields this manager applied before and no longer sends are removed by the API server.
        """
        meta = obj["metadata"]
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        return self._write(
            "PATCH",
            self.path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]),
            body=obj,
            query=query,
            content_type="application/apply-patch+yaml",
        )

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.request("DELETE", self.path(api_version, kind, namespace, name))

    def pods(self, namespace: str, label_selector: str) -> builtins.list[dict]:
        """Pods by label (the download Job's: read-only, for their termination messages)."""
        out = self.request(
            "GET", self.collection("v1", "Pod", namespace), query={"labelSelector": label_selector}
        )
        return list((out or {}).get("items") or [])

    def pod_log(
        self,
        namespace: str,
        name: str,
        container: str,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
    ) -> str | None:
        """A container's log (plain text): its last `tail_lines` lines, or its first `limit_bytes` bytes;
        None when there is none (yet)."""
        query: dict[str, str | int] = {"container": container}
        if tail_lines is not None:
            query["tailLines"] = tail_lines
        if limit_bytes is not None:
            query["limitBytes"] = limit_bytes
        url = self.configuration.host.rstrip("/") + self.path("v1", "Pod", namespace, name) + "/log?"
        url += urllib.parse.urlencode(query)
        headers = self._headers(None)
        # the API server answers the log as text/plain, but refuses that Accept header (406 NotAcceptable:
        # only json, yaml, protobuf are offered); kubectl sends */* too
        headers["Accept"] = "*/*"
        try:
            response = self.pool.request("GET", url, headers=headers, timeout=10.0, retries=False)
        except (OSError, urllib3.exceptions.HTTPError) as error:
            raise ApiError(503, f"connection to the API server failed: {error}", "GET", url) from error
        if response.status >= 300:  # no log yet (container creating), or a node that serves none
            return None
        return response.data.decode(errors="replace") if response.data else ""

    def api_resources(self, api_version: str) -> builtins.list[str] | None:
        """Discovery: the resources (plural names) a group/version serves; None when it is not served
        (e.g. keda.sh/v1alpha1 without KEDA's CRDs). Discovery needs no RBAC beyond authentication."""
        out = self.request("GET", f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}")
        if out is None:
            return None
        return [r["name"] for r in out.get("resources") or [] if "/" not in r.get("name", "")]

    def object_metric(self, namespace: str, kind: str, name: str, metric: str) -> float | None:
        """An Object metric from the custom metrics API (what an HPA's Object metric reads), e.g. the
        queue's demand on a Deployment; None when no adapter serves it (yet), or it has no value."""
        from diffusion_operator.controller.diff import parse_quantity
        from diffusion_operator.resources import CUSTOM_METRIC

        assert kind == "Deployment", kind  # the one described kind the table grants (deployments.apps)
        path = (
            f"{CUSTOM_METRIC.collection(namespace)}/{urllib.parse.quote(name)}/{urllib.parse.quote(metric)}"
        )
        try:
            out = self.request("GET", path)
        except ApiError:  # no adapter (404, 503), the series not there yet
            return None
        items = (out or {}).get("items") or []
        if not items:
            return None
        value = parse_quantity(items[0].get("value"))
        return None if value is None else float(value)

    def patch_status(self, namespace: str, name: str, status: dict) -> dict:
        path = self.path(API_VERSION, KIND, namespace, name) + "/status"
        return self._write(
            "PATCH",
            path,
            body={"status": status},
            query={"fieldManager": status_manager(self.instance)},
            content_type="application/merge-patch+json",
        )

    def post_event(self, owner: dict, event_type: str, reason: str, message: str) -> None:
        from diffusion_operator.status import now

        meta = owner["metadata"]
        timestamp = now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": owner.get("apiVersion", API_VERSION),
                "kind": owner.get("kind", KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
            "source": {"component": "diffusion-operator"},
            "reportingComponent": "diffusion-operator",
            **({"reportingInstance": self.instance[:128]} if self.instance else {}),
        }
        self.request("POST", self.collection("v1", "Event", meta["namespace"]), body=event)
