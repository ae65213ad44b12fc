"""The in-memory API server of the reconcile tests (fakekube.py) against the real one: the same
server-side-apply sequence gives the same object, so the fast tests' drift logic holds in reality."""

from __future__ import annotations

import copy
import json

import pytest
from diffusion_operator.kube import Kube
from fakekube import FakeKube

pytestmark = pytest.mark.cluster


def api(cluster) -> Kube:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    return Kube(configuration)


def configmap(namespace: str, data: dict, labels: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "probe", "namespace": namespace, "labels": labels},
        "data": data,
    }


def test_the_fake_applies_removes_and_takes_back_fields_like_the_api_server(cluster, namespace):
    real, fake = api(cluster), FakeKube()
    first = configmap(namespace, {"a": "1", "b": "2"}, {"team": "x", "tier": "gpu"})
    second = configmap(namespace, {"a": "1"}, {"team": "x"})  # b and the tier label removed
    edit = {"data": {"a": "edited", "c": "3"}, "metadata": {"labels": {"owner": "someone"}}}

    def fake_edit(obj: dict) -> None:
        obj["data"].update(edit["data"])
        obj["metadata"]["labels"].update(edit["metadata"]["labels"])

    results = {}
    for side in ("real", "fake"):
        if side == "real":
            real.apply(copy.deepcopy(first))
            cluster.kubectl(
                "patch", "configmap", "probe", "-n", namespace, "--type", "merge",
                "--field-manager", "editor", "-p", json.dumps(edit),
            )  # fmt: skip
            after_edit = real.get("v1", "ConfigMap", namespace, "probe")
            final = real.apply(copy.deepcopy(second))
        else:
            fake.apply(copy.deepcopy(first))
            after_edit = fake.edit("ConfigMap", namespace, "probe", fake_edit, manager="editor")
            final = fake.apply(copy.deepcopy(second))
        assert after_edit is not None
        results[side] = (
            after_edit["data"],
            final["data"],
            final["metadata"]["labels"],
            int(final["metadata"]["resourceVersion"]) > int(after_edit["metadata"]["resourceVersion"]),
        )
    assert results["fake"] == results["real"], results
    # and what that means: ours put back, ours removed, theirs kept
    assert results["real"][1] == {"a": "1", "c": "3"}
    assert results["real"][2] == {"team": "x", "owner": "someone"}
