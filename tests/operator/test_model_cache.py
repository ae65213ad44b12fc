"""spec.model.cache and spec.compileCache: the spec, the pure builders (claim, download Job, the pods'
mounts and gate), status.modelCache from Job/pod states, and the reconciler against the in-memory API
server (fakekube.py). tests/operator/test_model_cache_cluster.py runs the same on the real control plane."""

from __future__ import annotations

import copy

import pytest
import yaml
from diffusion_operator import builders
from diffusion_operator import cache_status as cs
from diffusion_operator.builders.modelcache import (
    DOWNLOAD_CONTAINER,
    MODEL_CACHE_MOUNT,
    cache_subpath,
    claim_name,
)
from diffusion_operator.validation import parse
from diffusion_runtime.contract.config import config_from_dict
from diffusion_runtime.download import progress_line
from fakekube import FakeKube
from op_helpers import OWNER, sample
from test_reconciler import NS, conditions, cr, setup

CACHE = {"size": "10Gi", "storageClassName": "nfs", "accessMode": "ReadWriteMany"}


def cached_doc(name: str = "tiny", **cache) -> dict:
    doc = sample("tiny-cpu.yaml")
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["model"] = {
        "uri": "hf://tiny-org/flux-tiny",
        "revision": "v1",
        "pipeline": "FluxPipeline",
        "dtype": "float32",
        "tokenSecretRef": {"name": "hf", "key": "token"},
        "cache": {**CACHE, **cache},
    }
    return doc


def parsed(doc: dict):
    p = parse(doc["metadata"]["name"], NS, doc["spec"])
    assert p.ok, p.errors
    return p.cr


# ---- spec ----------------------------------------------------------------------------------------


def test_cache_is_refused_for_a_model_that_is_not_on_the_hub():
    doc = cached_doc()
    doc["spec"]["model"]["uri"] = "file:///models/x"
    p = parse("tiny", NS, doc["spec"])
    assert [e.field for e in p.errors] == ["spec.model.cache"]
    doc = cached_doc(accessMode="ReadOnlyMany")
    p = parse("tiny", NS, doc["spec"])
    assert [e.field for e in p.errors] == ["spec.model.cache.accessMode"]
    doc = cached_doc(size="-1Gi")
    assert parse("tiny", NS, doc["spec"]).errors[0].field == "spec.model.cache.size"


# ---- builders --------------------------------------------------------------------------------------


def test_claim_and_job_download_into_the_folder_the_pods_serve_read_only():
    spec = parsed(cached_doc())
    children = {o["kind"]: o for o in builders.build_all(spec, OWNER)}
    pvc, job, dep, cm = (
        children["PersistentVolumeClaim"],
        children["Job"],
        children["Deployment"],
        children["ConfigMap"],
    )
    assert pvc["metadata"]["name"] == claim_name(spec) == "tiny-model-cache"
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "10Gi"}},
        "storageClassName": "nfs",
    }
    folder = f"{MODEL_CACHE_MOUNT}/{cache_subpath(spec)}"
    assert cache_subpath(spec) == "tiny-org--flux-tiny/v1"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == DOWNLOAD_CONTAINER
    assert container["args"][:4] == ["download", "--model", "hf://tiny-org/flux-tiny", "--dest"]
    assert container["args"][4] == folder and "--revision" in container["args"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container[
        "env"
    ]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert job["spec"]["backoffLimit"] == 4
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    job_mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "readOnly" not in job_mounts["model-cache"]
    # the download pod is never selected by the Service / PDB / Deployment of the serving pods
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not builders.selector("tiny").items() <= pod_labels.items()

    runtime = yaml.safe_load(cm["data"]["runtime.yaml"])
    assert runtime["model"]["uri"] == folder
    config_from_dict(runtime)  # the runtime accepts what is rendered
    pod = dep["spec"]["template"]["spec"]
    runtime_container = pod["containers"][0]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in runtime_container["env"]
    mounts = {m["name"]: m for m in runtime_container["volumeMounts"]}
    assert mounts["model-cache"] == {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {
        "claimName": "tiny-model-cache",
        "readOnly": True,
    }
    assert "podAffinity" not in (pod.get("affinity") or {})  # RWX: replicas anywhere


def test_pods_are_held_at_zero_until_the_cache_is_ready_and_rwo_keeps_replicas_on_one_node():
    doc = cached_doc(accessMode="ReadWriteOnce")
    doc["spec"]["replicas"] = 3
    spec = parsed(doc)
    held = {o["kind"]: o for o in builders.build_all(spec, OWNER, model_cache_ready=False)}
    assert held["Deployment"]["spec"]["replicas"] == 0
    ready = {o["kind"]: o for o in builders.build_all(spec, OWNER, model_cache_ready=True)}
    assert ready["Deployment"]["spec"]["replicas"] == 3
    term = ready["Deployment"]["spec"]["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term == [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": builders.selector("tiny")}}
    ]
    # with autoscaling: no HPA to scale a held Deployment up
    del doc["spec"]["replicas"]
    doc["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3}
    spec = parsed(doc)
    kinds = [o["kind"] for o in builders.build_all(spec, OWNER, model_cache_ready=False)]
    assert "HorizontalPodAutoscaler" not in kinds
    assert "HorizontalPodAutoscaler" in [o["kind"] for o in builders.build_all(spec, OWNER)]


def test_a_changed_revision_is_a_new_job_and_a_new_folder():
    a = parsed(cached_doc())
    doc = cached_doc()
    doc["spec"]["model"]["revision"] = "v2"
    b = parsed(doc)
    job_a, job_b = builders.build_download_job(a, OWNER), builders.build_download_job(b, OWNER)
    assert job_a["metadata"]["name"] != job_b["metadata"]["name"]
    assert len(job_a["metadata"]["name"]) <= 63
    assert cache_subpath(a) != cache_subpath(b)
    assert builders.build_download_job(a, OWNER) == job_a  # pure: same spec, same Job


def test_compile_cache_claim_is_mounted_and_rendered_as_compile_cache_dir():
    doc = sample("tiny-cpu.yaml")
    doc["metadata"] = {"name": "tiny", "namespace": NS}
    doc["spec"]["compile"] = True
    doc["spec"]["compileCache"] = {"claimName": "shared-compile"}
    spec = parsed(doc)
    children = {o["kind"]: o for o in builders.build_all(spec, OWNER)}
    runtime = yaml.safe_load(children["ConfigMap"]["data"]["runtime.yaml"])
    pod = children["Deployment"]["spec"]["template"]["spec"]
    mount = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}["compile-cache"]
    assert runtime["compile_cache_dir"] == mount["mountPath"]
    assert "readOnly" not in mount
    assert {v["name"]: v for v in pod["volumes"]}["compile-cache"] == {
        "name": "compile-cache",
        "persistentVolumeClaim": {"claimName": "shared-compile"},
    }
    assert "PersistentVolumeClaim" not in children  # the user's claim: not created by the operator
    bad = copy.deepcopy(doc)
    bad["spec"]["compileCache"] = {"claimName": "Not_A_Name"}
    assert parse("tiny", NS, bad["spec"]).errors[0].field == "spec.compileCache.claimName"


# ---- status ----------------------------------------------------------------------------------------


def _job(**status) -> dict:
    return {"metadata": {"name": "j"}, "status": status}


def _pod(name: str, phase: str, created: str, message: str | None = None, reason: str = "Error") -> dict:
    pod: dict = {"metadata": {"name": name, "creationTimestamp": created}, "status": {"phase": phase}}
    if message is not None:
        pod["status"]["containerStatuses"] = [
            {"state": {"terminated": {"reason": reason, "message": message, "exitCode": 1}}}
        ]
    return pod


def test_phases_follow_the_job_and_bytes_come_from_the_progress_lines():
    def status(job, pvc=None, pods=None, tail=None):
        return cs.model_cache_status("c", "j", "/p", job, pvc, pods, tail)  # noqa: E731

    assert status(None)["phase"] == cs.PENDING
    bound = {"status": {"phase": "Bound"}}
    assert status(_job(active=1), {"status": {"phase": "Pending"}})["phase"] == cs.PENDING
    running = [_pod("p1", "Running", "1")]
    s = status(
        _job(active=1), bound, running, "noise\n" + progress_line("Downloading", bytesDone=5, bytesTotal=10)
    )
    assert (s["phase"], s["bytesDone"], s["bytesTotal"]) == (cs.DOWNLOADING, 5, 10)
    # an attempt failed, the next one runs: the failure is shown while it lasts
    failed_line = progress_line("Failed", error="peer closed connection", bytesDone=3, bytesTotal=10)
    pods = [_pod("p1", "Failed", "1", failed_line), _pod("p2", "Running", "2")]
    s = status(_job(active=1, failed=1), bound, pods, None)
    assert s["phase"] == cs.DOWNLOADING and s["failedAttempts"] == 1
    assert "attempt 1 failed (peer closed connection)" in s["message"]
    # out of retries
    failed = _job(
        failed=5, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    )
    s = status(failed, bound, [_pod("p5", "Failed", "5", failed_line)])
    assert s["phase"] == cs.FAILED and "peer closed connection" in s["message"]
    # complete: the figures of the last line
    done_line = progress_line(
        "Complete", bytesDone=10, bytesTotal=10, filesDone=2, filesTotal=2, commit="abc", seconds=1.5
    )
    done = _job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    s = status(done, bound, [_pod("p3", "Succeeded", "3", done_line, "Completed")])
    assert (s["phase"], s["bytesDone"], s["commit"], s["downloadSeconds"]) == (cs.CACHE_READY, 10, "abc", 1.5)
    # no pod access: the phase is still exact
    assert status(done, bound, None)["phase"] == cs.CACHE_READY


def test_events_on_phase_changes_and_on_each_failed_attempt():
    assert cs.cache_events({}, {"phase": "Downloading", "message": "m"})[0][:2] == (
        "Normal",
        "ModelDownloading",
    )
    retry = cs.cache_events(
        {"phase": "Downloading"}, {"phase": "Downloading", "failedAttempts": 1, "message": "x"}
    )
    assert retry == [("Warning", "ModelDownloadRetry", "x")]
    assert cs.cache_events({"phase": "Ready"}, {"phase": "Ready"}) == []
    assert cs.cache_events({"phase": "Downloading"}, {"phase": "Failed", "failedAttempts": 5})[0][:2] == (
        "Warning",
        "ModelDownloadFailed",
    )


# ---- reconciler (in-memory API server) -------------------------------------------------------------


def _job_of(kube: FakeKube) -> dict:
    jobs = [o for (k, _, _), o in kube.objects.items() if k == "Job"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def test_while_downloading_the_reconciler_looks_again_without_an_event():
    kube, rec = setup()
    rec.cache_poll = 0.1
    kube.create(cached_doc())
    with pytest.raises(TimeoutError):  # it keeps looking while the download is not finished
        rec.drain(timeout=1.0)
    assert cr(kube)["status"]["modelCache"]["phase"] == cs.PENDING
    assert rec.reconciles >= 4
    job = _job_of(kube)["metadata"]["name"]
    kube.set_status("Job", NS, job, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    rec.drain(timeout=5.0)  # Ready: no more looking
    assert cr(kube)["status"]["modelCache"]["phase"] == cs.CACHE_READY


def test_reconciler_gates_the_deployment_on_the_jobs_status_and_reports_progress():
    kube, rec = setup()
    rec.cache_poll = None  # the test delivers every change as an event
    kube.create(cached_doc())
    rec.drain()
    dep = kube.get("apps/v1", "Deployment", NS, "tiny")
    assert dep is not None and dep["spec"]["replicas"] == 0
    status = cr(kube)["status"]
    assert status["modelCache"]["phase"] == cs.PENDING
    assert conditions(cr(kube))["Ready"]["reason"] == cs.WAITING_REASON
    job = _job_of(kube)
    name = job["metadata"]["name"]
    kube.set_status("PersistentVolumeClaim", NS, "tiny-model-cache", {"phase": "Bound"})
    # the Job controller starts a pod; its log says how far it is
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-abc",
            "namespace": NS,
            "labels": {"job-name": name},
            "creationTimestamp": "1",
        },
    }
    kube.create(pod)
    kube.set_status("Pod", NS, f"{name}-abc", {"phase": "Running"})
    kube.logs[(NS, f"{name}-abc")] = progress_line("Downloading", bytesDone=400, bytesTotal=1000)
    kube.set_status("Job", NS, name, {"active": 1})
    rec.drain()
    mc = cr(kube)["status"]["modelCache"]
    assert (mc["phase"], mc["bytesDone"], mc["bytesTotal"]) == (cs.DOWNLOADING, 400, 1000)
    assert "400/1000 bytes" in conditions(cr(kube))["Ready"]["message"]
    assert kube.get("apps/v1", "Deployment", NS, "tiny")["spec"]["replicas"] == 0
    # complete: the Deployment gets its replicas, the status the final figures
    line = progress_line(
        "Complete", bytesDone=1000, bytesTotal=1000, filesDone=3, filesTotal=3, commit="c0ffee", seconds=2.0
    )
    kube.set_status(
        "Pod", NS, f"{name}-abc",
        {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"reason": "Completed", "message": line}}}]},
    )  # fmt: skip
    kube.set_status("Job", NS, name, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    rec.drain()
    mc = cr(kube)["status"]["modelCache"]
    assert (mc["phase"], mc["bytesDone"], mc["commit"]) == (cs.CACHE_READY, 1000, "c0ffee")
    assert kube.get("apps/v1", "Deployment", NS, "tiny")["spec"]["replicas"] == 1
    reasons = [e["reason"] for e in kube.events]
    assert reasons == ["ModelDownloading", "ModelCached"], kube.events
    # an idle pass writes nothing and reads no pods any more
    writes, pod_reads = kube.total_writes(), kube.reads[("LIST", "Pod")]
    rec.enqueue(NS, "tiny", fresh=True)
    rec.drain()
    assert kube.total_writes() == writes and kube.reads[("LIST", "Pod")] == pod_reads


def test_a_new_revision_downloads_while_the_running_pods_keep_serving_the_old_folder():
    kube, rec = setup()
    rec.cache_poll = None
    kube.create(cached_doc())
    rec.drain()
    first = _job_of(kube)["metadata"]["name"]
    kube.set_status(
        "Job", NS, first, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    )
    rec.drain()
    served = yaml.safe_load(kube.get("v1", "ConfigMap", NS, "tiny-config")["data"]["runtime.yaml"])["model"][
        "uri"
    ]
    assert kube.get("apps/v1", "Deployment", NS, "tiny")["spec"]["replicas"] == 1

    def bump(obj: dict) -> None:
        obj["spec"]["model"]["revision"] = "v2"
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1

    kube.edit("DiffusionDeployment", NS, "tiny", bump, manager="kubectl")
    rec.drain()
    jobs = sorted(o["metadata"]["name"] for (k, _, _), o in kube.objects.items() if k == "Job")
    assert len(jobs) == 2 and first in jobs
    assert cr(kube)["status"]["modelCache"]["phase"] == cs.PENDING
    dep = kube.get("apps/v1", "Deployment", NS, "tiny")
    assert dep["spec"]["replicas"] == 1  # still serving
    cm = yaml.safe_load(kube.get("v1", "ConfigMap", NS, "tiny-config")["data"]["runtime.yaml"])
    assert cm["model"]["uri"] == served  # the old folder until the new one is complete
    new = next(j for j in jobs if j != first)
    kube.set_status("Job", NS, new, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    rec.drain()
    cm = yaml.safe_load(kube.get("v1", "ConfigMap", NS, "tiny-config")["data"]["runtime.yaml"])
    assert cm["model"]["uri"].endswith("/v2")


def test_startup_budget_has_no_download_in_the_pod_with_a_cache():
    from diffusion_operator.api.funcs import startup_budget_seconds

    with_cache = parsed(cached_doc())
    doc = cached_doc()
    del doc["spec"]["model"]["cache"]
    assert startup_budget_seconds(with_cache.spec) < startup_budget_seconds(parsed(doc).spec)


def test_a_failed_job_deleted_by_the_user_is_created_again():
    kube, rec = setup()
    rec.cache_poll = None
    kube.create(cached_doc())
    rec.drain()
    name = _job_of(kube)["metadata"]["name"]
    failed = {
        "failed": 5,
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
    }
    kube.set_status("Job", NS, name, failed)
    rec.drain()
    assert cr(kube)["status"]["modelCache"]["phase"] == cs.FAILED
    assert "ModelDownloadFailed" in [e["reason"] for e in kube.events]
    kube.delete_object("Job", NS, name)
    rec.drain()
    assert _job_of(kube)["metadata"]["name"] == name and not _job_of(kube).get("status")
    assert cr(kube)["status"]["modelCache"]["phase"] == cs.PENDING
