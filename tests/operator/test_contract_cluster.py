"""One contract from CR to pod, against the real control plane with the operator as a subprocess.

Whatever the runtime refuses is refused before anything is applied: at admission where the CRD's
schema (generated from the spec model, bounds from the runtime's config) can say so, else
ConfigValid=False naming the CR field (the operator ran the runtime's own validation on the
runtime.yaml it rendered), and the running children are left exactly as they were.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings

import pytest
import yaml
from diffusion_dev import wait_for
from op_helpers import get_json, sample
from test_operator_cluster import (
    apply_doc,
    children_versions,
    conditions,
    dd,
    events_for,
    wait_ready,
)

pytestmark = pytest.mark.cluster


def _versions_without_cr(cluster, namespace: str, name: str) -> dict:
    return {k: v for k, v in children_versions(cluster, namespace, name).items() if k != "dd"}


def _wait_config_invalid(cluster, namespace: str, name: str, generation: int) -> dict:
    def invalid():
        obj = dd(cluster, namespace, name)
        cond = conditions(obj).get("ConfigValid", {})
        ok = cond.get("status") == "False" and obj["status"].get("observedGeneration") == generation
        return obj if ok else None

    return wait_for(invalid, 30, f"ConfigValid=False at generation {generation}")


# the cases of issue 8, item 2, on the running tiny sample (maxSteps 50, maxPixels 262144)
ADMISSION = [
    ({"server": {"maxN": 100}}, "spec.server.maxN"),
    ({"server": {"maxSteps": 2000}}, "spec.server.maxSteps"),
    ({"template": {"resources": {"limits": {"memory": "-1"}}}}, "spec.template.resources.limits.memory"),
]
CONFIG_INVALID = [
    ({"warmup": {"steps": 60}}, "spec.warmup.steps", "spec.server.maxSteps"),
    ({"warmup": {"resolutions": ["1000x1000"]}}, "spec.warmup.resolutions", "multiples of 16"),
    ({"warmup": {"resolutions": ["1024x1024"]}}, "spec.warmup.resolutions", "spec.server.maxPixels"),
]


def test_what_the_runtime_refuses_never_reaches_the_children(cluster, namespace, operator):
    apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
    wait_ready(cluster, namespace, "tiny")
    versions = _versions_without_cr(cluster, namespace, "tiny")

    for patch, field in ADMISSION:
        out = cluster.kubectl(
            "patch", "dd", "tiny", "-n", namespace, "--type", "merge", "-p", json.dumps({"spec": patch}),
            check=False,
        )  # fmt: skip
        assert out.returncode != 0, (patch, out.stdout)
        assert field in out.stderr, (field, out.stderr)
    assert dd(cluster, namespace, "tiny")["metadata"]["generation"] == 1  # nothing was stored

    generation = 1
    for patch, field, needle in CONFIG_INVALID:
        doc = sample("tiny-cpu.yaml")
        for key, value in patch.items():
            doc["spec"][key] = {**(doc["spec"].get(key) or {}), **value}
        apply_doc(cluster, namespace, doc)
        generation += 1
        obj = _wait_config_invalid(cluster, namespace, "tiny", generation)
        cond = conditions(obj)["ConfigValid"]
        assert cond["message"].startswith(field + ":") and needle in cond["message"], cond
        assert cond["reason"] == "InvalidSpec", cond
        assert conditions(obj)["Ready"]["status"] == "True"  # the old pods keep serving
        assert _versions_without_cr(cluster, namespace, "tiny") == versions, f"children touched by {patch}"

    # a Warning event per distinct message, each naming its field
    events = wait_for(
        lambda: (e := events_for(cluster, namespace, "tiny")) and len(e) >= len(CONFIG_INVALID) and e,
        30,
        "one Warning event per refused spec",
    )
    messages = " ".join(e["message"] for e in events)
    for _, field, _ in CONFIG_INVALID:
        assert field in messages, (field, messages)
    time.sleep(3)  # over a resync or two: still nothing written to the children
    assert _versions_without_cr(cluster, namespace, "tiny") == versions
    operator.assert_alive()

    # the sample again: valid, and the children are what they were
    apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
    obj = wait_for(
        lambda: (
            (o := dd(cluster, namespace, "tiny"))
            and conditions(o).get("ConfigValid", {}).get("status") == "True"
            and o["status"]["observedGeneration"] == generation + 1
            and o
        ),
        30,
        "ConfigValid=True again",
    )
    assert _versions_without_cr(cluster, namespace, "tiny") == versions
    assert conditions(obj)["Ready"]["status"] == "True"


def test_flux_fn_16_bn_8_is_valid(cluster, namespace, operator):
    """cache-dit 1.5.3 caches FLUX.1's 19 + 38 blocks as one list of 57 and checks Fn and Bn each."""
    cluster.kubectl(
        "create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=hf_fake"
    )  # fmt: skip
    doc = sample("flux-dev.yaml")
    doc["spec"]["cacheDit"]["cache_config"].update(Fn_compute_blocks=16, Bn_compute_blocks=8)
    apply_doc(cluster, namespace, doc)
    obj = wait_ready(cluster, namespace, "flux-dev")
    assert conditions(obj)["ConfigValid"]["status"] == "True"
    cm = get_json(cluster, "configmap", "flux-dev-config", "-n", namespace)
    cache = yaml.safe_load(cm["data"]["cache-dit.yaml"])["cache_config"]
    assert (cache["Fn_compute_blocks"], cache["Bn_compute_blocks"]) == (16, 8)
    assert obj["status"]["cacheTag"].startswith("DBCache_F16B8_")


def test_named_mask_cache_tag_is_cache_dits_own(cluster, namespace, operator):
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        from cache_dit import load_configs
    finally:
        logging.disable(logging.NOTSET)

    doc = sample("tiny-cpu.yaml")
    doc["spec"]["cacheDit"]["cache_config"]["steps_computation_mask"] = "fast"
    apply_doc(cluster, namespace, doc)
    obj = wait_ready(cluster, namespace, "tiny")
    # cache-dit's own path: load_configs expands the name with its steps_mask table, then strify
    expected = load_configs(copy.deepcopy(doc["spec"]["cacheDit"]))["cache_config"].strify()
    assert obj["status"]["cacheTag"] == expected
    assert "SCMfast" not in obj["status"]["cacheTag"]
    printed = cluster.kubectl("get", "dd", "tiny", "-n", namespace).stdout.splitlines()[1].split()
    assert expected in printed


def test_int8_on_cpu_is_valid_and_float8_on_cpu_is_refused(cluster, namespace, operator):
    doc = sample("tiny-cpu.yaml")
    doc["spec"]["quantize"] = {"quant_type": "int8_weight_only"}
    apply_doc(cluster, namespace, doc)
    obj = wait_ready(cluster, namespace, "tiny")
    assert conditions(obj)["ConfigValid"]["status"] == "True"
    cm = get_json(cluster, "configmap", "tiny-config", "-n", namespace)
    assert yaml.safe_load(cm["data"]["cache-dit.yaml"])["quantize_config"] == {
        "quant_type": "int8_weight_only"
    }

    doc["spec"]["quantize"] = {"quant_type": "float8_per_row"}
    apply_doc(cluster, namespace, doc)
    obj = _wait_config_invalid(cluster, namespace, "tiny", 2)
    message = conditions(obj)["ConfigValid"]["message"]
    assert message.startswith("spec.quantize.quant_type:") and "needs a CUDA GPU" in message, message


def test_kubectl_explain_shows_the_models_descriptions(cluster, crd):
    """The CRD is generated from the spec model: `kubectl explain` shows its descriptions and bounds."""
    from diffusion_operator.api import types

    out = cluster.kubectl("explain", "dd.spec.server.maxN").stdout
    assert types.ServerSpec.model_fields["max_n"].description in out, out
    out = cluster.kubectl("explain", "dd.spec.warmup.resolutions").stdout
    assert "multiples of 16" in out, out
    out = cluster.kubectl("explain", "dd.spec.cacheDit.cache_config.Fn_compute_blocks").stdout
    assert out.strip(), out


def test_a_parallel_layout_is_what_the_runtime_says(cluster, namespace, operator):
    """`cacheDit.parallelism_config`: the runtime's one function decides (config.parallel_layout_error,
    reached through cache_dit_errors); the operator reports its answer with no change of its own."""
    from diffusion_operator import validation
    from diffusion_operator.builders.configmap import render_cache_dit_config, runtime_config
    from diffusion_runtime.contract.config import runtime_errors

    doc = sample("tiny-cpu.yaml")
    doc["spec"]["gpu"] = {"count": 2}
    doc["spec"]["device"] = "auto"
    doc["spec"]["cacheDit"]["parallelism_config"] = {"ulysses_size": 2}
    cr = validation.parse("tiny", namespace, doc["spec"]).cr
    assert cr is not None
    runtime_says = [
        e
        for e in runtime_errors(runtime_config(cr), render_cache_dit_config(cr), "cuda")
        if e.reason == "Unsupported"
    ]
    apply_doc(cluster, namespace, doc)
    if runtime_says:
        obj = _wait_config_invalid(cluster, namespace, "tiny", 1)
        cond = conditions(obj)["ConfigValid"]
        assert cond["reason"] == "Unsupported", cond
        assert cond["message"].startswith("spec.cacheDit.parallelism_config"), cond
        assert get_json(cluster, "deployment", "tiny", "-n", namespace) is None  # nothing applied
    else:
        obj = wait_ready(cluster, namespace, "tiny")
        assert conditions(obj)["ConfigValid"]["status"] == "True"
