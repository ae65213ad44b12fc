"""The leader applies its own CRD (crd.py) against the real API server: an unchanged CRD is not
rewritten, a CRD stamped by a newer operator is never downgraded, an older or unstamped one is
updated. (The upgrade from the previous chart: tests/chart/test_chart_upgrade.py.)"""

from __future__ import annotations

import json

import pytest
from diffusion_operator import __version__
from diffusion_operator.crd import VERSION_ANNOTATION, apply_crd
from diffusion_operator.kube import Kube
from diffusion_operator.resources import CRD_NAME

pytestmark = pytest.mark.cluster


def api(cluster) -> Kube:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    return Kube(configuration)


def live(cluster) -> dict:
    return json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)


def test_apply_crd_updates_older_keeps_newer_and_skips_unchanged(cluster, crd):
    kube = api(cluster)
    try:
        assert apply_crd(kube) in ("applied", "unchanged")
        first = live(cluster)
        assert first["metadata"]["annotations"][VERSION_ANNOTATION] == __version__
        assert apply_crd(kube) == "unchanged"  # a no-op apply: no new resourceVersion
        assert live(cluster)["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

        # stamped by a newer operator (and its schema, here: a description only it has): left alone
        cluster.kubectl("annotate", "crd", CRD_NAME, "--overwrite", f"{VERSION_ANNOTATION}=99.0.0")
        newer = live(cluster)
        assert apply_crd(kube) == "newer"
        assert live(cluster)["metadata"]["resourceVersion"] == newer["metadata"]["resourceVersion"]

        # stamped by an older one: updated (a field it lacks comes back)
        patch = [{"op": "remove", "path": "/spec/versions/0/additionalPrinterColumns"}]
        cluster.kubectl("annotate", "crd", CRD_NAME, "--overwrite", f"{VERSION_ANNOTATION}=0.0.1")
        cluster.kubectl("patch", "crd", CRD_NAME, "--type=json", "-p", json.dumps(patch))
        assert "additionalPrinterColumns" not in live(cluster)["spec"]["versions"][0]
        assert apply_crd(kube) == "applied"
        after = live(cluster)
        assert after["spec"]["versions"][0]["additionalPrinterColumns"]
        assert after["metadata"]["annotations"][VERSION_ANNOTATION] == __version__
    finally:  # the session's CRD as the fixture left it
        apply_crd(kube)
