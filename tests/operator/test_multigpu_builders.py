"""The pod of a parallel replica: GPUs and /dev/shm follow the layout (pure builders)."""

from __future__ import annotations

import copy

from diffusion_operator import builders, validation
from op_helpers import owner_for, sample


def pod_of(doc: dict) -> dict:
    result = validation.parse(doc["metadata"]["name"], "ns", doc["spec"])
    assert result.ok, [str(e) for e in result.errors]
    s = result.cr
    cm = builders.build_configmap(s, owner_for(doc))
    return builders.build_deployment(s, owner_for(doc), cm)["spec"]["template"]["spec"]


def test_gpus_and_shm_follow_the_parallel_layout():
    qwen = sample("qwen-image.yaml")
    pod = pod_of(qwen)
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]

    four = copy.deepcopy(qwen)
    four["spec"]["gpu"]["count"] = 4
    four["spec"]["cacheDit"]["parallelism_config"] = {"ulysses_size": 2, "tp_size": 2}
    pod = pod_of(four)
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]

    four["spec"].setdefault("template", {})["shmSize"] = "12Gi"  # the user's size wins
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "12Gi"}} in pod_of(four)["volumes"]
