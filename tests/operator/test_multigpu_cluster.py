"""A parallel replica through the operator, on the real control plane with kwok GPU nodes: the
Qwen-Image sample (gpu.count 2, ulysses_size 2) is valid and its pod asks for 2 GPUs on a GPU node."""

from __future__ import annotations

import json

import pytest
import yaml
from diffusion_dev import wait_for
from op_helpers import get_json, sample

pytestmark = pytest.mark.cluster


def test_two_gpu_ulysses_sample_is_valid_and_its_pod_gets_two_gpus(cluster, namespace, operator):
    doc = sample("qwen-image.yaml")
    assert doc["spec"]["gpu"]["count"] == 2
    assert doc["spec"]["cacheDit"]["parallelism_config"] == {"ulysses_size": 2}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))

    def valid():
        obj = get_json(cluster, "dd", "qwen-image", "-n", namespace)
        conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        return conds.get("ConfigValid") if conds.get("ConfigValid", {}).get("status") == "True" else None

    try:
        wait_for(valid, 90, "dd/qwen-image ConfigValid=True")
    except TimeoutError:
        obj = get_json(cluster, "dd", "qwen-image", "-n", namespace)
        pytest.fail(f"not ConfigValid: {json.dumps(obj.get('status'), indent=1)}")

    cm = get_json(cluster, "configmap", "qwen-image-config", "-n", namespace)
    assert yaml.safe_load(cm["data"]["cache-dit.yaml"])["parallelism_config"] == {"ulysses_size": 2}

    def running_pod():
        pods = get_json(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=qwen-image")[
            "items"
        ]
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    pod = wait_for(running_pod, 90, "a scheduled qwen-image pod")
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["args"] == [
        "serve",
        "--config",
        "/etc/diffusion/runtime.yaml",
    ]  # the runtime starts ranks
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == "16Gi"  # 8Gi per rank
    node = get_json(cluster, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 2
