"""spec.adapters with real pods on the real node (issue 23's must-show): a CR with two LoRA adapters
from the local Hub (tests/hub_server.py, the one the model-cache tests use, on the node's bridge
address) has them fetched once by the model cache's download Job beside the model, and its pod
serves them: GET /v1/models lists the base model and both adapters, and a request naming one gets
another image than the base model's.

Needs the real node (DIFFUSION_DEV_REAL_NODE=1; skipped, like the other real-pod tests, when it is off).
"""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.real_node import NODE_IP
from diffusion_dev.workloads import MODEL_FOLDER, tiny_model_root
from diffusion_runtime.tiny import write_tiny_lora
from hub_server import HubServer
from test_cluster_modelcache_realpods import (  # noqa: F401 - fixtures
    REPO_ID,
    TOKEN,
    _diagnose,
    _doc,
    _json,
    _ready,
    cache_ns,
    operator_release,
)

pytestmark = pytest.mark.cluster


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.timeout(1800)
def test_two_hub_adapters_are_downloaded_once_served_and_listed(cluster, node, cache_ns, tmp_path):  # noqa: F811
    ns, storage_class = cache_ns
    folder = tmp_path / "repo"
    shutil.copytree(tiny_model_root() / MODEL_FOLDER, folder)
    for name, seed in (("a", 1), ("b", 2)):
        write_tiny_lora(folder, tmp_path / f"lora-{name}", seed=seed)
        (folder / "loras").mkdir(exist_ok=True)
        shutil.copy(
            tmp_path / f"lora-{name}" / "pytorch_lora_weights.safetensors",
            folder / f"loras/{name}.safetensors",
        )
    hub = HubServer(folder, REPO_ID, token=TOKEN, host=NODE_IP).start()
    doc = _doc(hub.url, storage_class)
    doc["spec"]["adapters"] = [
        {"name": "style-a", "uri": f"hf://{REPO_ID}", "weightName": "loras/a.safetensors"},
        {"name": "style-b", "uri": f"hf://{REPO_ID}", "weightName": "loras/b.safetensors", "scale": 0.7},
    ]
    try:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        try:
            dd = wait_for(lambda: _ready(cluster, ns, 1), 900, "dd/cached Ready with 1 replica", interval=3)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    finally:
        hub.stop()
    gets = [a.path.split(f"/resolve/{hub.hub.commit}/", 1)[1] for a in hub.hub.file_gets()]
    assert sorted(gets) == sorted(set(gets)), gets  # each file once
    assert {"loras/a.safetensors", "loras/b.safetensors"} <= set(gets)
    cache = dd["status"]["modelCache"]
    assert cache["phase"] == "Ready" and cache["bytesDone"] == cache["bytesTotal"]
    lora_bytes = sum((folder / f"loras/{n}.safetensors").stat().st_size for n in ("a", "b"))
    assert cache["bytesTotal"] > lora_bytes

    base = cluster.service_url(ns, "cached")
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
        cards = json.loads(r.read())["data"]
    assert [c["id"] for c in cards][1:] == ["style-a", "style-b"], cards
    assert cards[2]["parent"] == cards[0]["id"] and cards[2]["scale"] == 0.7
    body = {"prompt": "a photo of a cat", "size": "64x64", "num_inference_steps": 2, "seed": 3}
    plain = _post(f"{base}/v1/images/generations", body)["data"][0]["b64_json"]
    styled = _post(f"{base}/v1/images/generations", {**body, "adapters": [{"name": "style-a"}]})
    assert styled["data"][0]["b64_json"] != plain
