"""The chart's optional queue server (queue.enabled): Redis as a StatefulSet on a claim, its password
from a generated or given Secret, and the URL Secret the DiffusionDeployments reference, rendered by
`helm template` and read back with redis-py's own URL parser (what the runtime uses)."""

from __future__ import annotations

import base64

import yaml
from chartlib import CHART, by_kind, one, run_helm
from diffusion_operator.api.defaults import DEFAULT_QUEUE_SECRET, DEFAULT_QUEUE_SECRET_KEYS
from diffusion_operator.api.types import QueueSecretRef
from diffusion_operator.builders.common import QUEUE_SERVER_APP
from redis.connection import parse_url

ON = "queue.enabled=true"


def decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def url_secrets(objects: list[dict]) -> list[dict]:
    return [s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == DEFAULT_QUEUE_SECRET]


def test_off_by_default(render):
    objects = render()
    assert not by_kind(objects, "StatefulSet") and not by_kind(objects, "Secret")
    assert yaml.safe_load((CHART / "values.yaml").read_text())["queue"]["enabled"] is False


def test_the_secret_the_crs_reference_by_default_is_the_one_the_chart_writes():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["queue"]
    assert values["secretName"] == DEFAULT_QUEUE_SECRET == QueueSecretRef.model_validate({}).name


def test_queue_server_statefulset_service_and_url_secret(render):
    objects = render(ON)
    sts = one(objects, "StatefulSet")
    # the serving pods' NetworkPolicy reaches the queue server by this label (builders/networkpolicy.py)
    assert sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == QUEUE_SERVER_APP
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("ghcr.io/diffusion-operator/queue:")
    # restricted PodSecurity
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]
    sc = container["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"]
        and not sc["allowPrivilegeEscalation"]
        and sc["capabilities"]["drop"] == ["ALL"]
    )
    # the password comes from the auth Secret by reference and never sits on the command line
    auth = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-queue-auth"))
    password = decoded(auth)["password"]
    assert len(password) == 32 and password.isalnum()
    assert password not in yaml.safe_dump(sts)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["REDIS_PASSWORD"] == {"name": auth["metadata"]["name"], "key": "password"}
    assert (
        "--appendonly yes --appendfsync always" in container["args"][0]
        and "--dir /data" in container["args"][0]
    )
    # persistence on a claim
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    svc = (
        one(objects, "Service")
        if len(by_kind(objects, "Service")) == 1
        else next(s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-queue"))
    )
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 6379
    # the URL Secret, read with redis-py's own parser (the runtime's client)
    (secret,) = url_secrets(objects)
    assert secret["metadata"]["namespace"] == "diffusion-system"  # the watched namespace by default
    data = decoded(secret)
    assert set(data) == set(DEFAULT_QUEUE_SECRET_KEYS.values())
    parsed = parse_url(data[DEFAULT_QUEUE_SECRET_KEYS["url"]])
    host = f"{svc['metadata']['name']}.diffusion-system.svc"
    assert (parsed["host"], parsed["port"], parsed["db"], parsed["password"]) == (host, 6379, 0, password)
    assert data["address"] == f"{host}:6379" and data["password"] == password


def test_url_secret_in_every_watched_namespace_with_one_password(render):
    objects = render(ON, "watch.allNamespaces=false", "watch.namespaces={team-a,team-b}")
    secrets = url_secrets(objects)
    assert sorted(s["metadata"]["namespace"] for s in secrets) == ["team-a", "team-b"]
    assert len({decoded(s)["url"] for s in secrets}) == 1
    objects = render(ON, "queue.secretNamespaces={ml}")
    assert [s["metadata"]["namespace"] for s in url_secrets(objects)] == ["ml"]


def test_a_fixed_cluster_ip_is_the_urls_host(render):
    objects = render(ON, "queue.service.clusterIP=10.0.0.9")
    svc = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-queue"))
    assert svc["spec"]["clusterIP"] == "10.0.0.9"
    (secret,) = url_secrets(objects)
    parsed = parse_url(decoded(secret)["url"])
    assert (parsed["host"], parsed["port"]) == ("10.0.0.9", 6379)


def test_given_password_and_no_persistence(render):
    objects = render(
        ON, "queue.auth.password=s3cret", "queue.persistence.enabled=false", "queue.maxMemory=2gb"
    )
    (secret,) = url_secrets(objects)
    assert parse_url(decoded(secret)["url"])["password"] == "s3cret"
    sts = one(objects, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    assert (
        "--maxmemory 2gb --maxmemory-policy volatile-ttl"
        in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]
    )


def test_bad_values_are_refused(helm_bin):
    bad = run_helm(
        helm_bin, "template", "dop", str(CHART), "--set", ON, "--set", "queue.auth.password=a@b", check=False
    )
    assert bad.returncode != 0 and "password" in bad.stderr, bad.stderr
    # an existing Secret that is not there: the URL Secrets cannot be built, and helm says which
    missing = run_helm(
        helm_bin,
        "template",
        "dop",
        str(CHART),
        "--set",
        ON,
        "--set",
        "queue.auth.existingSecret=nope",
        check=False,
    )
    assert missing.returncode != 0
    assert "queue.auth.existingSecret: Secret nope not found" in missing.stderr, missing.stderr


def test_lint_strict_with_the_queue(helm_bin):
    proc = run_helm(helm_bin, "lint", "--strict", str(CHART), "--set", ON)
    assert "0 chart(s) failed" in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout
