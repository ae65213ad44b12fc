"""An in-memory API server for reconcile tests: logic in milliseconds, the cluster tests prove reality.

Honest where the reconciler depends on it:
- server-side apply per field manager: fields a manager applied before and no longer sends are
  removed unless another manager also owns them; a forced apply takes ownership of the fields it
  sends (values overwritten); an update by another manager (`edit`) takes ownership of the fields
  it changed. Lists are atomic (a simplification: the real server merges some lists by key; every
  list the operator sends it owns whole);
- resourceVersion (one counter for every write), generation (bumped when `spec` changes), uid,
  creationTimestamp; dry runs answer the merged object and store nothing;
- a watch: every stored change is handed to the subscribers as (type, object);
- validation of a Deployment's container resource quantities and node affinity operators like the
  API server's (422 with the server's message shape); `refuse` injects any other answer (403, 500, ...).
Counts every write by verb and kind. Not modelled: defaulting and field aliases (the real server
mirrors `serviceAccountName` into the deprecated `serviceAccount`, which brings a removed one back:
the cluster test found that, the builder now always sends it). test_fakekube_honesty.py runs one
apply / edit / apply sequence on both and compares.
"""

from __future__ import annotations

import builtins
import copy
import functools
import itertools
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from diffusion_operator.builders.common import FIELD_MANAGER
from diffusion_operator.controller.diff import parse_quantity
from diffusion_operator.kube import ApiError

Path = tuple[str, ...]
Key = tuple[str, str, str]  # kind, namespace, name
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Deployment": "deployments.apps",
    "PodDisruptionBudget": "poddisruptionbudgets.policy",
    "NetworkPolicy": "networkpolicies.networking.k8s.io",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers.autoscaling",
    "DiffusionDeployment": "diffusiondeployments.diffusion.dev",
    "Event": "events",
}
NODE_SELECTOR_OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"}
SERVER_OWNED = ("resourceVersion", "uid", "generation", "creationTimestamp", "managedFields")


def leaves(obj: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Field paths to values; dicts are walked, everything else (lists, scalars, {}) is a leaf."""
    if isinstance(obj, dict) and (obj or not prefix):
        out: dict[Path, Any] = {}
        for k, v in obj.items():
            out.update(leaves(v, (*prefix, k)))
        return out
    return {prefix: obj}


def overlaps(a: Path, b: Path) -> bool:
    """One path is the other or lies under it."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def set_path(obj: dict, path: Path, value: Any) -> None:
    for k in path[:-1]:
        if not isinstance(obj.get(k), dict):
            obj[k] = {}
        obj = obj[k]
    obj[path[-1]] = copy.deepcopy(value)


def del_path(obj: dict, path: Path) -> None:
    """Remove a field, then its parents left empty (the server prunes maps it created for it)."""
    parents = []
    node: Any = obj
    for k in path[:-1]:
        if not isinstance(node, dict) or k not in node:
            return
        parents.append((node, k))
        node = node[k]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, k in reversed(parents):
        if parent[k] == {}:
            del parent[k]
        else:
            break


def _user_fields(obj: dict) -> dict:
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    for k in SERVER_OWNED:
        meta.pop(k, None)
    out.pop("status", None)
    return out


def _locked(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: FakeKube, *args: Any, **kwargs: Any) -> Any:
        with self.lock:  # the reconciler applies a new CR's children from several threads
            return method(self, *args, **kwargs)

    return wrapper


class FakeKube:
    """The `KubeClient` the reconciler needs, in memory (thread-safe: one lock)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.objects: dict[Key, dict] = {}
        self.owners: dict[Key, dict[str, set[Path]]] = {}
        self.events: list[dict] = []
        self.logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> log text
        self.writes: Counter[tuple[str, str]] = Counter()  # (verb, kind)
        self.reads: Counter[tuple[str, str]] = Counter()
        self.watchers: list[Callable[[str, dict], None]] = []
        self.refusals: dict[tuple[str, str], ApiError] = {}  # (verb, kind) -> error
        # group/versions served beyond the built-in ones (API discovery): e.g. {"keda.sh/v1alpha1":
        # ["scaledobjects"]} once a test "installs" KEDA's CRD
        self.served: dict[str, list[str]] = {}
        # Object metrics a custom metrics adapter would serve: (namespace, kind, name, metric) -> value
        self.object_metrics: dict[tuple[str, str, str, str], float] = {}
        self._rv = itertools.count(100)
        self._uid = itertools.count(1)

    # ---- test controls --------------------------------------------------------------------------

    def watch(self, callback: Callable[[str, dict], None]) -> None:
        self.watchers.append(callback)

    def refuse(self, verb: str, kind: str, status: int, message: str, reason: str = "") -> None:
        body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "reason": reason})
        self.refusals[(verb, kind)] = ApiError(status, body, verb, kind)

    def allow(self, verb: str, kind: str) -> None:
        self.refusals.pop((verb, kind), None)

    def total_writes(self, kind: str | None = None) -> int:
        return sum(n for (verb, k), n in self.writes.items() if kind is None or k == kind)

    @_locked
    def create(self, obj: dict, manager: str = "kubectl") -> dict:
        """A client's create (kubectl apply of a new CR)."""
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            raise ApiError(409, json.dumps({"reason": "AlreadyExists", "message": "exists"}), "POST", key[0])
        self.owners[key] = {manager: set(leaves(_user_fields(obj)))}
        return self._store(key, _user_fields(obj), None, "ADDED")

    @_locked
    def edit(
        self, kind: str, namespace: str, name: str, mutate: Callable[[dict], None], manager: str
    ) -> dict:
        """An update by someone else (kubectl edit, a controller): owns what it changed."""
        key = (kind, namespace, name)
        old = self.objects[key]
        new = copy.deepcopy(old)
        mutate(new)
        before, after = leaves(_user_fields(old)), leaves(_user_fields(new))
        changed = {p for p, v in after.items() if before.get(p, object()) != v}
        removed = set(before) - set(after)
        owners = self.owners.setdefault(key, {})
        for fields in owners.values():
            fields -= changed | removed
        owners.setdefault(manager, set()).update(changed)
        status = new.get("status")
        return self._store(key, _user_fields(new), status, "MODIFIED")

    @_locked
    def set_status(self, kind: str, namespace: str, name: str, status: dict) -> dict:
        """A controller's status update (the Deployment controller, kwok)."""
        key = (kind, namespace, name)
        obj = self.objects[key]
        return self._store(key, _user_fields(obj), copy.deepcopy(status), "MODIFIED")

    @_locked
    def delete_object(self, kind: str, namespace: str, name: str) -> None:
        """A client's delete (kubectl delete); owner references cascade like the garbage collector."""
        key = (kind, namespace, name)
        obj = self.objects.pop(key, None)
        self.owners.pop(key, None)
        if obj is None:
            return
        self._notify("DELETED", obj)
        uid = obj["metadata"]["uid"]
        for child_key, child in list(self.objects.items()):
            if any(r.get("uid") == uid for r in child["metadata"].get("ownerReferences", [])):
                self.delete_object(*child_key)

    # ---- the KubeClient protocol -----------------------------------------------------------------

    @_locked
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        self.reads[("GET", kind)] += 1
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    @_locked
    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict]:
        self.reads[("LIST", kind)] += 1
        wanted = dict(part.split("=", 1) for part in (label_selector or "").split(",") if part)
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self.objects.items())
            if k == kind
            and (namespace is None or ns == namespace)
            and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    @_locked
    def apply(self, obj: dict, dry_run: bool = False, manager: str = FIELD_MANAGER) -> dict:
        self._check_refused("PATCH", obj["kind"])
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        applied = leaves(_user_fields(obj))
        old = self.objects.get(key)
        owners = copy.deepcopy(self.owners.get(key, {}))
        merged = _user_fields(old) if old is not None else {}
        mine = owners.get(manager, set())
        others = set().union(*(f for m, f in owners.items() if m != manager)) if owners else set()
        for path in mine - set(applied) - others:
            del_path(merged, path)
        for path, value in applied.items():
            # a leaf replacing a map (or a map replacing a leaf) drops what was under/over it
            for other in list(leaves(merged)):
                if other != path and overlaps(other, path):
                    del_path(merged, other)
            set_path(merged, path, value)
        for m, fields in owners.items():  # forced: the applier takes the fields it sends
            if m != manager:
                fields -= {p for p in fields if any(overlaps(p, q) for q in applied)}
        owners[manager] = set(applied)
        self._validate(obj["kind"], meta["name"], merged)
        if dry_run:
            self.writes[("DRYRUN", obj["kind"])] += 1
            out = copy.deepcopy(merged)
            if old is not None:
                out["metadata"].update({k: old["metadata"][k] for k in SERVER_OWNED if k in old["metadata"]})
                if "status" in old:
                    out["status"] = copy.deepcopy(old["status"])
            return out
        self.writes[("APPLY", obj["kind"])] += 1
        self.owners[key] = owners
        status = copy.deepcopy(old.get("status")) if old is not None else None
        return self._store(key, merged, status, "MODIFIED" if old is not None else "ADDED")

    @_locked
    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._check_refused("DELETE", kind)
        self.writes[("DELETE", kind)] += 1
        self.delete_object(kind, namespace, name)

    @_locked
    def api_resources(self, api_version: str) -> builtins.list[str] | None:
        self.reads[("DISCOVERY", api_version)] += 1
        served = self.served.get(api_version)
        return list(served) if served is not None else None

    def object_metric(self, namespace: str, kind: str, name: str, metric: str) -> float | None:
        self.reads[("METRIC", metric)] += 1
        return self.object_metrics.get((namespace, kind, name, metric))

    @_locked
    def patch_status(self, namespace: str, name: str, status: dict) -> dict:
        self._check_refused("PATCH", "DiffusionDeployment/status")
        key = ("DiffusionDeployment", namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            raise ApiError(404, json.dumps({"reason": "NotFound", "message": "not found"}), "PATCH", name)
        self.writes[("PATCH", "DiffusionDeployment/status")] += 1
        merged = _merge_patch(copy.deepcopy(obj.get("status") or {}), status)
        return self._store(key, _user_fields(obj), merged, "MODIFIED")

    @_locked
    def post_event(self, owner: dict, event_type: str, reason: str, message: str) -> None:
        self._check_refused("POST", "Event")
        self.writes[("POST", "Event")] += 1
        self.events.append(
            {"object": owner["metadata"]["name"], "type": event_type, "reason": reason, "message": message}
        )

    @_locked
    def pods(self, namespace: str, label_selector: str) -> builtins.list[dict]:
        """Pods whose labels match `k=v,k2=v2` (what the reconciler asks of the download Job's pods)."""
        self.reads[("LIST", "Pod")] += 1
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self.objects.items())
            if k == "Pod"
            and ns == namespace
            and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    @_locked
    def pod_log(
        self,
        namespace: str,
        name: str,
        container: str,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
    ) -> str | None:
        """The API server's `tailLines` (the last lines) and `limitBytes` (the first bytes)."""
        self.reads[("LOG", "Pod")] += 1
        self._check_refused("LOG", "Pod")
        text = self.logs.get((namespace, name))
        if text is None:
            return None
        if tail_lines is not None:
            text = "\n".join(text.splitlines()[-tail_lines:])
        if limit_bytes is not None:
            text = text.encode()[:limit_bytes].decode(errors="replace")
        return text

    # ---- internals ----------------------------------------------------------------------------------

    def _check_refused(self, verb: str, kind: str) -> None:
        error = self.refusals.get((verb, kind))
        if error is not None:
            raise error

    def _store(self, key: Key, fields: dict, status: dict | None, event: str) -> dict:
        old = self.objects.get(key)
        meta = fields.setdefault("metadata", {})
        if old is not None:
            for k in ("uid", "creationTimestamp", "generation"):
                meta[k] = old["metadata"][k]
            if _user_fields(old).get("spec") != fields.get("spec"):
                meta["generation"] += 1
        else:
            meta.update(uid=f"uid-{next(self._uid)}", creationTimestamp="2026-01-01T00:00:00Z", generation=1)
        meta["resourceVersion"] = str(next(self._rv))
        if status:
            fields["status"] = status
        self.objects[key] = fields
        self._notify(event, fields)
        return copy.deepcopy(fields)

    def _notify(self, event: str, obj: dict) -> None:
        for callback in list(self.watchers):
            callback(event, copy.deepcopy(obj))

    def _validate(self, kind: str, name: str, obj: dict) -> None:
        """Container resource quantities as the API server checks them (422 with its message)."""
        pod = obj.get("spec", {}).get("template", {}).get("spec", {}) if kind == "Deployment" else {}
        problems = []
        for i, container in enumerate(pod.get("containers", [])):
            for part in ("limits", "requests"):
                for res, value in (container.get("resources", {}).get(part) or {}).items():
                    path = f"spec.template.spec.containers[{i}].resources.{part}[{res}]"
                    quantity = parse_quantity(value)
                    if quantity is None:
                        problems.append(f'{path}: Invalid value: "{value}": quantities must match the regex')
                    elif quantity < 0:
                        problems.append(
                            f'{path}: Invalid value: "{value}": must be greater than or equal to 0'
                        )
        terms = (
            pod.get("affinity", {})
            .get("nodeAffinity", {})
            .get("requiredDuringSchedulingIgnoredDuringExecution", {})
            .get("nodeSelectorTerms", [])
        )
        for t, term in enumerate(terms):
            for e, expr in enumerate(term.get("matchExpressions", [])):
                if expr.get("operator") not in NODE_SELECTOR_OPERATORS:
                    problems.append(
                        "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                        f".nodeSelectorTerms[{t}].matchExpressions[{e}].operator: Invalid value: "
                        f'"{expr.get("operator")}": not a valid selector operator'
                    )
        if problems:
            group = PLURALS.get(kind, "").partition(".")[2]
            qualified = f"{kind}.{group}" if group else kind
            message = f'{qualified} "{name}" is invalid: ' + ", ".join(problems)
            body = json.dumps(
                {"kind": "Status", "status": "Failure", "reason": "Invalid", "message": message}
            )
            raise ApiError(422, body, "PATCH", f"{kind}/{name}")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge_patch(target.get(k), v)
    return target
