"""spec.server.auth: API keys from Secrets by reference. The builders mount the keys as files (a
projected volume, never environment variables: the kubelet refreshes it when a Secret changes) and
point runtime.yaml's server.auth_keys_dir at it; bad auth specs are refused naming the field, by the
operator's validation and by the API server (kwok cluster); the operator reconciles such a CR
without any access to Secrets."""

from __future__ import annotations

import copy

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_operator import builders, rbac, validation
from diffusion_operator.builders.configmap import API_KEYS_MOUNT
from op_helpers import get_json, owner_for, sample
from test_operator_cluster import apply_doc

TINY = sample("tiny-cpu.yaml")
AUTH = {
    "keys": [
        {"name": "team-a", "secretRef": {"name": "api-keys", "key": "team-a"}},
        {"name": "team-b", "secretRef": {"name": "api-keys", "key": "b"}},
        {"name": "ci.bot", "secretRef": {"name": "ci-key", "key": "token"}},
    ]
}


def with_auth(auth: dict | None = None, name: str = "tiny") -> dict:
    doc = copy.deepcopy(TINY)
    doc["metadata"]["name"] = name
    doc["spec"]["server"]["auth"] = copy.deepcopy(auth if auth is not None else AUTH)
    return doc


def errors(auth: dict) -> list[str]:
    return [str(e) for e in validation.parse("tiny", "ns", with_auth(auth)["spec"]).errors]


def test_keys_are_a_projected_volume_and_the_config_names_its_folder():
    parsed = validation.parse("tiny", "ns", with_auth()["spec"])
    assert parsed.ok, parsed.errors
    owner = owner_for(TINY)
    cm = builders.build_configmap(parsed.cr, owner)
    assert yaml.safe_load(cm["data"]["runtime.yaml"])["server"]["auth_keys_dir"] == API_KEYS_MOUNT
    pod = builders.build_deployment(parsed.cr, owner, cm)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert volume == {
        "name": "api-keys",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {"secret": {"name": "api-keys", "items": [
                    {"key": "team-a", "path": "team-a"}, {"key": "b", "path": "team-b"}]}},
                {"secret": {"name": "ci-key", "items": [{"key": "token", "path": "ci.bot"}]}},
            ],
        },
    }  # fmt: skip
    (container,) = pod["containers"]
    assert {"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True} in container["volumeMounts"]
    assert not any("subPath" in m for m in container["volumeMounts"])  # a subPath mount is never refreshed
    assert not [e for e in container["env"] if "secretKeyRef" in str(e)]  # keys never in the environment

    plain = validation.parse("tiny", "ns", TINY["spec"]).cr
    cm = builders.build_configmap(plain, owner)
    assert "auth_keys_dir" not in yaml.safe_load(cm["data"]["runtime.yaml"])["server"]
    assert not [v for v in builders.build_deployment(plain, owner, cm)["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "api-keys"]  # fmt: skip


@pytest.mark.parametrize(
    ("auth", "field"),
    [
        ({"keys": [AUTH["keys"][0], {**AUTH["keys"][1], "name": "team-a"}]}, "spec.server.auth.keys[1].name"),
        ({"keys": [{"name": "a", "secretRef": {"name": "Bad_Secret", "key": "k"}}]},
         "spec.server.auth.keys[0].secretRef.name"),
        ({"keys": [{"name": "a", "secretRef": {"name": "s", "key": "a/b"}}]}, "spec.server.auth.keys[0].secretRef.key"),
        ({"keys": [{"name": "a", "secretRef": {"name": "s"}}]}, "spec.server.auth.keys[0].secretRef.key"),
        ({"keys": [{"name": "..data", "secretRef": {"name": "s", "key": "k"}}]}, "spec.server.auth.keys[0].name"),
        ({"keys": [{"name": "a b", "secretRef": {"name": "s", "key": "k"}}]}, "spec.server.auth.keys[0].name"),
        ({"keys": []}, "spec.server.auth.keys"),
        ({}, "spec.server.auth.keys"),
    ],
)  # fmt: skip
def test_bad_auth_specs_are_refused_naming_the_field(auth, field):
    found = errors(auth)
    assert found and found[0].startswith(field + ":"), found


def test_the_operator_never_reads_secrets():
    assert not any("secrets" in rule["resources"] for rule in rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES)


# ---------------------------------------------------------------- the API server (kwok cluster)


@pytest.mark.cluster
def test_api_server_refuses_bad_auth_and_the_operator_renders_good_auth(cluster, namespace, operator):
    refused = {
        "duplicate": ({"keys": [AUTH["keys"][0], {**AUTH["keys"][1], "name": "team-a"}]},
                      'spec.server.auth.keys[1]: Duplicate value: {"name":"team-a"}'),
        "secret-name": ({"keys": [{"name": "a", "secretRef": {"name": "Bad_Secret", "key": "k"}}]},
                        "spec.server.auth.keys[0].secretRef.name: Invalid value"),
        "no-key": ({"keys": [{"name": "a", "secretRef": {"name": "s"}}]},
                   "spec.server.auth.keys[0].secretRef.key: Required value"),
        "key-name": ({"keys": [{"name": "..data", "secretRef": {"name": "s", "key": "k"}}]},
                     "spec.server.auth.keys[0].name: Invalid value"),
        "empty": ({"keys": []}, "spec.server.auth.keys: Invalid value: 0"),
    }  # fmt: skip
    for what, (auth, message) in refused.items():
        out = apply_doc(cluster, namespace, with_auth(auth, name=f"bad-{what}"), check=False)
        assert out.returncode != 0 and message in out.stderr, (what, out.stderr)
    assert get_json(cluster, "dd", "-n", namespace)["items"] == []  # nothing was stored

    apply_doc(cluster, namespace, with_auth())  # no Secret exists: the operator never looks

    def rendered():
        d = get_json(cluster, "deployment", "tiny", "-n", namespace)
        cm = get_json(cluster, "configmap", "tiny-config", "-n", namespace)
        return d and cm and (d["spec"]["template"]["spec"], yaml.safe_load(cm["data"]["runtime.yaml"]))

    pod, runtime = wait_for(rendered, 60, "the Deployment and ConfigMap of the CR with auth")
    assert runtime["server"]["auth_keys_dir"] == API_KEYS_MOUNT
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert [s["secret"]["name"] for s in volume["projected"]["sources"]] == ["api-keys", "ci-key"]
